//! Filling the host page of a MISSING or MINOR fault (zero page, COPY, CONTINUE), and the races a fill can lose.
//!
//! A fill never wakes the faulting thread (every ioctl here is `DONTWAKE`): the vCPU resumes
//! only once stage2 has recorded the page ([`super::install`]).

use stage2::{Access, PageSize};

use super::events::{Deferred, Handler};
use super::postcopy::Claim;
use super::stats::{add, inc, Counters};
use super::SZ_4K;
use crate::uffd::UffdError;

/// What became of a fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fill {
    /// `bytes` from the block start were filled (the faulting page first); nobody woken yet.
    Filled { bytes: u64 },
    /// The faulting page was already present (a racing handler filled it).
    Present,
    /// A REMOVE/UNMAP is pending, or another handler is fetching the page from the page
    /// source: nothing done, try again shortly.
    Pending,
    /// The kernel refused to fill the page for a reason that is not a race (out of huge pages,
    /// out of memory): the fault cannot be served, the VM has been asked to stop.
    Failed,
    /// A MINOR fault's page left the file (hole punched): wake the vCPU, it faults again.
    Gone,
}

/// Where a fault stands after [`Handler::serve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Served {
    /// Finished: installed, woken, or given up (the VM stops, or the vCPU faults again).
    Done,
    /// Not finished now (a pending REMOVE, an invalidation, a harvest holding the dirty lock):
    /// defer it and serve it again; `needs_fill` false once its host page is in place.
    Retry { needs_fill: bool },
}

/// Sorts the result of a fill ioctl (COPY, ZEROPAGE, CONTINUE of the faulting block) into the
/// races every fill shares, counting them. `Ok(Ok(bytes))`: filled; `Ok(Err(race))`: lost a
/// race, nothing done for the faulting page; `Err`: not a race, the caller's to judge.
pub(super) fn fill_race(
    c: &Counters,
    r: Result<u64, UffdError>,
) -> Result<Result<u64, Fill>, UffdError> {
    match r {
        Ok(n) => Ok(Ok(n)),
        // Filled in part: the run stopped at a page that is present or at a pending event. The
        // faulting page is first, so it is filled; the rest is left to its own faults.
        Err(UffdError::Again { done, .. }) if done > 0 => {
            inc(&c.eagain);
            Ok(Ok(done))
        }
        // Another handler filled the page first (two vCPUs faulted on it). The page is there:
        // stage2 is still asked (`install` with nothing filled), answers Spurious or installs
        // for the winner's fault, and our vCPU is woken.
        Err(UffdError::Exists { .. }) => {
            inc(&c.eexist);
            Ok(Err(Fill::Present))
        }
        // Nothing done: a REMOVE/UNMAP event is queued and not yet read (the kernel's
        // `mmap_changing`), as in Firecracker's handler. The fault is deferred; the event is read
        // in the same or the next batch (the kernel hands out queued faults before events, but
        // one `read` of a batch drains both), and the fill is retried then.
        Err(UffdError::Again { .. }) => {
            inc(&c.eagain);
            Ok(Err(Fill::Pending))
        }
        Err(e) => Err(e),
    }
}

impl Handler {
    /// A MISSING fault (`minor` false: fill the host page, or a fault-around run) or a MINOR
    /// fault (shared backing: map the file's page with UFFDIO_CONTINUE), then record it in
    /// stage2.
    pub(super) fn on_missing(&mut self, gpa: u64, access: Access, vcpu: usize, minor: bool) {
        if let Served::Retry { needs_fill } = self.serve(gpa, access, vcpu, minor, true) {
            self.defer(gpa, access, vcpu, needs_fill, minor);
        }
    }

    /// Serves a deferred fault again; defers it once more if it still cannot finish.
    pub(super) fn serve_deferred(&mut self, mut d: Deferred) {
        if let Served::Retry { needs_fill } =
            self.serve(d.gpa, d.access, d.vcpu, d.minor, d.needs_fill)
        {
            d.needs_fill = needs_fill;
            self.push_deferred(d);
        }
    }

    /// Serves a fault, a new one or a deferred one: resolves its host page (when
    /// `needs_fill`), then installs it in stage2. [`Served::Retry`] says the fault could not
    /// finish now and what is still to do.
    fn serve(
        &mut self,
        gpa: u64,
        access: Access,
        vcpu: usize,
        minor: bool,
        needs_fill: bool,
    ) -> Served {
        let sh = self.sh.clone();
        // A write fill is writable at once and recorded dirty by its install: no harvest may
        // run between the two (see `tracking`).
        let Some(_shared) = sh.dirty_shared() else {
            return Served::Retry { needs_fill };
        };
        let seq = sh.s2.invalidate_seq();
        let filled = if needs_fill {
            match self.resolve(gpa, access == Access::Write, minor) {
                Fill::Pending => return Served::Retry { needs_fill: true },
                Fill::Failed => return Served::Done,
                Fill::Gone => {
                    sh.wake_block(gpa);
                    return Served::Done;
                }
                Fill::Present => 0,
                Fill::Filled { bytes } => bytes,
            }
        } else if sh.host_present(gpa) {
            // A deferred fault whose page was filled before: KVM's order, the host page is
            // resolved after the sequence is read, and the install checks the sequence.
            0
        } else {
            // Dropped again since: woken, its next access faults and is handled afresh.
            inc(&sh.counters.deferred_dropped);
            sh.wake_block(gpa);
            return Served::Done;
        };
        if self.install(gpa, access, vcpu, seq, filled) {
            Served::Done
        } else {
            Served::Retry { needs_fill: false }
        }
    }

