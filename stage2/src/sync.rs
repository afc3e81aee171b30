//! The atomics and locks the engine's concurrency protocol is built on, switchable to loom's models.
//!
//! Everything that takes part in the lock-free protocol (table entries, the invalidation sequence and
//! in-progress count, dirty bits, the structure and global locks) comes from here, so that
//! `RUSTFLAGS="--cfg loom"` model-checks it. Statistics counters and plain caches use `std` directly:
//! they are not part of the protocol and modelling them would only blow up the state space.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// Lock a mutex, ignoring poisoning: every structure behind our locks stays consistent across a panic
/// (they hold either nothing or a list updated in one step).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// How long a long walk may keep the CPU before it yields it (the time slice of `cond_resched`).
#[cfg(not(loom))]
pub(crate) const RESCHED_SLICE: std::time::Duration = std::time::Duration::from_millis(1);

/// The userspace analogue of the kernel's `cond_resched`: a long walk calls [`Resched::cond_resched`]
/// at every budget boundary (after it released its locks and epoch guard), and the CPU is given up
/// only when the walk has run for longer than [`RESCHED_SLICE`] since it last did. Yielding on every
/// boundary costs a trip through the scheduler per few hundred entries, which on a loaded host
/// multiplies the wall time of a walk. Under loom every boundary is a scheduling point.
pub(crate) struct Resched {
    #[cfg(not(loom))]
    last: std::time::Instant,
}

impl Resched {
    pub(crate) fn new() -> Self {
        Resched {
            #[cfg(not(loom))]
            last: std::time::Instant::now(),
        }
    }

    /// Yield the CPU if the time slice is used up; returns whether it did.
    pub(crate) fn cond_resched(&mut self) -> bool {
        #[cfg(loom)]
        {
            loom::thread::yield_now();
            true
        }
        #[cfg(not(loom))]
        {
            if self.last.elapsed() < RESCHED_SLICE {
                return false;
            }
            std::thread::yield_now();
            self.last = std::time::Instant::now();
            true
        }
    }
}

/// Read an atomic we have exclusive access to (teardown) without a modelled operation.
pub(crate) fn load_exclusive(a: &mut AtomicU64) -> u64 {
    #[cfg(loom)]
    {
        a.with_mut(|v| *v)
    }
    #[cfg(not(loom))]
    {
        *a.get_mut()
    }
}

/// The full fence of the invalidation handshake (a store-buffering pattern): between a thread's
/// write of one location and its read of the other.
///
/// Every access of the handshake is `SeqCst` (the fault's entry CAS and its loads of the
/// invalidation state; the invalidation's registration RMW and its loads of the entries), so the
/// single total order of `SeqCst` operations already forbids both threads missing each other, and
/// on x86-64 the locked CAS is a full barrier anyway: no fence instruction is needed. Loom models
/// `SeqCst` accesses as acquire/release only (it reports the store-buffering outcome as possible),
/// so under `cfg(loom)` the equivalent explicit fence is emitted for it to check the protocol.
#[inline]
pub(crate) fn handshake_fence() {
    #[cfg(loom)]
    fence(Ordering::SeqCst);
}
