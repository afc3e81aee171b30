//! The source of a live migration: the rounds over a dirty tracker (full pass, dirty rounds
//! until the estimated downtime fits or the postcopy switch, pause, then the last round or
//! [`postcopy`]), the state, the end, and the wait for the destination.

pub mod postcopy;

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use self::postcopy::DestInfo;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::dirty::{DirtyBitmap, DirtySource, DirtyTracker, HostChangeRefused, HostChanges};
use crate::hypervisor::{Vcpu, Vm};
use crate::memory::RamRegion;
use crate::migrate::auth::{self, Secret};
use crate::migrate::error::MigrateError;
use crate::migrate::lanes::{
    self,
    source::{RoundWork, SourceLanes},
};
use crate::migrate::page_set::PageSet;
use crate::migrate::priority::MigrationPriority;
use crate::migrate::ram::{RamDigest, RamPager, RamSender};
use crate::migrate::state::{
    complete_pending_io, save_vcpu, save_vm, SerialRegs, StateError, VcpuCaps, DEVICE_I8042,
    DEVICE_KVM_VM, DEVICE_SERIAL, DEVICE_VIRTIO_PREFIX,
};
use crate::migrate::stream::{
    Layout, StreamError, StreamReader, StreamWriter, MAX_DIGEST_PAGES, PAGE_SIZE,
};
use crate::migrate::summary::{ms, MigrationMode, MigrationSummary, PostcopyFigures, RoundFigures};
use crate::migrate::transport::{Address, Connection};
use crate::vcpu::VmControl;
use crate::virtio::MmioTransport;

/// Default downtime goal (`--downtime-ms`).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default round limit (`--max-rounds`).
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
const MB: f64 = 1_000_000.0;

/// Knobs of the source.
#[derive(Clone, Debug)]
pub struct MigrateConfig {
    /// Stop iterating when the estimated downtime is at most this.
    pub downtime: Duration,
    /// Stop iterating after this many rounds (the full pass counts as round 0).
    pub max_rounds: u32,
    /// Switch to postcopy after this many rounds (at least 1: the full pass) instead of
    /// iterating until the downtime fits.
    pub postcopy_after: Option<u32>,
    /// Fail the migration (the VM runs on here) once the destination makes no progress for
    /// this long (`--migrate-timeout`); `None` waits for ever.
    pub idle_timeout: Option<Duration>,
    /// `--migrate-secret`: the destination must prove it, and this source proves it, before
    /// anything of the guest is sent.
    pub secret: Option<Arc<Secret>>,
    /// `--migrate-connections`: connections the precopy rounds are spread over (1 to
    /// [`MAX_CONNECTIONS`](crate::migrate::stream::MAX_CONNECTIONS)).
    pub connections: u32,
    /// `--migrate-verify`: send a digest of guest RAM taken at the pause, which the
    /// destination checks page by page.
    pub verify: bool,
}

/// What the source needs from the running VM.
pub struct Source<'a> {
    /// The VM fd (dirty log, VM state).
    pub vm: &'a Vm,
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
    /// The virtio devices, in slot order: paused with the vCPUs (every request they took
    /// done), saved as `virtio-mmio-N`, and served again if the migration fails. Their
    /// writes of guest RAM until then reach the migration through `host_changes`.
    pub virtio: &'a [Arc<MmioTransport>],
}

/// The device-state chunk name of virtio slot `index`.
pub fn virtio_chunk_name(index: usize) -> String {
    format!("{DEVICE_VIRTIO_PREFIX}{index}")
}

/// Pauses every device of `virtio` and encodes its state, in slot order. A device that cannot
/// pause fails the migration, with the ones paused before it serving again.
fn pause_devices(virtio: &[Arc<MmioTransport>]) -> Result<Vec<Vec<u8>>, MigrateError> {
    let mut out = Vec::with_capacity(virtio.len());
    for (i, t) in virtio.iter().enumerate() {
        match t.pause() {
            Ok(st) => out.push(st.encode()),
            Err(why) => {
                for t in &virtio[..i] {
                    t.resume();
                }
                return Err(MigrateError::Refused(format!("virtio device {i}: {why}")));
            }
        }
    }
    Ok(out)
}

