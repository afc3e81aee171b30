//! The boot GDT: flat 64-bit code and data segments and a TSS descriptor, as the Linux 64-bit
//! boot protocol wants them (__BOOT_CS = 0x10, __BOOT_DS = 0x18; Documentation/arch/x86/boot.rst).

use kvm_bindings::kvm_segment;

/// Access/flags for a 64-bit code segment: G, L, P, DPL 0, S, type execute/read accessed
/// (Intel SDM Vol. 3A §3.4.5, Figure 3-8), packed as bits 55:52 and 47:40 of the descriptor.
const CODE64_FLAGS: u16 = 0xa09b;
/// Flat 4 GiB read/write data segment: G, D/B, P, DPL 0, S, type read/write accessed.
const DATA_FLAGS: u16 = 0xc093;
/// A 64-bit busy TSS (type 0xb), present; G set.
const TSS_FLAGS: u16 = 0x808b;

/// Selector of the boot code segment.
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment.
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS: u16 = 0x20;

/// Builds one segment descriptor from flags (bits 55:52 and 47:40), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, null, code, data, TSS.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// The KVM segment register value that loading `selector` with descriptor `entry` produces.
pub fn segment_from_entry(entry: u64, selector: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_architectural_encoding() {
        // The well-known encodings of flat 64-bit code and 32-bit data descriptors.
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let cs = segment_from_entry(boot_gdt()[2], BOOT_CS);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.s, cs.type_, cs.g),
            (1, 0, 1, 1, 0xb, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_entry(boot_gdt()[3], BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_, ds.unusable), (0, 1, 3, 0));
        let base = segment_from_entry(gdt_entry(DATA_FLAGS, 0x1234_5678, 0), 0);
        assert_eq!(base.base, 0x1234_5678);
    }
}
