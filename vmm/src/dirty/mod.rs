//! Dirty-page tracking for live migration: one [`DirtyTracker`] over three sources (KVM's
//! dirty bitmap, KVM's dirty rings, stage2's own userfaultfd write tracking), merged with the
//! pages the VMM wrote itself, harvested as one per-slot [`DirtyBitmap`].
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
pub mod ring;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::memory::RamRegion;
use crate::pager::{Pager, PagingError};

/// Guest page shift: dirty tracking is at 4 KiB precision in every mode.
pub const PAGE_SHIFT: u32 = 12;
/// Guest page size.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// `kvm_dirty_gfn.slot` holds the address space in its upper 16 bits (api.rst §8.29).
const RING_SLOT_ID_MASK: u32 = 0xffff;

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

/// How long [`DirtyTracker::settle`] waits for the pager's faults in flight: they resolve within
/// a millisecond or two (one deferral poll); far longer means a stuck fault handler.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

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

    fn pages(&self) -> u64 {
        self.len >> PAGE_SHIFT
    }
}

/// Dirty pages of one slot: bit `i` of word `i / 64` is the page at `gpa + i * 4096`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotBitmap {
    /// The slot.
    pub info: SlotInfo,
    /// The bits (KVM's layout).
    pub words: Vec<u64>,
}

/// The result of a harvest: one bitmap per slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Per slot, in slot order.
    pub slots: Vec<SlotBitmap>,
}

impl DirtyBitmap {
    /// An all-clear bitmap over `slots`.
    pub fn empty(slots: &[SlotInfo]) -> DirtyBitmap {
        DirtyBitmap {
            slots: slots
                .iter()
                .map(|&info| SlotBitmap {
                    info,
                    words: vec![0; bitmap::words_for(info.len)],
                })
                .collect(),
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.words.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether the page holding `gpa` is dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.slots.iter().any(|s| {
            gpa >= s.info.gpa && gpa - s.info.gpa < s.info.len && {
                let i = (gpa - s.info.gpa) >> PAGE_SHIFT;
                s.words[(i / 64) as usize] & (1 << (i % 64)) != 0
            }
        })
    }

    /// Marks the page holding `gpa` (ignored outside RAM).
    pub fn set(&mut self, gpa: u64) {
        if let Some(s) = self
            .slots
            .iter_mut()
            .find(|s| gpa >= s.info.gpa && gpa - s.info.gpa < s.info.len)
        {
            let i = (gpa - s.info.gpa) >> PAGE_SHIFT;
            s.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Guest-physical addresses of the dirty pages, ascending per slot.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().flat_map(|s| {
            s.words.iter().enumerate().flat_map(move |(w, &bits)| {
                let base = s.info.gpa + ((w as u64 * 64) << PAGE_SHIFT);
                SetBits(bits).map(move |b| base + (u64::from(b) << PAGE_SHIFT))
            })
        })
    }

    /// ORs an LSB-first page bitmap of slot index `index` into this one (vm-memory's
    /// `AtomicBitmap::get_and_reset()` of a 4 KiB-page region, or KVM's own bitmap). Extra words
    /// beyond the slot are ignored.
    pub fn merge_words(&mut self, index: usize, words: &[u64]) {
        if let Some(s) = self.slots.get_mut(index) {
            for (d, w) in s.words.iter_mut().zip(words) {
                *d |= *w;
            }
        }
    }

    /// ORs `other` (same slots) into this one.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (i, s) in other.slots.iter().enumerate() {
            self.merge_words(i, &s.words);
        }
    }

    fn clear(&mut self) {
        for s in &mut self.slots {
            s.words.fill(0);
        }
    }
}

struct SetBits(u64);

