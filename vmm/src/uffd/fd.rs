//! The userfaultfd descriptor: opening and handshaking it, and its ioctls and reads.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};

use super::abi::*;
use super::error::{fill_result, ioctl_result, os_err, UffdError};
use super::event::Event;

/// Which ioctls a registered range supports (`uffdio_register.ioctls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeIoctls(pub u64);

impl RangeIoctls {
    /// UFFDIO_ZEROPAGE is available (not on hugetlbfs).
    pub fn zeropage(self) -> bool {
        self.0 & ioctl_bit(_UFFDIO_ZEROPAGE) != 0
    }
    /// UFFDIO_COPY is available.
    pub fn copy(self) -> bool {
        self.0 & ioctl_bit(_UFFDIO_COPY) != 0
    }
    /// UFFDIO_WRITEPROTECT is available.
    pub fn writeprotect(self) -> bool {
        self.0 & ioctl_bit(_UFFDIO_WRITEPROTECT) != 0
    }
    /// UFFDIO_CONTINUE is available.
    pub fn continue_(self) -> bool {
        self.0 & ioctl_bit(_UFFDIO_CONTINUE) != 0
    }
    /// UFFDIO_WAKE is available.
    pub fn wake(self) -> bool {
        self.0 & ioctl_bit(_UFFDIO_WAKE) != 0
    }
}

/// An open, handshaken userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    file: File,
    features: u64,
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Flags for a new fd: close on exec, non-blocking reads (the handlers poll).
const OPEN_FLAGS: i32 = libc::O_CLOEXEC | libc::O_NONBLOCK;

fn open_raw() -> Result<File, UffdError> {
    // SAFETY: userfaultfd(2) takes one int of flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, OPEN_FLAGS) };
    if fd >= 0 {
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        return Ok(unsafe { File::from_raw_fd(fd as RawFd) });
    }
    let syscall = io::Error::last_os_error();
    // Fallback: /dev/userfaultfd (its access is governed by the device node's permissions
    // rather than vm.unprivileged_userfaultfd).
    let dev = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => dev,
        Err(dev) => return Err(UffdError::Open { syscall, dev }),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the open flags by value and returns a new fd or -1.
    let fd = unsafe { ioctl_with_val(&dev, USERFAULTFD_IOC_NEW(), OPEN_FLAGS as libc::c_ulong) };
    if fd < 0 {
        return Err(UffdError::Open {
            syscall,
            dev: io::Error::last_os_error(),
        });
    }
    // SAFETY: the ioctl returned a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn api(file: &File, features: u64) -> Result<uffdio_api, UffdError> {
    let mut api = uffdio_api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which lives for the call.
    let ret = unsafe { ioctl_with_mut_ref(file, UFFDIO_API(), &mut api) };
    if ret < 0 {
        return Err(UffdError::Api(io::Error::last_os_error()));
    }
    Ok(api)
}

impl Uffd {
    /// Features the kernel offers (a probe on a throw-away fd).
    pub fn supported_features() -> Result<u64, UffdError> {
        let probe = open_raw()?;
        Ok(api(&probe, 0)?.features)
    }

    /// Opens a userfaultfd and enables `required | optional` features that the kernel offers.
    /// Fails with [`UffdError::MissingFeature`] naming every required feature it lacks.
    ///
    /// Requesting an unsupported feature makes UFFDIO_API fail with a bare EINVAL, and the API
    /// call can only be made once per fd, so a probe fd learns the offer first.
    pub fn new(required: u64, optional: u64) -> Result<Uffd, UffdError> {
        let offered = Self::supported_features()?;
        let missing = required & !offered;
        if missing != 0 {
            return Err(UffdError::MissingFeature { missing, offered });
        }
        let file = open_raw()?;
        let want = (required | optional) & offered;
        // After the handshake the kernel reports everything it offers in `features`; what is
        // enabled is what was asked for.
        api(&file, want)?;
        Ok(Uffd {
            file,
            features: want,
        })
    }

    /// The enabled feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[start, start+len)` with `mode` (`UFFDIO_REGISTER_MODE_*`).
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<RangeIoctls, UffdError> {
        let mut reg = uffdio_register {
            range: uffdio_range { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register` living for the call.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_REGISTER(), &mut reg) };
        ioctl_result("UFFDIO_REGISTER", start, len, ret)?;
        Ok(RangeIoctls(reg.ioctls))
    }

    /// Unregisters `[start, start+len)`.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = uffdio_range { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range` living for the call.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_UNREGISTER(), &mut range) };
        ioctl_result("UFFDIO_UNREGISTER", start, len, ret)
    }

