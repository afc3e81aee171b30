//! vCPU threads: one thread per vCPU running KVM_RUN, an explicit run state (running / paused /
//! stopped) driven by messages, the exit handler, and the VM-wide exit request with its code.
//!
//! Control follows Firecracker's vcpu.rs idea: the VMM sends a command over a channel and kicks
//! the thread out of KVM_RUN with a signal whose handler sets `kvm_run.immediate_exit`, so a
//! command is seen even when the signal lands just before the thread re-enters the guest.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::emulate::kvm::{emulate_failed_insn, exit_insn_bytes};
use crate::arch::x86_64::emulate::syscall_relay::{Outcome, SyscallRelay};
use crate::arch::x86_64::emulate::EmulationStats;
use crate::devices::PioBus;
use crate::dirty::HostChanges;
use crate::hypervisor::{Vcpu, VcpuOps, VmExit};

// The process exit codes of a VM. README.md "Exit codes" has the table; every code is defined
// here, except `machine::EXIT_HOST_FAILED` (1).

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

/// Whether `code` says the VM was stopped from outside (a signal, or `shutdown` without a
/// power-off) rather than ended by its guest: a test guest's own verdict does not replace it.
pub fn is_stopped_from_outside(code: i32) -> bool {
    matches!(code, EXIT_SHUTDOWN_FORCED | EXIT_SIGINT | EXIT_SIGTERM)
}

/// `kvm_run.internal.suberror` for an emulation failure (include/uapi/linux/kvm.h).
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
/// `KVM_SYSTEM_EVENT_*` types (include/uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
/// Longest x86 instruction (Intel SDM Vol. 2 §2.3.11).
const MAX_INSN_LEN: usize = 15;
/// How long pause/resume wait for every vCPU to acknowledge.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of vCPU control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Could not spawn a thread or register the kick signal.
    #[error("cannot start vCPU {id}: {what}")]
    Start {
        /// vCPU id.
        id: usize,
        /// What failed.
        what: String,
    },
    /// A vCPU did not acknowledge a command in time, or its thread is gone.
    #[error("vCPU {id} did not acknowledge {cmd:?} ({why})")]
    NoAck {
        /// vCPU id.
        id: usize,
        /// The command.
        cmd: Command,
        /// Why.
        why: &'static str,
    },
    /// [`VmControl::with_paused_vcpu`] was called while the vCPU was running.
    #[error("vCPU {id} is not paused: pause the VM before working on a vCPU's state")]
    NotPaused {
        /// vCPU id.
        id: usize,
    },
}

/// Work run on a paused vCPU's own thread ([`VmControl::with_paused_vcpu`]).
type VcpuJob = Box<dyn FnOnce(&mut Vcpu) + Send>;

/// The answer to `KVM_EXIT_DIRTY_RING_FULL`, called on the vCPU's own thread with its index
/// (e.g. `DirtyTracker::ring_full_hook`: collect that vCPU's ring, reset the rings). `Ok`: the
/// thread re-enters the guest; `Err(reason)`: the vCPU fails and the VM stops with the reason.
pub type DirtyRingFullHook = Arc<dyn Fn(usize) -> Result<(), String> + Send + Sync>;

/// Optional per-VM hooks of the vCPU run loop, given to [`VmControl::start_with_hooks`].
#[derive(Clone, Default)]
pub struct VcpuHooks {
    /// Called on `KVM_EXIT_DIRTY_RING_FULL`. Needed whenever KVM's dirty rings are enabled on
    /// the VM; without it such an exit stops the VM with a message saying so.
    pub dirty_ring_full: Option<DirtyRingFullHook>,
}

impl std::fmt::Debug for VcpuHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHooks")
            .field("dirty_ring_full", &self.dirty_ring_full.is_some())
            .finish()
    }
}

/// What the emulation fallback of every vCPU thread of a VM shares, given to
/// [`VmControl::start_with_emulation`]. Separate from [`VcpuHooks`] so that callers building
/// `VcpuHooks` with a struct literal keep compiling.
#[derive(Clone, Debug, Default)]
pub struct EmulationHooks {
    /// Per-kind counts of emulated instructions ([`VmControl::emulation_stats`]).
    pub stats: Arc<EmulationStats>,
    /// The gate for host writes to guest RAM: emulated stores (`cmpxchg16b`, `stmxcsr`) go
    /// through it, so a running migration marks their pages dirty. Without it they are not
    /// recorded.
    pub host_changes: Option<Arc<HostChanges>>,
    /// Complete guest user syscalls that KVM leaves at CPL 3 (the syscall relay, for a
    /// software KVM such as `kvm_pvm`; the VM must have its LSTAR writes filtered to
    /// userspace, [`crate::hypervisor::Vm::filter_syscall_msrs`]).
    pub syscall_relay: bool,
    /// Where each vCPU records its RIP when a profiler kick interrupts it
    /// ([`VmControl::start_profiler`]).
    pub profile: Option<Arc<GuestProfile>>,
}

