//! `stage2-wp`: stage2's own write tracking through userfaultfd write-protect, as a
//! [`DirtyLog`] over the pager's dirty log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::DirtyError;
use super::log::{DirtyLog, HarvestStats};
use super::mode::DirtyMode;
use super::pages::{DirtyBitmap, SlotInfo};
use crate::pager::{Pager, PagingError};

/// How long [`DirtyLog::settle`] waits for the pager's faults in flight: they resolve within
/// a millisecond or two (one deferral poll); far longer means a stuck fault handler.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// `stage2-wp`: the pager (started with write tracking) write-protects every page, in stage2
/// and on the host, and records each page's next write; logging from creation until
/// [`DirtyLog::stop`].
pub struct Stage2WpLog {
    pager: Arc<Pager>,
    slots: Vec<SlotInfo>,
}

impl Stage2WpLog {
    /// Starts the pager's dirty log (`Pager::start_dirty_log`): stage2 write-protects every
    /// leaf (blocks split eagerly) and the pager write-protects guest RAM on the host with its
    /// userfaultfd.
    pub(super) fn start(pager: Arc<Pager>, slots: &[SlotInfo]) -> Result<Self, DirtyError> {
        pager.start_dirty_log().map_err(|e| match e {
            PagingError::Config(_) => DirtyError::NoWriteTracking,
            e => e.into(),
        })?;
        Ok(Stage2WpLog {
            pager,
            slots: slots.to_vec(),
        })
    }
}

impl DirtyLog for Stage2WpLog {
    fn mode(&self) -> DirtyMode {
        DirtyMode::Stage2Wp
    }

    /// Get and clear under the pager's dirty lock, serialised against its WP faults; the
    /// reported pages are write-protected again on return. `get_ns` is the whole of it,
    /// `clear_ns` stays 0, `ops` counts the pager's harvests.
    fn harvest(&self, out: &mut DirtyBitmap, st: &mut HarvestStats) -> Result<(), DirtyError> {
        for (i, s) in self.slots.iter().enumerate() {
            let t0 = Instant::now();
            let pages = self.pager.harvest_dirty(s.gpa, s.len)?;
            st.get_ns += t0.elapsed().as_nanos() as u64;
            st.ops += 1;
            if let Some(slot) = out.slot_mut(i) {
                slot.merge(&pages);
            }
        }
        Ok(())
    }

    /// [`Pager::settle`]: a write fault a vCPU took just before the pause may still be in a
    /// fault handler (the vCPU left `KVM_RUN` without waiting for it), which would set its
    /// dirty bit after the last harvest; this waits until no fault is in flight, at most
    /// [`SETTLE_TIMEOUT`].
    fn settle(&self) -> Result<(), DirtyError> {
        Ok(self.pager.settle(SETTLE_TIMEOUT)?)
    }

    /// Stage2 stops recording; write-protected pages get W back on their next write.
    fn stop(&self) -> Result<(), DirtyError> {
        Ok(self.pager.stop_dirty_log()?)
    }
}
