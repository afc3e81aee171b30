//! The errors of the userfaultfd layer, and how a failed ioctl's errno becomes one of them.

use std::io;

use super::abi::{feature_names, UFFD_API};

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

/// The result of an ioctl that reports only success or an error.
pub(super) fn ioctl_result(
    op: &'static str,
    start: u64,
    len: u64,
    ret: i32,
) -> Result<(), UffdError> {
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

pub(super) fn os_err() -> (i32, io::Error) {
    let e = io::Error::last_os_error();
    (e.raw_os_error().unwrap_or(0), e)
}

/// Maps the result of a fill ioctl (COPY / ZEROPAGE / CONTINUE): `ret` of the ioctl and the
/// `out` field the kernel wrote (bytes done, or a negative errno).
pub(super) fn fill_result(
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

#[cfg(test)]
mod tests {
    use super::super::abi::{UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
    use super::*;

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
