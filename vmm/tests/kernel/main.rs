//! The suites that boot real kernels, one test binary so that their one-vCPU boots share the
//! host's two cores ([`common::cores`]): the project's test kernel to userspace and its programs
//! ([`linux`]), that kernel driven as a machine: control socket, migration in the middle of its
//! boot, panic and idle ([`machine`]), Debian's stock cloud kernel's early boot on every load
//! path ([`stock`]), and virtio devices under the test kernel ([`devices`]: first by name, so
//! that its test's two boots start beside the others rather than after all of them; [`net`]).

#[path = "../common/mod.rs"]
mod common;
mod devices;
#[path = "../migrate/hosts.rs"]
mod hosts;
mod linux;
mod machine;
#[path = "../migrate/util.rs"]
mod migrate_util;
mod net;
mod stock;
mod util;