impl Iterator for SetBits {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// The VMM's own writes to guest RAM, recorded lock-free and taken by every harvest: whoever
/// writes guest RAM from the host while a tracker is live calls [`VmmDirty::mark`] (through
/// [`DirtyTracker::vmm_writes`]) for the range it wrote.
///
/// Why not vm-memory's dirty bitmap: `GuestMemoryMmap<AtomicBitmap>` would mark every write
/// made through vm-memory's `Bytes` calls by itself, but guest RAM is a `GuestMemoryMmap<()>`
/// named in the signatures of about fifteen files of four owners (memory, vcpu, boot, arch's
/// long_mode/acpi/mptable, guest and its port/reclaim, migrate's precopy/postcopy/ram, this
/// module, dirty-bench and tests); changing its type is not a contained change, so the
/// tracker keeps its own log with the same layout ([`DirtyBitmap::merge_words`] also takes an
/// `AtomicBitmap::get_and_reset()` as is, for the day RAM switches).
///
/// Which host writes into guest RAM exist, and whether they need marking:
/// - loading (kernel, initrd, command line, boot_params, e820, ACPI, MP table, page tables;
///   the test guests' code, parameter block, pacing fields, page tables): all before the vCPUs
///   start, so before any tracker exists; migration's first pass sends every page anyway.
/// - the `--run-for` stop flag (guest.rs): written on the main thread after any migration it
///   ran has returned, so no tracker is live then; a caller that writes it during a migration
///   must mark it (the dirty_log tests do, and check it is in the next harvest).
/// - the migration receiver and postcopy's `Pager::place`: on the destination, which tracks
///   nothing.
/// - devices (serial, i8042, the test port) only read guest RAM.
/// - the emulation fallback (arch/x86_64/emulate) stores for the guest (`cmpxchg16b`,
///   `stmxcsr`) on vCPU threads while the VM runs: through [`HostChanges::change`] when the
///   VM's gate is given in `vcpu::EmulationHooks::host_changes`, unrecorded otherwise.
/// - not a write but a content change: a reclaim (`MADV_DONTNEED`, or a hole punch on shared
///   memory) turns a page into zeroes, which no source of dirty pages sees (stage2-wp only sees
///   the guest's next write). Reclaims go through [`HostChanges`], which marks the range here
///   (and the reclaim sequence word the reclaimer writes) while a migration runs.
#[derive(Debug)]
pub struct VmmDirty {
    slots: Vec<SlotInfo>,
    words: Vec<Vec<AtomicU64>>,
}

impl VmmDirty {
    /// An all-clear log over `slots`.
    pub fn new(slots: &[SlotInfo]) -> VmmDirty {
        VmmDirty {
            slots: slots.to_vec(),
            words: slots
                .iter()
                .map(|s| {
                    (0..bitmap::words_for(s.len))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        }
    }

    /// Records that the VMM wrote `[gpa, gpa+len)` (the parts outside RAM are ignored).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = gpa.saturating_add(len);
        for (s, words) in self.slots.iter().zip(&self.words) {
            let lo = gpa.max(s.gpa);
            let hi = end.min(s.gpa + s.len);
            if lo >= hi {
                continue;
            }
            let first = (lo - s.gpa) >> PAGE_SHIFT;
            let last = (hi - 1 - s.gpa) >> PAGE_SHIFT;
            for p in first..=last {
                words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
            }
        }
    }

    /// Moves the recorded pages into `out` (each word is swapped with 0: a concurrent mark lands
    /// either in this take or in the next).
    pub fn take_into(&self, out: &mut DirtyBitmap) {
        for (i, words) in self.words.iter().enumerate() {
            let Some(s) = out.slots.get_mut(i) else {
                continue;
            };
            for (d, w) in s.words.iter_mut().zip(words) {
                if w.load(Ordering::Relaxed) != 0 {
                    *d |= w.swap(0, Ordering::AcqRel);
                }
            }
        }
    }
}

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

enum Backend {
    Bitmap,
    Ring {
        bytes: u32,
        flavor: ring::RingFlavor,
        rings: Mutex<Vec<Arc<Mutex<ring::Ring>>>>,
        /// Entries collected on ring-full exits, waiting for the next harvest.
        pending: Mutex<DirtyBitmap>,
        /// `KVM_MEM_LOG_DIRTY_PAGES` is on: set by the first harvest, cleared by `stop`. The
        /// rings themselves exist from the VM's start (KVM takes them only before vCPUs), but
        /// KVM logs into them only while the slots carry the flag.
        logging: Mutex<bool>,
    },
    Stage2 {
        pager: Arc<Pager>,
    },
}

/// Dirty-page tracking over one of three sources, merged with the VMM's own writes.
///
/// `harvest` may run on any thread while vCPUs run; `on_ring_full` runs on a vCPU thread. Both
/// take `&self`.
pub struct DirtyTracker {
    mode: DirtyMode,
    vm: Option<File>,
    slots: Vec<SlotInfo>,
    backend: Backend,
    vmm: Arc<VmmDirty>,
    /// Scratch bitmap of the KVM bitmap mode (one harvest at a time).
    scratch: Mutex<DirtyBitmap>,
    last: Mutex<HarvestStats>,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits answered by [`DirtyTracker::on_ring_full`].
    ring_full: AtomicU64,
    /// Pages per `KVM_CLEAR_DIRTY_LOG` (bitmap mode).
    clear_chunk: AtomicU64,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("mode", &self.mode)
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
        let backend = match mode {
            DirtyMode::KvmBitmap => {
                bitmap::enable(&vm, &slots)?;
                Backend::Bitmap
            }
            DirtyMode::KvmRing { ring_bytes } => {
                // Only the rings now; logging (the slots' flag) starts with the first harvest.
                let flavor = ring::enable(&vm, ring_bytes)?;
                Backend::Ring {
                    bytes: ring_bytes,
                    flavor,
                    rings: Mutex::new(Vec::new()),
                    pending: Mutex::new(DirtyBitmap::empty(&slots)),
                    logging: Mutex::new(false),
                }
            }
            DirtyMode::Stage2Wp => return Err(DirtyError::NoWriteTracking),
        };
        info!("dirty tracking on: {mode:?}, {} slot(s)", slots.len());
        Ok(DirtyTracker {
            mode,
            vm: Some(vm),
            scratch: Mutex::new(DirtyBitmap::empty(&slots)),
            vmm: Arc::new(VmmDirty::new(&slots)),
            last: Mutex::new(HarvestStats::default()),
            ring_full: AtomicU64::new(0),
            clear_chunk: AtomicU64::new(bitmap::CLEAR_CHUNK_PAGES),
            slots,
            backend,
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
        pager.start_dirty_log().map_err(|e| match e {
            PagingError::Config(_) => DirtyError::NoWriteTracking,
            e => e.into(),
        })?;
        info!("dirty tracking on: stage2-wp, {} slot(s)", slots.len());
        Ok(DirtyTracker {
            mode: DirtyMode::Stage2Wp,
            vm: None,
            scratch: Mutex::new(DirtyBitmap::empty(&slots)),
            vmm: Arc::new(VmmDirty::new(&slots)),
            last: Mutex::new(HarvestStats::default()),
            ring_full: AtomicU64::new(0),
            clear_chunk: AtomicU64::new(bitmap::CLEAR_CHUNK_PAGES),
            slots,
            backend: Backend::Stage2 { pager },
        })
    }

    /// The mode.
    pub fn mode(&self) -> DirtyMode {
        self.mode
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
        if let Backend::Ring { bytes, rings, .. } = &self.backend {
            let r = ring::Ring::map(vcpu_fd, *bytes)?;
            let mut rings = rings.lock().unwrap_or_else(|p| p.into_inner());
            if index != rings.len() {
                return Err(DirtyError::NoVcpuRing(rings.len()));
            }
            rings.push(Arc::new(Mutex::new(r)));
        }
        Ok(())
    }

    /// The ring flavour in use (ring mode).
    pub fn ring_flavor(&self) -> Option<ring::RingFlavor> {
        match &self.backend {
            Backend::Ring { flavor, .. } => Some(*flavor),
            _ => None,
        }
    }

    /// The vCPU thread's answer to `KVM_EXIT_DIRTY_RING_FULL` (exit reason 31, kvm-ioctls'
    /// `VcpuExit::Unsupported(31)`): moves that vCPU's ring into the pending set, resets the
    /// rings, and returns; the thread then re-enters the guest. No entry is dropped: the pages
    /// wait in the pending set for the next harvest.
    pub fn on_ring_full(&self, vcpu: usize) -> Result<u32, DirtyError> {
        let Backend::Ring { rings, pending, .. } = &self.backend else {
            return Ok(0);
        };
        let ring = rings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vcpu)
            .cloned()
            .ok_or(DirtyError::NoVcpuRing(vcpu))?;
        let n = {
            let mut pend = pending.lock().unwrap_or_else(|p| p.into_inner());
            let mut r = ring.lock().unwrap_or_else(|p| p.into_inner());
            self.collect_ring(&mut r, &mut pend)?
        };
        ring::reset_all(self.vm.as_ref().expect("KVM mode has a VM fd"))?;
        self.ring_full.fetch_add(1, Ordering::Relaxed);
        debug!("vCPU {vcpu}: dirty ring full, {n} entries moved to the pending set");
        Ok(n)
    }

