//! The suites that boot the project's test kernel, one test binary so that their one-vCPU
//! boots share the host's two cores ([`common::cores`]): a real Linux to userspace and its
//! programs ([`linux`]), and the booted kernel driven as a machine: control socket, migration
//! in the middle of its boot, panic and idle ([`machine`]).

#[path = "../common/mod.rs"]
mod common;
mod linux;
mod machine;
#[path = "../migrate/util.rs"]
mod migrate_util;
mod util;
