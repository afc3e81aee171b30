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
mod host_changes;
mod log;
mod pages;
pub mod ring;
mod tracker;
pub mod wp;

pub use host_changes::{HostChangeRefused, HostChanges};
pub use log::DirtyLog;
pub use pages::{DirtyBitmap, SlotBitmap, VmmDirty};
pub use tracker::{DirtySource, DirtyTracker, HarvestStats};
pub use wp::SETTLE_TIMEOUT;

use crate::memory::RamRegion;
use crate::pager::PagingError;

/// Guest page shift: dirty tracking is at 4 KiB precision in every mode.
pub const PAGE_SHIFT: u32 = 12;
/// Guest page size.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Which source of dirty pages a tracker uses (`--dirty-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// `kvm-bitmap`: KVM's dirty bitmap with manual protect, cleared per chunk.
    KvmBitmap,
    /// `kvm-ring`: KVM's per-vCPU dirty rings of `ring_bytes` bytes each (a power of two).
    KvmRing {
        /// Bytes per vCPU ring (16 bytes per entry).
        ring_bytes: u32,
    },
    /// `stage2-wp`: stage2's write tracking through userfaultfd write-protect (needs a
    /// [`Pager`] started with `write_tracking`).
    Stage2Wp,
}

impl std::str::FromStr for DirtyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm-bitmap" => Ok(DirtyMode::KvmBitmap),
            "kvm-ring" => Ok(DirtyMode::KvmRing {
                ring_bytes: DEFAULT_RING_BYTES,
            }),
            "stage2-wp" => Ok(DirtyMode::Stage2Wp),
            other => Err(format!(
                "unknown dirty-tracking mode {other:?}: use kvm-bitmap, kvm-ring or stage2-wp"
            )),
        }
    }
}

impl DirtyMode {
    /// The `--dirty-mode` spelling.
    pub fn name(&self) -> &'static str {
        match self {
            DirtyMode::KvmBitmap => "kvm-bitmap",
            DirtyMode::KvmRing { .. } => "kvm-ring",
            DirtyMode::Stage2Wp => "stage2-wp",
        }
    }
}

/// Default per-vCPU ring: 64 KiB = 4096 entries (the selftest's default size).
pub const DEFAULT_RING_BYTES: u32 = 64 << 10;

/// Errors of dirty tracking; each says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A KVM call failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// No dirty-ring capability on this host.
    #[error("KVM on this host has no dirty ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]): use --dirty-mode kvm-bitmap")]
    NoRing,
    /// Bad ring size.
    #[error("dirty ring size {bytes} bytes is not a power of two between 4096 and KVM's maximum ({max}): choose e.g. 65536")]
    RingSize {
        /// Asked.
        bytes: u32,
        /// KVM_CHECK_EXTENSION's answer (0 if not asked yet).
        max: u32,
    },
    /// Rings must be enabled before vCPUs are created.
    #[error("KVM refused to enable dirty rings: vCPUs already exist; create the tracker right after the VM, before any vCPU")]
    RingAfterVcpus,
    /// A vCPU index beyond the attached rings.
    #[error(
        "vCPU {0} has no dirty ring attached: call attach_vcpu for every vCPU after creating it"
    )]
    NoVcpuRing(usize),
    /// stage2-wp without a pager that tracks writes.
    #[error("stage2-wp dirty tracking needs demand paging with write tracking on (PagerConfig::write_tracking = true)")]
    NoWriteTracking,
    /// The pager's dirty log (stage2-wp) failed.
    #[error("stage2-wp dirty log: {0}")]
    Paging(#[from] PagingError),
    /// The ring reported a slot we do not track.
    #[error("KVM's dirty ring reported slot {0}, which is not guest RAM of this tracker")]
    UnknownSlot(u32),
}

impl DirtyError {
    fn kvm(what: &'static str) -> DirtyError {
        DirtyError::Kvm {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// One KVM memslot of guest RAM. The tracker assumes slot `i` is RAM region `i` (vm.rs installs
/// them in that order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// KVM slot id.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// Host address of `gpa`.
    pub host_addr: u64,
}

impl SlotInfo {
    /// The slots of `regions`, numbered as vm.rs numbers them.
    pub fn from_regions(regions: &[RamRegion]) -> Vec<SlotInfo> {
        regions
            .iter()
            .enumerate()
            .map(|(i, r)| SlotInfo {
                slot: i as u32,
                gpa: r.gpa,
                len: r.len,
                host_addr: r.host_addr,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_with_a_helpful_error() {
        assert_eq!("kvm-bitmap".parse::<DirtyMode>(), Ok(DirtyMode::KvmBitmap));
        assert_eq!("stage2-wp".parse::<DirtyMode>(), Ok(DirtyMode::Stage2Wp));
        assert!(matches!(
            "kvm-ring".parse::<DirtyMode>(),
            Ok(DirtyMode::KvmRing { .. })
        ));
        let e = "ring".parse::<DirtyMode>().unwrap_err();
        assert!(e.contains("kvm-bitmap"), "{e}");
    }

    #[test]
    fn names_parse_back_to_their_mode() {
        for m in [
            DirtyMode::KvmBitmap,
            DirtyMode::KvmRing {
                ring_bytes: DEFAULT_RING_BYTES,
            },
            DirtyMode::Stage2Wp,
        ] {
            assert_eq!(m.name().parse::<DirtyMode>(), Ok(m));
        }
    }
}
