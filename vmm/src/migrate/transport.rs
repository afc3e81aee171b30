//! Migration addresses (`tcp:HOST:PORT`, `unix:PATH`) and the sockets behind them: connect on
//! the source, listen and accept on the destination.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Errors parsing an address or opening its socket; each names the address and the fix.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// Not `tcp:` or `unix:`.
    #[error("migration address `{0}`: expected tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444) or unix:PATH (e.g. unix:/tmp/mig.sock)")]
    Syntax(String),
    /// Bad TCP port.
    #[error("migration address `{0}`: the port must be a number 1-65535 after the last `:` (e.g. tcp:127.0.0.1:4444)")]
    Port(String),
    /// Empty host or path.
    #[error("migration address `{0}`: the host or path is empty")]
    Empty(String),
    /// Connecting failed.
    #[error("cannot connect to migration destination {addr}: {source}; start the destination first with `vmm --incoming {addr}` and the same --mem and --cpus")]
    Connect {
        /// The address.
        addr: String,
        /// The error.
        source: io::Error,
    },
    /// Listening failed.
    #[error("cannot listen on {addr}: {source}; choose a free port or path (remove a stale unix socket file)")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        source: io::Error,
    },
    /// Accepting or configuring the connection failed.
    #[error("migration connection on {addr} failed: {source}")]
    Accept {
        /// The address.
        addr: String,
        /// The error.
        source: io::Error,
    },
}

/// Where a migration stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// TCP to `host:port` (host may be a name, an IPv4 or a bracketed IPv6 address).
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix stream socket at a path.
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl FromStr for Address {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Address, AddressError> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| AddressError::Port(s.into()))?;
            let port: u16 = port.parse().map_err(|_| AddressError::Port(s.into()))?;
            if port == 0 {
                return Err(AddressError::Port(s.into()));
            }
            if host.is_empty() {
                return Err(AddressError::Empty(s.into()));
            }
            Ok(Address::Tcp {
                host: host.into(),
                port,
            })
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddressError::Empty(s.into()));
            }
            Ok(Address::Unix(path.into()))
        } else {
            Err(AddressError::Syntax(s.into()))
        }
    }
}

impl Address {
    fn tcp_target(host: &str, port: u16) -> String {
        format!("{host}:{port}")
    }

    /// Connects to a listening destination.
    pub fn connect(&self) -> Result<Connection, AddressError> {
        let err = |source| AddressError::Connect {
            addr: self.to_string(),
            source,
        };
        match self {
            Address::Tcp { host, port } => {
                let s = TcpStream::connect(Self::tcp_target(host, *port)).map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                Ok(Connection::Tcp(s))
            }
            Address::Unix(p) => Ok(Connection::Unix(UnixStream::connect(p).map_err(err)?)),
        }
    }

    /// Listens for the source.
    pub fn listen(&self) -> Result<Listener, AddressError> {
        let err = |source| AddressError::Listen {
            addr: self.to_string(),
            source,
        };
        let inner = match self {
            Address::Tcp { host, port } => {
                ListenerInner::Tcp(TcpListener::bind(Self::tcp_target(host, *port)).map_err(err)?)
            }
            Address::Unix(p) => ListenerInner::Unix(UnixListener::bind(p).map_err(err)?),
        };
        Ok(Listener {
            addr: self.clone(),
            inner,
        })
    }
}

#[derive(Debug)]
enum ListenerInner {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A listening socket waiting for one source.
#[derive(Debug)]
pub struct Listener {
    addr: Address,
    inner: ListenerInner,
}

impl Listener {
    /// The address actually bound (with the real port when asked for port 0 via `bind_any`).
    pub fn address(&self) -> Address {
        match (&self.inner, &self.addr) {
            (ListenerInner::Tcp(l), Address::Tcp { host, .. }) => Address::Tcp {
                host: host.clone(),
                port: l.local_addr().map(|a| a.port()).unwrap_or(0),
            },
            _ => self.addr.clone(),
        }
    }

    /// A TCP listener on `host` with a port the kernel picks (for tests and demos).
    pub fn bind_any_tcp(host: &str) -> Result<Listener, AddressError> {
        let l = TcpListener::bind(Address::tcp_target(host, 0)).map_err(|source| {
            AddressError::Listen {
                addr: format!("tcp:{host}:0"),
                source,
            }
        })?;
        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
        Ok(Listener {
            addr: Address::Tcp {
                host: host.into(),
                port,
            },
            inner: ListenerInner::Tcp(l),
        })
    }

