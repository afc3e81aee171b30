//! Break-before-make in two named steps: `try_break` (entry -> locked marker, TLB flush) and
//! `make` (marker -> new entry). A thread that meets the marker returns `Retry`; nobody waits.
//!
//! Sweeps that must see every entry (invalidation, dirty-logging enable) *steal* a marker (set it
//! empty); the owner's `make` then fails and the owner gives up (frees what it built, returns
//! `Retry`). That is how a sweep is never blocked by, nor misses, an update in flight.

use crate::format::Format;
use crate::stats::C;
use crate::sync::{AtomicU64, Ordering};
use crate::tlb::Tlb;
use crate::types::level_bytes;
use crate::Stage2;

impl<F: Format, T: Tlb> Stage2<F, T> {
    /// Break: replace `old` (a leaf or a table at `level`, base `addr`) with the locked marker and
    /// flush the TLB for the range it covered. `false` if the entry no longer holds `old`.
    pub(crate) fn try_break(&self, slot: &AtomicU64, old: u64, level: usize, addr: u64) -> bool {
        if slot
            .compare_exchange(old, self.fmt.locked(), Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        if self.fmt.is_leaf(old, level) {
            self.stats.mapped(level, 1, false);
        }
        self.stats.inc(C::Bbm);
        self.flush_range(addr, addr + level_bytes(level));
        true
    }

    /// Make: publish `new` where our marker is. `false` if a sweep stole the marker meanwhile.
    pub(crate) fn make(&self, slot: &AtomicU64, new: u64) -> bool {
        slot.compare_exchange(self.fmt.locked(), new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Lock an empty entry (the prepare step of an install): `false` if it is not empty.
    pub(crate) fn try_lock_empty(&self, slot: &AtomicU64) -> bool {
        slot.compare_exchange(0, self.fmt.locked(), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Give up our marker: back to empty (no-op if a sweep already stole it).
    pub(crate) fn unlock_empty(&self, slot: &AtomicU64) {
        let _ = slot.compare_exchange(self.fmt.locked(), 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// A sweep meets a marker: steal it (make it empty). `false` if it changed meanwhile.
    pub(crate) fn steal(&self, slot: &AtomicU64) -> bool {
        slot.compare_exchange(self.fmt.locked(), 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}
