//! `virtio_blk`: a split virtqueue laid out by the input in a small guest memory, drained by
//! the virtio-blk device's request server (`vmm::virtio::block::Server::process_queue`, the
//! code the device thread runs on a notification) against a 32 KiB disk image.
//!
//! Input: byte 0 holds flags (bit 0: the disk is read-only, bit 1: `VIRTIO_F_EVENT_IDX`
//! negotiated, bit 2: the ring addresses come from the input instead of the fixed ones);
//! bytes 1-2 the queue size the driver writes (little-endian; the queue refuses sizes that
//! are not a power of two up to 256 and keeps its maximum); with bit 2, bytes 3-14 the
//! descriptor table, available ring and used ring addresses (three little-endian u32). The
//! rest is copied to guest memory from address 0: the descriptors, the rings, request headers
//! and buffers, all of it chosen by the fuzzer.
//!
//! Guest memory is two regions with a hole between them, so that buffers can straddle the end
//! of RAM, lie in the hole or past the top. A finding is a panic, the disk changing size, or
//! a batch past its bound.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::OnceLock;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::virtio::block::{Disk, DiskConfig, Server, MAX_BATCH};
use vmm::virtio::Interrupt;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The guest's RAM: 64 KiB at 0, a 64 KiB hole, 4 KiB at 128 KiB.
pub const REGIONS: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1000)];
/// The disk's size.
pub const DISK_BYTES: u64 = 32 << 10;
/// Where the rings are without flag bit 2 (the sizes the largest queue needs fit between).
pub const DESC_TABLE: u64 = 0x0;
/// The available ring.
pub const AVAIL_RING: u64 = 0x1000;
/// The used ring.
pub const USED_RING: u64 = 0x1800;
/// The queue's maximum size (the device's).
pub const MAX_SIZE: u16 = 256;
/// Flag bits of byte 0.
pub const F_READONLY: u8 = 1;
/// `VIRTIO_F_EVENT_IDX`.
pub const F_EVENT_IDX: u8 = 2;
/// The ring addresses follow the queue size.
pub const F_ADDRESSES: u8 = 4;

/// The disk image's path: one per thread, in the temporary directory (the replay tests run
/// side by side in one process, and each run empties the image).
fn disk_path() -> PathBuf {
    thread_local! {
        static PATH: PathBuf = {
            // "ThreadId(N)": its number.
            let thread: String = format!("{:?}", std::thread::current().id())
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            std::env::temp_dir().join(format!(
                "vmm-fuzz-virtio-blk-{}-{thread}.img",
                std::process::id()
            ))
        };
    }
    PATH.with(|p| p.clone())
}

