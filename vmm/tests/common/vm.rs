//! The test VMs that run hand-assembled code: vCPUs put in 64-bit mode on the identity map at
//! CPL 0 (the boot path's `long_mode::setup`), and the guest structures such code needs.

use vm_memory::GuestMemoryMmap;
use vmm::arch::x86_64::{configure_vcpu, gdt, long_mode};
use vmm::hypervisor::{Vcpu, Vm};

/// Where `long_mode::setup` writes the identity page tables.
pub const PML4_GPA: u64 = 0x1000;
/// Where it writes the GDT.
pub const GDT_GPA: u64 = 0x500;
/// Where the tests that take interrupts or exceptions put their IDT.
pub const IDT_GPA: u64 = 0x8000;
/// Type and P of a 64-bit interrupt gate, DPL 0 (Intel SDM Vol. 3A §6.14.1).
pub const GATE_INTERRUPT_PRESENT: u8 = 0x8e;

/// vCPU `id` of `vm`, configured like the boot path's and in 64-bit mode at CPL 0: the first
/// `identity_bytes` of `mem` identity-mapped, RIP = `entry`, its own stack below 512 KiB,
/// RDI = `id`, RSI = `rsi`.
pub fn long_mode_vcpu(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    identity_bytes: u64,
    id: u8,
    entry: u64,
    rsi: u64,
) -> Vcpu {
    let fd = vm.create_vcpu(id).unwrap();
    configure_vcpu(vm, &fd, id).unwrap();
    let cfg = long_mode::LongModeConfig {
        pml4_gpa: PML4_GPA,
        identity_map_bytes: identity_bytes,
        gdt_gpa: GDT_GPA,
        entry,
        rsp: 0x8_0000 - u64::from(id) * 0x1000,
        rsi,
        rdi: u64::from(id),
    };
    long_mode::setup(mem, &fd, cfg).unwrap();
    fd
}

/// A 16-byte 64-bit interrupt gate to `handler` through the boot code segment.
pub fn idt_gate(handler: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&gdt::BOOT_CS.to_le_bytes());
    g[5] = GATE_INTERRUPT_PRESENT;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}