fn layout_of(vcpus: usize, regions: &[RamRegion]) -> Layout {
    Layout::new(vcpus as u32, regions.iter().map(|r| (r.gpa, r.len)))
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
    let mut conn = to.connect()?;
    conn.set_idle_timeout(cfg.idle_timeout)
        .map_err(|source| StreamError::Io { offset: 0, source })?;
    if let Some(secret) = &cfg.secret {
        auth::prove_source(&mut conn, secret, &to.to_string())?;
    }
    let back = conn
        .try_clone()
        .map_err(|source| StreamError::Io { offset: 0, source })?;
    let vcpus = src.control.lock().unwrap_or_else(|p| p.into_inner()).len();
    let token = lanes::token().map_err(|source| StreamError::Io { offset: 0, source })?;
    let mut w = StreamWriter::new(
        conn,
        &layout_of(vcpus, src.regions)
            .with_spec(src.spec.to_vec())
            .with_lanes(cfg.connections, token),
    )?;
    let lanes = SourceLanes::open(
        to,
        cfg.connections,
        &token,
        cfg.idle_timeout,
        cfg.secret.as_deref(),
    )?;
    if cfg.connections > 1 {
        println!(
            "migrating over {} connections to {to}: each round is cut into as many address ranges",
            cfg.connections
        );
    }
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
    let tracker = src.dirty.tracker(src.vm, src.regions)?;
    // A VM paused before its migration stays paused through it: the control lock is held,
    // so pause and resume requests wait until the migration is over. Nothing writes its RAM
    // then (reclaims are refused too), and every round is sent straight from guest RAM.
    let held = {
        let c = src.control.lock().unwrap_or_else(|p| p.into_inner());
        c.all_paused().then_some(c)
    };
    // The devices of a paused VM stop now, before host changes are refused: what they
    // finish is in guest RAM for the first pass. A running VM's stop with its vCPUs.
    let mut devices = None;
    if held.is_some() {
        match pause_devices(src.virtio) {
            Ok(d) => devices = Some(d),
            Err(e) => {
                let _ = tracker.stop();
                return Err(e);
            }
        }
    }
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
        lanes,
        &mut paused,
        held,
        back,
        dest,
        started,
        &mut devices,
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
    // The devices this migration paused serve again when the VM stays here (also a VM that
    // stays paused: its devices were serving before).
    if devices.is_some() && !matches!(res, Ok(_) | Err(MigrateError::PostcopyLost(_))) {
        for t in src.virtio {
            t.resume();
        }
    }
    if resume {
        src.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resume_all()?;
    }
    res
}

