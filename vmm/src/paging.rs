//! Demand paging of guest RAM: userfaultfd fault-handler threads that ask `stage2` what to do and
//! carry it out on the host, and range reclaim bracketed like the host's mmu notifier.
//!
//! # Data path of a first touch
//!
//! A vCPU (through KVM's `get_user_pages`) touches a missing host page of guest RAM; the kernel
//! queues a MISSING fault on our userfaultfd and puts the thread to sleep. A handler thread reads
//! the event, translates the host address to a GPA, reads stage2's invalidation sequence, fills
//! the host page (UFFDIO_ZEROPAGE for 4 KiB anonymous memory, fault-around batched; UFFDIO_COPY
//! of a zero buffer over the whole huge page on hugetlbfs, which has no zero page; COPY with
//! `MODE_WP` under write tracking) without waking anyone, records the mapping in stage2 with
//! `handle_fault(fault, backing, seq)`, and only then wakes the vCPU (UFFDIO_WAKE): like a vCPU
//! under KVM, it resumes once its stage-2 entry is in.
//!
//! # Page source and `place` (postcopy)
//!
//! With a [`PageSource`] set, a MISSING fill is UFFDIO_COPY of the data the source returns
//! (what is fetched is said on the trait). Handlers claim a run before fetching it (an in-flight
//! list under a mutex, with the `mincore` check inside), so two vCPUs faulting on one page cost
//! one fetch: the second fault is deferred until the first fetch is copied in. [`Pager::place`]
//! (the background push) copies, installs in stage2 through `handle_fault` and wakes, like a
//! fill. Whoever copies first wins; the loser's copy fails with EEXIST and its data is dropped,
//! so a page holds the data of exactly one copy and stage2 counts exactly one install.
//!
//! # Dirty logging (stage2-wp), serialised with the WP handlers
//!
//! Under dirty logging a guest write is seen by the pager only when the host page is
//! userfaultfd-write-protected; the handler then relaxes stage2 (which sets the dirty bit) and
//! lifts the host protection (which lets the write through). A harvest takes the bits
//! (stage2 get-and-clear + stage2 write-protect) and then protects the host pages again. Run
//! unordered, the two lose writes: relax sets the bit, the harvest takes it and re-protects the
//! host page, the handler's lift comes last and leaves the page writable with no bit set, and
//! every later write to it goes unseen.
//!
//! One `RwLock` (`Shared::dirty_lock`) orders them: a handler holds it *shared* across
//! relax + lift (and across fill + install of a MISSING fault, since a write fill is writable
//! from the copy on and only the install sets its bit); [`Pager::harvest_dirty`] holds it
//! *exclusive* across get-and-clear + host re-protect. So at every harvest, a host page that is
//! writable has its bit set (it was made writable by a relax or write fill that set the bit
//! before the harvest), and the harvest reports it and protects it again; a write after the
//! harvest faults. Handlers never wait for the lock: they `try_read` and, when a harvest holds
//! it, defer the fault to the next poll (1 ms), because a harvest's re-protect can meet EAGAIN
//! (a REMOVE pending) and waits for some handler to read that event. Harvests are short (one
//! stage2 pass and one ioctl per dirty run), so a vCPU waits at most that long.
//!
//! On hugetlbfs the host protects whole huge pages: after one WP fault every 4 KiB page of that
//! huge page is writable without a fault, so a harvest reports each dirty page's whole host
//! page. Known edge: a write fill whose install meets a racing invalidation is installed (and
//! its bit set) after the lock was dropped, so its page may be reported one harvest late.
//!
//! # Faults in flight at a pause (`settle`)
//!
//! A migration's last round pauses the vCPUs and harvests once more; that harvest must hold
//! every write made before the pause. A vCPU waiting in the kernel's `handle_userfault` when
//! the pause kicks it (a signal) leaves `KVM_RUN` at once, and its fault message is then in one
//! of two states. Unread: the kernel takes it off the queue as the thread leaves, the write
//! never happened, and the vCPU repeats it on resume. Read: it is in a handler's hands, maybe
//! deferred because a harvest held the dirty lock, and the handler relaxes stage2 (setting the
//! dirty bit) and lifts the host protection *after* the pause, possibly after the last
//! harvest. The guest's write itself did not happen either (the vCPU repeats it on resume,
//! where it is recorded again), but the bit lands in no round, and a write fill in flight the
//! same way puts a page in the host with its bit set late.
//!
//! [`Pager::settle`] closes that: each handler counts the fault messages it holds
//! (`faults_held`: counted in the critical section of `event_lock` that reads them, released
//! when resolved; a deferred fault stays counted), and `settle` waits, under the same lock,
//! for "none held and none unread on the fd". Once every vCPU is out of `KVM_RUN`, no vCPU
//! message can appear unread any more, so zero held then means no fault can set a bit later.
//!
//! What the lag never did, with or without `settle`: lose a write. A guest write to a
//! protected page completes only once the host page is writable, which the handler makes it
//! only after the relax set the bit; so a write made before the pause has its bit set before
//! the pause. What `settle` buys is an exact last round: no bit (and no host page turned
//! writable) lands after it. One source it cannot see: KVM's async page faults, whose kernel
//! worker faults the page in for the vCPU with a write (`FOLL_WRITE`) and may start only after
//! the pause; such a bit has no guest write behind it (the vCPU writes after resuming).
//!
//! # Shared memory (memfd): MISSING + MINOR, UFFDIO_CONTINUE, hole-punch reclaim
//!
//! Guest RAM may be a memfd mapped MAP_SHARED (shmem, or a hugetlbfs memfd for 2 MiB / 1 GiB
//! pages), with a second mapping of the same file that the VMM keeps as its host view
//! ([`Pager::start_shared`]). The range is registered for MISSING *and* MINOR faults:
//!
//! * a page the file does not have raises MISSING and is filled like private memory (zero page
//!   or COPY of zeroes, or the page source's data), which puts it in the file;
//! * a page the file has but the guest mapping does not map (written through the host view, or
//!   mapped only by another mapping) raises MINOR and is mapped with UFFDIO_CONTINUE
//!   (write-protected after a read under write tracking), then recorded in stage2 like a fill.
//!
//! MINOR-only registration was the other design: there, a fault on a page the file lacks is
//! resolved by the kernel with no event (shmem and hugetlbfs allocate it in their fault
//! path), so stage2 would never hear of first touches, and the VMM would have to populate
//! every page through the host view before the guest could see it. Both modes together work
//! on this kernel (6.18) and keep every first touch visible. Reclaim is
//! `fallocate(PUNCH_HOLE | KEEP_SIZE)` on the file, bracketed by stage2's invalidation like the
//! MADV_DONTNEED path: the pages leave the file and every mapping (KVM's mmu notifier fires),
//! and the next access is a MISSING fault that reads zeroes. The punch raises no REMOVE event.
//! `is_populated` on shmem answers "the file has the page"; on a hugetlbfs memfd, "the guest
//! mapping maps it" (mincore looks at the page table there), so a page written only through the
//! host view reads as not populated until the guest touches it.
//!
//! # Order: host first, then stage2 (KVM's order)
//!
//! KVM resolves the host page first and installs its EPT entry second, under the mmu-notifier
//! sequence check. The handler does the same: stage2 is told only about host pages that exist.
//! If an invalidation raced (`Outcome::Retry`), the fault is *deferred*, not spun on: it is
//! retried after the next event batch, and installed only if the host still has the page
//! (`mincore`). Spinning would deadlock a reclaim: its `madvise` waits until a handler reads the
//! REMOVE event, while its `invalidate_range_start` makes every fault in the range retry.
//!
//! # Races with the kernel, and where they are handled
//!
//! * EEXIST from a fill: another handler filled the page first (two vCPUs faulted on it). The
//!   page is there; stage2 is still asked, and answers Spurious (see `Handler::fill`).
//! * EAGAIN with nothing done: a REMOVE/UNMAP event is queued and not yet read (the kernel's
//!   `mmap_changing`), as in Firecracker's handler. The fault is deferred; the event is read in
//!   the same or the next batch (the kernel hands out queued faults before events, but one
//!   `read` of a batch drains both), and the fill is retried then.
//! * A MISSING fault on a GPA that stage2 maps: either a racing duplicate (another handler
//!   installed and is filling) or a host drop that stage2 has not heard of yet (a REMOVE read by
//!   another handler and not yet bracketed). Both are answered by filling the host page: EEXIST
//!   means the duplicate, success means the host really had lost it; stage2's entry then maps
//!   the right memory again. Dropping the stage2 entry and re-handling, the other possible
//!   answer, would count two installs for one page in the duplicate case.
//! * REMOVE and fault out of order: the handler reads events and processes REMOVE/UNMAP under
//!   one lock, before it releases the batch's faults. A fault caused by a drop can only be
//!   raised after the kernel zapped the page, which happens after the REMOVE was read, so it is
//!   read after stage2 was invalidated. Removes caused by [`Pager::reclaim`] itself are
//!   recognised (the reclaim is already bracketed) and not bracketed twice.
//! * What remains: for a drop made *outside* the pager (someone else's madvise), the kernel
//!   zaps as soon as the REMOVE is read, while the handler brackets stage2 just after; a fault
//!   read earlier can fill and install in that window and then be zapped from stage2 although
//!   the host has the page. [`Pager::reclaim`], the VMM's only way of dropping guest RAM, has no
//!   such window: its bracket encloses the madvise.

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use stage2::{
    Access, Backing, Config as Stage2Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms,
    Resolved, Stage2,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::{BackingKind, GuestRam, RamRegion, SharedRegion};
use crate::uffd::{
    Event, Uffd, UffdError, UFFDIO_CONTINUE_MODE_DONTWAKE, UFFDIO_CONTINUE_MODE_WP,
    UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_COPY_MODE_WP, UFFDIO_REGISTER_MODE_MINOR,
    UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP, UFFDIO_ZEROPAGE_MODE_DONTWAKE,
    UFFD_FEATURE_EVENT_REMAP, UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP,
    UFFD_FEATURE_MINOR_HUGETLBFS, UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_HUGETLBFS,
    UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFD_FEATURE_THREAD_ID,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
};

/// The stage2 engine as the VMM instantiates it: x86 EPT format; KVM owns the real TLB.
pub type VmStage2 = Stage2<Ept, NoopTlb>;

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

const SZ_4K: u64 = 4 << 10;
const SZ_2M: u64 = 2 << 20;
const SZ_1G: u64 = 1 << 30;
/// Messages read per `read(2)`: more than the vCPUs that can have a fault pending at once, so
/// one read also takes the REMOVE event queued behind them.
const EVENT_BATCH: usize = 32;
/// A deferred fault that keeps meeting invalidations is given up after this many attempts (the
/// vCPU, if it still needs the page, faults again).
const MAX_DEFER_ATTEMPTS: u32 = 100_000;
/// Poll timeout while faults are deferred.
const DEFER_POLL_MS: i32 = 1;
/// [`Pager::place`] and the dirty-log re-protect retry an ioctl that met a pending REMOVE
/// (EAGAIN, nothing done) this many times, sleeping [`PLACE_RETRY_SLEEP`] between tries, while a
/// handler reads the event.
const PLACE_RETRIES: u32 = 20_000;
/// See [`PLACE_RETRIES`].
const PLACE_RETRY_SLEEP: Duration = Duration::from_micros(50);
/// [`Pager::settle`] re-checks after a nap that starts here and doubles...
const SETTLE_NAP_MIN: Duration = Duration::from_micros(20);
/// ...up to the handlers' deferral poll ([`DEFER_POLL_MS`]).
const SETTLE_NAP_MAX: Duration = Duration::from_millis(DEFER_POLL_MS as u64);
/// epoll tokens of a handler's two fds.
const TOKEN_UFFD: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// Configuration of the pager.
#[derive(Clone, Debug)]
pub struct PagerConfig {
    /// Fault-handler threads (default: one per vCPU).
    pub handlers: usize,
    /// Register with userfaultfd write-protect mode too: pages are filled write-protected on a
    /// read fault and a later write raises a WP fault (stage2's permission-only relax).
    pub write_tracking: bool,
    /// On 4 KiB backing, fill up to this many consecutive missing pages from the faulting one
    /// with one ioctl and record them with one stage2 `map_range` (1 = off).
    pub fault_around_pages: usize,
    /// vCPUs of the VM (stage2's dirty rings); faults are attributed with
    /// [`Pager::set_vcpu_thread`].
    pub vcpus: usize,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig::for_vcpus(1)
    }
}

