//! Split (block -> table of smaller leaves mapping the same memory) and collapse (table of 512
//! contiguous equal leaves -> one block). Translation is the same before, during and after (during a
//! break-before-make the entry is briefly not present: a fault there answers `Retry`).

use std::ops::Range;

use crate::format::Format;
use crate::stats::C;
use crate::sync::{self, AtomicU64, Ordering};
use crate::table::{Guard, TablePage};
use crate::tlb::Tlb;
use crate::types::{level_bytes, PageSize, ENTRIES};
use crate::walk::{flags, Ctx, Step, Visit, Visitor};
use crate::Stage2;

impl<F: Format, T: Tlb> Stage2<F, T> {
    /// Split the block `old` at `level` (base `addr`) into a table of 512 leaves one level down,
    /// same output addresses, permissions, attributes and marks. Without break-before-make when the format
    /// allows it (EPT, ARM64 with FEAT_BBM level 2), otherwise break, flush, make. Returns the new
    /// table descriptor; `Err` if the entry changed under us (nothing was published).
    pub(crate) fn split_entry(
        &self,
        slot: &AtomicU64,
        old: u64,
        level: usize,
        addr: u64,
        _g: &Guard,
    ) -> Result<u64, ()> {
        debug_assert!(self.fmt.is_leaf(old, level) && level < 3);
        let child_level = level + 1;
        let csize = level_bytes(child_level);
        let oa = self.fmt.leaf_oa(old, level);
        let perms = self.fmt.leaf_perms(old);
        let attrs = self.fmt.attrs(old);
        let wp = self.fmt.is_dirty_wp(old);
        let page = self.reclaim.alloc();
        {
            // SAFETY: `page` is freshly allocated and private to this thread until published.
            let t: &TablePage = unsafe { &*page };
            for (i, e) in t.entries.iter().enumerate() {
                let leaf = self
                    .fmt
                    .leaf_with(oa + i as u64 * csize, child_level, perms, attrs);
                let c = self.fmt.with_dirty_wp(leaf, wp);
                // Relaxed: published by the SeqCst (Release) CAS below.
                e.store(c, Ordering::Relaxed);
            }
        }
        let new = self.fmt.table(page as u64);
        let published = if self.fmt.split_without_bbm() {
            let ok = slot
                .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            if ok {
                self.stats.mapped(level, 1, false);
            }
            ok
        } else {
            self.try_break(slot, old, level, addr) && self.make(slot, new)
        };
        if !published {
            // SAFETY: the page was never stored in a shared entry.
            unsafe { self.reclaim.free_unpublished(page) };
            return Err(());
        }
        self.stats.mapped(child_level, ENTRIES as u64, true);
        self.stats.inc(C::TablesLive);
        self.stats.inc(C::Split);
        Ok(new)
    }

    /// Split every block overlapping `range` down to leaves of `to` (eagerly, 1G -> 2M -> 4K).
    /// Returns the number of blocks split.
    pub fn split(&self, range: Range<u64>, to: PageSize) -> usize {
        let _g = self.global_guard();
        self.split_inner(range, to)
    }

    pub(crate) fn split_inner(&self, range: Range<u64>, to: PageSize) -> usize {
        let r = crate::invalidate::page_range(&range);
        let mut v = SplitV {
            to_level: to.level(),
            splits: 0,
        };
        let g = self.reclaim.pin();
        self.walk(r.start, r.end, &mut v, &g);
        v.splits
    }

    /// Collapse every table inside `range` whose 512 leaves map one aligned contiguous range with
    /// equal permissions and attributes back into one block (2 MiB, then 1 GiB). Skipped while dirty
    /// logging is on. Returns the number of tables collapsed; their pages are freed after a grace
    /// period.
    pub fn collapse(&self, range: Range<u64>) -> usize {
        let _g = self.global_guard();
        let r = crate::invalidate::page_range(&range);
        let _s = sync::lock(&self.structure);
        if self.dirty.enabled() {
            return 0;
        }
        let mut v = CollapseV { collapsed: 0 };
        let g = self.reclaim.pin();
        self.walk(r.start, r.end, &mut v, &g);
        v.collapsed
    }

