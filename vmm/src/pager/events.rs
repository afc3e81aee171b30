//! The fault-handler threads: reading userfaultfd events, dispatching faults, deferring the ones that cannot finish yet, and `settle`.
//!
//! # REMOVE and fault out of order
//!
//! A handler reads a batch of messages and processes its REMOVE/UNMAP events under one lock
//! (`event_lock`), before it handles the batch's faults. A fault caused by a drop can only be
//! raised after the kernel zapped the page, which happens after the REMOVE was read, so it is
//! read after stage2 was invalidated. Removes caused by [`Pager::reclaim`] itself are
//! recognised and not bracketed twice (see [`super::reclaim`]).
//!
//! # Deferral, not spinning
//!
//! A fault that cannot finish now (its fill met a pending REMOVE, its install met an
//! invalidation, a harvest holds the dirty lock, another handler is fetching its page) is
//! kept on the handler's deferred list and retried after the next event batch, or after a
//! 1 ms poll. Spinning would deadlock a reclaim: its `madvise` waits until a handler reads the
//! REMOVE event, while its `invalidate_range_start` makes every fault in the range retry.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use stage2::Access;

use super::stats::inc;
use super::{Pager, PagingError, Shared, SZ_4K};
use crate::uffd::{Event, Uffd, UffdError};

/// Messages read per `read(2)`: more than the vCPUs that can have a fault pending at once, so
/// one read also takes the REMOVE event queued behind them.
const EVENT_BATCH: usize = 32;
/// A deferred fault that keeps meeting invalidations is given up after this many attempts (the
/// vCPU, if it still needs the page, faults again).
const MAX_DEFER_ATTEMPTS: u32 = 100_000;
/// Poll timeout while faults are deferred.
const DEFER_POLL_MS: i32 = 1;
/// [`Pager::settle`] re-checks after a nap that starts here and doubles...
const SETTLE_NAP_MIN: Duration = Duration::from_micros(20);
/// ...up to the handlers' deferral poll ([`DEFER_POLL_MS`]).
const SETTLE_NAP_MAX: Duration = Duration::from_millis(DEFER_POLL_MS as u64);
/// epoll tokens of a handler's two fds.
const TOKEN_UFFD: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// A fault to finish later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Deferred {
    pub(super) gpa: u64,
    pub(super) access: Access,
    pub(super) vcpu: usize,
    /// The host fill has not been done yet (it met a pending REMOVE).
    pub(super) needs_fill: bool,
    /// A MINOR fault: the fill is a UFFDIO_CONTINUE.
    pub(super) minor: bool,
    /// A WP fault that met a running dirty-log harvest (retried with `on_wp`).
    pub(super) wp: bool,
    pub(super) attempts: u32,
}

/// The decisions of one fault-handler thread: what to do with each fault, and the faults it
/// keeps for later. Driven by an [`EventLoop`], or directly by unit tests.
pub(super) struct Handler {
    pub(super) sh: Arc<Shared>,
    pub(super) deferred: Vec<Deferred>,
    /// Page-source data on its way into guest RAM (empty until a source is used).
    pub(super) source_buf: Vec<u8>,
}

/// One fault-handler thread: waits on the userfaultfd, reads batches, hands them to its
/// [`Handler`].
pub(super) struct EventLoop {
    uffd: Arc<Uffd>,
    epoll: File,
    events: Vec<Event>,
    handler: Handler,
}

