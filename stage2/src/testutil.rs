//! Test helpers: a simple backing and engine constructors (unit tests only).

use crate::{Backing, Config, Format, PageSize, Perms, Resolved, Stage2, Tlb};

/// RAM below `limit`, output address `base + gpa`, blocks up to `max`, permissions `perms`.
pub(crate) struct Ram {
    pub(crate) base: u64,
    pub(crate) limit: u64,
    pub(crate) max: PageSize,
    pub(crate) perms: Perms,
}

impl Ram {
    pub(crate) fn new(max: PageSize, perms: Perms) -> Self {
        Ram {
            base: 1 << 40,
            limit: 1 << 34,
            max,
            perms,
        }
    }
}

impl Backing for Ram {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        (gpa < self.limit).then(|| Resolved {
            frame: self.base + (gpa & !(self.max.bytes() - 1)),
            max_size: self.max,
            perms: self.perms,
        })
    }
}

pub(crate) fn cfg() -> Config {
    Config {
        nr_vcpus: 4,
        ..Config::default()
    }
}

pub(crate) fn engine<F: Format, T: Tlb>(f: F, t: T) -> Stage2<F, T> {
    Stage2::new(f, t, cfg())
}

/// [`engine`] with an epoch collector of its own, for tests that wait for deferred frees (other
/// tests' pins on the global collector cannot hold them back).
pub(crate) fn engine_own_epoch<F: Format, T: Tlb>(f: F, t: T) -> Stage2<F, T> {
    #[cfg(not(loom))]
    return Stage2::with_own_collector(f, t, cfg());
    // Under loom reclamation waits for the engine's drop: there is no collector to share.
    #[cfg(loom)]
    engine(f, t)
}

/// Run `f` on its own thread and wait at most `limit` for its result: `None` if it is still
/// running then (it is left running). For calls that must return and would hang a test if they
/// did not.
pub(crate) fn returns_within<R: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> R + Send + 'static,
) -> Option<R> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}
