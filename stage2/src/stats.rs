//! Counters per outcome and per operation (relaxed, sharded per thread) and the `Stats` snapshot.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::types::PageSize;

/// Counter slots. Each is summed over the shards by [`Counters::snapshot`].
#[derive(Clone, Copy, Debug)]
#[repr(usize)]
pub(crate) enum C {
    Install4K,
    Install2M,
    Install1G,
    Spurious,
    Relaxed,
    Retry,
    Denied,
    Bbm,
    Split,
    Collapse,
    Zapped,
    FlushAddr,
    FlushRange,
    FlushAll,
    Yield,
    EntriesRead,
    TablesLive,
    TableRaceLost,
    Mapped4K,
    Mapped2M,
    Mapped1G,
    DirtyMarked,
    RingFull,
    WriteProtected,
    Invalidations,
    Undo,
    Count,
}

const N: usize = C::Count as usize;
const SHARDS: usize = 16;

/// One thread's counters, on their own cache lines.
#[repr(align(128))]
struct Shard([AtomicU64; N]);

/// Sharded relaxed counters: a thread increments its own shard, so hot counters do not bounce a
/// cache line between vCPU threads and need no locked instruction. Sums are exact once the counted
/// operations have finished (decrements are wrapping additions).
pub(crate) struct Counters {
    shards: Box<[Shard]>,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard: the first `SHARDS - 1` threads of the process own one each; later
    /// threads share the last one.
    static MY_SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed).min(SHARDS - 1);
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
            shards: (0..SHARDS)
                .map(|_| Shard(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }

    /// Add `n` (wrapping: pass `n.wrapping_neg()` to subtract).
    #[inline]
    pub(crate) fn add(&self, c: C, n: u64) {
        let i = MY_SHARD.try_with(|s| *s).unwrap_or(SHARDS - 1);
        let cell = &self.shards[i].0[c as usize];
        if i < SHARDS - 1 {
            // Only this thread writes its shard: a plain read-modify-write (no locked instruction)
            // is exact; readers sum with relaxed loads.
            cell.store(
                cell.load(Ordering::Relaxed).wrapping_add(n),
                Ordering::Relaxed,
            );
        } else {
            // Relaxed: statistics only; nothing is ordered by them.
            cell.fetch_add(n, Ordering::Relaxed);
        }
    }

    #[inline]
    pub(crate) fn inc(&self, c: C) {
        self.add(c, 1);
    }

    #[inline]
    pub(crate) fn sub(&self, c: C, n: u64) {
        self.add(c, n.wrapping_neg());
    }

    pub(crate) fn get(&self, c: C) -> u64 {
        self.shards.iter().fold(0u64, |a, s| {
            a.wrapping_add(s.0[c as usize].load(Ordering::Relaxed))
        })
    }

    /// Count one more (or fewer) present leaf at `level`.
    #[inline]
    pub(crate) fn mapped(&self, level: usize, n: u64, add: bool) {
        let c = match level {
            1 => C::Mapped1G,
            2 => C::Mapped2M,
            _ => C::Mapped4K,
        };
        if add {
            self.add(c, n)
        } else {
            self.sub(c, n)
        }
    }

    #[inline]
    pub(crate) fn installed(&self, size: PageSize) {
        self.inc(match size {
            PageSize::Size4K => C::Install4K,
            PageSize::Size2M => C::Install2M,
            PageSize::Size1G => C::Install1G,
        });
    }
}

