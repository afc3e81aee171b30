//! Live migration of a running VM, both ends: the source's rounds over a dirty tracker (full
//! pass, dirty rounds until the estimated downtime fits or the postcopy switch, pause, then the
//! last round or [`super::postcopy`], state, end, wait for the destination) and the
//! destination's receive-and-restore.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};
use log::info;
use vm_memory::GuestMemoryMmap;

use super::postcopy::{self, DestInfo, PageSet};
use super::ram::{RamError, RamPager, RamReceiver, RamSender, ResidencyCursor};
use super::state::{
    complete_pending_io, restore_vcpu, restore_vm, save_vcpu, save_vm, SerialRegs, StateError,
    VcpuCaps, VcpuState, VmState,
};
use super::stream::{
    discard_runs, Chunk, Layout, Received, StreamError, StreamReader, StreamWriter,
    DEST_DEMAND_PAGING, PAGE_SIZE,
};
use super::summary::{
    dirty_mode_name, ms, MigrationMode, MigrationSummary, PostcopyFigures, RoundFigures,
};
use super::transport::{Address, AddressError, Connection};
use super::{DEVICE_I8042, DEVICE_KVM_VM, DEVICE_SERIAL};
use crate::devices::i8042::{I8042State, I8042};
use crate::devices::serial::SerialDevice;
use crate::dirty::{
    DirtyBitmap, DirtyError, DirtyMode, DirtyTracker, HostChangeRefused, HostChanges,
};
use crate::memory::RamRegion;
use crate::pager::Pager;
use crate::vcpu::{VcpuError, VmControl};

/// Default downtime goal (`--downtime-ms`).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default round limit (`--max-rounds`).
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Pages coalesced into one `send_range` call at most (the sender's buffer splits further).
const MAX_RUN_PAGES: u64 = 1024;
/// Bytes of guest RAM per `send_range` call of the full pass.
const FULL_PASS_STEP: u64 = 64 << 20;
const MB: f64 = 1_000_000.0;

/// Errors of a migration; each says what failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Connecting or listening failed.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The stream failed (I/O, checksum, truncation, layout mismatch).
    #[error(transparent)]
    Stream(#[from] StreamError),
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
    /// The two ends cannot do what was asked.
    #[error("{0}")]
    Refused(String),
    /// The migration failed after the postcopy switch: the destination has (or may have)
    /// started the guest, so the source must not resume it; no copy of the guest is whole.
    #[error("the migration failed during postcopy ({0}): the guest's state moved to the destination but part of its memory did not; the guest is lost, this VM stays paused and exits")]
    PostcopyLost(String),
}

/// Knobs of the source.
#[derive(Clone, Copy, Debug)]
pub struct MigrateConfig {
    /// Stop iterating when the estimated downtime is at most this.
    pub downtime: Duration,
    /// Stop iterating after this many rounds (the full pass counts as round 0).
    pub max_rounds: u32,
    /// Switch to postcopy after this many rounds (at least 1: the full pass) instead of
    /// iterating until the downtime fits.
    pub postcopy_after: Option<u32>,
}

/// Where the source's dirty pages come from (`--dirty-mode`), set up when the VM starts.
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
        f.write_str(dirty_mode_name(self.mode()))
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
}

/// What the source needs from the running VM.
pub struct Source<'a> {
    /// The VM fd (dirty log, VM state).
    pub vm: &'a VmFd,
    /// Guest RAM regions (slot i = region i).
    pub regions: &'a [RamRegion],
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The running vCPUs.
    pub control: &'a Mutex<VmControl>,
    /// What to save per vCPU.
    pub caps: Arc<VcpuCaps>,
    /// The dirty-page source.
    pub dirty: &'a DirtySource,
    /// The demand pager, when on: pages it never populated are sent as zeroes unread.
    pub pager: Option<&'a dyn RamPager>,
    /// COM1, when the VM has one.
    pub serial: Option<&'a SerialDevice>,
    /// The i8042 controller, when the VM has one (a booted kernel).
    pub i8042: Option<&'a I8042>,
    /// The machine spec the stream's header carries (JSON, `crate::machine::spec`): what the
    /// destination builds before it receives. Empty: the destination is told by its flags.
    pub spec: &'a [u8],
    /// The gate of the host's own changes of guest RAM (reclaims), when the VM has any: the
    /// migration records them from its first harvest and refuses them from its last.
    pub host_changes: Option<&'a HostChanges>,
}

