//! A small userfaultfd layer: the kernel ABI of `linux/userfaultfd.h`, the fd, its ioctls and typed events, and the pager's host operations ([`HostPages`]) on it.
//!
//! # Why our own module and not the `userfaultfd` crate
//!
//! The `userfaultfd` crate's `-sys` part generates its bindings with bindgen at build time, which
//! needs libclang (`apt-get install libclang-dev`): a third set-up command on a fresh machine for
//! eight ioctls and five small structs. The structs below are written by hand from the header
//! (each with a size assertion, so a layout slip fails the build), the ioctl numbers come from
//! vmm-sys-util's `ioctl_*_nr!` macros like every other ioctl in this VMM, and the whole ABI
//! stays readable in one file (`uffd/abi.rs`), as in Cloud Hypervisor.
//!
//! # Semantics kept by the types
//!
//! * The fd is opened with `O_CLOEXEC | O_NONBLOCK` and *without* `UFFD_USER_MODE_ONLY`: the
//!   faults that matter come from KVM, i.e. from kernel mode (`get_user_pages` on behalf of a
//!   vCPU), and a user-mode-only fd would never see them.
//! * `EEXIST` (the page is already there) and `EAGAIN` (the address space is changing because a
//!   REMOVE/UNMAP/REMAP event is pending, or the operation stopped part way) are their own error
//!   variants ([`UffdError::Exists`], [`UffdError::Again`]): callers treat them as races, not
//!   failures.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};

mod abi;

use abi::ioctl_bit;
pub use abi::*;

// ---------------------------------------------------------------------------------------------
// Errors and events.
// ---------------------------------------------------------------------------------------------

