//! The control socket: JSON lines on a unix socket (`--api-socket PATH`) with `stats`, `info`,
//! `reclaim`, `pause`, `resume`, `migrate`, `shutdown`, `balloon` and `receive`, served on its own thread
//! for an [`ApiTarget`] (the running VM, or a `--stay` process with none).
//!
//! One request per line, one response per line:
//!
//! ```text
//! {"cmd":"stats"}                              -> {"ok":true,"stats":{...}}
//! {"cmd":"reclaim","gpa":"1G","len":1073741824} -> {"ok":true,"reclaim":{...}}
//! {"cmd":"pause"} / {"cmd":"resume"}           -> {"ok":true}
//! {"cmd":"migrate","to":"tcp:HOST:PORT"}       -> {"ok":true,"migrate":{...}} once the destination runs the guest
//! {"cmd":"migrate","to":ADDR,"postcopy_after":N} -> the same, switching to postcopy after N rounds
//! {"cmd":"balloon","size":"512M"}              -> {"ok":true,"balloon":{...}}: the target set, the balloon's figures (`--balloon`)
//! {"cmd":"receive","from":"tcp:HOST:PORT"}     -> {"ok":true,"receive":{...}} once it listens (`vmm --stay` with no VM)
//! anything wrong                               -> {"ok":false,"error":"what was wrong and what to send"}
//! ```
//!
//! `gpa`, `len` and `size` are JSON numbers or strings (`"0x40000000"`, `"512M"`, `"1G"`). A bad request
//! gets an error response; the connection, the server and the VM go on.
//!
//! Only the VMM's own user (and root) may drive the VM: the socket is created mode 0600, and
//! each connection's peer credentials (`SO_PEERCRED`) are checked before a request is read. A
//! client that sends no complete line for the client timeout (`--api-timeout`), or a line
//! longer than [`MAX_REQUEST_BYTES`], gets an error response and is disconnected.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Longest request line accepted; a longer one is refused and the connection closed.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// How long a client may go without sending a complete request line by default
/// (`--api-timeout`).
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a connection thread looks at the stop flag while its client is idle.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// What the control socket drives: the running VM.
pub trait ApiTarget: Send + Sync {
    /// Statistics as JSON (stage2 and demand paging).
    fn stats(&self) -> Value;
    /// Drops the host memory of `[gpa, gpa+len)`; a JSON report, or what was wrong.
    fn reclaim(&self, gpa: u64, len: u64) -> Result<Value, String>;
    /// Pauses every vCPU.
    fn pause(&self) -> Result<(), String>;
    /// Resumes every vCPU.
    fn resume(&self) -> Result<(), String>;
    /// Live-migrates the VM to `to` (`tcp:HOST:PORT` or `unix:PATH`), switching to postcopy
    /// after `postcopy_after` rounds when given; returns the figures once the destination
    /// runs the guest (postcopy: once it has every page). By default a VM cannot migrate.
    fn migrate(&self, to: &str, postcopy_after: Option<u32>) -> Result<Value, String> {
        let _ = postcopy_after;
        Err(format!("this VM cannot migrate to {to}"))
    }
    /// What the VM is: state, vCPUs, memory, backing, uptime, dirty mode, payload.
    fn info(&self) -> Value {
        Value::Null
    }
    /// Asks the guest to power off (an ACPI power button when it listens), and stops the VM
    /// after a timeout if it does not; returns how it ended.
    fn shutdown(&self) -> Result<Value, String> {
        Err("this VM cannot be shut down over the control socket".into())
    }
    /// The balloon's figures; with `size`, first sets its target to that many bytes (the
    /// guest gives that much of its memory back). By default a VM has no balloon.
    fn balloon(&self, size: Option<u64>) -> Result<Value, String> {
        let _ = size;
        Err("no VM with a balloon runs here: start one with --kernel ... --balloon".into())
    }
    /// Listens at `from` (`tcp:HOST:PORT` or `unix:PATH`) for the next VM's migration source
    /// and answers once it listens: only a `vmm --stay` whose VM has left takes one in.
    fn receive(&self, from: &str) -> Result<Value, String> {
        Err(format!(
            "a VM runs here, so this vmm cannot receive another at {from}: `receive` is for a \
             vmm started with --stay whose VM has migrated out"
        ))
    }
}

