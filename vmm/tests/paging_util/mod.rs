//! Helpers of the pager's real-kernel suites: "guest RAM" as a plain anonymous mapping that a
//! pager registers directly (no KVM), with volatile access and a presence check.

#![allow(dead_code)] // each suite uses part of the helpers

use vmm::memory::RamRegion;

pub const PAGE: u64 = 4096;

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