    /// Fills the host page of a fault: CONTINUE for a MINOR fault, else a fill.
    pub(super) fn resolve(&mut self, gpa: u64, write: bool, minor: bool) -> Fill {
        if minor {
            self.cont(gpa, write)
        } else {
            self.fill(gpa, write)
        }
    }

    /// Maps the host page holding `gpa` from the memfd's page cache (UFFDIO_CONTINUE): the file
    /// has the page, this mapping does not map it yet. Write-protected after a read under write
    /// tracking, like a fill.
    fn cont(&mut self, gpa: u64, write: bool) -> Fill {
        let sh = self.sh.clone();
        let c = &sh.counters;
        let block = sh.block_of(gpa);
        let Some(hva) = sh.backing.gpa_to_host(block) else {
            return Fill::Present;
        };
        let wp = sh.cfg.write_tracking && !write;
        let bytes = match fill_race(c, sh.host.continue_in(hva, sh.page.bytes(), wp)) {
            Ok(Ok(n)) => n,
            Ok(Err(race)) => return race,
            // The page left the file since the fault (a hole was punched): the vCPU's next
            // access is a MISSING fault.
            Err(UffdError::Ioctl { ref source, .. })
                if source.raw_os_error() == Some(libc::EFAULT) =>
            {
                return Fill::Gone;
            }
            Err(e) => {
                sh.fatal(&format!(
                    "the host could not map guest page {block:#x} from the shared memory file: {e}"
                ));
                return Fill::Failed;
            }
        };
        add(&c.continued, bytes);
        Fill::Filled { bytes }
    }

    /// Fills the host page (block) containing `gpa`; on 4 KiB backing with fault-around, also
    /// the missing pages after it, with one ioctl. Zeroes, or the page source's data when one is
    /// set (see [`super::PageSource`]).
    pub(super) fn fill(&mut self, gpa: u64, write: bool) -> Fill {
        let sh = self.sh.clone();
        let c = &sh.counters;
        let block = sh.block_of(gpa);
        let Some(region) = sh.backing.region_of_gpa(block) else {
            return Fill::Present;
        };
        let hva = region.host_addr + (block - region.gpa);
        // Fault-around fills the neighbours like the faulting page (writable after a write);
        // under write tracking they must stay protected, so it is off then. The run never goes
        // past the end of the RAM region.
        let around = sh.page == PageSize::Size4K && !sh.cfg.write_tracking;
        let around_pages =
            (sh.cfg.fault_around_pages as u64).min((region.gpa + region.len - block) / SZ_4K);
        // Under write tracking a read fault maps the page write-protected, so that the first
        // write raises a WP fault; the zero page cannot carry the uffd-wp bit, so COPY zeroes.
        let tracked = sh.cfg.write_tracking;
        let wp = tracked && !write;
        let (len, result) = if let Some(src) = sh.source() {
            let len = match sh.claim_fetch(block, hva, if around { around_pages } else { 1 }) {
                Claim::Present => return Fill::Present,
                Claim::InFlight => return Fill::Pending,
                Claim::Run(len) => len,
            };
            let buf = self.source_buf(len);
            let copied = src
                .fetch(block, buf)
                .map(|()| sh.host.copy_in(hva, buf, wp));
            // After the copy: a fault deferred behind this fetch now finds its page present.
            sh.release_fetch(block);
            match copied {
                Ok(r) => (len, r),
                Err(why) => {
                    sh.fatal(&format!(
                        "the page source could not provide guest memory {block:#x}+{len:#x}: \
                         {why}; the VM cannot run without it"
                    ));
                    return Fill::Failed;
                }
            }
        } else {
            let len = if around {
                around_pages * SZ_4K
            } else {
                sh.page.bytes()
            };
            // ZEROPAGE maps the shared zero page read-only: right for a read, but a write fault
            // filled that way takes a host copy-on-write fault on every page right after, so
            // writes get freshly allocated zeroed pages through COPY from the zero source.
            let r = if sh.page == PageSize::Size4K && !tracked && !write {
                sh.host.zero_in(hva, len)
            } else {
                sh.host.copy_in(hva, sh.zero.bytes(len), wp)
            };
            (len, r)
        };
        let bytes = match fill_race(c, result) {
            Ok(Ok(n)) => n,
            Ok(Err(race)) => return race,
            Err(e) => {
                // Waking the vCPU would only make it fault again on the same page, forever:
                // a page the host cannot give is fatal to the VM, as a SIGBUS would be.
                sh.fatal(&format!(
                    "the host could not back guest page {block:#x}+{len:#x}: {e}; \
                     free host memory (for hugetlbfs backing: raise the huge page pool, e.g. \
                     /proc/sys/vm/nr_hugepages) or use a smaller --mem"
                ));
                return Fill::Failed;
            }
        };
        sh.count_populated(bytes);
        Fill::Filled { bytes }
    }

