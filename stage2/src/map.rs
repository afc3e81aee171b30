//! Batched installs (the `set_ptes` idea): `map_range` maps consecutive pages with one walk and one
//! TLB flush; a batch cannot be opened inside another one on the same thread (checked in every
//! build, release included: one thread-local flag per batch).

use crate::format::Format;
use crate::stats::C;
use crate::sync::{MutexGuard, Ordering};
use crate::table::{Guard, TablePage};
use crate::tlb::Tlb;
use crate::types::{level_bytes, level_index, Error, PageSize, Perms, GPA_LIMIT};
use crate::walk::{flags, Ctx, Step, Visit, Visitor, Walked};
use crate::Stage2;

#[cfg(not(loom))]
thread_local! {
    /// Whether this thread has a batch open (the nesting check).
    static IN_BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// An open batch of installs: one TLB flush over everything it mapped, when it drops.
#[must_use = "the batch flushes when it drops"]
pub struct Batch<'a, F: Format, T: Tlb> {
    s2: &'a Stage2<F, T>,
    _global: Option<MutexGuard<'a, ()>>,
    flush_start: u64,
    flush_end: u64,
}

impl<F: Format, T: Tlb> Stage2<F, T> {
    /// Open a batch of installs. Panics if this thread already has one open: batches do not nest
    /// (seed 004: the generic `set_ptes` entered lazy MMU mode inside mremap's own lazy section
    /// and hit a kernel BUG on Xen). The check is one thread-local flag, so release builds keep it.
    pub fn batch(&self) -> Batch<'_, F, T> {
        #[cfg(not(loom))]
        {
            let nested = IN_BATCH.with(|b| b.replace(true));
            assert!(
                !nested,
                "stage2: a map batch was opened inside another batch on this thread; close the first one"
            );
        }
        Batch {
            s2: self,
            _global: self.global_guard(),
            flush_start: u64::MAX,
            flush_end: 0,
        }
    }

    /// Map `[gpa, gpa + len)` to `[frame, frame + len)` with `perms` in leaves of `size`, in one
    /// walk and one flush. Existing identical leaves are kept; a leaf of the same size with another
    /// output address or other permissions is replaced with break-before-make. Returns the number of
    /// entries written. Administrative: it does not take part in the invalidation handshake.
    pub fn map_range(
        &self,
        gpa: u64,
        len: u64,
        frame: u64,
        perms: Perms,
        size: PageSize,
    ) -> Result<usize, Error> {
        let mut b = self.batch();
        b.map(gpa, len, frame, perms, size)
    }

    /// [`Stage2::map_range`] for the empty entries only: a leaf already there (or one another
    /// thread is installing) is left as it is and not counted, whatever it maps. This is
    /// fault-around's rule: the neighbours of a fault are mapped where nothing is, and a
    /// neighbour another fault mapped meanwhile, perhaps with fewer permissions, keeps its
    /// entry (replacing it would count one page as installed twice). A larger block or a
    /// table in the way is still an error.
    pub fn map_range_absent(
        &self,
        gpa: u64,
        len: u64,
        frame: u64,
        perms: Perms,
        size: PageSize,
    ) -> Result<usize, Error> {
        let mut b = self.batch();
        b.map_absent(gpa, len, frame, perms, size)
    }
}

/// The map visitor: descend (creating tables) to the target level, install there.
struct MapV {
    gpa: u64,
    frame: u64,
    level: usize,
    perms: Perms,
    /// Replace a different leaf at the target level (`map_range`), or keep any present entry
    /// (`map_range_absent`).
    replace: bool,
    written: usize,
    err: Option<Error>,
}

impl MapV {
    /// Build the leaf table under the empty entry `ctx` privately and link it. `Err(current)` if
    /// the entry changed first (the page is freed).
    fn prefill<F: Format, T: Tlb>(&self, s2: &Stage2<F, T>, ctx: &Ctx<'_>) -> Result<usize, u64> {
        let page = s2.reclaim.alloc();
        // SAFETY: freshly allocated, private to this thread until `install_table_page` publishes it.
        let t: &TablePage = unsafe { &*page };
        let csize = level_bytes(self.level);
        let first = ctx.addr.max(ctx.start);
        let last = (ctx.addr + ctx.size()).min(ctx.end);
        let mut n = 0;
        let mut a = first;
        while a < last {
            let leaf = s2
                .fmt
                .leaf(self.frame + (a - self.gpa), self.level, self.perms);
            // Relaxed: published by the SeqCst (Release) CAS that links the page.
            t.entries[level_index(a, self.level)].store(leaf, Ordering::Relaxed);
            n += 1;
            a += csize;
        }
        s2.install_table_page(ctx.slot, page).map(|_| n)
    }
}

