//! The raised scheduling priority of a thread that sends or receives a migration.

/// Scheduling weight of the threads that send and receive a migration, raised while they
/// run: with more vCPUs than host cores (or vCPUs that spin) the guest would otherwise take
/// most of the CPU from them and no round would catch up (on one host, the source's vCPUs
/// compete with the destination's receiver too). A nice value (getpriority(2)), lower = more.
const MIGRATION_NICE: libc::c_int = -10;

/// A migration thread's raised priority; the old one is put back on drop. Without the right
/// to raise it (not root, no CAP_SYS_NICE) the migration runs at the normal priority.
pub(crate) struct MigrationPriority {
    tid: libc::id_t,
    old: libc::c_int,
}

impl MigrationPriority {
    pub(crate) fn raise() -> Option<MigrationPriority> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        // SAFETY: getpriority/setpriority on this thread's own id; errno is checked.
        unsafe {
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, tid);
            if old == -1 && *libc::__errno_location() != 0 {
                return None;
            }
            if libc::setpriority(libc::PRIO_PROCESS, tid, MIGRATION_NICE) != 0 {
                log::debug!(
                    "migration thread stays at nice {old}: {}",
                    std::io::Error::last_os_error()
                );
                return None;
            }
            Some(MigrationPriority { tid, old })
        }
    }
}

impl Drop for MigrationPriority {
    fn drop(&mut self) {
        // SAFETY: as in `raise`, on the same thread id.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, self.old) };
    }
}