    /// Pages per `KVM_CLEAR_DIRTY_LOG` call in the bitmap mode (default
    /// [`bitmap::CLEAR_CHUNK_PAGES`]); rounded up to a multiple of 64, KVM's alignment.
    pub fn set_clear_chunk_pages(&self, pages: u64) {
        let p = pages.max(1).next_multiple_of(bitmap::CLEAR_ALIGN_PAGES);
        self.clear_chunk.store(p, Ordering::Relaxed);
    }

    /// Ring-full exits answered so far by [`DirtyTracker::on_ring_full`].
    pub fn ring_full_exits(&self) -> u64 {
        self.ring_full.load(Ordering::Relaxed)
    }

    /// The vCPU loop's hook for `KVM_EXIT_DIRTY_RING_FULL`: give it to
    /// `VmControl::start_with_hooks` in `VcpuHooks::dirty_ring_full`. It calls
    /// [`DirtyTracker::on_ring_full`] on the vCPU's thread; an error stops the VM.
    pub fn ring_full_hook(self: &Arc<Self>) -> crate::vcpu::DirtyRingFullHook {
        let me = self.clone();
        Arc::new(move |vcpu| me.on_ring_full(vcpu).map(|_| ()).map_err(|e| e.to_string()))
    }

    fn collect_ring(&self, r: &mut ring::Ring, out: &mut DirtyBitmap) -> Result<u32, DirtyError> {
        let mut bad = None;
        let n = r.collect(|slot, offset| {
            let id = (slot & RING_SLOT_ID_MASK) as usize;
            match out.slots.get_mut(id) {
                Some(s) if offset < s.info.pages() => {
                    s.words[(offset / 64) as usize] |= 1 << (offset % 64)
                }
                _ => bad = Some(slot),
            }
        });
        match bad {
            Some(slot) => Err(DirtyError::UnknownSlot(slot)),
            None => Ok(n),
        }
    }

