//! seccomp filters, one per kind of thread (`--seccomp none|log|kill`).
//!
//! `main` compiles every filter once ([`configure`]) before any thread exists; each thread
//! then installs its own kind's filter when its set-up is done ([`enter`]): a vCPU thread
//! before its first `KVM_RUN`, a userfaultfd handler before its event loop, the main thread
//! once its machine exists (after that it only runs the VM, receives or sends a migration and
//! tears down). A filter is inherited by the threads its thread spawns later; each of those
//! installs its own on top, and both must allow a call. The lists are in [`lists`].
//!
//! A call outside the list: with `kill` (the default) the kernel raises SIGSYS, whose handler
//! writes which thread kind made which system call and ends the process with
//! [`EXIT_SECCOMP`]; with `log` the call goes through and the kernel logs it
//! (`dmesg`: `audit: type=1326 ... comm="vcpu0" ... syscall=N`); with `none` no filter is
//! installed. A library user that never calls [`configure`] gets no filters.

mod lists;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

use crate::exit::EXIT_SECCOMP;

pub use lists::allowed;

/// What a thread's filter does with a system call outside its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// No filters.
    None,
    /// Let the call through; the kernel logs it (dmesg, `type=1326`).
    Log,
    /// End the process (exit code 159) after naming the thread kind and the call.
    Kill,
}

/// The kinds of thread, each with its own list of allowed system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The main thread once its machine exists: it starts the other threads, runs a migration
    /// (source, and a destination's precopy receive), and tears the VM down.
    Main,
    /// The main thread of a `vmm --stay`: main's list and what creating the next machine
    /// takes, for it receives one VM after another.
    Host,
    /// A vCPU thread (`KVM_RUN` and its exits).
    Vcpu,
    /// A userfaultfd handler of the demand pager (`uffd-N`).
    Pager,
    /// The postcopy receiver of a migration destination (`postcopy-rx`).
    MigrationReceiver,
    /// The reader of a postcopy source's back channel (`postcopy-back`).
    MigrationSender,
    /// A further connection of a migration (`--migrate-connections`), on either end
    /// (`migrate-lane-N`): sends or receives its share of each precopy round.
    MigrationLane,
    /// The control socket (`api` and its `api-conn` threads).
    Api,
    /// The console thread (stdin to COM1).
    Console,
    /// The SIGINT/SIGTERM thread.
    Signals,
    /// A test guest's reclaim storm (`reclaim-storm`).
    Reclaim,
    /// The guest profiler (`--guest-profile`): kicks the vCPUs.
    Profiler,
    /// A virtio-blk device's thread (`virtio-blk`): reads and writes its disk image.
    Block,
    /// The virtio-balloon's thread (`virtio-balloon`): drops the pages the guest gives.
    Balloon,
    /// A virtio-net device's thread (`virtio-net`): reads and writes frames on its tap.
    Net,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 15] = [
        ThreadKind::Main,
        ThreadKind::Host,
        ThreadKind::Vcpu,
        ThreadKind::Pager,
        ThreadKind::MigrationReceiver,
        ThreadKind::MigrationSender,
        ThreadKind::MigrationLane,
        ThreadKind::Api,
        ThreadKind::Console,
        ThreadKind::Signals,
        ThreadKind::Reclaim,
        ThreadKind::Profiler,
        ThreadKind::Block,
        ThreadKind::Balloon,
        ThreadKind::Net,
    ];

    /// The kind's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Host => "main (--stay)",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Pager => "userfaultfd handler",
            ThreadKind::MigrationReceiver => "migration receiver",
            ThreadKind::MigrationSender => "migration sender",
            ThreadKind::MigrationLane => "migration lane",
            ThreadKind::Api => "control socket",
            ThreadKind::Console => "console",
            ThreadKind::Signals => "signals",
            ThreadKind::Reclaim => "reclaim",
            ThreadKind::Profiler => "profiler",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::Balloon => "virtio-balloon",
            ThreadKind::Net => "virtio-net",
        }
    }
}

