//! x86-64 test guests (`stress`, `touch`, `dirty`) and their host side: parameter block,
//! port protocol, result aggregation and the exact replay check of `dirty`.
//!
//! The guests are assembled into the host binary ([`payload`]); the VMM copies one
//! into guest memory, writes a [`Params`] block, starts every vCPU in 64-bit mode with
//! `rdi` = vCPU id and `rsi` = the block's gpa, decodes their port writes with
//! [`protocol::decode`] and collects them in a [`Report`].

pub mod dirty;
pub mod params;
pub mod payload;
pub mod protocol;
pub mod report;

pub use params::{GuestKind, Mode, Params, VcpuBlock};
pub use payload::{payload, payload_of, Payload};
pub use protocol::Event;
pub use report::Report;
