//! The error type of building guest RAM: what went wrong and what to change.

use std::path::PathBuf;

use super::backing::BackingKind;
use super::size::human;

/// Errors building guest RAM; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Zero bytes of RAM.
    #[error("guest memory size is 0: give --mem a size such as 512M or 4G")]
    Empty,
    /// Size not a multiple of the backing's page size.
    #[error("guest memory size {size:#x} is not a multiple of the {backing} page size ({page:#x}): round --mem to a multiple of {page_h}", page_h = human(*page))]
    Unaligned {
        /// Requested size.
        size: u64,
        /// Backing chosen.
        backing: BackingKind,
        /// Its page size.
        page: u64,
    },
    /// The hugetlb pool has too few free pages.
    #[error("{backing} pool too small: the guest needs {needed} free pages, {free} are free (short by {short}); raise the pool with `echo {want} > {knob}` (as root) or choose {alternative}")]
    PoolTooSmall {
        /// Backing asked for.
        backing: BackingKind,
        /// Pages needed.
        needed: u64,
        /// Pages free and unreserved.
        free: u64,
        /// needed - free.
        short: u64,
        /// A pool size that would be enough.
        want: u64,
        /// The sysfs knob.
        knob: &'static str,
        /// The backing to choose instead.
        alternative: &'static str,
    },
    /// The kernel has no pool of this size at all.
    #[error("{backing} pages are not available on this host ({dir} is missing): choose --hugepages 2M, thp or none")]
    NoPool {
        /// Backing asked for.
        backing: BackingKind,
        /// The missing sysfs dir.
        dir: PathBuf,
    },
    /// mmap failed.
    #[error(
        "cannot map {size} of guest memory ({backing}): {source}; lower --mem or free host memory"
    )]
    Mmap {
        /// Human size.
        size: String,
        /// Backing.
        backing: BackingKind,
        /// The OS error.
        source: std::io::Error,
    },
    /// THP asked for shared memory.
    #[error("--hugepages thp works with private memory only: with --memory-backend shared choose --hugepages 2M, 1G, none or auto")]
    ThpShared,
    /// memfd_create or ftruncate failed.
    #[error("cannot create the {size} memfd of shared guest memory ({backing}): {source}; lower --mem, free host memory or use --memory-backend private")]
    Memfd {
        /// Human size.
        size: String,
        /// Backing.
        backing: BackingKind,
        /// The OS error.
        source: std::io::Error,
    },
    /// vm-memory refused the layout (a bug, not user input).
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
    /// Populating guest RAM up front failed.
    #[error("cannot prefault guest memory at {gpa:#x}+{len:#x}: {source}; the host is short of memory (or of huge pages): lower --mem or drop --prefault")]
    Prefault {
        /// Guest-physical start of the part that failed.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The OS error.
        source: std::io::Error,
    },
}
