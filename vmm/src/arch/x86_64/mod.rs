//! x86-64 vCPU and platform set-up: CPUID, MSRs, registers, GDT, identity page tables for long
//! mode, the MP table, and `configure_vcpu` that every boot path calls.

pub mod acpi;
pub mod aml;
pub mod cpuid;
pub mod emulate;
pub mod gdt;
pub mod long_mode;
pub mod mptable;
pub mod msrs;
pub mod regs;

use crate::hypervisor::VcpuOps;

use crate::hypervisor::Vm;

/// Errors configuring a vCPU or writing platform tables.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {vcpu}: KVM {what} failed: {source}")]
    Kvm {
        /// vCPU id.
        vcpu: u8,
        /// The call.
        what: &'static str,
        /// errno.
        source: crate::hypervisor::Error,
    },
    /// KVM refused one of the boot MSRs.
    #[error("vCPU {vcpu}: KVM accepted {set} of {total} boot MSRs (refused MSR {msr:#x})")]
    Msrs {
        /// vCPU id.
        vcpu: u8,
        /// How many were set.
        set: usize,
        /// How many were asked.
        total: usize,
        /// The first refused index.
        msr: u32,
    },
    /// Writing a table into guest memory failed.
    #[error("cannot write {what} at guest address {gpa:#x}: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Where.
        gpa: u64,
        /// The vm-memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// The identity map asked for is larger than one PML4 entry (512 GiB) can map.
    #[error("identity map of {0:#x} bytes is larger than the 512 GiB one page-directory-pointer table maps")]
    IdentityMapTooLarge(u64),
    /// Too many CPUs for the MP table.
    #[error("{0} vCPUs do not fit the MP table (at most 254)")]
    TooManyCpus(u8),
    /// A CPUID table operation failed.
    #[error("vCPU {vcpu}: cannot build CPUID: {what}")]
    Cpuid {
        /// vCPU id.
        vcpu: u8,
        /// What went wrong.
        what: String,
    },
}

/// Gives vCPU `id` of `vm` its CPUID (filtered for the VM's vCPU count), boot MSRs, FPU state and
/// local APIC LINT0/LINT1 wiring. Both the Linux boot and the test-guest runner call this before
/// setting registers.
pub fn configure_vcpu(vm: &Vm, vcpu: &dyn VcpuOps, id: u8) -> Result<(), ArchError> {
    let cpuid = cpuid::filter(vm.supported_cpuid(), id, vm.cpus())
        .map_err(|what| ArchError::Cpuid { vcpu: id, what })?;
    vcpu.set_cpuid2(&cpuid).map_err(|source| ArchError::Kvm {
        vcpu: id,
        what: "KVM_SET_CPUID2",
        source,
    })?;
    msrs::set_boot_msrs(vcpu, id)?;
    regs::set_fpu(vcpu, id)?;
    regs::set_lint(vcpu, id)?;
    Ok(())
}