/// A fresh guest memory of [`REGIONS`], zeroed.
pub fn guest_memory() -> GuestMemoryMmap {
    let ranges: Vec<_> = REGIONS
        .iter()
        .map(|&(gpa, len)| (GuestAddress(gpa), len))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

/// The set-up the balloon and network targets share: from `data` (byte 0 flags, bytes 1-2 the
/// queue size, the rest guest memory from address 0), a fresh guest memory holding the image
/// and a queue of that size at the fixed ring addresses, with `VIRTIO_F_EVENT_IDX` as
/// `event_idx` says of the flags. `None` for an input too short or a queue the transport would
/// refuse. Returns the flags and the image too.
pub fn fixed_queue(
    data: &[u8],
    event_idx: impl Fn(u8) -> bool,
) -> Option<(u8, &[u8], GuestMemoryMmap, Queue)> {
    let (&flags, rest) = data.split_first()?;
    if rest.len() < 2 {
        return None;
    }
    let size = le16(rest);
    let image = &rest[2..];
    let mem = guest_memory();
    let n = image.len().min(REGIONS[0].1);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("the first region holds the input");
    let mut queue = Queue::new(MAX_SIZE).expect("a queue of 256");
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(event_idx(flags));
    queue.set_ready(true);
    // The transport refuses a driver's queue that is not valid (mmio.rs, on DRIVER_OK): the
    // device never sees one.
    if !queue.is_valid(&mem) {
        return None;
    }
    Some((flags, &image[..n], mem, queue))
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The target's body.
pub fn run(data: &[u8]) {
    let _ = drain(data);
}

/// Runs `data` as [`run`] does; the guest memory afterwards and the requests done, or `None`
/// for an input too short to set up a queue or one whose queue the transport would refuse.
pub fn drain(data: &[u8]) -> Option<(GuestMemoryMmap, usize)> {
    let data = crate::capped(data);
    let (&flags, rest) = data.split_first()?;
    if rest.len() < 2 {
        return None;
    }
    let size = le16(rest);
    let mut rest = &rest[2..];
    let (desc, avail, used) = if flags & F_ADDRESSES != 0 {
        if rest.len() < 12 {
            return None;
        }
        let a = (le32(rest), le32(&rest[4..]), le32(&rest[8..]));
        rest = &rest[12..];
        a
    } else {
        (DESC_TABLE as u32, AVAIL_RING as u32, USED_RING as u32)
    };

    let mem = guest_memory();
    let n = rest.len().min(REGIONS[0].1);
    mem.write_slice(&rest[..n], GuestAddress(0))
        .expect("the first region holds the input");

    // The same disk every run: zeroed and of the same size (a run must not see the last one's
    // writes, or the fuzzer's stability suffers).
    let path = &disk_path();
    {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .expect("disk image");
        f.set_len(DISK_BYTES).expect("disk size");
    }
    let disk = Disk::open(&DiskConfig {
        path: path.clone(),
        readonly: flags & F_READONLY != 0,
        direct: false,
    })
    .expect("open the disk image");
    let mut server = Server::new(disk);

    let mut queue = Queue::new(MAX_SIZE).expect("a queue of 256");
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc), Some(0));
    queue.set_avail_ring_address(Some(avail), Some(0));
    queue.set_used_ring_address(Some(used), Some(0));
    queue.set_event_idx(flags & F_EVENT_IDX != 0);
    queue.set_ready(true);
    // The transport refuses a driver's queue that is not valid (mmio.rs, on DRIVER_OK): the
    // device never sees one.
    if !queue.is_valid(&mem) {
        return None;
    }

    static IRQ: OnceLock<Interrupt> = OnceLock::new();
    let interrupt =
        IRQ.get_or_init(|| Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    // One call serves at most a batch, and says whether requests were left.
    let (done, more) = server.process_queue(&mem, &mut queue, interrupt);
    let _ = interrupt.irqfd().read();
    assert!(done <= MAX_BATCH, "{done} requests in one batch");
    assert!(!more || done == MAX_BATCH, "a batch of {done} ended early");
    let len = std::fs::metadata(path).expect("disk metadata").len();
    assert_eq!(len, DISK_BYTES, "the device changed the disk's size");
    Some((mem, done))
}

/// Descriptor flag: the chain goes on at `next`.
pub const D_NEXT: u16 = 1;
/// Descriptor flag: the device writes the buffer.
pub const D_WRITE: u16 = 2;
/// Request types (virtio 1.2 §5.2.6).
pub const T_IN: u32 = 0;
/// A write to the disk.
pub const T_OUT: u32 = 1;
/// A flush.
pub const T_FLUSH: u32 = 4;
/// The device's id string.
pub const T_GET_ID: u32 = 8;

/// An input with the fixed ring addresses: a guest memory image in which `descs` (address,
/// length, flags, next) fill the descriptor table, `heads` are offered in the available ring,
/// and `bytes` are written at their addresses (headers, data). Cut after the last byte set.
pub struct Input {
    flags: u8,
    size: u16,
    image: Vec<u8>,
}

impl Input {
    /// An empty ring of `size` descriptors.
    pub fn new(flags: u8, size: u16) -> Input {
        Input {
            flags,
            size,
            image: Vec::new(),
        }
    }

    /// Writes `bytes` at guest address `gpa` (in the first region).
    pub fn put(&mut self, gpa: u64, bytes: &[u8]) -> &mut Input {
        let end = gpa as usize + bytes.len();
        assert!(end <= REGIONS[0].1, "seed bytes past the first region");
        if self.image.len() < end {
            self.image.resize(end, 0);
        }
        self.image[gpa as usize..end].copy_from_slice(bytes);
        self
    }

    /// Descriptor `i`.
    pub fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> &mut Input {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.put(DESC_TABLE + 16 * u64::from(i), &d)
    }

    /// A request header (type, sector) at `gpa`.
    pub fn header(&mut self, gpa: u64, kind: u32, sector: u64) -> &mut Input {
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.put(gpa, &h)
    }

    /// Offers the chains starting at `heads` in the available ring.
    pub fn offer(&mut self, heads: &[u16]) -> &mut Input {
        let mut ring = Vec::new();
        ring.extend_from_slice(&0u16.to_le_bytes());
        ring.extend_from_slice(&(heads.len() as u16).to_le_bytes());
        for h in heads {
            ring.extend_from_slice(&h.to_le_bytes());
        }
        self.put(AVAIL_RING, &ring)
    }

    /// The fuzz input.
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = vec![self.flags & !F_ADDRESSES];
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.image);
        v
    }
}
