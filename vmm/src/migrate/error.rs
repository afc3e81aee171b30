//! The errors of a migration, at either end: what failed, and whether the guest survives it.

use super::auth::AuthError;
use super::ram::RamError;
use super::state::StateError;
use super::stream::StreamError;
use super::transport::AddressError;
use crate::dirty::DirtyError;
use crate::vcpu::VcpuError;

/// Errors of a migration; each says what failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Connecting or listening failed.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The stream failed (I/O, checksum, truncation, layout mismatch).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The peer did not prove the migration secret, or the exchange failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Moving RAM failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// Saving or restoring KVM state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// vCPU control failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The stream is complete but lacks something the VM needs.
    #[error("migration stream ended without {0}: the source sent an incomplete VM")]
    Missing(String),
    /// One of a migration's further connections (`--migrate-connections`) failed.
    #[error("migration lane {index} (connection {index} after the main one): {source}")]
    Lane {
        /// The lane (1 to connections - 1).
        index: u32,
        /// What failed on it.
        source: Box<MigrateError>,
    },
    /// `--migrate-verify`: the RAM received differs from the source's digest.
    #[error("{differ} of {verified} pages received differ from the source's digest (the first at {first:#x}): the migration lost or damaged guest memory")]
    Verify {
        /// Pages compared.
        verified: u64,
        /// Pages that differ.
        differ: u64,
        /// The first of them.
        first: u64,
    },
    /// The two ends cannot do what was asked.
    #[error("{0}")]
    Refused(String),
    /// The migration failed after the postcopy switch: the destination has (or may have)
    /// started the guest, so the source must not resume it; no copy of the guest is whole.
    #[error("the migration failed during postcopy ({0}): the guest's state moved to the destination but part of its memory did not; the guest is lost, this VM stays paused and exits")]
    PostcopyLost(String),
}
