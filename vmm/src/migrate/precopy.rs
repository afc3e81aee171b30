//! Precopy live migration of a running VM: the source's round loop over KVM's dirty bitmap
//! (full pass, dirty rounds until the estimated downtime fits, pause, last round, state, end,
//! wait for the destination's acknowledgement) and the destination's receive-and-restore.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};
use log::info;
use vm_memory::GuestMemoryMmap;

use super::ram::{apply_chunk, RamError, RamSender};
use super::state::{
    complete_pending_io, restore_vcpu, restore_vm, save_vcpu, save_vm, StateError, VcpuCaps,
    VcpuState, VmState,
};
use super::stream::{Chunk, Layout, StreamError, StreamReader, StreamWriter, PAGE_SIZE};
use super::transport::{Address, AddressError};
use super::DEVICE_KVM_VM;
use crate::dirty::{DirtyBitmap, DirtyError, DirtyMode, DirtyTracker};
use crate::memory::RamRegion;
use crate::vcpu::{VcpuError, VmControl};

/// Default downtime goal (`--downtime-ms`).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default round limit (`--max-rounds`).
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Pages coalesced into one `send_range` call at most (the sender's buffer splits further).
const MAX_RUN_PAGES: u64 = 1024;
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
}

/// Precopy knobs.
#[derive(Clone, Copy, Debug)]
pub struct PrecopyConfig {
    /// Stop iterating when the estimated downtime is at most this.
    pub downtime: Duration,
    /// Stop iterating after this many rounds (the full pass counts as round 0).
    pub max_rounds: u32,
}

/// Figures of a completed source-side migration.
#[derive(Clone, Debug, Default)]
pub struct PrecopySummary {
    /// Rounds sent, the full pass and the final (paused) round included.
    pub rounds: u32,
    /// Bytes written to the stream.
    pub bytes: u64,
    /// Pause to the destination's acknowledgement.
    pub downtime: Duration,
    /// Connect to acknowledgement.
    pub total: Duration,
    /// Pages in the final, paused round.
    pub final_pages: u64,
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
) -> Result<(), MigrateError> {
    let page = PAGE_SIZE as u64;
    let mut run: Option<(u64, u64)> = None;
    for gpa in bm.iter() {
        run = match run {
            Some((start, n)) if start + n * page == gpa && n < MAX_RUN_PAGES => {
                Some((start, n + 1))
            }
            Some((start, n)) => {
                sender.send_range(w, mem, start, n * page)?;
                Some((gpa, 1))
            }
            None => Some((gpa, 1)),
        };
    }
    if let Some((start, n)) = run {
        sender.send_range(w, mem, start, n * page)?;
    }
    Ok(())
}

/// Runs precopy to `to`. On any error the VM is resumed (if it was paused) and keeps running
/// here; the caller reports the error.
pub fn send(
    src: &Source<'_>,
    to: &Address,
    cfg: PrecopyConfig,
) -> Result<PrecopySummary, MigrateError> {
    let started = Instant::now();
    let conn = to.connect()?;
    let back = conn
        .try_clone()
        .map_err(|source| StreamError::Io { offset: 0, source })?;
    let vcpus = src.control.lock().unwrap_or_else(|p| p.into_inner()).len();
    let mut w = StreamWriter::new(conn, &layout_of(vcpus, src.regions))?;
    let tracker = DirtyTracker::new_kvm(src.vm, src.regions, DirtyMode::KvmBitmap)?;
    let mut paused = false;
    let res = rounds(src, cfg, &tracker, &mut w, &mut paused, back, started);
    if let Err(e) = tracker.stop() {
        log::warn!("stopping dirty logging after migration: {e}");
    }
    if res.is_err() && paused {
        src.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resume_all()?;
    }
    res
}

