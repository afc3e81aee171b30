//! Dirty logging by write tracking (stage2-wp): WP faults relax stage2 and lift the host protection; harvests take the bits and protect again.
//!
//! # Serialised with the WP handlers
//!
//! Under dirty logging a guest write is seen by the pager only when the host page is
//! userfaultfd-write-protected; the handler then relaxes stage2 (which sets the dirty bit) and
//! lifts the host protection (which lets the write through). A harvest takes the bits (stage2
//! get-and-clear + stage2 write-protect) and then protects the host pages again. Run
//! unordered, the two lose writes: relax sets the bit, the harvest takes it and re-protects the
//! host page, the handler's lift comes last and leaves the page writable with no bit set, and
//! every later write to it goes unseen.
//!
//! One `RwLock` (`Shared::dirty_lock`) orders them: a handler holds it *shared* across
//! relax + lift (and across fill + install of a MISSING fault, since a write fill is writable
//! from the copy on and only the install sets its bit); [`Pager::harvest_dirty`] holds it
//! *exclusive* across get-and-clear + host re-protect. So at every harvest, a host page that is
//! writable has its bit set, and the harvest reports it and protects it again; a write after
//! the harvest faults. Handlers never wait for the lock: they `try_read` and, when a harvest
//! holds it, defer the fault to the next poll (1 ms), because a harvest's re-protect can meet
//! EAGAIN (a REMOVE pending) and waits for some handler to read that event. Harvests are short
//! (one stage2 pass and one ioctl per dirty run), so a vCPU waits at most that long.
//!
//! On hugetlbfs the host protects whole huge pages: after one WP fault every 4 KiB page of that
//! huge page is writable without a fault, so a harvest reports each dirty page's whole host
//! page. Known edge: a write fill whose install meets a racing invalidation is installed (and
//! its bit set) after the lock was dropped, so its page may be reported one harvest late.

use std::sync::atomic::Ordering;
use std::sync::{RwLockReadGuard, TryLockError};

use log::{error, info};
use stage2::{Access, Bitmap, Fault};

use super::events::Handler;
use super::install::{Answer, Tally};
use super::stats::{add, inc};
use super::{Pager, PagingError, Shared, PLACE_RETRIES, PLACE_RETRY_SLEEP, SZ_4K};
use crate::uffd::UffdError;

/// A handler's shared hold on the dirty lock (empty without write tracking).
pub(super) struct DirtyShared<'a> {
    _guard: Option<RwLockReadGuard<'a, ()>>,
}

