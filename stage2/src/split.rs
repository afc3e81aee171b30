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
    /// same output addresses, permissions and marks. Without break-before-make when the format
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
        let wp = self.fmt.is_dirty_wp(old);
        let page = self.reclaim.alloc();
        {
            // SAFETY: `page` is freshly allocated and private to this thread until published.
            let t: &TablePage = unsafe { &*page };
            for (i, e) in t.entries.iter().enumerate() {
                let c = self
                    .fmt
                    .with_dirty_wp(self.fmt.leaf(oa + i as u64 * csize, child_level, perms), wp);
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
            snap[i] = self.read_counted(e);
        }
        let Some(first) = self.mergeable(&snap, clevel, csize, level) else {
            return false;
        };
        // The block size changes: break-before-make on every format.
        if !self.try_break(ctx.slot, table_d, level, ctx.addr) {
            return false;
        }
        // Children may have been relaxed between our read and the break: check again.
        let same = child
            .entries
            .iter()
            .zip(snap.iter())
            .all(|(e, s)| e.load(Ordering::SeqCst) == *s);
        if !same {
            // Put the table back (no mapping changed); the break already counted a BBM.
            let _ = self.make(ctx.slot, table_d);
            return false;
        }
        let block = self.fmt.with_dirty_wp(
            self.fmt.leaf(
                self.fmt.leaf_oa(first, clevel),
                level,
                self.fmt.leaf_perms(first),
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
