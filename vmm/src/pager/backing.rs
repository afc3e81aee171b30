//! Where guest RAM lives on the host: GPA to host address and back, as stage2's [`Backing`].

use stage2::{Backing, PageSize, Perms, Resolved};

use crate::memory::{BackingKind, RamRegion};

const SZ_2M: u64 = 2 << 20;
const SZ_1G: u64 = 1 << 30;

/// The stage2 page size of a RAM backing (THP is paged at 4 KiB: userfaultfd fills 4 KiB pages).
pub fn backing_page_size(kind: BackingKind) -> PageSize {
    match kind.page_size() {
        SZ_1G => PageSize::Size1G,
        SZ_2M => PageSize::Size2M,
        _ => PageSize::Size4K,
    }
}

/// The host view of guest RAM that stage2 asks on a fault: every RAM GPA is backed by the
/// naturally aligned host block of the backing's page size, readable, writable, executable.
pub struct GuestRamBacking {
    regions: Vec<RamRegion>,
    page: PageSize,
}

impl GuestRamBacking {
    /// A backing over `regions` (sorted by GPA) with host pages of `page`.
    pub fn new(mut regions: Vec<RamRegion>, page: PageSize) -> Self {
        regions.sort_by_key(|r| r.gpa);
        GuestRamBacking { regions, page }
    }

    /// The RAM regions, by GPA.
    pub(super) fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The region holding `gpa`.
    pub(super) fn region_of_gpa(&self, gpa: u64) -> Option<&RamRegion> {
        let i = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (gpa - r.gpa < r.len).then_some(r)
    }

    fn region_of_host(&self, hva: u64) -> Option<&RamRegion> {
        self.regions
            .iter()
            .find(|r| hva >= r.host_addr && hva - r.host_addr < r.len)
    }

    /// Host address of `gpa`, if RAM.
    pub fn gpa_to_host(&self, gpa: u64) -> Option<u64> {
        self.region_of_gpa(gpa).map(|r| r.host_addr + (gpa - r.gpa))
    }

    /// GPA of host address `hva`, if RAM.
    pub fn host_to_gpa(&self, hva: u64) -> Option<u64> {
        self.region_of_host(hva)
            .map(|r| r.gpa + (hva - r.host_addr))
    }
}

impl Backing for GuestRamBacking {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        let r = self.region_of_gpa(gpa)?;
        let size = self.page.bytes();
        let block = gpa & !(size - 1);
        Some(Resolved {
            frame: r.host_addr + (block - r.gpa),
            max_size: self.page,
            perms: Perms::RWX,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestRamBacking {
        GuestRamBacking::new(
            vec![
                RamRegion {
                    gpa: 4 << 30,
                    len: 1 << 30,
                    host_addr: 0x7f00_0000_0000,
                },
                RamRegion {
                    gpa: 0,
                    len: 3 << 30,
                    host_addr: 0x7e00_0000_0000,
                },
            ],
            PageSize::Size2M,
        )
    }

    #[test]
    fn backing_resolves_the_naturally_aligned_host_block() {
        let b = two_regions();
        let r = b.resolve((4 << 30) + 0x20_1234).unwrap();
        assert_eq!(r.frame, 0x7f00_0020_0000);
        assert_eq!(r.max_size, PageSize::Size2M);
        assert_eq!(r.perms, Perms::RWX);
        assert_eq!(b.resolve(0x1234).unwrap().frame, 0x7e00_0000_0000);
        // The 32-bit hole and past the end are not RAM: stage2 denies.
        assert!(b.resolve(3 << 30).is_none());
        assert!(b.resolve((3 << 30) + (512 << 20)).is_none());
        assert!(b.resolve(5 << 30).is_none());
    }

    #[test]
    fn host_and_guest_addresses_translate_both_ways() {
        let b = two_regions();
        assert_eq!(b.gpa_to_host((4 << 30) + 5), Some(0x7f00_0000_0005));
        assert_eq!(b.host_to_gpa(0x7f00_0000_0005), Some((4 << 30) + 5));
        assert_eq!(b.host_to_gpa(0x7e00_0000_0000 + (3 << 30)), None);
        assert_eq!(b.gpa_to_host(u64::MAX), None);
    }

    #[test]
    fn backing_page_size_follows_the_ram_backing() {
        assert_eq!(backing_page_size(BackingKind::Small), PageSize::Size4K);
        assert_eq!(backing_page_size(BackingKind::Thp), PageSize::Size4K);
        assert_eq!(backing_page_size(BackingKind::Hugetlb2M), PageSize::Size2M);
        assert_eq!(backing_page_size(BackingKind::Hugetlb1G), PageSize::Size1G);
    }
}