impl PagerConfig {
    /// The default for a VM with `vcpus` vCPUs: one handler each, 16-page fault-around, no write
    /// tracking.
    pub fn for_vcpus(vcpus: usize) -> Self {
        PagerConfig {
            handlers: vcpus.max(1),
            write_tracking: false,
            fault_around_pages: 16,
            vcpus: vcpus.max(1),
        }
    }
}

/// Errors of the pager; each says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The userfaultfd layer failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// Registration of a RAM region failed.
    #[error(
        "cannot register guest RAM {gpa:#x}+{len:#x} (host {host:#x}) with userfaultfd: {source}"
    )]
    Register {
        /// Region GPA.
        gpa: u64,
        /// Region length.
        len: u64,
        /// Host address.
        host: u64,
        /// Cause.
        #[source]
        source: UffdError,
    },
    /// The configuration cannot work.
    #[error("invalid pager configuration: {0}")]
    Config(String),
    /// A reclaim range of zero bytes.
    #[error(
        "reclaim range at {gpa:#x} is empty: give a length of at least one page ({page:#x} bytes)"
    )]
    EmptyRange {
        /// Start.
        gpa: u64,
        /// Backing page size.
        page: u64,
    },
    /// A reclaim range not aligned to the backing's page size.
    #[error("reclaim range {gpa:#x}+{len:#x} is not aligned to the guest RAM page size {page:#x}: round the start down and the length up to a multiple of it")]
    Unaligned {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Backing page size.
        page: u64,
    },
    /// A reclaim range that is not entirely inside one RAM region.
    #[error("reclaim range {gpa:#x}+{len:#x} is not inside guest RAM (RAM is {ram}): give a range inside one RAM region")]
    OutsideRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// The RAM regions, for the message.
        ram: String,
    },
    /// madvise failed.
    #[error("dropping host memory of {gpa:#x}+{len:#x} failed: {source}")]
    Drop {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Thread or eventfd creation failed.
    #[error("cannot start the fault handlers: {0}")]
    Spawn(#[source] io::Error),
    /// [`Pager::place`] could not copy the data in.
    #[error("placing guest memory at {gpa:#x}+{len:#x} failed: {source}; the host could not back the page (free host memory or raise the huge page pool)")]
    Place {
        /// Start of the part that failed.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Cause.
        #[source]
        source: UffdError,
    },
    /// [`Pager::settle`] timed out: faults were still being handled with the vCPUs paused.
    #[error("page faults still in flight after {waited_ms} ms with the vCPUs paused ({held} read by the fault handlers and not yet resolved{unread}): a fault handler is stuck (see the log for the fault it reports); resume the VM, or retry with a longer timeout")]
    Settle {
        /// How long settle waited.
        waited_ms: u64,
        /// Fault messages read and not yet resolved when it gave up.
        held: u64,
        /// ", and messages unread on the userfaultfd" when some were, else empty.
        unread: &'static str,
    },
}

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

/// Counters of the pager (monotonic, shared by the handlers).
#[derive(Default, Debug)]
struct Counters {
    ev_missing: AtomicU64,
    ev_wp: AtomicU64,
    ev_minor: AtomicU64,
    ev_remove: AtomicU64,
    ev_unmap: AtomicU64,
    ev_remap: AtomicU64,
    ev_fork: AtomicU64,
    populated_4k: AtomicU64,
    populated_2m: AtomicU64,
    populated_1g: AtomicU64,
    installed: AtomicU64,
    spurious: AtomicU64,
    relaxed: AtomicU64,
    retry: AtomicU64,
    denied: AtomicU64,
    fault_around: AtomicU64,
    refills: AtomicU64,
    eexist: AtomicU64,
    eagain: AtomicU64,
    /// Faults the host refused to back (each one stopped the VM).
    fatal: AtomicU64,
    deferred: AtomicU64,
    deferred_dropped: AtomicU64,
    wp_cleared: AtomicU64,
    wp_waited: AtomicU64,
    continued: AtomicU64,
    hole_punches: AtomicU64,
    harvests: AtomicU64,
    harvested_pages: AtomicU64,
    reclaims: AtomicU64,
    reclaimed_bytes: AtomicU64,
    zapped: AtomicU64,
    external_invalidations: AtomicU64,
    own_removes: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A snapshot of the pager's statistics and stage2's.
#[derive(Clone, Debug)]
pub struct PagingStats {
    /// Guest RAM is a shared memfd (MISSING + MINOR faults) rather than private memory.
    pub shared_memory: bool,
    /// Bytes mapped from the shared memory file by UFFDIO_CONTINUE (MINOR faults).
    pub continued: u64,
    /// Reclaims done by punching a hole in the shared memory file.
    pub hole_punches: u64,
    /// stage2's own statistics (mapped bytes by page size, outcomes, invalidations, ...).
    pub stage2: stage2::Stats,
    /// userfaultfd events by kind: MISSING faults.
    pub events_missing: u64,
    /// WP faults.
    pub events_wp: u64,
    /// MINOR faults.
    pub events_minor: u64,
    /// REMOVE events.
    pub events_remove: u64,
    /// UNMAP events.
    pub events_unmap: u64,
    /// REMAP events.
    pub events_remap: u64,
    /// FORK events.
    pub events_fork: u64,
    /// Host bytes populated by this pager, in 4 KiB pages.
    pub populated_4k: u64,
    /// Host bytes populated in 2 MiB pages.
    pub populated_2m: u64,
    /// Host bytes populated in 1 GiB pages.
    pub populated_1g: u64,
    /// Fault outcomes as stage2 answered the handlers: installs.
    pub installed: u64,
    /// Spurious (already mapped).
    pub spurious: u64,
    /// Relaxed in place.
    pub relaxed: u64,
    /// Retry (an invalidation raced or a BBM was in flight).
    pub retry: u64,
    /// Denied.
    pub denied: u64,
    /// Extra 4 KiB pages filled and mapped by fault-around.
    pub fault_around_pages: u64,
    /// MISSING faults on GPAs stage2 mapped whose host page was really gone (refilled).
    pub refills: u64,
    /// EEXIST races (a fill found the page present).
    pub eexist: u64,
    /// EAGAIN races (a fill met a pending REMOVE, or stopped part way).
    pub eagain: u64,
    /// Faults the host refused to back (each stops the VM).
    pub fatal: u64,
    /// Faults deferred (fill or install retried later).
    pub deferred: u64,
    /// Deferred faults given up (host page gone, or too many attempts).
    pub deferred_dropped: u64,
    /// WP faults answered by clearing the host write protection.
    pub wp_cleared: u64,
    /// WP faults that found a dirty-log harvest running and were finished after it.
    pub wp_waited: u64,
    /// Dirty-log harvests ([`Pager::harvest_dirty`]).
    pub harvests: u64,
    /// 4 KiB pages reported dirty by those harvests.
    pub harvested_pages: u64,
    /// Reclaims done.
    pub reclaims: u64,
    /// Bytes reclaimed.
    pub reclaimed_bytes: u64,
    /// Stage2 leaves zapped by reclaims and external removes.
    pub zapped: u64,
    /// REMOVE/UNMAP events not caused by this VMM, bracketed by the handlers.
    pub external_invalidations: u64,
    /// REMOVE events caused by our own reclaims (already bracketed).
    pub own_removes: u64,
}

impl fmt::Display for PagingStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: [(&str, u64); 34] = [
            ("uffd events: missing", self.events_missing),
            ("uffd events: write-protect", self.events_wp),
            ("uffd events: minor", self.events_minor),
            ("uffd events: remove", self.events_remove),
            ("uffd events: unmap", self.events_unmap),
            ("uffd events: remap", self.events_remap),
            ("uffd events: fork", self.events_fork),
            ("populated bytes 4K", self.populated_4k),
            ("populated bytes 2M", self.populated_2m),
            ("populated bytes 1G", self.populated_1g),
            ("faults installed", self.installed),
            ("faults spurious", self.spurious),
            ("faults relaxed", self.relaxed),
            ("faults retry", self.retry),
            ("faults denied", self.denied),
            ("fault-around pages", self.fault_around_pages),
            ("refills (host lost page)", self.refills),
            ("races EEXIST", self.eexist),
            ("races EAGAIN", self.eagain),
            ("fills refused (fatal)", self.fatal),
            ("deferred faults", self.deferred),
            ("deferred faults dropped", self.deferred_dropped),
            ("WP cleared", self.wp_cleared),
            ("bytes mapped by CONTINUE", self.continued),
            ("reclaims by hole punch", self.hole_punches),
            ("WP waited for a harvest", self.wp_waited),
            ("dirty harvests", self.harvests),
            ("dirty pages harvested", self.harvested_pages),
            ("reclaims", self.reclaims),
            ("reclaimed bytes", self.reclaimed_bytes),
            ("zapped leaves", self.zapped),
            ("external invalidations", self.external_invalidations),
            ("own removes", self.own_removes),
            (
                "populated bytes total",
                self.populated_4k + self.populated_2m + self.populated_1g,
            ),
        ];
        writeln!(
            f,
            "demand paging on {}",
            if self.shared_memory {
                "shared memfd memory (MISSING + MINOR faults, UFFDIO_CONTINUE, hole-punch reclaim)"
            } else {
                "private memory"
            }
        )?;
        writeln!(f, "{:<28} {:>16}", "demand paging", "count")?;
        for (name, v) in rows {
            writeln!(f, "{name:<28} {v:>16}")?;
        }
        write!(f, "{}", self.stage2)
    }
}