/// A sampling profile of guest RIPs: a profiler thread kicks every vCPU out of KVM_RUN at a
/// fixed interval and each vCPU thread counts the RIP it was interrupted at. With a guest
/// kernel's `System.map` the counts say where boot time goes (`--guest-profile`).
#[derive(Debug, Default)]
pub struct GuestProfile {
    samples: Mutex<std::collections::HashMap<u64, u64>>,
}

impl GuestProfile {
    pub fn new() -> GuestProfile {
        GuestProfile::default()
    }

    /// Counts one sample at `rip`.
    pub fn record(&self, rip: u64) {
        *self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(rip)
            .or_insert(0) += 1;
    }

    /// (RIP, samples), most samples first.
    pub fn top(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(r, n)| (*r, *n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Writes `samples rip` lines (hex RIP), most samples first.
    pub fn write_to(&self, mut out: impl std::io::Write) -> std::io::Result<()> {
        for (rip, n) in self.top() {
            writeln!(out, "{n} {rip:#018x}")?;
        }
        Ok(())
    }
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

/// The run state of one vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Entering the guest in a loop.
    Running,
    /// Out of the guest, waiting for `Resume` or `Stop`.
    Paused,
    /// The guest halted this vCPU with no interrupt controller to wake it; waits for commands.
    Halted,
    /// The thread is leaving.
    Stopped,
}

/// A command to a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Leave the guest and wait.
    Pause,
    /// Enter the guest again.
    Resume,
    /// End the thread.
    Stop,
    /// Run the queued job on the vCPU fd if paused (or halted); the state does not change.
    RunJob,
    /// Run the queued read-only job on the vCPU fd whatever the state (a running vCPU is out
    /// of KVM_RUN while it reads commands); the state does not change.
    Probe,
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// The vCPU halted and nothing will wake it: park until a command.
    Halt,
    /// The VM must stop with this code (reset, shutdown).
    Stop(i32, String),
    /// The vCPU failed: report registers and instruction bytes, then stop the VM non-zero.
    Fault(String),
    /// The vCPU's dirty ring is full: run the [`VcpuHooks::dirty_ring_full`] hook, re-enter.
    DirtyRingFull,
    /// The guest wrote an MSR that is filtered to userspace (`KVM_EXIT_X86_WRMSR`): the syscall
    /// relay carries the write out.
    WroteMsr { index: u32, data: u64 },
    /// `KVM_EXIT_DEBUG` at `pc`: the syscall relay's breakpoint or step.
    Debug { pc: u64 },
    /// KVM could not emulate an instruction (`KVM_EXIT_INTERNAL_ERROR`, suberror 1; the exit's
    /// data words): the emulation fallback tries it, else the vCPU fails.
    EmulationFailed(Vec<u64>),
}

/// Decides what an exit means. Pure apart from the device calls, so unit tests drive it with
/// a dummy bus and hand-made exits, no KVM needed.
pub fn handle_exit(vcpu: usize, exit: VmExit<'_>, bus: &PioBus) -> ExitAction {
    match exit {
        VmExit::IoIn(port, data) => {
            bus.read(vcpu, port, data);
            ExitAction::Continue
        }
        VmExit::IoOut(port, data) => {
            bus.write(vcpu, port, data);
            ExitAction::Continue
        }
        VmExit::MmioRead(addr, data) => {
            debug!(
                "vcpu{vcpu}: MMIO read of {} bytes at {addr:#x}: no device, all ones",
                data.len()
            );
            data.fill(0xff);
            ExitAction::Continue
        }
        VmExit::MmioWrite(addr, data) => {
            debug!("vcpu{vcpu}: MMIO write {data:x?} at {addr:#x}: no device, ignored");
            ExitAction::Continue
        }
        VmExit::Hlt => ExitAction::Halt,
        // A triple fault is how an x86 guest resets itself when nothing else works (Linux's
        // reboot=t does it on purpose).
        VmExit::Shutdown => ExitAction::Stop(
            EXIT_REBOOT,
            format!("vCPU {vcpu}: triple fault (the guest reset itself)"),
        ),
        VmExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => {
                ExitAction::Stop(EXIT_OK, format!("vCPU {vcpu}: guest powered off"))
            }
            KVM_SYSTEM_EVENT_RESET => {
                ExitAction::Stop(EXIT_REBOOT, format!("vCPU {vcpu}: guest reset"))
            }
            KVM_SYSTEM_EVENT_CRASH => {
                ExitAction::Fault("the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".into())
            }
            other => ExitAction::Fault(format!("unknown KVM system event {other}")),
        },
        VmExit::InternalError {
            suberror: KVM_INTERNAL_ERROR_EMULATION,
            data,
        } => ExitAction::EmulationFailed(data),
        VmExit::InternalError { suberror, data } => ExitAction::Fault(format!(
            "KVM_EXIT_INTERNAL_ERROR (suberror {suberror}, data {data:x?})"
        )),
        VmExit::FailEntry(reason, cpu) => ExitAction::Fault(format!(
            "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
        )),
        VmExit::MemoryFault { flags, gpa, size } => ExitAction::Fault(format!(
            "KVM_EXIT_MEMORY_FAULT at gpa {gpa:#x} size {size:#x} flags {flags:#x}"
        )),
        VmExit::Interrupted => ExitAction::Continue,
        VmExit::DirtyRingFull => ExitAction::DirtyRingFull,
        VmExit::MsrWrite(mut w) => {
            // Not a failed write: the relay writes the MSR itself before the guest runs on.
            w.accept();
            ExitAction::WroteMsr {
                index: w.index,
                data: w.data,
            }
        }
        VmExit::Debug { pc } => ExitAction::Debug { pc },
        VmExit::Other(what) => ExitAction::Fault(format!("unexpected KVM exit {what}")),
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: a thread-local read and one volatile store.
    let ptr = IMMEDIATE_EXIT.with(|p| p.get());
    if !ptr.is_null() {
        // SAFETY: `ptr` is this thread's kvm_run.immediate_exit, set by the vCPU thread before
        // its first KVM_RUN and cleared before the Vcpu (and so the mapping) is dropped.
        unsafe { ptr.write_volatile(1) };
    }
}

fn register_kick_handler() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            register_signal_handler(kick_signal(), handle_kick)
                .map_err(|e| format!("cannot register the vCPU kick signal handler: {e}"))
        })
        .clone()
}