impl<F: Format, T: Tlb> Visitor<F, T> for MapV {
    const FLAGS: u8 = flags::LEAF | flags::TABLE_PRE;

    fn visit(&mut self, s2: &Stage2<F, T>, _g: &Guard, _k: Visit, ctx: &mut Ctx<'_>) -> Step {
        let mut old = ctx.old;
        loop {
            if s2.fmt.is_table(old, ctx.level) {
                if ctx.level >= self.level {
                    self.err = Some(Error::Conflict {
                        gpa: ctx.addr.max(ctx.start),
                        what: "a table of smaller mappings",
                    });
                    return Step::Pause;
                }
                ctx.old = old;
                return Step::Continue;
            }
            if !self.replace && ctx.level == self.level && old != 0 {
                // Present, or being installed by another thread: theirs.
                return Step::Continue;
            }
            if s2.fmt.is_locked(old) {
                self.err = Some(Error::Busy { gpa: ctx.addr });
                return Step::Pause;
            }
            if ctx.level + 1 == self.level && old == 0 {
                // The leaf table is missing: fill a private page with every leaf of the range it
                // covers, then publish it with one CAS (nobody can see it before). The walker does
                // not descend (ctx.old stays empty): the subtree is complete.
                match self.prefill(s2, ctx) {
                    Ok(n) => {
                        self.written += n;
                        return Step::Continue;
                    }
                    Err(cur) => {
                        old = cur;
                        continue;
                    }
                }
            }
            if ctx.level < self.level {
                if old != 0 {
                    self.err = Some(Error::Conflict {
                        gpa: ctx.addr.max(ctx.start),
                        what: "a larger block",
                    });
                    return Step::Pause;
                }
                match s2.install_table(ctx.slot) {
                    Ok(t) => old = t,
                    Err(cur) => old = cur,
                }
                continue;
            }
            let oa = self.frame + (ctx.addr - self.gpa);
            let new = s2.fmt.leaf(oa, ctx.level, self.perms);
            if old == new {
                return Step::Continue;
            }
            if old == 0 {
                match ctx
                    .slot
                    .compare_exchange(0, new, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => {
                        self.written += 1;
                        ctx.old = new;
                        return Step::Continue;
                    }
                    Err(cur) => {
                        old = cur;
                        continue;
                    }
                }
            }
            // A different leaf of the same size: break-before-make.
            if !s2.try_break(ctx.slot, old, ctx.level, ctx.addr) {
                old = ctx.slot.load(Ordering::SeqCst);
                continue;
            }
            if !s2.make(ctx.slot, new) {
                self.err = Some(Error::Busy { gpa: ctx.addr });
                return Step::Pause;
            }
            self.written += 1;
            ctx.old = new;
            return Step::Continue;
        }
    }
}

