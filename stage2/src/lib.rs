//! The VMM's own stage-2 page-table engine (x86 EPT and ARM64 formats): lock-free racing faults,
//! break-before-make, range invalidation, split/collapse and dirty logging, with no KVM inside.
//!
//! Many threads call [`Stage2::handle_fault`] at once; every update is a compare-and-swap from the
//! value the walker read, and the rules of `shared/DESIGN.md` ("Rules from the seeds") decide what
//! a racing fault does. Table pages are reclaimed with epochs.
//!
//! ```
//! use stage2::{Access, Backing, Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms, Resolved, Stage2};
//!
//! /// Guest RAM at 0..1 GiB, backed by 2 MiB host pages at host address 0x4000_0000 + gpa.
//! struct Ram;
//! impl Backing for Ram {
//!     fn resolve(&self, gpa: u64) -> Option<Resolved> {
//!         (gpa < 1 << 30).then(|| Resolved {
//!             frame: 0x4000_0000 + (gpa & !0x1f_ffff),
//!             max_size: PageSize::Size2M,
//!             perms: Perms::RWX,
//!         })
//!     }
//! }
//!
//! let s2 = Stage2::new(Ept, NoopTlb, Config { nr_vcpus: 2, ..Config::default() });
//!
//! // A vCPU faults: read the sequence before resolving the backing, then ask the engine.
//! let seq = s2.invalidate_seq();
//! let fault = Fault { gpa: 0x20_1234, access: Access::Write, vcpu: 0 };
//! assert_eq!(s2.handle_fault(fault, &Ram, seq), Outcome::Installed { gpa: 0x20_0000, size: PageSize::Size2M });
//! // A racing vCPU that wanted less finds the mapping: nothing to do.
//! let read = Fault { access: Access::Read, vcpu: 1, ..fault };
//! assert_eq!(s2.handle_fault(read, &Ram, s2.invalidate_seq()), Outcome::Spurious);
//! assert_eq!(s2.translate(0x20_1234, Access::Write).unwrap().pa, 0x4020_1234);
//!
//! // The host takes the memory back (its mmu notifier): start now, end when the guard drops.
//! {
//!     let inv = s2.invalidate(0x20_0000..0x40_0000);
//!     assert_eq!(inv.zapped(), 1);
//! }
//! assert!(s2.translate(0x20_1234, Access::Read).is_err());
//! // A fault that read the sequence before the invalidation installs nothing.
//! assert_eq!(s2.handle_fault(fault, &Ram, seq), Outcome::Retry);
//!
//! // Dirty logging at 4 KiB precision.
//! s2.dirty().enable(stage2::SplitPolicy::Eager);
//! assert!(matches!(s2.handle_fault(fault, &Ram, s2.invalidate_seq()), Outcome::Installed { size: PageSize::Size4K, .. }));
//! let dirty = s2.dirty().harvest(0..1 << 30);
//! assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![0x20_1000]);
//! assert_eq!(s2.dirty().ring_harvest(0), vec![0x20_1000]);
//!
//! let stats = s2.stats();
//! assert_eq!(stats.installs_2m, 1);
//! println!("{stats}");
//! ```

mod bbm;
mod bitmap;
mod dirty;
mod fault;
pub mod format;
mod invalidate;
mod map;
mod split;
pub mod stats;
mod sync;
mod table;
#[cfg(test)]
mod testutil;
pub mod tlb;
mod types;
mod walk;

pub use bitmap::{BitIter, Bitmap};
pub use dirty::{DirtyLog, SplitPolicy};
pub use format::{Arm64, Ept, EptAttrs, Format, S2Attrs};
pub use invalidate::Invalidation;
pub use map::Batch;
pub use stats::Stats;
pub use table::TABLE_PAGE_BYTES;
pub use tlb::{FlushCounts, NoopTlb, SoftTlb, Tlb, TlbAccess};
pub use types::{
    level_bytes, Access, Backing, Config, Error, Fault, Outcome, PageSize, Perms, Resolved,
    ENTRIES, GPA_LIMIT, LEVELS,
};
pub use walk::{TranslateError, Translation};

use crate::stats::{Counters, C};
use crate::sync::{Mutex, MutexGuard};
use crate::table::{Reclaim, TablePage};

/// A thread's epoch critical section from [`Stage2::pin`]; table pages it can reach stay allocated
/// until it drops.
#[must_use = "the critical section ends when this guard drops"]
pub struct Pinned {
    _guard: table::Guard,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pinned")
    }
}

