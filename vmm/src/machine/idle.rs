//! Idle detection: ends a VM that nothing can wake. The session's wait loop samples the vCPUs
//! with [`IdleWatch`] and ends the VM with [`EXIT_IDLE`](crate::exit::EXIT_IDLE) instead of
//! keeping the process alive forever, in two cases:
//!
//! - **Halted for good**: every started vCPU sits in HLT with interrupts off and no NMI
//!   pending. Only an NMI, SMI or INIT wakes such a vCPU and nothing in this VMM sends one, so
//!   two samples in a row (about [`IDLE_POLL`] apart) are enough.
//! - **Asleep**: every started vCPU sits in HLT with interrupts on but nothing that would
//!   raise one: its LAPIC timer is not counting (masked, one-shot expired, no TSC deadline),
//!   nothing waits in its IRR, the PIT will not fire, and nothing outside the guest can
//!   interrupt it (console input closed, no control socket). A guest can still be woken by
//!   a source this watch does not model, so this case needs `--idle-timeout` seconds of such
//!   samples at the same RIPs, and `--idle-timeout 0` turns it off.
//!
//! With the in-kernel irqchip KVM keeps a halted vCPU inside KVM_RUN (no `KVM_EXIT_HLT` reaches
//! the VMM: measured on this host's kvm_pvm with a `cli; hlt` guest), so the watch kicks each
//! vCPU out for a moment and reads `KVM_GET_MP_STATE` (HALTED), RFLAGS.IF, the pending events,
//! the LAPIC page and the TSC deadline MSR; the PIT is read once per sample for the whole VM.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_pit_channel_state, Msrs};

use crate::hypervisor::{VcpuOps, VmOps};

use crate::vcpu::{RunState, VmControl};

/// `KVM_MP_STATE_*` (include/uapi/linux/kvm.h).
const KVM_MP_STATE_UNINITIALIZED: u32 = 1;
const KVM_MP_STATE_INIT_RECEIVED: u32 = 2;
const KVM_MP_STATE_HALTED: u32 = 3;
/// RFLAGS.IF (Intel SDM Vol. 1 §3.4.3).
const RFLAGS_IF: u64 = 1 << 9;
/// IA32_TSC_DEADLINE (Intel SDM Vol. 3A §11.5.4.1): 0 when disarmed or fired.
const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// Local APIC register offsets in its 4 KiB page (Intel SDM Vol. 3A §11.4.1, Table 11-1).
mod apic {
    /// Spurious-interrupt vector register; bit 8 enables the APIC in software.
    pub const SVR: usize = 0xf0;
    pub const SVR_ENABLE: u32 = 1 << 8;
    /// The interrupt request register: 8 words of 32 bits, 16 bytes apart.
    pub const IRR: usize = 0x200;
    /// LVT timer entry (§11.5.4): bit 16 masks it, bits 17-18 are the mode.
    pub const LVT_TIMER: usize = 0x320;
    pub const LVT_MASKED: u32 = 1 << 16;
    pub const MODE_SHIFT: u32 = 17;
    pub const MODE_ONE_SHOT: u32 = 0;
    pub const MODE_PERIODIC: u32 = 1;
    pub const MODE_TSC_DEADLINE: u32 = 2;
    /// Initial and current count (KVM computes the current count when it saves the page).
    pub const TMICT: usize = 0x380;
    pub const TMCCT: usize = 0x390;
}

/// The PIT's input clock (Hz).
const PIT_HZ: u64 = 1_193_182;

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
    /// An interrupt waits in the LAPIC's IRR, or an interrupt or exception is being injected.
    pub irq: bool,
    /// The LAPIC timer will fire: periodic, a one-shot still counting, or a TSC deadline set.
    pub timer: bool,
}

