//! What a KVM exit means: the run loop's next step for each exit ([`handle_exit`], pure apart
//! from the device calls) and the report of a failed vCPU ([`fault_report`]).

use std::fmt::Write as _;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::IoBus;
use crate::exit::{EXIT_OK, EXIT_REBOOT};
use crate::hypervisor::{VcpuOps, VmExit};

/// `kvm_run.internal.suberror` for an emulation failure (include/uapi/linux/kvm.h).
pub(super) const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
/// `KVM_SYSTEM_EVENT_*` types (include/uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
/// Longest x86 instruction (Intel SDM Vol. 2 §2.3.11).
const MAX_INSN_LEN: usize = 15;

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
pub fn handle_exit(vcpu: usize, exit: VmExit<'_>, bus: &IoBus) -> ExitAction {
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
            bus.mmio_read(vcpu, addr, data);
            ExitAction::Continue
        }
        VmExit::MmioWrite(addr, data) => {
            bus.mmio_write(vcpu, addr, data);
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

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::devices::tests::Recorder;

    pub(in crate::vcpu) fn bus_with_recorder() -> (IoBus, Arc<Recorder>) {
        let mut bus = IoBus::new();
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
}
