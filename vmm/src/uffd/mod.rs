//! A small userfaultfd layer: the kernel ABI, the fd and its ioctls, events, host page operations.
//!
//! The parts: `abi` (`linux/userfaultfd.h` by hand), `fd` ([`Uffd`] and its ioctls), `event`
//! (typed [`Event`]s), `host_pages` (the pager's operations, [`HostPages`]) and `error`.
//!
//! # Why our own module and not the `userfaultfd` crate
//!
//! The `userfaultfd` crate's `-sys` part generates its bindings with bindgen at build time, which
//! needs libclang (`apt-get install libclang-dev`): a third set-up command on a fresh machine for
//! eight ioctls and five small structs. The structs of `abi` are written by hand from the header
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

mod abi;
mod error;
mod event;
mod fd;
mod host_pages;

pub use abi::*;
pub use error::UffdError;
pub use event::Event;
pub use fd::{RangeIoctls, Uffd};
pub use host_pages::{drop_pages, punch_hole, HostPages};