/// A snapshot of the engine's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Leaves installed by faults and `map_range`, by size.
    pub installs_4k: u64,
    /// 2 MiB blocks installed.
    pub installs_2m: u64,
    /// 1 GiB blocks installed.
    pub installs_1g: u64,
    /// Faults answered `Spurious`.
    pub spurious: u64,
    /// Faults answered `Relaxed`.
    pub relaxed: u64,
    /// Faults answered `Retry`.
    pub retries: u64,
    /// Faults answered `Denied`.
    pub denied: u64,
    /// Break-before-make sequences (entry locked, TLB flushed, entry made).
    pub bbms: u64,
    /// Blocks split into tables.
    pub splits: u64,
    /// Tables collapsed into blocks.
    pub collapses: u64,
    /// Leaves zapped by invalidations.
    pub zapped: u64,
    /// Installs undone because an invalidation raced with them.
    pub undone: u64,
    /// TLB flushes of one address.
    pub flush_addr: u64,
    /// TLB flushes of a range.
    pub flush_range: u64,
    /// Full TLB flushes.
    pub flush_all: u64,
    /// Yields of long walks.
    pub yields: u64,
    /// Entries read by range walks (invalidate, split, collapse, write-protect, map_range).
    pub entries_read: u64,
    /// Invalidations started.
    pub invalidations: u64,
    /// Table pages linked in the tree (the root included).
    pub tables_live: u64,
    /// Table pages that lost an install race and were freed at once.
    pub table_races_lost: u64,
    /// Table pages allocated (live, waiting for a grace period, or pooled).
    pub tables_allocated: u64,
    /// Table pages unlinked and waiting for a grace period.
    pub tables_pending_free: u64,
    /// Present 4 KiB leaves.
    pub mapped_4k: u64,
    /// Present 2 MiB leaves.
    pub mapped_2m: u64,
    /// Present 1 GiB leaves.
    pub mapped_1g: u64,
    /// Pages marked dirty (bitmap).
    pub dirty_marked: u64,
    /// Dirty-ring pushes that found the ring full (the bitmap still has the page).
    pub ring_full: u64,
    /// Leaves write-protected for dirty logging.
    pub write_protected: u64,
}

impl Stats {
    /// Bytes of table pages linked in the tree.
    pub fn table_bytes(&self) -> u64 {
        self.tables_live * crate::table::TABLE_PAGE_BYTES
    }

    /// Bytes mapped by present leaves, all sizes.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped_4k * PageSize::Size4K.bytes()
            + self.mapped_2m * PageSize::Size2M.bytes()
            + self.mapped_1g * PageSize::Size1G.bytes()
    }
}

impl Counters {
    pub(crate) fn snapshot(&self, pool: &crate::table::Pool) -> Stats {
        Stats {
            installs_4k: self.get(C::Install4K),
            installs_2m: self.get(C::Install2M),
            installs_1g: self.get(C::Install1G),
            spurious: self.get(C::Spurious),
            relaxed: self.get(C::Relaxed),
            retries: self.get(C::Retry),
            denied: self.get(C::Denied),
            bbms: self.get(C::Bbm),
            splits: self.get(C::Split),
            collapses: self.get(C::Collapse),
            zapped: self.get(C::Zapped),
            undone: self.get(C::Undo),
            flush_addr: self.get(C::FlushAddr),
            flush_range: self.get(C::FlushRange),
            flush_all: self.get(C::FlushAll),
            yields: self.get(C::Yield),
            entries_read: self.get(C::EntriesRead),
            invalidations: self.get(C::Invalidations),
            tables_live: self.get(C::TablesLive),
            table_races_lost: self.get(C::TableRaceLost),
            tables_allocated: pool.allocated(),
            tables_pending_free: pool.pending(),
            mapped_4k: self.get(C::Mapped4K),
            mapped_2m: self.get(C::Mapped2M),
            mapped_1g: self.get(C::Mapped1G),
            dirty_marked: self.get(C::DirtyMarked),
            ring_full: self.get(C::RingFull),
            write_protected: self.get(C::WriteProtected),
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = [
            ("installs 4K", self.installs_4k),
            ("installs 2M", self.installs_2m),
            ("installs 1G", self.installs_1g),
            ("spurious", self.spurious),
            ("relaxed", self.relaxed),
            ("retries", self.retries),
            ("denied", self.denied),
            ("break-before-make", self.bbms),
            ("splits", self.splits),
            ("collapses", self.collapses),
            ("zapped leaves", self.zapped),
            ("undone installs", self.undone),
            ("flush addr", self.flush_addr),
            ("flush range", self.flush_range),
            ("flush all", self.flush_all),
            ("yields", self.yields),
            ("entries read", self.entries_read),
            ("invalidations", self.invalidations),
            ("tables live", self.tables_live),
            ("table bytes", self.table_bytes()),
            ("table races lost", self.table_races_lost),
            ("tables allocated", self.tables_allocated),
            ("tables pending free", self.tables_pending_free),
            ("mapped 4K pages", self.mapped_4k),
            ("mapped 2M blocks", self.mapped_2m),
            ("mapped 1G blocks", self.mapped_1g),
            ("dirty marked", self.dirty_marked),
            ("ring full", self.ring_full),
            ("write protected", self.write_protected),
        ];
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        writeln!(f, "{:<w$}  {:>14}", "counter", "value")?;
        for (k, v) in rows {
            writeln!(f, "{k:<w$}  {v:>14}")?;
        }
        write!(f, "{:<w$}  {:>14}", "mapped bytes", self.mapped_bytes())
    }
}
