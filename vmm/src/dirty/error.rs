//! The errors of dirty tracking, each saying what was wrong and what to do.

use crate::pager::PagingError;

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
    pub(super) fn kvm(what: &'static str) -> DirtyError {
        DirtyError::Kvm {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}
