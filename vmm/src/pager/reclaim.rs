//! Dropping guest RAM from the host, bracketed by stage2 invalidations like the host's mmu notifier: reclaim, quiet bulk drops, and drops made by others.

use std::fs::File;
use std::ops::Range;
use std::time::Instant;

use log::debug;

use super::stats::{add, inc};
use super::{Pager, PagingError, Shared};
use crate::memory::RamRegion;
use crate::uffd::UFFDIO_REGISTER_MODE_MISSING;

/// Fewest runs for which [`Pager::drop_runs_quiet`] unregisters and registers RAM again
/// (two ioctls per region) instead of dropping run by run.
const QUIET_DROP_MIN_RUNS: usize = 8;

/// Runs per batch of [`Pager::drop_runs_quiet`]: one `process_madvise` call takes at most
/// this many (the kernel's limit on the iovec count, UIO_MAXIOV).
const DROP_BATCH: usize = 1024;

/// What a reclaim did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Start GPA.
    pub gpa: u64,
    /// Length.
    pub len: u64,
    /// Stage2 leaf entries zapped by the invalidation.
    pub zapped: usize,
    /// Time in the host drop (madvise), ns.
    pub drop_ns: u64,
    /// Time of the whole bracketed reclaim, ns.
    pub total_ns: u64,
}

impl ReclaimReport {
    /// The report as JSON (for the control socket).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "gpa": self.gpa,
            "len": self.len,
            "zapped": self.zapped,
            "drop_ns": self.drop_ns,
            "total_ns": self.total_ns,
        })
    }
}

/// A run of guest RAM to drop, with its host address.
struct HostRun {
    gpa: u64,
    len: u64,
    host: u64,
}

