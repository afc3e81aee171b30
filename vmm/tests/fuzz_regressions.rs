//! Inputs that the fuzz targets under `fuzz/` found to crash vmm, kept as files under
//! `tests/data/fuzz/` (named `<target>-<what>`, byte for byte what the fuzzer saved, except
//! that `migration_stream` inputs were moved to each new stream version by
//! `fuzz/upgrade-stream-inputs`) and fed through the calls that target makes: each must now
//! be refused cleanly.

use std::path::Path;
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::boot::{BootError, KernelImage};
use vmm::migrate::destination::{receive_stream, ReceivedStream};
use vmm::migrate::ram::RamPager;
use vmm::migrate::stream::{FRAME_OVERHEAD, MAX_PAYLOAD, PAGE_SIZE};
use vmm::migrate::{MigrateError, StreamError, StreamReader, StreamWriter};

/// A saved fuzz input.
fn input(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `kernel_image`, mode 1 (byte 0: a kernel, fast path): a bzImage whose `pref_address` is 2^64 - 1. Its end
/// saturates at 2^64 - 1, and the initrd fit check rounded that up to a page: an overflow
/// panic with overflow checks, and without them an end of 0 under which any initrd "fit".
#[test]
fn kernel_image_initrd_fit_overflow() {
    let data = input("kernel_image-initrd-fit-overflow");
    assert_eq!(data[0] % 4, 1, "kernel mode, fast path");
    let img = KernelImage::parse(Path::new("fuzz"), data[1..].to_vec()).unwrap();
    assert_eq!(img.required_end(), u64::MAX);
    for mem in [1 << 20, 64 << 20, 3 << 30, 1 << 40, u64::MAX] {
        let e = img.check_fits(mem).unwrap_err();
        assert!(matches!(e, BootError::KernelBeyondLowRam { .. }), "{e}");
        for size in [1, 1 << 20, 2 << 30, u64::MAX] {
            let e = img.check_initrd_fits(mem, size).unwrap_err();
            assert!(matches!(e, BootError::InitrdTooBig { .. }), "{e}");
            let _ = e.to_string();
        }
    }
}

/// The `migration_stream` target's guest RAM: 256 KiB at 0 and 64 KiB at 1 MiB.
const REGIONS: [(u64, u64); 2] = [(0, 256 << 10), (1 << 20, 64 << 10)];

/// What the `migration_stream` target does with flag bit 0: a good CRC on every whole frame
/// after the magic and version.
fn fix_crcs(bytes: &mut [u8]) {
    let mut at = 12;
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

/// A demand pager over plain memory that holds vmm to its contract: whole 4 KiB pages only.
struct StrictPager {
    mem: GuestMemoryMmap,
    placed: Mutex<Vec<u64>>,
}

impl RamPager for StrictPager {
    fn host_page(&self) -> u64 {
        PAGE_SIZE as u64
    }
    fn is_populated(&self, gpa: u64) -> bool {
        self.placed.lock().unwrap().contains(&(gpa / 4096 * 4096))
    }
    fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, String> {
        assert_eq!(gpa % 4096, 0, "a partial page placed at {gpa:#x}");
        assert_eq!(
            data.len() % 4096,
            0,
            "a partial page of {} bytes",
            data.len()
        );
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
        let mut placed = self.placed.lock().unwrap();
        placed.extend((gpa..gpa + data.len() as u64).step_by(4096));
        Ok(true)
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
}

/// Runs a saved `migration_stream` input (flag byte, then the stream) as that target does
/// (bit 0: fix the CRCs; bit 1: a pager; bit 2: two vCPUs) and returns the receiver's result.
fn receive_saved(name: &str) -> Result<ReceivedStream, MigrateError> {
    let data = input(name);
    let flags = data[0];
    let mut bytes = data[1..].to_vec();
    if flags & 1 != 0 {
        fix_crcs(&mut bytes);
    }
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(g, n)| (GuestAddress(g), n as usize))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
    let pager = StrictPager {
        mem: mem.clone(),
        placed: Mutex::new(Vec::new()),
    };
    let pager = (flags & 2 != 0).then_some(&pager as &dyn RamPager);
    let vcpus = if flags & 4 != 0 { 2 } else { 1 };
    let (mut r, layout) = StreamReader::open(&bytes[..])?;
    let mut reply = StreamWriter::headless(std::io::sink());
    receive_stream(&mut r, &mut reply, &layout, &mem, vcpus, &REGIONS, pager)
}

/// `migration_stream`, through a pager: a pages chunk at gpa 0x64. The reader took any
/// address, and the receiver handed the pager a "page" at 0x64; now the chunk is malformed.
#[test]
fn migration_stream_unaligned_pages_pager() {
    let e = receive_saved("migration_stream-unaligned-pages-pager").unwrap_err();
    assert!(
        matches!(e, MigrateError::Stream(StreamError::Malformed { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("unaligned"), "{e}");
}

/// `migration_stream`: a header whose region lengths add up past 2^64. Summing them for
/// the layout-mismatch message overflowed (a panic with overflow checks, a wrong size in the
/// message without).
#[test]
fn migration_stream_layout_ram_overflow() {
    let e = receive_saved("migration_stream-layout-ram-overflow").unwrap_err();
    assert!(
        matches!(e, MigrateError::Stream(StreamError::RamMismatch { .. })),
        "{e}"
    );
    // The source's RAM is the saturated sum (without overflow checks it had wrapped).
    let source_ram = format!("source guest RAM is {} (", vmm::memory::human(u64::MAX));
    assert!(e.to_string().contains(&source_ram), "{e}");
}

/// `migration_stream`, through a pager: a round chunk numbered u32::MAX, then (chunk 8) pages
/// at an unaligned address. Counting the rounds (`round + 1`) overflowed at the round: a
/// panic with overflow checks (this suite's test profile), a count of 0 without (the unit
/// test `migrate::destination::tests::receive_stream_reads_a_stream_from_bytes` checks the
/// count in every profile). Now the round passes and the pages chunk is refused.
#[test]
fn migration_stream_round_count_overflow() {
    let e = receive_saved("migration_stream-round-count-overflow").unwrap_err();
    assert!(
        matches!(
            e,
            MigrateError::Stream(StreamError::Malformed { chunk: 8, .. })
        ),
        "{e}"
    );
}

/// `virtio_blk`: a ring whose available index is more than a ring ahead of the device. The
/// queue refuses to pop from it while `enable_notification` keeps saying more is offered, and
/// the request server looked at it again for ever: a guest could hold its device thread (and
/// every reset or shutdown waiting on it) in a spin. Now the server gives up on the ring.
/// Set up as the target does: byte 0 flags (all set here: a read-only disk, event index, ring
/// addresses from the input), bytes 1-2 the queue size, bytes 3-14 the descriptor table,
/// available and used ring addresses (0x2800, 0, 0x10: the used ring inside the available
/// one), then guest memory from 0. Run on a thread so that a regression fails, not hangs.
#[test]
fn virtio_blk_available_index_past_the_ring() {
    use virtio_queue::{Queue, QueueT};
    use vmm::virtio::block::{Disk, DiskConfig, Server};
    use vmm::virtio::Interrupt;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let data = input("virtio_blk-available-index-past-the-ring");
    let (flags, size) = (data[0], u16::from_le_bytes([data[1], data[2]]));
    assert_eq!(flags & 4, 4, "ring addresses in the input");
    let addr = |i: usize| u32::from_le_bytes(data[3 + 4 * i..7 + 4 * i].try_into().unwrap());
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x2_0000), 0x1000),
    ])
    .unwrap();
    let image = &data[15..];
    mem.write_slice(&image[..image.len().min(0x1_0000)], GuestAddress(0))
        .unwrap();
    let disk_path = std::env::temp_dir().join(format!("fuzz-reg-vblk-{}.img", std::process::id()));
    std::fs::File::create(&disk_path)
        .unwrap()
        .set_len(32 << 10)
        .unwrap();
    let mut server = Server::new(
        Disk::open(&DiskConfig {
            path: disk_path.clone(),
            readonly: flags & 1 != 0,
            direct: false,
        })
        .unwrap(),
    );
    let mut queue = Queue::new(256).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(addr(0)), Some(0));
    queue.set_avail_ring_address(Some(addr(1)), Some(0));
    queue.set_used_ring_address(Some(addr(2)), Some(0));
    queue.set_event_idx(flags & 2 != 0);
    queue.set_ready(true);
    assert!(
        queue.is_valid(&mem),
        "the transport would have taken this queue"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let _ = tx.send(server.process_queue(&mem, &mut queue, &irq));
    });
    let res = rx.recv_timeout(std::time::Duration::from_secs(20));
    let _ = std::fs::remove_file(&disk_path);
    let (_done, more) = res.expect("the server still spins on the ring");
    assert!(!more);
}