/// Type of the [`ApiFns::stats`] callback.
pub type StatsFn = dyn Fn() -> Value + Send + Sync;
/// Type of the [`ApiFns::reclaim`] callback.
pub type ReclaimFn = dyn Fn(u64, u64) -> Result<Value, String> + Send + Sync;
/// Type of the [`ApiFns::pause`] and [`ApiFns::resume`] callbacks.
pub type ControlFn = dyn Fn() -> Result<(), String> + Send + Sync;

/// An [`ApiTarget`] made of four closures: the VM wires its pager and vCPUs in without a type
/// of its own, e.g. `stats: Box::new(move || pager.stats().to_json())`.
pub struct ApiFns {
    /// Answers `stats`.
    pub stats: Box<StatsFn>,
    /// Answers `reclaim`.
    pub reclaim: Box<ReclaimFn>,
    /// Answers `pause`.
    pub pause: Box<ControlFn>,
    /// Answers `resume`.
    pub resume: Box<ControlFn>,
}

impl ApiTarget for ApiFns {
    fn stats(&self) -> Value {
        (self.stats)()
    }
    fn reclaim(&self, gpa: u64, len: u64) -> Result<Value, String> {
        (self.reclaim)(gpa, len)
    }
    fn pause(&self) -> Result<(), String> {
        (self.pause)()
    }
    fn resume(&self) -> Result<(), String> {
        (self.resume)()
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something that is not a socket is at the path.
    #[error(
        "--api-socket {0}: the path exists and is not a socket; remove it or choose another path"
    )]
    NotASocket(PathBuf),
    /// Another process serves the path.
    #[error(
        "--api-socket {0}: another process is listening there; stop it or choose another path"
    )]
    InUse(PathBuf),
    /// bind / listen failed.
    #[error("--api-socket {path}: cannot listen: {source}; check that the directory exists and is writable")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Thread or eventfd creation failed.
    #[error("cannot start the API server: {0}")]
    Spawn(#[source] io::Error),
}

/// A running control-socket server; stops (and removes the socket) on drop.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish()
    }
}