impl EventLoop {
    pub(super) fn new(sh: Arc<Shared>, uffd: Arc<Uffd>) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes flags and returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let epoll = unsafe { File::from_raw_fd(fd) };
        let add = |target: i32, events: u32, token: u64| -> io::Result<()> {
            let mut ev = libc::epoll_event { events, u64: token };
            // SAFETY: both fds are open; `ev` lives for the call.
            let r = unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, target, &mut ev) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        add(
            uffd.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            TOKEN_UFFD,
        )?;
        add(sh.stop.as_raw_fd(), libc::EPOLLIN as u32, TOKEN_STOP)?;
        Ok(EventLoop {
            uffd,
            epoll,
            events: Vec::with_capacity(EVENT_BATCH),
            handler: Handler::new(sh),
        })
    }

    pub(super) fn run(mut self) {
        let sh = self.handler.sh.clone();
        loop {
            let timeout = if self.handler.deferred.is_empty() {
                -1
            } else {
                DEFER_POLL_MS
            };
            match self.poll(timeout) {
                Ok(true) => {}
                Ok(false) => {
                    if sh.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                }
                Err(e) => {
                    error!("fault handler: poll failed: {e}; handler exits");
                    return;
                }
            }
            if sh.stopping.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = self.read_batch() {
                error!("fault handler: {e}");
            }
            for ev in &self.events {
                self.handler.on_event(*ev);
                if matches!(ev, Event::Pagefault { .. }) {
                    // Done with this message (a deferral holds its own count).
                    sh.release_faults(1);
                }
            }
            self.handler.run_deferred();
        }
    }

    /// Waits for the uffd or the stop eventfd. Ok(false) on timeout or stop.
    ///
    /// Each handler has its own epoll set with the uffd added `EPOLLEXCLUSIVE`: a fault wakes
    /// one waiting handler, not all of them (with plain poll every handler wakes for every
    /// fault and all but one read nothing, which on a 2-core host costs as much as the fault).
    fn poll(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // SAFETY: the epoll fd is ours and open; `evs` has room for the 2 events asked for.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                evs.as_mut_ptr(),
                evs.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EINTR) {
                Ok(false)
            } else {
                Err(e)
            };
        }
        let evs = &evs[..n as usize];
        if evs.iter().any(|e| e.u64 == TOKEN_STOP) {
            return Ok(false);
        }
        Ok(evs.iter().any(|e| e.u64 == TOKEN_UFFD))
    }

    /// Reads a batch and processes its REMOVE/UNMAP events under the event lock (module doc).
    /// The fault messages read are counted as held before the lock is released (see
    /// [`Pager::settle`]).
    fn read_batch(&mut self) -> Result<(), UffdError> {
        let sh = &self.handler.sh;
        let _guard = sh.event_lock.lock().unwrap();
        let read = self.uffd.read_events(&mut self.events, EVENT_BATCH);
        let faults = self
            .events
            .iter()
            .filter(|e| matches!(e, Event::Pagefault { .. }))
            .count() as u64;
        sh.faults_held.fetch_add(faults, Ordering::SeqCst);
        for ev in &self.events {
            match *ev {
                Event::Remove { start, end } => {
                    inc(&sh.counters.ev_remove);
                    sh.host_dropped(start, end);
                }
                Event::Unmap { start, end } => {
                    inc(&sh.counters.ev_unmap);
                    sh.host_dropped(start, end);
                }
                _ => {}
            }
        }
        read.map(|_| ())
    }
}

impl Shared {
    /// `n` held fault messages are finished (see `faults_held`). Release: everything the
    /// handler did for them (stage2 entry and dirty bit, host fill or unprotect) is visible to
    /// whoever sees the count drop ([`Pager::settle`]'s acquire load).
    pub(super) fn release_faults(&self, n: u64) {
        if n > 0 {
            let before = self.faults_held.fetch_sub(n, Ordering::SeqCst);
            debug_assert!(before >= n, "released {n} faults of {before} held");
        }
    }
}

impl Handler {
    pub(super) fn new(sh: Arc<Shared>) -> Self {
        Handler {
            sh,
            deferred: Vec::new(),
            source_buf: Vec::new(),
        }
    }

    fn vcpu_of(&self, tid: u32) -> usize {
        if tid == 0 {
            return 0;
        }
        self.sh
            .vcpu_tids
            .iter()
            .position(|t| t.load(Ordering::Relaxed) == tid)
            .unwrap_or(0)
    }

