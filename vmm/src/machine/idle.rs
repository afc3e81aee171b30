//! Idle detection: a VM whose every vCPU halted with interrupts off and nothing pending can
//! never run again (only an NMI, SMI or INIT wakes such a vCPU, and nothing in this VMM sends
//! one). The session's wait loop samples the vCPUs with [`IdleWatch`] and ends such a VM with
//! [`EXIT_IDLE`](crate::vcpu::EXIT_IDLE) instead of keeping the process alive forever.
//!
//! With the in-kernel irqchip KVM keeps a halted vCPU inside KVM_RUN (no `KVM_EXIT_HLT` reaches
//! the VMM: measured on this host's kvm_pvm with a `cli; hlt` guest), so the watch kicks each
//! vCPU out for a moment and reads `KVM_GET_MP_STATE` (HALTED), RFLAGS.IF and the pending NMI.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::hypervisor::VcpuOps;

use crate::vcpu::{RunState, VmControl};

/// `KVM_MP_STATE_*` (include/uapi/linux/kvm.h).
const KVM_MP_STATE_UNINITIALIZED: u32 = 1;
const KVM_MP_STATE_INIT_RECEIVED: u32 = 2;
const KVM_MP_STATE_HALTED: u32 = 3;
/// RFLAGS.IF (Intel SDM Vol. 1 §3.4.3).
const RFLAGS_IF: u64 = 1 << 9;

/// How often the vCPUs are sampled.
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// How many samples in a row must find the VM halted for good (at the same RIPs).
const IDLE_SAMPLES: u32 = 2;

/// What one vCPU was doing when sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuSample {
    /// Its vCPU thread's run state.
    pub state: RunState,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: u32,
    /// RFLAGS.
    pub rflags: u64,
    /// RIP.
    pub rip: u64,
    /// An NMI is pending or being injected.
    pub nmi: bool,
}

impl VcpuSample {
    /// Reads a vCPU's sample on its own thread; `state` is filled in by the caller.
    fn read(fd: &dyn VcpuOps) -> Result<VcpuSample, String> {
        let mp = fd
            .get_mp_state()
            .map_err(|e| format!("KVM_GET_MP_STATE: {e}"))?;
        let regs = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        let ev = fd
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        Ok(VcpuSample {
            state: RunState::Running,
            mp_state: mp.mp_state,
            rflags: regs.rflags,
            rip: regs.rip,
            nmi: ev.nmi.pending != 0 || ev.nmi.injected != 0,
        })
    }

    /// Halted with interrupts off and no NMI coming: only INIT or SMI would wake it.
    pub fn halted_for_good(&self) -> bool {
        let halted = self.mp_state == KVM_MP_STATE_HALTED || self.state == RunState::Halted;
        halted && self.rflags & RFLAGS_IF == 0 && !self.nmi
    }

    /// An application processor that was never started (waits for INIT/SIPI from another vCPU).
    fn waits_for_start(&self) -> bool {
        matches!(
            self.mp_state,
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED
        )
    }
}

/// Whether a VM whose vCPUs were sampled as `samples` can never run again: at least one vCPU
/// halted for good, and every other one either halted for good too or never started (nobody
/// is left to start it).
pub fn halted_for_good(samples: &[VcpuSample]) -> bool {
    samples.iter().any(VcpuSample::halted_for_good)
        && samples
            .iter()
            .all(|s| s.halted_for_good() || s.waits_for_start())
}

/// Samples a VM's vCPUs every [`IDLE_POLL`] and says when it halted for good.
#[derive(Debug)]
pub struct IdleWatch {
    next: Instant,
    seen: u32,
    last: Vec<VcpuSample>,
}

impl Default for IdleWatch {
    fn default() -> Self {
        IdleWatch {
            next: Instant::now() + IDLE_POLL,
            seen: 0,
            last: Vec::new(),
        }
    }
}

