//! The syscall relay: completes a guest user program's `syscall` on a software KVM that does
//! not.
//!
//! Measured on this host's `kvm_pvm` (2026-12-06, `vmm/tests/syscall_relay.rs`): when guest
//! user code (CPL 3) executes `syscall`, KVM loads RIP from `IA32_LSTAR`, RCX with the return
//! address and R11 with RFLAGS, masks RFLAGS with `IA32_FMASK`, but leaves the vCPU at CPL 3.
//! The first fetch at the kernel's entry point then faults (a kernel page is not user
//! accessible), and the guest kernel sees a user-mode #PF at its own syscall entry: Linux kills
//! `/init` with SIGSEGV on its first system call. (`int 0x80` from user mode is worse: KVM
//! stops the VM with a triple fault.)
//!
//! KVM hands the VMM everything needed to finish the job:
//! - the guest's `wrmsr IA32_LSTAR` exits to the VMM (an MSR filter with
//!   `KVM_CAP_X86_USER_SPACE_MSR`), which writes the MSR itself and learns the entry point and,
//!   from the IDT the guest has loaded by then, its #PF handler;
//! - a hardware breakpoint (`KVM_SET_GUEST_DEBUG`) on the #PF handler's first instruction
//!   stops every page fault delivery (guest kernel code is interpreted, and the interpreter
//!   honours the VMM's breakpoints);
//! - at that breakpoint the exception frame is on the stack. If it is the half-done syscall
//!   (CR2 = the fault address = the frame's RIP = `IA32_LSTAR`, the frame's CS at RPL 3), the
//!   VMM discards the frame and puts the vCPU where `syscall` would have: CPL 0 with the
//!   kernel's CS and SS from `IA32_STAR`, the user's RSP, RIP = `IA32_LSTAR`, RFLAGS as masked.
//!   RCX and R11 already hold what `syscall` stores there. KVM does allow KVM_SET_SREGS to move
//!   a vCPU from CPL 3 to CPL 0.
//! - Any other page fault is the guest's own: the VMM single-steps the handler's first
//!   instruction with the breakpoint off (KVM here ignores RFLAGS.RF on re-entry) and arms it
//!   again.
//!
//! The decision ([`decide`]) is pure and unit-tested; [`SyscallRelay`] does the KVM calls for
//! one vCPU. The relay is on only where the host quirks say KVM needs it
//! (`--no-host-quirks` turns it off); hardware KVM completes `syscall` itself.

use crate::arch::x86_64::msrs::{MSR_LSTAR, MSR_STAR};
use crate::hypervisor::VcpuOps;
use kvm_bindings::{
    kvm_guest_debug, kvm_msr_entry, kvm_segment, Msrs, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use log::{debug, info, warn};
use vm_memory::GuestMemoryMmap;

/// The #PF vector (Intel SDM Vol. 3A §6.15).
const PF_VECTOR: u64 = 14;
/// #PF error code bit 2: the access was made at CPL 3.
const PF_USER: u64 = 1 << 2;
/// RFLAGS.RF (bit 16): set in the image a fault pushes; `syscall` clears it.
const RFLAGS_RF: u64 = 1 << 16;
/// DR7 bits for breakpoint 0: L0 and G0 enabled, R/W0 = 00 (instruction), LEN0 = 00 (1 byte)
/// (Intel SDM Vol. 3B §18.2.4).
const DR7_BP0_EXEC: u64 = 0b11;

/// The exception frame a #PF pushes on a 64-bit stack, lowest address first (Intel SDM Vol. 3A
/// §6.14.2, Figure 6-9).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultFrame {
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl FaultFrame {
    /// Bytes the frame takes on the stack.
    pub const LEN: u64 = 6 * 8;

    fn from_words(w: [u64; 6]) -> FaultFrame {
        FaultFrame {
            error_code: w[0],
            rip: w[1],
            cs: w[2],
            rflags: w[3],
            rsp: w[4],
            ss: w[5],
        }
    }
}

/// What to do at the #PF handler's breakpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The fault is a user `syscall` KVM left at CPL 3: enter the kernel at LSTAR with these
    /// registers.
    Relay { rsp: u64, rflags: u64 },
    /// The guest's own page fault: let its handler run.
    StepOver,
}