    /// Get and clear: the pages dirtied since the last harvest (the first harvest of the KVM
    /// bitmap mode returns every page: initially set), ORed with the VMM's own writes. When
    /// this returns, every later write is recorded for the next harvest; copy pages after it.
    pub fn harvest(&self) -> Result<DirtyBitmap, DirtyError> {
        let mut out = DirtyBitmap::empty(&self.slots);
        let mut st = HarvestStats::default();
        match &self.backend {
            Backend::Bitmap => {
                let vm = self.vm.as_ref().expect("KVM mode has a VM fd");
                let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
                for (i, s) in self.slots.iter().enumerate() {
                    let words = &mut scratch.slots[i].words;
                    let t0 = Instant::now();
                    bitmap::get(vm, s.slot, words)?;
                    let t1 = Instant::now();
                    let chunk = self.clear_chunk.load(Ordering::Relaxed);
                    st.ops += u64::from(bitmap::clear(vm, s.slot, s.pages(), words, chunk)?);
                    st.get_ns += (t1 - t0).as_nanos() as u64;
                    st.clear_ns += t1.elapsed().as_nanos() as u64;
                    out.merge_words(i, words);
                }
            }
            Backend::Ring {
                rings,
                pending,
                logging,
                ..
            } => {
                let vm = self.vm.as_ref().expect("KVM mode has a VM fd");
                {
                    // The first harvest starts logging: every write after this is in a ring.
                    let mut on = logging.lock().unwrap_or_else(|p| p.into_inner());
                    if !*on {
                        bitmap::set_log_flag(vm, &self.slots, true)?;
                        *on = true;
                        info!("dirty rings: logging started");
                    }
                }
                let t0 = Instant::now();
                let rings: Vec<_> = rings.lock().unwrap_or_else(|p| p.into_inner()).clone();
                {
                    let mut pend = pending.lock().unwrap_or_else(|p| p.into_inner());
                    for r in &rings {
                        let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
                        st.ops += u64::from(self.collect_ring(&mut r, &mut pend)?);
                    }
                    let t1 = Instant::now();
                    st.get_ns = (t1 - t0).as_nanos() as u64;
                    // Reset before handing the pages out: the caller copies after this returns.
                    ring::reset_all(vm)?;
                    st.clear_ns = t1.elapsed().as_nanos() as u64;
                    out.merge(&pend);
                    pend.clear();
                }
            }
            Backend::Stage2 { pager } => {
                for (i, s) in self.slots.iter().enumerate() {
                    let t0 = Instant::now();
                    // Get and clear under the pager's dirty lock, serialised against its WP
                    // faults; the reported pages are write-protected again on return.
                    let words = pager.harvest_dirty(s.gpa, s.len)?;
                    st.get_ns += t0.elapsed().as_nanos() as u64;
                    st.ops += 1;
                    out.merge_words(i, &words);
                }
            }
        }
        self.vmm.take_into(&mut out);
        st.pages = out.count();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = st;
        Ok(out)
    }

