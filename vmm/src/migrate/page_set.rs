//! A set of host pages of guest RAM, one bit each: the pages a postcopy destination is owed.

use super::stream::PAGE_SIZE;
use crate::dirty::DirtyBitmap;

const PAGE: u64 = PAGE_SIZE as u64;

/// A set of host pages of guest RAM, one bit each.
#[derive(Clone, Debug)]
pub struct PageSet {
    regions: Vec<(u64, u64)>,
    shift: u32,
    words: Vec<Vec<u64>>,
    count: u64,
}

impl PageSet {
    /// An empty set over `regions` (gpa, len) in host pages of `host_page` bytes.
    pub fn new(regions: &[(u64, u64)], host_page: u64) -> PageSet {
        let shift = host_page.trailing_zeros();
        PageSet {
            regions: regions.to_vec(),
            shift,
            words: regions
                .iter()
                .map(|(_, len)| vec![0; (len >> shift).div_ceil(64) as usize])
                .collect(),
            count: 0,
        }
    }

    /// Host page size.
    pub fn host_page(&self) -> u64 {
        1 << self.shift
    }

    fn slot(&self, gpa: u64) -> Option<(usize, u64)> {
        self.regions
            .iter()
            .position(|&(g, l)| gpa >= g && gpa - g < l)
            .map(|i| (i, (gpa - self.regions[i].0) >> self.shift))
    }

    /// Adds the host page holding `gpa`; false when it was there (or outside RAM).
    pub fn insert(&mut self, gpa: u64) -> bool {
        let Some((r, i)) = self.slot(gpa) else {
            return false;
        };
        let w = &mut self.words[r][(i / 64) as usize];
        let bit = 1 << (i % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.count += 1;
        true
    }

    /// Removes the host page holding `gpa`; false when it was not there.
    pub fn remove(&mut self, gpa: u64) -> bool {
        let Some((r, i)) = self.slot(gpa) else {
            return false;
        };
        let w = &mut self.words[r][(i / 64) as usize];
        let bit = 1 << (i % 64);
        if *w & bit == 0 {
            return false;
        }
        *w &= !bit;
        self.count -= 1;
        true
    }

    /// Whether the host page holding `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        self.slot(gpa)
            .is_some_and(|(r, i)| self.words[r][(i / 64) as usize] & (1 << (i % 64)) != 0)
    }

    /// Whether any host page overlapping `[gpa, gpa + len)` is in the set.
    pub fn any_in(&self, gpa: u64, len: u64) -> bool {
        if self.count == 0 || len == 0 {
            return false;
        }
        let end = gpa.saturating_add(len);
        let mut at = gpa >> self.shift << self.shift;
        while at < end {
            if self.contains(at) {
                return true;
            }
            at += self.host_page();
        }
        false
    }

    /// Host pages in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The host pages holding a dirty page of `bm`.
    pub fn of_dirty(bm: &DirtyBitmap, regions: &[(u64, u64)], host_page: u64) -> PageSet {
        let mut s = PageSet::new(regions, host_page);
        for gpa in bm.iter() {
            s.insert(gpa);
        }
        s
    }

