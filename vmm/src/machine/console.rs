//! The console and signals of a VM run from a terminal: COM1's output flushed as it comes,
//! stdin fed to COM1 (the terminal put in non-canonical mode meanwhile), and SIGINT/SIGTERM
//! turned into a clean stop of the VM. The loop runs on a thread of its own.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, warn};

use crate::devices::serial::SerialDevice;
use crate::vcpu::{ExitRequest, EXIT_OK};

/// Stdout that flushes every write, so a prompt without a newline shows at once.
pub struct FlushingStdout;

impl Write for FlushingStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// SIGINT and SIGTERM as a readable fd (blocked for every thread spawned after this).
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks SIGINT and SIGTERM in this thread (and every thread it spawns from now on) and
    /// opens them as a descriptor: call it before any other thread starts.
    pub fn new() -> std::io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the calls only write into it and block the two
        // signals for this thread, which the vCPU threads inherit.
        let fd = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// Reads one pending signal number, if any.
    fn read(&self) -> Option<u32> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads at most `info.len()` bytes into a buffer we own.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        (n as usize == info.len())
            .then(|| u32::from_ne_bytes(info[..4].try_into().expect("4 bytes")))
    }
}

/// The terminal settings to restore when stdin is a tty put in non-canonical mode.
struct TtyGuard(Option<libc::termios>);

impl TtyGuard {
    fn raw_stdin() -> TtyGuard {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return TtyGuard(None);
        }
        // SAFETY: termios is plain data filled in by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios for tcgetattr/tcsetattr on our own stdin.
        unsafe {
            if libc::tcgetattr(fd, &mut t) != 0 {
                return TtyGuard(None);
            }
            let saved = t;
            // Keys go to the guest as typed; ISIG stays so Ctrl-C still stops the VM.
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
            TtyGuard(Some(saved))
        }
    }
}

impl Drop for TtyGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings read from the same descriptor.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

/// The VMM's event sources: the exit request, SIGINT/SIGTERM, and stdin for the serial console.
struct Control {
    exit: ExitRequest,
    signals: SignalFd,
    serial: Option<Arc<SerialDevice>>,
    stdin_open: bool,
}

const STDIN: RawFd = libc::STDIN_FILENO;

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            warn!("cannot watch the exit event: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.signals.fd, EventSet::IN)) {
            warn!("cannot watch SIGINT/SIGTERM: {e:?}");
        }
        if self.serial.is_some() {
            match ops.add(Events::new_raw(STDIN, EventSet::IN)) {
                Ok(()) => self.stdin_open = true,
                Err(e) => debug!("stdin is not pollable ({e:?}); no serial input"),
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
        } else if fd == self.signals.fd.as_raw_fd() {
            while let Some(sig) = self.signals.read() {
                let name = if sig == libc::SIGINT as u32 {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                self.exit.request(EXIT_OK, &format!("{name} received"));
            }
        } else if fd == STDIN {
            let Some(serial) = &self.serial else { return };
            let room = serial.input_capacity();
            if room == 0 {
                return; // the guest has not drained its FIFO; epoll will report stdin again
            }
            let mut buf = vec![0u8; room];
            // SAFETY: stdin stays open for the life of the process; read into our buffer.
            let mut stdin = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(STDIN) });
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    debug!("stdin closed; no more serial input");
                    let _ = ops.remove(events);
                    self.stdin_open = false;
                }
                Ok(n) => {
                    serial.enqueue_input(&buf[..n]);
                }
            }
        }
    }
}

/// Starts the console thread: it stops the VM on SIGINT/SIGTERM (exit code 0), feeds stdin
/// to `serial` when given, and ends once `exit` has a code.
pub fn spawn(
    exit: &ExitRequest,
    signals: SignalFd,
    serial: Option<Arc<SerialDevice>>,
) -> Result<JoinHandle<()>> {
    let exit = exit.clone();
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            if let Err(e) = event_loop(&exit, signals, serial) {
                warn!("console: {e:#}; no more console input or signal handling");
            }
        })
        .context("starting the console thread")
}

fn event_loop(
    exit: &ExitRequest,
    signals: SignalFd,
    serial: Option<Arc<SerialDevice>>,
) -> Result<i32> {
    let _tty = serial.as_ref().map(|_| TtyGuard::raw_stdin());
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new()
        .map_err(|e| anyhow::anyhow!("cannot create the event loop: {e:?}"))?;
    let control = Arc::new(Mutex::new(Control {
        exit: exit.clone(),
        signals,
        serial,
        stdin_open: false,
    }));
    em.add_subscriber(control);
    loop {
        if let Some(code) = exit.code() {
            return Ok(code);
        }
        if let Err(e) = em.run_with_timeout(200) {
            warn!("event loop: {e:?}");
        }
    }
}
