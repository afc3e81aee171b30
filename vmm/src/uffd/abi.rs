//! The kernel ABI of `include/uapi/linux/userfaultfd.h`, by hand: constants, structs (with size assertions), ioctl numbers and feature names.

use std::mem::size_of;

use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

/// The API version this module speaks (`UFFD_API`).
pub const UFFD_API: u64 = 0xAA;
/// ioctl type byte of every userfaultfd ioctl (`UFFDIO`).
pub const UFFDIO: u32 = 0xAA;

/// ioctl numbers within the `UFFDIO` type (`_UFFDIO_*`).
pub const _UFFDIO_REGISTER: u32 = 0x00;
/// See `_UFFDIO_REGISTER`.
pub const _UFFDIO_UNREGISTER: u32 = 0x01;
/// See `_UFFDIO_REGISTER`.
pub const _UFFDIO_WAKE: u32 = 0x02;
/// See `_UFFDIO_REGISTER`.
pub const _UFFDIO_COPY: u32 = 0x03;
/// See `_UFFDIO_REGISTER`.
pub const _UFFDIO_ZEROPAGE: u32 = 0x04;
/// See `_UFFDIO_REGISTER`.
pub const _UFFDIO_WRITEPROTECT: u32 = 0x06;
/// See `_UFFDIO_REGISTER`.
pub const _UFFDIO_CONTINUE: u32 = 0x07;
/// See `_UFFDIO_REGISTER`.
pub const _UFFDIO_API: u32 = 0x3F;

/// `USERFAULTFD_IOC` and `USERFAULTFD_IOC_NEW` of `/dev/userfaultfd` (Linux 6.1+).
pub const USERFAULTFD_IOC: u32 = 0xAA;

/// Event codes of `uffd_msg.event` (`UFFD_EVENT_*`).
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// See `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_FORK: u8 = 0x13;
/// See `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_REMAP: u8 = 0x14;
/// See `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// See `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

/// Flags of a page-fault message (`UFFD_PAGEFAULT_FLAG_*`): a write access.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// The fault is a write to a userfaultfd-write-protected page.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// The fault is a minor fault (page in the page cache, not mapped).
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// Feature bits of `uffdio_api.features` (`UFFD_FEATURE_*`).
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
/// See `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// See `UFFDIO_REGISTER_MODE_MISSING`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// See `UFFDIO_REGISTER_MODE_MISSING`.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

/// `UFFDIO_COPY_MODE_*`.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
/// Map the copied page write-protected (needs a WP registration).
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: set (1) or clear (0) the protection.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE`.
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_CONTINUE_MODE_WP`: map the page write-protected (needs a WP registration; Linux 6.4+).
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;

/// `UFFD_USER_MODE_ONLY` flag of userfaultfd(2). Never used here (see the module doc); named so
/// that the reason is searchable.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_api {
    /// Requested API (`UFFD_API`).
    pub api: u64,
    /// In: features requested. Out: features the kernel offers.
    pub features: u64,
    /// Out: bitmask of the ioctls available on the fd.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_range {
    /// Start address (page aligned).
    pub start: u64,
    /// Length in bytes (page multiple).
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_register {
    /// The range to register.
    pub range: uffdio_range,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// Out: bitmask of the range ioctls available on the range.
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_copy {
    /// Destination (registered range).
    pub dst: u64,
    /// Source buffer.
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// `UFFDIO_COPY_MODE_*`.
    pub mode: u64,
    /// Out: bytes copied, or a negative errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_zeropage {
    /// Range to map the zero page into.
    pub range: uffdio_range,
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    pub mode: u64,
    /// Out: bytes mapped, or a negative errno.
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_writeprotect {
    /// Range to (un)protect.
    pub range: uffdio_range,
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_continue {
    /// Range whose page-cache pages to map.
    pub range: uffdio_range,
    /// `UFFDIO_CONTINUE_MODE_*`.
    pub mode: u64,
    /// Out: bytes mapped, or a negative errno.
    pub mapped: i64,
}

/// `struct uffd_msg` (packed, 32 bytes): the event code and the raw 24-byte union, decoded by
/// [`super::Event::from_msg`].
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffd_msg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// The `arg` union as three u64 (pagefault: flags, address, ptid; remap: from, to, len;
    /// remove/unmap: start, end; fork: ufd in the low 32 bits of the first word).
    pub arg: [u64; 3],
}

const _: () = assert!(size_of::<uffdio_api>() == 24);
const _: () = assert!(size_of::<uffdio_range>() == 16);
const _: () = assert!(size_of::<uffdio_register>() == 32);
const _: () = assert!(size_of::<uffdio_copy>() == 40);
const _: () = assert!(size_of::<uffdio_zeropage>() == 32);
const _: () = assert!(size_of::<uffdio_writeprotect>() == 24);
const _: () = assert!(size_of::<uffdio_continue>() == 32);
const _: () = assert!(size_of::<uffd_msg>() == 32);

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, _UFFDIO_API, uffdio_api);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, _UFFDIO_REGISTER, uffdio_register);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, _UFFDIO_UNREGISTER, uffdio_range);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, _UFFDIO_WAKE, uffdio_range);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, _UFFDIO_COPY, uffdio_copy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage);
ioctl_iowr_nr!(
    UFFDIO_WRITEPROTECT,
    UFFDIO,
    _UFFDIO_WRITEPROTECT,
    uffdio_writeprotect
);
ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, _UFFDIO_CONTINUE, uffdio_continue);
ioctl_io_nr!(USERFAULTFD_IOC_NEW, USERFAULTFD_IOC, 0x00);

/// Bit of a range ioctl in `uffdio_register.ioctls` / `uffdio_api.ioctls`.
pub(super) const fn ioctl_bit(nr: u32) -> u64 {
    1u64 << nr
}

/// Feature names for error messages, in bit order.
const FEATURE_NAMES: &[(u64, &str)] = &[
    (
        UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        "UFFD_FEATURE_PAGEFAULT_FLAG_WP",
    ),
    (UFFD_FEATURE_EVENT_FORK, "UFFD_FEATURE_EVENT_FORK"),
    (UFFD_FEATURE_EVENT_REMAP, "UFFD_FEATURE_EVENT_REMAP"),
    (UFFD_FEATURE_EVENT_REMOVE, "UFFD_FEATURE_EVENT_REMOVE"),
    (
        UFFD_FEATURE_MISSING_HUGETLBFS,
        "UFFD_FEATURE_MISSING_HUGETLBFS",
    ),
    (UFFD_FEATURE_MISSING_SHMEM, "UFFD_FEATURE_MISSING_SHMEM"),
    (UFFD_FEATURE_EVENT_UNMAP, "UFFD_FEATURE_EVENT_UNMAP"),
    (UFFD_FEATURE_SIGBUS, "UFFD_FEATURE_SIGBUS"),
    (UFFD_FEATURE_THREAD_ID, "UFFD_FEATURE_THREAD_ID"),
    (UFFD_FEATURE_MINOR_HUGETLBFS, "UFFD_FEATURE_MINOR_HUGETLBFS"),
    (UFFD_FEATURE_MINOR_SHMEM, "UFFD_FEATURE_MINOR_SHMEM"),
    (UFFD_FEATURE_EXACT_ADDRESS, "UFFD_FEATURE_EXACT_ADDRESS"),
    (
        UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
    ),
];

/// Names of the feature bits set in `bits` (unknown bits as hex).
pub fn feature_names(bits: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = bits;
    for &(bit, name) in FEATURE_NAMES {
        if bits & bit != 0 {
            out.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    out
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
}