    /// Start addresses of the host pages in the set, ascending per region.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions
            .iter()
            .zip(&self.words)
            .flat_map(move |(&(g, _), words)| {
                words.iter().enumerate().flat_map(move |(w, &bits)| {
                    (0..64u64)
                        .filter(move |b| bits & (1 << b) != 0)
                        .map(move |b| g + ((w as u64 * 64 + b) << self.shift))
                })
            })
    }

    /// Adds every member of `other` (a set over the same regions and host page size).
    pub fn union_with(&mut self, other: &PageSet) {
        self.combine(other, |a, b| a | b);
    }

    /// Removes every member of `other` (a set over the same regions and host page size).
    pub fn remove_all(&mut self, other: &PageSet) {
        self.combine(other, |a, b| a & !b);
    }

    fn combine(&mut self, other: &PageSet, f: impl Fn(u64, u64) -> u64) {
        assert!(
            self.regions == other.regions && self.shift == other.shift,
            "page sets over different layouts"
        );
        let mut count = 0;
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a = f(*a, *b);
                count += u64::from(a.count_ones());
            }
        }
        self.count = count;
    }

    /// Runs of consecutive host pages as (gpa, pages of 4 KiB), each at most `u32::MAX` pages.
    pub fn runs(&self) -> Vec<(u64, u32)> {
        let per = (self.host_page() / PAGE) as u32;
        let mut out: Vec<(u64, u32)> = Vec::new();
        for gpa in self.iter() {
            let region = self.slot(gpa).map(|s| s.0);
            match out.last_mut() {
                Some((g, n))
                    if *g + u64::from(*n) * PAGE == gpa
                        && n.checked_add(per).is_some()
                        && self.slot(*g).map(|s| s.0) == region =>
                {
                    *n += per
                }
                _ => out.push((gpa, per)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::SlotInfo;

    #[test]
    fn any_in_finds_an_owed_host_page_overlapping_a_range() {
        let regions = [(0u64, 8u64 << 20)];
        let mut s = PageSet::new(&regions, 2 << 20);
        assert!(!s.any_in(0, 8 << 20), "empty");
        s.insert(4 << 20);
        assert!(s.any_in((6 << 20) - 0x1000, 0x1000), "last 4K of the page");
        assert!(s.any_in(0, 8 << 20));
        assert!(!s.any_in(0, 4 << 20), "ends where the owed page starts");
        assert!(!s.any_in(6 << 20, 2 << 20));
        assert!(!s.any_in(4 << 20, 0), "empty range");
        s.remove(4 << 20);
        assert!(!s.any_in(0, 8 << 20));
    }

    #[test]
    fn page_set_counts_iterates_and_runs() {
        let regions = [(0u64, 8u64 << 20), (4 << 30, 4 << 20)];
        let mut s = PageSet::new(&regions, 2 << 20);
        assert!(s.insert(0x1000));
        assert!(!s.insert(0x1fff), "same 2 MiB page");
        assert!(s.insert(2 << 20));
        assert!(s.insert((4 << 30) + (3 << 20)));
        assert!(!s.insert(5 << 30), "outside RAM");
        assert_eq!(s.len(), 3);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![0, 2 << 20, (4 << 30) + (2 << 20)]
        );
        assert_eq!(s.runs(), vec![(0, 1024), ((4 << 30) + (2 << 20), 512)]);
        assert!(s.remove(0x10));
        assert!(!s.remove(0x10));
        assert!(!s.contains(0) && s.contains(2 << 20));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn union_and_removal_keep_members_and_count() {
        let regions = [(0u64, 1 << 20), (4 << 30, 1 << 20)];
        let mut a = PageSet::new(&regions, PAGE);
        let mut b = PageSet::new(&regions, PAGE);
        for p in [0u64, 3, 64, 200] {
            a.insert(p * PAGE);
        }
        for p in [3u64, 65, 255] {
            b.insert(p * PAGE);
        }
        b.insert(4 << 30);
        let mut u = a.clone();
        u.union_with(&b);
        assert_eq!(u.len(), 7);
        assert_eq!(
            u.iter().collect::<Vec<_>>(),
            [0u64, 3, 64, 65, 200, 255]
                .iter()
                .map(|p| p * PAGE)
                .chain([4 << 30])
                .collect::<Vec<_>>()
        );
        u.remove_all(&a);
        assert_eq!(u.len(), 3, "only b's pages outside a are left");
        assert_eq!(
            u.iter().collect::<Vec<_>>(),
            vec![65 * PAGE, 255 * PAGE, 4 << 30]
        );
        assert!(!u.contains(3 * PAGE));
    }

    #[test]
    fn owed_pages_are_the_host_pages_of_dirty_ones() {
        let slots = [SlotInfo {
            slot: 0,
            gpa: 0,
            len: 8 << 20,
            host_addr: 0,
        }];
        let mut bm = DirtyBitmap::empty(&slots);
        for gpa in [0x3000, 0x4000, (6 << 20) + 0x1000] {
            bm.set(gpa);
        }
        let four_k = PageSet::of_dirty(&bm, &[(0, 8 << 20)], PAGE);
        assert_eq!(four_k.runs(), vec![(0x3000, 2), ((6 << 20) + 0x1000, 1)]);
        let two_m = PageSet::of_dirty(&bm, &[(0, 8 << 20)], 2 << 20);
        assert_eq!(two_m.runs(), vec![(0, 512), (6 << 20, 512)]);
    }
}
