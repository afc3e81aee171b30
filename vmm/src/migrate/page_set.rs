//! A set of host pages of guest RAM, one bit each: the pages a postcopy destination is owed.

use stage2::Bitmap;

use super::stream::PAGE_SIZE;
use crate::dirty::DirtyBitmap;

const PAGE: u64 = PAGE_SIZE as u64;

/// A set of host pages of guest RAM, one bit each: a [`Bitmap`] of host pages per region.
///
/// Bit `i` of region `r`'s bitmap is the host page at `regions[r].0 + i * host_page`; the set
/// keeps its own count so that [`len`](Self::len) and the empty checks cost nothing.
#[derive(Clone, Debug)]
pub struct PageSet {
    regions: Vec<(u64, u64)>,
    shift: u32,
    maps: Vec<Bitmap>,
    count: u64,
}

impl PageSet {
    /// An empty set over `regions` (gpa, len) in host pages of `host_page` bytes.
    pub fn new(regions: &[(u64, u64)], host_page: u64) -> PageSet {
        PageSet {
            regions: regions.to_vec(),
            shift: host_page.trailing_zeros(),
            maps: regions
                .iter()
                .map(|&(gpa, len)| Bitmap::with_page_size(gpa..gpa + len, host_page))
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
        if self.maps[r].is_set_index(i) {
            return false;
        }
        self.maps[r].set_index(i);
        self.count += 1;
        true
    }

    /// Removes the host page holding `gpa`; false when it was not there.
    pub fn remove(&mut self, gpa: u64) -> bool {
        let Some((r, i)) = self.slot(gpa) else {
            return false;
        };
        if !self.maps[r].is_set_index(i) {
            return false;
        }
        self.maps[r].unset_index(i);
        self.count -= 1;
        true
    }

    /// Whether the host page holding `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        self.slot(gpa)
            .is_some_and(|(r, i)| self.maps[r].is_set_index(i))
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
            .zip(&self.maps)
            .flat_map(move |(&(g, _), map)| map.indices().map(move |i| g + (i << self.shift)))
    }

    /// Adds every member of `other` (a set over the same regions and host page size).
    pub fn union_with(&mut self, other: &PageSet) {
        self.combine(other, Bitmap::merge);
    }

    /// Removes every member of `other` (a set over the same regions and host page size).
    pub fn remove_all(&mut self, other: &PageSet) {
        self.combine(other, Bitmap::subtract);
    }