fn rounds<W: Write>(
    src: &Source<'_>,
    cfg: PrecopyConfig,
    tracker: &DirtyTracker,
    w: &mut StreamWriter<W>,
    paused: &mut bool,
    back: super::Connection,
    started: Instant,
) -> Result<PrecopySummary, MigrateError> {
    let mut sender = RamSender::new();
    // The first harvest of the KVM bitmap mode reports every page: the full pass.
    let mut bm = tracker.harvest()?;
    let mut round = 0u32;
    loop {
        let t0 = Instant::now();
        let b0 = w.bytes_written();
        let pages = bm.count();
        send_dirty(w, &mut sender, src.mem, &bm)?;
        w.round(round, pages)?;
        w.flush()?;
        let secs = t0.elapsed().as_secs_f64().max(1e-6);
        let sent = w.bytes_written() - b0;
        let rate = sent as f64 / secs;
        bm = tracker.harvest()?;
        let next = bm.count();
        let est = Duration::from_secs_f64(next as f64 * PAGE_SIZE as f64 / rate.max(1.0));
        println!(
            "round {round}: {pages} dirty pages, {:.1} MB sent, {:.0} MB/s, estimated downtime {} ms ({next} pages dirty now)",
            sent as f64 / MB,
            rate / MB,
            est.as_millis()
        );
        round += 1;
        if est <= cfg.downtime || round >= cfg.max_rounds {
            break;
        }
    }
    // Stop the guest, save the vCPUs (completing any half-done I/O first, which may still
    // touch memory), then take the last harvest: everything written is in it.
    let pause_at = Instant::now();
    let control = src.control.lock().unwrap_or_else(|p| p.into_inner());
    control.pause_all()?;
    *paused = true;
    let mut blobs = Vec::with_capacity(control.len());
    for i in 0..control.len() {
        let caps = src.caps.clone();
        let st = control.with_paused_vcpu(i, move |fd: &mut VcpuFd| {
            complete_pending_io(fd)?;
            save_vcpu(fd, i as u32, &caps)
        })??;
        blobs.push(st.encode()?);
    }
    drop(control);
    let vm_state = save_vm(src.vm)?.encode()?;
    // The pages harvested for the estimate are not sent yet: they go with the last round.
    let mut last = tracker.harvest()?;
    last.merge(&bm);
    let final_pages = last.count();
    send_dirty(w, &mut sender, src.mem, &last)?;
    w.round(round, final_pages)?;
    for (i, b) in blobs.iter().enumerate() {
        w.vcpu(i as u32, b)?;
    }
    w.device(DEVICE_KVM_VM, &vm_state)?;
    w.end()?;
    w.flush()?;
    println!(
        "round {round} (paused): {final_pages} dirty pages, {:.1} MB sent in all; waiting for the destination",
        w.bytes_written() as f64 / MB
    );
    StreamReader::headless(back).expect_guest_running()?;
    Ok(PrecopySummary {
        rounds: round + 1,
        bytes: w.bytes_written(),
        downtime: pause_at.elapsed(),
        total: started.elapsed(),
        final_pages,
    })
}

/// What the destination received, ready to restore.
#[derive(Debug)]
pub struct Incoming {
    /// Per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide state.
    pub vm: VmState,
    /// Rounds seen.
    pub rounds: u32,
    /// Bytes read.
    pub bytes: u64,
    /// The connection, for the acknowledgement.
    pub conn: super::Connection,
}

/// Accepts one source on `listener` and receives RAM into `mem` and the state, until `End`.
/// A checksum, truncation or layout error stops here with that error.
pub fn receive(
    listener: &super::Listener,
    mem: &GuestMemoryMmap,
    vcpus: usize,
    regions: &[RamRegion],
) -> Result<Incoming, MigrateError> {
    let conn = listener.accept()?;
    let input = conn
        .try_clone()
        .map_err(|source| StreamError::Io { offset: 0, source })?;
    let (mut r, _) = StreamReader::new(std::io::BufReader::new(input), &layout_of(vcpus, regions))?;
    let mut states: Vec<Option<VcpuState>> = (0..vcpus).map(|_| None).collect();
    let mut vm = None;
    let mut rounds = 0;
    loop {
        let c = r.next_chunk()?;
        if apply_chunk(mem, &c)? {
            continue;
        }
        match c {
            Chunk::Round { round, dirty_pages } => {
                rounds = round + 1;
                info!("incoming round {round}: {dirty_pages} pages");
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
            Chunk::Device { name, .. } => info!("ignoring state of unknown device {name:?}"),
            Chunk::End => break,
            _ => {}
        }
    }
    let vcpus = states
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| MigrateError::Missing(format!("the state of vCPU {i}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Incoming {
        vcpus,
        vm: vm.ok_or_else(|| MigrateError::Missing("the VM state (irqchip, PIT, clock)".into()))?,
        rounds,
        bytes: r.bytes_read(),
        conn,
    })
}

/// Restores the received state into a fresh VM and its (not yet running) vCPUs.
pub fn restore(
    inc: &Incoming,
    vm: &VmFd,
    vcpus: &[VcpuFd],
    caps: &VcpuCaps,
) -> Result<(), MigrateError> {
    restore_vm(vm, &inc.vm)?;
    for (fd, st) in vcpus.iter().zip(&inc.vcpus) {
        restore_vcpu(fd, st, caps)?;
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
        send_dirty(&mut w, &mut sender, &mem, &bm).unwrap();
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
