//! Dirty logging: write-protect every leaf, record write faults at 4 KiB precision in a bitmap and
//! in per-vCPU rings, harvest and re-protect.
//!
//! No write between two harvests is lost. A write fault first publishes the writable entry, then
//! sets the page's bit. A harvest first clears the bits, then write-protects those pages, then
//! flushes the TLB. Whatever the interleaving, a write that lands after a harvest read its bit
//! either finds the page writable *and* its bit set again (the fault set it after publishing), or
//! finds it protected and faults (and sets the bit).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::AtomicPtr;
use std::sync::Mutex as StdMutex;

use crate::bitmap::{BitIter, Bitmap};
use crate::format::Format;
use crate::invalidate::page_range;
use crate::stats::C;
use crate::sync::{self, AtomicBool, AtomicU64, Ordering};
use crate::table::Guard;
use crate::tlb::Tlb;
use crate::types::{Perms, GPA_LIMIT, LEVELS};
use crate::walk::{flags, Ctx, Step, Visit, Visitor};
use crate::Stage2;

/// Bytes of guest-physical space one bitmap chunk covers (allocated on first dirty page).
#[cfg(not(loom))]
const CHUNK_SHIFT: u32 = 30;
#[cfg(loom)]
const CHUNK_SHIFT: u32 = 21;
const PAGES_PER_CHUNK: u64 = 1 << (CHUNK_SHIFT - 12);
const WORDS_PER_CHUNK: usize = (PAGES_PER_CHUNK / 64) as usize;

/// Whether enabling dirty logging splits blocks to 4 KiB at once or on the first write fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitPolicy {
    /// Split every block down to 4 KiB pages when logging is enabled.
    Eager,
    /// Split a block when a write fault hits it.
    Lazy,
}

struct Chunk {
    words: Box<[AtomicU64]>,
}

struct Ring {
    buf: VecDeque<u64>,
    /// Harvested, waiting for `ring_reset`.
    harvested: Vec<u64>,
    overflowed: bool,
}

/// The dirty-logging state.
pub(crate) struct DirtyState {
    enabled: AtomicBool,
    /// Lazily allocated bitmap chunks. The pointer itself is a plain allocation hand-off (std
    /// atomics even under loom); the bits inside are protocol state.
    chunks: Box<[AtomicPtr<Chunk>]>,
    rings: Box<[StdMutex<Ring>]>,
    ring_size: usize,
}

impl DirtyState {
    pub(crate) fn new(cfg: &crate::Config) -> Self {
        let limit = cfg.dirty_limit.min(GPA_LIMIT);
        let n = limit.div_ceil(1 << CHUNK_SHIFT) as usize;
        DirtyState {
            enabled: AtomicBool::new(false),
            chunks: (0..n)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            rings: (0..cfg.nr_vcpus)
                .map(|_| {
                    StdMutex::new(Ring {
                        buf: VecDeque::new(),
                        harvested: Vec::new(),
                        overflowed: false,
                    })
                })
                .collect(),
            ring_size: cfg.ring_size,
        }
    }

    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    fn chunk(&self, idx: usize, create: bool) -> Option<&Chunk> {
        let slot = self.chunks.get(idx)?;
        let p = slot.load(std::sync::atomic::Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: chunks are allocated once, published with Release, and freed only in Drop.
            return Some(unsafe { &*p });
        }
        if !create {
            return None;
        }
        let fresh = Box::into_raw(Box::new(Chunk {
            words: (0..WORDS_PER_CHUNK).map(|_| AtomicU64::new(0)).collect(),
        }));
        match slot.compare_exchange(
            std::ptr::null_mut(),
            fresh,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        ) {
            // SAFETY: we just published it; it lives until Drop.
            Ok(_) => Some(unsafe { &*fresh }),
            Err(cur) => {
                // SAFETY: `fresh` was never published.
                drop(unsafe { Box::from_raw(fresh) });
                // SAFETY: as for the first load.
                Some(unsafe { &*cur })
            }
        }
    }

