//! The destination of a live migration: accept a source, receive its rounds into guest RAM
//! (through the pager when demand paging is on) and its state, restore the state, and say
//! the guest runs here; after a postcopy switch the rest comes through [`postcopy`].

pub mod postcopy;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use log::info;
use vm_memory::GuestMemoryMmap;

use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialDevice;
use crate::hypervisor::{Vcpu, VmOps};
use crate::memory::RamRegion;
use crate::migrate::auth::{self, Secret};
use crate::migrate::error::MigrateError;
use crate::migrate::lanes::destination::{accept_lanes, receive_with_lanes, LaneIn};
use crate::migrate::page_set::PageSet;
use crate::migrate::priority::MigrationPriority;
use crate::migrate::ram::{
    DigestCheck, RamDigest, RamError, RamPager, RamReceiver, ResidencyCursor,
};
use crate::migrate::state::{
    restore_vcpu, restore_vm, SerialRegs, StateError, VcpuCaps, VcpuState, VmState, DEVICE_I8042,
    DEVICE_KVM_VM, DEVICE_SERIAL, DEVICE_VIRTIO_PREFIX,
};
use crate::migrate::stream::{
    chunk_name, digest_crcs, discard_runs, Chunk, Layout, Received, StreamError, StreamReader,
    StreamWriter, DEST_DEMAND_PAGING, PAGE_SIZE,
};
use crate::migrate::transport::{Connection, Listener};

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
    /// The source's digest (`--migrate-verify`): the owed pages are checked on arrival.
    pub digest: Option<RamDigest>,
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
    /// The state and figures taken off the stream (its `postcopy` is moved into
    /// [`postcopy`](Self::postcopy), with the rest of the stream).
    pub received: ReceivedStream,
    /// Bytes read, on every connection.
    pub bytes: u64,
    /// Connections the source used (`--migrate-connections`).
    pub connections: u32,
    /// What `--migrate-verify` compared before the guest runs (every page but the ones a
    /// postcopy still owes); all of them matched.
    pub verified: Option<DigestCheck>,
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
    lanes: Vec<LaneIn>,
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

/// Accepts one source on `listener` and reads its header, then accepts the lanes the header
/// announces ([`accept_lanes`]). Every later read and write on the connections fails once the
/// source makes no progress for `idle` (`--migrate-timeout`). With a `secret` the source must
/// prove it first on each connection ([`auth::check_source`]): a source that does not is
/// refused before anything of its stream is read.
pub fn accept(
    listener: &Listener,
    idle: Option<Duration>,
    secret: Option<&Secret>,
) -> Result<Pending, MigrateError> {
    let mut conn = listener.accept()?;
    conn.set_idle_timeout(idle)
        .map_err(|source| StreamError::Io { offset: 0, source })?;
    if let Some(secret) = secret {
        auth::check_source(&mut conn, secret)?;
    }
    let input = conn
        .try_clone()
        .map_err(|source| StreamError::Io { offset: 0, source })?;
    let (reader, layout) =
        StreamReader::open(std::io::BufReader::with_capacity(RECEIVE_BUFFER, input))?;
    let lanes = accept_lanes(listener, &layout, idle, secret, RECEIVE_BUFFER)?;
    Ok(Pending {
        conn,
        reader,
        layout,
        lanes,
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
        lanes,
    } = pending;
    let _boost = MigrationPriority::raise();
    let mut reply = StreamWriter::headless(
        conn.try_clone()
            .map_err(|source| StreamError::Io { offset: 0, source })?,
    );
    let ram_regions: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa, r.len)).collect();
    // This destination's RAM is new: nothing but this stream writes it before the guest runs.
    let mut ram = RamReceiver::new(mem, pager).fresh();
    let (mut received, lane_figures) = receive_with_lanes(lanes, &mut ram, |ram, round_done| {
        receive_chunks(
            &mut r,
            &mut reply,
            &layout,
            ram,
            vcpus,
            &ram_regions,
            round_done,
        )
    })?;
    received.placed += lane_figures.placed;
    let bytes = r.bytes_read() + lane_figures.bytes;
    // `--migrate-verify`: every page here must be what the source had at the pause, but the
    // ones a postcopy still owes (checked as they arrive).
    let verified = match &received.digest {
        Some(d) => {
            let here = RamDigest::of(mem, &ram_regions, pager)?;
            let owed = received.postcopy.as_ref().map(|(o, _)| o);
            let c = d.compare(&here, |gpa| {
                owed.is_some_and(|o| o.contains(gpa / o.host_page() * o.host_page()))
            });
            if let Some(first) = c.first {
                return Err(MigrateError::Verify {
                    verified: c.verified,
                    differ: c.differ,
                    first,
                });
            }
            Some(c)
        }
        None => None,
    };
    let digest = received.digest.take();
    let postcopy = received
        .postcopy
        .take()
        .map(|(owed, switch)| PostcopyIncoming {
            reader: r,
            owed,
            switch,
            digest,
        });
    Ok(Incoming {
        received,
        bytes,
        verified,
        connections: layout.connections,
        conn,
        postcopy,
    })
}

