//! `migration_stream`: bytes as an incoming migration stream, read the way a destination reads
//! one (magic, version, header, then RAM, vCPU and device chunks into a small guest memory,
//! through `vmm::migrate::destination::receive_stream`), plus the same bytes as the bare chunks
//! a source reads back. No KVM, no socket.
//!
//! The first byte holds flags: bit 0 rewrites every frame's CRC-32 before reading (so the
//! fuzzer gets past the checksum to the payload parsers), bit 1 receives through a fake
//! demand pager (postcopy discards need one), bit 2 expects two vCPUs instead of one, bit 3
//! reads the bytes as the destination's replies instead, bit 4 as a further connection of a
//! migration (`--migrate-connections`: its start, then its rounds' pages, as a lane thread
//! receives them).

use std::collections::BTreeSet;
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::migrate::destination::receive_stream;
use vmm::migrate::ram::{RamPager, RamReceiver};
use vmm::migrate::stream::{Received, FRAME_OVERHEAD, MAX_PAYLOAD, PAGE_SIZE};
use vmm::migrate::{Chunk, StreamReader, StreamWriter};

/// The destination's RAM: 256 KiB at 0 and 64 KiB at 1 MiB (a hole between them).
pub const REGIONS: [(u64, u64); 2] = [(0, 256 << 10), (1 << 20, 64 << 10)];
/// Bytes before the first frame: magic and version.
const PREAMBLE: usize = 12;
/// Most chunks read after the destination's loop ends, or from a headless reader.
const MAX_TRAILING_CHUNKS: usize = 64;

/// The destination's guest memory, new for every run (its contents steer the receiver).
pub fn guest_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(gpa, len)| (GuestAddress(gpa), len as usize))
        .collect();
    GuestMemoryMmap::<()>::from_ranges(&ranges).expect("small guest memory")
}

/// A demand pager over the same memory: places write the page, drops forget it.
#[derive(Debug)]
pub struct FakePager {
    mem: GuestMemoryMmap,
    present: Mutex<BTreeSet<u64>>,
}

impl FakePager {
    /// A pager over `mem` with no page present yet.
    pub fn new(mem: &GuestMemoryMmap) -> FakePager {
        FakePager {
            mem: mem.clone(),
            present: Mutex::new(BTreeSet::new()),
        }
    }
}

impl RamPager for FakePager {
    fn host_page(&self) -> u64 {
        PAGE_SIZE as u64
    }
    fn is_populated(&self, gpa: u64) -> bool {
        self.present
            .lock()
            .unwrap()
            .contains(&(gpa & !(PAGE_SIZE as u64 - 1)))
    }
    fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, String> {
        assert_eq!(
            gpa % PAGE_SIZE as u64,
            0,
            "place of a partial page at {gpa:#x}"
        );
        assert_eq!(data.len() % PAGE_SIZE, 0, "place of {} bytes", data.len());
        let mut present = self.present.lock().unwrap();
        if present.contains(&gpa) {
            return Ok(false);
        }
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| format!("place at {gpa:#x}: {e}"))?;
        for p in (gpa..gpa + data.len() as u64).step_by(PAGE_SIZE) {
            present.insert(p);
        }
        Ok(true)
    }
    fn discard(&self, gpa: u64, len: u64) -> Result<(), String> {
        let mut present = self.present.lock().unwrap();
        let end = gpa.checked_add(len).ok_or("discard range wraps")?;
        let gone: Vec<u64> = present.range(gpa..end).copied().collect();
        for p in gone {
            present.remove(&p);
        }
        Ok(())
    }
}

/// Rewrites the CRC of every whole frame after the preamble, so the payloads get parsed.
pub fn fix_crcs(bytes: &mut [u8]) {
    let mut at = PREAMBLE;
    while at + FRAME_OVERHEAD <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if len > MAX_PAYLOAD || at + FRAME_OVERHEAD + len > bytes.len() {
            return;
        }
        let body = at + 8 + len;
        let crc = crc32fast::hash(&bytes[at..body]);
        bytes[body..body + 4].copy_from_slice(&crc.to_le_bytes());
        at = body + 4;
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&flags, rest)) = crate::capped(data).split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if flags & 1 != 0 {
        fix_crcs(&mut bytes);
    }
    if flags & 8 != 0 {
        replies(&bytes);
        return;
    }
    let mem = guest_memory();
    let pager = FakePager::new(&mem);
    let pager = (flags & 2 != 0).then_some(&pager as &dyn RamPager);
    if flags & 16 != 0 {
        lane(&bytes, &mem, pager);
        return;
    }
    let vcpus = if flags & 4 != 0 { 2 } else { 1 };
    let (mut r, layout) = match StreamReader::open(&bytes[..]) {
        Ok(opened) => opened,
        Err(e) => {
            // Error messages name offsets and sizes from the input: format them too.
            let _ = e.to_string();
            return;
        }
    };
    let mut reply = StreamWriter::headless(Vec::new());
    let got = receive_stream(&mut r, &mut reply, &layout, &mem, vcpus, &REGIONS, pager);
    assert!(r.bytes_read() <= bytes.len() as u64);
    match got {
        Ok(got) => {
            assert_eq!(got.vcpus.len(), vcpus);
            assert!(
                got.postcopy.is_none() || pager.is_some(),
                "postcopy without a pager"
            );
            // After End or the postcopy switch, the rest as plain chunks (postcopy pages).
            for _ in 0..MAX_TRAILING_CHUNKS {
                if let Err(e) = r.next_chunk() {
                    let _ = e.to_string();
                    break;
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // What the destination said back is a stream of its own that reads back.
    let said = reply.into_inner().expect("a Vec takes every write");
    let mut back = StreamReader::headless(&said[..]);
    while back.bytes_read() < said.len() as u64 {
        back.next_chunk()
            .expect("the destination's own replies parse");
    }
}

/// The bytes as what a source reads back from its destination.
fn replies(bytes: &[u8]) {
    let mut r = StreamReader::headless(bytes);
    if let Err(e) = r.expect_round_applied(0) {
        let _ = e.to_string();
    }
    for _ in 0..MAX_TRAILING_CHUNKS {
        if let Err(e) = r.next_chunk() {
            let _ = e.to_string();
            break;
        }
    }
    if let Err(e) = StreamReader::headless(bytes).expect_guest_running() {
        let _ = e.to_string();
    }
}

/// The bytes as a lane: lane magic, version and lane chunk (`StreamReader::open_lane`), then
/// pages, zero pages, lane-ends and the end into `mem`, the way
/// `migrate::lanes::destination` reads one (a `RamReceiver`, pages landing in place).
fn lane(bytes: &[u8], mem: &GuestMemoryMmap, pager: Option<&dyn RamPager>) {
    let (mut r, _token, _index) = match StreamReader::open_lane(bytes) {
        Ok(opened) => opened,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let mut ram = RamReceiver::new(mem, pager);
    for _ in 0..MAX_TRAILING_CHUNKS {
        let chunk = match r.next_chunk_into(&mut ram) {
            Ok(Received::PagesInPlace { .. }) => continue,
            Ok(Received::Chunk(c)) => c,
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        };
        if let Err(e) = ram.apply(&chunk) {
            let _ = e.to_string();
            return;
        }
        if chunk == Chunk::End {
            return;
        }
    }
    assert!(r.bytes_read() <= bytes.len() as u64);
}
