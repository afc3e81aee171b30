//! Guest RAM through a migration stream: send ranges of guest memory (zero pages as runs
//! without data; with demand paging, pages the guest never touched without reading them) and
//! write received page chunks into the destination's memory (with demand paging, missing host
//! pages are placed whole through the pager instead of faulting them in).

mod apply;
mod digest;
mod range;
mod receive;
mod residency;
mod send;
#[cfg(test)]
mod tests;

pub use super::pager::RamPager;
pub use apply::{apply_chunk, receive_ram};
pub use digest::{page_crc, DigestCheck, RamDigest};
pub use range::{check_range, RamError};
pub use receive::RamReceiver;
pub(crate) use residency::open_pagemap;
pub use residency::ResidencyCursor;
pub use send::RamSender;
