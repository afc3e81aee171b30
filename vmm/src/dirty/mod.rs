//! Dirty-page tracking for live migration: one pipeline whatever the mode. A [`DirtyLog`] per
//! [`DirtyMode`] (KVM's dirty bitmap in [`bitmap`], KVM's dirty rings in [`ring`], stage2's own
//! userfaultfd write tracking in [`wp`]) harvests into one [`DirtyBitmap`] (a
//! [`stage2::Bitmap`] per slot), which [`DirtyTracker`] ORs with the pages the VMM wrote
//! itself; the migration sends from that bitmap as it is.
//!
//! The rule (DESIGN.md rule 7, the kernel selftest `dirty_log_test`'s check): every page whose
//! content changed after harvest N returned is dirty in harvest N+1 or later. A harvest is
//! "get and clear": after it returns, new writes are recorded again, and a write that raced
//! with the clear is already in memory, so the caller's copy, made after the harvest, holds it.
//!
//! Like Cloud Hypervisor's `memory_manager` `dirty_log`, the VMM's own writes (device
//! emulation, loading) are ORed in: [`VmmDirty`] is the VMM's bitmap, and
//! [`DirtyBitmap::merge_words`] takes any other LSB-first page bitmap (vm-memory's
//! `AtomicBitmap::get_and_reset()` has that layout).

pub mod bitmap;
mod error;
mod host_changes;
mod log;
mod mode;
mod pages;
pub mod ring;
mod tracker;
pub mod wp;

pub use error::DirtyError;
pub use host_changes::{HostChangeRefused, HostChanges};
pub use log::{DirtyLog, HarvestStats};
pub use mode::{DirtyMode, DEFAULT_RING_BYTES};
pub use pages::{DirtyBitmap, SlotBitmap, SlotInfo, VmmDirty, PAGE_SHIFT, PAGE_SIZE};
pub use tracker::{DirtyRingFullHook, DirtySource, DirtyTracker};
pub use wp::SETTLE_TIMEOUT;