/// Describes a failed vCPU: the reason, registers, and the instruction bytes at RIP.
pub fn fault_report(id: usize, vcpu: &dyn VcpuOps, mem: &GuestMemoryMmap, reason: &str) -> String {
    let mut out = format!("vCPU {id} stopped: {reason}");
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => {
            let _ = write!(
                out,
                "\n  RIP {:#018x} RSP {:#018x} RFLAGS {:#010x}\n  RAX {:#018x} RBX {:#018x} RCX {:#018x} RDX {:#018x}\n  RSI {:#018x} RDI {:#018x} RBP {:#018x}\n  CR0 {:#x} CR2 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}\n  CS {:#06x} (base {:#x}, l={} db={}) SS {:#06x} DS {:#06x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base, s.cs.l, s.cs.db,
                s.ss.selector, s.ds.selector
            );
            let linear = r.rip.wrapping_add(if s.cs.l == 1 { 0 } else { s.cs.base });
            let gpa = match vcpu.translate_gva(linear) {
                Ok(t) if t.valid != 0 => Some(t.physical_address),
                _ if s.cr0 & crate::arch::x86_64::regs::X86_CR0_PG == 0 => Some(linear),
                _ => None,
            };
            match gpa {
                Some(gpa) => {
                    let mut bytes = [0u8; MAX_INSN_LEN];
                    match mem.read_slice(&mut bytes, GuestAddress(gpa)) {
                        Ok(()) => {
                            let _ = write!(out, "\n  instruction bytes at RIP (gpa {gpa:#x}):");
                            for b in bytes {
                                let _ = write!(out, " {b:02x}");
                            }
                        }
                        Err(e) => {
                            let _ = write!(
                                out,
                                "\n  instruction bytes: gpa {gpa:#x} not readable ({e})"
                            );
                        }
                    }
                }
                None => out
                    .push_str("\n  instruction bytes: RIP is not mapped by the guest page tables"),
            }
        }
        (r, s) => {
            let _ = write!(
                out,
                "\n  registers unavailable: {:?} {:?}",
                r.err(),
                s.err()
            );
        }
    }
    out
}

/// What a vCPU thread needs.
struct VcpuThread {
    id: usize,
    fd: Vcpu,
    bus: Arc<PioBus>,
    mem: GuestMemoryMmap,
    exit: ExitRequest,
    commands: Receiver<Command>,
    acks: Sender<(RunState, Command)>,
    jobs: Receiver<VcpuJob>,
    hooks: VcpuHooks,
    emulation: EmulationHooks,
    /// The syscall relay's state, when [`EmulationHooks::syscall_relay`] is on.
    relay: Option<SyscallRelay>,
}