    /// Waits for the source to connect.
    pub fn accept(&self) -> Result<Connection, AddressError> {
        let err = |source| AddressError::Accept {
            addr: self.addr.to_string(),
            source,
        };
        match &self.inner {
            ListenerInner::Tcp(l) => {
                let (s, _) = l.accept().map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                Ok(Connection::Tcp(s))
            }
            ListenerInner::Unix(l) => Ok(Connection::Unix(l.accept().map_err(err)?.0)),
        }
    }
}

impl Listener {
    /// Like [`accept`](Self::accept), but gives up with `Ok(None)` once `limit` has passed
    /// without a connection (`None`: waits for ever).
    pub fn accept_within(
        &self,
        limit: Option<Duration>,
    ) -> Result<Option<Connection>, AddressError> {
        use std::os::fd::AsRawFd;
        let Some(limit) = limit else {
            return self.accept().map(Some);
        };
        let fd = match &self.inner {
            ListenerInner::Tcp(l) => l.as_raw_fd(),
            ListenerInner::Unix(l) => l.as_raw_fd(),
        };
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd on the stack for the call; `fd` is the listener's,
            // open while `self` lives.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(AddressError::Accept {
                    addr: self.addr.to_string(),
                    source: e,
                });
            }
            if n > 0 {
                return self.accept().map(Some);
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (ListenerInner::Unix(_), Address::Unix(p)) = (&self.inner, &self.addr) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A connected migration socket; `try_clone` gives the other direction its own handle.
#[derive(Debug)]
pub enum Connection {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl Connection {
    /// A second handle on the same socket (one for reading, one for writing).
    pub fn try_clone(&self) -> io::Result<Connection> {
        Ok(match self {
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
            Connection::Unix(s) => Connection::Unix(s.try_clone()?),
        })
    }

    /// Fails a read or a write on this socket (every handle of it) that makes no progress for
    /// `limit` (`None`: waits for ever), with an error that names the limit.
    pub fn set_idle_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_idle_timeout(limit)?;
        match self {
            Connection::Tcp(s) => s.set_write_timeout(limit),
            Connection::Unix(s) => s.set_write_timeout(limit),
        }
    }

    /// Like [`set_idle_timeout`](Self::set_idle_timeout) for reads only (a postcopy source's
    /// back channel may rightly stay quiet while it pushes pages).
    pub fn set_read_idle_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(limit),
            Connection::Unix(s) => s.set_read_timeout(limit),
        }
    }

    /// Closes both directions: a thread blocked reading it returns (end-of-file).
    pub fn shutdown_both(&self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Connection::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }

    /// Closes the sending direction (the peer reads end-of-file).
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Connection::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

/// The error of a read or write that hit the socket's timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`
/// report EAGAIN): says which way the peer stalled and for how long.
fn stalled(e: io::Error, reading: bool, limit: Option<Duration>) -> io::Error {
    if !matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        return e;
    }
    let secs = limit.map_or(0.0, |l| l.as_secs_f64());
    io::Error::new(
        io::ErrorKind::TimedOut,
        if reading {
            format!("the peer sent nothing for {secs} s (--migrate-timeout)")
        } else {
            format!("the peer took nothing for {secs} s (--migrate-timeout)")
        },
    )
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s
                .read(buf)
                .map_err(|e| stalled(e, true, s.read_timeout().ok().flatten())),
            Connection::Unix(s) => s
                .read(buf)
                .map_err(|e| stalled(e, true, s.read_timeout().ok().flatten())),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s
                .write(buf)
                .map_err(|e| stalled(e, false, s.write_timeout().ok().flatten())),
            Connection::Unix(s) => s
                .write(buf)
                .map_err(|e| stalled(e, false, s.write_timeout().ok().flatten())),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.flush(),
            Connection::Unix(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_say_why() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Address>().unwrap(),
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(
            "tcp:[::1]:80".parse::<Address>().unwrap().to_string(),
            "tcp:[::1]:80"
        );
        assert_eq!(
            "unix:/tmp/x.sock".parse::<Address>().unwrap(),
            Address::Unix("/tmp/x.sock".into())
        );
        for (bad, needle) in [
            ("127.0.0.1:4444", "expected tcp:HOST:PORT"),
            ("tcp:localhost", "port must be"),
            ("tcp:localhost:0", "port must be"),
            ("tcp:localhost:99999", "port must be"),
            ("tcp::4444", "empty"),
            ("unix:", "empty"),
        ] {
            let e = bad.parse::<Address>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn connect_to_nobody_names_the_fix() {
        let l = Listener::bind_any_tcp("127.0.0.1").unwrap();
        let addr = l.address();
        drop(l);
        let e = addr.connect().unwrap_err().to_string();
        assert!(e.contains("--incoming"), "{e}");
    }
}