/// Errors of the userfaultfd layer.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither userfaultfd(2) nor /dev/userfaultfd gave an fd.
    #[error(
        "cannot create a userfaultfd (syscall: {syscall}; /dev/userfaultfd: {dev}); run as root or \
         set /proc/sys/vm/unprivileged_userfaultfd to 1, and use a kernel with CONFIG_USERFAULTFD"
    )]
    Open {
        /// Error of the syscall.
        syscall: io::Error,
        /// Error of the device fallback.
        dev: io::Error,
    },
    /// The UFFDIO_API handshake failed.
    #[error("userfaultfd API handshake (UFFDIO_API, api {UFFD_API:#x}) failed: {0}")]
    Api(#[source] io::Error),
    /// The kernel lacks features this VMM needs.
    #[error(
        "this kernel's userfaultfd lacks {}; it offers {}. Use a newer kernel or turn off the \
         option that needs it",
        feature_names(*.missing).join(", "),
        feature_names(*.offered).join(", ")
    )]
    MissingFeature {
        /// Bits requested as required but not offered.
        missing: u64,
        /// Bits the kernel offers.
        offered: u64,
    },
    /// A registered range does not support an ioctl the caller needs.
    #[error("userfaultfd range {start:#x}+{len:#x} does not support {ioctl} (kernel offers ioctls {offered:#x})")]
    MissingIoctl {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// Name of the ioctl.
        ioctl: &'static str,
        /// The range's ioctl bitmask.
        offered: u64,
    },
    /// EEXIST: a page is already mapped there (another thread resolved the fault first).
    #[error("page already present at {addr:#x} (EEXIST): the fault was resolved by someone else")]
    Exists {
        /// Address of the operation.
        addr: u64,
    },
    /// EAGAIN: the address space is changing (a REMOVE/UNMAP/REMAP event is pending) or the
    /// operation stopped part way; `done` bytes from the start were handled.
    #[error("userfaultfd operation at {addr:#x} must be retried (EAGAIN) after {done} bytes: the mapping is changing")]
    Again {
        /// Address of the operation.
        addr: u64,
        /// Bytes done before the stop.
        done: u64,
    },
    /// Any other ioctl failure.
    #[error("{op} on {start:#x}+{len:#x} failed: {source}")]
    Ioctl {
        /// ioctl name.
        op: &'static str,
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// read(2) of the fd failed.
    #[error("reading userfaultfd events failed: {0}")]
    Read(#[source] io::Error),
    /// The kernel sent an event code this module does not know.
    #[error("unknown userfaultfd event code {0:#x}")]
    UnknownEvent(u8),
}

/// A decoded userfaultfd message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted on a registered range.
    Pagefault {
        /// Faulting host virtual address (page aligned unless EXACT_ADDRESS was requested).
        addr: u64,
        /// A write access.
        write: bool,
        /// A write to a userfaultfd-write-protected page.
        wp: bool,
        /// A minor fault (page cache has the page).
        minor: bool,
        /// Thread id of the faulting thread (0 unless `UFFD_FEATURE_THREAD_ID` is enabled).
        tid: u32,
    },
    /// `[start, end)` was dropped (MADV_DONTNEED / MADV_REMOVE): pages there will fault again.
    Remove {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped (munmap); its registration is gone.
    Unmap {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// A registered range moved with mremap.
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length.
        len: u64,
    },
    /// The process forked; `ufd` is the child's userfaultfd.
    Fork {
        /// The new fd (owned by the receiver).
        ufd: RawFd,
    },
}

impl Event {
    /// Decodes one kernel message.
    pub fn from_msg(msg: &uffd_msg) -> Result<Event, UffdError> {
        let arg = msg.arg;
        Ok(match msg.event {
            UFFD_EVENT_PAGEFAULT => Event::Pagefault {
                addr: arg[1],
                write: arg[0] & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: arg[0] & UFFD_PAGEFAULT_FLAG_WP != 0,
                minor: arg[0] & UFFD_PAGEFAULT_FLAG_MINOR != 0,
                // `feat.ptid` is a __u32 at the start of the third word.
                tid: (arg[2] & u64::from(u32::MAX)) as u32,
            },
            UFFD_EVENT_REMOVE => Event::Remove {
                start: arg[0],
                end: arg[1],
            },
            UFFD_EVENT_UNMAP => Event::Unmap {
                start: arg[0],
                end: arg[1],
            },
            UFFD_EVENT_REMAP => Event::Remap {
                from: arg[0],
                to: arg[1],
                len: arg[2],
            },
            // The fork message's `ufd` is a __u32 at the start of the union.
            UFFD_EVENT_FORK => Event::Fork {
                ufd: (arg[0] & u64::from(u32::MAX)) as u32 as RawFd,
            },
            other => return Err(UffdError::UnknownEvent(other)),
        })
    }
}

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

// ---------------------------------------------------------------------------------------------
// The fd.
// ---------------------------------------------------------------------------------------------

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

/// The result of an ioctl that reports only success or an error.
fn ioctl_result(op: &'static str, start: u64, len: u64, ret: i32) -> Result<(), UffdError> {
    if ret < 0 {
        return Err(UffdError::Ioctl {
            op,
            start,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn os_err() -> (i32, io::Error) {
    let e = io::Error::last_os_error();
    (e.raw_os_error().unwrap_or(0), e)
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

/// Maps the result of a fill ioctl (COPY / ZEROPAGE / CONTINUE): `ret` of the ioctl and the
/// `out` field the kernel wrote (bytes done, or a negative errno).
fn fill_result(
    op: &'static str,
    start: u64,
    len: u64,
    ret: i32,
    out: i64,
) -> Result<u64, UffdError> {
    if ret >= 0 {
        return Ok(len);
    }
    let (errno, source) = os_err();
    let done = if out > 0 { out as u64 } else { 0 };
    match errno {
        libc::EEXIST => Err(UffdError::Exists { addr: start + done }),
        libc::EAGAIN => Err(UffdError::Again { addr: start, done }),
        _ => Err(UffdError::Ioctl {
            op,
            start,
            len,
            source,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The host operations of the demand pager.
// ---------------------------------------------------------------------------------------------

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
        // SAFETY: the pager names a range of guest RAM it owns and wants dropped; no Rust
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
        // SAFETY: fallocate on a memfd of guest RAM that the caller names; no Rust reference
        // into the range exists (guest RAM is accessed with volatile copies), and the guest
        // sees zeroes after.
        let ret = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        // Values of the _IOWR/_IOR expansions on x86-64, computed from the header by hand.
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(UFFDIO_WRITEPROTECT(), 0xc018_aa06);
        assert_eq!(UFFDIO_CONTINUE(), 0xc020_aa07);
        assert_eq!(USERFAULTFD_IOC_NEW(), 0xaa00);
    }

    #[test]
    fn decodes_messages() {
        let msg = uffd_msg {
            event: UFFD_EVENT_PAGEFAULT,
            arg: [
                UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP,
                0x7000,
                42,
            ],
            ..Default::default()
        };
        assert_eq!(
            Event::from_msg(&msg).unwrap(),
            Event::Pagefault {
                addr: 0x7000,
                write: true,
                wp: true,
                minor: false,
                tid: 42
            }
        );
        let msg = uffd_msg {
            event: UFFD_EVENT_REMOVE,
            arg: [0x1000, 0x3000, 0],
            ..Default::default()
        };
        assert_eq!(
            Event::from_msg(&msg).unwrap(),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        let msg = uffd_msg {
            event: 0x42,
            ..Default::default()
        };
        assert!(matches!(
            Event::from_msg(&msg),
            Err(UffdError::UnknownEvent(0x42))
        ));
    }

    #[test]
    fn missing_feature_error_names_the_feature() {
        let e = UffdError::MissingFeature {
            missing: UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            offered: UFFD_FEATURE_EVENT_REMOVE,
        };
        let s = e.to_string();
        assert!(s.contains("UFFD_FEATURE_WP_HUGETLBFS_SHMEM"), "{s}");
        assert!(s.contains("offers UFFD_FEATURE_EVENT_REMOVE"), "{s}");
    }
}