/// A 32-bit register of a saved LAPIC page.
fn apic_reg(page: &[u8], offset: usize) -> u32 {
    let b = &page[offset..offset + 4];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Whether the LAPIC whose page is `page` will raise its timer interrupt; `tsc_deadline` is
/// IA32_TSC_DEADLINE (`None` when it could not be read: then a TSC-deadline timer counts as
/// armed, the safe side).
pub fn lapic_timer_armed(page: &[u8], tsc_deadline: Option<u64>) -> bool {
    if apic_reg(page, apic::SVR) & apic::SVR_ENABLE == 0 {
        return false; // software-disabled: every LVT entry is masked (§11.4.7.2)
    }
    let lvt = apic_reg(page, apic::LVT_TIMER);
    if lvt & apic::LVT_MASKED != 0 {
        return false;
    }
    match (lvt >> apic::MODE_SHIFT) & 3 {
        apic::MODE_ONE_SHOT => apic_reg(page, apic::TMICT) != 0 && apic_reg(page, apic::TMCCT) != 0,
        apic::MODE_PERIODIC => apic_reg(page, apic::TMICT) != 0,
        apic::MODE_TSC_DEADLINE => tsc_deadline != Some(0),
        _ => true, // reserved mode: cannot tell, so not idle
    }
}

/// Whether the LAPIC page `page` has an interrupt requested (any IRR bit).
pub fn lapic_irr_pending(page: &[u8]) -> bool {
    (0..8).any(|i| apic_reg(page, apic::IRR + 16 * i) != 0)
}

/// Whether PIT channel 0 (IRQ 0) will fire after `now_ns` (CLOCK_MONOTONIC, the clock of
/// KVM's `count_load_time`): rate generator and square wave (modes 2, 3) fire for ever; the
/// one-shot modes (0, 1, 4, 5) until `count` ticks after it was loaded; a channel never
/// programmed (KVM's mode 0xff) never fires.
pub fn pit_armed(ch0: &kvm_pit_channel_state, now_ns: i64) -> bool {
    match ch0.mode {
        2 | 3 => true,
        0 | 1 | 4 | 5 => {
            let ns = u64::from(ch0.count).saturating_mul(1_000_000_000) / PIT_HZ;
            ch0.count_load_time.saturating_add(ns as i64) > now_ns
        }
        _ => false,
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec.saturating_mul(1_000_000_000) + ts.tv_nsec
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
        let lapic = fd.get_lapic().map_err(|e| format!("KVM_GET_LAPIC: {e}"))?;
        let page: Vec<u8> = lapic.regs.iter().map(|&b| b as u8).collect();
        let tsc_deadline = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_TSC_DEADLINE,
            ..Default::default()
        }])
        .ok()
        .and_then(|mut msrs| match fd.get_msrs(&mut msrs) {
            Ok(1) => Some(msrs.as_slice()[0].data),
            _ => None,
        });
        Ok(VcpuSample {
            state: RunState::Running,
            mp_state: mp.mp_state,
            rflags: regs.rflags,
            rip: regs.rip,
            nmi: ev.nmi.pending != 0 || ev.nmi.injected != 0,
            irq: lapic_irr_pending(&page)
                || ev.interrupt.injected != 0
                || ev.exception.injected != 0
                || ev.exception.pending != 0,
            timer: lapic_timer_armed(&page, tsc_deadline),
        })
    }

    fn halted(&self) -> bool {
        self.mp_state == KVM_MP_STATE_HALTED || self.state == RunState::Halted
    }

    /// Halted with interrupts off and no NMI coming: only INIT or SMI would wake it.
    pub fn halted_for_good(&self) -> bool {
        self.halted() && self.rflags & RFLAGS_IF == 0 && !self.nmi
    }

    /// Halted with interrupts on, and neither its LAPIC timer nor a requested interrupt nor an
    /// NMI will wake it.
    pub fn asleep(&self) -> bool {
        self.halted() && self.rflags & RFLAGS_IF != 0 && !self.nmi && !self.irq && !self.timer
    }

    /// An application processor that was never started (waits for INIT/SIPI from another vCPU).
    fn waits_for_start(&self) -> bool {
        matches!(
            self.mp_state,
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED
        )
    }
}