    /// Call with every vCPU paused (out of `KVM_RUN`), before the last harvest: returns once
    /// no fault the vCPUs took before the pause can still record a page, so that harvest is
    /// the last word (nothing is reported after it while the vCPUs stay paused).
    ///
    /// stage2-wp: [`Pager::settle`]: a write fault a vCPU took just before the pause may still
    /// be in a fault handler (the vCPU left `KVM_RUN` without waiting for it), which would set
    /// its dirty bit after the last harvest; this waits until no fault is in flight, at most
    /// [`SETTLE_TIMEOUT`]. KVM modes: nothing to wait for (KVM records a page in its bitmap or
    /// ring before the vCPU can leave `KVM_RUN`), a no-op.
    pub fn settle(&self) -> Result<(), DirtyError> {
        match &self.backend {
            Backend::Bitmap | Backend::Ring { .. } => Ok(()),
            Backend::Stage2 { pager } => Ok(pager.settle(SETTLE_TIMEOUT)?),
        }
    }

    /// Stops dirty logging (KVM modes: clears `KVM_MEM_LOG_DIRTY_PAGES`, and in ring mode
    /// empties the rings, which stay for a later harvest to start logging again; stage2:
    /// disables its logging, so write-protected pages get W back on their next write).
    pub fn stop(&self) -> Result<(), DirtyError> {
        let vm = || self.vm.as_ref().expect("KVM mode has a VM fd");
        match &self.backend {
            Backend::Bitmap => bitmap::set_log_flag(vm(), &self.slots, false),
            Backend::Ring {
                rings,
                pending,
                logging,
                ..
            } => {
                // Logging off, then the rings emptied and the pending set dropped: the next
                // harvest starts afresh (the rings stay: KVM cannot make them again).
                let mut on = logging.lock().unwrap_or_else(|p| p.into_inner());
                bitmap::set_log_flag(vm(), &self.slots, false)?;
                *on = false;
                let rings: Vec<_> = rings.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let mut pend = pending.lock().unwrap_or_else(|p| p.into_inner());
                for r in &rings {
                    let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
                    self.collect_ring(&mut r, &mut pend)?;
                }
                ring::reset_all(vm())?;
                pend.clear();
                info!("dirty rings: logging stopped (the rings stay for a later harvest)");
                Ok(())
            }
            Backend::Stage2 { pager } => Ok(pager.stop_dirty_log()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<SlotInfo> {
        vec![
            SlotInfo {
                slot: 0,
                gpa: 0,
                len: 1 << 20,
                host_addr: 0,
            },
            SlotInfo {
                slot: 1,
                gpa: 4 << 30,
                len: 1 << 20,
                host_addr: 0,
            },
        ]
    }

    #[test]
    fn vmm_writes_are_merged_and_taken_once() {
        let s = slots();
        let vmm = VmmDirty::new(&s);
        vmm.mark(0x1ff8, 16); // straddles pages 1 and 2
        vmm.mark((4 << 30) + 0x5000, 1);
        vmm.mark(2 << 30, 4096); // not RAM
        let mut out = DirtyBitmap::empty(&s);
        vmm.take_into(&mut out);
        let got: Vec<u64> = out.iter().collect();
        assert_eq!(got, vec![0x1000, 0x2000, (4 << 30) + 0x5000]);
        let mut again = DirtyBitmap::empty(&s);
        vmm.take_into(&mut again);
        assert_eq!(again.count(), 0, "a take moves the bits out");
    }

    #[test]
    fn merge_words_ors_and_ignores_excess() {
        let s = slots();
        let mut b = DirtyBitmap::empty(&s);
        b.set(0x3000);
        let extra = vec![0b101u64; 10];
        b.merge_words(0, &extra);
        assert!(b.is_dirty(0) && b.is_dirty(0x2000) && b.is_dirty(0x3000));
        assert!(!b.is_dirty(0x1000));
        // 1 MiB slot = 256 pages = 4 words: the 6 extra words are ignored.
        assert_eq!(b.count(), 4 * 2 + 1);
        b.merge_words(7, &extra);
        assert_eq!(b.count(), 9);
    }

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
}