    /// The word holding `gpa`'s bit and the bit's mask.
    fn word(&self, gpa: u64, create: bool) -> Option<(&AtomicU64, u64)> {
        let page = gpa >> 12;
        let chunk = self.chunk((gpa >> CHUNK_SHIFT) as usize, create)?;
        let in_chunk = page % PAGES_PER_CHUNK;
        Some((&chunk.words[(in_chunk / 64) as usize], 1 << (in_chunk % 64)))
    }

    fn ring(&self, vcpu: usize) -> Option<std::sync::MutexGuard<'_, Ring>> {
        self.rings.get(vcpu).map(|r| match r.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        })
    }
}

impl Drop for DirtyState {
    fn drop(&mut self) {
        for c in self.chunks.iter() {
            let p = c.load(std::sync::atomic::Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: exclusive access in Drop; allocated by `chunk` with Box.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

/// Dirty-logging operations of one engine (see [`Stage2::dirty`]).
pub struct DirtyLog<'a, F: Format, T: Tlb> {
    s2: &'a Stage2<F, T>,
}

impl<F: Format, T: Tlb> Stage2<F, T> {
    /// Dirty-logging operations.
    pub fn dirty(&self) -> DirtyLog<'_, F, T> {
        DirtyLog { s2: self }
    }

    /// Record a write to `[base, base + len)` by `vcpu`: bitmap first, then the ring (a full ring
    /// is reported; the bitmap keeps the page).
    pub(crate) fn mark_dirty(&self, base: u64, len: u64, vcpu: usize) {
        let mut ring = self.dirty.ring(vcpu);
        let mut gpa = base;
        while gpa < base + len {
            if let Some((w, bit)) = self.dirty.word(gpa, true) {
                // SeqCst: ordered after the publishing CAS, against a harvest's swap (module docs).
                w.fetch_or(bit, Ordering::SeqCst);
            }
            self.stats.inc(C::DirtyMarked);
            if let Some(r) = ring.as_mut() {
                if r.buf.len() < self.dirty.ring_size {
                    r.buf.push_back(gpa);
                } else {
                    r.overflowed = true;
                    self.stats.inc(C::RingFull);
                }
            }
            gpa += 4096;
        }
    }

    /// Write-protect the leaf mapping `gpa` for dirty logging (keep it mapped, withhold W, mark it).
    /// Markers and empty entries are left alone: whoever owns a marker publishes a write mapping
    /// only before it sets the dirty bit.
    fn write_protect_page(&self, gpa: u64, g: &Guard) {
        let f = self.descend(gpa, LEVELS - 1, false, g);
        let mut old = f.old;
        while self.fmt.is_leaf(old, f.level) && self.fmt.leaf_perms(old).contains(Perms::W) {
            let new = self.wp_value(old);
            match f
                .slot
                .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    self.stats.inc(C::WriteProtected);
                    break;
                }
                Err(now) => old = now,
            }
        }
    }

    fn wp_value(&self, old: u64) -> u64 {
        let p = self.fmt.leaf_perms(old).without(Perms::W);
        self.fmt.with_dirty_wp(self.fmt.with_perms(old, p), true)
    }

    /// The bits of `range` (only those also set in `sel`, if given); with `take`, clear them too
    /// (get + clear, one atomic per word).
    fn read_bits(&self, r: &Range<u64>, sel: Option<&Bitmap>, take: bool) -> Bitmap {
        let mut out = Bitmap::new(r.clone());
        let mut gpa = r.start;
        while gpa < r.end {
            let chunk_end = ((gpa >> CHUNK_SHIFT) + 1) << CHUNK_SHIFT;
            let Some((w, first_bit)) = self.dirty.word(gpa, false) else {
                gpa = chunk_end.min(r.end).max(gpa + 4096);
                continue;
            };
            // Bits of this word inside the range.
            let first = first_bit.trailing_zeros() as u64;
            let n = (64 - first).min((r.end - gpa) >> 12);
            let mut mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << first
            };
            if let Some(sel) = sel {
                let mut m = 0;
                for b in 0..n {
                    if sel.is_set(gpa + (b << 12)) {
                        m |= 1 << (first + b);
                    }
                }
                mask &= m;
            }
            let bits = if mask == 0 {
                0
            } else if take {
                w.fetch_and(!mask, Ordering::SeqCst) & mask
            } else {
                w.load(Ordering::SeqCst) & mask
            };
            for b in BitIter(bits) {
                out.set(gpa + ((b as u64 - first) << 12));
            }
            gpa += n << 12;
        }
        out
    }
}

