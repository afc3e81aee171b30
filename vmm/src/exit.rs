//! How a VM ends: the process exit codes (README "Exit codes") and the VM-wide exit request
//! that devices, vCPU threads and the main loop share.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use log::{debug, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// The process exit codes of a VM. README.md "Exit codes" has the table; every code is defined
// here.

/// Exit code of a VM stopped because the pager could not provide a page (or another failure
/// of the host side that leaves the guest unable to go on), and of a `vmm` that failed before
/// its VM ran.
pub const EXIT_HOST_FAILED: i32 = 1;
/// Exit code of a VM that ended normally: the guest powered off (ACPI S5), a test guest passed,
/// or the VM moved to a migration destination.
pub const EXIT_OK: i32 = 0;
/// Exit code of a VM that stopped because a vCPU failed (emulation failure, entry failure, ...).
pub const EXIT_VCPU_FAILED: i32 = 2;
/// Exit code of a VM whose guest reset itself: the ACPI reset register, the i8042's pulse-reset
/// command, a triple fault, or KVM's reset system event. The VMM does not restart it.
pub const EXIT_REBOOT: i32 = 3;
/// Exit code of a VM that the control socket's `shutdown` stopped without the guest powering
/// off: the guest did not answer the power button in time, has no power button (a test guest),
/// or was paused.
pub const EXIT_SHUTDOWN_FORCED: i32 = 4;
/// Exit code of a VM that nothing can wake: every vCPU halted with interrupts off and nothing
/// pending (only an NMI or INIT could wake it, and nothing in this VMM sends one), or halted
/// with interrupts on and nothing to raise one for `--idle-timeout` (see `machine::idle`).
pub const EXIT_IDLE: i32 = 5;
/// Exit code of a VM whose `--migrate-to` failed (it ran on here) and that then ended with
/// [`EXIT_OK`]: the migration a script asked for did not happen.
pub const EXIT_MIGRATE_FAILED: i32 = 6;
/// Exit code of a VM stopped by SIGINT (the shell's 128 + signal number convention).
pub const EXIT_SIGINT: i32 = 128 + libc::SIGINT;
/// Exit code of a VM stopped by SIGTERM (128 + signal number).
pub const EXIT_SIGTERM: i32 = 128 + libc::SIGTERM;
/// Exit code of a `vmm` one of whose threads made a system call its seccomp filter does not
/// allow (`--seccomp kill`): 128 + SIGSYS, the signal the kernel raises for it.
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

/// Whether `code` says the VM was stopped from outside (a signal, or `shutdown` without a
/// power-off) rather than ended by its guest: a test guest's own verdict does not replace it.
pub fn is_stopped_from_outside(code: i32) -> bool {
    matches!(code, EXIT_SHUTDOWN_FORCED | EXIT_SIGINT | EXIT_SIGTERM)
}

/// The VM-wide "please stop with this code" latch: devices and vCPU threads request, the main
/// loop waits (on the condition variable or the event fd) and then stops every vCPU.
#[derive(Clone)]
pub struct ExitRequest {
    inner: Arc<ExitInner>,
}

struct ExitInner {
    code: Mutex<Option<i32>>,
    cv: Condvar,
    evt: EventFd,
}

impl std::fmt::Debug for ExitRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitRequest")
            .field("code", &self.code())
            .finish()
    }
}

impl ExitRequest {
    /// A fresh, unset request.
    pub fn new() -> std::io::Result<ExitRequest> {
        Ok(ExitRequest {
            inner: Arc::new(ExitInner {
                code: Mutex::new(None),
                cv: Condvar::new(),
                evt: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    /// Asks the VM to stop with `code`; the first request wins. Returns true if this one won.
    pub fn request(&self, code: i32, why: &str) -> bool {
        let mut slot = self.inner.code.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            debug!("exit request ({why}, code {code}) after the VM was already stopping");
            return false;
        }
        info!("VM stopping with exit code {code}: {why}");
        *slot = Some(code);
        self.inner.cv.notify_all();
        if let Err(e) = self.inner.evt.write(1) {
            warn!("cannot signal the exit event fd: {e}");
        }
        true
    }

    /// The requested code, if any.
    pub fn code(&self) -> Option<i32> {
        *self.inner.code.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until someone requests an exit; returns the code.
    pub fn wait(&self) -> i32 {
        let mut slot = self.inner.code.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(code) = *slot {
                return code;
            }
            slot = self.inner.cv.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Like [`wait`](Self::wait) with a limit: `None` on timeout.
    pub fn wait_timeout(&self, limit: Duration) -> Option<i32> {
        let slot = self.inner.code.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, _) = self
            .inner
            .cv
            .wait_timeout_while(slot, limit, |c| c.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *slot
    }

    /// An event fd that becomes readable when an exit is requested (for epoll loops).
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_request_wins() {
        let ex = ExitRequest::new().unwrap();
        assert_eq!(ex.wait_timeout(Duration::from_millis(1)), None);
        let other = ex.clone();
        let t = std::thread::spawn(move || other.request(1, "test FAIL"));
        assert_eq!(ex.wait(), 1);
        assert!(t.join().unwrap());
        assert!(!ex.request(0, "late"));
        assert_eq!(ex.code(), Some(1));
        assert_eq!(ex.eventfd().read().unwrap(), 1);
    }
}
