//! A populated, read-only mapping of zeroes: the source of every zero fill.

use std::io;

/// A read-only anonymous mapping that reads as zeroes: the source of UFFDIO_COPY where the
/// kernel has no zero page to map (hugetlbfs; write-protected fills). Never written, so it
/// costs no memory: it is populated up front with the shared zero page (page tables only).
/// Populated matters: the kernel copies from the source with page faults disabled, and on a
/// miss it retries through a *temporary* huge page allocated outside the pool reservation, which
/// fails with ENOMEM when the guest holds every page of the pool (seen with 1 GiB pages).
pub(super) struct ZeroSource {
    addr: u64,
    len: u64,
}

impl ZeroSource {
    pub(super) fn new(len: u64) -> io::Result<ZeroSource> {
        // SAFETY: a fresh private anonymous read-only mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ZeroSource {
            addr: p as u64,
            len,
        })
    }

    /// The first `len` zero bytes (at most the size given to `new`).
    pub(super) fn bytes(&self, len: u64) -> &[u8] {
        assert!(
            len <= self.len,
            "zero source of {:#x} bytes asked for {len:#x}",
            self.len
        );
        // SAFETY: [addr, addr+len) lies in our readable mapping, which lives as long as self and
        // is never written (PROT_READ), so a shared slice of it is sound.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, len as usize) }
    }
}

impl Drop for ZeroSource {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; no reference into it outlives self.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}