impl<F: Format, T: Tlb> DirtyLog<'_, F, T> {
    /// Turn dirty logging on: new faults install 4 KiB pages, every writable leaf is write-protected
    /// (blocks split first with [`SplitPolicy::Eager`]), then one full TLB flush.
    pub fn enable(&self, policy: SplitPolicy) {
        let s2 = self.s2;
        let _g = s2.global_guard();
        s2.dirty.enabled.store(true, Ordering::SeqCst);
        // Faults that sized their mapping before this point retry.
        s2.inv.bump();
        if policy == SplitPolicy::Eager {
            let _s = sync::lock(&s2.structure);
            s2.split_inner(0..GPA_LIMIT, crate::PageSize::Size4K);
        }
        // The write-protect sweep over the whole space is the long one: budgeted and resumable
        // (structure lock and epoch guard held per budget; a leaf installed behind the sweep after
        // `enabled` was set is a 4 KiB page that is write-protected or faulted through the log).
        s2.walk_resumable(0, GPA_LIMIT, &mut WriteProtect, |_, _| {}, |_| {});
        s2.flush_all();
    }

    /// Turn dirty logging off. Write-protected leaves get W back on their next write fault.
    pub fn disable(&self) {
        let _g = self.s2.global_guard();
        self.s2.dirty.enabled.store(false, Ordering::SeqCst);
    }

    /// Whether dirty logging is on.
    pub fn is_enabled(&self) -> bool {
        self.s2.dirty.enabled()
    }

    /// The dirty pages of `range`, without clearing them.
    pub fn get_dirty_log(&self, range: Range<u64>) -> Bitmap {
        self.s2.read_bits(&page_range(&range), None, false)
    }

    /// Clear the pages set in `bitmap` within `range` and write-protect exactly those pages (bit
    /// first, then protection, then one flush). Returns how many were cleared.
    pub fn clear_dirty_log(&self, range: Range<u64>, bitmap: &Bitmap) -> u64 {
        let _g = self.s2.global_guard();
        let r = page_range(&range);
        let cleared = self.s2.read_bits(&r, Some(bitmap), true);
        self.protect(&r, &cleared);
        cleared.count()
    }

    /// Get and clear: the dirty pages of `range`, which are write-protected again before this
    /// returns (so the next write to each is recorded).
    pub fn harvest(&self, range: Range<u64>) -> Bitmap {
        let _g = self.s2.global_guard();
        let r = page_range(&range);
        let taken = self.s2.read_bits(&r, None, true);
        self.protect(&r, &taken);
        taken
    }

    fn protect(&self, r: &Range<u64>, pages: &Bitmap) {
        let n = pages.count();
        if n == 0 {
            return;
        }
        {
            let g = self.s2.reclaim.pin();
            if n * 16 >= pages.pages() {
                // Dense: one walk over the range beats a descent per page.
                self.s2
                    .walk(r.start, r.end, &mut ProtectPages { pages }, &g);
            } else {
                for gpa in pages.iter() {
                    self.s2.write_protect_page(gpa, &g);
                }
            }
        }
        self.s2.flush_range(r.start, r.end);
    }

    /// Take the pages `vcpu`'s ring recorded since the last harvest (they stay "harvested" until
    /// [`DirtyLog::ring_reset`] re-protects them; copy the pages after the reset).
    pub fn ring_harvest(&self, vcpu: usize) -> Vec<u64> {
        let Some(mut r) = self.s2.dirty.ring(vcpu) else {
            return Vec::new();
        };
        let got: Vec<u64> = r.buf.drain(..).collect();
        r.harvested.extend_from_slice(&got);
        got
    }

    /// Re-protect the pages harvested from `vcpu`'s ring (and clear their bitmap bits), then flush.
    /// Also clears the overflow flag. Returns how many pages were reset (0 for an unknown vCPU).
    pub fn ring_reset(&self, vcpu: usize) -> usize {
        let _g = self.s2.global_guard();
        let Some(mut r) = self.s2.dirty.ring(vcpu) else {
            return 0;
        };
        let pages = std::mem::take(&mut r.harvested);
        r.overflowed = false;
        drop(r);
        {
            let g = self.s2.reclaim.pin();
            for &gpa in &pages {
                if let Some((w, bit)) = self.s2.dirty.word(gpa, false) {
                    w.fetch_and(!bit, Ordering::SeqCst);
                }
                self.s2.write_protect_page(gpa, &g);
            }
        }
        if !pages.is_empty() {
            self.s2.flush_all();
        }
        pages.len()
    }

    /// Whether `vcpu`'s ring was full when a page was dirtied since the last reset (the bitmap has
    /// those pages: fall back to `harvest`).
    pub fn ring_overflowed(&self, vcpu: usize) -> bool {
        self.s2.dirty.ring(vcpu).is_some_and(|r| r.overflowed)
    }
}