impl IdleWatch {
    /// Samples the vCPUs of `control` when a poll is due; `Some(report)` once the VM was found
    /// halted for good [`IDLE_SAMPLES`] times in a row at the same RIPs. A VM with a paused
    /// vCPU is not judged (a migration or `vmmctl pause` holds it).
    pub fn poll(&mut self, control: &Mutex<VmControl>) -> Option<String> {
        if Instant::now() < self.next {
            return None;
        }
        self.next = Instant::now() + IDLE_POLL;
        let samples = {
            let c = control.lock().unwrap_or_else(|p| p.into_inner());
            let mut v = Vec::with_capacity(c.len());
            for i in 0..c.len() {
                match c.probe_vcpu(i, |fd| VcpuSample::read(fd)) {
                    Ok((state, Ok(sample))) if state != RunState::Paused => {
                        v.push(VcpuSample { state, ..sample })
                    }
                    Ok((_, Err(e))) => {
                        log::debug!("idle watch: vCPU {i}: {e}");
                        return self.reset();
                    }
                    // Paused (a migration or `vmmctl pause` holds it).
                    Ok(_) => return self.reset(),
                    Err(e) => {
                        log::debug!("idle watch: {e}");
                        return self.reset();
                    }
                }
            }
            v
        };
        log::trace!("idle watch: {samples:x?}");
        if !halted_for_good(&samples) {
            return self.reset();
        }
        if self.seen > 0 && samples != self.last {
            self.seen = 0;
        }
        self.seen += 1;
        self.last = samples;
        (self.seen >= IDLE_SAMPLES).then(|| self.report())
    }

    fn reset(&mut self) -> Option<String> {
        self.seen = 0;
        self.last.clear();
        None
    }

    fn report(&self) -> String {
        let where_: Vec<String> = self
            .last
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if s.halted_for_good() {
                    format!("vCPU {i} halted at RIP {:#x}", s.rip)
                } else {
                    format!("vCPU {i} never started")
                }
            })
            .collect();
        format!(
            "the guest halted with interrupts off and nothing pending, which nothing can wake \
             ({}); stopped",
            where_.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(mp_state: u32, rflags: u64, nmi: bool) -> VcpuSample {
        VcpuSample {
            state: RunState::Running,
            mp_state,
            rflags,
            rip: 0x1000,
            nmi,
        }
    }
    const RUNNABLE: u32 = 0;

    #[test]
    fn only_a_halt_with_interrupts_off_and_no_nmi_is_for_good() {
        assert!(halted_for_good(&[s(KVM_MP_STATE_HALTED, 0x2, false)]));
        assert!(
            !halted_for_good(&[s(KVM_MP_STATE_HALTED, 0x202, false)]),
            "IF on: an interrupt wakes it"
        );
        assert!(
            !halted_for_good(&[s(KVM_MP_STATE_HALTED, 0x2, true)]),
            "an NMI wakes it"
        );
        assert!(
            !halted_for_good(&[s(RUNNABLE, 0x2, false)]),
            "running with IF off"
        );
        let exited = VcpuSample {
            state: RunState::Halted,
            ..s(RUNNABLE, 0x2, false)
        };
        assert!(
            halted_for_good(&[exited]),
            "KVM_EXIT_HLT without an irqchip"
        );
    }

    #[test]
    fn every_vcpu_must_be_halted_or_never_started() {
        let dead = s(KVM_MP_STATE_HALTED, 0x2, false);
        let ap = s(KVM_MP_STATE_UNINITIALIZED, 0, false);
        assert!(halted_for_good(&[dead, ap]));
        assert!(halted_for_good(&[dead, dead]));
        assert!(
            !halted_for_good(&[dead, s(RUNNABLE, 0x202, false)]),
            "one still runs"
        );
        assert!(
            !halted_for_good(&[ap, ap]),
            "nothing halted: not started yet"
        );
        assert!(!halted_for_good(&[]));
    }
}