impl VcpuThread {
    fn run(mut self) {
        let flag = self.fd.immediate_exit_flag();
        IMMEDIATE_EXIT.with(|p| p.set(flag));
        if let Some(relay) = &mut self.relay {
            // A vCPU restored from a migration has its syscall entry already: arm now.
            if let Err(e) = relay.arm_from_state(&self.fd, &self.mem) {
                warn!("vcpu{}: syscall relay not armed: {e}", self.id);
            }
        }
        let mut state = RunState::Running;
        while state != RunState::Stopped {
            state = match state {
                RunState::Running => self.step(),
                RunState::Paused | RunState::Halted => match self.commands.recv() {
                    Ok(cmd) => self.apply(state, cmd),
                    Err(_) => RunState::Stopped,
                },
                RunState::Stopped => RunState::Stopped,
            };
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        debug!("vcpu{} thread ends", self.id);
    }

    fn apply(&mut self, from: RunState, cmd: Command) -> RunState {
        let to = match cmd {
            Command::RunJob => {
                // The job is queued before the command; a running vCPU drops it unrun, so
                // its caller sees no result and reports NotPaused.
                if let Ok(job) = self.jobs.try_recv() {
                    if from != RunState::Running {
                        job(&mut self.fd);
                    }
                }
                from
            }
            Command::Probe => {
                if let Ok(job) = self.jobs.try_recv() {
                    job(&mut self.fd);
                }
                from
            }
            Command::Pause => RunState::Paused,
            Command::Resume => {
                if from == RunState::Halted {
                    RunState::Halted
                } else {
                    RunState::Running
                }
            }
            Command::Stop => RunState::Stopped,
        };
        let _ = self.acks.send((to, cmd));
        to
    }

    /// Runs the guest once from the Running state; returns the next state.
    fn step(&mut self) -> RunState {
        // Clear the kick before looking at commands: a kick that lands after this is either for a
        // command we are about to read, or makes the next KVM_RUN return at once.
        self.fd.set_immediate_exit(false);
        let mut state = RunState::Running;
        while let Ok(cmd) = self.commands.try_recv() {
            state = self.apply(state, cmd);
        }
        if state != RunState::Running {
            return state;
        }
        let action = match self.fd.run() {
            Ok(exit) => handle_exit(self.id, exit, &self.bus),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if let Some(profile) = &self.emulation.profile {
                    if let Ok(regs) = self.fd.get_regs() {
                        profile.record(regs.rip);
                    }
                }
                ExitAction::Continue
            }
            Err(e) => ExitAction::Fault(format!("KVM_RUN failed: {e}")),
        };
        let action = match action {
            ExitAction::DirtyRingFull => self.on_dirty_ring_full(),
            ExitAction::EmulationFailed(data) => self.on_emulation_failure(&data),
            ExitAction::WroteMsr { index, data } => {
                self.on_relay(|r, fd, mem| r.on_wrmsr(fd, mem, index, data))
            }
            ExitAction::Debug { pc } => self.on_relay(|r, fd, mem| r.on_debug(fd, mem, pc)),
            a => a,
        };
        match action {
            ExitAction::Continue
            | ExitAction::DirtyRingFull
            | ExitAction::WroteMsr { .. }
            | ExitAction::Debug { .. }
            | ExitAction::EmulationFailed(_) => RunState::Running,
            ExitAction::Halt => {
                debug!("vcpu{} halted", self.id);
                RunState::Halted
            }
            ExitAction::Stop(code, why) => {
                self.exit.request(code, &why);
                RunState::Halted
            }
            ExitAction::Fault(reason) => {
                let report = fault_report(self.id, &self.fd, &self.mem, &reason);
                error!("{report}");
                self.exit
                    .request(EXIT_VCPU_FAILED, &format!("vCPU {} failed", self.id));
                RunState::Halted
            }
        }
    }
}

impl VcpuThread {
    /// An MSR write or debug exit for the syscall relay; without the relay such an exit is a
    /// fault (nothing else asks KVM for them).
    fn on_relay(
        &mut self,
        f: impl FnOnce(
            &mut SyscallRelay,
            &dyn VcpuOps,
            &GuestMemoryMmap,
        )
            -> Result<Outcome, crate::arch::x86_64::emulate::syscall_relay::RelayError>,
    ) -> ExitAction {
        let Some(relay) = &mut self.relay else {
            return ExitAction::Fault(
                "KVM_EXIT_X86_WRMSR or KVM_EXIT_DEBUG without the syscall relay".into(),
            );
        };
        match f(relay, &self.fd, &self.mem) {
            Ok(Outcome::Relayed) => {
                if self.emulation.stats.record_relayed_syscall() {
                    info!(
                        "vcpu{}: KVM left a guest user syscall at CPL 3; the VMM completes it \
                         (the syscall relay)",
                        self.id
                    );
                }
                ExitAction::Continue
            }
            Ok(Outcome::Stepping) => {
                self.emulation.stats.record_stepped_fault();
                ExitAction::Continue
            }
            Ok(_) => ExitAction::Continue,
            Err(e) => ExitAction::Fault(format!("syscall relay: {e}")),
        }
    }

