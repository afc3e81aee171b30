//! [`DirtyTracker`]: one [`DirtyLog`] of the chosen mode merged with the VMM's own writes, and
//! [`DirtySource`], where a migration gets its tracker from.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use log::info;

use super::bitmap::KvmBitmapLog;
use super::error::DirtyError;
use super::log::{DirtyLog, HarvestStats};
use super::mode::DirtyMode;
use super::pages::{DirtyBitmap, SlotInfo, VmmDirty};
use super::ring::{KvmRingLog, RingFlavor};
use super::wp::Stage2WpLog;
use crate::memory::RamRegion;
use crate::pager::Pager;

/// The answer to `KVM_EXIT_DIRTY_RING_FULL`, called on the vCPU's own thread with its index
/// (e.g. [`DirtyTracker::ring_full_hook`]: collect that vCPU's ring, reset the rings). `Ok`: the
/// thread re-enters the guest; `Err(reason)`: the vCPU fails and the VM stops with the reason.
pub type DirtyRingFullHook = Arc<dyn Fn(usize) -> Result<(), String> + Send + Sync>;

/// Dirty-page tracking over one [`DirtyLog`], merged with the VMM's own writes.
///
/// `harvest` may run on any thread while vCPUs run; `on_ring_full` runs on a vCPU thread. Both
/// take `&self`.
pub struct DirtyTracker {
    log: Arc<dyn DirtyLog>,
    /// The same log when it is KVM's rings: their vCPU hooks.
    rings: Option<Arc<KvmRingLog>>,
    /// The same log when it is KVM's bitmap: its clear-chunk knob.
    kvm_bitmap: Option<Arc<KvmBitmapLog>>,
    slots: Vec<SlotInfo>,
    vmm: Arc<VmmDirty>,
    last: Mutex<HarvestStats>,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("mode", &self.log.mode())
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

fn dup_fd(fd: &impl AsRawFd) -> Result<File, DirtyError> {
    // SAFETY: F_DUPFD_CLOEXEC on a live fd returns a new fd or -1.
    let nfd = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if nfd < 0 {
        return Err(DirtyError::kvm("dup of the VM fd"));
    }
    // SAFETY: `nfd` is a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(nfd) })
}

impl DirtyTracker {
    /// Starts KVM dirty logging on `vm` (the VM fd, duplicated here) for the RAM `regions`
    /// (slot `i` = region `i`). For [`DirtyMode::KvmRing`] this must run before any vCPU is
    /// created; attach each vCPU afterwards with [`DirtyTracker::attach_vcpu`].
    ///
    /// [`DirtyMode::KvmRing`] only creates the rings here: KVM logs into them once the slots
    /// carry `KVM_MEM_LOG_DIRTY_PAGES`, which the first [`DirtyTracker::harvest`] sets and
    /// [`DirtyTracker::stop`] clears. A VM that creates its rings at start in case it migrates
    /// later so runs at full speed until a migration begins: with logging on, KVM maps guest
    /// RAM in 4 KiB pages, takes a write-protect fault on every page's first write after each
    /// reset, and exits to the VMM each time a ring fills.
    pub fn new_kvm(
        vm: &impl AsRawFd,
        regions: &[RamRegion],
        mode: DirtyMode,
    ) -> Result<DirtyTracker, DirtyError> {
        let vm = dup_fd(vm)?;
        let slots = SlotInfo::from_regions(regions);
        Ok(match mode {
            DirtyMode::KvmBitmap => {
                let log = Arc::new(KvmBitmapLog::start(vm, &slots)?);
                DirtyTracker {
                    kvm_bitmap: Some(log.clone()),
                    ..DirtyTracker::with_log(log, slots)
                }
            }
            DirtyMode::KvmRing { ring_bytes } => {
                let log = Arc::new(KvmRingLog::new(vm, &slots, ring_bytes)?);
                DirtyTracker {
                    rings: Some(log.clone()),
                    ..DirtyTracker::with_log(log, slots)
                }
            }
            DirtyMode::Stage2Wp => return Err(DirtyError::NoWriteTracking),
        })
    }

    /// Starts stage2's own dirty logging over `pager`'s RAM `regions` (the pager must have been
    /// started with `write_tracking`) through `Pager::start_dirty_log`: stage2 write-protects
    /// every leaf (blocks split eagerly) and the pager write-protects guest RAM on the host with
    /// its userfaultfd, so each page's next write faults into the pager and marks it dirty.
    pub fn new_stage2(
        pager: Arc<Pager>,
        regions: &[RamRegion],
    ) -> Result<DirtyTracker, DirtyError> {
        let slots = SlotInfo::from_regions(regions);
        let log = Stage2WpLog::start(pager, &slots)?;
        Ok(DirtyTracker::with_log(Arc::new(log), slots))
    }

