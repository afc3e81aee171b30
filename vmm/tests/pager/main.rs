//! The demand pager's suite, one test binary: the pager against the real kernel (real
//! userfaultfd, real memory, threads standing in for vCPUs), wired to the control socket, and
//! on real KVM through `vmm --guest` with shared memory.

mod api;
#[path = "../common/mod.rs"]
mod common;
mod dirty;
mod real;
mod settle;
mod shared;
mod shared_guest;
mod shared_migrate;
mod source;
mod util;

#[path = "../guests/util.rs"]
mod guest_util;
#[path = "../migrate/util.rs"]
mod migrate_util;
