//! Range invalidation (the host's mmu notifier): start/end with an in-progress count, the list of
//! in-flight ranges and a sequence number; zaps leaves only, skips empty upper entries in one read,
//! flushes the TLB once per batch and pauses every `Config::yield_every` entries (releasing its
//! locks and epoch guard; the CPU is given up once the walk has used a time slice).
//!
//! The handshake with the fault path (`invalidate_retry`, KVM's `mmu_invalidate_retry_gfn`):
//! `start` publishes its range, then raises the count, then zaps; `end` bumps the sequence before it
//! removes the range. A fault locks (or writes) its entry, then checks the count / ranges, then the
//! sequence. With all of these `SeqCst`, either the fault sees the invalidation (and installs
//! nothing), or the invalidation's zap sees the fault's entry (and zaps it, stealing a marker).

use std::ops::Range;

use crate::format::Format;
use crate::stats::C;
use crate::sync::{self, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering};
use crate::table::Guard;
use crate::tlb::Tlb;
use crate::types::GPA_LIMIT;
use crate::walk::{flags, Ctx, Step, Visit, Visitor};
use crate::Stage2;

/// Invalidation state shared with the fault path.
pub(crate) struct InvState {
    seq: AtomicU64,
    in_progress: AtomicUsize,
    /// In-flight ranges. Only read when `in_progress` is non-zero, never held across anything else.
    /// Part of the handshake, so it is loom's mutex under `cfg(loom)`.
    ranges: Mutex<Vec<Range<u64>>>,
}

impl InvState {
    pub(crate) fn new() -> Self {
        InvState {
            seq: AtomicU64::new(0),
            in_progress: AtomicUsize::new(0),
            ranges: Mutex::new(Vec::new()),
        }
    }

    fn ranges(&self) -> MutexGuard<'_, Vec<Range<u64>>> {
        sync::lock(&self.ranges)
    }

    fn covers(&self, start: u64, end: u64) -> bool {
        self.ranges().iter().any(|r| r.start < end && start < r.end)
    }

    /// Bump the sequence (an invalidation ended, or dirty logging changed the rules).
    pub(crate) fn bump(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        sync::handshake_fence();
    }
}

/// A running invalidation: started by [`Stage2::invalidate`], ended when dropped.
#[must_use = "the invalidation ends when this guard drops"]
pub struct Invalidation<'a, F: Format, T: Tlb> {
    s2: &'a Stage2<F, T>,
    range: Range<u64>,
    zapped: usize,
}

impl<F: Format, T: Tlb> Invalidation<'_, F, T> {
    /// Leaves zapped by the start.
    pub fn zapped(&self) -> usize {
        self.zapped
    }

    /// The (page-rounded) range.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }
}

impl<F: Format, T: Tlb> Drop for Invalidation<'_, F, T> {
    fn drop(&mut self) {
        self.s2.invalidate_range_end(self.range.clone());
    }
}

/// Round a byte range out to 4 KiB pages, clamped to the input address space.
pub(crate) fn page_range(r: &Range<u64>) -> Range<u64> {
    page_range_of(r, 12)
}

/// `r` rounded out to whole pages of `1 << shift` bytes, within the guest-physical space.
pub(crate) fn page_range_of(r: &Range<u64>, shift: u32) -> Range<u64> {
    let mask = (1u64 << shift) - 1;
    let start = (r.start & !mask).min(GPA_LIMIT);
    let end = r.end.saturating_add(mask).min(GPA_LIMIT) & !mask;
    start..end.max(start)
}

/// The zap visitor: leaves (and markers) in range become empty.
struct Zap {
    zapped: usize,
    /// Range zapped since the last flush.
    dirty_start: u64,
    dirty_end: u64,
}

impl<F: Format, T: Tlb> Visitor<F, T> for Zap {
    const FLAGS: u8 = flags::LEAF;