impl<F: Format, T: Tlb> Batch<'_, F, T> {
    /// Map one range into the batch (see [`Stage2::map_range`]).
    pub fn map(
        &mut self,
        gpa: u64,
        len: u64,
        frame: u64,
        perms: Perms,
        size: PageSize,
    ) -> Result<usize, Error> {
        self.map_with(gpa, len, frame, perms, size, true)
    }

    /// Map one range into the batch where nothing is mapped (see
    /// [`Stage2::map_range_absent`]).
    pub fn map_absent(
        &mut self,
        gpa: u64,
        len: u64,
        frame: u64,
        perms: Perms,
        size: PageSize,
    ) -> Result<usize, Error> {
        self.map_with(gpa, len, frame, perms, size, false)
    }

    fn map_with(
        &mut self,
        gpa: u64,
        len: u64,
        frame: u64,
        perms: Perms,
        size: PageSize,
        replace: bool,
    ) -> Result<usize, Error> {
        let align = size.bytes();
        for (what, value) in [("gpa", gpa), ("len", len), ("frame", frame)] {
            if value % align != 0 {
                return Err(Error::Misaligned {
                    what,
                    value,
                    size,
                    align,
                });
            }
        }
        let end = gpa.checked_add(len).filter(|&e| e <= GPA_LIMIT);
        let Some(end) = end else {
            return Err(Error::OutOfRange {
                start: gpa,
                end: gpa.wrapping_add(len),
            });
        };
        if len == 0 {
            return Ok(0);
        }
        let s2 = self.s2;
        let mut v = MapV {
            gpa,
            frame,
            level: size.level(),
            perms: perms.union(Perms::R),
            replace,
            written: 0,
            err: None,
        };
        // The epoch guard lives for the walk only.
        let r = s2.walk(gpa, end, &mut v, &s2.reclaim.pin());
        if v.written > 0 {
            // Counted once per call (every written entry is a new leaf at the target level).
            s2.stats.mapped(size.level(), v.written as u64, true);
            self.flush_start = self.flush_start.min(gpa);
            self.flush_end = self.flush_end.max(end);
            s2.stats.add(
                match size {
                    PageSize::Size4K => C::Install4K,
                    PageSize::Size2M => C::Install2M,
                    PageSize::Size1G => C::Install1G,
                },
                v.written as u64,
            );
        }
        match (v.err, r) {
            (Some(e), _) => Err(e),
            (None, Walked::Done) => Ok(v.written),
            (None, Walked::Paused(a)) => Err(Error::Busy { gpa: a }),
        }
    }
}