fn layout_of(vcpus: usize, regions: &[RamRegion]) -> Layout {
    Layout::new(vcpus as u32, regions.iter().map(|r| (r.gpa, r.len)))
}

/// Sends every page of `bm`, coalescing consecutive pages.
fn send_dirty<W: Write>(
    w: &mut StreamWriter<W>,
    sender: &mut RamSender,
    mem: &GuestMemoryMmap,
    bm: &DirtyBitmap,
    pager: Option<&dyn RamPager>,
) -> Result<(), MigrateError> {
    let page = PAGE_SIZE as u64;
    let mut run: Option<(u64, u64)> = None;
    for gpa in bm.iter() {
        run = match run {
            Some((start, n)) if start + n * page == gpa && n < MAX_RUN_PAGES => {
                Some((start, n + 1))
            }
            Some((start, n)) => {
                sender.send_range(w, mem, start, n * page, pager)?;
                Some((gpa, 1))
            }
            None => Some((gpa, 1)),
        };
    }
    if let Some((start, n)) = run {
        sender.send_range(w, mem, start, n * page, pager)?;
    }
    Ok(())
}

/// Runs a migration to `to`. On any error before the destination's guest runs, the VM is
/// resumed if this migration paused it and keeps running here; the caller reports the error.
/// A VM paused before stays paused through the migration (pause and resume requests wait for
/// it, reclaims are refused) and after a failure. After the destination's guest runs
/// (postcopy) the error is [`MigrateError::PostcopyLost`] and the VM stays paused.
pub fn send(
    src: &Source<'_>,
    to: &Address,
    cfg: MigrateConfig,
) -> Result<MigrationSummary, MigrateError> {
    let started = Instant::now();
    if cfg.postcopy_after == Some(0) {
        return Err(MigrateError::Refused(
            "postcopy after 0 rounds: give at least 1 (round 0 is the full pass)".into(),
        ));
    }
    let conn = to.connect()?;
    let back = conn
        .try_clone()
        .map_err(|source| StreamError::Io { offset: 0, source })?;
    let vcpus = src.control.lock().unwrap_or_else(|p| p.into_inner()).len();
    let mut w = StreamWriter::new(
        conn,
        &layout_of(vcpus, src.regions).with_spec(src.spec.to_vec()),
    )?;
    let mut back = StreamReader::headless(back);
    let dest = match cfg.postcopy_after {
        Some(_) => {
            let info = postcopy::read_dest_info(&mut back)?;
            if !info.demand_paging {
                return Err(MigrateError::Refused(format!(
                    "postcopy needs demand paging on the destination, which runs with \
                     --no-demand-paging: restart the destination without it, or migrate \
                     without postcopy (drop --postcopy-after); the VM keeps running here \
                     (destination {to})"
                )));
            }
            Some(info)
        }
        None => None,
    };
    let tracker = match src.dirty {
        DirtySource::KvmBitmap => Arc::new(DirtyTracker::new_kvm(
            src.vm,
            src.regions,
            DirtyMode::KvmBitmap,
        )?),
        // Created with the VM (rings only exist if set up before the vCPUs); it logs from
        // its first harvest below until the stop after this migration.
        DirtySource::KvmRing(t) => t.clone(),
        DirtySource::Stage2Wp(p) => Arc::new(DirtyTracker::new_stage2(p.clone(), src.regions)?),
    };
    // A VM paused before its migration stays paused through it: the control lock is held,
    // so pause and resume requests wait until the migration is over. Nothing writes its RAM
    // then (reclaims are refused too), and every round is sent straight from guest RAM.
    let held = {
        let c = src.control.lock().unwrap_or_else(|p| p.into_inner());
        c.all_paused().then_some(c)
    };
    // Before the first harvest: a host change from now on is marked for a later round.
    if let Some(h) = src.host_changes {
        h.track(tracker.vmm_writes().clone());
        if held.is_some() {
            h.refuse(HostChangeRefused::PausedMigration);
        }
    }
    // Set only when this migration paused the VM: a failure resumes it then, and leaves a VM
    // that was paused before as it was.
    let mut paused = false;
    let _boost = MigrationPriority::raise();
    let res = rounds(
        src,
        cfg,
        &tracker,
        &mut w,
        &mut paused,
        held,
        back,
        dest,
        started,
    );
    if let Some(h) = src.host_changes {
        h.finish(matches!(res, Ok(_) | Err(MigrateError::PostcopyLost(_))));
    }
    // Logging stops with the migration, in every mode: KVM's rings stay mapped for a later
    // attempt (they cannot be created again once vCPUs exist), but KVM stops logging into
    // them until that attempt's first harvest.
    if let Err(e) = tracker.stop() {
        log::warn!("stopping dirty logging after migration: {e}");
    }
    let resume = match &res {
        Err(MigrateError::PostcopyLost(_)) | Ok(_) => false,
        Err(_) => paused,
    };
    if resume {
        src.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resume_all()?;
    }
    res
}