    /// A tracker over `log`, whose harvests cover `slots` (in slot order).
    pub fn with_log(log: Arc<dyn DirtyLog>, slots: Vec<SlotInfo>) -> DirtyTracker {
        info!(
            "dirty tracking on: {}, {} slot(s)",
            log.mode().name(),
            slots.len()
        );
        DirtyTracker {
            log,
            rings: None,
            kvm_bitmap: None,
            vmm: Arc::new(VmmDirty::new(&slots)),
            last: Mutex::new(HarvestStats::default()),
            slots,
        }
    }

    /// The mode.
    pub fn mode(&self) -> DirtyMode {
        self.log.mode()
    }

    /// The tracked slots.
    pub fn slots(&self) -> &[SlotInfo] {
        &self.slots
    }

    /// The VMM's own write log: devices and loaders call `mark` for every guest-RAM write.
    pub fn vmm_writes(&self) -> &Arc<VmmDirty> {
        &self.vmm
    }

    /// Timing of the last harvest.
    pub fn last_stats(&self) -> HarvestStats {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps the dirty ring of vCPU `index` (ring mode; a no-op otherwise). Call once per vCPU,
    /// in index order, right after creating it.
    pub fn attach_vcpu(&self, index: usize, vcpu_fd: &impl AsRawFd) -> Result<(), DirtyError> {
        match &self.rings {
            Some(r) => r.attach_vcpu(index, vcpu_fd),
            None => Ok(()),
        }
    }

    /// The ring flavour in use (ring mode).
    pub fn ring_flavor(&self) -> Option<RingFlavor> {
        self.rings.as_ref().map(|r| r.flavor())
    }

    /// The vCPU thread's answer to `KVM_EXIT_DIRTY_RING_FULL` (exit reason 31, kvm-ioctls'
    /// `VcpuExit::Unsupported(31)`): [`KvmRingLog::on_ring_full`] in ring mode, nothing (0
    /// entries) otherwise; the thread then re-enters the guest.
    pub fn on_ring_full(&self, vcpu: usize) -> Result<u32, DirtyError> {
        match &self.rings {
            Some(r) => r.on_ring_full(vcpu),
            None => Ok(0),
        }
    }

    /// Pages per `KVM_CLEAR_DIRTY_LOG` call in the bitmap mode (default
    /// [`super::bitmap::CLEAR_CHUNK_PAGES`]); rounded up to a multiple of 64, KVM's alignment.
    pub fn set_clear_chunk_pages(&self, pages: u64) {
        if let Some(b) = &self.kvm_bitmap {
            b.set_clear_chunk_pages(pages);
        }
    }

    /// Ring-full exits answered so far by [`DirtyTracker::on_ring_full`].
    pub fn ring_full_exits(&self) -> u64 {
        self.rings.as_ref().map_or(0, |r| r.ring_full_exits())
    }

    /// The vCPU loop's hook for `KVM_EXIT_DIRTY_RING_FULL`: give it to
    /// `VmControl::start_with_hooks` in `VcpuHooks::dirty_ring_full`. It calls
    /// [`DirtyTracker::on_ring_full`] on the vCPU's thread; an error stops the VM.
    pub fn ring_full_hook(self: &Arc<Self>) -> DirtyRingFullHook {
        let me = self.clone();
        Arc::new(move |vcpu| me.on_ring_full(vcpu).map(|_| ()).map_err(|e| e.to_string()))
    }

    /// Get and clear: the pages dirtied since the last harvest (the first harvest of the KVM
    /// bitmap mode returns every page: initially set), ORed with the VMM's own writes. When
    /// this returns, every later write is recorded for the next harvest; copy pages after it.
    pub fn harvest(&self) -> Result<DirtyBitmap, DirtyError> {
        let mut out = DirtyBitmap::empty(&self.slots);
        let mut st = HarvestStats::default();
        self.log.harvest(&mut out, &mut st)?;
        self.vmm.take_into(&mut out);
        st.pages = out.count();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = st;
        Ok(out)
    }

    /// Call with every vCPU paused (out of `KVM_RUN`), before the last harvest: returns once
    /// no fault the vCPUs took before the pause can still record a page, so that harvest is
    /// the last word (nothing is reported after it while the vCPUs stay paused). KVM modes
    /// have nothing to wait for (KVM records a page in its bitmap or ring before the vCPU can
    /// leave `KVM_RUN`); stage2-wp waits for the pager's faults in flight.
    pub fn settle(&self) -> Result<(), DirtyError> {
        self.log.settle()
    }

    /// Stops dirty logging (KVM modes: clears `KVM_MEM_LOG_DIRTY_PAGES`, and in ring mode
    /// empties the rings, which stay for a later harvest to start logging again; stage2:
    /// disables its logging, so write-protected pages get W back on their next write).
    pub fn stop(&self) -> Result<(), DirtyError> {
        self.log.stop()
    }
}

/// Where a migration takes its dirty pages from (`--dirty-mode`), set up when the VM starts:
/// [`DirtySource::tracker`] gives the migration its [`DirtyTracker`].
#[derive(Clone)]
pub enum DirtySource {
    /// KVM's dirty bitmap, started when a migration starts.
    KvmBitmap,
    /// KVM's dirty rings: enabled before the vCPUs were created, logging since the VM
    /// started (the ring-full hook of every vCPU drains them).
    KvmRing(Arc<DirtyTracker>),
    /// stage2's write tracking: the pager was started with write tracking; logging starts
    /// with the migration.
    Stage2Wp(Arc<Pager>),
}

impl std::fmt::Debug for DirtySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.mode().name())
    }
}

