//! Starting a vCPU directly in 64-bit mode: GDT, identity page tables with 2 MiB pages (this
//! host's KVM offers no 1 GiB guest pages), control registers, EFER and segment registers.

use crate::hypervisor::VcpuOps;
use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::error::ArchError;
use super::gdt::{self, BOOT_CS, BOOT_DS, BOOT_TSS};
use super::regs::*;

/// Page-table entry bits (Intel SDM Vol. 3A §4.5, Tables 4-15..4-18).
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
/// PS bit in a page-directory entry: the entry maps a 2 MiB page.
const PDE_PAGE_SIZE: u64 = 1 << 7;
const PAGE_SIZE: u64 = 0x1000;
const SZ_2M: u64 = 2 << 20;
const SZ_1G: u64 = 1 << 30;
/// Entries per table page.
const ENTRIES: u64 = 512;

/// Where and how a vCPU enters 64-bit mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongModeConfig {
    /// Guest-physical address of the PML4; the PDPT and page directories follow it
    /// ([`page_table_bytes`] bytes in all, page aligned).
    pub pml4_gpa: u64,
    /// Bytes of guest-physical space identity-mapped from 0 (rounded up to 2 MiB).
    pub identity_map_bytes: u64,
    /// Guest-physical address of the GDT ([`GDT_BYTES`] bytes).
    pub gdt_gpa: u64,
    /// First instruction.
    pub entry: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// Initial RSI (Linux: the boot_params address).
    pub rsi: u64,
    /// Initial RDI.
    pub rdi: u64,
}

/// Bytes the GDT takes.
pub const GDT_BYTES: u64 = 5 * 8;

/// Bytes of page tables (PML4 + PDPT + one page directory per GiB) for an identity map.
pub fn page_table_bytes(identity_map_bytes: u64) -> u64 {
    (2 + identity_map_bytes.div_ceil(SZ_1G)) * PAGE_SIZE
}

fn write_u64(
    mem: &GuestMemoryMmap,
    gpa: u64,
    val: u64,
    what: &'static str,
) -> Result<(), ArchError> {
    mem.write_obj(val, GuestAddress(gpa))
        .map_err(|source| ArchError::GuestWrite { what, gpa, source })
}

/// Writes identity page tables at `pml4_gpa` mapping `[0, bytes)` with 2 MiB pages.
pub fn write_identity_tables(
    mem: &GuestMemoryMmap,
    pml4_gpa: u64,
    bytes: u64,
) -> Result<(), ArchError> {
    let gibs = bytes.div_ceil(SZ_1G).max(1);
    if gibs > ENTRIES {
        return Err(ArchError::IdentityMapTooLarge(bytes));
    }
    let pdpt = pml4_gpa + PAGE_SIZE;
    let pd_base = pdpt + PAGE_SIZE;
    let zero = vec![0u8; page_table_bytes(bytes) as usize];
    mem.write_slice(&zero, GuestAddress(pml4_gpa))
        .map_err(|source| ArchError::GuestWrite {
            what: "page tables",
            gpa: pml4_gpa,
            source,
        })?;
    write_u64(mem, pml4_gpa, pdpt | PTE_PRESENT | PTE_WRITABLE, "PML4")?;
    let pages_2m = bytes.div_ceil(SZ_2M);
    for g in 0..gibs {
        let pd = pd_base + g * PAGE_SIZE;
        write_u64(mem, pdpt + g * 8, pd | PTE_PRESENT | PTE_WRITABLE, "PDPT")?;
        let mut buf = Vec::with_capacity(ENTRIES as usize * 8);
        for i in 0..ENTRIES {
            let page = g * ENTRIES + i;
            let e = if page < pages_2m {
                (page * SZ_2M) | PTE_PRESENT | PTE_WRITABLE | PDE_PAGE_SIZE
            } else {
                0
            };
            buf.extend_from_slice(&e.to_le_bytes());
        }
        mem.write_slice(&buf, GuestAddress(pd))
            .map_err(|source| ArchError::GuestWrite {
                what: "page directory",
                gpa: pd,
                source,
            })?;
    }
    Ok(())
}

/// Writes the boot GDT at `gdt_gpa`.
pub fn write_gdt(mem: &GuestMemoryMmap, gdt_gpa: u64) -> Result<(), ArchError> {
    for (i, e) in gdt::boot_gdt().iter().enumerate() {
        write_u64(mem, gdt_gpa + i as u64 * 8, *e, "GDT")?;
    }
    Ok(())
}

/// Puts `vcpu` in 64-bit mode at `cfg.entry`: writes the GDT and identity tables (the same bytes
/// for every vCPU, so calling it per vCPU is fine), sets segments, CR0/CR3/CR4/EFER, the general
/// registers, and marks the vCPU runnable (an AP would otherwise wait for INIT/SIPI).
pub fn setup(
    mem: &GuestMemoryMmap,
    vcpu: &dyn VcpuOps,
    cfg: LongModeConfig,
) -> Result<(), ArchError> {
    let id = (cfg.rdi & 0xff) as u8;
    let kvm = |what: &'static str| {
        move |source| ArchError::Kvm {
            vcpu: id,
            what,
            source,
        }
    };
    write_gdt(mem, cfg.gdt_gpa)?;
    write_identity_tables(mem, cfg.pml4_gpa, cfg.identity_map_bytes)?;

    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let table = gdt::boot_gdt();
    let code = gdt::segment_from_entry(table[(BOOT_CS / 8) as usize], BOOT_CS);
    let data = gdt::segment_from_entry(table[(BOOT_DS / 8) as usize], BOOT_DS);
    let tss = gdt::segment_from_entry(table[(BOOT_TSS / 8) as usize], BOOT_TSS);
    sregs.gdt.base = cfg.gdt_gpa;
    sregs.gdt.limit = (GDT_BYTES - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = cfg.pml4_gpa;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_bindings::kvm_regs {
        rip: cfg.entry,
        rsp: cfg.rsp,
        rbp: cfg.rsp,
        rsi: cfg.rsi,
        rdi: cfg.rdi,
        rflags: RFLAGS_RESERVED_1,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm("KVM_SET_MP_STATE"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn identity_tables_map_2m_pages_over_the_range() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let bytes = (5u64 << 30) + SZ_2M; // crosses into a sixth GiB
        assert_eq!(page_table_bytes(bytes), 8 * PAGE_SIZE);
        write_identity_tables(&mem, 0x1000, bytes).unwrap();
        let rd = |gpa: u64| mem.read_obj::<u64>(GuestAddress(gpa)).unwrap();
        assert_eq!(rd(0x1000), 0x2000 | PTE_PRESENT | PTE_WRITABLE);
        for g in 0..6 {
            assert_eq!(rd(0x2000 + g * 8), (0x3000 + g * PAGE_SIZE) | 3);
        }
        assert_eq!(rd(0x2000 + 6 * 8), 0);
        assert_eq!(rd(0x3000), PTE_PRESENT | PTE_WRITABLE | PDE_PAGE_SIZE);
        assert_eq!(rd(0x3000 + 511 * 8), (511 * SZ_2M) | 0x83);
        // GiB 5 maps only its first 2 MiB page.
        let pd5 = 0x3000 + 5 * PAGE_SIZE;
        assert_eq!(rd(pd5), (5 << 30) | 0x83);
        assert_eq!(rd(pd5 + 8), 0);
    }

    #[test]
    fn identity_map_over_512g_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            write_identity_tables(&mem, 0x1000, 513 << 30),
            Err(ArchError::IdentityMapTooLarge(_))
        ));
    }
}
