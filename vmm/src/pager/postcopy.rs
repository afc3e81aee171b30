//! Guest pages that come from elsewhere (postcopy): fetched from a [`PageSource`] on a fault, or placed by the background push with [`Pager::place`].
//!
//! With a page source set, a MISSING fill is UFFDIO_COPY of the data the source returns.
//! Whoever copies a page first wins, a fault's fetch or a `place`: the loser's copy fails with
//! EEXIST and its data is dropped, so a page holds the data of exactly one copy and stage2
//! counts exactly one install.

use std::sync::Arc;

use log::{error, warn};
use stage2::{Access, Fault, PageSize};

use super::install::{Answer, Tally};
use super::stats::inc;
use super::{Pager, PagingError, Shared, PLACE_RETRIES, PLACE_RETRY_SLEEP, SZ_4K};
use crate::uffd::UffdError;

/// Where the contents of a missing guest page come from, instead of zeroes (postcopy: the
/// migration source). Set with [`Pager::set_page_source`]. Called on a fault-handler thread; may
/// block until the data arrives (the faulting vCPU waits that long; other handlers go on).
///
/// # What the pager asks for
///
/// * hugetlbfs backing: exactly one whole host page (2 MiB or 1 GiB) per fetch.
/// * 4 KiB backing: a *fault-around run*: the faulting page and the consecutive pages after it
///   that the host does not have yet (`mincore`), up to `fault_around_pages` pages and never past
///   the RAM region; one fetch, one UFFDIO_COPY. With write tracking on, fault-around is off and
///   each fetch is one 4 KiB page, as for zero fills.
///
/// A page that is already present when the handler reads a (stale) fault is not fetched at all.
/// A fetched page can still lose the race to [`Pager::place`] of the same page; the fetched
/// copy is then dropped (the copy fails with EEXIST) and the placed data stays.
pub trait PageSource: Send + Sync {
    /// Fill `buf` with guest memory at `gpa` (both aligned to and a multiple of 4 KiB; the
    /// pager asks for whole host pages: 4 KiB runs, or 2 MiB / 1 GiB on hugetlbfs).
    /// `Err(reason)`: the source is gone; the pager stops the VM through `on_fatal(reason)`.
    fn fetch(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// What a handler may fetch from the page source (see `Shared::claim_fetch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// The faulting page is present already: nothing to fetch.
    Present,
    /// Another handler is fetching it: try again once that fetch is in.
    InFlight,
    /// Fetch this many bytes from the block.
    Run(u64),
}

impl Shared {
    /// The page source, if one is set.
    pub(super) fn source(&self) -> Option<Arc<dyn PageSource>> {
        self.source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many 4 KiB pages from `hva` on (at most `max`, inside one RAM region) the host does
    /// not have yet.
    fn missing_run(&self, hva: u64, max: u64) -> u64 {
        let mut vec = [0u8; 512];
        let n = max.min(vec.len() as u64) as usize;
        if self.host.resident(hva, &mut vec[..n]).is_err() {
            // Unknown: ask for the faulting page only.
            return 1;
        }
        vec[..n].iter().take_while(|v| *v & 1 == 0).count() as u64
    }

    /// Claims the fetch of the missing run at `block` (`hva`), at most `max_pages` 4 KiB pages
    /// or one host page. Two vCPUs faulting on one page must cost one fetch: the claim is made
    /// under the in-flight lock, with the `mincore` check inside, and a second fault on a page
    /// being fetched is deferred until the first fetch is copied in. The run stops at the first
    /// present page and before any run another handler is fetching.
    pub(super) fn claim_fetch(&self, block: u64, hva: u64, max_pages: u64) -> Claim {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.iter().any(|r| r.contains(&block)) {
            return Claim::InFlight;
        }
        let len = if self.page == PageSize::Size4K {
            let mut len = self.missing_run(hva, max_pages) * SZ_4K;
            for r in inflight.iter() {
                if r.start > block && r.start < block + len {
                    len = r.start - block;
                }
            }
            len
        } else if self.host_present(block) {
            0
        } else {
            self.page.bytes()
        };
        if len == 0 {
            return Claim::Present;
        }
        inflight.push(block..block + len);
        Claim::Run(len)
    }

    /// Ends the fetch claimed at `block`.
    pub(super) fn release_fetch(&self, block: u64) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = inflight.iter().position(|r| r.start == block) {
            inflight.swap_remove(i);
        }
    }