/// Write-protect the leaves holding pages set in `pages` (markers and empty entries are left
/// alone, as in `write_protect_page`).
struct ProtectPages<'b> {
    pages: &'b Bitmap,
}

impl<F: Format, T: Tlb> Visitor<F, T> for ProtectPages<'_> {
    const FLAGS: u8 = flags::LEAF;

    fn visit(&mut self, s2: &Stage2<F, T>, _g: &Guard, _k: Visit, ctx: &mut Ctx<'_>) -> Step {
        if !s2.fmt.is_leaf(ctx.old, ctx.level) {
            return Step::Continue;
        }
        let first = ctx.addr.max(ctx.start);
        let last = (ctx.addr + ctx.size()).min(ctx.end);
        if !(first..last).step_by(4096).any(|p| self.pages.is_set(p)) {
            return Step::Continue;
        }
        let mut old = ctx.old;
        while s2.fmt.is_leaf(old, ctx.level) && s2.fmt.leaf_perms(old).contains(Perms::W) {
            match ctx.slot.compare_exchange(
                old,
                s2.wp_value(old),
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    s2.stats.inc(C::WriteProtected);
                    break;
                }
                Err(now) => old = now,
            }
        }
        if s2.fmt.is_table(old, ctx.level) {
            // Split under us: descend into the new table.
            ctx.old = old;
        }
        Step::Continue
    }
}

/// The enable sweep: every writable leaf loses W and gets the mark; markers are stolen (their
/// owners retry, so nothing writable appears behind the sweep).
struct WriteProtect;

impl<F: Format, T: Tlb> Visitor<F, T> for WriteProtect {
    const FLAGS: u8 = flags::LEAF;

    fn visit(&mut self, s2: &Stage2<F, T>, _g: &Guard, _k: Visit, ctx: &mut Ctx<'_>) -> Step {
        let mut old = ctx.old;
        loop {
            if s2.fmt.is_table(old, ctx.level) {
                ctx.old = old;
                return Step::Continue;
            }
            if s2.fmt.is_locked(old) {
                if s2.steal(ctx.slot) {
                    old = 0;
                    break;
                }
            } else if s2.fmt.is_leaf(old, ctx.level) && s2.fmt.leaf_perms(old).contains(Perms::W) {
                let new = s2.wp_value(old);
                if ctx
                    .slot
                    .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    s2.stats.inc(C::WriteProtected);
                    old = new;
                    break;
                }
            } else {
                break;
            }
            old = ctx.slot.load(Ordering::SeqCst);
        }
        ctx.old = old;
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{engine, Ram};
    use crate::{Access, Config, Ept, Fault, NoopTlb, Outcome, PageSize};

    fn wfault(gpa: u64, vcpu: usize) -> Fault {
        Fault {
            gpa,
            access: Access::Write,
            vcpu,
        }
    }

