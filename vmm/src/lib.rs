//! The VMM as a library: the binary in `main.rs` is a thin CLI over these modules.
//!
//! [`machine`] is the one composition root of a VM (RAM, KVM VM, vCPUs, pager, dirty
//! tracking, reclaim, control socket, migration); a payload is either a booted kernel
//! ([`machine::kernel`]) or a built-in test guest ([`guest`]).

pub mod api;
pub mod arch;
pub mod boot;
pub mod cli;
pub mod devices;
pub mod dirty;
pub mod exit;
pub mod guest;
pub mod hypervisor;
pub mod machine;
pub mod memory;
pub mod migrate;
pub mod pager;
pub mod seccomp;
pub mod uffd;
pub mod vcpu;
pub mod virtio;