    /// Applies `f` to each region's bitmap and `other`'s, then counts again.
    fn combine(&mut self, other: &PageSet, f: impl Fn(&mut Bitmap, &Bitmap)) {
        assert!(
            self.regions == other.regions && self.shift == other.shift,
            "page sets over different layouts"
        );
        for (mine, theirs) in self.maps.iter_mut().zip(&other.maps) {
            f(mine, theirs);
        }
        self.count = self.maps.iter().map(Bitmap::count).sum();
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

/// PageSet against a model (a sorted set of host page addresses) over random operations.
#[cfg(test)]
mod model {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(usize, u64),
        Remove(usize, u64),
        Contains(usize, u64),
        AnyIn(usize, u64, u64),
        Union(Vec<(usize, u64)>),
        RemoveAll(Vec<(usize, u64)>),
    }

    /// Guest RAM layouts as `GuestRam` makes them: regions at 0 and 4 GiB, whole host pages.
    const LAYOUTS: &[(&[(u64, u64)], u64)] = &[
        (&[(0, 1 << 20), (4 << 30, 256 << 10)], 4096),
        (&[(0, 64 << 20), (4 << 30, 16 << 20)], 2 << 20),
        (&[(0, 3 << 30), (4 << 30, 2 << 30)], 1 << 30),
    ];

    /// An address in region `r` or just past it (`r` past the regions: anywhere).
    fn gpa(layout: usize, r: usize, off: u64) -> u64 {
        let (regions, page) = LAYOUTS[layout];
        match regions.get(r) {
            Some(&(g, l)) => g + off % (l + 2 * page),
            None => off % (8 << 30),
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        let at = (0usize..3, any::<u64>());
        prop_oneof![
            4 => at.clone().prop_map(|(r, o)| Op::Insert(r, o)),
            2 => at.clone().prop_map(|(r, o)| Op::Remove(r, o)),
            2 => at.clone().prop_map(|(r, o)| Op::Contains(r, o)),
            2 => (0usize..3, any::<u64>(), 0u64..(1 << 31))
                .prop_map(|(r, o, l)| Op::AnyIn(r, o, l)),
            1 => prop::collection::vec(at.clone(), 0..40).prop_map(Op::Union),
            1 => prop::collection::vec(at, 0..40).prop_map(Op::RemoveAll),
        ]
    }

    /// The model: the start addresses of the host pages in the set.
    struct Model {
        regions: &'static [(u64, u64)],
        page: u64,
        pages: BTreeSet<u64>,
    }

    impl Model {
        /// The host page holding `gpa` and its region, if `gpa` is RAM.
        fn page_of(&self, gpa: u64) -> Option<(u64, usize)> {
            let r = self
                .regions
                .iter()
                .position(|&(g, l)| gpa >= g && gpa - g < l)?;
            Some((gpa / self.page * self.page, r))
        }

        fn of(&self, addrs: &[u64]) -> BTreeSet<u64> {
            addrs
                .iter()
                .filter_map(|&a| self.page_of(a).map(|p| p.0))
                .collect()
        }

        fn runs(&self) -> Vec<(u64, u32)> {
            let per = (self.page / PAGE) as u32;
            let mut out: Vec<(u64, u32, usize)> = Vec::new();
            for &p in &self.pages {
                let r = self.page_of(p).unwrap().1;
                match out.last_mut() {
                    Some((g, n, rr))
                        if *rr == r
                            && *g + u64::from(*n) * PAGE == p
                            && n.checked_add(per).is_some() =>
                    {
                        *n += per
                    }
                    _ => out.push((p, per, r)),
                }
            }
            out.into_iter().map(|(g, n, _)| (g, n)).collect()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn page_set_behaves_like_a_set_of_host_pages(
            layout in 0..LAYOUTS.len(),
            ops in prop::collection::vec(op(), 1..120),
        ) {
            let (regions, page) = LAYOUTS[layout];
            let mut set = PageSet::new(regions, page);
            let mut m = Model { regions, page, pages: BTreeSet::new() };
            for op in ops {
                match op {
                    Op::Insert(r, o) => {
                        let g = gpa(layout, r, o);
                        let want = m.page_of(g).is_some_and(|(p, _)| m.pages.insert(p));
                        prop_assert_eq!(set.insert(g), want);
                    }
                    Op::Remove(r, o) => {
                        let g = gpa(layout, r, o);
                        let want = m.page_of(g).is_some_and(|(p, _)| m.pages.remove(&p));
                        prop_assert_eq!(set.remove(g), want);
                    }
                    Op::Contains(r, o) => {
                        let g = gpa(layout, r, o);
                        let want = m.page_of(g).is_some_and(|(p, _)| m.pages.contains(&p));
                        prop_assert_eq!(set.contains(g), want);
                    }
                    Op::AnyIn(r, o, l) => {
                        let g = gpa(layout, r, o);
                        let end = g.saturating_add(l);
                        let want = l > 0 && m.pages.iter().any(|&p| p < end && p + page > g);
                        prop_assert_eq!(set.any_in(g, l), want);
                    }
                    Op::Union(at) => {
                        let addrs: Vec<u64> = at.iter().map(|&(r, o)| gpa(layout, r, o)).collect();
                        let mut other = PageSet::new(regions, page);
                        addrs.iter().for_each(|&a| { other.insert(a); });
                        set.union_with(&other);
                        m.pages.extend(m.of(&addrs));
                    }
                    Op::RemoveAll(at) => {
                        let addrs: Vec<u64> = at.iter().map(|&(r, o)| gpa(layout, r, o)).collect();
                        let mut other = PageSet::new(regions, page);
                        addrs.iter().for_each(|&a| { other.insert(a); });
                        set.remove_all(&other);
                        let gone = m.of(&addrs);
                        m.pages.retain(|p| !gone.contains(p));
                    }
                }
                prop_assert_eq!(set.len(), m.pages.len() as u64);
                prop_assert_eq!(set.is_empty(), m.pages.is_empty());
                prop_assert_eq!(set.iter().collect::<Vec<_>>(), m.pages.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(set.runs(), m.runs());
            }
        }
    }
}