impl Shared {
    /// The dirty lock, shared, for a fill or a WP relax (write tracking only; without it no lock
    /// is taken). `None` when a harvest holds it: the caller defers its fault and never waits
    /// here, so that handlers keep reading the REMOVE events a harvest may be waiting for.
    pub(super) fn dirty_shared(&self) -> Option<DirtyShared<'_>> {
        if !self.cfg.write_tracking {
            return Some(DirtyShared { _guard: None });
        }
        match self.dirty_lock.try_read() {
            Ok(g) => Some(DirtyShared { _guard: Some(g) }),
            Err(TryLockError::Poisoned(p)) => Some(DirtyShared {
                _guard: Some(p.into_inner()),
            }),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Write-protects host `[host, host+len)`. A pending REMOVE (EAGAIN: the kernel refuses
    /// while the address space is changing) is waited out: the handlers read it, and none of
    /// them waits for the dirty lock, which the caller may hold.
    fn protect_host(&self, host: u64, len: u64) -> Result<(), PagingError> {
        let mut tries = 0;
        loop {
            match self.host.set_write_protect(host, len, true) {
                Ok(()) => return Ok(()),
                Err(UffdError::Again { .. }) if tries < PLACE_RETRIES => {
                    inc(&self.counters.eagain);
                    tries += 1;
                    std::thread::sleep(PLACE_RETRY_SLEEP);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// See [`Pager::start_dirty_log`].
    pub(super) fn start_dirty_log(&self) -> Result<(), PagingError> {
        self.need_tracking("start_dirty_log")?;
        let _excl = self.dirty_lock.write().unwrap_or_else(|p| p.into_inner());
        self.s2.dirty().enable(stage2::SplitPolicy::Eager);
        for r in self.backing.regions() {
            self.protect_host(r.host_addr, r.len)?;
        }
        self.dirty_logging.store(true, Ordering::SeqCst);
        info!("dirty logging (stage2 + userfaultfd write-protect) started");
        Ok(())
    }

    /// See [`Pager::harvest_dirty`].
    pub(super) fn harvest_dirty(&self, gpa: u64, len: u64) -> Result<Bitmap, PagingError> {
        self.need_tracking("harvest_dirty")?;
        if !self.dirty_logging.load(Ordering::SeqCst) {
            return Err(PagingError::Config(
                "harvest_dirty before start_dirty_log: start dirty logging first".into(),
            ));
        }
        let region = self.check_range(gpa, len)?;
        let pages = len / SZ_4K;
        let _excl = self.dirty_lock.write().unwrap_or_else(|p| p.into_inner());
        // Exactly `[gpa, gpa + len)`: `check_range` saw it page-aligned inside one region.
        let mut taken = self.s2.dirty().harvest(gpa..gpa + len);
        let words = taken.words_mut();
        // Re-protect on the host, in runs of whole host pages; on hugetlbfs report those.
        let per_host = self.page.bytes() / SZ_4K;
        let is_set = |w: &[u64], i: u64| w[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let mut i = 0;
        let mut reported = 0;
        while i < pages {
            if words[(i / 64) as usize] == 0 && i % 64 == 0 {
                i += 64;
                continue;
            }
            let hp = i / per_host * per_host;
            if !(hp..hp + per_host).any(|j| is_set(words, j)) {
                i = hp + per_host;
                continue;
            }
            // A run of host pages with at least one dirty page each.
            let start = hp;
            let mut end = hp + per_host;
            while end < pages && (end..end + per_host).any(|j| is_set(words, j)) {
                end += per_host;
            }
            for j in start..end {
                words[(j / 64) as usize] |= 1 << (j % 64);
            }
            reported += end - start;
            let host = region.host_addr + (gpa - region.gpa) + start * SZ_4K;
            self.protect_host(host, (end - start) * SZ_4K)?;
            i = end;
        }
        inc(&self.counters.harvests);
        add(&self.counters.harvested_pages, reported);
        Ok(taken)
    }

    /// See [`Pager::stop_dirty_log`].
    pub(super) fn stop_dirty_log(&self) -> Result<(), PagingError> {
        self.need_tracking("stop_dirty_log")?;
        let _excl = self.dirty_lock.write().unwrap_or_else(|p| p.into_inner());
        self.s2.dirty().disable();
        self.dirty_logging.store(false, Ordering::SeqCst);
        info!("dirty logging stopped");
        Ok(())
    }

    fn need_tracking(&self, what: &str) -> Result<(), PagingError> {
        if self.cfg.write_tracking {
            return Ok(());
        }
        Err(PagingError::Config(format!(
            "{what} needs write tracking: start the pager with write_tracking = true"
        )))
    }
}

impl Handler {
    /// A write to a userfaultfd-write-protected page (write tracking): stage2 relaxes its entry
    /// in place, then the host protection is cleared, which wakes the writer. Both under the
    /// dirty lock, shared. Returns false, having done nothing, when a harvest holds the lock:
    /// the fault is retried after it (never waited for here, so that this thread goes on
    /// reading the REMOVE events a harvest's re-protect may be waiting for).
    pub(super) fn on_wp(&mut self, gpa: u64, vcpu: usize) -> bool {
        let sh = self.sh.clone();
        let Some(_shared) = sh.dirty_shared() else {
            return false;
        };
        let c = &sh.counters;
        let seq = sh.s2.invalidate_seq();
        let fault = Fault {
            gpa,
            access: Access::Write,
            vcpu,
        };
        match sh.ask_stage2(fault, seq, Tally::Fault) {
            Answer::Mapped { .. } => {
                // Even when stage2 already allowed the write (Spurious), the host protection is
                // what stops the vCPU: it must go, or the write faults forever.
                let block = sh.block_of(gpa);
                let Some(hva) = sh.backing.gpa_to_host(block) else {
                    return true;
                };
                // Counted before the ioctl, which wakes the writer: whoever sees the write done
                // sees it counted.
                inc(&c.wp_cleared);
                match sh.host.set_write_protect(hva, sh.page.bytes(), false) {
                    Ok(()) => {}
                    Err(UffdError::Again { .. }) => {
                        // A REMOVE is pending: the writer retries and faults again after it.
                        c.wp_cleared.fetch_sub(1, Ordering::Relaxed);
                        inc(&c.eagain);
                        sh.wake_block(gpa);
                    }
                    Err(e) => {
                        c.wp_cleared.fetch_sub(1, Ordering::Relaxed);
                        error!("clearing write protection of gpa {block:#x}: {e}");
                        sh.wake_block(gpa);
                    }
                }
            }
            // The host page stays protected: waking makes the vCPU fault again.
            Answer::Retry | Answer::Denied => sh.wake_block(gpa),
        }
        true
    }
}

impl Pager {
    /// Starts stage2-wp dirty logging (the pager must run with `write_tracking`): stage2 dirty
    /// logging on (blocks split eagerly to 4 KiB, every leaf write-protected), then every host
    /// page of guest RAM write-protected with the pager's userfaultfd, so that each first write
    /// raises a WP fault that stage2 records. Pages filled later are filled write-protected on
    /// a read, and recorded dirty on a write.
    pub fn start_dirty_log(&self) -> Result<(), PagingError> {
        self.shared.start_dirty_log()
    }

    /// Get and clear the dirty log of `[gpa, gpa+len)` (inside one RAM region, aligned to the
    /// host page size), as a [`Bitmap`] of that range: page `gpa + i * 4096` is set when it
    /// was written since the previous harvest. The pages reported are write-protected again, in
    /// stage2 and on the host, before this returns, so a copy made afterwards holds every
    /// write they had and the next write to each is in the next harvest.
    ///
    /// Serialised against the WP-fault handlers (module doc): no write is lost and no pagemap
    /// sweep is needed. On hugetlbfs the host protects whole huge pages, so a dirty 4 KiB page
    /// reports its whole host page (the other 4 KiB pages of it were writable without a fault).
    pub fn harvest_dirty(&self, gpa: u64, len: u64) -> Result<Bitmap, PagingError> {
        self.shared.harvest_dirty(gpa, len)
    }

    /// Stops dirty logging: stage2 stops recording; the host protection left on pages is
    /// lifted lazily by their next write (a WP fault relaxed without a record).
    pub fn stop_dirty_log(&self) -> Result<(), PagingError> {
        self.shared.stop_dirty_log()
    }
}

#[cfg(test)]
mod tests {
    use stage2::{Access, PageSize};

    use crate::pager::fake::{wake, Call, Rig, HOST, P};

    /// A tracked rig whose page 1 was read (filled write-protected), with dirty logging on.
    fn logging() -> Rig {
        let mut rig = Rig::new(4, PageSize::Size4K, true, 16);
        rig.fault(P, false);
        assert!(rig.maps(P, Access::Read) && !rig.maps(P, Access::Write));
        assert!(rig.host.is_protected(HOST + P));
        rig.sh().start_dirty_log().unwrap();
        rig.host.take_calls();
        rig
    }

    fn unprotects(calls: &[Call]) -> usize {
        calls
            .iter()
            .filter(|c| matches!(c, Call::Protect { protect: false, .. }))
            .count()
    }

    #[test]
    fn a_write_fault_on_a_page_already_dirty_still_lifts_the_host_protection() {
        let mut rig = logging();
        rig.wp_fault(P);
        // A second vCPU's write to the same page, read after the first was relaxed: stage2
        // already allows it, but the writer still waits on the host protection.
        rig.wp_fault(P);
        let calls = rig.host.take_calls();
        assert_eq!(unprotects(&calls), 2, "{calls:?}");
        assert!(!rig.host.is_protected(HOST + P));
        let st = rig.stats();
        assert_eq!((st.relaxed, st.spurious, st.wp_cleared), (1, 1, 2));
        // One dirty page, reported once and protected again.
        assert_eq!(rig.sh().harvest_dirty(0, 4 * P).unwrap().words(), [0b10]);
        assert!(rig.host.is_protected(HOST + P));
        assert_eq!(rig.sh().harvest_dirty(0, 4 * P).unwrap().words(), [0]);
    }

    #[test]
    fn a_write_fault_during_a_harvest_is_deferred_and_lands_in_the_next_one() {
        let mut rig = logging();
        let sh = rig.handler.sh.clone();
        let harvest = sh.dirty_lock.write().unwrap();
        rig.wp_fault(P);
        assert_eq!(rig.handler.deferred.len(), 1);
        assert_eq!(unprotects(&rig.host.take_calls()), 0);
        assert!(rig.host.is_protected(HOST + P), "the writer waits");
        drop(harvest);
        rig.handler.run_deferred();
        assert!(rig.handler.deferred.is_empty());
        assert!(!rig.host.is_protected(HOST + P));
        let st = rig.stats();
        assert_eq!((st.wp_waited, st.relaxed), (1, 1));
        assert_eq!(sh.harvest_dirty(0, 4 * P).unwrap().words(), [0b10]);
    }

    #[test]
    fn a_wp_fault_that_meets_a_pending_remove_wakes_the_writer_to_fault_again() {
        let mut rig = logging();
        rig.host.set_remove_pending(true);
        rig.wp_fault(P);
        assert!(rig.host.is_protected(HOST + P));
        assert_eq!(rig.host.last_call(), Some(wake(P, P)));
        let st = rig.stats();
        assert_eq!((st.wp_cleared, st.eagain), (0, 1));
    }
}