/// A stage-2 translation table of format `F`, invalidating TLBs through `T`.
pub struct Stage2<F: Format, T: Tlb> {
    pub(crate) fmt: F,
    pub(crate) tlb: T,
    pub(crate) config: Config,
    /// The level-0 table; lives as long as the engine.
    pub(crate) root: *mut TablePage,
    pub(crate) reclaim: Reclaim,
    pub(crate) inv: invalidate::InvState,
    pub(crate) dirty: dirty::DirtyState,
    pub(crate) stats: Counters,
    /// `Config::global_lock`: one mutex around every public mutating call (benchmark baseline).
    global: Option<Mutex<()>>,
    /// Serialises the operations that read many entries and publish a value derived from all of
    /// them (collapse) against the sweeps that must see every entry (invalidation, write-protect).
    /// Faults never take it.
    pub(crate) structure: Mutex<()>,
}

// SAFETY: the only non-Sync field is the raw root pointer; the root page is owned by the engine,
// freed only in `Drop`, and all access to table pages goes through atomics.
unsafe impl<F: Format, T: Tlb> Send for Stage2<F, T> {}
// SAFETY: as above; shared access only uses atomic entries and the engine's own locks.
unsafe impl<F: Format, T: Tlb> Sync for Stage2<F, T> {}

impl<F: Format, T: Tlb> Stage2<F, T> {
    /// An empty table (one root page).
    pub fn new(format: F, tlb: T, config: Config) -> Self {
        Stage2::with_reclaim(format, tlb, config, Reclaim::new())
    }

    fn with_reclaim(format: F, tlb: T, config: Config, reclaim: Reclaim) -> Self {
        let root = reclaim.alloc();
        let stats = Counters::new();
        stats.inc(C::TablesLive);
        Stage2 {
            fmt: format,
            tlb,
            dirty: dirty::DirtyState::new(&config),
            global: config.global_lock.then(|| Mutex::new(())),
            config,
            root,
            reclaim,
            inv: invalidate::InvState::new(),
            stats,
            structure: Mutex::new(()),
        }
    }

    /// [`Stage2::new`] with an epoch collector of the engine's own (see `Reclaim::with_own_collector`).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn with_own_collector(format: F, tlb: T, config: Config) -> Self {
        Stage2::with_reclaim(format, tlb, config, Reclaim::with_own_collector())
    }

    /// The format.
    pub fn format(&self) -> &F {
        &self.fmt
    }

    /// The TLB the engine flushes.
    pub fn tlb(&self) -> &T {
        &self.tlb
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The global lock, when `Config::global_lock` asks for one.
    #[inline]
    pub(crate) fn global_guard(&self) -> Option<MutexGuard<'_, ()>> {
        self.global.as_ref().map(sync::lock)
    }

    /// Enter an epoch critical section for a batch of operations on this thread (e.g. a fault
    /// handler taking several faults in a row). While the returned guard lives, the engine's own
    /// pins on this thread are nested and cheap (no fence), which saves a locked instruction per
    /// fault. Unlinked table pages cannot be reclaimed while any thread holds a guard: drop it
    /// before the thread blocks (e.g. before it re-enters the guest).
    pub fn pin(&self) -> Pinned {
        Pinned {
            _guard: self.reclaim.pin(),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.stats.snapshot(self.reclaim.pool())
    }

    /// Table pages linked in the tree, the root included.
    pub fn live_table_pages(&self) -> u64 {
        self.stats.get(C::TablesLive)
    }

    /// Help deferred frees of unlinked table pages along (they complete once every thread that was
    /// walking has moved on). For tests and tools that check the allocation counters.
    pub fn reclaim_deferred(&self) {
        self.reclaim.flush();
    }

    /// Flush through the TLB and count it.
    pub(crate) fn flush_range(&self, start: u64, end: u64) {
        self.stats.inc(C::FlushRange);
        self.tlb.flush_range(start..end);
    }

    pub(crate) fn flush_addr(&self, vcpu: Option<usize>, gpa: u64) {
        self.stats.inc(C::FlushAddr);
        self.tlb.flush_addr(vcpu, gpa);
    }

    pub(crate) fn flush_all(&self) {
        self.stats.inc(C::FlushAll);
        self.tlb.flush_all();
    }

    fn free_subtree(&self, page: *mut TablePage, level: usize) {
        // SAFETY: called from `Drop` only: `&mut self` excludes every walker, so this is the only
        // reference to the linked page.
        let t = unsafe { &mut *page };
        for e in t.entries.iter_mut() {
            let d = sync::load_exclusive(e);
            if self.fmt.is_table(d, level) {
                self.free_subtree(self.fmt.table_addr(d) as *mut TablePage, level + 1);
            }
        }
        // SAFETY: nobody else can reference the page (see above).
        unsafe { self.reclaim.free_exclusive(page) };
    }
}