impl<F: Format, T: Tlb> Drop for Batch<'_, F, T> {
    fn drop(&mut self) {
        if self.flush_end > self.flush_start {
            // One flush for the whole batch (TLBs may hold invalid entries for the new pages).
            self.s2.flush_range(self.flush_start, self.flush_end);
        }
        #[cfg(not(loom))]
        {
            let _ = IN_BATCH.try_with(|b| b.set(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::testutil::engine;
    use crate::{Access, Arm64, Ept, Error, NoopTlb, PageSize, Perms, SoftTlb};

    #[test]
    fn map_range_is_one_walk_and_one_flush() {
        let tlb = Arc::new(SoftTlb::new(1));
        let s2 = engine(Ept, tlb.clone());
        assert_eq!(
            s2.map_range(
                0x20_0000,
                512 * 4096,
                0x8000_0000,
                Perms::RW,
                PageSize::Size4K
            ),
            Ok(512)
        );
        assert_eq!(tlb.flushes().range, 1);
        let t = s2
            .translate(0x20_0000 + 511 * 4096 + 5, Access::Write)
            .unwrap();
        assert_eq!(t.pa, 0x8000_0000 + 511 * 4096 + 5);
        // Mapping the same again writes nothing and does not flush.
        assert_eq!(
            s2.map_range(
                0x20_0000,
                512 * 4096,
                0x8000_0000,
                Perms::RW,
                PageSize::Size4K
            ),
            Ok(0)
        );
        assert_eq!(tlb.flushes().range, 1);
    }

    #[test]
    fn map_range_absent_keeps_present_leaves_and_counts_only_new_ones() {
        let tlb = Arc::new(SoftTlb::new(1));
        let s2 = engine(Ept, tlb.clone());
        // A fault mapped page 3 read-only, and page 5 elsewhere.
        s2.map_range(0x3000, 0x1000, 0x8000_3000, Perms::R, PageSize::Size4K)
            .unwrap();
        s2.map_range(0x5000, 0x1000, 0x9000_0000, Perms::RW, PageSize::Size4K)
            .unwrap();
        let before = s2.stats();
        assert_eq!(
            s2.map_range_absent(0, 0x8000, 0x8000_0000, Perms::RWX, PageSize::Size4K),
            Ok(6)
        );
        let after = s2.stats();
        assert_eq!(after.installs_4k - before.installs_4k, 6);
        assert_eq!(after.mapped_4k, 8);
        // The present leaves are as they were.
        assert!(
            s2.translate(0x3000, Access::Write).is_err(),
            "page 3 stays read-only"
        );
        assert_eq!(s2.translate(0x3000, Access::Read).unwrap().pa, 0x8000_3000);
        assert_eq!(s2.translate(0x5000, Access::Read).unwrap().pa, 0x9000_0000);
        // The new ones map as asked.
        assert_eq!(s2.translate(0x7004, Access::Write).unwrap().pa, 0x8000_7004);
        // Again: nothing is absent, nothing is written.
        assert_eq!(
            s2.map_range_absent(0, 0x8000, 0x8000_0000, Perms::RWX, PageSize::Size4K),
            Ok(0)
        );
        // map_range, by contrast, replaces the two that differ.
        assert_eq!(
            s2.map_range(0, 0x8000, 0x8000_0000, Perms::RWX, PageSize::Size4K),
            Ok(2)
        );
        // A larger block in the way is still an error.
        s2.map_range(0x20_0000, 0x20_0000, 0, Perms::RW, PageSize::Size2M)
            .unwrap();
        assert!(matches!(
            s2.map_range_absent(0x20_0000, 0x1000, 0, Perms::RW, PageSize::Size4K),
            Err(Error::Conflict { .. })
        ));
    }

    #[test]
    fn a_batch_maps_several_ranges_and_flushes_once() {
        let tlb = Arc::new(SoftTlb::new(1));
        let s2 = engine(Arm64::default(), tlb.clone());
        {
            let mut b = s2.batch();
            b.map(0, 0x40_0000, 0x4000_0000, Perms::RWX, PageSize::Size2M)
                .unwrap();
            b.map(0x40_0000, 0x1000, 0x9000, Perms::R, PageSize::Size4K)
                .unwrap();
            assert_eq!(tlb.flushes().range, 0);
        }
        assert_eq!(tlb.flushes().range, 1);
        assert_eq!(s2.stats().mapped_2m, 2);
        assert_eq!(s2.translate(0x40_0000, Access::Read).unwrap().pa, 0x9000);
    }

    #[test]
    #[should_panic(expected = "opened inside another batch")]
    fn nested_batches_assert() {
        let s2 = engine(Ept, NoopTlb);
        let _outer = s2.batch();
        let _inner = s2.batch();
    }

    #[test]
    fn batches_in_sequence_are_fine() {
        let s2 = engine(Ept, NoopTlb);
        drop(s2.batch());
        drop(s2.batch());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let s2 = engine(Ept, NoopTlb);
        let e = s2
            .map_range(0x1000, 0x20_0000, 0, Perms::RW, PageSize::Size2M)
            .unwrap_err();
        assert!(matches!(e, Error::Misaligned { what: "gpa", .. }));
        assert!(e.to_string().contains("not aligned to 2M"));
        s2.map_range(0, 0x20_0000, 0, Perms::RW, PageSize::Size2M)
            .unwrap();
        let e = s2
            .map_range(0x1000, 0x1000, 0, Perms::RW, PageSize::Size4K)
            .unwrap_err();
        assert!(matches!(e, Error::Conflict { .. }), "{e}");
        s2.map_range(0x40_0000, 0x1000, 0, Perms::RW, PageSize::Size4K)
            .unwrap();
        let e = s2
            .map_range(0x40_0000, 0x20_0000, 0, Perms::RW, PageSize::Size2M)
            .unwrap_err();
        assert!(matches!(e, Error::Conflict { .. }), "{e}");
        assert!(matches!(
            s2.map_range(crate::GPA_LIMIT, 0x1000, 0, Perms::R, PageSize::Size4K),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn remapping_with_other_frame_breaks_before_make() {
        let s2 = engine(Ept, NoopTlb);
        s2.map_range(0, 0x2000, 0x10_0000, Perms::R, PageSize::Size4K)
            .unwrap();
        assert_eq!(
            s2.map_range(0, 0x2000, 0x20_0000, Perms::RW, PageSize::Size4K),
            Ok(2)
        );
        let st = s2.stats();
        assert_eq!((st.bbms, st.mapped_4k), (2, 2));
        assert_eq!(s2.translate(0x1000, Access::Write).unwrap().pa, 0x20_1000);
    }
}