/// What [`receive_stream`] took off a stream: the state to restore and the RAM figures.
#[derive(Debug)]
pub struct ReceivedStream {
    /// Per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide state.
    pub vm: VmState,
    /// COM1's registers, when the source had one.
    pub serial: Option<SerialRegs>,
    /// The i8042's registers, when the source had one.
    pub i8042: Option<I8042State>,
    /// The virtio devices' states by slot ([`crate::virtio::TransportState`], encoded).
    pub virtio: std::collections::BTreeMap<u32, Vec<u8>>,
    /// Rounds seen.
    pub rounds: u32,
    /// Host pages placed whole through the pager.
    pub placed: u64,
    /// `Some` when the source switched to postcopy: the host pages it owes, and the drops.
    pub postcopy: Option<(PageSet, SwitchFigures)>,
    /// The source's digest of its RAM at the pause (`--migrate-verify`), complete.
    pub digest: Option<RamDigest>,
}

/// The body of [`receive`] over any reader and reply writer (no socket: the fuzz target and
/// tests drive it from a byte slice). `layout` is the header [`StreamReader::open`] returned;
/// `regions` are this VM's RAM regions as (gpa, len). Sends the destination-info, checks the
/// layout, and reads chunks into `mem` (through `pager` when given) until `End` or `Postcopy`.
pub fn receive_stream<R: Read, W: Write>(
    r: &mut StreamReader<R>,
    reply: &mut StreamWriter<W>,
    layout: &Layout,
    mem: &GuestMemoryMmap,
    vcpus: usize,
    ram_regions: &[(u64, u64)],
    pager: Option<&dyn RamPager>,
) -> Result<ReceivedStream, MigrateError> {
    let mut ram = RamReceiver::new(mem, pager).fresh();
    receive_chunks(r, reply, layout, &mut ram, vcpus, ram_regions, &mut |_| {
        Ok(())
    })
}

