//! The demand pager's host operations on guest RAM's pages (`HostPages`), done by a `Uffd`.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::abi::*;
use super::error::UffdError;
use super::fd::Uffd;

/// What the demand pager does to guest RAM's host pages, and nothing else: fill, wake, protect,
/// ask what is resident, drop. The real implementation is [`Uffd`] (ioctls on its fd, plus the
/// plain syscalls on this process); the pager's unit tests use a fake that keeps the pages in
/// a table, so that its decisions are tested without a userfaultfd.
///
/// The fills never wake the faulting threads (`*_MODE_DONTWAKE`): the pager wakes them with
/// [`HostPages::wake_waiters`] once stage2 has recorded the page.
pub trait HostPages: Send + Sync {
    /// UFFDIO_COPY of `src` into the missing pages at `dst`, write-protected when `wp`.
    /// Returns the bytes copied; [`UffdError::Exists`] when the first page is present,
    /// [`UffdError::Again`] when the copy stopped part way or a REMOVE is pending.
    fn copy_in(&self, dst: u64, src: &[u8], wp: bool) -> Result<u64, UffdError>;
    /// UFFDIO_ZEROPAGE over `[dst, dst+len)`; results as for `copy_in`.
    fn zero_in(&self, dst: u64, len: u64) -> Result<u64, UffdError>;
    /// UFFDIO_CONTINUE over `[dst, dst+len)` (pages the memfd has), write-protected when `wp`.
    fn continue_in(&self, dst: u64, len: u64, wp: bool) -> Result<u64, UffdError>;
    /// UFFDIO_WAKE of the threads waiting on `[start, start+len)`.
    fn wake_waiters(&self, start: u64, len: u64) -> Result<(), UffdError>;
    /// UFFDIO_WRITEPROTECT: set (`protect`) or clear the write protection of
    /// `[start, start+len)`; clearing wakes the writers.
    fn set_write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), UffdError>;
    /// mincore of the 4 KiB pages from `start` on, one byte each into `pages` (bit 0: resident).
    fn resident(&self, start: u64, pages: &mut [u8]) -> io::Result<()>;
    /// madvise(MADV_DONTNEED) of `[start, start+len)`.
    fn drop_pages(&self, start: u64, len: u64) -> io::Result<()>;
    /// Drops every run of `runs` like [`HostPages::drop_pages`]; on failure, the index of the
    /// run that failed.
    fn drop_runs(&self, runs: &[Range<u64>]) -> Result<(), (usize, io::Error)> {
        for (i, r) in runs.iter().enumerate() {
            self.drop_pages(r.start, r.end - r.start)
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }
    /// fallocate(PUNCH_HOLE | KEEP_SIZE) of `len` bytes at `offset` of a memfd of guest RAM.
    fn punch_hole(&self, file: &File, offset: u64, len: u64) -> io::Result<()>;
}

/// Whether `process_madvise(MADV_DONTNEED)` on this process failed as unsupported once (a
/// kernel before 6.13 allows it only for a few other advices): then every batch drops run by
/// run.
static PROCESS_MADVISE_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// A pidfd of this process, for `process_madvise`; None where pidfds are not available.
fn own_pidfd() -> Option<OwnedFd> {
    if PROCESS_MADVISE_UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it touches
    // no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by pidfd_open, so it is an open descriptor owned by no
    // one else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// One `process_madvise(MADV_DONTNEED)` call over every run; true when it dropped them all.
fn process_madvise_all(pidfd: &OwnedFd, runs: &[Range<u64>]) -> bool {
    let iov: Vec<libc::iovec> = runs
        .iter()
        .map(|r| libc::iovec {
            iov_base: r.start as *mut libc::c_void,
            iov_len: (r.end - r.start) as usize,
        })
        .collect();
    let total: u64 = runs.iter().map(|r| r.end - r.start).sum();
    // SAFETY: the caller names host memory of guest RAM that it wants dropped; the kernel only
    // reads `iov`, which outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd.as_raw_fd(),
            iov.as_ptr(),
            iov.len(),
            libc::MADV_DONTNEED,
            0,
        )
    };
    if ret >= 0 && ret as u64 == total {
        return true;
    }
    if ret < 0 {
        let e = io::Error::last_os_error();
        if matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS | libc::EINVAL | libc::EPERM)
        ) {
            PROCESS_MADVISE_UNSUPPORTED.store(true, Ordering::Relaxed);
        }
    }
    false
}

