//! The pager's errors: each says what was wrong and what to do.

use std::io;

use crate::uffd::UffdError;

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
    /// [`super::Pager::place`] could not copy the data in.
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
    /// [`super::Pager::settle`] timed out: faults were still being handled with the vCPUs paused.
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