impl ApiServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.stop.write(1) {
            warn!("cannot signal the API server to stop: {e}");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the API server thread panicked");
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` and serves requests for `target` on a thread of its own, with the default
/// client timeout. A stale socket left by a dead VMM is replaced; a live one is not.
pub fn serve(path: &Path, target: Arc<dyn ApiTarget>) -> Result<ApiServer, ApiError> {
    serve_with(path, target, DEFAULT_CLIENT_TIMEOUT)
}

/// Like [`serve`], disconnecting a client that sends no complete request line for
/// `client_timeout`.
pub fn serve_with(
    path: &Path,
    target: Arc<dyn ApiTarget>,
    client_timeout: Duration,
) -> Result<ApiServer, ApiError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    // Owner only: connecting needs write permission on the socket. SO_PEERCRED is checked
    // on every connection as well (a client may connect between bind and this chmod).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ApiError::Bind {
            path: path.to_path_buf(),
            source,
        }
    })?;
    listener.set_nonblocking(true).map_err(ApiError::Spawn)?;
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ApiError::Spawn)?);
    let stopping = Arc::new(AtomicBool::new(false));
    let (st, sp) = (stop.clone(), stopping.clone());
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // The connection threads it starts run under the same filter.
            crate::seccomp::enter(crate::seccomp::ThreadKind::Api);
            accept_loop(listener, st, sp, target, client_timeout)
        })
        .map_err(ApiError::Spawn)?;
    info!("control socket listening on {}", path.display());
    Ok(ApiServer {
        path: path.to_path_buf(),
        stop,
        stopping,
        thread: Some(thread),
    })
}

fn accept_loop(
    listener: UnixListener,
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    target: Arc<dyn ApiTarget>,
    client_timeout: Duration,
) {
    let conns: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds living for the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            warn!("API server: poll failed: {e}; the control socket stops");
            break;
        }
        if fds[1].revents != 0 || stopping.load(Ordering::SeqCst) {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let (t, sp) = (target.clone(), stopping.clone());
                match std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || serve_connection(stream, t.as_ref(), &sp, client_timeout))
                {
                    Ok(h) => {
                        let mut c = conns.lock().unwrap();
                        c.retain(|h| !h.is_finished());
                        c.push(h);
                    }
                    Err(e) => warn!("API server: cannot start a connection thread: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!("API server: accept failed: {e}"),
        }
    }
    for h in conns.into_inner().unwrap() {
        let _ = h.join();
    }
}

/// The user ids that may drive the VM: the VMM's effective user and root.
fn peer_allowed(uid: libc::uid_t) -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// The user id of the process at the other end of `stream` (`SO_PEERCRED`, taken at connect).
fn peer_uid(stream: &UnixStream) -> io::Result<libc::uid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which lives for the call, and
    // `len` says its size.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Serves one client until it closes, a line is too long, it sends no complete line for
/// `client_timeout`, or the server stops. A peer of another user is refused at once.
fn serve_connection(
    stream: UnixStream,
    target: &dyn ApiTarget,
    stopping: &AtomicBool,
    client_timeout: Duration,
) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("API connection: {e}");
            return;
        }
    };
    match peer_uid(&stream) {
        Ok(uid) if peer_allowed(uid) => {}
        Ok(uid) => {
            // SAFETY: geteuid has no preconditions.
            let own = unsafe { libc::geteuid() };
            warn!(
                "API connection from uid {uid} refused: only uid {own} and root may drive the VM"
            );
            let _ = write_response(
                &mut writer,
                &error(format!(
                    "uid {uid} may not drive this VM: the control socket serves only uid {own} \
                     (the VMM's user) and root"
                )),
            );
            return;
        }
        Err(e) => {
            warn!("API connection refused: cannot read its credentials (SO_PEERCRED): {e}");
            return;
        }
    }
    if let Err(e) = stream.set_read_timeout(Some(IDLE_CHECK)) {
        warn!("API connection: {e}");
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    // The last time the client sent a byte or got an answer.
    let mut last_progress = Instant::now();
    loop {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let before = line.len();
        // Read up to and including '\n', never more than the limit (+1 to detect overflow).
        let room = (MAX_REQUEST_BYTES + 1).saturating_sub(line.len()) as u64;
        match (&mut reader).take(room).read_until(b'\n', &mut line) {
            Ok(0) => {
                // Client closed; answer a last request sent without a newline.
                if !line.is_empty() {
                    let _ = write_response(&mut writer, &handle_line(&line, target));
                }
                return;
            }
            Ok(_) => last_progress = Instant::now(),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                // Bytes read before the timeout stay in `line`.
                if line.len() > before {
                    last_progress = Instant::now();
                } else if last_progress.elapsed() >= client_timeout {
                    let what = if line.is_empty() {
                        "no request"
                    } else {
                        "an unfinished request line"
                    };
                    debug!("API connection: {what} for {client_timeout:?}; closing it");
                    let _ = write_response(
                        &mut writer,
                        &error(format!(
                            "{what} for {} s: closing the connection; send one JSON object \
                             per line, ending with a newline",
                            client_timeout.as_secs_f64()
                        )),
                    );
                    return;
                }
                continue;
            }
            Err(e) => {
                debug!("API connection: read failed: {e}");
                return;
            }
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() <= MAX_REQUEST_BYTES {
            continue; // partial line (timeout mid-line or EOF next)
        }
        if line.len() > MAX_REQUEST_BYTES {
            let resp = error(format!(
                "request longer than {MAX_REQUEST_BYTES} bytes: send one short JSON object per line"
            ));
            let _ = write_response(&mut writer, &resp);
            return;
        }
        let resp = handle_line(&line, target);
        line.clear();
        if let Err(e) = write_response(&mut writer, &resp) {
            debug!("API connection: write failed: {e}");
            return;
        }
        last_progress = Instant::now();
    }
}

fn write_response(w: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    w.write_all(s.as_bytes())
}

fn error(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

const USAGE: &str = r#"send one JSON object per line: {"cmd":"stats"}, {"cmd":"reclaim","gpa":GPA,"len":LEN}, {"cmd":"pause"}, {"cmd":"resume"}, {"cmd":"info"}, {"cmd":"shutdown"}, {"cmd":"migrate","to":"tcp:HOST:PORT"[,"postcopy_after":N]}, {"cmd":"balloon"[,"size":SIZE]} or {"cmd":"receive","from":"tcp:HOST:PORT"}"#;

/// Answers one request line (without or with its trailing newline).
pub fn handle_line(line: &[u8], target: &dyn ApiTarget) -> Value {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t.trim(),
        Err(_) => return error(format!("request is not UTF-8 text; {USAGE}")),
    };
    if text.is_empty() {
        return error(format!("empty request; {USAGE}"));
    }
    let req: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return error(format!("malformed JSON ({e}); {USAGE}")),
    };
    let Some(obj) = req.as_object() else {
        return error(format!("request is not a JSON object; {USAGE}"));
    };
    let Some(cmd) = obj.get("cmd").and_then(Value::as_str) else {
        return error(format!("request has no \"cmd\" string; {USAGE}"));
    };
    match cmd {
        "stats" => json!({"ok": true, "stats": target.stats()}),
        "info" => json!({"ok": true, "info": target.info()}),
        "shutdown" => match target.shutdown() {
            Ok(how) => json!({"ok": true, "shutdown": how}),
            Err(e) => error(e),
        },
        "reclaim" => {
            let gpa = match size_field(obj, "gpa") {
                Ok(v) => v,
                Err(e) => return error(e),
            };
            let len = match size_field(obj, "len") {
                Ok(v) => v,
                Err(e) => return error(e),
            };
            match target.reclaim(gpa, len) {
                Ok(report) => json!({"ok": true, "reclaim": report}),
                Err(e) => error(e),
            }
        }
        "balloon" => {
            let size = match obj.get("size") {
                None | Some(Value::Null) => None,
                Some(_) => match size_field(obj, "size") {
                    Ok(v) => Some(v),
                    Err(e) => return error(e),
                },
            };
            match target.balloon(size) {
                Ok(v) => json!({"ok": true, "balloon": v}),
                Err(e) => error(e),
            }
        }
        "pause" => match target.pause() {
            Ok(()) => json!({"ok": true}),
            Err(e) => error(e),
        },
        "resume" => match target.resume() {
            Ok(()) => json!({"ok": true}),
            Err(e) => error(e),
        },
        "receive" => match obj.get("from").and_then(Value::as_str) {
            Some(from) => match target.receive(from) {
                Ok(how) => json!({"ok": true, "receive": how}),
                Err(e) => error(e),
            },
            None => error(
                "receive needs \"from\": the address to listen at for the migration source, \
                 e.g. \"tcp:0.0.0.0:4444\"",
            ),
        },
        "migrate" => match obj.get("to").and_then(Value::as_str) {
            Some(to) => {
                let postcopy_after = match obj.get("postcopy_after") {
                    None | Some(Value::Null) => None,
                    Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                        Some(n) => Some(n),
                        None => {
                            return error(format!(
                                "\"postcopy_after\" must be a round count (1 or more), not {v}"
                            ))
                        }
                    },
                };
                match target.migrate(to, postcopy_after) {
                    Ok(figures) => json!({"ok": true, "migrate": figures}),
                    Err(e) => error(e),
                }
            }
            None => error(
                "migrate needs \"to\": the destination's address, e.g. \"tcp:127.0.0.1:4444\"",
            ),
        },
        other => error(format!("unknown command {other:?}; {USAGE}")),
    }
}

fn size_field(obj: &Map<String, Value>, name: &str) -> Result<u64, String> {
    match obj.get(name) {
        None => Err(format!(
            "reclaim needs \"{name}\": a number or a string such as \"0x40000000\" or \"1G\""
        )),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("\"{name}\" is {n}: give a non-negative integer below 2^64")),
        Some(Value::String(s)) => parse_size(s).map_err(|e| format!("\"{name}\": {e}")),
        Some(other) => Err(format!(
            "\"{name}\" is {other}: give a number or a string such as \"0x40000000\" or \"1G\""
        )),
    }
}

/// Parses a size or address: decimal, `0x` hex, with an optional `K`/`M`/`G`/`T` suffix
/// (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a size: write 4096, 0x1000, 512M or 1G");
    if t.is_empty() {
        return Err(bad());
    }
    let (num, shift) = match t.as_bytes()[t.len() - 1].to_ascii_uppercase() {
        b'K' => (&t[..t.len() - 1], 10),
        b'M' => (&t[..t.len() - 1], 20),
        b'G' => (&t[..t.len() - 1], 30),
        b'T' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let v = if let Some(hex) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).map_err(|_| bad())?
    } else {
        num.parse::<u64>().map_err(|_| bad())?
    };
    v.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} does not fit in 64 bits"))
}

/// A blocking client of the control socket: sends one request, returns the response.
pub fn request(path: &Path, req: &Value) -> io::Result<Value> {
    let mut stream = UnixStream::connect(path)?;
    let mut line = req.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(stream).read_line(&mut resp)?;
    serde_json::from_str(&resp).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_hex_and_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("0x2G"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("0xffffffffffffffffK")
            .unwrap_err()
            .contains("64 bits"));
    }
}