impl PagingStats {
    /// The statistics as JSON (for the control socket): `{"paging": {...}, "stage2": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.stage2;
        serde_json::json!({
            "paging": {
                "memory": if self.shared_memory { "shared" } else { "private" },
                "continued_bytes": self.continued,
                "hole_punches": self.hole_punches,
                "events_missing": self.events_missing,
                "events_wp": self.events_wp,
                "events_minor": self.events_minor,
                "events_remove": self.events_remove,
                "events_unmap": self.events_unmap,
                "events_remap": self.events_remap,
                "events_fork": self.events_fork,
                "populated_bytes_4k": self.populated_4k,
                "populated_bytes_2m": self.populated_2m,
                "populated_bytes_1g": self.populated_1g,
                "installed": self.installed,
                "spurious": self.spurious,
                "relaxed": self.relaxed,
                "retry": self.retry,
                "denied": self.denied,
                "fault_around_pages": self.fault_around_pages,
                "refills": self.refills,
                "eexist": self.eexist,
                "eagain": self.eagain,
                "fatal": self.fatal,
                "deferred": self.deferred,
                "deferred_dropped": self.deferred_dropped,
                "wp_cleared": self.wp_cleared,
                "wp_waited": self.wp_waited,
                "harvests": self.harvests,
                "harvested_pages": self.harvested_pages,
                "reclaims": self.reclaims,
                "reclaimed_bytes": self.reclaimed_bytes,
                "zapped": self.zapped,
                "external_invalidations": self.external_invalidations,
                "own_removes": self.own_removes,
            },
            "stage2": {
                "installs_4k": s.installs_4k,
                "installs_2m": s.installs_2m,
                "installs_1g": s.installs_1g,
                "spurious": s.spurious,
                "relaxed": s.relaxed,
                "retries": s.retries,
                "denied": s.denied,
                "bbms": s.bbms,
                "splits": s.splits,
                "collapses": s.collapses,
                "zapped": s.zapped,
                "undone": s.undone,
                "invalidations": s.invalidations,
                "yields": s.yields,
                "tables_live": s.tables_live,
                "mapped_4k": s.mapped_4k,
                "mapped_2m": s.mapped_2m,
                "mapped_1g": s.mapped_1g,
                "mapped_bytes": s.mapped_bytes(),
                "dirty_marked": s.dirty_marked,
                "write_protected": s.write_protected,
            }
        })
    }
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

/// The host view of guest RAM that stage2 asks on a fault: every RAM GPA is backed by the
/// naturally aligned host block of the backing's page size, readable, writable, executable.
pub struct GuestRamBacking {
    regions: Vec<RamRegion>,
    page: PageSize,
}

impl GuestRamBacking {
    /// A backing over `regions` (sorted by GPA) with host pages of `page`.
    pub fn new(mut regions: Vec<RamRegion>, page: PageSize) -> Self {
        regions.sort_by_key(|r| r.gpa);
        GuestRamBacking { regions, page }
    }

    fn region_of_gpa(&self, gpa: u64) -> Option<&RamRegion> {
        let i = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (gpa - r.gpa < r.len).then_some(r)
    }

    fn region_of_host(&self, hva: u64) -> Option<&RamRegion> {
        self.regions
            .iter()
            .find(|r| hva >= r.host_addr && hva - r.host_addr < r.len)
    }

    /// Host address of `gpa`, if RAM.
    pub fn gpa_to_host(&self, gpa: u64) -> Option<u64> {
        self.region_of_gpa(gpa).map(|r| r.host_addr + (gpa - r.gpa))
    }

    /// GPA of host address `hva`, if RAM.
    pub fn host_to_gpa(&self, hva: u64) -> Option<u64> {
        self.region_of_host(hva)
            .map(|r| r.gpa + (hva - r.host_addr))
    }
}

impl Backing for GuestRamBacking {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        let r = self.region_of_gpa(gpa)?;
        let size = self.page.bytes();
        let block = gpa & !(size - 1);
        Some(Resolved {
            frame: r.host_addr + (block - r.gpa),
            max_size: self.page,
            perms: Perms::RWX,
        })
    }
}

/// A read-only anonymous mapping that reads as zeroes: the source of UFFDIO_COPY where the
/// kernel has no zero page to map (hugetlbfs; write-protected fills). Never written, so it
/// costs no memory: it is populated up front with the shared zero page (page tables only).
/// Populated matters: the kernel copies from the source with page faults disabled, and on a
/// miss it retries through a *temporary* huge page allocated outside the pool reservation, which
/// fails with ENOMEM when the guest holds every page of the pool (seen with 1 GiB pages).
struct ZeroSource {
    addr: u64,
    len: u64,
}

impl ZeroSource {
    fn new(len: u64) -> io::Result<ZeroSource> {
        // SAFETY: a fresh private anonymous read-only mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ZeroSource {
            addr: p as u64,
            len,
        })
    }
}

impl Drop for ZeroSource {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; no reference into it outlives self.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// State shared by the handlers, the reclaim path and the owner.
struct Shared {
    uffd: Uffd,
    s2: Arc<VmStage2>,
    backing: GuestRamBacking,
    page: PageSize,
    cfg: PagerConfig,
    zero: ZeroSource,
    counters: Counters,
    /// Serialises `read(2)` of the uffd with the processing of the REMOVE/UNMAP events read
    /// (see the module doc); [`Pager::reclaim`] takes it once after its drop to know that the
    /// REMOVE it caused has been seen.
    event_lock: Mutex<()>,
    /// Host ranges being dropped by our own reclaims (already bracketed in stage2).
    own_drops: Mutex<Vec<Range<u64>>>,
    /// Thread id of each vCPU (index), 0 when unknown.
    vcpu_tids: Vec<AtomicU32>,
    /// Called once with the reason when a fault cannot be served (see [`Pager::on_fatal`]).
    on_fatal: Mutex<Option<FatalHandler>>,
    /// Where MISSING faults get their data; zeroes when `None` (see [`Pager::set_page_source`]).
    source: RwLock<Option<Arc<dyn PageSource>>>,
    /// Shared backing: each region's memfd (file offset 0 = the region's GPA); empty for private
    /// memory.
    files: Vec<(RamRegion, Arc<File>)>,
    /// GPA ranges being fetched from the page source by a handler (see `claim_fetch`).
    inflight: Mutex<Vec<Range<u64>>>,
    /// Dirty logging: WP-fault handlers hold it shared across stage2 relax + host unprotect, a
    /// harvest holds it exclusive across stage2 get-and-clear + host re-protect (module doc).
    dirty_lock: RwLock<()>,
    /// Dirty logging is on (between `start_dirty_log` and `stop_dirty_log`).
    dirty_logging: AtomicBool,
    /// Fault messages in the handlers' hands: counted when read (under `event_lock`, in the
    /// same critical section as the `read(2)`), released once resolved (stage2 updated, dirty
    /// bit set, host page filled or unprotected) or dropped. A deferred fault stays counted.
    /// [`Pager::settle`] waits for zero.
    faults_held: AtomicU64,
    stop: EventFd,
    stopping: AtomicBool,
}

/// A handler's shared hold on the dirty lock (empty without write tracking).
struct DirtyShared<'a> {
    _guard: Option<RwLockReadGuard<'a, ()>>,
}

/// What a handler may fetch from the page source (see `Shared::claim_fetch`).
enum Claim {
    /// The faulting page is present already: nothing to fetch.
    Present,
    /// Another handler is fetching it: try again once that fetch is in.
    InFlight,
    /// Fetch this many bytes from the block.
    Run(u64),
}

/// Told why the pager cannot go on (a guest page the host cannot provide).
pub type FatalHandler = Box<dyn Fn(&str) + Send + Sync>;

impl Shared {
    /// The memfd behind `region` (shared backing only).
    fn file_of(&self, region: &RamRegion) -> Option<&File> {
        self.files
            .iter()
            .find(|(r, _)| r.gpa == region.gpa)
            .map(|(_, f)| &**f)
    }