impl<F: Format, T: Tlb> Drop for Stage2<F, T> {
    fn drop(&mut self) {
        self.free_subtree(self.root, 0);
    }
}

impl<F: Format, T: Tlb> std::fmt::Debug for Stage2<F, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage2")
            .field("format", &F::NAME)
            .field("tables_live", &self.live_table_pages())
            .field("seq", &self.invalidate_seq())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{engine, engine_own_epoch, Ram};

    #[test]
    fn stats_display_is_an_aligned_table() {
        let s2 = engine(Ept, NoopTlb);
        s2.map_range(0, 0x2000, 0x10_0000, Perms::RW, PageSize::Size4K)
            .unwrap();
        let text = s2.stats().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("counter"));
        assert!(text.contains("installs 4K"));
        let mapped = lines
            .iter()
            .find(|l| l.starts_with("mapped 4K pages"))
            .unwrap();
        assert!(mapped.ends_with(" 2"), "{mapped}");
        let widths: Vec<usize> = lines.iter().map(|l| l.len()).collect();
        assert!(widths.iter().all(|&w| w == widths[0]), "{widths:?}");
    }

    #[test]
    fn global_lock_engine_behaves_the_same() {
        let s2 = Stage2::new(
            Ept,
            NoopTlb,
            Config {
                global_lock: true,
                ..Config::default()
            },
        );
        let ram = Ram::new(PageSize::Size2M, Perms::RW);
        let f = Fault {
            gpa: 0x20_0000,
            access: Access::Read,
            vcpu: 0,
        };
        assert!(matches!(
            s2.handle_fault(f, &ram, s2.invalidate_seq()),
            Outcome::Installed { .. }
        ));
        let w = Fault {
            access: Access::Write,
            ..f
        };
        assert!(matches!(
            s2.handle_fault(w, &ram, s2.invalidate_seq()),
            Outcome::Relaxed { .. }
        ));
        s2.dirty().enable(SplitPolicy::Eager);
        s2.handle_fault(w, &ram, s2.invalidate_seq());
        assert_eq!(s2.dirty().harvest(0..1 << 30).count(), 1);
        s2.dirty().disable();
        s2.handle_fault(w, &ram, s2.invalidate_seq());
        s2.map_range(0x40_0000, 0x1000, 0, Perms::R, PageSize::Size4K)
            .unwrap();
        assert_eq!(s2.collapse(0..1 << 30), 0);
        assert_eq!(s2.split(0..1 << 30, PageSize::Size4K), 0);
        drop(s2.invalidate(0..1 << 30));
        assert_eq!(s2.stats().mapped_bytes(), 0);
    }

    #[test]
    fn faults_under_a_callers_pin_install_and_pages_are_reclaimed_after_it_drops() {
        let s2 = engine_own_epoch(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size4K, Perms::RW);
        {
            let _pin = s2.pin();
            for gpa in (0..0x40_0000).step_by(4096) {
                let f = Fault {
                    gpa,
                    access: Access::Write,
                    vcpu: 0,
                };
                assert!(matches!(
                    s2.handle_fault(f, &ram, s2.invalidate_seq()),
                    Outcome::Installed { .. }
                ));
            }
            s2.map_range(0x4000_0000, 0x20_0000, 0, Perms::R, PageSize::Size4K)
                .unwrap();
            // A collapse under the pin unlinks a table page; its free is deferred.
            assert_eq!(s2.collapse(0x4000_0000..0x4020_0000), 1);
            assert_eq!(s2.stats().tables_pending_free, 1);
        }
        assert_eq!(s2.stats().mapped_4k, 1024);
        for _ in 0..64 {
            s2.reclaim_deferred();
            if s2.stats().tables_pending_free == 0 {
                break;
            }
        }
        assert_eq!(s2.stats().tables_pending_free, 0);
    }

    #[test]
    fn drop_returns_every_table_page() {
        let s2 = engine(Arm64::default(), NoopTlb);
        s2.map_range(0, 1 << 30, 0, Perms::RW, PageSize::Size2M)
            .unwrap();
        s2.split(0..1 << 22, PageSize::Size4K);
        assert_eq!(s2.collapse(0..1 << 30), 3);
        let st = s2.stats();
        assert_eq!(st.tables_live, s2.count_reachable_tables());
        assert!(st.tables_allocated >= st.tables_live + st.tables_pending_free);
    }
}