/// Why the filters could not be set up.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// A filter did not compile (a bug in [`lists`]).
    #[error("the seccomp filter of the {kind} threads does not compile: {what}")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's message.
        what: String,
    },
    /// The kernel has no seccomp filters.
    #[error(
        "this kernel does not offer seccomp filters ({0}); run with --seccomp none to go on \
         without them"
    )]
    Unsupported(std::io::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler of --seccomp kill: {0}")]
    Handler(std::io::Error),
    /// [`configure`] was called twice.
    #[error("the seccomp filters are already configured")]
    Twice,
}

/// The compiled filters of this process.
struct Filters {
    mode: SeccompMode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// The main thread's kind: [`ThreadKind::Host`] once [`main_creates_machines`] was called.
static MAIN_KIND: OnceLock<ThreadKind> = OnceLock::new();

thread_local! {
    /// The kind whose filter this thread installed last (for the SIGSYS message).
    static KIND: std::cell::Cell<&'static str> = const { std::cell::Cell::new("unfiltered") };
    /// The kind whose filter [`enter`] installed on this thread, if any.
    static ENTERED: std::cell::Cell<Option<ThreadKind>> = const { std::cell::Cell::new(None) };
}

/// Makes [`enter_main`] install [`ThreadKind::Host`]: this process's main thread creates one
/// machine after another (`--stay`). Call it before the first machine exists.
pub fn main_creates_machines() {
    let _ = MAIN_KIND.set(ThreadKind::Host);
}

/// Installs the main thread's filter once its (first) machine exists: [`ThreadKind::Main`],
/// or [`ThreadKind::Host`] after [`main_creates_machines`].
pub fn enter_main() {
    enter(MAIN_KIND.get().copied().unwrap_or(ThreadKind::Main));
}

/// Compiles every thread kind's filter for `mode` and remembers them for [`enter`]; with
/// `kill` also installs the SIGSYS handler. Call it once, in `main`, before any thread
/// starts. `SeccompMode::None` remembers that no filter is wanted.
pub fn configure(mode: SeccompMode) -> Result<(), SeccompError> {
    let mut programs = BTreeMap::new();
    if mode != SeccompMode::None {
        // PR_GET_SECCOMP fails with EINVAL on a kernel built without seccomp.
        // SAFETY: PR_GET_SECCOMP takes no pointer arguments.
        if unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } < 0 {
            return Err(SeccompError::Unsupported(std::io::Error::last_os_error()));
        }
        for kind in ThreadKind::ALL {
            programs.insert(kind, compile(kind, mode)?);
        }
        if mode == SeccompMode::Kill {
            install_sigsys_handler()?;
        }
        install_panic_hook();
    }
    FILTERS
        .set(Filters { mode, programs })
        .map_err(|_| SeccompError::Twice)
}

/// A panic on a filtered thread is reported without a backtrace: resolving one needs calls
/// (getcwd, opening the binary) that the filters refuse, and `kill` would end the process
/// for them, losing what the panic meant to say. Unfiltered threads keep std's report.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let kind = KIND.with(|k| k.get());
        if kind == "unfiltered" {
            return default(info);
        }
        let thread = std::thread::current();
        eprintln!(
            "thread '{}' ({kind}) {info}\n(no backtrace under seccomp filters: run with \
             --seccomp none for one)",
            thread.name().unwrap_or("<unnamed>")
        );
    }));
}

/// The mode [`configure`] set, if it was called.
pub fn mode() -> Option<SeccompMode> {
    FILTERS.get().map(|f| f.mode)
}