/// Decides from CR2, the exception frame and the entry point whether a #PF is the half-done
/// user syscall. All four must agree: the fault address and the faulting RIP are the entry
/// point, the access was a user one, and the frame returns to CPL 3.
pub fn decide(cr2: u64, frame: &FaultFrame, lstar: u64) -> Decision {
    let at_entry = lstar != 0 && cr2 == lstar && frame.rip == lstar;
    let from_user = frame.cs & 3 == 3 && frame.error_code & PF_USER != 0;
    if at_entry && from_user {
        Decision::Relay {
            rsp: frame.rsp,
            rflags: frame.rflags & !RFLAGS_RF,
        }
    } else {
        Decision::StepOver
    }
}

/// The handler address of a 64-bit IDT gate (Intel SDM Vol. 3A §6.14.1, Figure 6-8).
pub fn gate_handler(gate: &[u8; 16]) -> u64 {
    u64::from(u16::from_le_bytes([gate[0], gate[1]]))
        | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16
        | u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32
}

/// A flat 64-bit ring-0 code (`code`) or data segment with `selector`, as `syscall` loads them
/// (Intel SDM Vol. 2B, SYSCALL).
pub fn kernel_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Why the relay could not act.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: crate::hypervisor::Error,
    },
    #[error("reading {what} at guest address {gva:#x}: {source}")]
    Read {
        what: &'static str,
        gva: u64,
        source: super::exec::EmulateError,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(crate::hypervisor::Error) -> RelayError {
    move |source| RelayError::Kvm { what, source }
}

/// What the relay did with one exit, for the caller's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A user syscall entered the kernel.
    Relayed,
    /// A guest page fault: its handler's first instruction is being stepped over.
    Stepping,
    /// The step ended and the breakpoint is armed again.
    Rearmed,
    /// The exit was not the relay's (a #DB of the guest's own): re-injected.
    Reinjected,
    /// The LSTAR write was carried out; the breakpoint is armed.
    Armed,
}

/// The relay's state for one vCPU.
#[derive(Debug, Default)]
pub struct SyscallRelay {
    /// `IA32_LSTAR` as the guest last wrote it (0: not yet).
    lstar: u64,
    /// The kernel CS selector from `IA32_STAR`.
    kernel_cs: u16,
    /// The #PF handler the breakpoint sits on (0: not armed).
    pf_handler: u64,
    /// True between a step-over and the debug exit that ends it.
    stepping: bool,
}

impl SyscallRelay {
    pub fn new() -> SyscallRelay {
        SyscallRelay::default()
    }

    /// The #PF handler address the breakpoint is on, once armed.
    pub fn armed_at(&self) -> Option<u64> {
        (self.pf_handler != 0).then_some(self.pf_handler)
    }

