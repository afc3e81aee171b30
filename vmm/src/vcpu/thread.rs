//! One vCPU thread: its run state (running / paused / halted / stopped) driven by commands,
//! the kick signal that takes it out of KVM_RUN, and the slow paths of its exits (dirty ring
//! full, the emulation fallback, the syscall relay).

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, OnceLock};

use log::{debug, error, info, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::exits::{fault_report, handle_exit, ExitAction, KVM_INTERNAL_ERROR_EMULATION};
use super::hooks::{EmulationHooks, VcpuHooks};
use crate::arch::x86_64::emulate::kvm::{emulate_failed_insn, exit_insn_bytes};
use crate::arch::x86_64::emulate::syscall_relay::{Outcome, SyscallRelay};
use crate::devices::IoBus;
use crate::exit::{ExitRequest, EXIT_VCPU_FAILED};
use crate::hypervisor::{Vcpu, VcpuOps};

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

/// Work run on a paused vCPU's own thread ([`VmControl::with_paused_vcpu`]).
pub(super) type VcpuJob = Box<dyn FnOnce(&mut Vcpu) + Send>;

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

pub(super) fn register_kick_handler() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            register_signal_handler(kick_signal(), handle_kick)
                .map_err(|e| format!("cannot register the vCPU kick signal handler: {e}"))
        })
        .clone()
}

/// What a vCPU thread needs.
pub(super) struct VcpuThread {
    pub(super) id: usize,
    pub(super) fd: Vcpu,
    pub(super) bus: Arc<IoBus>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) exit: ExitRequest,
    pub(super) commands: Receiver<Command>,
    pub(super) acks: Sender<(RunState, Command)>,
    pub(super) jobs: Receiver<VcpuJob>,
    pub(super) hooks: VcpuHooks,
    pub(super) emulation: EmulationHooks,
    /// The syscall relay's state, when [`EmulationHooks::syscall_relay`] is on.
    pub(super) relay: Option<SyscallRelay>,
}

impl VcpuThread {
    pub(super) fn run(mut self) {
        crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
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
