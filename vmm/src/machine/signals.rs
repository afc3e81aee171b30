//! SIGINT and SIGTERM for the whole `vmm` process: blocked in every thread from the start of
//! `main` and read from a signalfd by one thread, which stops the running VM with 128 + the
//! signal number ([`EXIT_SIGINT`], [`EXIT_SIGTERM`]) so that its normal tear-down removes the
//! control socket and temporary files and writes `--stats-json`. Before a VM exists (an
//! `--incoming` destination waiting for its source) the process ends at once, after removing
//! the files registered with [`remove_on_early_exit`]. A second signal while the VM is already
//! stopping ends the process at once the same way.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use log::warn;

use crate::exit::{ExitRequest, EXIT_SIGINT, EXIT_SIGTERM};

/// The VM a signal stops, once there is one.
static TARGET: Mutex<Option<ExitRequest>> = Mutex::new(None);
/// Files to remove when a signal ends the process before a VM could clean up.
static EARLY_CLEANUP: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Blocks SIGINT and SIGTERM in the calling thread (and every thread it spawns from now on)
/// and starts the thread that handles them: call it first in `main`, before any other thread
/// exists (a thread spawned earlier would take the default action: death without clean-up).
pub fn start() -> anyhow::Result<()> {
    let fd = block_and_open().context("cannot set up SIGINT/SIGTERM handling")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Signals);
            loop {
                match read_signal(&fd) {
                    Ok(sig) => on_signal(sig),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!("reading SIGINT/SIGTERM failed ({e}); they are ignored from now on");
                        return;
                    }
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Makes SIGINT/SIGTERM stop the VM whose exit request is `exit` (the machine calls it when it
/// creates the request). Harmless when [`start`] was not called (a library user).
pub fn attach(exit: &ExitRequest) {
    *TARGET.lock().unwrap_or_else(|p| p.into_inner()) = Some(exit.clone());
}

/// Makes SIGINT/SIGTERM end the process at once: its VM has gone (a `--stay` vmm between
/// VMs).
pub fn detach() {
    *TARGET.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Registers a file (a Unix socket being listened on, ...) to remove if a signal ends the
/// process before the VM's own tear-down can.
pub fn remove_on_early_exit(path: PathBuf) {
    let mut paths = EARLY_CLEANUP.lock().unwrap_or_else(|p| p.into_inner());
    if !paths.contains(&path) {
        paths.push(path);
    }
}

/// The exit code and name of a stop signal.
pub fn stop_code(sig: i32) -> (i32, &'static str) {
    if sig == libc::SIGINT {
        (EXIT_SIGINT, "SIGINT")
    } else {
        (EXIT_SIGTERM, "SIGTERM")
    }
}

fn on_signal(sig: i32) {
    let (code, name) = stop_code(sig);
    let target = TARGET.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(exit) = target {
        if exit.code().is_none() {
            exit.request(code, &format!("{name} received; stopping the VM"));
            return;
        }
        eprintln!("{name} received again while the VM is stopping; exiting now");
    } else {
        eprintln!("{name} received while no VM runs; exiting");
    }
    for p in EARLY_CLEANUP
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(code);
}

fn block_and_open() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only write into it and block the two
    // signals for this thread, which threads spawned later inherit.
    let fd = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks until a signal arrives; returns its number.
fn read_signal(fd: &OwnedFd) -> std::io::Result<i32> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    // SAFETY: reads at most `info.len()` bytes into a buffer we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != info.len() {
        return Err(std::io::Error::other("short read from the signalfd"));
    }
    // ssi_signo is the first u32 of signalfd_siginfo.
    Ok(u32::from_ne_bytes(info[..4].try_into().expect("4 bytes")) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_codes_follow_the_shell_convention() {
        assert_eq!(stop_code(libc::SIGINT), (130, "SIGINT"));
        assert_eq!(stop_code(libc::SIGTERM), (143, "SIGTERM"));
    }
}
