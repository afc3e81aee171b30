//! Helpers of the pager's real-kernel suites: "guest RAM" as a plain anonymous mapping that a
//! pager registers directly (no KVM), with volatile access and a presence check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use stage2::PageSize;
use vmm::memory::RamRegion;
use vmm::pager::{Pager, PagerConfig};

pub const PAGE: u64 = 4096;
pub const HUGE_2M: u64 = 2 << 20;
pub const GIB: u64 = 1 << 30;

/// A small, fast pseudo-random step (xorshift64) for the suites' random page choices.
pub fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// A pager without write tracking: `handlers` handler threads (one per vCPU), `fault_around`
/// pages of fault-around.
pub fn cfg(handlers: usize, fault_around: usize) -> PagerConfig {
    PagerConfig {
        handlers,
        write_tracking: false,
        fault_around_pages: fault_around,
        vcpus: handlers,
    }
}

/// `len` bytes of RAM (2 MiB hugetlb pages or 4 KiB ones) under a pager started with `cfg`;
/// None (the test skips, the reason printed) when the memory cannot be mapped.
pub fn paged(len: u64, hugetlb: bool, cfg: PagerConfig) -> Option<(Arc<Ram>, Pager)> {
    let ram = Arc::new(Ram::new(len, hugetlb)?);
    let page = if hugetlb {
        PageSize::Size2M
    } else {
        PageSize::Size4K
    };
    let pager = Pager::start_with_regions(&[ram.region()], page, cfg).unwrap();
    Some((ram, pager))
}

/// Two toucher threads write a word into random pages of `ram` (its own address, bit 0 set)
/// and read it back, which must give the write or zero (a page dropped meanwhile), while
/// `disturb` runs over and over on a third thread; after `run`, the touches and the
/// disturbances made.
pub fn touch_storm(
    ram: &Arc<Ram>,
    seed: u64,
    run: Duration,
    mut disturb: impl FnMut() + Send + 'static,
) -> (u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let touchers: Vec<_> = (0..2u64)
        .map(|t| {
            let (ram, stop) = (ram.clone(), stop.clone());
            thread::spawn(move || {
                let mut seed = seed + t;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let a = (xorshift(&mut seed) % (ram.len / PAGE)) * PAGE + t * 8;
                    ram.write(a, a | 1);
                    let v = ram.read(a);
                    assert!(v == a | 1 || v == 0, "page {a:#x} read {v:#x}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let disturber = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                disturb();
                n += 1;
            }
            n
        })
    };
    thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    let touches = touchers.into_iter().map(|h| h.join().unwrap()).sum();
    (touches, disturber.join().unwrap())
}

/// A pager that tracks writes for `vcpus` writer threads: two handlers, no fault-around.
pub fn tracking_cfg(vcpus: usize) -> PagerConfig {
    PagerConfig {
        handlers: 2,
        write_tracking: true,
        fault_around_pages: 1,
        vcpus,
    }
}

/// Guest "RAM": a private anonymous mapping, unmapped on drop (after the pager is stopped).
pub struct Ram {
    pub addr: u64,
    pub len: u64,
}

impl Ram {
    pub fn new(len: u64, hugetlb: bool) -> Option<Ram> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if hugetlb {
            flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB;
        }
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            eprintln!(
                "skipping: cannot map {} MiB ({}): {}",
                len >> 20,
                if hugetlb {
                    "2 MiB hugetlb"
                } else {
                    "anonymous"
                },
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(Ram {
            addr: p as u64,
            len,
        })
    }

    pub fn region(&self) -> RamRegion {
        RamRegion {
            gpa: 0,
            len: self.len,
            host_addr: self.addr,
        }
    }

    pub fn read(&self, gpa: u64) -> u64 {
        assert!(gpa + 8 <= self.len);
        // SAFETY: inside the live mapping.
        unsafe { std::ptr::read_volatile((self.addr + gpa) as *const u64) }
    }

    pub fn write(&self, gpa: u64, v: u64) {
        assert!(gpa + 8 <= self.len);
        // SAFETY: inside the live mapping.
        unsafe { std::ptr::write_volatile((self.addr + gpa) as *mut u64, v) }
    }

    /// Whether the host has the page of `gpa` (mincore).
    pub fn present(&self, gpa: u64) -> bool {
        let mut v = 0u8;
        // SAFETY: one page of the live mapping, one byte of output.
        let r = unsafe {
            libc::mincore(
                (self.addr + (gpa & !(PAGE - 1))) as *mut libc::c_void,
                PAGE as usize,
                &mut v,
            )
        };
        r == 0 && v & 1 != 0
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly this mapping; the pager was stopped before (tests stop it first).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// Shared guest "RAM": a memfd (hugetlbfs memfd for 2 MiB pages) mapped MAP_SHARED twice, the
/// guest mapping that a pager registers and the VMM's host view. Unmapped on drop.
pub struct SharedRam {
    pub ram: Ram,
    pub file: std::sync::Arc<std::fs::File>,
    pub view: u64,
}

impl SharedRam {
    pub fn new(len: u64, hugetlb: bool) -> Option<SharedRam> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // memfd_create(2): MFD_HUGE_2MB is log2(2 MiB) at MFD_HUGE_SHIFT (26).
        const MFD_HUGE_2MB: u32 = 21 << 26;
        let mut flags = libc::MFD_CLOEXEC;
        if hugetlb {
            flags |= libc::MFD_HUGETLB | MFD_HUGE_2MB;
        }
        // SAFETY: a NUL-terminated name; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"test-ram".as_ptr(), flags) };
        if fd < 0 {
            eprintln!(
                "skipping: memfd_create: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: a fresh fd nothing else owns.
        let file = std::sync::Arc::new(unsafe { std::fs::File::from_raw_fd(fd) });
        file.set_len(len).unwrap();
        let map = || {
            // SAFETY: a new shared mapping of the whole memfd at a kernel-chosen address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            (p != libc::MAP_FAILED).then_some(p as u64)
        };
        let (Some(addr), Some(view)) = (map(), map()) else {
            eprintln!(
                "skipping: cannot map the {} MiB memfd ({}): {}",
                len >> 20,
                if hugetlb { "2 MiB hugetlb" } else { "shmem" },
                std::io::Error::last_os_error()
            );
            return None;
        };
        Some(SharedRam {
            ram: Ram { addr, len },
            file,
            view,
        })
    }

    pub fn shared_region(&self) -> vmm::memory::SharedRegion {
        vmm::memory::SharedRegion {
            region: self.ram.region(),
            file: self.file.clone(),
            host_view: self.view,
        }
    }

    /// Writes through the host view (the page lands in the file, not in the guest mapping).
    pub fn view_write(&self, gpa: u64, v: u64) {
        assert!(gpa + 8 <= self.ram.len);
        // SAFETY: inside the live host view.
        unsafe { std::ptr::write_volatile((self.view + gpa) as *mut u64, v) }
    }

    pub fn view_read(&self, gpa: u64) -> u64 {
        assert!(gpa + 8 <= self.ram.len);
        // SAFETY: inside the live host view.
        unsafe { std::ptr::read_volatile((self.view + gpa) as *const u64) }
    }
}

impl Drop for SharedRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the host view; `ram` unmaps the guest mapping.
        unsafe { libc::munmap(self.view as *mut libc::c_void, self.ram.len as usize) };
    }
}