    /// Try to collapse the table at `ctx` into a block. Caller holds the structure lock.
    fn collapse_one(&self, ctx: &mut Ctx<'_>, g: &Guard) -> bool {
        let level = ctx.level;
        if !(1..=2).contains(&level) || !ctx.covered() {
            return false;
        }
        let table_d = ctx.old;
        let child = self.next_table(table_d, g);
        let clevel = level + 1;
        let csize = level_bytes(clevel);
        let mut snap = [0u64; ENTRIES];
        for (i, e) in child.entries.iter().enumerate() {
            snap[i] = e.load(Ordering::SeqCst);
        }
        self.stats.add(C::EntriesRead, ENTRIES as u64);
        let Some(first) = self.mergeable(&snap, clevel, csize, level) else {
            return false;
        };
        // The block size changes: break-before-make on every format.
        if !self.try_break(ctx.slot, table_d, level, ctx.addr) {
            return false;
        }
        // Freeze the children: a thread that descended before the break may still update them in
        // the now unlinked page (relax a permission, split a block). Each child goes from the value
        // we read to the marker, so such an update fails and its thread looks again from the root
        // (and meets our marker or the block). Any child that changed since our read: thaw the
        // ones frozen so far and put the table back (no mapping changed).
        let locked = self.fmt.locked();
        let mut frozen = 0;
        for (e, &s) in child.entries.iter().zip(snap.iter()) {
            if e.compare_exchange(s, locked, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                break;
            }
            frozen += 1;
        }
        if frozen < ENTRIES {
            for (e, &s) in child.entries.iter().zip(snap.iter()).take(frozen) {
                e.store(s, Ordering::SeqCst);
            }
            let _ = self.make(ctx.slot, table_d);
            return false;
        }
        let block = self.fmt.with_dirty_wp(
            self.fmt.leaf_with(
                self.fmt.leaf_oa(first, clevel),
                level,
                self.fmt.leaf_perms(first),
                self.fmt.attrs(first),
            ),
            self.fmt.is_dirty_wp(first),
        );
        if !self.make(ctx.slot, block) {
            // Only a sweep steals markers and sweeps take the structure lock we hold; keep the
            // accounting right anyway: the table is unlinked, its leaves are gone.
            self.stats.mapped(clevel, ENTRIES as u64, false);
        } else {
            self.stats.mapped(clevel, ENTRIES as u64, false);
            self.stats.mapped(level, 1, true);
            ctx.old = block;
        }
        self.stats.sub(C::TablesLive, 1);
        self.stats.inc(C::Collapse);
        // SAFETY: we unlinked the page (our break replaced the only descriptor pointing to it).
        unsafe {
            self.reclaim
                .defer_free(g, self.fmt.table_addr(table_d) as *mut TablePage)
        };
        true
    }

    /// Whether `snap` (the children at `clevel`) can become one block at `level`: the first leaf.
    fn mergeable(
        &self,
        snap: &[u64; ENTRIES],
        clevel: usize,
        csize: u64,
        level: usize,
    ) -> Option<u64> {
        let first = snap[0];
        if !self.fmt.is_leaf(first, clevel) {
            return None;
        }
        let oa0 = self.fmt.leaf_oa(first, clevel);
        if oa0 & (level_bytes(level) - 1) != 0 {
            return None;
        }
        let perms = self.fmt.leaf_perms(first);
        let attrs = self.fmt.leaf_attrs(first);
        snap.iter()
            .enumerate()
            .all(|(i, &c)| {
                self.fmt.is_leaf(c, clevel)
                    && self.fmt.leaf_oa(c, clevel) == oa0 + i as u64 * csize
                    && self.fmt.leaf_perms(c) == perms
                    && self.fmt.leaf_attrs(c) == attrs
            })
            .then_some(first)
    }
}

struct SplitV {
    to_level: usize,
    splits: usize,
}

impl<F: Format, T: Tlb> Visitor<F, T> for SplitV {
    const FLAGS: u8 = flags::LEAF;

