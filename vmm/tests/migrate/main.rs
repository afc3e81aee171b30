//! The migration suites, one test binary: the wire format over real sockets (stream), vCPU and
//! VM state on real KVM (state), precopy between two `vmm` processes (precopy), and every
//! dirty-tracking mode with precopy and postcopy (modes), peers that stall (timeouts),
//! peers that must prove a shared secret (auth), migrations over several connections
//! (connections), a guest going back and forth between two `vmm --stay` processes (stay),
//! and two test hosts in network namespaces
//! (hosts) that the mode and auth migrations also run between.

mod auth;
#[path = "../common/mod.rs"]
mod common;
mod connections;
mod hosts;
mod modes;
mod precopy;
mod state;
mod stay;
mod stream;
mod timeouts;
mod util;