/// Scheduling weight of the threads that send and receive a migration, raised while they
/// run: with more vCPUs than host cores (or vCPUs that spin) the guest would otherwise take
/// most of the CPU from them and no round would catch up (on one host, the source's vCPUs
/// compete with the destination's receiver too). A nice value (getpriority(2)), lower = more.
const MIGRATION_NICE: libc::c_int = -10;

/// A migration thread's raised priority; the old one is put back on drop. Without the right
/// to raise it (not root, no CAP_SYS_NICE) the migration runs at the normal priority.
pub(super) struct MigrationPriority {
    tid: libc::id_t,
    old: libc::c_int,
}

impl MigrationPriority {
    pub(super) fn raise() -> Option<MigrationPriority> {
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

/// Sends all of guest RAM (pages the pager never populated as zero runs, unread).
fn full_pass<W: Write>(
    src: &Source<'_>,
    w: &mut StreamWriter<W>,
    sender: &mut RamSender,
) -> Result<u64, MigrateError> {
    let mut pages = 0;
    for r in src.regions {
        let mut off = 0;
        while off < r.len {
            let n = FULL_PASS_STEP.min(r.len - off);
            sender.send_range(w, src.mem, r.gpa + off, n, src.pager)?;
            off += n;
            pages += n / PAGE_SIZE as u64;
        }
    }
    Ok(pages)
}

#[allow(clippy::too_many_arguments)]
fn rounds<W: Write>(
    src: &Source<'_>,
    cfg: MigrateConfig,
    tracker: &DirtyTracker,
    w: &mut StreamWriter<W>,
    paused: &mut bool,
    held: Option<MutexGuard<'_, VmControl>>,
    mut back: StreamReader<Connection>,
    dest: Option<DestInfo>,
    started: Instant,
) -> Result<MigrationSummary, MigrateError> {
    let mut sender = RamSender::new();
    // Paused before the migration and held so: no vCPU writes guest RAM in any round.
    sender.guest_paused = held.is_some();
    // Forget what the tracker holds (the bitmap's initially-set bits, ring entries since the
    // VM started): the full pass below reads every page after this harvest.
    tracker.harvest()?;
    let mut pending: Option<DirtyBitmap> = None;
    let mut round = 0u32;
    let mut figures = Vec::new();
    loop {
        let t0 = Instant::now();
        let b0 = w.bytes_written();
        let pages = match &pending {
            None => full_pass(src, w, &mut sender)?,
            Some(bm) => {
                send_dirty(w, &mut sender, src.mem, bm, src.pager)?;
                bm.count()
            }
        };
        w.round(round, pages)?;
        w.flush()?;
        // A round ends when the destination has applied it, not when the socket took the
        // bytes: the rate below (and so the downtime estimate) is end to end, and no
        // backlog on the destination is left to lengthen the pause.
        back.expect_round_applied(round)?;
        let mut f = RoundFigures::new(round, pages, w.bytes_written() - b0, t0.elapsed());
        let bm = tracker.harvest()?;
        let next = bm.count();
        pending = Some(bm);
        let rate = f.rate_mb_s * MB;
        let est = Duration::from_secs_f64(next as f64 * PAGE_SIZE as f64 / rate.max(1.0));
        f.est_downtime_ms = ms(est);
        println!(
            "round {round}: {pages} dirty pages, {:.1} MB sent, {:.0} MB/s, estimated downtime {} ms ({next} pages dirty now)",
            f.bytes as f64 / MB,
            f.rate_mb_s,
            est.as_millis()
        );
        figures.push(f);
        round += 1;
        let done = match cfg.postcopy_after {
            Some(n) => round >= n,
            None => est <= cfg.downtime || round >= cfg.max_rounds,
        };
        if done {
            break;
        }
    }
    let regions: Vec<(u64, u64)> = src.regions.iter().map(|r| (r.gpa, r.len)).collect();
    // Postcopy: one more round, with no page data. The destination drops its copies of the
    // pages written since the last round, which are owed from now on. Dropping costs it per
    // host page and per run (hundreds of ms for a few hundred thousand 4 KiB pages); done here,
    // while the guest still runs on this side, it leaves only the pages written during this
    // round to drop at the switch, inside the downtime.
    let mut discarded = None;
    if let Some(d) = dest {
        let bm = pending.take().expect("a harvest follows every round");
        let t0 = Instant::now();
        let b0 = w.bytes_written();
        let set = PageSet::of_dirty(&bm, &regions, d.host_page);
        w.discard(&set.runs())?;
        w.round(round, bm.count())?;
        w.flush()?;
        back.expect_round_applied(round)?;
        let f = RoundFigures::new(round, bm.count(), w.bytes_written() - b0, t0.elapsed());
        println!(
            "round {round} (discard): {} dirty pages owed from now on; the destination dropped its copies ({} host pages) in {:.0} ms",
            bm.count(),
            set.len(),
            f.ms
        );
        figures.push(f);
        round += 1;
        discarded = Some(set);
    }
    // Stop the guest, save the vCPUs (completing any half-done I/O first, which may still
    // touch memory), then take the last harvest: everything written is in it.
    let pause_at = Instant::now();
    // Held until the migration ends, so that no resume request runs the guest while its
    // last round is sent (or, after a postcopy switch, at all).
    let control = match held {
        Some(c) => c,
        None => {
            let c = src.control.lock().unwrap_or_else(|p| p.into_inner());
            c.pause_all()?;
            *paused = true;
            c
        }
    };
    let mut blobs = Vec::with_capacity(control.len());
    for i in 0..control.len() {
        let caps = src.caps.clone();
        let st = control.with_paused_vcpu(i, move |fd: &mut VcpuFd| {
            complete_pending_io(fd)?;
            save_vcpu(fd, i as u32, &caps)
        })??;
        blobs.push(st.encode()?);
    }
    let vcpus = control.len() as u32;
    let vm_state = save_vm(src.vm)?.encode()?;
    let serial = match src.serial {
        Some(s) => Some(SerialRegs::from(&s.state()).encode()?),
        None => None,
    };
    let i8042 = match src.i8042 {
        Some(k) => Some(
            postcard::to_stdvec(&k.state()).map_err(|source| StateError::Decode {
                what: "i8042",
                source,
            })?,
        ),
        None => None,
    };
    let write_state = |w: &mut StreamWriter<W>| -> Result<(), MigrateError> {
        for (i, b) in blobs.iter().enumerate() {
            w.vcpu(i as u32, b)?;
        }
        w.device(DEVICE_KVM_VM, &vm_state)?;
        if let Some(s) = &serial {
            w.device(DEVICE_SERIAL, s)?;
        }
        if let Some(k) = &i8042 {
            w.device(DEVICE_I8042, k)?;
        }
        Ok(())
    };
    // No host change (reclaim) after this: the ones made so far, also while pausing, are
    // marked when `seal` returns, so the harvest below has them.
    if let Some(h) = src.host_changes {
        h.seal();
    }
    // A write fault a vCPU took just before the pause may still be in a handler (stage2-wp):
    // let it set its page's bit, so that the page goes in this round and not never.
    tracker.settle()?;
    // The pages harvested for the last estimate are not sent yet: they go with the last
    // round (precopy) or are owed (postcopy).
    let mut last = tracker.harvest()?;
    if let Some(bm) = &pending {
        last.merge(bm);
    }
    let final_pages = last.count();
    let ram_bytes = src.regions.iter().map(|r| r.len).sum();
    let summary = |mode, figures, downtime: Duration, postcopy, bytes_sent| MigrationSummary {
        mode,
        dirty_mode: dirty_mode_name(tracker.mode()).into(),
        total_ms: ms(started.elapsed()),
        downtime_ms: ms(downtime),
        bytes_sent,
        rounds: figures,
        postcopy,
        ram_bytes,
        vcpus,
    };
    if let Some(dest) = dest {
        println!(
            "switching to postcopy after round {}: {final_pages} pages written since, owed to the destination too",
            round - 1
        );
        let out = postcopy::push(
            w,
            back,
            dest,
            src.mem,
            &regions,
            &last,
            discarded.as_ref(),
            src.pager,
            write_state,
        )?;
        let pc: PostcopyFigures = out.figures;
        let downtime = out.guest_running_at - pause_at;
        let bytes = w.bytes_written();
        return Ok(summary(
            MigrationMode::Postcopy,
            figures,
            downtime,
            Some(pc),
            bytes,
        ));
    }
    let t0 = Instant::now();
    let b0 = w.bytes_written();
    // Paused since `pause_all`: no vCPU writes guest RAM, and reclaims were sealed above.
    sender.guest_paused = true;
    send_dirty(w, &mut sender, src.mem, &last, src.pager)?;
    w.round(round, final_pages)?;
    write_state(w)?;
    w.end()?;
    w.flush()?;
    println!(
        "round {round} (paused): {final_pages} dirty pages, {:.1} MB sent in all; waiting for the destination",
        w.bytes_written() as f64 / MB
    );
    figures.push(RoundFigures::new(
        round,
        final_pages,
        w.bytes_written() - b0,
        t0.elapsed(),
    ));
    back.expect_guest_running()?;
    Ok(summary(
        MigrationMode::Precopy,
        figures,
        pause_at.elapsed(),
        None,
        w.bytes_written(),
    ))
}

/// What the destination did at the postcopy switch.
#[derive(Clone, Copy, Debug, Default)]
pub struct SwitchFigures {
    /// Runs of stale host pages dropped at the switch (after the last round).
    pub drop_calls: u64,
    /// Time spent dropping them: part of the downtime.
    pub drop_time: Duration,
    /// Runs dropped by discard rounds, while the guest still ran on the source.
    pub early_drop_calls: u64,
    /// Time spent dropping those.
    pub early_drop_time: Duration,
}

/// The postcopy phase still to come on the destination.
pub struct PostcopyIncoming {
    /// The rest of the stream (the owed pages, then `End`).
    pub reader: StreamReader<std::io::BufReader<Connection>>,
    /// Host pages the source owes (dropped here at the switch).
    pub owed: PageSet,
    /// The switch's drops.
    pub switch: SwitchFigures,
}

impl std::fmt::Debug for PostcopyIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyIncoming")
            .field("owed", &self.owed.len())
            .finish_non_exhaustive()
    }
}

