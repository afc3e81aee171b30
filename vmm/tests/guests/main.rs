//! The `vmm --guest` suites, one test binary: the test guests on real KVM under every backing
//! (stress), reclaims while they run, a paced dirty rate, and bad input refused.

mod bad_input;
#[path = "../common/mod.rs"]
mod common;
mod dirty_rate;
mod reclaim;
mod stress;
mod util;

#[path = "../migrate/util.rs"]
mod migrate_util;
