//! Table pages (512 atomic descriptors, 4 KiB aligned), their pool, and deferred reclamation.
//!
//! A page unlinked from the tree by a collapse is freed only when no concurrent walker can still
//! hold a reference to it: with crossbeam-epoch normally, and under `cfg(loom)` (where epoch cannot
//! run) with a plain list freed when the engine drops.

use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};
use std::sync::{Arc, Mutex as StdMutex};

use crate::sync::{AtomicU64, Ordering};
use crate::types::ENTRIES;

/// Bytes of one table page.
pub const TABLE_PAGE_BYTES: u64 = 4096;

/// Most zeroed pages kept for reuse.
const POOL_CAP: usize = 1024;

/// One translation table: 512 descriptors. Its address is what table descriptors point to.
#[repr(C, align(4096))]
pub(crate) struct TablePage {
    pub(crate) entries: [AtomicU64; ENTRIES],
}

impl TablePage {
    fn new_zeroed() -> Box<TablePage> {
        #[cfg(not(loom))]
        {
            let page = Box::<TablePage>::new_zeroed();
            // SAFETY: `TablePage` is 512 `AtomicU64`, for which the all-zero bit pattern is a valid
            // value (0); the allocation has the layout of `TablePage`.
            unsafe { page.assume_init() }
        }
        #[cfg(loom)]
        {
            Box::new(TablePage {
                entries: std::array::from_fn(|_| AtomicU64::new(0)),
            })
        }
    }

    fn zero(&self) {
        for e in &self.entries {
            // Relaxed: the page is private to the pool here; publication is by the Release of the
            // compare-and-swap that links it again.
            e.store(0, Ordering::Relaxed);
        }
    }
}

/// A raw table page pointer that may travel to the thread that runs a deferred free.
struct SendPage(*mut TablePage);
// SAFETY: the page is unlinked and owned by whoever holds this value; only that owner touches it.
unsafe impl Send for SendPage {}

/// Zeroed pages ready for reuse, and the count of pages that exist.
#[derive(Default)]
pub(crate) struct Pool {
    free: StdMutex<Vec<Box<TablePage>>>,
    /// Pages allocated and not yet returned to the global allocator (in the tree, pending a deferred
    /// free, or in the pool).
    allocated: StdAtomicU64,
    /// Pages unlinked and waiting for a grace period.
    pending: StdAtomicU64,
}

impl Pool {
    fn get(&self) -> Box<TablePage> {
        let reused = match self.free.lock() {
            Ok(mut f) => f.pop(),
            Err(p) => p.into_inner().pop(),
        };
        reused.unwrap_or_else(|| {
            self.allocated.fetch_add(1, StdOrdering::Relaxed);
            TablePage::new_zeroed()
        })
    }

    fn put(&self, page: Box<TablePage>) {
        if cfg!(loom) {
            // Zeroing would be 512 modelled stores: under loom, give the page back instead.
            drop(page);
            self.allocated.fetch_sub(1, StdOrdering::Relaxed);
            return;
        }
        page.zero();
        let mut f = match self.free.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        if f.len() < POOL_CAP {
            f.push(page);
        } else {
            drop(f);
            drop(page);
            self.allocated.fetch_sub(1, StdOrdering::Relaxed);
        }
    }

    /// Pages that exist (in the tree, pending, or pooled).
    pub(crate) fn allocated(&self) -> u64 {
        self.allocated.load(StdOrdering::Relaxed)
    }

    /// Pages waiting for a grace period.
    pub(crate) fn pending(&self) -> u64 {
        self.pending.load(StdOrdering::Relaxed)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let n = match self.free.get_mut() {
            Ok(f) => f.len(),
            Err(p) => p.into_inner().len(),
        };
        self.allocated.fetch_sub(n as u64, StdOrdering::Relaxed);
    }
}

/// Proof that the current thread is inside a read-side critical section: table pages it reaches
/// stay allocated until it drops this guard.
pub(crate) struct Guard {
    #[cfg(not(loom))]
    _epoch: crossbeam_epoch::Guard,
}

