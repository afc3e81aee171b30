//! The gate through which the host changes guest RAM outside the vCPUs (reclaims), so that a
//! running migration records every change or refuses it.

use std::sync::{Arc, Mutex};

use super::pages::VmmDirty;

/// Why a host-side change of guest RAM is refused: a migration is taking (or took) the
/// memory as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostChangeRefused {
    /// The last round is being taken with the vCPUs paused.
    #[error("a migration is sending its last round (the VM is paused): retry once it is over (the VM then runs here again if it failed)")]
    LastRound,
    /// The VM was paused when its migration started: every round is sent straight from guest
    /// RAM, which must not change until the migration ends.
    #[error("a migration of this paused VM is running and sends guest RAM as it is: retry once it is over")]
    PausedMigration,
    /// The migration completed: the guest runs on the destination.
    #[error("the guest migrated to the destination, this VM no longer runs: send the request to the destination's control socket")]
    Migrated,
}

#[derive(Debug)]
enum HostChangeState {
    /// No migration: nothing to record.
    Idle,
    /// A migration's rounds are running: changes go to its tracker's VMM log.
    Tracking(Arc<VmmDirty>),
    /// Changes are refused.
    Refused(HostChangeRefused),
}

/// The gate through which the host changes guest RAM outside the vCPUs while the VM runs
/// (reclaims: a dropped range reads zero afterwards, a content change that neither KVM's dirty
/// bitmap nor its rings see), shared by the changers and the migration.
///
/// [`HostChanges::change`] runs the change and, if a migration is tracking, marks the changed
/// ranges in that tracker's [`VmmDirty`] after the change, all under one lock. The migration
/// calls [`HostChanges::track`] before its first harvest and [`HostChanges::seal`] before its
/// last one (vCPUs paused); both take the same lock, so every change is either wholly before
/// `track` (the full pass, which reads after the first harvest, sees its result), or wholly
/// marked before `seal` returns (the last harvest takes the marks), or refused. No window.
#[derive(Debug)]
pub struct HostChanges {
    state: Mutex<HostChangeState>,
}

impl Default for HostChanges {
    fn default() -> Self {
        HostChanges {
            state: Mutex::new(HostChangeState::Idle),
        }
    }
}

impl HostChanges {
    /// A gate with no migration running.
    pub fn new() -> HostChanges {
        HostChanges::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HostChangeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `change`, which alters guest RAM in `ranges` (gpa, len), and marks them in the
    /// tracking migration's log after it (also when `change` fails: it may have done part).
    /// Changes are serialised. Refused while a migration takes its last round or after it
    /// moved the guest away.
    pub fn change<T>(
        &self,
        ranges: &[(u64, u64)],
        change: impl FnOnce() -> T,
    ) -> Result<T, HostChangeRefused> {
        let st = self.lock();
        if let HostChangeState::Refused(why) = &*st {
            return Err(*why);
        }
        let out = change();
        if let HostChangeState::Tracking(log) = &*st {
            for &(gpa, len) in ranges {
                log.mark(gpa, len);
            }
        }
        Ok(out)
    }

    /// Records that a device wrote guest RAM in `ranges` (already written: a device cannot
    /// wait or be refused). A migration pauses the devices before it refuses changes, so a
    /// write here while refused is a bug in that order, logged.
    pub fn record(&self, ranges: &[(u64, u64)]) {
        match &*self.lock() {
            HostChangeState::Idle => {}
            HostChangeState::Tracking(log) => {
                for &(gpa, len) in ranges {
                    log.mark(gpa, len);
                }
            }
            HostChangeState::Refused(why) => {
                log::warn!(
                    "a device wrote guest RAM while changes are refused ({why}): {ranges:x?}"
                )
            }
        }
    }

    /// A migration starts: record changes in `log` (call before the first harvest).
    pub fn track(&self, log: Arc<VmmDirty>) {
        *self.lock() = HostChangeState::Tracking(log);
    }

    /// The migration's last round: refuse changes from now on. When this returns, every
    /// change made before is marked (call after pausing the vCPUs, before the last harvest).
    pub fn seal(&self) {
        self.refuse(HostChangeRefused::LastRound);
    }

    /// Refuse changes from now on, saying `why`. When this returns, every change made before
    /// is marked.
    pub fn refuse(&self, why: HostChangeRefused) {
        *self.lock() = HostChangeState::Refused(why);
    }

    /// Whether a migration moved the guest away (or lost it in postcopy): this VM must not
    /// run again.
    pub fn migrated(&self) -> bool {
        matches!(
            &*self.lock(),
            HostChangeState::Refused(HostChangeRefused::Migrated)
        )
    }

    /// The migration ended: `migrated` (the guest runs elsewhere, or is lost) keeps refusing
    /// changes; otherwise the VM runs here again and changes are allowed, unrecorded.
    pub fn finish(&self, migrated: bool) {
        *self.lock() = if migrated {
            HostChangeState::Refused(HostChangeRefused::Migrated)
        } else {
            HostChangeState::Idle
        };
    }
}
