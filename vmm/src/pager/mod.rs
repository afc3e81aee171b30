//! Demand paging of guest RAM: the [`Pager`], which owns the userfaultfd, its fault-handler threads and the stage2 engine.
//!
//! # Data path of a first touch
//!
//! A vCPU (through KVM's `get_user_pages`) touches a missing host page of guest RAM; the kernel
//! queues a MISSING fault on our userfaultfd and puts the thread to sleep. A handler thread
//! (`events`) reads the event, translates the host address to a GPA (`backing`), reads
//! stage2's invalidation sequence, fills the host page without waking anyone (`fill`), asks
//! stage2 to record the mapping (`install`), and only then wakes the vCPU: like a vCPU under
//! KVM, it resumes once its stage-2 entry is in.
//!
//! # Order: host first, then stage2 (KVM's order)
//!
//! KVM resolves the host page first and installs its EPT entry second, under the mmu-notifier
//! sequence check. The pager does the same: stage2 is told only about host pages that exist,
//! and an install that meets an invalidation is deferred rather than spun on (`events` says
//! why spinning would deadlock a reclaim).
//!
//! # The files
//!
//! * `events`: the handler threads' event loop, the REMOVE/fault ordering, deferral, `settle`.
//! * `fill`: filling a faulting host page (zero, COPY, CONTINUE) and the races of a fill.
//! * `install`: asking stage2 about a filled page and carrying out its answer, for every caller.
//! * `reclaim`: dropping guest RAM bracketed by stage2 invalidations.
//! * `tracking`: dirty logging by userfaultfd write protection.
//! * `postcopy`: pages that come from a [`PageSource`], fetched on a fault or placed by a push.
//! * `stats`: the counters and their snapshot.
//!
//! The host operations (`UFFDIO_*`, `madvise`, `mincore`, hole punch) go through
//! [`HostPages`], so that the handlers' decisions are unit-tested without a userfaultfd.
//!
//! # Shared memory (memfd): MISSING + MINOR, UFFDIO_CONTINUE, hole-punch reclaim
//!
//! Guest RAM may be a memfd mapped MAP_SHARED (shmem, or a hugetlbfs memfd for 2 MiB / 1 GiB
//! pages), with a second mapping of the same file that the VMM keeps as its host view
//! ([`Pager::start_shared`]). The range is registered for MISSING *and* MINOR faults: a page
//! the file does not have raises MISSING and is filled like private memory, which puts it in
//! the file; a page the file has but the guest mapping does not map raises MINOR and is mapped
//! with UFFDIO_CONTINUE. MINOR-only registration was the other design: there, a fault on a page
//! the file lacks is resolved by the kernel with no event (shmem and hugetlbfs allocate it in
//! their fault path), so stage2 would never hear of first touches. Both modes together work on
//! this kernel (6.18) and keep every first touch visible.

mod backing;
mod error;
mod events;
#[cfg(test)]
mod fake;
mod fill;
mod install;
mod postcopy;
mod reclaim;
mod stats;
mod tracking;
mod zero;

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, info};
use stage2::{Config as Stage2Config, Ept, NoopTlb, PageSize, Perms, Stage2};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::{GuestRam, RamRegion, SharedRegion};
use crate::uffd::{
    HostPages, Uffd, UffdError, UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_EVENT_REMAP, UFFD_FEATURE_EVENT_REMOVE,
    UFFD_FEATURE_EVENT_UNMAP, UFFD_FEATURE_MINOR_HUGETLBFS, UFFD_FEATURE_MINOR_SHMEM,
    UFFD_FEATURE_MISSING_HUGETLBFS, UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_THREAD_ID, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
};

pub use backing::{backing_page_size, GuestRamBacking};
pub use error::PagingError;
pub use postcopy::PageSource;
pub use reclaim::ReclaimReport;
pub use stats::PagingStats;

use events::EventLoop;
use stats::Counters;
use zero::ZeroSource;

/// The stage2 engine as the VMM instantiates it: x86 EPT format; KVM owns the real TLB.
pub type VmStage2 = Stage2<Ept, NoopTlb>;

/// Told why the pager cannot go on (a guest page the host cannot provide).
pub type FatalHandler = Box<dyn Fn(&str) + Send + Sync>;

const SZ_4K: u64 = 4 << 10;
/// [`Pager::place`] and the dirty-log re-protect retry an ioctl that met a pending REMOVE
/// (EAGAIN, nothing done) this many times, sleeping [`PLACE_RETRY_SLEEP`] between tries, while a
/// handler reads the event.
const PLACE_RETRIES: u32 = 20_000;
/// See [`PLACE_RETRIES`].
const PLACE_RETRY_SLEEP: Duration = Duration::from_micros(50);

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

