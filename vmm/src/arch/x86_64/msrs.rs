//! The model-specific registers a vCPU gets before its first instruction.

use crate::hypervisor::VcpuOps;
use kvm_bindings::{kvm_msr_entry, Msrs};

use super::error::ArchError;

// MSR indices: Intel SDM Vol. 4, Table 2-2 "IA-32 Architectural MSRs".
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `IA32_STAR` (Intel SDM Vol. 4 §2.1, Table 2-2): bits 47:32 are the kernel CS selector
/// `syscall` loads (SS is that + 8).
pub const MSR_STAR: u32 = 0xc000_0081;
/// `IA32_LSTAR`: the 64-bit `syscall` entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast-string operations enabled.
const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled (Intel SDM Vol. 3A §12.11.2.1).
const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back (Intel SDM Vol. 3A Table 12-8).
const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// The boot MSR values: syscall MSRs cleared, TSC at 0, fast strings, write-back by default.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs; an MSR KVM refuses is an error naming it.
pub fn set_boot_msrs(vcpu: &dyn VcpuOps, id: u8) -> Result<(), ArchError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|e| ArchError::Cpuid {
        vcpu: id,
        what: format!("MSR list: {e:?}"),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| ArchError::Kvm {
        vcpu: id,
        what: "KVM_SET_MSRS",
        source,
    })?;
    if set != entries.len() {
        return Err(ArchError::Msrs {
            vcpu: id,
            set,
            total: entries.len(),
            msr: entries[set].index,
        });
    }
    Ok(())
}