/// Installs `kind`'s filter on the calling thread (nothing when [`configure`] was not called
/// or chose `none`). A filter that the kernel refuses ends the process: it compiled, so only
/// a kernel without seccomp (which [`configure`] checked) or an exhausted filter budget can
/// refuse it, and a thread must not run on unfiltered when filters were asked for.
///
/// A thread that already installed `kind`'s filter through this function is left as it is:
/// the main thread of a `--stay` process enters for each machine, and stacking the same
/// filter again would only use up the kernel's budget of filter instructions.
pub fn enter(kind: ThreadKind) {
    let Some(filters) = FILTERS.get() else { return };
    if ENTERED.with(|e| e.get()) == Some(kind) {
        return;
    }
    let Some(program) = filters.programs.get(&kind) else {
        return;
    };
    if let Err(e) = seccompiler::apply_filter(program) {
        eprintln!(
            "error: cannot install the seccomp filter of a {} thread: {e}; run with \
             --seccomp none to go on without filters",
            kind.name()
        );
        std::process::exit(crate::exit::EXIT_HOST_FAILED);
    }
    KIND.with(|k| k.set(kind.name()));
    ENTERED.with(|e| e.set(Some(kind)));
}

/// Installs `kind`'s filter for `mode` on the calling thread, without [`configure`]: for
/// tests of the filters themselves (with `kill`, the caller installs the SIGSYS handler with
/// [`install_sigsys_handler`] first, or the kernel's SIGSYS ends the process unexplained).
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::None {
        return Ok(());
    }
    let program = compile(kind, mode)?;
    seccompiler::apply_filter(&program)
        .map_err(|e| SeccompError::Unsupported(std::io::Error::other(e.to_string())))?;
    KIND.with(|k| k.set(kind.name()));
    Ok(())
}

fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let err = |what: String| SeccompError::Compile {
        kind: kind.name(),
        what,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(e.to_string()))?;
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let rules = lists::rules(kind).map_err(|e| err(e.to_string()))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| err(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| err(e.to_string()))
}

/// Installs the SIGSYS handler that `kill` mode's filters raise: it names the thread kind and
/// the system call on stderr and ends the process with [`EXIT_SECCOMP`].
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act.sa_mask` is a valid sigset to empty.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is a valid sigaction whose handler is async-signal-safe (it only formats
    // into a stack buffer, writes to fd 2 and calls _exit).
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The SIGSYS handler: `vmm: seccomp: a <kind> thread made system call <nr>, which its filter
/// does not allow; ...`, then `_exit(EXIT_SECCOMP)`.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The SIGSYS part of siginfo_t (x86-64 and aarch64 alike): after si_signo, si_errno and
    // si_code (and padding to 16 bytes) come the call's address (8 bytes) and its number.
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; a SIGSYS from
    // seccomp fills the _sigsys member, which starts at byte 16.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let kind = KIND.with(|k| k.get());
    let mut buf = [0u8; 256];
    let mut len = 0;
    for part in [
        "vmm: seccomp: a ".as_bytes(),
        kind.as_bytes(),
        b" thread made system call ",
    ] {
        len += copy(&mut buf[len..], part);
    }
    len += write_decimal(&mut buf[len..], nr);
    len += copy(
        &mut buf[len..],
        b", which its filter does not allow; stopping (--seccomp log lets it through and \
          logs it)\n",
    );
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

fn copy(dst: &mut [u8], src: &[u8]) -> usize {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
    n
}

fn write_decimal(dst: &mut [u8], v: i32) -> usize {
    let mut digits = [0u8; 12];
    let mut n = 0;
    let neg = v < 0;
    let mut u = v.unsigned_abs();
    loop {
        digits[n] = b'0' + (u % 10) as u8;
        n += 1;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    if neg {
        digits[n] = b'-';
        n += 1;
    }
    digits[..n].reverse();
    copy(dst, &digits[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_both_modes() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::Log, SeccompMode::Kill] {
                let p = compile(kind, mode).unwrap();
                assert!(
                    !p.is_empty() && p.len() < 4096,
                    "{kind:?}: {} insns",
                    p.len()
                );
            }
        }
    }

    #[test]
    fn decimal_formatting() {
        let mut b = [0u8; 16];
        let n = write_decimal(&mut b, 0);
        assert_eq!(&b[..n], b"0");
        let n = write_decimal(&mut b, 435);
        assert_eq!(&b[..n], b"435");
        let n = write_decimal(&mut b, -12);
        assert_eq!(&b[..n], b"-12");
    }
}