impl DirtySource {
    /// The mode.
    pub fn mode(&self) -> DirtyMode {
        match self {
            DirtySource::KvmBitmap => DirtyMode::KvmBitmap,
            DirtySource::KvmRing(t) => t.mode(),
            DirtySource::Stage2Wp(_) => DirtyMode::Stage2Wp,
        }
    }

    /// The tracker of one migration of the VM `vm` over RAM `regions`: a new one that logs
    /// from now (bitmap, stage2-wp), or the VM's rings, which log from their first harvest.
    /// Either way logging stops with [`DirtyTracker::stop`] after the migration.
    pub fn tracker(
        &self,
        vm: &impl AsRawFd,
        regions: &[RamRegion],
    ) -> Result<Arc<DirtyTracker>, DirtyError> {
        Ok(match self {
            DirtySource::KvmBitmap => {
                Arc::new(DirtyTracker::new_kvm(vm, regions, DirtyMode::KvmBitmap)?)
            }
            DirtySource::KvmRing(t) => t.clone(),
            DirtySource::Stage2Wp(p) => Arc::new(DirtyTracker::new_stage2(p.clone(), regions)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::pages::tests::slots;

    /// A log that reports the pages it is told, and counts its calls.
    #[derive(Default)]
    struct Scripted {
        next: Mutex<Vec<u64>>,
        settled: Mutex<u32>,
        stopped: Mutex<u32>,
    }

    impl DirtyLog for Scripted {
        fn mode(&self) -> DirtyMode {
            DirtyMode::Stage2Wp
        }
        fn harvest(&self, out: &mut DirtyBitmap, st: &mut HarvestStats) -> Result<(), DirtyError> {
            for gpa in self.next.lock().unwrap().drain(..) {
                out.set(gpa);
                st.ops += 1;
            }
            Ok(())
        }
        fn settle(&self) -> Result<(), DirtyError> {
            *self.settled.lock().unwrap() += 1;
            Ok(())
        }
        fn stop(&self) -> Result<(), DirtyError> {
            *self.stopped.lock().unwrap() += 1;
            Ok(())
        }
    }

    #[test]
    fn a_harvest_is_the_logs_pages_ored_with_the_vmms_writes() {
        let log = Arc::new(Scripted::default());
        let t = DirtyTracker::with_log(log.clone(), slots());
        log.next
            .lock()
            .unwrap()
            .extend([0x3000, (4 << 30) + 0x1000]);
        t.vmm_writes().mark(0x3000, 8); // the same page: counted once
        t.vmm_writes().mark(0x8000, 1);
        let h = t.harvest().unwrap();
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            vec![0x3000, 0x8000, (4 << 30) + 0x1000]
        );
        let st = t.last_stats();
        assert_eq!((st.pages, st.ops), (3, 2));
        // Taken: the next harvest has nothing.
        assert_eq!(t.harvest().unwrap().count(), 0);
        assert_eq!(t.last_stats().pages, 0);
    }

    #[test]
    fn settle_and_stop_reach_the_log_and_ring_calls_are_no_ops_without_rings() {
        let log = Arc::new(Scripted::default());
        let t = DirtyTracker::with_log(log.clone(), slots());
        t.settle().unwrap();
        t.stop().unwrap();
        assert_eq!(
            (*log.settled.lock().unwrap(), *log.stopped.lock().unwrap()),
            (1, 1)
        );
        assert_eq!(t.on_ring_full(0).unwrap(), 0);
        assert_eq!(t.ring_flavor(), None);
        assert_eq!(t.ring_full_exits(), 0);
        assert_eq!(t.mode(), DirtyMode::Stage2Wp);
    }

    #[test]
    fn a_ring_source_hands_out_the_vms_own_tracker() {
        let log = Arc::new(Scripted::default());
        let t = Arc::new(DirtyTracker::with_log(log, slots()));
        let src = DirtySource::KvmRing(t.clone());
        // The VM fd is not used for rings: the tracker was made with the VM.
        let got = src.tracker(&std::io::stdin(), &[]).unwrap();
        assert!(Arc::ptr_eq(&got, &t));
        assert_eq!(src.mode(), t.mode());
        assert_eq!(format!("{:?}", DirtySource::KvmBitmap), "kvm-bitmap");
    }
}
