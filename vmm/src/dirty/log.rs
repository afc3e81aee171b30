//! What a source of dirty pages does, whatever the mode: [`DirtyLog`] (harvest, settle, stop),
//! implemented once per [`DirtyMode`], and the [`HarvestStats`] a harvest fills in.

use super::error::DirtyError;
use super::mode::DirtyMode;
use super::pages::DirtyBitmap;

/// Timing of the last harvest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Reading the source (KVM_GET_DIRTY_LOG / ring collection), ns. stage2-wp: the whole
    /// get-and-clear (`Pager::harvest_dirty` does both under one lock).
    pub get_ns: u64,
    /// Clearing and re-protecting (KVM_CLEAR_DIRTY_LOG / KVM_RESET_DIRTY_RINGS), ns; 0 in
    /// stage2-wp (counted in `get_ns`).
    pub clear_ns: u64,
    /// Dirty pages returned (after the merge).
    pub pages: u64,
    /// Clear ioctls (bitmap chunks), ring entries collected, or `harvest_dirty` calls.
    pub ops: u64,
}

/// One source of dirty pages, logging from its creation (or, for KVM's rings, from its first
/// harvest) until [`stop`](Self::stop). A [`super::DirtyTracker`] drives one and ORs the VMM's
/// own writes into every harvest.
///
/// The contract (DESIGN.md rule 7): every page written after harvest N returned is in
/// harvest N+1 or later, and a write that raced with harvest N is in memory before it
/// returns, so a copy made after the harvest holds it.
pub trait DirtyLog: Send + Sync {
    /// The mode this source implements.
    fn mode(&self) -> DirtyMode;

    /// Get and clear: ORs the pages dirtied since the last harvest into `out` (one bitmap per
    /// tracked slot, in slot order) and accounts the work in `st` (all but `pages`). When this
    /// returns, every later write is recorded for the next harvest.
    fn harvest(&self, out: &mut DirtyBitmap, st: &mut HarvestStats) -> Result<(), DirtyError>;

    /// Called with every vCPU paused, before the last harvest: returns once nothing the
    /// vCPUs did before the pause can still record a page. A source that records a page
    /// before its vCPU can leave `KVM_RUN` has nothing to wait for.
    fn settle(&self) -> Result<(), DirtyError> {
        Ok(())
    }

    /// Stops logging; what remains set up for a later harvest is the source's business.
    fn stop(&self) -> Result<(), DirtyError>;
}