/// Allocation and deferred reclamation of table pages.
pub(crate) struct Reclaim {
    pool: Arc<Pool>,
    /// Unit tests that count deferred frees use an epoch collector of their own: on crossbeam's
    /// global one, any other test of the binary that is pinned (or stuck pinned after a failure)
    /// holds their frees back. `None`: the global collector.
    #[cfg(all(test, not(loom)))]
    own: Option<crossbeam_epoch::Collector>,
    /// Under loom, unlinked pages wait here until the engine drops.
    #[cfg(loom)]
    deferred: StdMutex<Vec<SendPage>>,
}

impl Reclaim {
    pub(crate) fn new() -> Self {
        Reclaim {
            pool: Arc::new(Pool::default()),
            #[cfg(all(test, not(loom)))]
            own: None,
            #[cfg(loom)]
            deferred: StdMutex::new(Vec::new()),
        }
    }

    /// Reclamation through an epoch collector of this engine's own (unit tests only). Every pin
    /// registers a new participant, which is slow but keeps the participant's thread-local
    /// bookkeeping out of the picture.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn with_own_collector() -> Self {
        let mut r = Reclaim::new();
        r.own = Some(crossbeam_epoch::Collector::new());
        r
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Enter a read-side critical section.
    #[inline]
    pub(crate) fn pin(&self) -> Guard {
        #[cfg(all(test, not(loom)))]
        if let Some(c) = &self.own {
            // The guard keeps the participant alive after its handle drops.
            return Guard {
                _epoch: c.register().pin(),
            };
        }
        Guard {
            #[cfg(not(loom))]
            _epoch: crossbeam_epoch::pin(),
        }
    }

    /// A zeroed page, owned by the caller until it links it into the tree.
    pub(crate) fn alloc(&self) -> *mut TablePage {
        Box::into_raw(self.pool.get())
    }

    /// Free a page that was never published (a lost install race): nobody else can hold it.
    ///
    /// # Safety
    /// `page` came from [`Reclaim::alloc`] and was never stored in a shared entry.
    pub(crate) unsafe fn free_unpublished(&self, page: *mut TablePage) {
        // SAFETY: by the contract, the caller owns the only pointer to this boxed page.
        let page = unsafe { Box::from_raw(page) };
        self.pool.put(page);
    }

    /// Free a page that was unlinked from the tree once every walker that might hold it is gone.
    ///
    /// # Safety
    /// `page` came from [`Reclaim::alloc`], was linked, and has been unlinked by the caller (no
    /// entry points to it any more, and the caller is the only one that unlinked it).
    pub(crate) unsafe fn defer_free(&self, guard: &Guard, page: *mut TablePage) {
        self.pool.pending.fetch_add(1, StdOrdering::Relaxed);
        let page = SendPage(page);
        #[cfg(not(loom))]
        {
            let pool = Arc::clone(&self.pool);
            guard._epoch.defer(move || {
                let page = page;
                // SAFETY: the grace period has passed: no walker pinned when the page was unlinked
                // is still running, and later walkers cannot reach it. We own the box.
                let page = unsafe { Box::from_raw(page.0) };
                pool.pending.fetch_sub(1, StdOrdering::Relaxed);
                pool.put(page);
            });
        }
        #[cfg(loom)]
        {
            let _ = guard;
            match self.deferred.lock() {
                Ok(mut d) => d.push(page),
                Err(p) => p.into_inner().push(page),
            }
        }
    }

    /// Free a page right now (teardown, when no other thread can walk).
    ///
    /// # Safety
    /// Nobody else references `page`.
    pub(crate) unsafe fn free_exclusive(&self, page: *mut TablePage) {
        // SAFETY: as for `free_unpublished`.
        unsafe { self.free_unpublished(page) };
    }

    /// Push this thread's deferred frees towards completion (tests and teardown).
    pub(crate) fn flush(&self) {
        #[cfg(not(loom))]
        for _ in 0..4 {
            self.pin()._epoch.flush();
        }
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        #[cfg(loom)]
        {
            let list = match self.deferred.get_mut() {
                Ok(d) => std::mem::take(d),
                Err(p) => std::mem::take(p.into_inner()),
            };
            for page in list {
                self.pool.pending.fetch_sub(1, StdOrdering::Relaxed);
                // SAFETY: the engine is being dropped: no walker exists any more.
                unsafe { self.free_unpublished(page.0) };
            }
        }
    }
}
