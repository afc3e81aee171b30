//! x86-64 register bits and the FPU / local APIC set-up of a fresh vCPU.

use crate::hypervisor::VcpuOps;
use kvm_bindings::kvm_fpu;

use super::error::ArchError;

/// CR0.PE, protection enable (Intel SDM Vol. 3A §2.5).
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.MP, monitor coprocessor.
pub const X86_CR0_MP: u64 = 1 << 1;
/// CR0.ET, extension type (hard-wired to 1).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.NE, native x87 error reporting.
pub const X86_CR0_NE: u64 = 1 << 5;
/// CR0.PG, paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE, physical address extension (Intel SDM Vol. 3A §2.5).
pub const X86_CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR, OS supports FXSAVE/FXRSTOR and SSE.
pub const X86_CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT, OS handles SIMD floating-point exceptions.
pub const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
/// EFER.LME, long mode enable (Intel SDM Vol. 3A §2.2.1).
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA, long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always 1 (Intel SDM Vol. 1 §3.4.3).
pub const RFLAGS_RESERVED_1: u64 = 1 << 1;

/// x87 control word after FNINIT (Intel SDM Vol. 1 §8.1.5): all exceptions masked.
const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR after reset (Intel SDM Vol. 1 §10.2.3): all SIMD exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Local APIC register offsets (Intel SDM Vol. 3A §11.4.1, Table 11-1).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery mode field, bits 10:8 (Intel SDM Vol. 3A §11.5.1).
const APIC_LVT_DELIVERY_MASK: u32 = 0x7 << 8;
const APIC_MODE_NMI: u32 = 0x4 << 8;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;

/// Sets the x87/SSE state a CPU has after FNINIT.
pub fn set_fpu(vcpu: &dyn VcpuOps, id: u8) -> Result<(), ArchError> {
    let fpu = kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| ArchError::Kvm {
        vcpu: id,
        what: "KVM_SET_FPU",
        source,
    })
}

fn apic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| regs[off + i] as u8);
    u32::from_le_bytes(b)
}

fn set_apic_reg(regs: &mut [std::os::raw::c_char], off: usize, val: u32) {
    for (i, b) in val.to_le_bytes().into_iter().enumerate() {
        regs[off + i] = b as std::os::raw::c_char;
    }
}

/// Wires LINT0 as ExtINT (the 8259 PIC) and LINT1 as NMI, as a PC's BIOS leaves them.
pub fn set_lint(vcpu: &dyn VcpuOps, id: u8) -> Result<(), ArchError> {
    let mut lapic = vcpu.get_lapic().map_err(|source| ArchError::Kvm {
        vcpu: id,
        what: "KVM_GET_LAPIC",
        source,
    })?;
    let lint0 = apic_reg(&lapic.regs, APIC_LVT_LINT0);
    set_apic_reg(
        &mut lapic.regs,
        APIC_LVT_LINT0,
        (lint0 & !APIC_LVT_DELIVERY_MASK) | APIC_MODE_EXTINT,
    );
    let lint1 = apic_reg(&lapic.regs, APIC_LVT_LINT1);
    set_apic_reg(
        &mut lapic.regs,
        APIC_LVT_LINT1,
        (lint1 & !APIC_LVT_DELIVERY_MASK) | APIC_MODE_NMI,
    );
    vcpu.set_lapic(&lapic).map_err(|source| ArchError::Kvm {
        vcpu: id,
        what: "KVM_SET_LAPIC",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_register_round_trip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_apic_reg(&mut regs, APIC_LVT_LINT0, 0x1_0700);
        assert_eq!(apic_reg(&regs, APIC_LVT_LINT0), 0x1_0700);
        assert_eq!(regs[APIC_LVT_LINT0 + 1] as u8, 0x07);
    }
}