/// What a VM's samples say about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Some vCPU runs or will be woken.
    Runs,
    /// Every started vCPU is halted for good (and at least one was started).
    HaltedForGood,
    /// Every started vCPU is halted for good or asleep, at least one asleep.
    Asleep,
}

/// Judges a VM from its vCPUs' `samples` and whether its PIT will fire (`pit`). A vCPU that
/// never started counts as neither running nor halted: nobody is left to start it once the
/// others sleep.
pub fn judge(samples: &[VcpuSample], pit: bool) -> Verdict {
    let stopped = |s: &VcpuSample| s.halted_for_good() || s.asleep();
    if !samples.iter().any(stopped) || !samples.iter().all(|s| stopped(s) || s.waits_for_start()) {
        return Verdict::Runs;
    }
    if !samples.iter().any(VcpuSample::asleep) {
        Verdict::HaltedForGood
    } else if pit {
        Verdict::Runs
    } else {
        Verdict::Asleep
    }
}

/// Names a source outside the guest that can still interrupt it (`None`: there is none).
pub type OutsideWake = Box<dyn Fn() -> Option<&'static str>>;

/// Samples a VM's vCPUs every [`IDLE_POLL`] and says when nothing can wake it.
pub struct IdleWatch {
    next: Instant,
    /// `--idle-timeout`: how long a VM may stay [asleep](Verdict::Asleep) (`None`: for ever).
    asleep_limit: Option<Duration>,
    outside: OutsideWake,
    verdict: Verdict,
    seen: u32,
    since: Instant,
    last: Vec<VcpuSample>,
}

