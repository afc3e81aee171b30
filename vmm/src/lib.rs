//! The VMM as a library: the binary in `main.rs` is a thin CLI over these modules.
//!
//! Module ownership while the first version is built in parallel:
//! boot/memory/vcpu/devices/arch/vm (bzImage boot, issue 3), uffd/paging
//! (demand paging, issue 4), guest (built-in test guests, issue 4).

pub mod api;
pub mod arch;
pub mod boot;
pub mod cli;
pub mod devices;
pub mod dirty;
pub mod guest;
pub mod memory;
pub mod migrate;
pub mod paging;
pub mod uffd;
pub mod vcpu;
pub mod vm;