#[allow(clippy::too_many_arguments)]
fn rounds<W: Write>(
    src: &Source<'_>,
    cfg: MigrateConfig,
    tracker: &DirtyTracker,
    w: &mut StreamWriter<W>,
    mut lanes: SourceLanes,
    paused: &mut bool,
    held: Option<MutexGuard<'_, VmControl>>,
    mut back: StreamReader<Connection>,
    dest: Option<DestInfo>,
    started: Instant,
    devices: &mut Option<Vec<Vec<u8>>>,
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
    let regions: Vec<(u64, u64)> = src.regions.iter().map(|r| (r.gpa, r.len)).collect();
    let sent = |w: &StreamWriter<W>, lanes: &SourceLanes| w.bytes_written() + lanes.bytes_written();
    loop {
        let t0 = Instant::now();
        let b0 = sent(w, &lanes);
        let work = match &pending {
            None => RoundWork::Full(&regions),
            Some(bm) => RoundWork::Dirty(bm),
        };
        let pages = work.pages();
        let paused_before = sender.guest_paused;
        lanes.send_round(
            w,
            &mut sender,
            src.mem,
            src.pager,
            work,
            round,
            paused_before,
        )?;
        w.round(round, pages)?;
        w.flush()?;
        // A round ends when the destination has applied it, not when the socket took the
        // bytes: the rate below (and so the downtime estimate) is end to end, and no
        // backlog on the destination is left to lengthen the pause.
        back.expect_round_applied(round)?;
        let mut f = RoundFigures::new(round, pages, sent(w, &lanes) - b0, t0.elapsed());
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
    // Postcopy: one more round, with no page data. The destination drops its copies of the
    // pages written since the last round, which are owed from now on. Dropping costs it per
    // host page and per run (hundreds of ms for a few hundred thousand 4 KiB pages); done here,
    // while the guest still runs on this side, it leaves only the pages written during this
    // round to drop at the switch, inside the downtime.
    let mut discarded = None;
    if let Some(d) = dest {
        // The rest goes on the main connection: lanes end before the discard (after it, no
        // page of the discarded ones may arrive but the postcopy push's).
        lanes.finish()?;
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
        let st = control.with_paused_vcpu(i, move |fd: &mut Vcpu| {
            complete_pending_io(fd)?;
            save_vcpu(fd, i as u32, &caps)
        })??;
        blobs.push(st.encode()?);
    }
    let vcpus = control.len() as u32;
    // The vCPUs are out (their last MMIO accesses completed above): the devices finish what
    // they took and stop, before host changes are refused below.
    let device_blobs = match devices {
        Some(d) => d.clone(),
        None => devices.insert(pause_devices(src.virtio)?).clone(),
    };
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
    let verify = cfg.verify;
    let write_state = |w: &mut StreamWriter<W>| -> Result<(), MigrateError> {
        for (i, b) in blobs.iter().enumerate() {
            w.vcpu(i as u32, b)?;
        }
        if verify {
            // The guest is paused and reclaims are sealed: RAM is what the destination must
            // end up with, sent in the last round or owed by postcopy.
            let t = Instant::now();
            let digest = RamDigest::of(src.mem, &regions, src.pager)?;
            for (gpa, crcs) in digest.runs(MAX_DIGEST_PAGES) {
                w.digest(gpa, crcs)?;
            }
            println!(
                "digest of {} pages taken in {:.0} ms, sent for the destination to verify",
                digest.pages(),
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        w.device(DEVICE_KVM_VM, &vm_state)?;
        if let Some(s) = &serial {
            w.device(DEVICE_SERIAL, s)?;
        }
        if let Some(k) = &i8042 {
            w.device(DEVICE_I8042, k)?;
        }
        for (i, b) in device_blobs.iter().enumerate() {
            w.device(&virtio_chunk_name(i), b)?;
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
    let summary = |mode, figures, downtime: Duration, postcopy, main_bytes, lanes: &SourceLanes| {
        let connection_bytes: Vec<u64> = std::iter::once(main_bytes)
            .chain(lanes.lane_bytes())
            .collect();
        MigrationSummary {
            mode,
            dirty_mode: tracker.mode().name().into(),
            total_ms: ms(started.elapsed()),
            downtime_ms: ms(downtime),
            bytes_sent: connection_bytes.iter().sum(),
            connection_bytes,
            rounds: figures,
            postcopy,
            ram_bytes,
            vcpus,
        }
    };
    if let Some(dest) = dest {
        println!(
            "switching to postcopy after round {}: {final_pages} pages written since, owed to the destination too",
            round - 1
        );
        // The destination's back channel now carries only page requests, which may rightly
        // stop while it runs without faults; a stalled destination still fails the push's
        // writes after --migrate-timeout.
        back.get_ref()
            .set_read_idle_timeout(None)
            .map_err(|source| StreamError::Io { offset: 0, source })?;
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
        return Ok(summary(
            MigrationMode::Postcopy,
            figures,
            downtime,
            Some(pc),
            w.bytes_written(),
            &lanes,
        ));
    }
    let t0 = Instant::now();
    let b0 = sent(w, &lanes);
    // Paused since `pause_all`: no vCPU writes guest RAM, and reclaims were sealed above.
    sender.guest_paused = true;
    let work = RoundWork::Dirty(&last);
    lanes.send_round(w, &mut sender, src.mem, src.pager, work, round, true)?;
    lanes.finish()?;
    w.round(round, final_pages)?;
    write_state(w)?;
    w.end()?;
    w.flush()?;
    let total = sent(w, &lanes);
    println!(
        "round {round} (paused): {final_pages} dirty pages, {:.1} MB sent in all; waiting for the destination",
        total as f64 / MB
    );
    figures.push(RoundFigures::new(
        round,
        final_pages,
        total - b0,
        t0.elapsed(),
    ));
    back.expect_guest_running()?;
    Ok(summary(
        MigrationMode::Precopy,
        figures,
        pause_at.elapsed(),
        None,
        w.bytes_written(),
        &lanes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::SlotInfo;
    use crate::migrate::stream::Chunk;
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
        RoundWork::Dirty(&bm)
            .send_share(&mut w, &mut sender, &mem, None, 0, u64::MAX)
            .unwrap();
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