    /// This handler's buffer for page-source data, at least `len` bytes. Allocated on first use
    /// for the largest fill, and every page of it touched once: UFFDIO_COPY reads its source
    /// with page faults disabled (see [`super::zero::ZeroSource`] for what a miss costs on hugetlbfs).
    fn source_buf(&mut self, len: u64) -> &mut [u8] {
        let len = len as usize;
        if self.source_buf.len() < len {
            let max = self
                .sh
                .page
                .bytes()
                .max(self.sh.cfg.fault_around_pages as u64 * SZ_4K) as usize;
            let mut buf = vec![0u8; max.max(len)];
            for b in buf.iter_mut().step_by(SZ_4K as usize) {
                // SAFETY: `b` is a valid, exclusive reference into `buf`; the volatile write keeps
                // the compiler from dropping a store of the value the allocation already holds.
                unsafe { std::ptr::write_volatile(b, 0) };
            }
            self.source_buf = buf;
        }
        &mut self.source_buf[..len]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    use stage2::{Access, PageSize};

    use crate::pager::fake::{wake, Call, Rig, HOST, P};

    #[test]
    fn a_stale_fault_whose_fill_meets_eexist_is_spurious_and_wakes_its_vcpu() {
        let mut rig = Rig::small();
        // Two vCPUs wrote page 3; one handler took the first message and finished it.
        rig.fault(3 * P, true);
        rig.host.take_calls();
        // The second message was read before that fill: its fill finds the page (EEXIST).
        rig.fault(3 * P, true);
        let st = rig.stats();
        assert_eq!(
            (st.eexist, st.installed, st.spurious, st.refills),
            (1, 1, 1, 0)
        );
        assert_eq!(st.stage2.installs_4k, 1, "one page, one install");
        assert_eq!(
            rig.host.take_calls(),
            vec![
                Call::Copy {
                    dst: HOST + 3 * P,
                    len: P,
                    wp: false
                },
                wake(3 * P, P),
            ]
        );
    }

    #[test]
    fn a_fill_that_loses_to_a_fill_in_flight_installs_for_the_winner() {
        let mut rig = Rig::small();
        // Another handler has copied page 5 in and not yet told stage2.
        rig.host.populate(HOST + 5 * P, P);
        rig.fault(5 * P, false);
        let st = rig.stats();
        assert_eq!((st.eexist, st.installed, st.populated_4k), (1, 1, 0));
        assert!(rig.maps(5 * P, Access::Write));
        assert!(rig.handler.deferred.is_empty());
        assert_eq!(rig.host.last_call(), Some(wake(5 * P, P)));
    }

    #[test]
    fn a_fill_that_meets_a_pending_remove_waits_for_the_event_and_stays_held() {
        let mut rig = Rig::small();
        rig.host.set_remove_pending(true);
        rig.fault(2 * P, false);
        assert_eq!(rig.handler.deferred.len(), 1);
        assert!(!rig.maps(2 * P, Access::Read));
        // Still pending at the next batch: kept, and still counted for `settle`.
        rig.handler.run_deferred();
        assert_eq!(rig.handler.deferred.len(), 1);
        assert_eq!(rig.sh().faults_held.load(Ordering::SeqCst), 1);
        assert!(!rig.host.take_woken());
        // A handler read the REMOVE: the retry fills and installs.
        rig.host.set_remove_pending(false);
        rig.handler.run_deferred();
        assert!(rig.handler.deferred.is_empty());
        assert_eq!(rig.sh().faults_held.load(Ordering::SeqCst), 0);
        assert!(rig.maps(2 * P, Access::Write));
        let st = rig.stats();
        assert_eq!((st.eagain, st.deferred, st.installed), (2, 1, 1));
        assert_eq!(rig.host.last_call(), Some(wake(2 * P, P)));
    }

    #[test]
    fn a_fill_the_host_refuses_stops_the_vm_and_wakes_nobody() {
        let mut rig = Rig::new(4, PageSize::Size2M, false, 1);
        let why = Arc::new(Mutex::new(String::new()));
        let seen = why.clone();
        *rig.sh().on_fatal.lock().unwrap() = Some(Box::new(move |w: &str| {
            *seen.lock().unwrap() = w.to_string()
        }));
        rig.host.fail_next_fill(libc::ENOMEM);
        rig.fault((2 << 20) + 0x1000, true);
        assert!(why
            .lock()
            .unwrap()
            .contains("could not back guest page 0x200000"));
        assert_eq!(rig.stats().fatal, 1);
        assert!(rig.handler.deferred.is_empty(), "not retried forever");
        assert!(!rig.maps(2 << 20, Access::Read));
        assert_eq!(
            rig.host.take_calls(),
            vec![Call::Copy {
                dst: HOST + (2 << 20),
                len: 2 << 20,
                wp: false
            }],
            "a hugetlbfs fill copies the whole huge page, and nobody is woken"
        );
    }
}