impl HostPages for Uffd {
    fn copy_in(&self, dst: u64, src: &[u8], wp: bool) -> Result<u64, UffdError> {
        let mut mode = UFFDIO_COPY_MODE_DONTWAKE;
        if wp {
            mode |= UFFDIO_COPY_MODE_WP;
        }
        // SAFETY: `src` is a borrowed, readable slice for the whole call.
        unsafe { self.copy(dst, src.as_ptr() as u64, src.len() as u64, mode) }
    }

    fn zero_in(&self, dst: u64, len: u64) -> Result<u64, UffdError> {
        self.zeropage(dst, len, UFFDIO_ZEROPAGE_MODE_DONTWAKE)
    }

    fn continue_in(&self, dst: u64, len: u64, wp: bool) -> Result<u64, UffdError> {
        let mut mode = UFFDIO_CONTINUE_MODE_DONTWAKE;
        if wp {
            mode |= UFFDIO_CONTINUE_MODE_WP;
        }
        self.continue_(dst, len, mode)
    }

    fn wake_waiters(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.wake(start, len)
    }

    fn set_write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        self.write_protect(start, len, protect, false)
    }

    fn resident(&self, start: u64, pages: &mut [u8]) -> io::Result<()> {
        // SAFETY: mincore only reads the page tables of [start, start + pages.len() pages) (an
        // unmapped range fails with ENOMEM) and writes one byte per page into `pages`, which is
        // exactly that long.
        let ret = unsafe {
            libc::mincore(
                start as *mut libc::c_void,
                pages.len() * 4096,
                pages.as_mut_ptr(),
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn drop_pages(&self, start: u64, len: u64) -> io::Result<()> {
        drop_pages(start, len)
    }

    /// One `process_madvise` call on this process where the kernel takes it (6.13 and later;
    /// since 6.16 it also flushes the TLB once for the whole call instead of once per range),
    /// else one `madvise` per run. A partial or failed `process_madvise` is redone run by run,
    /// which names the run that fails.
    fn drop_runs(&self, runs: &[Range<u64>]) -> Result<(), (usize, io::Error)> {
        if let Some(pidfd) = own_pidfd() {
            if process_madvise_all(&pidfd, runs) {
                return Ok(());
            }
        }
        for (i, r) in runs.iter().enumerate() {
            self.drop_pages(r.start, r.end - r.start)
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn punch_hole(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        punch_hole(file, offset, len)
    }
}

/// `madvise(MADV_DONTNEED)` of `[start, start+len)` of guest RAM's host mapping: the next
/// guest access gets a fresh zero page (or a MISSING fault under userfaultfd), for private
/// anonymous and hugetlb mappings alike; KVM's mmu notifier drops its own mappings.
pub fn drop_pages(start: u64, len: u64) -> io::Result<()> {
    // SAFETY: the caller names a range of guest RAM it owns and wants dropped; no Rust
    // reference into guest RAM exists (it is accessed with volatile copies), and the guest
    // sees zeroes (or a MISSING fault) at its next touch.
    let ret = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            len as usize,
            libc::MADV_DONTNEED,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` over `[offset, offset + len)` of a
/// shared memfd behind guest RAM: the file's pages are freed, so every mapping of it (the
/// guest's, the host view) reads zeroes next, and KVM's mmu notifier drops its own mappings.
/// (`MADV_DONTNEED` would not do: on a `MAP_SHARED` file mapping it only unmaps, and the next
/// access maps the file's unchanged page again.)
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("hole punch {offset:#x}+{len:#x} beyond the file offsets of this host"),
        ));
    };
    // SAFETY: fallocate on a memfd of guest RAM that the caller names; it only frees file
    // pages, which every mapping then reads as zeroes, and no Rust reference into the range
    // exists (guest RAM is accessed with volatile copies).
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