impl std::fmt::Debug for IdleWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleWatch")
            .field("asleep_limit", &self.asleep_limit)
            .field("verdict", &self.verdict)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl IdleWatch {
    /// A watch that ends an asleep VM after `asleep_limit` (`None`: never) unless `outside`
    /// names a source that can still interrupt the guest.
    pub fn new(asleep_limit: Option<Duration>, outside: OutsideWake) -> IdleWatch {
        let now = Instant::now();
        IdleWatch {
            next: now + IDLE_POLL,
            asleep_limit,
            outside,
            verdict: Verdict::Runs,
            seen: 0,
            since: now,
            last: Vec::new(),
        }
    }

    /// Samples the vCPUs of `control` (and the PIT of `vm`) when a poll is due; `Some(report)`
    /// once the VM was found halted for good [`IDLE_SAMPLES`] times in a row, or asleep for
    /// the whole limit, at the same RIPs. A VM with a paused vCPU is not judged (a migration
    /// or `vmmctl pause` holds it).
    pub fn poll(&mut self, control: &Mutex<VmControl>, vm: &dyn VmOps) -> Option<String> {
        let now = Instant::now();
        if now < self.next {
            return None;
        }
        self.next = now + IDLE_POLL;
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
        let verdict = match judge(&samples, false) {
            Verdict::Asleep => self.still_asleep(vm),
            v => v,
        };
        if verdict == Verdict::Runs {
            return self.reset();
        }
        if verdict != self.verdict || samples != self.last {
            self.seen = 0;
            self.since = now;
        }
        self.seen += 1;
        self.verdict = verdict;
        self.last = samples;
        let done = match verdict {
            Verdict::HaltedForGood => self.seen >= IDLE_SAMPLES,
            Verdict::Asleep => self
                .asleep_limit
                .is_some_and(|l| self.seen >= IDLE_SAMPLES && now - self.since >= l),
            Verdict::Runs => false,
        };
        done.then(|| self.report())
    }

    /// An asleep-looking VM stays [`Verdict::Asleep`] only when the limit is on, nothing
    /// outside can interrupt it and its PIT will not fire.
    fn still_asleep(&self, vm: &dyn VmOps) -> Verdict {
        if self.asleep_limit.is_none() {
            return Verdict::Runs;
        }
        if let Some(source) = (self.outside)() {
            log::trace!("idle watch: asleep, but {source} can interrupt the guest");
            return Verdict::Runs;
        }
        match vm.get_pit2() {
            Ok(pit) if pit_armed(&pit.channels[0], monotonic_ns()) => Verdict::Runs,
            Ok(_) => Verdict::Asleep,
            // No PIT: nothing there to fire.
            Err(e) => {
                log::debug!("idle watch: KVM_GET_PIT2: {e}");
                Verdict::Asleep
            }
        }
    }

    fn reset(&mut self) -> Option<String> {
        self.seen = 0;
        self.verdict = Verdict::Runs;
        self.last.clear();
        None
    }

    fn report(&self) -> String {
        let where_: Vec<String> = self
            .last
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if s.halted_for_good() || s.asleep() {
                    format!("vCPU {i} halted at RIP {:#x}", s.rip)
                } else {
                    format!("vCPU {i} never started")
                }
            })
            .collect();
        let where_ = where_.join(", ");
        match (self.verdict, self.asleep_limit) {
            (Verdict::Asleep, Some(limit)) => format!(
                "the guest sat halted with interrupts on for {}s and nothing could wake it (no \
                 LAPIC timer or PIT counting, no interrupt pending, no console input or control \
                 socket) ({where_}); stopped (--idle-timeout sets how long, 0 never stops it)",
                limit.as_secs_f64()
            ),
            _ => format!(
                "the guest halted with interrupts off and nothing pending, which nothing can \
                 wake ({where_}); stopped"
            ),
        }
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
            irq: false,
            timer: false,
        }
    }
    const RUNNABLE: u32 = 0;
    const IF: u64 = 0x202;

    fn halted_for_good(samples: &[VcpuSample]) -> bool {
        judge(samples, false) == Verdict::HaltedForGood
    }

    #[test]
    fn only_a_halt_with_interrupts_off_and_no_nmi_is_for_good() {
        assert!(halted_for_good(&[s(KVM_MP_STATE_HALTED, 0x2, false)]));
        assert!(
            !halted_for_good(&[s(KVM_MP_STATE_HALTED, IF, false)]),
            "IF on: an interrupt may wake it"
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
            !halted_for_good(&[dead, s(RUNNABLE, IF, false)]),
            "one still runs"
        );
        assert!(
            !halted_for_good(&[ap, ap]),
            "nothing halted: not started yet"
        );
        assert!(!halted_for_good(&[]));
    }

    #[test]
    fn a_halt_with_interrupts_on_is_asleep_only_with_nothing_to_wake_it() {
        let asleep = s(KVM_MP_STATE_HALTED, IF, false);
        let dead = s(KVM_MP_STATE_HALTED, 0x2, false);
        let ap = s(KVM_MP_STATE_UNINITIALIZED, 0, false);
        assert_eq!(judge(&[asleep], false), Verdict::Asleep);
        assert_eq!(judge(&[asleep, dead, ap], false), Verdict::Asleep);
        assert_eq!(judge(&[dead, ap], false), Verdict::HaltedForGood);
        assert_eq!(judge(&[asleep], true), Verdict::Runs, "the PIT fires");
        assert_eq!(
            judge(&[dead], true),
            Verdict::HaltedForGood,
            "the PIT cannot wake a vCPU with interrupts off"
        );
        let timer = VcpuSample {
            timer: true,
            ..asleep
        };
        let irq = VcpuSample {
            irq: true,
            ..asleep
        };
        let nmi = s(KVM_MP_STATE_HALTED, IF, true);
        for (wakes, why) in [(timer, "LAPIC timer"), (irq, "IRR"), (nmi, "NMI")] {
            assert_eq!(judge(&[wakes], false), Verdict::Runs, "{why}");
            assert_eq!(judge(&[asleep, wakes], false), Verdict::Runs, "{why}");
        }
        assert_eq!(
            judge(&[asleep, s(RUNNABLE, IF, false)], false),
            Verdict::Runs,
            "another vCPU runs"
        );
    }

    /// A LAPIC page with the given SVR, LVT timer, initial and current count.
    fn page(svr: u32, lvt: u32, tmict: u32, tmcct: u32) -> Vec<u8> {
        let mut p = vec![0u8; 1024];
        for (off, v) in [
            (apic::SVR, svr),
            (apic::LVT_TIMER, lvt),
            (apic::TMICT, tmict),
            (apic::TMCCT, tmcct),
        ] {
            p[off..off + 4].copy_from_slice(&v.to_le_bytes());
        }
        p
    }

    #[test]
    fn the_lapic_timer_is_armed_only_when_it_will_fire() {
        const ON: u32 = 0x1ff;
        const VEC: u32 = 0x41;
        let one_shot = VEC;
        let periodic = VEC | 1 << 17;
        let deadline = VEC | 2 << 17;
        assert!(lapic_timer_armed(&page(ON, one_shot, 1000, 10), None));
        assert!(
            !lapic_timer_armed(&page(ON, one_shot, 1000, 0), None),
            "one-shot that fired"
        );
        assert!(
            !lapic_timer_armed(&page(ON, one_shot, 0, 0), None),
            "never loaded"
        );
        assert!(lapic_timer_armed(&page(ON, periodic, 1000, 0), None));
        assert!(!lapic_timer_armed(&page(ON, periodic, 0, 0), None));
        assert!(
            !lapic_timer_armed(&page(ON, periodic | 1 << 16, 1000, 5), None),
            "masked"
        );
        assert!(
            !lapic_timer_armed(&page(0xff, periodic, 1000, 5), None),
            "APIC software-disabled"
        );
        assert!(lapic_timer_armed(&page(ON, deadline, 0, 0), Some(12345)));
        assert!(!lapic_timer_armed(&page(ON, deadline, 0, 0), Some(0)));
        assert!(
            lapic_timer_armed(&page(ON, deadline, 0, 0), None),
            "deadline unreadable: the safe side"
        );
    }

    #[test]
    fn any_irr_bit_is_a_pending_interrupt() {
        let mut p = vec![0u8; 1024];
        assert!(!lapic_irr_pending(&p));
        p[apic::IRR + 16 * 7 + 3] = 0x80; // vector 255
        assert!(lapic_irr_pending(&p));
        let mut p = vec![0u8; 1024];
        p[apic::IRR - 1] = 0xff; // not the IRR
        p[apic::IRR + 16 * 8] = 0xff; // past it
        assert!(!lapic_irr_pending(&p));
    }

    #[test]
    fn the_pit_fires_until_a_one_shot_count_has_run_out() {
        let ch = |mode: u8, count: u32, loaded: i64| kvm_pit_channel_state {
            mode,
            count,
            count_load_time: loaded,
            ..Default::default()
        };
        let now = 10_000_000_000;
        assert!(pit_armed(&ch(2, 1193, 0), now), "rate generator");
        assert!(pit_armed(&ch(3, 0x10000, 0), now), "square wave");
        assert!(!pit_armed(&ch(0xff, 0, 0), now), "never programmed");
        // Linux's PIT shutdown: mode 0, count 0 (0x10000 ticks, about 55 ms).
        let loaded = now - 10_000_000;
        assert!(pit_armed(&ch(0, 0x10000, loaded), now));
        assert!(!pit_armed(&ch(0, 0x10000, loaded), now + 50_000_000));
        for mode in [1, 4, 5] {
            assert!(pit_armed(&ch(mode, 1193, now), now + 999_000));
            assert!(!pit_armed(&ch(mode, 1193, now), now + 1_001_000));
        }
    }

    #[test]
    fn monotonic_ns_advances() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b - a >= 2_000_000, "{a} -> {b}");
    }
}
