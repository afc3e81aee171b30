//! Choosing a backing for guest RAM: the hugetlb pool checks, `--hugepages auto`, and a
//! kind's twin on the shared memory backend.

use std::path::Path;

use log::info;

use super::backing::{BackingKind, MemoryBackend};
use super::error::MemoryError;
use super::size::{human, SZ_2M};

impl BackingKind {
    /// This page-size choice on `backend`: the private kinds map to their shared twins (THP,
    /// which is for private anonymous memory only, is refused for shared memory).
    pub fn on_backend(self, backend: MemoryBackend) -> Result<BackingKind, MemoryError> {
        if backend == MemoryBackend::Private || self.is_shared() {
            return Ok(self);
        }
        Ok(match self {
            BackingKind::Auto => BackingKind::SharedAuto,
            BackingKind::Small => BackingKind::Shared4K,
            BackingKind::Hugetlb2M => BackingKind::Shared2M,
            BackingKind::Hugetlb1G => BackingKind::Shared1G,
            BackingKind::Thp => return Err(MemoryError::ThpShared),
            shared => shared,
        })
    }
}

fn read_sysfs_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Free, unreserved pages in a hugetlb pool, or `None` when the pool does not exist.
pub(super) fn pool_available(backing: BackingKind) -> Option<u64> {
    let dir = Path::new(backing.sysfs_dir()?);
    let free = read_sysfs_u64(&dir.join("free_hugepages"))?;
    let resv = read_sysfs_u64(&dir.join("resv_hugepages")).unwrap_or(0);
    Some(free.saturating_sub(resv))
}

pub(super) fn check_pool(backing: BackingKind, size: u64) -> Result<(), MemoryError> {
    let dir = backing.sysfs_dir().expect("hugetlb backing");
    let Some(free) = pool_available(backing) else {
        return Err(MemoryError::NoPool {
            backing,
            dir: dir.into(),
        });
    };
    let needed = size / backing.page_size();
    if free < needed {
        let total = read_sysfs_u64(&Path::new(dir).join("nr_hugepages")).unwrap_or(0);
        return Err(MemoryError::PoolTooSmall {
            backing,
            needed,
            free,
            short: needed - free,
            want: total + (needed - free),
            knob: backing.pool_knob(),
            alternative: if backing.is_shared() {
                "--hugepages none (4 KiB shared memory)"
            } else {
                "--hugepages thp"
            },
        });
    }
    Ok(())
}

/// `--hugepages auto`: `huge` (2 MiB hugetlbfs) when `size` is a whole number of 2 MiB pages
/// and the free pool covers it, else `fallback`; says which, naming `what` is backed.
pub(super) fn resolve_auto(
    size: u64,
    huge: BackingKind,
    fallback: BackingKind,
    what: &str,
) -> BackingKind {
    let resolved =
        if size.is_multiple_of(SZ_2M) && pool_available(huge).unwrap_or(0) >= size / SZ_2M {
            huge
        } else {
            fallback
        };
    info!(
        "--hugepages auto: backing {} of {what} with {resolved}",
        human(size)
    );
    resolved
}