    /// KVM_EXIT_INTERNAL_ERROR with an emulation failure: an instruction the fallback
    /// handles is carried out here and the guest runs on; anything else is a fault that says
    /// what the VMM emulates and what it does not.
    fn on_emulation_failure(&mut self, data: &[u64]) -> ExitAction {
        let bytes = exit_insn_bytes(data.len() as u32, data);
        match emulate_failed_insn(
            self.id,
            &self.fd,
            &self.mem,
            self.emulation.host_changes.as_deref(),
            bytes.as_deref(),
            &self.emulation.stats,
        ) {
            Ok(_) => ExitAction::Continue,
            Err(e) => ExitAction::Fault(format!(
                "KVM_EXIT_INTERNAL_ERROR (suberror {KVM_INTERNAL_ERROR_EMULATION}, data \
                 {data:x?}) (emulation fallback: {e})\nKVM could not emulate the instruction \
                 at RIP. This host's KVM (software, no EPT) cannot emulate some instructions in \
                 guest kernel mode; the VMM emulates int3, fwait, popcnt, clac, stac, \
                 cmpxchg16b, ldmxcsr and stmxcsr itself, not this one (xrstor: boot the kernel \
                 with noxsave). On hardware KVM this guest would run on."
            )),
        }
    }

    /// KVM_EXIT_DIRTY_RING_FULL: the hook empties the ring; then the guest is entered again.
    /// KVM returns this exit again at once if the ring is still full, so a hook that frees
    /// nothing makes no progress but loses nothing.
    fn on_dirty_ring_full(&self) -> ExitAction {
        match &self.hooks.dirty_ring_full {
            Some(hook) => match hook(self.id) {
                Ok(()) => ExitAction::Continue,
                Err(why) => ExitAction::Fault(format!(
                    "KVM_EXIT_DIRTY_RING_FULL: emptying the ring failed: {why}"
                )),
            },
            None => ExitAction::Fault(
                "KVM_EXIT_DIRTY_RING_FULL with no dirty-ring hook: a VM with KVM dirty rings must \
                 be started with VmControl::start_with_hooks and VcpuHooks::dirty_ring_full"
                    .into(),
            ),
        }
    }
}

struct VcpuHandle {
    id: usize,
    commands: Sender<Command>,
    jobs: Sender<VcpuJob>,
    acks: Receiver<(RunState, Command)>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    fn send(&self, cmd: Command) {
        // A send fails only when the thread has already ended, which is what Stop wants anyway.
        let _ = self.commands.send(cmd);
        if let Some(t) = &self.thread {
            if let Err(e) = t.kill(kick_signal()) {
                debug!("kick of vcpu{} failed: {e}", self.id);
            }
        }
    }

    fn wait_ack(&self, cmd: Command) -> Result<RunState, VcpuError> {
        loop {
            match self.acks.recv_timeout(ACK_TIMEOUT) {
                Ok((state, c)) if c == cmd => return Ok(state),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::NoAck {
                        id: self.id,
                        cmd,
                        why: "timed out",
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VcpuError::NoAck {
                        id: self.id,
                        cmd,
                        why: "thread has ended",
                    })
                }
            }
        }
    }
}

/// The running vCPUs of a VM: pause, resume, stop, wait for the exit code.
pub struct VmControl {
    vcpus: Vec<VcpuHandle>,
    exit: ExitRequest,
    emulation: Arc<EmulationStats>,
    /// The profiler thread and its stop flag ([`VmControl::start_profiler`]).
    profiler: Option<(Arc<std::sync::atomic::AtomicBool>, JoinHandle<()>)>,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl")
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

impl VmControl {
    /// Starts one thread per configured vCPU (index = vCPU id), each entering the guest at once.
    pub fn start(
        vcpus: Vec<Vcpu>,
        bus: Arc<PioBus>,
        mem: GuestMemoryMmap,
        exit: ExitRequest,
    ) -> Result<VmControl, VcpuError> {
        Self::start_with_hooks(vcpus, bus, mem, exit, VcpuHooks::default())
    }