/// State shared by the handlers, the reclaim path and the owner.
struct Shared {
    /// The host operations on guest RAM (the pager's userfaultfd, or a fake in unit tests).
    host: Arc<dyn HostPages>,
    s2: Arc<VmStage2>,
    backing: GuestRamBacking,
    page: PageSize,
    cfg: PagerConfig,
    zero: ZeroSource,
    counters: Counters,
    /// Serialises `read(2)` of the uffd with the processing of the REMOVE/UNMAP events read
    /// (see [`events`]); [`Pager::reclaim`] takes it once after its drop to know that the
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
    /// harvest holds it exclusive across stage2 get-and-clear + host re-protect ([`tracking`]).
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

impl Shared {
    /// The state of a pager over `regions` (already registered with `host`'s userfaultfd);
    /// `files` holds the memfd of each shared region.
    fn new(
        host: Arc<dyn HostPages>,
        regions: &[RamRegion],
        page: PageSize,
        cfg: PagerConfig,
        files: Vec<(RamRegion, Arc<File>)>,
    ) -> io::Result<Shared> {
        let zero_len = page.bytes().max(cfg.fault_around_pages as u64 * SZ_4K);
        let s2 = Arc::new(Stage2::new(
            Ept,
            NoopTlb,
            Stage2Config {
                nr_vcpus: cfg.vcpus.max(1),
                ..Stage2Config::default()
            },
        ));
        Ok(Shared {
            host,
            s2,
            backing: GuestRamBacking::new(regions.to_vec(), page),
            page,
            zero: ZeroSource::new(zero_len)?,
            counters: Counters::default(),
            event_lock: Mutex::new(()),
            own_drops: Mutex::new(Vec::new()),
            vcpu_tids: (0..cfg.vcpus.max(1)).map(|_| AtomicU32::new(0)).collect(),
            on_fatal: Mutex::new(None),
            source: RwLock::new(None),
            files,
            inflight: Mutex::new(Vec::new()),
            dirty_lock: RwLock::new(()),
            dirty_logging: AtomicBool::new(false),
            faults_held: AtomicU64::new(0),
            stop: EventFd::new(EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
            cfg,
        })
    }

    /// The memfd behind `region` (shared backing only).
    fn file_of(&self, region: &RamRegion) -> Option<&File> {
        self.files
            .iter()
            .find(|(r, _)| r.gpa == region.gpa)
            .map(|(_, f)| &**f)
    }

    /// Whether the host has a page at `gpa` (mincore of its 4 KiB page; on hugetlbfs that is
    /// the huge page's presence).
    fn host_present(&self, gpa: u64) -> bool {
        let Some(hva) = self.backing.gpa_to_host(gpa & !(SZ_4K - 1)) else {
            return false;
        };
        let mut vec = [0u8; 1];
        self.host.resident(hva, &mut vec).is_ok() && vec[0] & 1 != 0
    }

    /// The host page (block) holding `gpa`.
    fn block_of(&self, gpa: u64) -> u64 {
        gpa & !(self.page.bytes() - 1)
    }

    /// Wakes the threads waiting on `[gpa, gpa+len)`.
    fn wake_range(&self, gpa: u64, len: u64) {
        if let Some(hva) = self.backing.gpa_to_host(gpa) {
            if let Err(e) = self.host.wake_waiters(hva, len) {
                error!("UFFDIO_WAKE of gpa {gpa:#x}+{len:#x}: {e}");
            }
        }
    }

    /// Wakes the threads waiting on the host page holding `gpa`.
    fn wake_block(&self, gpa: u64) {
        self.wake_range(self.block_of(gpa), self.page.bytes());
    }

    /// Reports a fault that cannot be served: to the handler set with [`Pager::on_fatal`], which
    /// stops the VM; logged in any case.
    fn fatal(&self, why: &str) {
        error!("{why}");
        stats::inc(&self.counters.fatal);
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

/// The demand pager: owns the userfaultfd, the handler threads and the stage2 engine.
///
/// The host memory must outlive the pager: stop (or drop) the pager before unmapping guest RAM.
pub struct Pager {
    shared: Arc<Shared>,
    uffd: Arc<Uffd>,
    handlers: Vec<JoinHandle<()>>,
    registered: Vec<(u64, u64)>,
}

impl fmt::Debug for Pager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pager")
            .field("regions", &self.shared.backing.regions())
            .field("page", &self.shared.page)
            .field("cfg", &self.shared.cfg)
            .finish()
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
        let uffd = Arc::new(Uffd::new(required, optional)?);
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
        let files = shared.iter().map(|r| (r.region, r.file.clone())).collect();
        let shared = Arc::new(
            Shared::new(uffd.clone(), regions, page, cfg.clone(), files)
                .map_err(PagingError::Spawn)?,
        );
        let mut handlers = Vec::new();
        for i in 0..cfg.handlers {
            let event_loop =
                EventLoop::new(shared.clone(), uffd.clone()).map_err(PagingError::Spawn)?;
            let h = std::thread::Builder::new()
                .name(format!("uffd-{i}"))
                .spawn(move || {
                    crate::seccomp::enter(crate::seccomp::ThreadKind::Pager);
                    event_loop.run()
                })
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
            uffd,
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

    /// Records in stage2 the guest RAM the host already has (pages written before the pager
    /// started, e.g. a loaded kernel or the test guest's code and page tables), so that stage2
    /// maps every present page; those pages never fault. Call once, right after `start`, before
    /// vCPUs run. Returns the leaves installed.
    pub fn record_present(&self) -> Result<usize, PagingError> {
        const CHUNK: u64 = 64 << 20;
        let sh = &self.shared;
        let page = sh.page.bytes();
        let mut installed = 0;
        for r in sh.backing.regions() {
            let mut off = 0;
            while off < r.len {
                // Whole backing pages per chunk (a 1 GiB page is bigger than CHUNK).
                let n = CHUNK.max(page).min(r.len - off);
                let mut vec = vec![0u8; (n / SZ_4K) as usize];
                sh.host
                    .resident(r.host_addr + off, &mut vec)
                    .map_err(PagingError::Spawn)?;
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
        // The last reference may go on one of the handlers themselves (a postcopy page source
        // it held, dropped there): that one is not joined (a thread cannot join itself); it
        // sees `stopping` and ends once it returns to its loop.
        let me = std::thread::current().id();
        for h in self.handlers.drain(..) {
            if h.thread().id() == me {
                continue;
            }
            if h.join().is_err() {
                error!("a fault-handler thread panicked");
            }
        }
        for &(start, len) in &self.registered {
            // The range may already be unmapped; closing the fd unregisters it anyway.
            if let Err(e) = self.uffd.unregister(start, len) {
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