impl Shared {
    /// The host dropped `[start, end)` (a REMOVE or UNMAP event, read under the event lock):
    /// bracket stage2, unless it was our own reclaim, which is bracketed already.
    ///
    /// The window that remains: for a drop made *outside* the pager (someone else's madvise),
    /// the kernel zaps as soon as the REMOVE is read, while this brackets stage2 just after; a
    /// fault read earlier can fill and install in that window and then be zapped from stage2
    /// although the host has the page. [`Pager::reclaim`], the VMM's only way of dropping guest
    /// RAM, has no such window: its bracket encloses the madvise.
    pub(super) fn host_dropped(&self, start: u64, end: u64) {
        let own = self
            .own_drops
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.start <= start && end <= r.end);
        if own {
            inc(&self.counters.own_removes);
            return;
        }
        inc(&self.counters.external_invalidations);
        for r in self.backing.regions() {
            let lo = start.max(r.host_addr);
            let hi = end.min(r.host_addr + r.len);
            if lo >= hi {
                continue;
            }
            let gpa = r.gpa + (lo - r.host_addr);
            let inv = self.s2.invalidate(gpa..gpa + (hi - lo));
            let zapped = inv.zapped();
            drop(inv);
            add(&self.counters.zapped, zapped as u64);
            debug!("external drop of host {lo:#x}..{hi:#x}: {zapped} stage2 leaves zapped");
        }
    }

    /// The RAM region holding all of `[gpa, gpa+len)`, a non-empty range aligned to the
    /// backing's page size.
    pub(super) fn check_range(&self, gpa: u64, len: u64) -> Result<RamRegion, PagingError> {
        let page = self.page.bytes();
        if len == 0 {
            return Err(PagingError::EmptyRange { gpa, page });
        }
        let Some(end) = gpa.checked_add(len) else {
            return Err(self.outside(gpa, len));
        };
        let Some(region) = self.backing.region_of_gpa(gpa).copied() else {
            return Err(self.outside(gpa, len));
        };
        if end > region.gpa + region.len {
            return Err(self.outside(gpa, len));
        }
        if !gpa.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(PagingError::Unaligned { gpa, len, page });
        }
        Ok(region)
    }

    fn outside(&self, gpa: u64, len: u64) -> PagingError {
        let ram = self
            .backing
            .regions()
            .iter()
            .map(|r| format!("{:#x}..{:#x}", r.gpa, r.gpa + r.len))
            .collect::<Vec<_>>()
            .join(", ");
        PagingError::OutsideRam { gpa, len, ram }
    }

    /// Drops the host memory of `[gpa, gpa+len)` and tells stage2 (see [`Pager::reclaim`]).
    pub(super) fn reclaim(&self, gpa: u64, len: u64) -> Result<ReclaimReport, PagingError> {
        let region = self.check_range(gpa, len)?;
        let host = region.host_addr + (gpa - region.gpa);
        if let Some(file) = self.file_of(&region) {
            return self.punch(gpa, len, file, gpa - region.gpa);
        }
        let t0 = Instant::now();
        // The madvise raises a REMOVE event that a handler reads; it must know the range is
        // bracketed already, or it would bracket it a second time.
        self.own_drops.lock().unwrap().push(host..host + len);
        let inv = self.s2.invalidate(gpa..gpa + len);
        let zapped = inv.zapped();
        let t1 = Instant::now();
        let drop_err = self.host.drop_pages(host, len).err();
        let drop_ns = t1.elapsed().as_nanos() as u64;
        // The REMOVE event of this drop was read before madvise returned; taking the event lock
        // waits until the handler that read it has processed it (and seen it as ours).
        drop(self.event_lock.lock().unwrap());
        {
            let mut own = self.own_drops.lock().unwrap();
            if let Some(i) = own.iter().position(|r| *r == (host..host + len)) {
                own.swap_remove(i);
            }
        }
        drop(inv);
        if let Some(source) = drop_err {
            return Err(PagingError::Drop { gpa, len, source });
        }
        let c = &self.counters;
        inc(&c.reclaims);
        add(&c.reclaimed_bytes, len);
        add(&c.zapped, zapped as u64);
        let total_ns = t0.elapsed().as_nanos() as u64;
        debug!("reclaimed {gpa:#x}+{len:#x}: {zapped} leaves zapped, drop {drop_ns} ns");
        Ok(ReclaimReport {
            gpa,
            len,
            zapped,
            drop_ns,
            total_ns,
        })
    }

    /// Reclaim on shared memory: the pages leave the file (`fallocate` punch-hole, which zaps
    /// them from every mapping: the guest's, the host view, KVM's), bracketed in stage2. No
    /// REMOVE event is raised (only madvise raises one), so there is nothing to wait for. The
    /// next access is a MISSING fault that reads zeroes.
    fn punch(
        &self,
        gpa: u64,
        len: u64,
        file: &File,
        offset: u64,
    ) -> Result<ReclaimReport, PagingError> {
        let t0 = Instant::now();
        let inv = self.s2.invalidate(gpa..gpa + len);
        let zapped = inv.zapped();
        let t1 = Instant::now();
        let drop_err = self.host.punch_hole(file, offset, len).err();
        let drop_ns = t1.elapsed().as_nanos() as u64;
        drop(inv);
        if let Some(source) = drop_err {
            return Err(PagingError::Drop { gpa, len, source });
        }
        let c = &self.counters;
        inc(&c.reclaims);
        inc(&c.hole_punches);
        add(&c.reclaimed_bytes, len);
        add(&c.zapped, zapped as u64);
        debug!("reclaimed {gpa:#x}+{len:#x} by hole punch: {zapped} leaves zapped");
        Ok(ReclaimReport {
            gpa,
            len,
            zapped,
            drop_ns,
            total_ns: t0.elapsed().as_nanos() as u64,
        })
    }

    /// One batch of [`Pager::drop_runs_quiet`]: every run's stage2 invalidation starts, the
    /// host pages go, then the invalidations end (last started, first ended).
    fn drop_batch(&self, batch: &[HostRun]) -> Result<(), PagingError> {
        let mut invs: Vec<_> = batch
            .iter()
            .map(|r| self.s2.invalidate(r.gpa..r.gpa + r.len))
            .collect();
        let zapped: usize = invs.iter().map(|i| i.zapped()).sum();
        let hosts: Vec<Range<u64>> = batch.iter().map(|r| r.host..r.host + r.len).collect();
        let res = self.host.drop_runs(&hosts);
        while let Some(inv) = invs.pop() {
            drop(inv);
        }
        if let Err((i, source)) = res {
            let r = &batch[i];
            return Err(PagingError::Drop {
                gpa: r.gpa,
                len: r.len,
                source,
            });
        }
        let c = &self.counters;
        add(&c.reclaims, batch.len() as u64);
        add(&c.reclaimed_bytes, batch.iter().map(|r| r.len).sum());
        add(&c.zapped, zapped as u64);
        Ok(())
    }

    /// The runs of [`Pager::drop_runs_quiet`] with the private regions unregistered: in batches
    /// of [`DROP_BATCH`]; runs on shared memory go through `reclaim`.
    fn drop_unregistered(&self, runs: &[(u64, u64)]) -> Result<(), PagingError> {
        let mut batch = Vec::with_capacity(DROP_BATCH.min(runs.len()));
        for &(gpa, len) in runs {
            let region = self.check_range(gpa, len)?;
            if self.file_of(&region).is_some() {
                self.reclaim(gpa, len)?;
                continue;
            }
            batch.push(HostRun {
                gpa,
                len,
                host: region.host_addr + (gpa - region.gpa),
            });
            if batch.len() == DROP_BATCH {
                self.drop_batch(&batch)?;
                batch.clear();
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.drop_batch(&batch)
    }
}

impl Pager {
    /// Drops the host memory of `[gpa, gpa+len)` and tells stage2, like the host's mmu notifier:
    /// `invalidate_range_start`, `MADV_DONTNEED` (on shared memory: a hole punched in the
    /// file), `invalidate_range_end`. The next guest access
    /// faults again and gets a fresh zero page. The range must lie inside one RAM region and be
    /// aligned to the backing's page size.
    pub fn reclaim(&self, gpa: u64, len: u64) -> Result<ReclaimReport, PagingError> {
        self.shared.reclaim(gpa, len)
    }

    /// Drops the host pages of every `(gpa, len)` run like [`Self::reclaim`] run by run, but
    /// without a userfaultfd REMOVE event per run: the private RAM regions are unregistered
    /// for the batch and registered again after it. Each REMOVE costs a round trip with a
    /// handler thread (40-75 µs of wake-ups on this host against 6.5 µs for a plain
    /// MADV_DONTNEED), which made a postcopy switch on 4 KiB pages take hundreds of ms.
    /// Runs on private RAM go in batches of up to 1024: stage2 invalidates every run of the
    /// batch, one `process_madvise` drops them, then the invalidations end. File-backed
    /// regions punch holes run by run, which raise no event anyway.
    ///
    /// Only while nothing else touches guest RAM: no vCPU runs and no other thread reads or
    /// writes it (a postcopy destination at its switch, before its guest runs). A touch in
    /// between would be filled by the kernel without the pager hearing of it. With write
    /// tracking this drops run by run through `reclaim` instead (unregistering would lose
    /// the write protection), as it does for a handful of runs.
    pub fn drop_runs_quiet(&self, runs: &[(u64, u64)]) -> Result<(), PagingError> {
        let sh = &self.shared;
        if sh.cfg.write_tracking || runs.len() < QUIET_DROP_MIN_RUNS {
            return runs
                .iter()
                .try_for_each(|&(gpa, len)| self.reclaim(gpa, len).map(|_| ()));
        }
        let private: Vec<RamRegion> = sh
            .backing
            .regions()
            .iter()
            .filter(|r| sh.file_of(r).is_none())
            .copied()
            .collect();
        for r in &private {
            self.uffd.unregister(r.host_addr, r.len)?;
        }
        let res = sh.drop_unregistered(runs);
        for r in &private {
            self.uffd
                .register(r.host_addr, r.len, UFFDIO_REGISTER_MODE_MISSING)
                .map_err(|source| PagingError::Register {
                    gpa: r.gpa,
                    len: r.len,
                    host: r.host_addr,
                    source,
                })?;
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use stage2::{Access, PageSize};

    use crate::pager::fake::{wake, Call, Rig, HOST, P};

    #[test]
    fn a_fault_in_a_range_being_reclaimed_is_deferred_until_the_reclaim_ends() {
        let mut rig = Rig::small();
        rig.fault(2 * P, true);
        let sh = rig.handler.sh.clone();
        let host = rig.host.clone();
        let handler = Arc::new(Mutex::new(rig.handler));
        // While the madvise runs (the page is gone, the invalidation in progress), the guest
        // touches the page again and a handler takes the fault.
        let during = Arc::new(Mutex::new(None));
        let (h, d) = (handler.clone(), during.clone());
        host.on_drop(move || {
            let mut h = h.lock().unwrap();
            h.on_event(crate::uffd::Event::Pagefault {
                addr: HOST + 2 * P,
                write: true,
                wp: false,
                minor: false,
                tid: 0,
            });
            *d.lock().unwrap() = Some(h.deferred.len());
        });
        host.take_calls();
        let report = sh.reclaim(0, 4 * P).unwrap();
        assert_eq!(report.zapped, 1);
        assert_eq!(*during.lock().unwrap(), Some(1), "deferred, not installed");
        let calls = host.take_calls();
        assert_eq!(
            calls[0],
            Call::Drop {
                start: HOST,
                len: 4 * P
            }
        );
        assert!(
            !calls.iter().any(|c| matches!(c, Call::Wake { .. })),
            "the vCPU sleeps while the install waits: {calls:?}"
        );
        assert!(sh.s2.translate(2 * P, Access::Read).is_err());
        assert!(host.is_resident(HOST + 2 * P) && !host.is_resident(HOST + P));
        // The next batch finishes it: the host has the page (filled after the drop).
        let mut h = handler.lock().unwrap();
        h.run_deferred();
        assert!(h.deferred.is_empty());
        assert!(sh.s2.translate(2 * P, Access::Write).is_ok());
        let st = sh.stats();
        assert_eq!((st.installed, st.retry, st.deferred), (2, 1, 1));
        assert_eq!((st.reclaims, st.reclaimed_bytes), (1, 4 * P));
        assert_eq!(host.take_calls(), vec![wake(2 * P, P)]);
    }

    #[test]
    fn a_remove_of_our_own_reclaim_is_not_bracketed_again_but_a_foreign_one_is() {
        let mut rig = Rig::small();
        rig.fault(P, true);
        rig.fault(5 * P, true);
        let sh = rig.sh();
        sh.own_drops.lock().unwrap().push(HOST..HOST + 4 * P);
        sh.host_dropped(HOST + P, HOST + 2 * P);
        assert!(
            sh.s2.translate(P, Access::Read).is_ok(),
            "ours: left to the reclaim"
        );
        sh.host_dropped(HOST + 4 * P, HOST + 8 * P);
        assert!(sh.s2.translate(5 * P, Access::Read).is_err());
        let st = sh.stats();
        assert_eq!(
            (st.own_removes, st.external_invalidations, st.zapped),
            (1, 1, 1)
        );
    }

    #[test]
    fn reclaim_refuses_ranges_it_cannot_drop_whole() {
        let rig = Rig::new(4, PageSize::Size2M, false, 1);
        let sh = rig.sh();
        let e = sh.reclaim(0, 0).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let e = sh.reclaim(P, 2 << 20).unwrap_err().to_string();
        assert!(
            e.contains("not aligned to the guest RAM page size 0x200000"),
            "{e}"
        );
        let e = sh.reclaim(6 << 20, 4 << 20).unwrap_err().to_string();
        assert!(
            e.contains("not inside guest RAM (RAM is 0x0..0x800000)"),
            "{e}"
        );
        assert!(rig.host.take_calls().is_empty(), "nothing dropped");
    }
}