    fn visit(&mut self, s2: &Stage2<F, T>, _g: &Guard, _k: Visit, ctx: &mut Ctx<'_>) -> Step {
        let mut old = ctx.old;
        loop {
            if old == 0 {
                break;
            }
            if s2.fmt.is_table(old, ctx.level) {
                // A split raced with us: descend into the new table.
                ctx.old = old;
                return Step::Continue;
            }
            if s2.fmt.is_locked(old) {
                if s2.steal(ctx.slot) {
                    break;
                }
            } else {
                match ctx
                    .slot
                    .compare_exchange(old, 0, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => {
                        s2.stats.mapped(ctx.level, 1, false);
                        self.zapped += 1;
                        if self.dirty_start >= self.dirty_end {
                            self.dirty_start = ctx.addr;
                        }
                        self.dirty_start = self.dirty_start.min(ctx.addr);
                        self.dirty_end = self.dirty_end.max(ctx.addr + ctx.size());
                        break;
                    }
                    Err(now) => {
                        old = now;
                        continue;
                    }
                }
            }
            old = ctx.slot.load(Ordering::SeqCst);
        }
        ctx.old = 0;
        Step::Continue
    }
}

impl<F: Format, T: Tlb> Stage2<F, T> {
    /// The invalidation sequence number. A fault handler reads it before it resolves the backing
    /// and passes it to [`Stage2::handle_fault`].
    pub fn invalidate_seq(&self) -> u64 {
        self.inv.seq.load(Ordering::SeqCst)
    }

    /// Whether a fault that read `seq` must not install a mapping of `[start, end)`: an
    /// invalidation covering it is in progress, or one ended since `seq` was read.
    #[inline]
    pub(crate) fn invalidate_retry(&self, seq: u64, start: u64, end: u64) -> bool {
        // Count (and ranges) first, sequence second: `end` bumps the sequence before it removes its
        // range, so a fault cannot miss both.
        if self.inv.in_progress.load(Ordering::SeqCst) != 0 && self.inv.covers(start, end) {
            return true;
        }
        self.inv.seq.load(Ordering::SeqCst) != seq
    }

    /// [`Stage2::invalidate_retry`] after this thread wrote the entry it is about to publish (or
    /// published): the write must be ordered before the reads of the invalidation state, as the
    /// invalidation's registration is before its reads of the entries.
    #[inline]
    pub(crate) fn invalidate_retry_after_write(&self, seq: u64, start: u64, end: u64) -> bool {
        sync::handshake_fence();
        self.invalidate_retry(seq, start, end)
    }

    /// Begin invalidating `range` (rounded out to 4 KiB): faults over it answer `Retry` until
    /// [`Stage2::invalidate_range_end`]; every leaf in it is zapped before this returns (and the TLB
    /// flushed). Returns the number of leaves zapped. Blocks that straddle the range are zapped
    /// whole.
    pub fn invalidate_range_start(&self, range: Range<u64>) -> usize {
        let _g = self.global_guard();
        let r = page_range(&range);
        self.inv.ranges().push(r.clone());
        self.inv.in_progress.fetch_add(1, Ordering::SeqCst);
        // Our registration must be ordered before the zap's reads of the entries.
        sync::handshake_fence();
        self.stats.inc(C::Invalidations);
        self.zap_range(r.start, r.end)
    }

    /// End the invalidation of `range` (the same range given to start): bump the sequence, then
    /// drop the range.
    pub fn invalidate_range_end(&self, range: Range<u64>) {
        let _g = self.global_guard();
        let r = page_range(&range);
        self.inv.bump();
        let found = {
            let mut l = self.inv.ranges();
            // From the back: nested invalidations end in reverse order of their starts.
            match l.iter().rposition(|x| *x == r) {
                Some(i) => {
                    l.swap_remove(i);
                    true
                }
                None => false,
            }
        };
        if found {
            self.inv.in_progress.fetch_sub(1, Ordering::SeqCst);
        } else {
            log::error!(
                "invalidate_range_end({:#x}..{:#x}) without a matching start; pass the range given to start",
                range.start,
                range.end
            );
        }
    }