    /// Like [`start`](Self::start), with `hooks` called from the run loop (every vCPU thread
    /// gets a clone).
    pub fn start_with_hooks(
        vcpus: Vec<Vcpu>,
        bus: Arc<PioBus>,
        mem: GuestMemoryMmap,
        exit: ExitRequest,
        hooks: VcpuHooks,
    ) -> Result<VmControl, VcpuError> {
        Self::start_with_emulation(vcpus, bus, mem, exit, hooks, EmulationHooks::default())
    }

    /// Like [`start_with_hooks`](Self::start_with_hooks), with the emulation fallback's shared
    /// counters and host-write gate given by the caller.
    pub fn start_with_emulation(
        vcpus: Vec<Vcpu>,
        bus: Arc<PioBus>,
        mem: GuestMemoryMmap,
        exit: ExitRequest,
        hooks: VcpuHooks,
        emulation: EmulationHooks,
    ) -> Result<VmControl, VcpuError> {
        register_kick_handler().map_err(|what| VcpuError::Start { id: 0, what })?;
        let mut handles = Vec::with_capacity(vcpus.len());
        for (id, fd) in vcpus.into_iter().enumerate() {
            let (cmd_tx, cmd_rx) = channel();
            let (ack_tx, ack_rx) = channel();
            let (job_tx, job_rx) = channel();
            let thread = VcpuThread {
                id,
                fd,
                bus: bus.clone(),
                mem: mem.clone(),
                exit: exit.clone(),
                commands: cmd_rx,
                acks: ack_tx,
                jobs: job_rx,
                hooks: hooks.clone(),
                relay: emulation.syscall_relay.then(SyscallRelay::new),
                emulation: emulation.clone(),
            };
            let join = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || thread.run())
                .map_err(|e| VcpuError::Start {
                    id,
                    what: e.to_string(),
                })?;
            handles.push(VcpuHandle {
                id,
                commands: cmd_tx,
                jobs: job_tx,
                acks: ack_rx,
                thread: Some(join),
            });
        }
        Ok(VmControl {
            vcpus: handles,
            exit,
            emulation: emulation.stats,
            profiler: None,
        })
    }