    /// Wakes the threads waiting on faults in `[start, start+len)`; they retry their access.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = uffdio_range { start, len };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range` living for the call.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_WAKE(), &mut range) };
        ioctl_result("UFFDIO_WAKE", start, len, ret)
    }

    /// Maps the shared zero page over `[start, start+len)` (anonymous memory only) and wakes the
    /// waiters unless `UFFDIO_ZEROPAGE_MODE_DONTWAKE` is in `mode`. Returns the bytes mapped.
    pub fn zeropage(&self, start: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut zp = uffdio_zeropage {
            range: uffdio_range { start, len },
            mode,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `uffdio_zeropage` living for the call;
        // the kernel checks that the range is registered.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_ZEROPAGE(), &mut zp) };
        fill_result("UFFDIO_ZEROPAGE", start, len, ret, zp.zeropage)
    }

    /// Copies `len` bytes from `src` into the missing pages at `dst` and wakes the waiters
    /// unless `UFFDIO_COPY_MODE_DONTWAKE` is in `mode`. On hugetlbfs `len` must cover whole huge
    /// pages. Returns the bytes copied.
    ///
    /// # Safety
    ///
    /// `src..src+len` must be readable memory of this process for the duration of the call.
    pub unsafe fn copy(&self, dst: u64, src: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut cp = uffdio_copy {
            dst,
            src,
            len,
            mode,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one `uffdio_copy` living for the call; the
        // caller guarantees the source buffer is readable; the kernel checks the destination.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_COPY(), &mut cp) };
        fill_result("UFFDIO_COPY", dst, len, ret, cp.copy)
    }

    /// Sets (`protect`) or clears write protection on `[start, start+len)`. Clearing wakes the
    /// waiting writers unless `dont_wake`.
    pub fn write_protect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        dont_wake: bool,
    ) -> Result<(), UffdError> {
        let mut mode = 0;
        if protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_WP;
        }
        if dont_wake {
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut wp = uffdio_writeprotect {
            range: uffdio_range { start, len },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes one `uffdio_writeprotect` living for the
        // call.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_WRITEPROTECT(), &mut wp) };
        if ret < 0 {
            let (errno, source) = os_err();
            return Err(match errno {
                libc::EAGAIN => UffdError::Again {
                    addr: start,
                    done: 0,
                },
                _ => UffdError::Ioctl {
                    op: "UFFDIO_WRITEPROTECT",
                    start,
                    len,
                    source,
                },
            });
        }
        Ok(())
    }

    /// Maps the page-cache pages already present for `[start, start+len)` (minor faults of a
    /// shared memfd / hugetlbfs file). Returns the bytes mapped.
    pub fn continue_(&self, start: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut c = uffdio_continue {
            range: uffdio_range { start, len },
            mode,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads and writes one `uffdio_continue` living for the call.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_CONTINUE(), &mut c) };
        fill_result("UFFDIO_CONTINUE", start, len, ret, c.mapped)
    }

    /// Reads the pending messages into `out` (cleared first), up to `max` at once. Returns the
    /// number read; 0 when none is pending (the fd is non-blocking, and another handler thread
    /// may have taken them).
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> Result<usize, UffdError> {
        const BATCH: usize = 64;
        out.clear();
        let mut msgs = [uffd_msg::default(); BATCH];
        let n = max.clamp(1, BATCH);
        // SAFETY: the buffer holds `n` messages of 32 bytes and lives for the call.
        let ret = unsafe {
            libc::read(
                self.file.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                n * size_of::<uffd_msg>(),
            )
        };
        if ret < 0 {
            let (errno, e) = os_err();
            return match errno {
                libc::EAGAIN | libc::EINTR => Ok(0),
                _ => Err(UffdError::Read(e)),
            };
        }
        let count = ret as usize / size_of::<uffd_msg>();
        for msg in &msgs[..count] {
            out.push(Event::from_msg(msg)?);
        }
        Ok(count)
    }

    /// Waits up to `timeout_ms` (-1: forever) for the fd to be readable.
    pub fn poll_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(ret > 0 && pfd.revents & libc::POLLIN != 0)
    }
}