    #[test]
    fn enable_sweep_yields_and_protects_every_page() {
        let s2 = engine(Ept, NoopTlb);
        let pages = (64u64 << 20) >> 12;
        s2.map_range(0, 64 << 20, 1 << 40, Perms::RW, PageSize::Size4K)
            .unwrap();
        let before = s2.stats().yields;
        s2.dirty().enable(SplitPolicy::Lazy);
        let st = s2.stats();
        assert!(
            st.yields - before >= pages / 256,
            "{} yields over {pages} leaves",
            st.yields - before
        );
        assert_eq!(st.write_protected, pages);
        for gpa in (0..64u64 << 20).step_by(4096) {
            assert!(
                s2.translate(gpa, Access::Write).is_err(),
                "{gpa:#x} writable"
            );
            assert!(s2.translate(gpa, Access::Read).is_ok(), "{gpa:#x} unmapped");
        }
    }

    #[test]
    fn enable_protects_and_write_faults_record() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size2M, Perms::RW);
        s2.map_range(0, 0x40_0000, 1 << 40, Perms::RW, PageSize::Size2M)
            .unwrap();
        s2.dirty().enable(SplitPolicy::Eager);
        assert_eq!(s2.stats().mapped_4k, 1024);
        assert!(s2.translate(0x1000, Access::Write).is_err());
        assert!(s2.translate(0x1000, Access::Read).is_ok());
        assert_eq!(
            s2.handle_fault(wfault(0x3_1234, 1), &ram, s2.invalidate_seq()),
            Outcome::Relaxed {
                gpa: 0x3_1000,
                size: PageSize::Size4K
            }
        );
        assert!(s2.translate(0x3_1000, Access::Write).is_ok());
        let log = s2.dirty().get_dirty_log(0..0x40_0000);
        assert_eq!(log.iter().collect::<Vec<_>>(), vec![0x3_1000]);
        assert_eq!(s2.dirty().ring_harvest(1), vec![0x3_1000]);
        // Harvest: get + clear + re-protect.
        let h = s2.dirty().harvest(0..0x40_0000);
        assert_eq!(h.iter().collect::<Vec<_>>(), vec![0x3_1000]);
        assert!(s2.translate(0x3_1000, Access::Write).is_err());
        assert_eq!(s2.dirty().harvest(0..0x40_0000).count(), 0);
        // The next write is recorded again.
        assert!(matches!(
            s2.handle_fault(wfault(0x3_1000, 0), &ram, s2.invalidate_seq()),
            Outcome::Relaxed { .. }
        ));
        assert!(s2.dirty().harvest(0..0x40_0000).is_set(0x3_1000));
    }

    #[test]
    fn new_installs_under_logging_are_4k_and_dirty_on_write() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size1G, Perms::RW);
        s2.dirty().enable(SplitPolicy::Lazy);
        assert_eq!(
            s2.handle_fault(wfault(0x7000, 0), &ram, s2.invalidate_seq()),
            Outcome::Installed {
                gpa: 0x7000,
                size: PageSize::Size4K
            }
        );
        let read = Fault {
            access: Access::Read,
            ..wfault(0x8000, 0)
        };
        s2.handle_fault(read, &ram, s2.invalidate_seq());
        let log = s2.dirty().get_dirty_log(0..0x10000);
        assert_eq!(log.iter().collect::<Vec<_>>(), vec![0x7000]);
    }

    #[test]
    fn lazy_policy_splits_block_on_write_fault() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size2M, Perms::RW);
        assert!(matches!(
            s2.handle_fault(wfault(0x20_0000, 0), &ram, s2.invalidate_seq()),
            Outcome::Installed {
                size: PageSize::Size2M,
                ..
            }
        ));
        s2.dirty().enable(SplitPolicy::Lazy);
        assert_eq!(s2.stats().mapped_2m, 1, "lazy: not split yet");
        assert_eq!(
            s2.handle_fault(wfault(0x20_5000, 0), &ram, s2.invalidate_seq()),
            Outcome::Relaxed {
                gpa: 0x20_5000,
                size: PageSize::Size4K
            }
        );
        assert_eq!(s2.stats().splits, 1);
        assert!(s2.translate(0x20_5000, Access::Write).is_ok());
        assert!(s2.translate(0x20_6000, Access::Write).is_err());
        assert_eq!(s2.dirty().get_dirty_log(0..0x40_0000).count(), 1);
    }

    #[test]
    fn clear_reprotects_only_cleared_pages() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size4K, Perms::RW);
        s2.dirty().enable(SplitPolicy::Eager);
        for gpa in [0x1000, 0x2000, 0x3000] {
            s2.handle_fault(wfault(gpa, 0), &ram, s2.invalidate_seq());
        }
        let mut sel = Bitmap::new(0..0x10000);
        sel.set(0x2000);
        assert_eq!(s2.dirty().clear_dirty_log(0..0x10000, &sel), 1);
        assert!(s2.translate(0x2000, Access::Write).is_err());
        assert!(s2.translate(0x1000, Access::Write).is_ok());
        assert!(s2.translate(0x3000, Access::Write).is_ok());
        let left = s2.dirty().get_dirty_log(0..0x10000);
        assert_eq!(left.iter().collect::<Vec<_>>(), vec![0x1000, 0x3000]);
    }

    #[test]
    fn full_ring_is_reported_and_bitmap_keeps_the_pages() {
        let s2 = Stage2::new(
            Ept,
            NoopTlb,
            Config {
                nr_vcpus: 1,
                ring_size: 2,
                ..Config::default()
            },
        );
        let ram = Ram::new(PageSize::Size4K, Perms::RW);
        s2.dirty().enable(SplitPolicy::Eager);
        for gpa in [0x1000, 0x2000, 0x3000] {
            s2.handle_fault(wfault(gpa, 0), &ram, s2.invalidate_seq());
        }
        assert!(s2.dirty().ring_overflowed(0));
        assert_eq!(s2.stats().ring_full, 1);
        assert_eq!(s2.dirty().ring_harvest(0), vec![0x1000, 0x2000]);
        assert_eq!(s2.dirty().get_dirty_log(0..0x10000).count(), 3);
        assert_eq!(s2.dirty().ring_reset(0), 2);
        assert!(!s2.dirty().ring_overflowed(0));
        assert!(s2.translate(0x1000, Access::Write).is_err());
        assert!(
            s2.translate(0x3000, Access::Write).is_ok(),
            "not harvested from the ring"
        );
    }

    #[test]
    fn harvest_of_a_range_crossing_chunks_and_word_edges() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size4K, Perms::RW);
        s2.dirty().enable(SplitPolicy::Eager);
        let pages = [0x3fff_f000u64, 0x4000_0000, 0x4004_1000];
        for &gpa in &pages {
            s2.handle_fault(wfault(gpa, 0), &ram, s2.invalidate_seq());
        }
        let h = s2.dirty().harvest(0x3fff_e000..0x4004_2000);
        assert_eq!(h.iter().collect::<Vec<_>>(), pages.to_vec());
        assert_eq!(s2.dirty().harvest(0..1 << 34).count(), 0);
    }

    #[test]
    fn dense_harvest_protects_every_dirty_page_in_one_walk() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size2M, Perms::RW);
        s2.dirty().enable(SplitPolicy::Eager);
        for i in 0..512u64 {
            if i != 7 {
                s2.handle_fault(wfault(0x20_0000 + i * 4096, 0), &ram, s2.invalidate_seq());
            }
        }
        let reads = s2.stats().entries_read;
        let h = s2.dirty().harvest(0x20_0000..0x40_0000);
        assert_eq!(h.count(), 511);
        assert!(!h.is_set(0x20_7000));
        // One walk: root, 1G, 2M entries and 512 leaves.
        assert_eq!(s2.stats().entries_read - reads, 3 + 512);
        for i in 0..512u64 {
            let gpa = 0x20_0000 + i * 4096;
            assert!(s2.translate(gpa, Access::Write).is_err());
            assert_eq!(s2.translate(gpa, Access::Read).is_ok(), i != 7);
        }
        assert_eq!(s2.dirty().harvest(0x20_0000..0x40_0000).count(), 0);
    }
}