    /// Start invalidating `range` now; it ends when the returned guard drops.
    pub fn invalidate(&self, range: Range<u64>) -> Invalidation<'_, F, T> {
        let zapped = self.invalidate_range_start(range.clone());
        Invalidation {
            s2: self,
            range,
            zapped,
        }
    }

    /// Zap every leaf in `[start, end)`: one resumable walk ([`Stage2::walk_resumable`]) that
    /// flushes once per budget.
    pub(crate) fn zap_range(&self, start: u64, end: u64) -> usize {
        self.zap_range_hooked(start, end, |_| {})
    }

    /// [`Stage2::zap_range`] with `hook` called at every budget boundary, locks released.
    pub(crate) fn zap_range_hooked(&self, start: u64, end: u64, hook: impl FnMut(u64)) -> usize {
        let mut v = Zap {
            zapped: 0,
            dirty_start: 0,
            dirty_end: 0,
        };
        self.walk_resumable(
            start,
            end,
            &mut v,
            |s2, v| {
                if v.dirty_end > v.dirty_start {
                    s2.flush_range(v.dirty_start, v.dirty_end);
                    v.dirty_start = 0;
                    v.dirty_end = 0;
                }
            },
            hook,
        );
        self.stats.add(C::Zapped, v.zapped as u64);
        v.zapped
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::testutil::{engine, Ram};
    use crate::{Access, Ept, Fault, NoopTlb, PageSize, Perms, SoftTlb, Stage2};

    #[test]
    fn empty_1g_invalidate_reads_one_entry() {
        let s2 = engine(Ept, NoopTlb);
        let before = s2.stats().entries_read;
        assert_eq!(s2.invalidate_range_start(0..1 << 30), 0);
        s2.invalidate_range_end(0..1 << 30);
        assert_eq!(
            s2.stats().entries_read - before,
            1,
            "empty 512 GiB root entry"
        );

        // With a table at the root (something mapped at 2 GiB), the empty 1 GiB entry is one more.
        s2.map_range(2 << 30, 4096, 0x1000, Perms::RW, PageSize::Size4K)
            .unwrap();
        let before = s2.stats().entries_read;
        drop(s2.invalidate(0..1 << 30));
        assert_eq!(s2.stats().entries_read - before, 2);
        // An empty 512 GiB range elsewhere: one read.
        let before = s2.stats().entries_read;
        drop(s2.invalidate(1 << 39..2 << 39));
        assert_eq!(s2.stats().entries_read - before, 1);
    }

    #[test]
    fn yield_and_resume_zaps_all_of_1g_in_4k_pages() {
        let tlb = Arc::new(SoftTlb::new(1));
        let s2 = engine(Ept, tlb.clone());
        let pages = (1u64 << 30) >> 12;
        assert_eq!(
            s2.map_range(0, 1 << 30, 1 << 40, Perms::RW, PageSize::Size4K),
            Ok(pages as usize)
        );
        assert_eq!(s2.stats().mapped_4k, pages);
        let tables = s2.live_table_pages();
        let flushes_before = tlb.flushes().range;
        let inv = s2.invalidate(0..1 << 30);
        assert_eq!(inv.zapped() as u64, pages);
        drop(inv);
        let st = s2.stats();
        assert!(
            st.yields >= pages / 256,
            "yielded {} times for {pages} entries",
            st.yields
        );
        assert_eq!(st.mapped_4k, 0);
        assert_eq!(st.zapped, pages);
        // One flush per batch, not per entry.
        let flushes = tlb.flushes().range - flushes_before;
        assert!(
            flushes >= 1 && flushes <= st.yields + 1,
            "{flushes} flushes"
        );
        for gpa in (0..1u64 << 30).step_by(4096) {
            assert!(s2.lookup(gpa).is_none(), "{gpa:#x} still mapped");
        }
        // Leaves only: the tables stay, counted exactly.
        assert_eq!(s2.live_table_pages(), tables);
        assert_eq!(s2.count_reachable_tables(), tables);
    }

    #[test]
    fn resume_after_the_tree_changed_between_budgets_zaps_everything() {
        const MB: u64 = 1 << 20;
        let s2 = engine(Ept, NoopTlb);
        // 0..32 MiB in 4 KiB pages (8192 leaves: 32 budgets of 256), 32..64 MiB empty.
        s2.map_range(0, 32 * MB, 1 << 40, Perms::RW, PageSize::Size4K)
            .unwrap();
        let mut pauses = 0u64;
        let mut added = 0usize;
        let zapped = s2.zap_range_hooked(0, 64 * MB, |next| {
            assert!(next < 64 * MB);
            match pauses {
                // Another zap takes 16..20 MiB (ahead of the walk) while it is paused.
                0 => drop(s2.invalidate(16 * MB..20 * MB)),
                // New 2 MiB blocks appear ahead of the walk, where it found no table before.
                1..=16 => {
                    let gpa = 32 * MB + (pauses - 1) * 2 * MB;
                    s2.map_range(gpa, 2 * MB, 1 << 41, Perms::RW, PageSize::Size2M)
                        .unwrap();
                    added += 1;
                }
                // And a 2 MiB block ahead is split into a table of 4 KiB pages.
                17 => {
                    assert_eq!(s2.split(62 * MB..64 * MB, PageSize::Size4K), 1);
                    added += 511;
                }
                _ => {}
            }
            pauses += 1;
        });
        assert!(pauses > 17, "{pauses} pauses");
        assert_eq!(zapped, 8192 - 1024 + added);
        for gpa in (0..64 * MB).step_by(4096) {
            assert!(s2.lookup(gpa).is_none(), "{gpa:#x} still mapped");
        }
        assert_eq!(s2.stats().mapped_bytes(), 0);
    }

    #[test]
    fn zapping_a_block_straddling_the_range_zaps_it_whole() {
        let s2 = engine(Ept, NoopTlb);
        s2.map_range(
            0x20_0000,
            0x20_0000,
            0x4000_0000,
            Perms::RW,
            PageSize::Size2M,
        )
        .unwrap();
        assert_eq!(s2.invalidate_range_start(0x30_0000..0x30_1000), 1);
        s2.invalidate_range_end(0x30_0000..0x30_1000);
        assert!(s2.lookup(0x20_0000).is_none());
    }

    #[test]
    fn end_bumps_sequence_and_clears_in_progress() {
        let s2: Stage2<Ept, NoopTlb> = engine(Ept, NoopTlb);
        let seq = s2.invalidate_seq();
        let inv = s2.invalidate(0..0x1000);
        assert!(s2.invalidate_retry(s2.invalidate_seq(), 0, 0x1000));
        assert!(!s2.invalidate_retry(s2.invalidate_seq(), 0x1000, 0x2000));
        drop(inv);
        assert_eq!(s2.invalidate_seq(), seq + 1);
        assert!(!s2.invalidate_retry(s2.invalidate_seq(), 0, 0x1000));
    }

    #[test]
    fn fault_after_invalidation_of_its_page_refaults_cleanly() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size2M, Perms::RW);
        let f = Fault {
            gpa: 0x40_0000,
            access: Access::Write,
            vcpu: 0,
        };
        assert!(matches!(
            s2.handle_fault(f, &ram, s2.invalidate_seq()),
            crate::Outcome::Installed { .. }
        ));
        drop(s2.invalidate(0x40_0000..0x40_1000));
        assert_eq!(s2.stats().mapped_bytes(), 0);
        assert!(matches!(
            s2.handle_fault(f, &ram, s2.invalidate_seq()),
            crate::Outcome::Installed { .. }
        ));
    }
}