/// What the destination received, ready to restore.
#[derive(Debug)]
pub struct Incoming {
    /// Per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide state.
    pub vm: VmState,
    /// COM1's registers, when the source had one.
    pub serial: Option<SerialRegs>,
    /// The i8042's registers, when the source had one.
    pub i8042: Option<I8042State>,
    /// Rounds seen.
    pub rounds: u32,
    /// Bytes read.
    pub bytes: u64,
    /// Host pages placed whole through the pager while receiving.
    pub placed: u64,
    /// The connection, for the acknowledgement.
    pub conn: Connection,
    /// `Some` when the source switched to postcopy: the guest must run with the owed pages
    /// coming from [`postcopy::PostcopyTarget`].
    pub postcopy: Option<PostcopyIncoming>,
}

/// Socket read buffer of the destination: small chunks (zero runs, single pages) come many
/// to a read; page data larger than it bypasses it.
const RECEIVE_BUFFER: usize = 256 << 10;

/// A source that connected and sent its header: the destination builds its VM from
/// [`layout`](Self::layout) (its spec), then [`receive`]s the rest.
pub struct Pending {
    conn: Connection,
    reader: StreamReader<std::io::BufReader<Connection>>,
    layout: Layout,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// The source's layout and machine spec.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// Accepts one source on `listener` and reads its header.
pub fn accept(listener: &super::Listener) -> Result<Pending, MigrateError> {
    let conn = listener.accept()?;
    let input = conn
        .try_clone()
        .map_err(|source| StreamError::Io { offset: 0, source })?;
    let (reader, layout) =
        StreamReader::open(std::io::BufReader::with_capacity(RECEIVE_BUFFER, input))?;
    Ok(Pending {
        conn,
        reader,
        layout,
    })
}

/// Receives from a source accepted with [`accept`]: says what this destination can receive,
/// checks the source's layout against this VM, and receives RAM into `mem` (through `pager`
/// when demand paging is on) and the state, until `End` or the postcopy switch. A checksum,
/// truncation or layout error stops here with that error.
pub fn receive(
    pending: Pending,
    mem: &GuestMemoryMmap,
    vcpus: usize,
    regions: &[RamRegion],
    pager: Option<&dyn RamPager>,
) -> Result<Incoming, MigrateError> {
    let Pending {
        conn,
        reader: mut r,
        layout,
    } = pending;
    let _boost = MigrationPriority::raise();
    let mut reply = StreamWriter::headless(
        conn.try_clone()
            .map_err(|source| StreamError::Io { offset: 0, source })?,
    );
    let (host_page, flags) = match pager {
        Some(p) => (p.host_page(), DEST_DEMAND_PAGING),
        None => (PAGE_SIZE as u64, 0),
    };
    reply.dest_info(host_page, flags)?;
    layout_of(vcpus, regions).accept(&layout)?;
    let mut states: Vec<Option<VcpuState>> = (0..vcpus).map(|_| None).collect();
    let mut vm = None;
    let mut serial = None;
    let mut i8042 = None;
    let mut rounds = 0;
    // This destination's RAM is new: nothing but this stream writes it before the guest runs.
    let mut ram = RamReceiver::new(mem, pager).fresh();
    let ram_regions: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa, r.len)).collect();
    let mut owed: Option<PageSet> = None;
    let mut switch = SwitchFigures::default();
    let switched = loop {
        let (offset, chunk) = r.position();
        let c = match r.next_chunk_into(&mut ram)? {
            Received::PagesInPlace { .. } => continue,
            Received::Chunk(c) => c,
        };
        if ram.apply(&c)? {
            continue;
        }
        match c {
            Chunk::Round { round, dirty_pages } => {
                rounds = round + 1;
                info!("incoming round {round}: {dirty_pages} pages");
                // Drops so far came with a round (a discard round), not with the switch.
                switch.early_drop_calls += std::mem::take(&mut switch.drop_calls);
                switch.early_drop_time += std::mem::take(&mut switch.drop_time);
                reply.round_applied(round)?;
            }
            Chunk::Vcpu { id, blob } => {
                let st = VcpuState::decode(blob)?;
                match states.get_mut(id as usize) {
                    Some(slot) => *slot = Some(st),
                    None => return Err(MigrateError::Missing(format!("a vCPU {id} here"))),
                }
            }
            Chunk::Device { name, blob } if name == DEVICE_KVM_VM => {
                vm = Some(VmState::decode(blob)?);
            }
            Chunk::Device { name, blob } if name == DEVICE_SERIAL => {
                serial = Some(SerialRegs::decode(blob)?);
            }
            Chunk::Device { name, blob } if name == DEVICE_I8042 => {
                i8042 = Some(
                    postcard::from_bytes(blob).map_err(|source| StateError::Decode {
                        what: "i8042",
                        source,
                    })?,
                );
            }
            Chunk::Device { name, .. } => info!("ignoring state of unknown device {name:?}"),
            Chunk::Discard { runs } => {
                let Some(p) = pager else {
                    return Err(MigrateError::Refused(
                        "the source switched to postcopy, which needs demand paging here: \
                         this destination runs with --no-demand-paging"
                            .into(),
                    ));
                };
                let set = owed.get_or_insert_with(|| PageSet::new(&ram_regions, p.host_page()));
                let t = Instant::now();
                let mut drops = Vec::new();
                let mut res = ResidencyCursor::new(mem);
                for (gpa, count) in discard_runs(runs) {
                    stale_runs(p.host_page(), &mut res, set, gpa, count, &mut drops)?;
                }
                switch.drop_calls += drops.len() as u64;
                // Nothing runs on this side yet: the pager may drop them all without an
                // event per run.
                p.discard_all(&drops)
                    .map_err(|e| RamError::Pager(format!("dropping stale copies: {e}")))?;
                switch.drop_time += t.elapsed();
            }
            Chunk::Postcopy => break true,
            Chunk::End => break false,
            other => {
                return Err(StreamError::Unexpected {
                    chunk,
                    offset,
                    found: super::stream::chunk_name(&other),
                    expected: "a migration chunk of the source",
                }
                .into())
            }
        }
    };
    let vcpus = states
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| MigrateError::Missing(format!("the state of vCPU {i}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let placed = ram.placed;
    let bytes = r.bytes_read();
    let postcopy = match (switched, pager) {
        (false, _) => None,
        (true, Some(p)) => Some(PostcopyIncoming {
            reader: r,
            owed: owed.unwrap_or_else(|| PageSet::new(&ram_regions, p.host_page())),
            switch,
        }),
        (true, None) => {
            return Err(MigrateError::Refused(
                "the source switched to postcopy, which needs demand paging here: this \
                 destination runs with --no-demand-paging"
                    .into(),
            ))
        }
    };
    Ok(Incoming {
        vcpus,
        vm: vm.ok_or_else(|| MigrateError::Missing("the VM state (irqchip, PIT, clock)".into()))?,
        serial,
        i8042,
        rounds,
        bytes,
        placed,
        conn,
        postcopy,
    })
}

/// Postcopy switch on the destination: the pages of `[gpa, gpa + count pages)` are stale
/// here; their host pages join `owed`, and the runs of them that have a copy here are added
/// to `drops` (consecutive ones as one run; a run never spans two RAM regions: the source
/// splits runs at region ends). `res` tells which host pages have a copy here.
fn stale_runs(
    host: u64,
    res: &mut ResidencyCursor,
    owed: &mut PageSet,
    gpa: u64,
    count: u32,
    drops: &mut Vec<(u64, u64)>,
) -> Result<(), MigrateError> {
    let end = gpa
        .checked_add(u64::from(count) * PAGE_SIZE as u64)
        .ok_or(RamError::OutOfRange {
            gpa,
            len: u64::from(count),
        })?;
    let mut at = gpa / host * host;
    while at < end {
        owed.insert(at);
        if res.populated(at)? {
            match drops.last_mut() {
                Some((s, len)) if *s + *len == at => *len += host,
                _ => drops.push((at, host)),
            }
        }
        at += host;
    }
    Ok(())
}

/// Restores the received state into a fresh VM and its (not yet running) vCPUs.
pub fn restore(
    inc: &Incoming,
    vm: &VmFd,
    vcpus: &[VcpuFd],
    caps: &VcpuCaps,
    serial: Option<&SerialDevice>,
) -> Result<(), MigrateError> {
    restore_vm(vm, &inc.vm)?;
    for (fd, st) in vcpus.iter().zip(&inc.vcpus) {
        restore_vcpu(fd, st, caps)?;
    }
    match (&inc.serial, serial) {
        (Some(regs), Some(dev)) => dev
            .restore(&regs.into())
            .map_err(|e| MigrateError::State(StateError::Serial(e)))?,
        (Some(_), None) => info!("the source's COM1 state is dropped: this VM has no COM1"),
        (None, _) => {}
    }
    Ok(())
}

/// Tells the source the guest runs here.
pub fn acknowledge(conn: super::Connection) -> Result<(), MigrateError> {
    let mut w = StreamWriter::headless(conn);
    w.guest_running()?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::SlotInfo;
    use vm_memory::{Bytes, GuestAddress};

    /// Dirty pages go out as runs of consecutive pages, with their current contents.
    #[test]
    fn dirty_pages_are_sent_in_runs() {
        let page = PAGE_SIZE as u64;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * PAGE_SIZE)]).unwrap();
        for p in [0u64, 1, 2, 5] {
            mem.write_obj(p + 1, GuestAddress(p * page)).unwrap();
        }
        let slots = [SlotInfo {
            slot: 0,
            gpa: 0,
            len: 64 * page,
            host_addr: 0,
        }];
        let mut bm = DirtyBitmap::empty(&slots);
        for p in [0u64, 1, 2, 5, 9] {
            bm.set(p * page);
        }
        let mut w = StreamWriter::headless(Vec::new());
        let mut sender = RamSender::new();
        send_dirty(&mut w, &mut sender, &mem, &bm, None).unwrap();
        w.end().unwrap();
        let bytes = w.into_inner().unwrap();
        let mut r = StreamReader::headless(&bytes[..]);
        let mut got = Vec::new();
        loop {
            match r.next_chunk().unwrap() {
                Chunk::Pages { gpa, data } => {
                    got.push(("data", gpa / page, data.len() / PAGE_SIZE))
                }
                Chunk::ZeroPages { gpa, count } => got.push(("zero", gpa / page, count as usize)),
                Chunk::End => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, vec![("data", 0, 3), ("data", 5, 1), ("zero", 9, 1)]);
        assert_eq!((sender.data_pages, sender.zero_pages), (4, 1));
    }
}
