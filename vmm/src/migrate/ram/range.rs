//! What every part of moving RAM checks and shares: guest ranges ([`check_range`]), their
//! errors ([`RamError`]), the page constants and host-page arithmetic.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::migrate::stream::{StreamError, PAGE_SIZE};

/// Errors applying RAM chunks.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The demand pager refused to place or drop a page.
    #[error("demand paging: {0}")]
    Pager(String),
    /// A page chunk names memory outside guest RAM.
    #[error("migration stream names guest memory {gpa:#x}+{len:#x} outside this VM's RAM: the stream is corrupted or the layouts differ")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
}

pub(super) static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
/// [`PAGE_SIZE`] as the u64 addresses are.
pub(super) const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// Checks that `[gpa, gpa+len)` is guest RAM.
pub fn check_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), RamError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let bad = || RamError::OutOfRange { gpa, len };
    if len == 0 {
        return Ok(());
    }
    let last = gpa.checked_add(len - 1).ok_or_else(bad)?;
    // Guest RAM regions are separate mappings: the range must lie inside one.
    let first = mem.find_region(GuestAddress(gpa)).ok_or_else(bad)?;
    let end = mem.find_region(GuestAddress(last)).ok_or_else(bad)?;
    if first.start_addr() != end.start_addr() {
        return Err(bad());
    }
    Ok(())
}

/// The end of the host page of `host_page` bytes that holds `gpa`.
pub(super) fn host_page_end(gpa: u64, host_page: u64) -> u64 {
    (gpa / host_page + 1) * host_page
}