    /// Arms from the vCPU's current state when the guest already set up its syscall entry
    /// (a vCPU restored from a migration): reads `IA32_LSTAR`/`IA32_STAR` and the IDT. Does
    /// nothing while LSTAR is 0 (a fresh boot arms at the guest's LSTAR write).
    pub fn arm_from_state(
        &mut self,
        fd: &dyn VcpuOps,
        mem: &GuestMemoryMmap,
    ) -> Result<(), RelayError> {
        let mut msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_LSTAR,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_STAR,
                ..Default::default()
            },
        ])
        .expect("two entries fit");
        fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let (lstar, star) = (msrs.as_slice()[0].data, msrs.as_slice()[1].data);
        if lstar == 0 {
            return Ok(());
        }
        self.lstar = lstar;
        self.kernel_cs = ((star >> 32) & 0xfffc) as u16;
        self.arm(fd, mem)
    }

    /// A guest `wrmsr` to `index` exited (the MSR filter): writes it with KVM_SET_MSRS and,
    /// for LSTAR, arms the breakpoint on the #PF handler of the IDT the guest has loaded.
    pub fn on_wrmsr(
        &mut self,
        fd: &dyn VcpuOps,
        mem: &GuestMemoryMmap,
        index: u32,
        data: u64,
    ) -> Result<Outcome, RelayError> {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .expect("one entry fits");
        fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if index != MSR_LSTAR {
            return Ok(Outcome::Armed);
        }
        self.arm_from_state(fd, mem)?;
        Ok(Outcome::Armed)
    }

    fn arm(&mut self, fd: &dyn VcpuOps, mem: &GuestMemoryMmap) -> Result<(), RelayError> {
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        if u64::from(sregs.idt.limit) < PF_VECTOR * 16 + 15 {
            warn!("syscall relay: the guest's IDT has no #PF gate yet; not armed");
            return Ok(());
        }
        let gate: [u8; 16] = read_virt(fd, mem, sregs.idt.base + PF_VECTOR * 16, "#PF gate")?;
        let handler = gate_handler(&gate);
        if handler != self.pf_handler {
            info!(
                "syscall relay armed: syscall entry {:#x}, #PF handler {handler:#x}",
                self.lstar
            );
        }
        self.pf_handler = handler;
        self.stepping = false;
        fd.set_guest_debug(&self.debug(false))
            .map_err(kvm("KVM_SET_GUEST_DEBUG"))
    }

    /// The guest debug setting: breakpoint 0 on the #PF handler, or (while stepping over it)
    /// no breakpoint and single-step.
    fn debug(&self, stepping: bool) -> kvm_guest_debug {
        let mut d = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        if stepping {
            d.control |= KVM_GUESTDBG_SINGLESTEP;
        } else {
            d.arch.debugreg[0] = self.pf_handler;
            d.arch.debugreg[7] = DR7_BP0_EXEC;
        }
        d
    }

    /// A KVM_EXIT_DEBUG at `pc`.
    pub fn on_debug(
        &mut self,
        fd: &dyn VcpuOps,
        mem: &GuestMemoryMmap,
        pc: u64,
    ) -> Result<Outcome, RelayError> {
        if self.stepping {
            self.stepping = false;
            fd.set_guest_debug(&self.debug(false))
                .map_err(kvm("KVM_SET_GUEST_DEBUG"))?;
            return Ok(Outcome::Rearmed);
        }
        if self.pf_handler == 0 || pc != self.pf_handler {
            // Not ours: a #DB the guest raised itself (its own single-step or breakpoint).
            debug!("syscall relay: debug exit at {pc:#x} is the guest's; re-injecting #DB");
            let mut events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
            events.exception.injected = 1;
            events.exception.nr = 1;
            events.exception.has_error_code = 0;
            fd.set_vcpu_events(&events)
                .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
            return Ok(Outcome::Reinjected);
        }
        let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let mut regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        // The cheap test first: almost every fault has CR2 elsewhere.
        let decision = if sregs.cr2 == self.lstar {
            let words: [u64; 6] = read_virt(fd, mem, regs.rsp, "#PF frame")?;
            decide(sregs.cr2, &FaultFrame::from_words(words), self.lstar)
        } else {
            Decision::StepOver
        };
        match decision {
            Decision::Relay { rsp, rflags } => {
                sregs.cs = kernel_segment(self.kernel_cs, true);
                sregs.ss = kernel_segment(self.kernel_cs + 8, false);
                fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
                regs.rsp = rsp;
                regs.rip = self.lstar;
                regs.rflags = rflags;
                fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
                Ok(Outcome::Relayed)
            }
            Decision::StepOver => {
                self.stepping = true;
                fd.set_guest_debug(&self.debug(true))
                    .map_err(kvm("KVM_SET_GUEST_DEBUG"))?;
                Ok(Outcome::Stepping)
            }
        }
    }
}