    /// Kicks every vCPU out of KVM_RUN each `interval` so that each records its RIP in the
    /// [`GuestProfile`] its [`EmulationHooks::profile`] names (nothing is recorded without
    /// one). Stops with the vCPUs.
    pub fn start_profiler(&mut self, interval: Duration) -> Result<(), VcpuError> {
        use std::os::unix::thread::JoinHandleExt;
        if self.profiler.is_some() {
            return Ok(());
        }
        let threads: Vec<libc::pthread_t> = self
            .vcpus
            .iter()
            .filter_map(|v| v.thread.as_ref().map(|t| t.as_pthread_t()))
            .collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let join = std::thread::Builder::new()
            .name("guest-profiler".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    for t in &threads {
                        // SAFETY: the vCPU threads outlive this thread: stop_all sets the flag
                        // and joins this thread before it stops and joins them.
                        unsafe { libc::pthread_kill(*t, kick_signal()) };
                    }
                }
            })
            .map_err(|e| VcpuError::Start {
                id: 0,
                what: format!("the guest profiler: {e}"),
            })?;
        self.profiler = Some((stop, join));
        Ok(())
    }

    /// The emulation fallback's per-kind counters, shared with every vCPU thread (for
    /// `--stats-json` and the control socket's `stats`: [`EmulationStats::to_json`]).
    pub fn emulation_stats(&self) -> &Arc<EmulationStats> {
        &self.emulation
    }

    /// The exit latch shared with the devices.
    pub fn exit_request(&self) -> &ExitRequest {
        &self.exit
    }

    /// Number of vCPU threads.
    pub fn len(&self) -> usize {
        self.vcpus.len()
    }

    /// True with no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }

    fn broadcast(&self, cmd: Command) -> Result<Vec<RunState>, VcpuError> {
        for v in &self.vcpus {
            v.send(cmd);
        }
        self.vcpus.iter().map(|v| v.wait_ack(cmd)).collect()
    }

    /// Takes every vCPU out of the guest and waits until all are paused.
    pub fn pause_all(&self) -> Result<(), VcpuError> {
        self.broadcast(Command::Pause).map(|_| ())
    }

    /// Runs `f` on vCPU `index`'s own thread with its fd, while that vCPU is paused (or
    /// halted), and returns its result. A running vCPU refuses: [`VcpuError::NotPaused`].
    /// Saving state for migration uses this, since a vCPU's state is read and written on its own thread.
    pub fn with_paused_vcpu<R, F>(&self, index: usize, f: F) -> Result<R, VcpuError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Vcpu) -> R + Send + 'static,
    {
        let v = self.vcpus.get(index).ok_or(VcpuError::NoAck {
            id: index,
            cmd: Command::RunJob,
            why: "no such vCPU",
        })?;
        let (tx, rx) = channel();
        let job: VcpuJob = Box::new(move |fd| {
            let _ = tx.send(f(fd));
        });
        if v.jobs.send(job).is_err() {
            return Err(VcpuError::NoAck {
                id: index,
                cmd: Command::RunJob,
                why: "thread has ended",
            });
        }
        // A running vCPU is kicked so it answers (refusing) at once.
        v.send(Command::RunJob);
        v.wait_ack(Command::RunJob)?;
        rx.try_recv()
            .map_err(|_| VcpuError::NotPaused { id: index })
    }

    /// Runs `f` on vCPU `index`'s own thread with its fd whatever its run state (a running
    /// vCPU is kicked out of KVM_RUN for it and enters the guest again afterwards), and returns
    /// its result with the vCPU's run state. For reading state (`KVM_GET_MP_STATE`,
    /// registers) of a VM that keeps running; changing state needs
    /// [`with_paused_vcpu`](Self::with_paused_vcpu).
    pub fn probe_vcpu<R, F>(&self, index: usize, f: F) -> Result<(RunState, R), VcpuError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Vcpu) -> R + Send + 'static,
    {
        let gone = |why| VcpuError::NoAck {
            id: index,
            cmd: Command::Probe,
            why,
        };
        let v = self.vcpus.get(index).ok_or(gone("no such vCPU"))?;
        let (tx, rx) = channel();
        let job: VcpuJob = Box::new(move |fd| {
            let _ = tx.send(f(fd));
        });
        v.jobs.send(job).map_err(|_| gone("thread has ended"))?;
        v.send(Command::Probe);
        let state = v.wait_ack(Command::Probe)?;
        let r = rx.try_recv().map_err(|_| gone("the job did not run"))?;
        Ok((state, r))
    }

    /// Whether every vCPU is out of the guest (paused, or halted with nothing to wake it), so
    /// that none writes guest RAM until told to resume. Asks each vCPU thread (a running one
    /// answers at once, refusing).
    pub fn all_paused(&self) -> bool {
        (0..self.vcpus.len()).all(|i| self.with_paused_vcpu(i, |_| ()).is_ok())
    }

    /// Lets every paused vCPU enter the guest again.
    pub fn resume_all(&self) -> Result<(), VcpuError> {
        self.broadcast(Command::Resume).map(|_| ())
    }

    /// Stops every vCPU thread and joins them (idempotent).
    pub fn stop_all(&mut self) {
        if let Some((stop, join)) = self.profiler.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = join.join();
        }
        for v in &self.vcpus {
            if v.thread.is_some() {
                v.send(Command::Stop);
            }
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                if t.join().is_err() {
                    error!("vcpu{} thread panicked", v.id);
                }
            }
        }
    }

    /// Waits for an exit request, stops every vCPU, returns the exit code.
    pub fn wait_and_stop(&mut self) -> i32 {
        let code = self.exit.wait();
        self.stop_all();
        code
    }
}

impl Drop for VmControl {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::tests::Recorder;

    #[test]
    fn a_guest_profile_lists_the_busiest_rips_first() {
        let p = GuestProfile::new();
        for rip in [0x10, 0x20, 0x20, 0x30, 0x30, 0x30] {
            p.record(rip);
        }
        assert_eq!(p.top(), vec![(0x30, 3), (0x20, 2), (0x10, 1)]);
        let mut out = Vec::new();
        p.write_to(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap().lines().next(),
            Some("3 0x0000000000000030")
        );
    }

    fn bus_with_recorder() -> (PioBus, Arc<Recorder>) {
        let mut bus = PioBus::new();
        let rec = Arc::new(Recorder::default());
        bus.register(0x3f8..=0x3ff, rec.clone()).unwrap();
        (bus, rec)
    }

    #[test]
    fn io_exits_reach_the_bus() {
        let (bus, rec) = bus_with_recorder();
        assert_eq!(
            handle_exit(1, VmExit::IoOut(0x3f8, b"x"), &bus),
            ExitAction::Continue
        );
        let mut d = [0u8; 1];
        assert_eq!(
            handle_exit(0, VmExit::IoIn(0x3fd, &mut d), &bus),
            ExitAction::Continue
        );
        assert_eq!(d, [0xfd]);
        let mut d = [0u8; 4];
        assert_eq!(
            handle_exit(0, VmExit::IoIn(0x80, &mut d), &bus),
            ExitAction::Continue
        );
        assert_eq!(d, [0xff; 4]);
        assert_eq!(*rec.writes.lock().unwrap(), vec![(1, 0x3f8, vec![b'x'])]);
    }