    /// The page source, if one is set.
    fn source(&self) -> Option<Arc<dyn PageSource>> {
        self.source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the host has a page at `gpa` (mincore of its 4 KiB page; on hugetlbfs that is
    /// the huge page's presence).
    fn host_present(&self, gpa: u64) -> bool {
        let Some(hva) = self.backing.gpa_to_host(gpa & !(SZ_4K - 1)) else {
            return false;
        };
        let mut vec = 0u8;
        // SAFETY: one page-aligned page of a live registered mapping; `vec` holds one byte.
        let ret = unsafe { libc::mincore(hva as *mut libc::c_void, SZ_4K as usize, &mut vec) };
        ret == 0 && vec & 1 != 0
    }

    /// How many 4 KiB pages from `hva` on (at most `max`, inside one RAM region) the host does
    /// not have yet.
    fn missing_run(&self, hva: u64, max: u64) -> u64 {
        let mut vec = [0u8; 512];
        let n = max.min(vec.len() as u64);
        // SAFETY: [hva, hva + n pages) lies inside one live registered mapping (the caller
        // bounds `max` by the region); `vec` has a byte for each of the n pages.
        let ret = unsafe {
            libc::mincore(
                hva as *mut libc::c_void,
                (n * SZ_4K) as usize,
                vec.as_mut_ptr(),
            )
        };
        if ret != 0 {
            // Unknown: ask for the faulting page only.
            return 1;
        }
        vec[..n as usize].iter().take_while(|v| *v & 1 == 0).count() as u64
    }

    /// Claims the fetch of the missing run at `block` (`hva`), at most `max_pages` 4 KiB pages
    /// or one host page: under the in-flight lock, so that two handlers with faults on the
    /// same page (two vCPUs touched it) fetch it once. The run stops at the first present page
    /// and before any run another handler is fetching.
    fn claim_fetch(&self, block: u64, hva: u64, max_pages: u64) -> Claim {
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
    fn release_fetch(&self, block: u64) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = inflight.iter().position(|r| r.start == block) {
            inflight.swap_remove(i);
        }
    }

    /// The dirty lock, shared, for a fill or a WP relax (write tracking only; without it no lock
    /// is taken). `None` when a harvest holds it: the caller defers its fault and never waits
    /// here, so that handlers keep reading the REMOVE events a harvest may be waiting for.
    fn dirty_shared(&self) -> Option<DirtyShared<'_>> {
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

    /// `n` held fault messages are finished (see `faults_held`). Release: everything the
    /// handler did for them (stage2 entry and dirty bit, host fill or unprotect) is visible to
    /// whoever sees the count drop ([`Pager::settle`]'s acquire load).
    fn release_faults(&self, n: u64) {
        if n > 0 {
            let before = self.faults_held.fetch_sub(n, Ordering::SeqCst);
            debug_assert!(before >= n, "released {n} faults of {before} held");
        }
    }

    fn count_populated(&self, bytes: u64) {
        let c = &self.counters;
        match self.page {
            PageSize::Size4K => add(&c.populated_4k, bytes),
            PageSize::Size2M => add(&c.populated_2m, bytes),
            PageSize::Size1G => add(&c.populated_1g, bytes),
        }
    }

    /// Reports a fault that cannot be served: to the handler set with [`Pager::on_fatal`], which
    /// stops the VM; logged in any case.
    fn fatal(&self, why: &str) {
        error!("{why}");
        self.counters.fatal.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self
            .on_fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            f(why);
        }
    }
}

/// Fewest runs for which [`Pager::drop_runs_quiet`] unregisters and registers RAM again
/// (two ioctls per region) instead of dropping run by run.
const QUIET_DROP_MIN_RUNS: usize = 8;

/// Runs per `process_madvise` call of [`Pager::drop_runs_quiet`] (the kernel's limit on the
/// iovec count, UIO_MAXIOV).
const DROP_BATCH: usize = 1024;

/// A run of guest RAM to drop, with its host address.
struct HostRun {
    gpa: u64,
    len: u64,
    host: u64,
}

/// Whether `process_madvise(MADV_DONTNEED)` on this process failed as unsupported once (a
/// kernel before 6.13 allows it only for a few other advices): then every batch drops run by
/// run.
static PROCESS_MADVISE_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// A pidfd of this process, for `process_madvise`; None where pidfds are not available.
fn own_pidfd() -> Option<OwnedFd> {
    if PROCESS_MADVISE_UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it touches
    // no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by pidfd_open, so it is an open descriptor owned by no
    // one else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Drops the host pages of every run in `batch` (MADV_DONTNEED): with one `process_madvise`
/// call on this process where the kernel takes it (6.13 and later; since 6.16 it also flushes
/// the TLB once for the whole call instead of once per range), else one `madvise` per run.
/// A partial or failed `process_madvise` is redone run by run, which names the run that fails.
fn drop_host_runs(batch: &[HostRun], pidfd: Option<&OwnedFd>) -> Result<(), PagingError> {
    if let Some(pidfd) = pidfd {
        let iov: Vec<libc::iovec> = batch
            .iter()
            .map(|r| libc::iovec {
                iov_base: r.host as *mut libc::c_void,
                iov_len: r.len as usize,
            })
            .collect();
        let total: u64 = batch.iter().map(|r| r.len).sum();
        // SAFETY: every iovec names host memory of a guest RAM mapping this pager owns (the
        // caller checked each run against the regions), which the caller wants dropped; the
        // kernel only reads `iov`, which outlives the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd.as_raw_fd(),
                iov.as_ptr(),
                iov.len(),
                libc::MADV_DONTNEED,
                0,
            )
        };
        if ret >= 0 && ret as u64 == total {
            return Ok(());
        }
        if ret < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS | libc::EINVAL | libc::EPERM)
            ) {
                PROCESS_MADVISE_UNSUPPORTED.store(true, Ordering::Relaxed);
            }
        }
    }
    for r in batch {
        // SAFETY: [host, host+len) lies inside a guest RAM mapping this pager owns (checked by
        // the caller); dropping its pages is what the caller asked for, and the guest sees
        // zeroes (or, on its next touch once registered again, a MISSING fault).
        let ret = unsafe {
            libc::madvise(
                r.host as *mut libc::c_void,
                r.len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if ret != 0 {
            return Err(PagingError::Drop {
                gpa: r.gpa,
                len: r.len,
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The demand pager: owns the userfaultfd, the handler threads and the stage2 engine.
///
/// The host memory must outlive the pager: stop (or drop) the pager before unmapping guest RAM.
pub struct Pager {
    shared: Arc<Shared>,
    handlers: Vec<JoinHandle<()>>,
    registered: Vec<(u64, u64)>,
}

impl fmt::Debug for Pager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pager")
            .field("regions", &self.shared.backing.regions)
            .field("page", &self.shared.page)
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

/// The stage2 page size of a RAM backing (THP is paged at 4 KiB: userfaultfd fills 4 KiB pages).
pub fn backing_page_size(kind: BackingKind) -> PageSize {
    match kind.page_size() {
        SZ_1G => PageSize::Size1G,
        SZ_2M => PageSize::Size2M,
        _ => PageSize::Size4K,
    }
}

impl Pager {
    /// Registers every region of `ram` and starts the handlers. Stop the pager before `ram` is
    /// dropped.
    pub fn start(ram: &GuestRam, cfg: PagerConfig) -> Result<Pager, PagingError> {
        let page = backing_page_size(ram.backing());
        if ram.backing().is_shared() {
            return Self::start_shared(ram.shared_regions(), page, cfg);
        }
        let regions: Vec<RamRegion> = ram.regions().collect();
        Self::start_with_regions(&regions, page, cfg)
    }

    /// Registers shared guest RAM (`regions`: a memfd each, mapped MAP_SHARED; shmem for
    /// `Size4K`, hugetlbfs for the others) for MISSING and MINOR faults and starts the
    /// handlers (see the module doc, "Shared memory"). The mappings must stay until the pager
    /// is stopped.
    pub fn start_shared(
        regions: &[SharedRegion],
        page: PageSize,
        cfg: PagerConfig,
    ) -> Result<Pager, PagingError> {
        Self::start_inner(
            regions.iter().map(|r| r.region).collect(),
            page,
            cfg,
            regions,
        )
    }

    /// Registers `regions` (private anonymous memory with host pages of `page`: 4 KiB or THP
    /// for `Size4K`, hugetlbfs for the others) and starts the handlers. The memory must stay
    /// mapped until the pager is stopped.
    pub fn start_with_regions(
        regions: &[RamRegion],
        page: PageSize,
        cfg: PagerConfig,
    ) -> Result<Pager, PagingError> {
        Self::start_inner(regions.to_vec(), page, cfg, &[])
    }

    fn start_inner(
        regions: Vec<RamRegion>,
        page: PageSize,
        cfg: PagerConfig,
        shared: &[SharedRegion],
    ) -> Result<Pager, PagingError> {
        let regions = &regions[..];
        let is_shared = !shared.is_empty();
        if cfg.handlers == 0 {
            return Err(PagingError::Config(
                "handlers is 0: give at least one fault-handler thread".into(),
            ));
        }
        if cfg.fault_around_pages == 0 || cfg.fault_around_pages > 512 {
            return Err(PagingError::Config(format!(
                "fault_around_pages is {}: give 1 (off) to 512",
                cfg.fault_around_pages
            )));
        }
        let size = page.bytes();
        for r in regions {
            if !r.gpa.is_multiple_of(size)
                || !r.len.is_multiple_of(size)
                || !r.host_addr.is_multiple_of(size)
                || r.len == 0
            {
                return Err(PagingError::Config(format!(
                    "RAM region {:#x}+{:#x} at host {:#x} is not aligned to the {size:#x}-byte page size",
                    r.gpa, r.len, r.host_addr
                )));
            }
        }
        let hugetlb = page != PageSize::Size4K;
        let mut required = UFFD_FEATURE_EVENT_REMOVE;
        if hugetlb {
            required |= UFFD_FEATURE_MISSING_HUGETLBFS;
        }
        if is_shared {
            required |= if hugetlb {
                UFFD_FEATURE_MINOR_HUGETLBFS
            } else {
                UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM
            };
        }
        if cfg.write_tracking {
            required |= UFFD_FEATURE_PAGEFAULT_FLAG_WP;
            if hugetlb || is_shared {
                required |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
            }
        }
        let optional = UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_THREAD_ID;
        let uffd = Uffd::new(required, optional)?;
        let mut mode = UFFDIO_REGISTER_MODE_MISSING;
        if is_shared {
            mode |= UFFDIO_REGISTER_MODE_MINOR;
        }
        if cfg.write_tracking {
            mode |= UFFDIO_REGISTER_MODE_WP;
        }
        let mut registered = Vec::new();
        for r in regions {
            let ioctls = uffd.register(r.host_addr, r.len, mode).map_err(|source| {
                PagingError::Register {
                    gpa: r.gpa,
                    len: r.len,
                    host: r.host_addr,
                    source,
                }
            })?;
            registered.push((r.host_addr, r.len));
            let need_zeropage = !hugetlb && !cfg.write_tracking;
            let missing = if !ioctls.copy() {
                Some("UFFDIO_COPY")
            } else if need_zeropage && !ioctls.zeropage() {
                Some("UFFDIO_ZEROPAGE")
            } else if cfg.write_tracking && !ioctls.writeprotect() {
                Some("UFFDIO_WRITEPROTECT")
            } else if is_shared && !ioctls.continue_() {
                Some("UFFDIO_CONTINUE")
            } else {
                None
            };
            if let Some(ioctl) = missing {
                // Registration is undone when the fd closes.
                return Err(PagingError::Register {
                    gpa: r.gpa,
                    len: r.len,
                    host: r.host_addr,
                    source: UffdError::MissingIoctl {
                        start: r.host_addr,
                        len: r.len,
                        ioctl,
                        offered: ioctls.0,
                    },
                });
            }
        }
        let zero_len = size.max(cfg.fault_around_pages as u64 * SZ_4K);
        let zero = ZeroSource::new(zero_len).map_err(PagingError::Spawn)?;
        let s2 = Arc::new(Stage2::new(
            Ept,
            NoopTlb,
            Stage2Config {
                nr_vcpus: cfg.vcpus.max(1),
                ..Stage2Config::default()
            },
        ));
        let stop = EventFd::new(EFD_NONBLOCK).map_err(PagingError::Spawn)?;
        let shared = Arc::new(Shared {
            uffd,
            s2,
            backing: GuestRamBacking::new(regions.to_vec(), page),
            page,
            zero,
            counters: Counters::default(),
            event_lock: Mutex::new(()),
            own_drops: Mutex::new(Vec::new()),
            vcpu_tids: (0..cfg.vcpus.max(1)).map(|_| AtomicU32::new(0)).collect(),
            on_fatal: Mutex::new(None),
            source: RwLock::new(None),
            files: shared.iter().map(|r| (r.region, r.file.clone())).collect(),
            inflight: Mutex::new(Vec::new()),
            dirty_lock: RwLock::new(()),
            dirty_logging: AtomicBool::new(false),
            faults_held: AtomicU64::new(0),
            stop,
            stopping: AtomicBool::new(false),
            cfg: cfg.clone(),
        });
        let mut handlers = Vec::new();
        for i in 0..cfg.handlers {
            let sh = shared.clone();
            let handler = Handler::new(sh).map_err(PagingError::Spawn)?;
            let h = std::thread::Builder::new()
                .name(format!("uffd-{i}"))
                .spawn(move || handler.run())
                .map_err(PagingError::Spawn)?;
            handlers.push(h);
        }
        info!(
            "demand paging: {} region(s) of {} memory, {:?} pages, {} handler(s), write tracking {}, fault-around {}",
            regions.len(),
            if is_shared { "shared memfd (MISSING + MINOR)" } else { "private" },
            page,
            cfg.handlers,
            cfg.write_tracking,
            cfg.fault_around_pages
        );
        Ok(Pager {
            shared,
            handlers,
            registered,
        })
    }

    /// The stage2 engine: the VMM's authoritative map of guest RAM.
    pub fn stage2(&self) -> &Arc<VmStage2> {
        &self.shared.s2
    }

    /// The host page size demand paging works in.
    pub fn page_size(&self) -> PageSize {
        self.shared.page
    }

    /// Attributes faults of host thread `tid` (a vCPU thread, `gettid()`) to vCPU `vcpu`, for
    /// stage2's per-vCPU dirty rings. Unknown threads count as vCPU 0.
    pub fn set_vcpu_thread(&self, vcpu: usize, tid: u32) {
        if let Some(slot) = self.shared.vcpu_tids.get(vcpu) {
            slot.store(tid, Ordering::Relaxed);
        }
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
            .regions
            .iter()
            .filter(|r| sh.file_of(r).is_none())
            .copied()
            .collect();
        for r in &private {
            sh.uffd.unregister(r.host_addr, r.len)?;
        }
        let res = self.drop_unregistered(runs);
        for r in &private {
            sh.uffd
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

    /// The runs of [`Self::drop_runs_quiet`], private memory with the userfaultfd unregistered
    /// (runs on shared memory go through [`Self::reclaim`]): [`DROP_BATCH`] runs at a time are
    /// bracketed in stage2 together and dropped by one `process_madvise` ([`drop_host_runs`]).
    fn drop_unregistered(&self, runs: &[(u64, u64)]) -> Result<(), PagingError> {
        let sh = &self.shared;
        let pidfd = own_pidfd();
        let mut batch = Vec::with_capacity(DROP_BATCH.min(runs.len()));
        for &(gpa, len) in runs {
            let region = self.check_range(gpa, len)?;
            if sh.file_of(&region).is_some() {
                self.reclaim(gpa, len)?;
                continue;
            }
            batch.push(HostRun {
                gpa,
                len,
                host: region.host_addr + (gpa - region.gpa),
            });
            if batch.len() == DROP_BATCH {
                self.drop_batch(&batch, pidfd.as_ref())?;
                batch.clear();
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.drop_batch(&batch, pidfd.as_ref())
    }

    /// One batch of [`Self::drop_unregistered`]: every run's stage2 invalidation starts, the
    /// host pages go, then the invalidations end (last started, first ended).
    fn drop_batch(&self, batch: &[HostRun], pidfd: Option<&OwnedFd>) -> Result<(), PagingError> {
        let sh = &self.shared;
        let zapped: usize = batch
            .iter()
            .map(|r| sh.s2.invalidate_range_start(r.gpa..r.gpa + r.len))
            .sum();
        let res = drop_host_runs(batch, pidfd);
        for r in batch.iter().rev() {
            sh.s2.invalidate_range_end(r.gpa..r.gpa + r.len);
        }
        res?;
        let c = &sh.counters;
        add(&c.reclaims, batch.len() as u64);
        add(&c.reclaimed_bytes, batch.iter().map(|r| r.len).sum());
        add(&c.zapped, zapped as u64);
        Ok(())
    }

    /// Drops the host memory of `[gpa, gpa+len)` and tells stage2, like the host's mmu notifier:
    /// `invalidate_range_start`, `MADV_DONTNEED` (on shared memory: a hole punched in the
    /// file), `invalidate_range_end`. The next guest access
    /// faults again and gets a fresh zero page. The range must lie inside one RAM region and be
    /// aligned to the backing's page size.
    pub fn reclaim(&self, gpa: u64, len: u64) -> Result<ReclaimReport, PagingError> {
        let sh = &self.shared;
        let region = self.check_range(gpa, len)?;
        let end = gpa + len;
        let host = region.host_addr + (gpa - region.gpa);
        if let Some(file) = sh.file_of(&region) {
            return self.punch(gpa, len, file, gpa - region.gpa);
        }
        let t0 = Instant::now();
        sh.own_drops.lock().unwrap().push(host..host + len);
        let zapped = sh.s2.invalidate_range_start(gpa..end);
        let t1 = Instant::now();
        // SAFETY: [host, host+len) lies inside a guest RAM mapping this pager registered (checked
        // above); dropping its pages is what the caller asked for, and the guest sees zeroes.
        let ret =
            unsafe { libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
        let drop_err = (ret != 0).then(io::Error::last_os_error);
        let drop_ns = t1.elapsed().as_nanos() as u64;
        // The REMOVE event of this drop was read before madvise returned; taking the event lock
        // waits until the handler that read it has processed it (and seen it as ours).
        drop(sh.event_lock.lock().unwrap());
        {
            let mut own = sh.own_drops.lock().unwrap();
            if let Some(i) = own.iter().position(|r| *r == (host..host + len)) {
                own.swap_remove(i);
            }
        }
        sh.s2.invalidate_range_end(gpa..end);
        if let Some(source) = drop_err {
            return Err(PagingError::Drop { gpa, len, source });
        }
        let c = &sh.counters;
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
    /// REMOVE event is raised (only madvise raises one), so there is nothing to wait for.
    fn punch(
        &self,
        gpa: u64,
        len: u64,
        file: &File,
        offset: u64,
    ) -> Result<ReclaimReport, PagingError> {
        let sh = &self.shared;
        let t0 = Instant::now();
        let zapped = sh.s2.invalidate_range_start(gpa..gpa + len);
        let t1 = Instant::now();
        // SAFETY: fallocate on our own memfd; the range lies inside the file (checked against
        // the region, whose file offset 0 is its GPA). No Rust reference into the range exists
        // (guest RAM is accessed with volatile copies), and the guest sees zeroes after.
        let ret = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        let drop_err = (ret != 0).then(io::Error::last_os_error);
        let drop_ns = t1.elapsed().as_nanos() as u64;
        sh.s2.invalidate_range_end(gpa..gpa + len);
        if let Some(source) = drop_err {
            return Err(PagingError::Drop { gpa, len, source });
        }
        let c = &sh.counters;
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

    /// The RAM region holding all of `[gpa, gpa+len)`, a non-empty range aligned to the
    /// backing's page size.
    fn check_range(&self, gpa: u64, len: u64) -> Result<RamRegion, PagingError> {
        let page = self.shared.page.bytes();
        if len == 0 {
            return Err(PagingError::EmptyRange { gpa, page });
        }
        let Some(end) = gpa.checked_add(len) else {
            return Err(self.outside(gpa, len));
        };
        let Some(region) = self.shared.backing.region_of_gpa(gpa).copied() else {
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
        let sh = &self.shared;
        let c = &sh.counters;
        let page = sh.page.bytes();
        let len = data.len() as u64;
        let region = self.check_range(gpa, len)?;
        let host = region.host_addr + (gpa - region.gpa);
        let (mode, access) = if sh.cfg.write_tracking {
            (
                UFFDIO_COPY_MODE_WP | UFFDIO_COPY_MODE_DONTWAKE,
                Access::Read,
            )
        } else {
            (UFFDIO_COPY_MODE_DONTWAKE, Access::Write)
        };
        let mut placed = false;
        let mut off = 0;
        let mut retries = 0;
        while off < len {
            let seq = sh.s2.invalidate_seq();
            let src = data[off as usize..].as_ptr() as u64;
            // SAFETY: `src` points at the `len - off` bytes left of `data`, borrowed for the call.
            let r = unsafe { sh.uffd.copy(host + off, src, len - off, mode) };
            let n = match r {
                Ok(n) => n,
                // Copied up to a present page or a pending event; the rest on the next turn.
                Err(UffdError::Again { done, .. }) if done > 0 => {
                    inc(&c.eagain);
                    done
                }
                Err(UffdError::Exists { addr }) => {
                    // The page at `addr` is there (nothing copied): skip it, keep it.
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
            sh.count_populated(n);
            placed = true;
            for p in (off..off + n).step_by(page as usize) {
                self.install_placed(gpa + p, access, seq);
            }
            if let Err(e) = sh.uffd.wake(host + off, n) {
                error!("UFFDIO_WAKE of gpa {:#x}+{n:#x}: {e}", gpa + off);
            }
            off += n;
        }
        Ok(placed)
    }

    /// Records a host page `place` filled in stage2 (the handler's `install`, for one page).
    /// An invalidation racing with it is waited out, as long as the host still has the page.
    fn install_placed(&self, gpa: u64, access: Access, mut seq: u64) {
        let sh = &self.shared;
        let c = &sh.counters;
        for _ in 0..PLACE_RETRIES {
            let fault = Fault {
                gpa,
                access,
                vcpu: 0,
            };
            match sh.s2.handle_fault(fault, &sh.backing, seq) {
                Outcome::Installed { .. } => inc(&c.installed),
                Outcome::Spurious => inc(&c.spurious),
                Outcome::Relaxed { .. } => inc(&c.relaxed),
                Outcome::Denied => {
                    inc(&c.denied);
                    error!("stage2 denied recording placed memory at gpa {gpa:#x}");
                }
                Outcome::Retry => {
                    inc(&c.retry);
                    if !sh.host_present(gpa) {
                        // Dropped meanwhile: the next access faults and fills it afresh.
                        return;
                    }
                    std::thread::yield_now();
                    seq = sh.s2.invalidate_seq();
                    continue;
                }
            }
            return;
        }
        warn!("placed page at gpa {gpa:#x} not recorded in stage2: invalidations kept racing");
    }

    fn outside(&self, gpa: u64, len: u64) -> PagingError {
        let ram = self
            .shared
            .backing
            .regions
            .iter()
            .map(|r| format!("{:#x}..{:#x}", r.gpa, r.gpa + r.len))
            .collect::<Vec<_>>()
            .join(", ");
        PagingError::OutsideRam { gpa, len, ram }
    }

    /// Starts stage2-wp dirty logging (the pager must run with `write_tracking`): stage2 dirty
    /// logging on (blocks split eagerly to 4 KiB, every leaf write-protected), then every host
    /// page of guest RAM write-protected with the pager's userfaultfd, so that each first write
    /// raises a WP fault that stage2 records. Pages filled later are filled write-protected on
    /// a read, and recorded dirty on a write.
    pub fn start_dirty_log(&self) -> Result<(), PagingError> {
        let sh = &self.shared;
        self.need_tracking("start_dirty_log")?;
        let _excl = sh.dirty_lock.write().unwrap_or_else(|p| p.into_inner());
        sh.s2.dirty().enable(stage2::SplitPolicy::Eager);
        for r in &sh.backing.regions {
            self.protect_host(r.host_addr, r.len)?;
        }
        sh.dirty_logging.store(true, Ordering::SeqCst);
        info!("dirty logging (stage2 + userfaultfd write-protect) started");
        Ok(())
    }

    /// Get and clear the dirty log of `[gpa, gpa+len)` (inside one RAM region, aligned to the
    /// host page size): bit `i % 64` of word `i / 64` is set when page `gpa + i * 4096` was
    /// written since the previous harvest. The pages reported are write-protected again, in
    /// stage2 and on the host, before this returns, so a copy made afterwards holds every
    /// write they had and the next write to each is in the next harvest.
    ///
    /// Serialised against the WP-fault handlers (module doc): no write is lost and no pagemap
    /// sweep is needed. On hugetlbfs the host protects whole huge pages, so a dirty 4 KiB page
    /// reports its whole host page (the other 4 KiB pages of it were writable without a fault).
    pub fn harvest_dirty(&self, gpa: u64, len: u64) -> Result<Vec<u64>, PagingError> {
        let sh = &self.shared;
        self.need_tracking("harvest_dirty")?;
        if !sh.dirty_logging.load(Ordering::SeqCst) {
            return Err(PagingError::Config(
                "harvest_dirty before start_dirty_log: start dirty logging first".into(),
            ));
        }
        let region = self.check_range(gpa, len)?;
        let pages = len / SZ_4K;
        let mut words = vec![0u64; pages.div_ceil(64) as usize];
        let _excl = sh.dirty_lock.write().unwrap_or_else(|p| p.into_inner());
        let taken = sh.s2.dirty().harvest(gpa..gpa + len);
        for p in taken.iter() {
            let i = (p - gpa) / SZ_4K;
            words[(i / 64) as usize] |= 1 << (i % 64);
        }
        // Re-protect on the host, in runs of whole host pages; on hugetlbfs report those.
        let per_host = sh.page.bytes() / SZ_4K;
        let is_set = |w: &[u64], i: u64| w[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let mut i = 0;
        let mut reported = 0;
        while i < pages {
            if words[(i / 64) as usize] == 0 && i % 64 == 0 {
                i += 64;
                continue;
            }
            let hp = i / per_host * per_host;
            if !(hp..hp + per_host).any(|j| is_set(&words, j)) {
                i = hp + per_host;
                continue;
            }
            // A run of host pages with at least one dirty page each.
            let start = hp;
            let mut end = hp + per_host;
            while end < pages && (end..end + per_host).any(|j| is_set(&words, j)) {
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
        inc(&sh.counters.harvests);
        add(&sh.counters.harvested_pages, reported);
        Ok(words)
    }

    /// Returns once no guest page fault is in flight in the pager: every fault message a
    /// handler has read is resolved (stage2 updated and, for a write, its dirty bit set; the
    /// host page filled or unprotected), none is deferred, and the userfaultfd holds no unread
    /// message. Call it with every vCPU paused (out of `KVM_RUN`), after the last round's pause
    /// and before its harvest, so that the harvest is the last word: no fault the vCPUs took
    /// before the pause sets a bit (or makes a host page writable) after it.
    /// `Err(PagingError::Settle)` if that does not happen within `timeout`.
    ///
    /// Why this is needed and why it suffices (module doc, "Faults in flight at a pause"): a
    /// vCPU kicked out of `KVM_RUN` while it waits in `handle_userfault` leaves with its
    /// message either unread (the kernel removes it from the queue) or read, and then in a
    /// handler's hands, possibly deferred because a harvest held the dirty lock. The handlers
    /// count each fault message in the same critical section as the `read(2)` that took it
    /// (under `event_lock`, which this takes too), and release it once done, so "nothing held
    /// and nothing unread" observed under that lock means no fault can still set a bit. A
    /// thread that faults after that check (not a paused vCPU: e.g. the VMM writing guest RAM)
    /// is a write after `settle`.
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
                let unread = sh.uffd.poll_readable(0).unwrap_or(true);
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

    /// Stops dirty logging: stage2 stops recording; the host protection left on pages is
    /// lifted lazily by their next write (a WP fault relaxed without a record).
    pub fn stop_dirty_log(&self) -> Result<(), PagingError> {
        let sh = &self.shared;
        self.need_tracking("stop_dirty_log")?;
        let _excl = sh.dirty_lock.write().unwrap_or_else(|p| p.into_inner());
        sh.s2.dirty().disable();
        sh.dirty_logging.store(false, Ordering::SeqCst);
        info!("dirty logging stopped");
        Ok(())
    }

    fn need_tracking(&self, what: &str) -> Result<(), PagingError> {
        if self.shared.cfg.write_tracking {
            return Ok(());
        }
        Err(PagingError::Config(format!(
            "{what} needs write tracking: start the pager with write_tracking = true"
        )))
    }

    /// Write-protects host `[host, host+len)`. A pending REMOVE (EAGAIN: the kernel refuses
    /// while the address space is changing) is waited out: the handlers read it, and none of
    /// them waits for the dirty lock, which the caller may hold.
    fn protect_host(&self, host: u64, len: u64) -> Result<(), PagingError> {
        let sh = &self.shared;
        let mut tries = 0;
        loop {
            match sh.uffd.write_protect(host, len, true, false) {
                Ok(()) => return Ok(()),
                Err(UffdError::Again { .. }) if tries < PLACE_RETRIES => {
                    inc(&sh.counters.eagain);
                    tries += 1;
                    std::thread::sleep(PLACE_RETRY_SLEEP);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Records in stage2 the guest RAM the host already has (pages written before the pager
    /// started, e.g. a loaded kernel or the test guest's code and page tables), so that stage2
    /// maps every present page; those pages never fault. Call once, right after `start`, before
    /// vCPUs run. Returns the leaves installed.
    pub fn record_present(&self) -> Result<usize, PagingError> {
        const CHUNK: u64 = 64 << 20;
        let sh = &self.shared;
        let page = sh.page.bytes();
        let mut installed = 0;
        for r in &sh.backing.regions {
            let mut off = 0;
            while off < r.len {
                // Whole backing pages per chunk (a 1 GiB page is bigger than CHUNK).
                let n = CHUNK.max(page).min(r.len - off);
                let mut vec = vec![0u8; (n / SZ_4K) as usize];
                // SAFETY: [host_addr+off, +n) lies in a registered mapping; `vec` has one byte
                // per 4 KiB page of it.
                let ret = unsafe {
                    libc::mincore(
                        (r.host_addr + off) as *mut libc::c_void,
                        n as usize,
                        vec.as_mut_ptr(),
                    )
                };
                if ret != 0 {
                    return Err(PagingError::Spawn(io::Error::last_os_error()));
                }
                // Walk in backing pages: present when its first 4 KiB page is.
                let step = (page / SZ_4K) as usize;
                let mut i = 0;
                while i < vec.len() {
                    if vec[i] & 1 == 0 {
                        i += step;
                        continue;
                    }
                    let start = i;
                    while i < vec.len() && vec[i] & 1 != 0 {
                        i += step;
                    }
                    let gpa = r.gpa + off + start as u64 * SZ_4K;
                    let len = (i - start) as u64 * SZ_4K;
                    let hva = r.host_addr + off + start as u64 * SZ_4K;
                    installed += sh
                        .s2
                        .map_range(gpa, len, hva, Perms::RWX, sh.page)
                        .map_err(|e| {
                            PagingError::Config(format!("recording present RAM at {gpa:#x}: {e}"))
                        })?;
                }
                off += n;
            }
        }
        info!("demand paging: {installed} present page(s) recorded in stage2");
        Ok(installed)
    }

    /// Sets what happens when a fault cannot be served (the host refuses to provide the page):
    /// typically a request to stop the VM with an error. Without one, the error is only logged
    /// and the faulting vCPU stays blocked.
    pub fn on_fatal(&self, handler: impl Fn(&str) + Send + Sync + 'static) {
        *self
            .shared
            .on_fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Box::new(handler));
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> PagingStats {
        let c = &self.shared.counters;
        PagingStats {
            shared_memory: !self.shared.files.is_empty(),
            continued: get(&c.continued),
            hole_punches: get(&c.hole_punches),
            stage2: self.shared.s2.stats(),
            events_missing: get(&c.ev_missing),
            events_wp: get(&c.ev_wp),
            events_minor: get(&c.ev_minor),
            events_remove: get(&c.ev_remove),
            events_unmap: get(&c.ev_unmap),
            events_remap: get(&c.ev_remap),
            events_fork: get(&c.ev_fork),
            populated_4k: get(&c.populated_4k),
            populated_2m: get(&c.populated_2m),
            populated_1g: get(&c.populated_1g),
            installed: get(&c.installed),
            spurious: get(&c.spurious),
            relaxed: get(&c.relaxed),
            retry: get(&c.retry),
            denied: get(&c.denied),
            fault_around_pages: get(&c.fault_around),
            refills: get(&c.refills),
            eexist: get(&c.eexist),
            eagain: get(&c.eagain),
            fatal: get(&c.fatal),
            deferred: get(&c.deferred),
            deferred_dropped: get(&c.deferred_dropped),
            wp_cleared: get(&c.wp_cleared),
            wp_waited: get(&c.wp_waited),
            harvests: get(&c.harvests),
            harvested_pages: get(&c.harvested_pages),
            reclaims: get(&c.reclaims),
            reclaimed_bytes: get(&c.reclaimed_bytes),
            zapped: get(&c.zapped),
            external_invalidations: get(&c.external_invalidations),
            own_removes: get(&c.own_removes),
        }
    }

    /// Stops the handlers and closes the userfaultfd (the kernel then resolves any later fault
    /// of the range itself).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.handlers.is_empty() {
            return;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.stop.write(1) {
            error!("cannot signal the fault handlers to stop: {e}");
        }
        for h in self.handlers.drain(..) {
            if h.join().is_err() {
                error!("a fault-handler thread panicked");
            }
        }
        for &(start, len) in &self.registered {
            // The range may already be unmapped; closing the fd unregisters it anyway.
            if let Err(e) = self.shared.uffd.unregister(start, len) {
                debug!("unregister {start:#x}+{len:#x}: {e}");
            }
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A fault to finish later.
#[derive(Clone, Copy, Debug)]
struct Deferred {
    gpa: u64,
    access: Access,
    vcpu: usize,
    /// The host fill has not been done yet (it met a pending REMOVE).
    needs_fill: bool,
    /// A MINOR fault: the fill is a UFFDIO_CONTINUE.
    minor: bool,
    /// A WP fault that met a running dirty-log harvest (retried with `on_wp`).
    wp: bool,
    attempts: u32,
}

/// Result of a host fill.
/// Sorts the result of a fill ioctl (COPY, ZEROPAGE, CONTINUE of the faulting block) into
/// the outcomes every fill shares, counting them: `Ok(Ok(bytes))` filled, possibly in part
/// (the run stopped at a present page or a pending event; the faulting page is first, so it is
/// filled and the rest stays for their own faults); `Ok(Err(Present))` another handler filled
/// it (`install` wakes our vCPU); `Ok(Err(Pending))` a REMOVE/UNMAP is pending, nothing done.
/// Any other error is the caller's to judge.
fn fill_race(c: &Counters, r: Result<u64, UffdError>) -> Result<Result<u64, Fill>, UffdError> {
    match r {
        Ok(n) => Ok(Ok(n)),
        Err(UffdError::Again { done, .. }) if done > 0 => {
            inc(&c.eagain);
            Ok(Ok(done))
        }
        Err(UffdError::Exists { .. }) => {
            inc(&c.eexist);
            Ok(Err(Fill::Present))
        }
        Err(UffdError::Again { .. }) => {
            inc(&c.eagain);
            Ok(Err(Fill::Pending))
        }
        Err(e) => Err(e),
    }
}

enum Fill {
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

/// One fault-handler thread.
struct Handler {
    sh: Arc<Shared>,
    epoll: File,
    events: Vec<Event>,
    deferred: Vec<Deferred>,
    /// Page-source data on its way into guest RAM (empty until a source is used).
    source_buf: Vec<u8>,
}

impl Handler {
    fn new(sh: Arc<Shared>) -> io::Result<Self> {
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
            sh.uffd.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            TOKEN_UFFD,
        )?;
        add(sh.stop.as_raw_fd(), libc::EPOLLIN as u32, TOKEN_STOP)?;
        Ok(Handler {
            sh,
            epoll,
            events: Vec::with_capacity(EVENT_BATCH),
            deferred: Vec::new(),
            source_buf: Vec::new(),
        })
    }

    fn run(mut self) {
        loop {
            let timeout = if self.deferred.is_empty() {
                -1
            } else {
                DEFER_POLL_MS
            };
            match self.poll(timeout) {
                Ok(true) => {}
                Ok(false) => {
                    if self.sh.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                }
                Err(e) => {
                    error!("fault handler: poll failed: {e}; handler exits");
                    return;
                }
            }
            if self.sh.stopping.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = self.read_batch() {
                error!("fault handler: {e}");
            }
            let events = std::mem::take(&mut self.events);
            for ev in &events {
                self.on_event(*ev);
                if matches!(ev, Event::Pagefault { .. }) {
                    // Done with this message (a deferral holds its own count).
                    self.sh.release_faults(1);
                }
            }
            self.events = events;
            self.run_deferred();
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

    /// Reads a batch and processes its REMOVE/UNMAP events under the event lock. The fault
    /// messages read are counted as held before the lock is released (see [`Pager::settle`]).
    fn read_batch(&mut self) -> Result<(), UffdError> {
        let _guard = self.sh.event_lock.lock().unwrap();
        let read = self.sh.uffd.read_events(&mut self.events, EVENT_BATCH);
        let faults = self
            .events
            .iter()
            .filter(|e| matches!(e, Event::Pagefault { .. }))
            .count() as u64;
        self.sh.faults_held.fetch_add(faults, Ordering::SeqCst);
        for ev in &self.events {
            match *ev {
                Event::Remove { start, end } => {
                    inc(&self.sh.counters.ev_remove);
                    self.host_dropped(start, end);
                }
                Event::Unmap { start, end } => {
                    inc(&self.sh.counters.ev_unmap);
                    self.host_dropped(start, end);
                }
                _ => {}
            }
        }
        read.map(|_| ())
    }

    /// The host dropped `[start, end)`: bracket stage2 unless it was our own reclaim.
    fn host_dropped(&self, start: u64, end: u64) {
        let own = self
            .sh
            .own_drops
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.start <= start && end <= r.end);
        if own {
            inc(&self.sh.counters.own_removes);
            return;
        }
        inc(&self.sh.counters.external_invalidations);
        for r in &self.sh.backing.regions {
            let lo = start.max(r.host_addr);
            let hi = end.min(r.host_addr + r.len);
            if lo >= hi {
                continue;
            }
            let gpa = r.gpa + (lo - r.host_addr);
            let range = gpa..gpa + (hi - lo);
            let zapped = self.sh.s2.invalidate_range_start(range.clone());
            self.sh.s2.invalidate_range_end(range);
            add(&self.sh.counters.zapped, zapped as u64);
            debug!("external drop of host {lo:#x}..{hi:#x}: {zapped} stage2 leaves zapped");
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

    fn on_event(&mut self, ev: Event) {
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
                let Some(gpa) = self.sh.backing.host_to_gpa(addr) else {
                    error!(
                        "userfaultfd fault at host {addr:#x} outside guest RAM; waking the thread"
                    );
                    self.wake_page_of_host(addr);
                    return;
                };
                let vcpu = self.vcpu_of(tid);
                // Without write tracking the host lets the vCPU write a filled page with no
                // further event (a zero page is copied on write by the kernel), so stage2 must
                // record what the host grants: a writable entry. With tracking, a read fill is
                // write-protected and the first write comes back as a WP fault (Relaxed).
                let access = if write || !self.sh.cfg.write_tracking {
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

    fn block_of(&self, gpa: u64) -> u64 {
        gpa & !(self.sh.page.bytes() - 1)
    }

    fn wake_block(&self, gpa: u64) {
        let block = self.block_of(gpa);
        if let Some(hva) = self.sh.backing.gpa_to_host(block) {
            if let Err(e) = self.sh.uffd.wake(hva, self.sh.page.bytes()) {
                error!("UFFDIO_WAKE of gpa {block:#x}: {e}");
            }
        }
    }

    fn wake_page_of_host(&self, hva: u64) {
        let page = hva & !(SZ_4K - 1);
        if let Err(e) = self.sh.uffd.wake(page, SZ_4K) {
            error!("UFFDIO_WAKE of host {page:#x}: {e}");
        }
    }

    /// A MISSING fault (`minor` false: fill the host page, or batch) or a MINOR fault (shared
    /// backing: map the file's page with UFFDIO_CONTINUE), then record it in stage2.
    fn on_missing(&mut self, gpa: u64, access: Access, vcpu: usize, minor: bool) {
        let sh = self.sh.clone();
        // A write fill is writable at once and recorded dirty by its install: no harvest may
        // run between the two.
        let Some(_shared) = sh.dirty_shared() else {
            self.defer(gpa, access, vcpu, true, minor);
            return;
        };
        let seq = self.sh.s2.invalidate_seq();
        let fill = self.resolve(gpa, access == Access::Write, minor);
        let filled = match fill {
            Fill::Pending => {
                self.defer(gpa, access, vcpu, true, minor);
                return;
            }
            Fill::Failed => return,
            Fill::Gone => {
                self.wake_block(gpa);
                return;
            }
            Fill::Present => 0,
            Fill::Filled { bytes } => bytes,
        };
        if !self.install(gpa, access, vcpu, seq, filled) {
            self.defer(gpa, access, vcpu, false, minor);
        }
    }

    fn resolve(&mut self, gpa: u64, write: bool, minor: bool) -> Fill {
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
        let page = sh.page.bytes();
        let block = self.block_of(gpa);
        let Some(hva) = sh.backing.gpa_to_host(block) else {
            return Fill::Present;
        };
        let mode = if sh.cfg.write_tracking && !write {
            UFFDIO_CONTINUE_MODE_WP | UFFDIO_CONTINUE_MODE_DONTWAKE
        } else {
            UFFDIO_CONTINUE_MODE_DONTWAKE
        };
        let bytes = match fill_race(c, sh.uffd.continue_(hva, page, mode)) {
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

    /// Asks stage2 about a fault whose host page is present, and records fault-around pages.
    /// Returns false when an invalidation raced and the fault must be finished later.
    fn install(&mut self, gpa: u64, access: Access, vcpu: usize, seq: u64, filled: u64) -> bool {
        let c = &self.sh.counters;
        let outcome = self
            .sh
            .s2
            .handle_fault(Fault { gpa, access, vcpu }, &self.sh.backing, seq);
        match outcome {
            Outcome::Installed { .. } => {
                inc(&c.installed);
                let page_base = gpa & !(SZ_4K - 1);
                if self.sh.page == PageSize::Size4K && filled > SZ_4K {
                    self.map_around(page_base + SZ_4K, filled - SZ_4K, vcpu);
                }
            }
            Outcome::Spurious | Outcome::Relaxed { .. } => {
                if matches!(outcome, Outcome::Spurious) {
                    inc(&c.spurious);
                } else {
                    inc(&c.relaxed);
                }
                if filled > 0 {
                    // stage2 mapped it, yet the host lacked the page (a drop stage2 had not been
                    // told of yet, or the installer's fill still in flight): the fill restored it.
                    inc(&c.refills);
                    if self.sh.page == PageSize::Size4K && filled > SZ_4K {
                        self.map_around((gpa & !(SZ_4K - 1)) + SZ_4K, filled - SZ_4K, vcpu);
                    }
                }
            }
            Outcome::Retry => {
                inc(&c.retry);
                // An invalidation raced between our seq read and the install: the caller
                // finishes it later, if the host still has the page then; the vCPU sleeps on
                // until then. Fault-around pages of this fill are recorded the same way, page
                // by page.
                if self.sh.page == PageSize::Size4K {
                    let base = gpa & !(SZ_4K - 1);
                    for off in (SZ_4K..filled).step_by(SZ_4K as usize) {
                        self.defer(base + off, Access::Write, vcpu, false, false);
                    }
                }
                return false;
            }
            Outcome::Denied => {
                inc(&c.denied);
                error!("stage2 denied a {access:?} fault at gpa {gpa:#x} (vCPU {vcpu}); the access is not allowed");
            }
        }
        // The fill did not wake the vCPU: it resumes only once stage2 has recorded the page,
        // as a vCPU under KVM resumes only once its EPT entry is in.
        let block = self.block_of(gpa);
        self.wake_range(block, filled.max(self.sh.page.bytes()));
        true
    }

    fn wake_range(&self, gpa: u64, len: u64) {
        if let Some(hva) = self.sh.backing.gpa_to_host(gpa) {
            if let Err(e) = self.sh.uffd.wake(hva, len) {
                error!("UFFDIO_WAKE of gpa {gpa:#x}+{len:#x}: {e}");
            }
        }
    }

    /// Records fault-around pages `[gpa, gpa+len)` (filled by us) with one batched stage2 call
    /// that leaves alone any page another handler recorded meanwhile (a deferred fault on one
    /// of them may have been installed, read-only, since our fill); if a larger mapping is in
    /// the way, page by page.
    fn map_around(&mut self, gpa: u64, len: u64, vcpu: usize) {
        let Some(hva) = self.sh.backing.gpa_to_host(gpa) else {
            return;
        };
        let sh = self.sh.clone();
        let c = &sh.counters;
        match sh
            .s2
            .map_range_absent(gpa, len, hva, Perms::RWX, PageSize::Size4K)
        {
            Ok(n) => add(&c.fault_around, n as u64),
            Err(e) => {
                debug!("fault-around map_range {gpa:#x}+{len:#x}: {e}; page by page");
                for off in (0..len).step_by(SZ_4K as usize) {
                    let seq = self.sh.s2.invalidate_seq();
                    match self.sh.s2.handle_fault(
                        Fault {
                            gpa: gpa + off,
                            access: Access::Write,
                            vcpu,
                        },
                        &self.sh.backing,
                        seq,
                    ) {
                        Outcome::Installed { .. } => inc(&c.fault_around),
                        Outcome::Retry => self.defer(gpa + off, Access::Write, vcpu, false, false),
                        _ => {}
                    }
                }
            }
        }
    }

    /// Fills the host page (block) containing `gpa`; on 4 KiB backing with fault-around, also
    /// the missing pages after it, with one ioctl. Zeroes, or the page source's data when one is
    /// set (see [`PageSource`]).
    fn fill(&mut self, gpa: u64, write: bool) -> Fill {
        let sh = self.sh.clone();
        let c = &sh.counters;
        let page = sh.page.bytes();
        let block = self.block_of(gpa);
        let Some(region) = sh.backing.region_of_gpa(block) else {
            return Fill::Present;
        };
        let hva = region.host_addr + (block - region.gpa);
        // Fault-around fills the neighbours like the faulting page (writable after a write);
        // under write tracking they must stay protected, so it is off then.
        let around = sh.page == PageSize::Size4K && !sh.cfg.write_tracking;
        let around_pages =
            (sh.cfg.fault_around_pages as u64).min((region.gpa + region.len - block) / SZ_4K);
        // Under write tracking a read fault maps the page write-protected, so that the first
        // write raises a WP fault; the zero page cannot carry the uffd-wp bit, so COPY zeroes.
        let tracked = sh.cfg.write_tracking;
        // DONTWAKE: the vCPU is woken after stage2 recorded the page (see `install`).
        let copy_mode = if tracked && !write {
            UFFDIO_COPY_MODE_WP | UFFDIO_COPY_MODE_DONTWAKE
        } else {
            UFFDIO_COPY_MODE_DONTWAKE
        };
        let source = sh.source();
        let (len, result) = if let Some(src) = source {
            let len = match sh.claim_fetch(block, hva, if around { around_pages } else { 1 }) {
                Claim::Present => return Fill::Present,
                Claim::InFlight => return Fill::Pending,
                Claim::Run(len) => len,
            };
            let buf = self.source_buf(len);
            let copied = src.fetch(block, buf).map(|()| {
                // SAFETY: `buf` is this handler's own buffer of at least `len` bytes, alive and
                // not written during the call.
                unsafe { sh.uffd.copy(hva, buf.as_ptr() as u64, len, copy_mode) }
            });
            // After the copy: a fault deferred behind this fetch now finds its page present.
            sh.release_fetch(block);
            let r = match copied {
                Ok(r) => r,
                Err(why) => {
                    sh.fatal(&format!(
                    "the page source could not provide guest memory {block:#x}+{len:#x}: {why}; \
                         the VM cannot run without it"
                    ));
                    return Fill::Failed;
                }
            };
            (len, r)
        } else {
            let len = if around { around_pages * SZ_4K } else { page };
            // ZEROPAGE maps the shared zero page read-only: right for a read, but a write fault
            // filled that way takes a host copy-on-write fault on every page right after, so
            // writes get freshly allocated zeroed pages through COPY from the zero source.
            let r = if sh.page == PageSize::Size4K && !tracked && !write {
                sh.uffd.zeropage(hva, len, UFFDIO_ZEROPAGE_MODE_DONTWAKE)
            } else {
                // SAFETY: the zero source is a live read-only mapping of at least `len` bytes
                // (sized for the page size and the fault-around window at start).
                unsafe { sh.uffd.copy(hva, sh.zero.addr, len, copy_mode) }
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
    /// with page faults disabled (see [`ZeroSource`] for what a miss costs on hugetlbfs).
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

    /// A write to a userfaultfd-write-protected page (write tracking): stage2 relaxes its entry
    /// in place, then the host protection is cleared, which wakes the writer. Both under the
    /// dirty lock, shared. Returns false, having done nothing, when a harvest holds the lock:
    /// the fault is retried after it (never waited for here, so that this thread goes on
    /// reading the REMOVE events a harvest's re-protect may be waiting for).
    fn on_wp(&mut self, gpa: u64, vcpu: usize) -> bool {
        let sh = self.sh.clone();
        let Some(_shared) = sh.dirty_shared() else {
            return false;
        };
        let c = &self.sh.counters;
        let seq = self.sh.s2.invalidate_seq();
        let outcome = self.sh.s2.handle_fault(
            Fault {
                gpa,
                access: Access::Write,
                vcpu,
            },
            &self.sh.backing,
            seq,
        );
        match outcome {
            Outcome::Relaxed { .. } | Outcome::Spurious | Outcome::Installed { .. } => {
                match outcome {
                    Outcome::Relaxed { .. } => inc(&c.relaxed),
                    Outcome::Spurious => inc(&c.spurious),
                    _ => inc(&c.installed),
                }
                // Even when stage2 already allowed the write (Spurious), the host protection is
                // what stops the vCPU: it must go, or the write faults forever.
                let block = self.block_of(gpa);
                let Some(hva) = self.sh.backing.gpa_to_host(block) else {
                    return true;
                };
                // Counted before the ioctl, which wakes the writer: whoever sees the write done
                // sees it counted.
                inc(&c.wp_cleared);
                match self
                    .sh
                    .uffd
                    .write_protect(hva, self.sh.page.bytes(), false, false)
                {
                    Ok(()) => {}
                    Err(UffdError::Again { .. }) => {
                        // A REMOVE is pending: the writer retries and faults again after it.
                        c.wp_cleared.fetch_sub(1, Ordering::Relaxed);
                        inc(&c.eagain);
                        self.wake_block(gpa);
                    }
                    Err(e) => {
                        c.wp_cleared.fetch_sub(1, Ordering::Relaxed);
                        error!("clearing write protection of gpa {block:#x}: {e}");
                        self.wake_block(gpa);
                    }
                }
            }
            Outcome::Retry => {
                // The host page stays protected: waking makes the vCPU fault again.
                inc(&c.retry);
                self.wake_block(gpa);
            }
            Outcome::Denied => {
                inc(&c.denied);
                error!("stage2 denied a write at gpa {gpa:#x} (vCPU {vcpu})");
                self.wake_block(gpa);
            }
        }
        true
    }

    fn defer(&mut self, gpa: u64, access: Access, vcpu: usize, needs_fill: bool, minor: bool) {
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
    fn push_deferred(&mut self, d: Deferred) {
        self.sh.faults_held.fetch_add(1, Ordering::SeqCst);
        self.deferred.push(d);
    }

    /// Retries deferred faults: fills that met a pending REMOVE, installs that met an
    /// invalidation. An install goes ahead only if the host still has the page (KVM's order: the
    /// host page is resolved after the sequence is read, the install checks the sequence).
    fn run_deferred(&mut self) {
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
        for mut d in pending {
            d.attempts += 1;
            if d.attempts > MAX_DEFER_ATTEMPTS {
                warn!(
                    "gave up a fault at gpa {:#x} after {} attempts",
                    d.gpa, d.attempts
                );
                inc(&self.sh.counters.deferred_dropped);
                self.wake_block(d.gpa);
                continue;
            }
            if d.wp {
                if !self.on_wp(d.gpa, d.vcpu) {
                    self.push_deferred(d);
                }
                continue;
            }
            let sh = self.sh.clone();
            let Some(_shared) = sh.dirty_shared() else {
                self.push_deferred(d);
                continue;
            };
            let seq = self.sh.s2.invalidate_seq();
            let filled = if d.needs_fill {
                match self.resolve(d.gpa, d.access == Access::Write, d.minor) {
                    Fill::Pending => {
                        self.push_deferred(d);
                        continue;
                    }
                    Fill::Failed => continue,
                    Fill::Gone => {
                        self.wake_block(d.gpa);
                        continue;
                    }
                    Fill::Present => 0,
                    Fill::Filled { bytes } => bytes,
                }
            } else if self.host_present(d.gpa) {
                0
            } else {
                // Dropped again since: woken, its next access faults and is handled afresh.
                inc(&self.sh.counters.deferred_dropped);
                self.wake_block(d.gpa);
                continue;
            };
            if !self.install(d.gpa, d.access, d.vcpu, seq, filled) {
                d.needs_fill = false;
                self.push_deferred(d);
            }
        }
    }

    /// Whether the host has a page mapped at `gpa`.
    fn host_present(&self, gpa: u64) -> bool {
        self.sh.host_present(gpa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestRamBacking {
        GuestRamBacking::new(
            vec![
                RamRegion {
                    gpa: 4 << 30,
                    len: 1 << 30,
                    host_addr: 0x7f00_0000_0000,
                },
                RamRegion {
                    gpa: 0,
                    len: 3 << 30,
                    host_addr: 0x7e00_0000_0000,
                },
            ],
            PageSize::Size2M,
        )
    }

    #[test]
    fn backing_resolves_the_naturally_aligned_host_block() {
        let b = two_regions();
        let r = b.resolve((4 << 30) + 0x20_1234).unwrap();
        assert_eq!(r.frame, 0x7f00_0020_0000);
        assert_eq!(r.max_size, PageSize::Size2M);
        assert_eq!(r.perms, Perms::RWX);
        assert_eq!(b.resolve(0x1234).unwrap().frame, 0x7e00_0000_0000);
        // The 32-bit hole and past the end are not RAM: stage2 denies.
        assert!(b.resolve(3 << 30).is_none());
        assert!(b.resolve((3 << 30) + (512 << 20)).is_none());
        assert!(b.resolve(5 << 30).is_none());
    }

    #[test]
    fn host_and_guest_addresses_translate_both_ways() {
        let b = two_regions();
        assert_eq!(b.gpa_to_host((4 << 30) + 5), Some(0x7f00_0000_0005));
        assert_eq!(b.host_to_gpa(0x7f00_0000_0005), Some((4 << 30) + 5));
        assert_eq!(b.host_to_gpa(0x7e00_0000_0000 + (3 << 30)), None);
        assert_eq!(b.gpa_to_host(u64::MAX), None);
    }

    #[test]
    fn backing_page_size_follows_the_ram_backing() {
        assert_eq!(backing_page_size(BackingKind::Small), PageSize::Size4K);
        assert_eq!(backing_page_size(BackingKind::Thp), PageSize::Size4K);
        assert_eq!(backing_page_size(BackingKind::Hugetlb2M), PageSize::Size2M);
        assert_eq!(backing_page_size(BackingKind::Hugetlb1G), PageSize::Size1G);
    }

    fn j_memory(st: &PagingStats) -> String {
        st.to_json()["paging"]["memory"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn stats_table_and_json_carry_every_counter() {
        let st = PagingStats {
            shared_memory: true,
            continued: 5,
            hole_punches: 0,
            stage2: stage2::Stats::default(),
            events_missing: 11,
            events_wp: 0,
            events_minor: 0,
            events_remove: 0,
            events_unmap: 0,
            events_remap: 0,
            events_fork: 0,
            populated_4k: 0,
            populated_2m: 3 << 21,
            populated_1g: 0,
            installed: 3,
            spurious: 8,
            relaxed: 0,
            retry: 0,
            denied: 0,
            fault_around_pages: 0,
            refills: 0,
            eexist: 0,
            eagain: 0,
            fatal: 0,
            deferred: 0,
            deferred_dropped: 0,
            wp_cleared: 0,
            wp_waited: 0,
            harvests: 0,
            harvested_pages: 0,
            reclaims: 0,
            reclaimed_bytes: 0,
            zapped: 0,
            external_invalidations: 0,
            own_removes: 0,
        };
        let table = st.to_string();
        assert!(table.contains("uffd events: missing"), "{table}");
        assert!(table.contains("shared memfd memory"), "{table}");
        assert_eq!(j_memory(&st), "shared");
        assert!(table
            .lines()
            .any(|l| l.starts_with("faults spurious") && l.ends_with(" 8")));
        let j = st.to_json();
        assert_eq!(j["paging"]["populated_bytes_2m"], 3 << 21);
        assert_eq!(j["paging"]["spurious"], 8);
        assert_eq!(j["stage2"]["installs_2m"], 0);
    }
}