/// Reads a `T` at guest virtual `gva` through the vCPU's page tables, with the emulation
/// fallback's page-by-page reader (KVM_TRANSLATE per page).
fn read_virt<T: vm_memory::ByteValued + Default>(
    fd: &dyn VcpuOps,
    mem: &GuestMemoryMmap,
    gva: u64,
    what: &'static str,
) -> Result<T, RelayError> {
    let read = |source| RelayError::Read { what, gva, source };
    let mut out = T::default();
    let mut ctx = super::kvm::KvmContext::new(fd, mem, None).map_err(read)?;
    super::exec::read_virt(&mut ctx, gva, out.as_mut_slice()).map_err(read)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LSTAR: u64 = 0xffff_ffff_8140_0040;

    fn user_syscall_frame() -> FaultFrame {
        FaultFrame {
            error_code: 0x5,
            rip: LSTAR,
            cs: 0x33,
            rflags: 0x1_0002,
            rsp: 0x7fff_1234_5670,
            ss: 0x2b,
        }
    }

    #[test]
    fn a_user_fault_at_the_entry_point_is_relayed_with_the_user_stack() {
        assert_eq!(
            decide(LSTAR, &user_syscall_frame(), LSTAR),
            Decision::Relay {
                rsp: 0x7fff_1234_5670,
                rflags: 0x2
            }
        );
    }

    #[test]
    fn any_disagreement_is_the_guests_own_fault() {
        let f = user_syscall_frame();
        // Another address faulted.
        assert_eq!(decide(0x1000, &f, LSTAR), Decision::StepOver);
        // The kernel itself faulted at (or jumped to) the entry point.
        let kernel = FaultFrame { cs: 0x10, ..f };
        assert_eq!(decide(LSTAR, &kernel, LSTAR), Decision::StepOver);
        let supervisor_access = FaultFrame {
            error_code: 0x1,
            ..f
        };
        assert_eq!(decide(LSTAR, &supervisor_access, LSTAR), Decision::StepOver);
        // A data access to the entry point from elsewhere in user code.
        let data = FaultFrame {
            rip: 0x40_1000,
            ..f
        };
        assert_eq!(decide(LSTAR, &data, LSTAR), Decision::StepOver);
        // No entry point yet.
        assert_eq!(
            decide(0, &FaultFrame { rip: 0, ..f }, 0),
            Decision::StepOver
        );
    }

    #[test]
    fn gate_handler_joins_the_three_offset_fields() {
        // Offset 0xffffffff_81601230 in a gate with selector 0x10, type 0x8e.
        let gate = [
            0x30, 0x12, 0x10, 0x00, 0x00, 0x8e, 0x60, 0x81, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ];
        assert_eq!(gate_handler(&gate), 0xffff_ffff_8160_1230);
    }

    #[test]
    fn kernel_segments_are_flat_ring_zero() {
        let cs = kernel_segment(0x10, true);
        assert_eq!(
            (cs.selector, cs.dpl, cs.l, cs.db, cs.type_),
            (0x10, 0, 1, 0, 0xb)
        );
        let ss = kernel_segment(0x18, false);
        assert_eq!(
            (ss.selector, ss.dpl, ss.l, ss.db, ss.type_),
            (0x18, 0, 0, 1, 0x3)
        );
    }

    #[test]
    fn the_breakpoint_is_on_the_handler_or_off_while_stepping() {
        let r = SyscallRelay {
            pf_handler: 0xffff_ffff_8160_1230,
            ..SyscallRelay::default()
        };
        let armed = r.debug(false);
        assert_eq!(armed.arch.debugreg[0], 0xffff_ffff_8160_1230);
        assert_eq!(armed.arch.debugreg[7], DR7_BP0_EXEC);
        assert_eq!(armed.control & KVM_GUESTDBG_SINGLESTEP, 0);
        let step = r.debug(true);
        assert_eq!(step.arch.debugreg[7], 0);
        assert_ne!(step.control & KVM_GUESTDBG_SINGLESTEP, 0);
    }
}