/// [`receive_stream`] into `ram` (fresh), calling `round_done` at the end of each round
/// before acknowledging it (with lanes: it waits for their share of the round).
fn receive_chunks<R: Read, W: Write>(
    r: &mut StreamReader<R>,
    reply: &mut StreamWriter<W>,
    layout: &Layout,
    ram: &mut RamReceiver<'_>,
    vcpus: usize,
    ram_regions: &[(u64, u64)],
    round_done: &mut dyn FnMut(u32) -> Result<(), MigrateError>,
) -> Result<ReceivedStream, MigrateError> {
    let (mem, pager) = (ram.mem(), ram.pager());
    let (host_page, flags) = match pager {
        Some(p) => (p.host_page(), DEST_DEMAND_PAGING),
        None => (PAGE_SIZE as u64, 0),
    };
    reply.dest_info(host_page, flags)?;
    Layout::new(vcpus as u32, ram_regions.iter().copied()).accept(layout)?;
    let mut states: Vec<Option<VcpuState>> = (0..vcpus).map(|_| None).collect();
    let mut vm = None;
    let mut serial = None;
    let mut i8042 = None;
    let mut virtio = std::collections::BTreeMap::new();
    let mut rounds = 0;
    let mut owed: Option<PageSet> = None;
    let mut digest: Option<RamDigest> = None;
    let mut switch = SwitchFigures::default();
    let switched = loop {
        let (offset, chunk) = r.position();
        let c = match r.next_chunk_into(ram)? {
            Received::PagesInPlace { .. } => continue,
            Received::Chunk(c) => c,
        };
        if ram.apply(&c)? {
            continue;
        }
        match c {
            Chunk::Round { round, dirty_pages } => {
                // Saturating: the last round a corrupt stream can name is u32::MAX.
                rounds = round.saturating_add(1);
                info!("incoming round {round}: {dirty_pages} pages");
                // Drops so far came with a round (a discard round), not with the switch.
                switch.early_drop_calls += std::mem::take(&mut switch.drop_calls);
                switch.early_drop_time += std::mem::take(&mut switch.drop_time);
                round_done(round)?;
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
            Chunk::Device { name, blob } if name.starts_with(DEVICE_VIRTIO_PREFIX) => {
                let slot = name[DEVICE_VIRTIO_PREFIX.len()..]
                    .parse::<u32>()
                    .map_err(|_| MigrateError::Refused(format!("a device state named {name:?}")))?;
                virtio.insert(slot, blob.to_vec());
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
                let set = owed.get_or_insert_with(|| PageSet::new(ram_regions, p.host_page()));
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
            Chunk::Digest { gpa, crcs } => digest
                .get_or_insert_with(|| RamDigest::empty(ram_regions))
                .set(gpa, digest_crcs(crcs))
                .map_err(|what| StreamError::Malformed {
                    chunk,
                    offset,
                    what,
                })?,
            Chunk::Postcopy => break true,
            Chunk::End => break false,
            other => {
                return Err(StreamError::Unexpected {
                    chunk,
                    offset,
                    found: chunk_name(&other),
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
    let postcopy = match (switched, pager) {
        (false, _) => None,
        (true, Some(p)) => Some((
            owed.unwrap_or_else(|| PageSet::new(ram_regions, p.host_page())),
            switch,
        )),
        (true, None) => {
            return Err(MigrateError::Refused(
                "the source switched to postcopy, which needs demand paging here: this \
                 destination runs with --no-demand-paging"
                    .into(),
            ))
        }
    };
    if digest.as_ref().is_some_and(|d| !d.complete()) {
        return Err(MigrateError::Missing(
            "part of the source's digest of its RAM".into(),
        ));
    }
    Ok(ReceivedStream {
        digest,
        vcpus,
        vm: vm.ok_or_else(|| MigrateError::Missing("the VM state (irqchip, PIT, clock)".into()))?,
        serial,
        i8042,
        virtio,
        rounds,
        placed: ram.placed,
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
    vm: &dyn VmOps,
    vcpus: &[Vcpu],
    caps: &VcpuCaps,
    serial: Option<&SerialDevice>,
) -> Result<(), MigrateError> {
    let got = &inc.received;
    restore_vm(vm, &got.vm)?;
    for (fd, st) in vcpus.iter().zip(&got.vcpus) {
        restore_vcpu(fd, st, caps)?;
    }
    match (&got.serial, serial) {
        (Some(regs), Some(dev)) => dev
            .restore(&regs.into())
            .map_err(|e| MigrateError::State(StateError::Serial(e)))?,
        (Some(_), None) => info!("the source's COM1 state is dropped: this VM has no COM1"),
        (None, _) => {}
    }
    Ok(())
}

/// Tells the source the guest runs here.
pub fn acknowledge(conn: Connection) -> Result<(), MigrateError> {
    let mut w = StreamWriter::headless(conn);
    w.guest_running()?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::state::SerialRegs;
    use vm_memory::{Bytes, GuestAddress};

    const REGIONS: [(u64, u64); 2] = [(0, 64 << 10), (1 << 20, 16 << 10)];

    fn mem() -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = REGIONS
            .iter()
            .map(|&(g, n)| (GuestAddress(g), n as usize))
            .collect();
        GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap()
    }

    fn vcpu_state(id: u32) -> VcpuState {
        VcpuState {
            id,
            cpuid: Vec::new(),
            regs: Default::default(),
            sregs: Default::default(),
            fpu: Default::default(),
            xsave: None,
            xcrs: None,
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: Vec::new(),
            events: Default::default(),
            mp_state: Default::default(),
        }
    }

    fn vm_state() -> VmState {
        VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        }
    }

    /// [`receive_stream`] of a whole stream in `bytes` into a fresh memory, the replies
    /// dropped, for a VM of `vcpus`.
    fn receive_bytes(bytes: &[u8], vcpus: usize) -> Result<ReceivedStream, MigrateError> {
        let (mut r, layout) = StreamReader::open(bytes)?;
        let mut replies = StreamWriter::headless(std::io::sink());
        receive_stream(&mut r, &mut replies, &layout, &mem(), vcpus, &REGIONS, None)
    }

    /// A whole stream from a byte slice: pages and zero runs land in memory, the state is
    /// decoded, each round is acknowledged; a postcopy switch without a pager is refused.
    #[test]
    fn receive_stream_reads_a_stream_from_bytes() {
        let layout = Layout::new(1, REGIONS);
        let mut w = StreamWriter::new(Vec::new(), &layout).unwrap();
        w.pages(0x1000, &[0xab; PAGE_SIZE]).unwrap();
        w.pages(0x2000, &[0xcd; PAGE_SIZE]).unwrap();
        w.pages((1 << 20) + 0x1000, &[0xef; PAGE_SIZE]).unwrap();
        w.round(0, 3).unwrap();
        w.zero_pages(0x2000, 1).unwrap();
        w.round(1, 1).unwrap();
        w.vcpu(0, &vcpu_state(0).encode().unwrap()).unwrap();
        w.device(DEVICE_KVM_VM, &vm_state().encode().unwrap())
            .unwrap();
        let serial = SerialRegs {
            scratch: 7,
            ..Default::default()
        };
        w.device(DEVICE_SERIAL, &serial.encode().unwrap()).unwrap();
        w.device("no-such-device", b"ignored").unwrap();
        let mut before_end = w.into_inner().unwrap();
        let mut w = StreamWriter::headless(Vec::new());
        w.end().unwrap();
        let end = w.into_inner().unwrap();
        let mut stream = before_end.clone();
        stream.extend_from_slice(&end);

        let m = mem();
        let (mut r, got_layout) = StreamReader::open(&stream[..]).unwrap();
        let mut reply = StreamWriter::headless(Vec::new());
        let got = receive_stream(&mut r, &mut reply, &got_layout, &m, 1, &REGIONS, None).unwrap();
        assert_eq!(got.rounds, 2);
        assert_eq!(got.vcpus, vec![vcpu_state(0)]);
        assert_eq!(got.serial, Some(serial));
        assert!(got.postcopy.is_none());
        assert_eq!(r.bytes_read(), stream.len() as u64);
        let byte = |gpa| m.read_obj::<u8>(GuestAddress(gpa)).unwrap();
        assert_eq!(
            (byte(0x1000), byte(0x2000), byte((1 << 20) + 0x1fff)),
            (0xab, 0, 0xef)
        );
        // The replies: destination-info, then one acknowledgement per round.
        let replies = reply.into_inner().unwrap();
        let mut back = StreamReader::headless(&replies[..]);
        assert!(matches!(
            back.next_chunk().unwrap(),
            Chunk::DestInfo { flags: 0, .. }
        ));
        back.expect_round_applied(0).unwrap();
        back.expect_round_applied(1).unwrap();

        // Another layout here: refused before any chunk is read.
        let e = receive_bytes(&stream, 2).unwrap_err();
        assert!(e.to_string().contains("vCPU"), "{e}");

        // The last round number there is (found by the migration_stream fuzz target: counting
        // the rounds overflowed).
        let mut w = StreamWriter::new(Vec::new(), &layout).unwrap();
        w.round(u32::MAX, 0).unwrap();
        w.vcpu(0, &vcpu_state(0).encode().unwrap()).unwrap();
        w.device(DEVICE_KVM_VM, &vm_state().encode().unwrap())
            .unwrap();
        w.end().unwrap();
        let last = w.into_inner().unwrap();
        let got = receive_bytes(&last, 1).unwrap();
        assert_eq!(got.rounds, u32::MAX);

        // A postcopy switch needs demand paging here.
        let mut w = StreamWriter::headless(Vec::new());
        w.postcopy().unwrap();
        before_end.extend_from_slice(&w.into_inner().unwrap());
        let e = receive_bytes(&before_end, 1).unwrap_err();
        assert!(matches!(e, MigrateError::Refused(_)), "{e}");
    }

    /// A stream spread over three connections (`--migrate-connections 3`), end to end over
    /// unix sockets: the lanes join, each round's shares land in memory, and a page one
    /// lane wrote in the full pass and the main connection zeroes in the next round reads
    /// zero (the connections' receivers share what was written).
    #[test]
    fn rounds_over_three_connections_land_whole() {
        use crate::dirty::{DirtyBitmap, SlotInfo};
        use crate::migrate::lanes::source::{RoundWork, SourceLanes};
        use crate::migrate::ram::RamSender;
        use crate::migrate::transport::Address;

        const RAM: [(u64, u64); 2] = [(0, 8 << 20), (16 << 20, 4 << 20)];
        let ranges: Vec<(GuestAddress, usize)> = RAM
            .iter()
            .map(|&(g, n)| (GuestAddress(g), n as usize))
            .collect();
        let src = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        let dst = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        // Data in every share of the full pass ([0, 4M), [4M, 16M), [16M, 20M)).
        let page = PAGE_SIZE as u64;
        let written = [
            0x1000u64,
            (4 << 20) + page,
            (16 << 20) + 3 * page,
            (19 << 20) + page,
        ];
        for (i, &gpa) in written.iter().enumerate() {
            src.write_slice(&[i as u8 + 1; PAGE_SIZE], GuestAddress(gpa))
                .unwrap();
        }
        // Sent by lane 1 in the full pass, zeroed by the main connection in round 1.
        let moved = (5 << 20) + page;
        src.write_slice(&[0x5a; PAGE_SIZE], GuestAddress(moved))
            .unwrap();

        let dir = std::env::temp_dir().join(format!("vmm-lanes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = Address::Unix(dir.join("mig.sock"));
        let listener = addr.listen().unwrap();
        let idle = Some(Duration::from_secs(10));
        let source = std::thread::scope(|s| {
            let source = s.spawn(|| {
                let token = crate::migrate::lanes::token().unwrap();
                let conn = addr.connect().unwrap();
                let mut back = StreamReader::headless(conn.try_clone().unwrap());
                let layout = Layout::new(1, RAM).with_lanes(3, token);
                let mut w = StreamWriter::new(conn, &layout).unwrap();
                let mut lanes = SourceLanes::open(&addr, 3, &token, idle, None).unwrap();
                let mut sender = RamSender::new();
                lanes
                    .send_round(
                        &mut w,
                        &mut sender,
                        &src,
                        None,
                        RoundWork::Full(&RAM),
                        0,
                        true,
                    )
                    .unwrap();
                w.round(0, 5 << 8).unwrap();
                w.flush().unwrap();
                back.expect_round_applied(0).unwrap();
                src.write_slice(&[0; PAGE_SIZE], GuestAddress(moved))
                    .unwrap();
                let slots: Vec<SlotInfo> = RAM
                    .iter()
                    .enumerate()
                    .map(|(i, &(gpa, len))| SlotInfo {
                        slot: i as u32,
                        gpa,
                        len,
                        host_addr: 0,
                    })
                    .collect();
                let mut bm = DirtyBitmap::empty(&slots);
                bm.set(moved);
                lanes
                    .send_round(
                        &mut w,
                        &mut sender,
                        &src,
                        None,
                        RoundWork::Dirty(&bm),
                        1,
                        true,
                    )
                    .unwrap();
                lanes.finish().unwrap();
                w.round(1, 1).unwrap();
                w.vcpu(0, &vcpu_state(0).encode().unwrap()).unwrap();
                w.device(DEVICE_KVM_VM, &vm_state().encode().unwrap())
                    .unwrap();
                w.end().unwrap();
                // As a source does, keep the connection until the destination has it all.
                back.expect_round_applied(1).unwrap();
                w.bytes_written() + lanes.bytes_written()
            });
            let pending = accept(&listener, idle, None).unwrap();
            assert_eq!(pending.lanes.len(), 2);
            let regions: Vec<RamRegion> = RAM
                .iter()
                .map(|&(gpa, len)| RamRegion {
                    gpa,
                    len,
                    host_addr: 0,
                })
                .collect();
            let got = receive(pending, &dst, 1, &regions, None).unwrap();
            assert_eq!(got.received.rounds, 2);
            let sent = source.join().unwrap();
            assert_eq!(got.bytes, sent, "every connection's bytes are counted");
            sent
        });
        assert!(source > 0);
        for &(gpa, len) in &RAM {
            let (mut a, mut b) = (vec![0u8; len as usize], vec![0u8; len as usize]);
            src.read_slice(&mut a, GuestAddress(gpa)).unwrap();
            dst.read_slice(&mut b, GuestAddress(gpa)).unwrap();
            assert!(a == b, "region {gpa:#x} differs");
        }
        assert_eq!(dst.read_obj::<u8>(GuestAddress(moved)).unwrap(), 0);
        assert_eq!(dst.read_obj::<u8>(GuestAddress(written[3])).unwrap(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
