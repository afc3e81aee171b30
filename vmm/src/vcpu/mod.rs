//! The vCPUs of a VM: one thread per vCPU running KVM_RUN, controlled together through
//! [`VmControl`] (start, pause, resume, run a job on a paused vCPU, stop).
//!
//! Control follows Firecracker's vcpu.rs idea: the VMM sends a command over a channel and kicks
//! the thread out of KVM_RUN with a signal whose handler sets `kvm_run.immediate_exit`, so a
//! command is seen even when the signal lands just before the thread re-enters the guest.

mod exits;
mod hooks;
mod thread;

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

pub use exits::{fault_report, handle_exit, ExitAction};
pub use hooks::{EmulationHooks, GuestProfile, VcpuHooks};
pub use thread::{kick_signal, Command, RunState};

use crate::arch::x86_64::emulate::syscall_relay::SyscallRelay;
use crate::arch::x86_64::emulate::EmulationStats;
use crate::devices::IoBus;
use crate::exit::ExitRequest;
use crate::hypervisor::Vcpu;
use thread::{register_kick_handler, VcpuJob, VcpuThread};

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
        bus: Arc<IoBus>,
        mem: GuestMemoryMmap,
        exit: ExitRequest,
    ) -> Result<VmControl, VcpuError> {
        Self::start_with_hooks(vcpus, bus, mem, exit, VcpuHooks::default())
    }

    /// Like [`start`](Self::start), with `hooks` called from the run loop (every vCPU thread
    /// gets a clone).
    pub fn start_with_hooks(
        vcpus: Vec<Vcpu>,
        bus: Arc<IoBus>,
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
        bus: Arc<IoBus>,
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
                crate::seccomp::enter(crate::seccomp::ThreadKind::Profiler);
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
    use crate::hypervisor::VcpuOps;
    use exits::tests::bus_with_recorder;
    use vm_memory::{Bytes, GuestAddress};

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
