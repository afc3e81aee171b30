//! The host mappings behind guest RAM: anonymous/hugetlb mmaps and double-mapped shared memfds.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use log::warn;
use vm_memory::{FileOffset, MmapRegion};

use super::backing::BackingKind;
use super::error::MemoryError;
use super::size::{human, SZ_2M};

/// `MAP_HUGE_SHIFT` (include/uapi/asm-generic/hugetlb_encode.h): log2(page size) goes in the
/// mmap flags at this shift to choose the hugetlb page size.
const MAP_HUGE_SHIFT: i32 = 26;
const MAP_HUGE_2MB: i32 = 21 << MAP_HUGE_SHIFT;
const MAP_HUGE_1GB: i32 = 30 << MAP_HUGE_SHIFT;
/// `MFD_HUGE_2MB` / `MFD_HUGE_1GB` (include/uapi/linux/memfd.h): memfd_create(2) encodes the
/// hugetlb page size like mmap does (`MFD_HUGE_SHIFT` = `MAP_HUGE_SHIFT`).
const MFD_HUGE_2MB: u32 = MAP_HUGE_2MB as u32;
const MFD_HUGE_1GB: u32 = MAP_HUGE_1GB as u32;

/// A MAP_SHARED mapping of a memfd that this process owns (the host view); unmapped on drop.
#[derive(Debug)]
pub(super) struct HostView {
    pub(super) addr: u64,
    pub(super) len: u64,
}

impl Drop for HostView {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map_shared` created for this view; the
        // `SharedRegion::host_view` contract ends with the `GuestRam`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// A memfd of `len` bytes for the region at `gpa`, mapped MAP_SHARED twice: the guest mapping
/// (handed to vm-memory and KVM) and the VMM's host view.
pub(super) fn map_shared(
    gpa: u64,
    len: u64,
    backing: BackingKind,
) -> Result<(MmapRegion, Arc<File>, HostView), MemoryError> {
    let memfd_err = |source| MemoryError::Memfd {
        size: human(len),
        backing,
        source,
    };
    let mut flags = libc::MFD_CLOEXEC;
    match backing {
        BackingKind::Shared2M => flags |= libc::MFD_HUGETLB | MFD_HUGE_2MB,
        BackingKind::Shared1G => flags |= libc::MFD_HUGETLB | MFD_HUGE_1GB,
        _ => {}
    }
    let name = CString::new(format!("guest-ram-{gpa:#x}")).expect("no NUL in the name");
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(memfd_err(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    file.set_len(len).map_err(memfd_err)?;
    let len_usize = usize::try_from(len)
        .map_err(|_| memfd_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
    let mmap_err = |source| MemoryError::Mmap {
        size: human(len),
        backing,
        source,
    };
    // Shared hugetlbfs mappings reserve the file's huge pages at mmap time: a short pool fails
    // here, not as SIGBUS later.
    let mut region = MmapRegion::build(
        Some(FileOffset::from_arc(file.clone(), 0)),
        len_usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(|e| match e {
        vm_memory::mmap::MmapRegionError::Mmap(io) => mmap_err(io),
        other => mmap_err(std::io::Error::other(other.to_string())),
    })?;
    region.set_hugetlbfs(backing.is_hugetlb());
    // SAFETY: a new shared mapping of the whole memfd at a kernel-chosen address.
    let view = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len_usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if view == libc::MAP_FAILED {
        return Err(mmap_err(std::io::Error::last_os_error()));
    }
    Ok((
        region,
        file,
        HostView {
            addr: view as u64,
            len,
        },
    ))
}

pub(super) fn map_backing(len: u64, backing: BackingKind) -> Result<MmapRegion, MemoryError> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    match backing {
        BackingKind::Hugetlb2M => {
            flags = (flags & !libc::MAP_NORESERVE) | libc::MAP_HUGETLB | MAP_HUGE_2MB
        }
        BackingKind::Hugetlb1G => {
            flags = (flags & !libc::MAP_NORESERVE) | libc::MAP_HUGETLB | MAP_HUGE_1GB
        }
        _ => {}
    }
    let mmap_err = |source| MemoryError::Mmap {
        size: human(len),
        backing,
        source,
    };
    let len_usize = usize::try_from(len)
        .map_err(|_| mmap_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
    // Hugetlb mappings are private without MAP_NORESERVE: the kernel reserves every huge page at
    // mmap time, so a short pool fails here (ENOMEM) instead of as SIGBUS on a later touch.
    let region = MmapRegion::build(None, len_usize, libc::PROT_READ | libc::PROT_WRITE, flags)
        .map_err(|e| match e {
            vm_memory::mmap::MmapRegionError::Mmap(io) => mmap_err(io),
            other => mmap_err(std::io::Error::other(other.to_string())),
        })?;
    let mut region = region;
    region.set_hugetlbfs(backing.is_hugetlb());
    if backing == BackingKind::Thp {
        // SAFETY: the range is the mapping just created and owned by `region`; madvise only
        // changes the kernel's paging policy for it.
        let ret = unsafe { libc::madvise(region.as_ptr().cast(), len_usize, libc::MADV_HUGEPAGE) };
        if ret != 0 {
            warn!(
                "madvise(MADV_HUGEPAGE) failed: {}; guest RAM may use 4 KiB pages",
                std::io::Error::last_os_error()
            );
        }
        if !(region.as_ptr() as u64).is_multiple_of(SZ_2M) {
            warn!(
                "THP guest RAM mapping at {:p} is not 2 MiB aligned",
                region.as_ptr()
            );
        }
    }
    Ok(region)
}
