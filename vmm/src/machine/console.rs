//! The console of a VM run from a terminal: COM1's output flushed as it comes, and stdin fed to
//! COM1 (the terminal put in non-canonical mode meanwhile). The loop runs on a thread of its
//! own; SIGINT/SIGTERM are `signals`' business.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, warn};

use crate::devices::serial::SerialDevice;
use crate::exit::ExitRequest;

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

/// The console's event sources: the exit request, and stdin for the serial console.
struct Control {
    exit: ExitRequest,
    serial: Option<Arc<SerialDevice>>,
}

const STDIN: RawFd = libc::STDIN_FILENO;

/// Whether the console feeds stdin to the guest's serial port and stdin has not ended: then
/// someone can still type, and the guest is not idle while it waits for that.
static INPUT_OPEN: AtomicBool = AtomicBool::new(false);

/// Whether console input can still reach the guest (see [`INPUT_OPEN`]).
pub fn input_open() -> bool {
    INPUT_OPEN.load(Ordering::Relaxed)
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            warn!("cannot watch the exit event: {e:?}");
        }
        if self.serial.is_some() {
            match ops.add(Events::new_raw(STDIN, EventSet::IN)) {
                Ok(()) => INPUT_OPEN.store(true, Ordering::Relaxed),
                Err(e) => debug!("stdin is not pollable ({e:?}); no serial input"),
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
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
                    INPUT_OPEN.store(false, Ordering::Relaxed);
                }
                Ok(n) => {
                    serial.enqueue_input(&buf[..n]);
                }
            }
        }
    }
}

/// Starts the console thread: it feeds stdin to `serial` when given, and ends once `exit` has
/// a code.
pub fn spawn(exit: &ExitRequest, serial: Option<Arc<SerialDevice>>) -> Result<JoinHandle<()>> {
    let exit = exit.clone();
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Console);
            if let Err(e) = event_loop(&exit, serial) {
                warn!("console: {e:#}; no more console input");
            }
        })
        .context("starting the console thread")
}

fn event_loop(exit: &ExitRequest, serial: Option<Arc<SerialDevice>>) -> Result<i32> {
    let _tty = serial.as_ref().map(|_| TtyGuard::raw_stdin());
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new()
        .map_err(|e| anyhow::anyhow!("cannot create the event loop: {e:?}"))?;
    let control = Arc::new(Mutex::new(Control {
        exit: exit.clone(),
        serial,
    }));
    em.add_subscriber(control);
    loop {
        if let Some(code) = exit.code() {
            INPUT_OPEN.store(false, Ordering::Relaxed);
            return Ok(code);
        }
        if let Err(e) = em.run_with_timeout(200) {
            warn!("event loop: {e:?}");
        }
    }
}
