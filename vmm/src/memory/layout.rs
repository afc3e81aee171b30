//! Where guest RAM sits in guest-physical space: regions around the PCI hole, and the e820 map.

/// Start of the 32-bit PCI/MMIO hole: RAM above this guest-physical address is moved above 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the 32-bit hole (4 GiB): the second RAM region starts here.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// Start of the legacy EBDA/VGA/BIOS area (e820 "reserved", ACPI spec 6.5 §15 / the PC memory map).
pub const LEGACY_HOLE_START: u64 = 0x9_fc00;
/// End of the legacy area: the first megabyte ends here.
pub const LEGACY_HOLE_END: u64 = 0x10_0000;

/// One contiguous range of guest RAM and where it lives in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address of `gpa`.
    pub host_addr: u64,
}

/// e820 entry types (ACPI spec 6.5 §15.1, Table 15.1 "Address Range Types").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// AddressRangeMemory: usable RAM.
    Ram = 1,
    /// AddressRangeReserved.
    Reserved = 2,
}

/// One e820 map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Type,
}

/// The guest-physical ranges (gpa, len) that `size` bytes of RAM occupy.
pub fn layout(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut out = vec![(0, low)];
    if size > low {
        out.push((MMIO_HOLE_END, size - low));
    }
    out
}

/// The e820 map of `regions`: every byte of RAM, the legacy area below 1 MiB marked reserved.
pub(super) fn e820_for(regions: &[RamRegion]) -> Vec<E820Entry> {
    let mut out = Vec::new();
    for r in regions {
        let end = r.gpa + r.len;
        if r.gpa < LEGACY_HOLE_END {
            let low_end = end.min(LEGACY_HOLE_START);
            out.push(E820Entry {
                addr: r.gpa,
                size: low_end - r.gpa,
                kind: E820Type::Ram,
            });
            let resv_end = end.min(LEGACY_HOLE_END);
            if resv_end > LEGACY_HOLE_START {
                out.push(E820Entry {
                    addr: LEGACY_HOLE_START,
                    size: resv_end - LEGACY_HOLE_START,
                    kind: E820Type::Reserved,
                });
            }
            if end > LEGACY_HOLE_END {
                out.push(E820Entry {
                    addr: LEGACY_HOLE_END,
                    size: end - LEGACY_HOLE_END,
                    kind: E820Type::Ram,
                });
            }
        } else {
            out.push(E820Entry {
                addr: r.gpa,
                size: r.len,
                kind: E820Type::Ram,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_at_pci_hole() {
        assert_eq!(layout(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(layout(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(layout(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn e820_covers_all_ram_with_legacy_hole_reserved() {
        let regions: Vec<RamRegion> = layout(4 << 30)
            .into_iter()
            .map(|(gpa, len)| RamRegion {
                gpa,
                len,
                host_addr: 0,
            })
            .collect();
        let e = e820_for(&regions);
        let total: u64 = e.iter().map(|x| x.size).sum();
        assert_eq!(total, 4 << 30);
        let usable: u64 = e
            .iter()
            .filter(|x| x.kind == E820Type::Ram)
            .map(|x| x.size)
            .sum();
        assert_eq!(usable, (4 << 30) - (LEGACY_HOLE_END - LEGACY_HOLE_START));
        assert_eq!(
            e[1],
            E820Entry {
                addr: LEGACY_HOLE_START,
                size: 0x6_0400,
                kind: E820Type::Reserved
            }
        );
        assert_eq!(e[3].addr, 4 << 30);
    }
}
