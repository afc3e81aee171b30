//! x86-64 vCPU and platform set-up: CPUID, MSRs, registers, GDT, identity page tables for long
//! mode, the MP table, and `configure_vcpu` that every boot path calls.

pub mod acpi;
pub mod aml;
pub mod cpuid;
pub mod emulate;
mod error;
pub mod gdt;
pub mod long_mode;
pub mod mptable;
pub mod msrs;
pub mod regs;

use crate::hypervisor::{VcpuOps, Vm};

pub use error::ArchError;

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