    #[test]
    fn mmio_is_ignored_and_reads_all_ones() {
        let (bus, _) = bus_with_recorder();
        let mut d = [0u8; 4];
        assert_eq!(
            handle_exit(0, VmExit::MmioRead(0xfee0_0000, &mut d), &bus),
            ExitAction::Continue
        );
        assert_eq!(d, [0xff; 4]);
        assert_eq!(
            handle_exit(0, VmExit::MmioWrite(0xfee0_0000, &[1]), &bus),
            ExitAction::Continue
        );
    }

    #[test]
    fn ending_exits_stop_or_fault() {
        let (bus, _) = bus_with_recorder();
        assert!(matches!(
            handle_exit(0, VmExit::Shutdown, &bus),
            ExitAction::Stop(EXIT_REBOOT, _)
        ));
        assert!(matches!(
            handle_exit(0, VmExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &bus),
            ExitAction::Stop(EXIT_REBOOT, _)
        ));
        assert!(matches!(
            handle_exit(0, VmExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]), &bus),
            ExitAction::Stop(EXIT_OK, _)
        ));
        assert!(matches!(
            handle_exit(0, VmExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[]), &bus),
            ExitAction::Fault(_)
        ));
        let internal = |suberror| VmExit::InternalError {
            suberror,
            data: vec![1, 2],
        };
        match handle_exit(2, internal(3), &bus) {
            ExitAction::Fault(r) => assert!(r.contains("INTERNAL_ERROR (suberror 3"), "{r}"),
            a => panic!("{a:?}"),
        }
        assert_eq!(
            handle_exit(2, internal(KVM_INTERNAL_ERROR_EMULATION), &bus),
            ExitAction::EmulationFailed(vec![1, 2]),
            "an emulation failure goes to the fallback with its data"
        );
        assert_eq!(handle_exit(0, VmExit::Hlt, &bus), ExitAction::Halt);
        assert!(matches!(
            handle_exit(0, VmExit::FailEntry(0x21, 1), &bus),
            ExitAction::Fault(_)
        ));
    }

    #[test]
    fn dirty_ring_full_is_its_own_action() {
        let (bus, _) = bus_with_recorder();
        assert_eq!(
            handle_exit(0, VmExit::DirtyRingFull, &bus),
            ExitAction::DirtyRingFull
        );
        assert!(matches!(
            handle_exit(0, VmExit::Other("Unsupported(32)".into()), &bus),
            ExitAction::Fault(_)
        ));
    }

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

    /// Real KVM: a job runs on a paused vCPU's thread and returns its result; a running vCPU
    /// refuses with NotPaused; `all_paused` follows pause and resume.
    #[test]
    fn with_paused_vcpu_runs_only_while_paused() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is absent");
            return;
        }
        // Real mode at gpa 0x1000: `out 0x80, al; jmp short -4`.
        const CODE: [u8; 4] = [0xe6, 0x80, 0xeb, 0xfc];
        const CODE_GPA: u64 = 0x1000;
        let ram = crate::memory::GuestRam::new(2 << 20, crate::memory::BackingKind::Small).unwrap();
        let vm = crate::hypervisor::Vm::new(&ram, 1).unwrap();
        let mem = ram.memory().clone();
        mem.write_slice(&CODE, GuestAddress(CODE_GPA)).unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        fd.set_regs(&regs).unwrap();
        let (bus, _) = bus_with_recorder();
        let mut ctl =
            VmControl::start(vec![fd], Arc::new(bus), mem, ExitRequest::new().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(
            ctl.with_paused_vcpu(0, |fd| fd.get_regs().unwrap().rip),
            Err(VcpuError::NotPaused { id: 0 })
        ));
        assert!(!ctl.all_paused(), "the vCPU runs");
        ctl.pause_all().unwrap();
        assert!(ctl.all_paused());
        let rip = ctl
            .with_paused_vcpu(0, |fd| fd.get_regs().unwrap().rip)
            .unwrap();
        assert!(
            (CODE_GPA..CODE_GPA + CODE.len() as u64).contains(&rip),
            "rip {rip:#x}"
        );
        assert!(matches!(
            ctl.with_paused_vcpu(1, |_| ()),
            Err(VcpuError::NoAck { id: 1, .. })
        ));
        ctl.resume_all().unwrap();
        assert!(!ctl.all_paused(), "running again");
        ctl.stop_all();
    }
}