    /// Handles one message of a batch (REMOVE/UNMAP were handled by `read_batch` already).
    pub(super) fn on_event(&mut self, ev: Event) {
        let sh = self.sh.clone();
        let c = &sh.counters;
        match ev {
            Event::Pagefault {
                addr,
                write,
                wp,
                minor,
                tid,
            } => {
                let Some(gpa) = sh.backing.host_to_gpa(addr) else {
                    error!(
                        "userfaultfd fault at host {addr:#x} outside guest RAM; waking the thread"
                    );
                    let page = addr & !(SZ_4K - 1);
                    if let Err(e) = sh.host.wake_waiters(page, SZ_4K) {
                        error!("UFFDIO_WAKE of host {page:#x}: {e}");
                    }
                    return;
                };
                let vcpu = self.vcpu_of(tid);
                // Without write tracking the host lets the vCPU write a filled page with no
                // further event (a zero page is copied on write by the kernel), so stage2 must
                // record what the host grants: a writable entry. With tracking, a read fill is
                // write-protected and the first write comes back as a WP fault (Relaxed).
                let access = if write || !sh.cfg.write_tracking {
                    Access::Write
                } else {
                    Access::Read
                };
                if wp {
                    inc(&c.ev_wp);
                    if !self.on_wp(gpa, vcpu) {
                        inc(&c.wp_waited);
                        self.push_deferred(Deferred {
                            gpa,
                            access: Access::Write,
                            vcpu,
                            needs_fill: false,
                            minor: false,
                            wp: true,
                            attempts: 0,
                        });
                    }
                } else if minor {
                    inc(&c.ev_minor);
                    self.on_missing(gpa, access, vcpu, true);
                } else {
                    inc(&c.ev_missing);
                    self.on_missing(gpa, access, vcpu, false);
                }
            }
            // Handled in `read_batch`, under the event lock.
            Event::Remove { .. } | Event::Unmap { .. } => {}
            Event::Remap { from, to, len } => {
                inc(&c.ev_remap);
                error!("guest RAM moved by mremap ({from:#x} -> {to:#x}, {len:#x} bytes): not supported, faults there are no longer seen");
            }
            Event::Fork { ufd } => {
                inc(&c.ev_fork);
                // Not requested; close the child's fd so it does not leak.
                // SAFETY: the kernel handed us this fd in the message; we own it.
                unsafe { libc::close(ufd) };
            }
        }
    }

    /// Keeps a fault for later (its fill or its install could not be done now).
    pub(super) fn defer(
        &mut self,
        gpa: u64,
        access: Access,
        vcpu: usize,
        needs_fill: bool,
        minor: bool,
    ) {
        inc(&self.sh.counters.deferred);
        self.push_deferred(Deferred {
            gpa,
            access,
            vcpu,
            needs_fill,
            minor,
            wp: false,
            attempts: 0,
        });
    }

    /// Keeps a fault for later; it counts as held (see `Shared::faults_held`) until finished.
    pub(super) fn push_deferred(&mut self, d: Deferred) {
        self.sh.faults_held.fetch_add(1, Ordering::SeqCst);
        self.deferred.push(d);
    }

    /// Retries deferred faults: fills that met a pending REMOVE, installs that met an
    /// invalidation, WP faults that met a harvest.
    pub(super) fn run_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.deferred);
        let taken = pending.len() as u64;
        self.retry_deferred(pending);
        // Released only now: a fault deferred again was counted anew when it was pushed, so the
        // count never drops to zero while one is still kept.
        self.sh.release_faults(taken);
    }

    fn retry_deferred(&mut self, pending: Vec<Deferred>) {
        let sh = self.sh.clone();
        for mut d in pending {
            d.attempts += 1;
            if d.attempts > MAX_DEFER_ATTEMPTS {
                warn!(
                    "gave up a fault at gpa {:#x} after {} attempts",
                    d.gpa, d.attempts
                );
                inc(&sh.counters.deferred_dropped);
                sh.wake_block(d.gpa);
                continue;
            }
            if d.wp {
                if !self.on_wp(d.gpa, d.vcpu) {
                    self.push_deferred(d);
                }
                continue;
            }
            self.serve_deferred(d);
        }
    }
}