    /// See [`Pager::place`].
    pub(super) fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, PagingError> {
        let c = &self.counters;
        let page = self.page.bytes();
        let len = data.len() as u64;
        let region = self.check_range(gpa, len)?;
        let host = region.host_addr + (gpa - region.gpa);
        let (wp, access) = if self.cfg.write_tracking {
            (true, Access::Read)
        } else {
            (false, Access::Write)
        };
        let mut placed = false;
        let mut off = 0;
        let mut retries = 0;
        while off < len {
            let seq = self.s2.invalidate_seq();
            let n = match self.host.copy_in(host + off, &data[off as usize..], wp) {
                Ok(n) => n,
                // Copied up to a present page or a pending event; the rest on the next turn.
                Err(UffdError::Again { done, .. }) if done > 0 => {
                    inc(&c.eagain);
                    done
                }
                Err(UffdError::Exists { addr }) => {
                    // The page at `addr` is there (a fault fill or another `place` won; nothing
                    // copied): skip it, keep it.
                    inc(&c.eexist);
                    off = (addr - host) / page * page + page;
                    continue;
                }
                Err(UffdError::Again { .. }) => {
                    // A REMOVE is pending: a handler reads it shortly.
                    inc(&c.eagain);
                    retries += 1;
                    if retries > PLACE_RETRIES {
                        return Err(PagingError::Place {
                            gpa: gpa + off,
                            len: len - off,
                            source: UffdError::Again {
                                addr: host + off,
                                done: 0,
                            },
                        });
                    }
                    std::thread::sleep(PLACE_RETRY_SLEEP);
                    continue;
                }
                Err(source) => {
                    return Err(PagingError::Place {
                        gpa: gpa + off,
                        len: len - off,
                        source,
                    })
                }
            };
            self.count_populated(n);
            placed = true;
            for p in (off..off + n).step_by(page as usize) {
                self.install_placed(gpa + p, access, seq);
            }
            if let Err(e) = self.host.wake_waiters(host + off, n) {
                error!("UFFDIO_WAKE of gpa {:#x}+{n:#x}: {e}", gpa + off);
            }
            off += n;
        }
        Ok(placed)
    }

    /// Records a host page `place` filled in stage2 (a fault's install, for one page). An
    /// invalidation racing with it is waited out, as long as the host still has the page.
    fn install_placed(&self, gpa: u64, access: Access, mut seq: u64) {
        for _ in 0..PLACE_RETRIES {
            let fault = Fault {
                gpa,
                access,
                vcpu: 0,
            };
            match self.ask_stage2(fault, seq, Tally::Fault) {
                Answer::Mapped { .. } | Answer::Denied => return,
                Answer::Retry => {
                    if !self.host_present(gpa) {
                        // Dropped meanwhile: the next access faults and fills it afresh.
                        return;
                    }
                    std::thread::yield_now();
                    seq = self.s2.invalidate_seq();
                }
            }
        }
        warn!("placed page at gpa {gpa:#x} not recorded in stage2: invalidations kept racing");
    }
}

impl Pager {
    /// From now on MISSING faults are filled from `src` with UFFDIO_COPY (see [`PageSource`]
    /// for what is fetched); `None` goes back to zero fill. Faults already being filled finish
    /// with the source they started with.
    pub fn set_page_source(&self, src: Option<Arc<dyn PageSource>>) {
        *self
            .shared
            .source
            .write()
            .unwrap_or_else(|p| p.into_inner()) = src;
    }

    /// Whether the host page holding `gpa` is populated (one `mincore`; no fault is raised).
    /// False outside RAM.
    pub fn is_populated(&self, gpa: u64) -> bool {
        self.shared.host_present(gpa)
    }

    /// Places `data` at `gpa` where the host pages are still missing: UFFDIO_COPY, stage2
    /// install (through `handle_fault`, like a fault fill, so stage2 counts one install per
    /// page whoever wins), then wakes any vCPU waiting on those pages. `gpa` and `data.len()`
    /// must be multiples of the host page size and inside one RAM region.
    ///
    /// Host pages already present are left as they are (EEXIST: a fault fill or another
    /// `place` won). Ok(true) = at least one host page was placed by this call; Ok(false) =
    /// every page was already present, nothing written. Under write tracking placed pages are
    /// write-protected (like a read fill), so the guest's first write to them is seen.
    pub fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, PagingError> {
        self.shared.place(gpa, data)
    }
}
