//! The migration suites, one test binary: the wire format over real sockets (stream), vCPU and
//! VM state on real KVM (state), precopy between two `vmm` processes (precopy), and every
//! dirty-tracking mode with precopy and postcopy (modes), and peers that stall (timeouts).

#[path = "../common/mod.rs"]
mod common;
mod modes;
mod precopy;
mod state;
mod stream;
mod timeouts;
mod util;