impl Pager {
    /// Returns once no guest page fault is in flight in the pager: every fault message a
    /// handler has read is resolved (stage2 updated and, for a write, its dirty bit set; the
    /// host page filled or unprotected), none is deferred, and the userfaultfd holds no unread
    /// message. Call it with every vCPU paused (out of `KVM_RUN`), after the last round's pause
    /// and before its harvest, so that the harvest is the last word: no fault the vCPUs took
    /// before the pause sets a bit (or makes a host page writable) after it.
    /// `Err(PagingError::Settle)` if that does not happen within `timeout`.
    ///
    /// # Faults in flight at a pause
    ///
    /// A migration's last round pauses the vCPUs and harvests once more; that harvest must hold
    /// every write made before the pause. A vCPU waiting in the kernel's `handle_userfault`
    /// when the pause kicks it (a signal) leaves `KVM_RUN` at once, and its fault message is
    /// then in one of two states. Unread: the kernel takes it off the queue as the thread
    /// leaves, the write never happened, and the vCPU repeats it on resume. Read: it is in a
    /// handler's hands, maybe deferred because a harvest held the dirty lock, and the handler
    /// relaxes stage2 (setting the dirty bit) and lifts the host protection *after* the pause,
    /// possibly after the last harvest. The guest's write itself did not happen either (the
    /// vCPU repeats it on resume, where it is recorded again), but the bit lands in no round,
    /// and a write fill in flight the same way puts a page in the host with its bit set late.
    ///
    /// The handlers count each fault message in the same critical section as the `read(2)`
    /// that took it (under `event_lock`, which this takes too), and release it once done (a
    /// deferred fault stays counted), so "nothing held and nothing unread" observed under that
    /// lock, once every vCPU is out of `KVM_RUN`, means no fault can still set a bit. A thread
    /// that faults after that check (not a paused vCPU: e.g. the VMM writing guest RAM) is a
    /// write after `settle`.
    ///
    /// What the lag never did, with or without `settle`: lose a write. A guest write to a
    /// protected page completes only once the host page is writable, which the handler makes
    /// it only after the relax set the bit. What `settle` buys is an exact last round. One
    /// source it cannot see: KVM's async page faults, whose kernel worker faults the page in
    /// for the vCPU with a write (`FOLL_WRITE`) and may start only after the pause; such a bit
    /// has no guest write behind it (the vCPU writes after resuming).
    pub fn settle(&self, timeout: Duration) -> Result<(), PagingError> {
        let sh = &self.shared;
        let t0 = Instant::now();
        let mut nap = SETTLE_NAP_MIN;
        loop {
            let (held, unread) = {
                let _reads = sh.event_lock.lock().unwrap_or_else(|p| p.into_inner());
                let held = sh.faults_held.load(Ordering::SeqCst);
                // An unread message: read by a handler shortly (the fd stays readable for
                // their epoll). An error reading the state counts as "unread" until timeout.
                let unread = self.uffd.poll_readable(0).unwrap_or(true);
                (held, unread)
            };
            if held == 0 && !unread {
                debug!("pager settled in {} us", t0.elapsed().as_micros());
                return Ok(());
            }
            let waited = t0.elapsed();
            if waited >= timeout {
                return Err(PagingError::Settle {
                    waited_ms: waited.as_millis() as u64,
                    held,
                    unread: if unread {
                        ", and messages unread on the userfaultfd"
                    } else {
                        ""
                    },
                });
            }
            // Deferred faults are retried on the handlers' 1 ms poll: nap up to that long.
            std::thread::sleep(nap.min(timeout - waited));
            nap = (nap * 2).min(SETTLE_NAP_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use stage2::{Access, PageSize};

    use crate::pager::fake::{wake, Rig, HOST, P};
    use crate::uffd::HostPages;

    #[test]
    fn a_deferred_install_whose_page_was_dropped_again_wakes_the_vcpu_and_installs_nothing() {
        let mut rig = Rig::small();
        let sh = rig.handler.sh.clone();
        let inv = sh.s2.invalidate(0..P);
        rig.fault(0, true);
        assert_eq!(rig.handler.deferred.len(), 1);
        // The page goes again before the retry (a second drop).
        rig.host.drop_pages(HOST, P).unwrap();
        drop(inv);
        rig.host.take_calls();
        rig.handler.run_deferred();
        assert!(rig.handler.deferred.is_empty());
        assert!(!rig.maps(0, Access::Read));
        assert_eq!(rig.host.take_calls(), vec![wake(0, P)]);
        let st = rig.stats();
        assert_eq!((st.installed, st.deferred_dropped), (0, 1));
    }

    #[test]
    fn a_fault_outside_guest_ram_wakes_its_thread_and_counts_nothing() {
        let mut rig = Rig::new(2, PageSize::Size4K, false, 1);
        rig.handler.on_event(crate::uffd::Event::Pagefault {
            addr: HOST + 5 * P + 12,
            write: true,
            wp: false,
            minor: false,
            tid: 0,
        });
        assert_eq!(rig.host.take_calls(), vec![wake(5 * P, P)]);
        assert_eq!(rig.stats().events_missing, 0);
    }
}
