//! Which pages of guest RAM hold something the host must read (present or swapped out), in
//! windows of one syscall each: [`ResidencyCursor`] and what the sender and receiver use.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::range::{check_range, RamError, PAGE_BYTES};

/// Whether the RAM region holding `gpa` is private anonymous memory (no file behind it):
/// there a page the host never populated and never swapped reads as zero.
pub(crate) fn is_private(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.find_region(GuestAddress(gpa))
        .is_some_and(|r| r.file_offset().is_none())
}

/// Guest bytes whose residency one `mincore` call reads.
pub(super) const RESIDENCY_WINDOW: u64 = 64 << 20;

/// Which 4 KiB pages of a guest range hold something the host must read, made once for the
/// whole range instead of once per page:
/// - private anonymous memory: pages present or swapped out (`/proc/self/pagemap`); any other
///   page was never populated, or was dropped, and reads as zero. (`mincore` would miss
///   swapped-out pages, whose data is not zero.)
/// - shared memory (a memfd): `mincore`, the test of [`super::RamPager::is_populated`] (on shmem,
///   "the file has the page"; on hugetlbfs, "this mapping maps it").
///
/// Only the pager populates guest RAM while a migration reads this, so a snapshot stays true
/// for the pages the caller has not placed itself.
pub(super) struct Residency {
    gpa: u64,
    pages: Vec<u8>,
}

/// `/proc/self/pagemap` entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
/// Swapped out (or another swap-type entry, e.g. a page being migrated).
const PM_SWAP: u64 = 1 << 62;

impl Residency {
    /// The residency of `[gpa, gpa+len)` (page aligned, inside one RAM region).
    pub(super) fn of(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<Residency, RamError> {
        use vm_memory::GuestMemoryBackend;
        check_range(mem, gpa, len)?;
        let host = mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| RamError::OutOfRange { gpa, len })?;
        let mut pages = vec![0u8; (len / PAGE_BYTES) as usize];
        if pages.is_empty() {
            return Ok(Residency { gpa, pages });
        }
        if is_private(mem, gpa) {
            pagemap_residency(host as u64, &mut pages).map_err(|e| {
                RamError::Pager(format!(
                    "reading /proc/self/pagemap for guest memory {gpa:#x}+{len:#x}: {e}"
                ))
            })?;
            return Ok(Residency { gpa, pages });
        }
        // SAFETY: [host, host+len) is guest RAM mapped for the VM's life (checked to lie
        // in one region above); `pages` has one byte per 4 KiB page of it. mincore only
        // reads the page tables.
        let ret = unsafe {
            libc::mincore(
                host.cast::<libc::c_void>(),
                len as usize,
                pages.as_mut_ptr(),
            )
        };
        if ret != 0 {
            return Err(RamError::Pager(format!(
                "mincore of guest memory {gpa:#x}+{len:#x}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Residency { gpa, pages })
    }

    /// Whether the 4 KiB page holding `gpa` is there.
    pub(super) fn populated(&self, gpa: u64) -> bool {
        self.pages[((gpa - self.gpa) / PAGE_BYTES) as usize] & 1 != 0
    }
}

/// Residency of guest RAM for addresses asked in ascending order (a postcopy destination
/// sorting out which stale pages it has a copy of): read a window of up to
/// `RESIDENCY_WINDOW` (64 MiB) at a time, with the test of `Residency`, instead of one syscall per
/// page.
pub struct ResidencyCursor<'a> {
    mem: &'a GuestMemoryMmap,
    window: Option<Residency>,
}

impl<'a> ResidencyCursor<'a> {
    /// A cursor over `mem`; nothing is read until the first question.
    pub fn new(mem: &'a GuestMemoryMmap) -> ResidencyCursor<'a> {
        ResidencyCursor { mem, window: None }
    }

    /// Whether the 4 KiB page holding `gpa` is populated (present, or swapped out on private
    /// memory). An address below the last one asked costs a new window; outside RAM is an
    /// error.
    pub fn populated(&mut self, gpa: u64) -> Result<bool, RamError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let page = gpa / PAGE_BYTES * PAGE_BYTES;
        if let Some(w) = &self.window {
            if page >= w.gpa && page < w.gpa + w.pages.len() as u64 * PAGE_BYTES {
                return Ok(w.populated(page));
            }
        }
        let region = self
            .mem
            .find_region(GuestAddress(page))
            .ok_or(RamError::OutOfRange {
                gpa,
                len: PAGE_BYTES,
            })?;
        let region_end = region.start_addr().0 + region.len();
        let end = region_end.min(page.saturating_add(RESIDENCY_WINDOW));
        let w = Residency::of(self.mem, page, end - page)?;
        let populated = w.populated(page);
        self.window = Some(w);
        Ok(populated)
    }
}

/// Sets `out[i]` to 1 when the 4 KiB page at `hva + i * 4 KiB` of this process is present or
/// This process's `/proc/self/pagemap`, opened on the first call and kept.
fn pagemap() -> std::io::Result<&'static std::fs::File> {
    static PAGEMAP: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    match PAGEMAP.get() {
        Some(f) => Ok(f),
        None => {
            let f = std::fs::File::open("/proc/self/pagemap")?;
            Ok(PAGEMAP.get_or_init(|| f))
        }
    }
}

/// Opens what [`Residency::of`] reads, so that threads whose filter lets them read but not
/// open files (a migration's lanes) can use it. Call on the main thread before they start.
pub(crate) fn open_pagemap() -> std::io::Result<()> {
    pagemap().map(|_| ())
}

/// swapped out, from `/proc/self/pagemap` (one 8-byte entry per page).
fn pagemap_residency(hva: u64, out: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const ENTRY: usize = 8;
    let file = pagemap()?;
    let mut raw = vec![0u8; out.len() * ENTRY];
    file.read_exact_at(&mut raw, hva / PAGE_BYTES * ENTRY as u64)?;
    for (o, e) in out.iter_mut().zip(raw.chunks_exact(ENTRY)) {
        let e = u64::from_ne_bytes(e.try_into().expect("8-byte chunk"));
        *o = u8::from(e & (PM_PRESENT | PM_SWAP) != 0);
    }
    Ok(())
}