    fn visit(&mut self, s2: &Stage2<F, T>, g: &Guard, _k: Visit, ctx: &mut Ctx<'_>) -> Step {
        let mut old = ctx.old;
        for _ in 0..8 {
            if !s2.fmt.is_leaf(old, ctx.level) || ctx.level >= self.to_level {
                break;
            }
            match s2.split_entry(ctx.slot, old, ctx.level, ctx.addr, g) {
                Ok(t) => {
                    self.splits += 1;
                    old = t;
                    break;
                }
                Err(()) => old = ctx.slot.load(Ordering::SeqCst),
            }
        }
        ctx.old = old;
        Step::Continue
    }
}

struct CollapseV {
    collapsed: usize,
}

impl<F: Format, T: Tlb> Visitor<F, T> for CollapseV {
    const FLAGS: u8 = flags::TABLE_POST;

    fn visit(&mut self, s2: &Stage2<F, T>, g: &Guard, _k: Visit, ctx: &mut Ctx<'_>) -> Step {
        if s2.collapse_one(ctx, g) {
            self.collapsed += 1;
        }
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::{engine, engine_own_epoch};
    use crate::{Access, Arm64, Ept, Format, NoopTlb, PageSize, Perms, Stage2, Tlb};

    fn sample(s2: &Stage2<impl Format, impl Tlb>) -> Vec<Option<(u64, Perms)>> {
        (0..(1u64 << 30))
            .step_by(0x3_3000)
            .map(|g| s2.lookup(g).map(|t| (t.pa, t.perms)))
            .collect()
    }

    fn split_then_collapse<F: Format>(f: F, bbms_expected_per_split: u64) {
        let s2 = engine(f, NoopTlb);
        s2.map_range(0, 1 << 30, 1 << 40, Perms::RWX, PageSize::Size1G)
            .unwrap();
        let before = sample(&s2);
        assert_eq!(s2.split(0..1 << 30, PageSize::Size4K), 1 + 512);
        let st = s2.stats();
        assert_eq!(
            (st.mapped_1g, st.mapped_2m, st.mapped_4k),
            (0, 0, 512 * 512)
        );
        assert_eq!(st.bbms, bbms_expected_per_split * 513);
        assert_eq!(sample(&s2), before, "split changed a translation");
        assert_eq!(s2.live_table_pages(), 2 + 1 + 512);
        assert_eq!(s2.lookup(0x1234_5678).unwrap().size, PageSize::Size4K);

        assert_eq!(s2.collapse(0..1 << 30), 512 + 1);
        let st = s2.stats();
        assert_eq!((st.mapped_1g, st.mapped_2m, st.mapped_4k), (1, 0, 0));
        assert_eq!(sample(&s2), before, "collapse changed a translation");
        assert_eq!(s2.live_table_pages(), 2);
        assert_eq!(s2.count_reachable_tables(), 2);
        assert_eq!(s2.lookup(0x1234_5678).unwrap().size, PageSize::Size1G);
    }

    #[test]
    fn split_and_collapse_keep_translation_ept() {
        split_then_collapse(Ept, 0);
    }

    #[test]
    fn split_and_collapse_keep_translation_arm64_without_bbm2() {
        split_then_collapse(Arm64 { bbm_level2: false }, 1);
    }

    #[test]
    fn split_and_collapse_keep_translation_arm64_with_bbm2() {
        split_then_collapse(Arm64 { bbm_level2: true }, 0);
    }

    #[test]
    fn collapse_needs_equal_perms_contiguity_and_logging_off() {
        let s2 = engine(Ept, NoopTlb);
        s2.map_range(0, 0x20_0000, 0x4000_0000, Perms::RW, PageSize::Size4K)
            .unwrap();
        // One page with other permissions: no collapse.
        s2.map_range(0x5000, 0x1000, 0x4000_5000, Perms::R, PageSize::Size4K)
            .unwrap();
        assert_eq!(s2.collapse(0..0x20_0000), 0);
        s2.map_range(0x5000, 0x1000, 0x4000_5000, Perms::RW, PageSize::Size4K)
            .unwrap();
        // Not contiguous: no collapse.
        s2.map_range(0x6000, 0x1000, 0x9000_0000, Perms::RW, PageSize::Size4K)
            .unwrap();
        assert_eq!(s2.collapse(0..0x20_0000), 0);
        s2.map_range(0x6000, 0x1000, 0x4000_6000, Perms::RW, PageSize::Size4K)
            .unwrap();
        s2.dirty().enable(crate::SplitPolicy::Lazy);
        assert_eq!(s2.collapse(0..0x20_0000), 0, "dirty logging is on");
        s2.dirty().disable();
        // Pages are write-protected (RW withheld, marked) yet all equal: collapses as such.
        assert_eq!(s2.collapse(0..0x20_0000), 1);
        assert_eq!(
            s2.translate(0x1000, Access::Read).unwrap().size,
            PageSize::Size2M
        );
        assert_eq!(s2.stats().collapses, 1);
    }

    /// A block with attributes other than the default (written straight into its entry, as a VMM
    /// maps a device region) keeps them through a split and the collapse back.
    fn split_and_collapse_keep_attributes<F: Format>(f: F, attrs: F::Attrs) {
        let s2 = engine(f, NoopTlb);
        s2.map_range(0, 0x20_0000, 0x4000_0000, Perms::RW, PageSize::Size2M)
            .unwrap();
        {
            let g = s2.reclaim.pin();
            let e = s2.descend(0, 2, false, &g);
            let block = s2.fmt.leaf_with(0x4000_0000, 2, Perms::RW, attrs);
            e.slot.store(block, std::sync::atomic::Ordering::SeqCst);
        }
        assert_eq!(s2.split(0..0x20_0000, PageSize::Size4K), 1);
        for gpa in [0, 0x1000, 0x1f_f000] {
            let g = s2.reclaim.pin();
            let e = s2.descend(gpa, 3, false, &g);
            assert_eq!(e.level, 3);
            assert_eq!(s2.fmt.attrs(e.old), attrs, "4 KiB page at {gpa:#x}");
            assert_eq!(s2.fmt.leaf_oa(e.old, 3), 0x4000_0000 + gpa);
        }
        assert_eq!(s2.collapse(0..0x20_0000), 1);
        let g = s2.reclaim.pin();
        let e = s2.descend(0, 3, false, &g);
        assert_eq!(e.level, 2, "collapsed into a block");
        assert_eq!(s2.fmt.attrs(e.old), attrs);
        assert_eq!(s2.fmt.leaf_perms(e.old), Perms::RW);
    }

    #[test]
    fn split_and_collapse_keep_attributes_ept() {
        use crate::format::ept::MemType;
        split_and_collapse_keep_attributes(
            Ept,
            crate::EptAttrs {
                mem_type: MemType::Uncacheable,
                ignore_pat: true,
                suppress_ve: true,
                ..Default::default()
            },
        );
    }

    #[test]
    fn split_and_collapse_keep_attributes_arm64() {
        use crate::format::arm64::{DeviceType, MemAttr, Shareability};
        split_and_collapse_keep_attributes(
            Arm64 { bbm_level2: false },
            crate::S2Attrs {
                mem_attr: MemAttr::Device(DeviceType::NGnRE),
                shareability: Shareability::Non,
                ..Default::default()
            },
        );
    }

    #[test]
    fn collapsed_table_page_is_freed_after_grace_period() {
        let s2 = engine_own_epoch(Ept, NoopTlb);
        s2.map_range(0, 0x20_0000, 0x4000_0000, Perms::RW, PageSize::Size4K)
            .unwrap();
        let allocated = s2.stats().tables_allocated;
        assert_eq!(s2.collapse(0..0x20_0000), 1);
        for _ in 0..64 {
            s2.reclaim_deferred();
            if s2.stats().tables_pending_free == 0 {
                break;
            }
        }
        let st = s2.stats();
        assert_eq!(st.tables_pending_free, 0);
        // The page went back to the pool: still allocated, not live.
        assert_eq!(st.tables_allocated, allocated);
        assert_eq!(st.tables_live, 3);
    }
}
