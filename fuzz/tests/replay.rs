//! Replays every committed corpus file, and every input under `regressions/` (what the
//! fuzzer once found: crashes since fixed in vmm, and stage2_ops inputs that once took the
//! target most of a second), through its target's body (no AFL needed: plain `cargo test`);
//! and checks that the seeds are the valid inputs they claim to be, so the fuzzer starts from
//! the parsers' success paths.

use std::path::{Path, PathBuf};

use vmm::boot::{self, BootPath, KernelImage};
use vmm::memory::{BackingKind, GuestRam};
use vmm::migrate::destination::receive_stream;
use vmm::migrate::ram::RamPager;
use vmm::migrate::{StreamReader, StreamWriter};
use vmm_fuzz::migration_stream::{guest_memory, FakePager, REGIONS};

fn files(target: &str) -> Vec<PathBuf> {
    files_in("corpus", target)
}

fn files_in(top: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(top).join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn replay(target: &str, run: fn(&[u8])) {
    replay_files(files(target), run);
}

fn replay_files(files: Vec<PathBuf>, run: fn(&[u8])) {
    for f in files {
        let data = std::fs::read(&f).unwrap();
        eprintln!("{}", f.display());
        run(&data);
    }
}

#[test]
fn regressions_replay() {
    replay_files(
        files_in("regressions", "kernel_image"),
        vmm_fuzz::kernel_image::run,
    );
    replay_files(
        files_in("regressions", "migration_stream"),
        vmm_fuzz::migration_stream::run,
    );
    replay_files(
        files_in("regressions", "stage2_ops"),
        vmm_fuzz::stage2_ops::run,
    );
    replay_files(
        files_in("regressions", "virtio_blk"),
        vmm_fuzz::virtio_blk::run,
    );
}

#[test]
fn corpus_kernel_image() {
    replay("kernel_image", vmm_fuzz::kernel_image::run);
}

#[test]
fn corpus_migration_stream() {
    replay("migration_stream", vmm_fuzz::migration_stream::run);
}

#[test]
fn corpus_control_socket() {
    replay("control_socket", vmm_fuzz::control_socket::run);
}

#[test]
fn corpus_virtio_blk() {
    replay("virtio_blk", vmm_fuzz::virtio_blk::run);
}

/// Each virtio_blk seed gives the statuses its name says: the fuzzer starts from requests the
/// device carries out and from bad chains it answers with an error, never from inputs it drops.
#[test]
fn virtio_blk_seeds_give_their_statuses() {
    use vm_memory::{Bytes, GuestAddress};
    const OK: u8 = 0;
    const IOERR: u8 = 1;
    // (seed, requests done, status byte of each request at 0x2c00 + i)
    let want: [(&str, usize, &[u8]); 10] = [
        ("read", 1, &[OK]),
        ("write", 1, &[OK]),
        ("flush", 1, &[OK]),
        ("get-id", 1, &[OK]),
        ("write-read-flush-event-idx", 3, &[OK, OK, OK]),
        ("write-readonly", 1, &[IOERR]),
        ("read-past-end", 1, &[IOERR]),
        // The chain is cut at the queue's size and has no status descriptor: nothing is
        // written, and the request still completes (used length 0).
        ("loop", 1, &[]),
        ("buffers-outside-ram", 2, &[IOERR, IOERR]),
        ("read-addresses", 1, &[OK]),
    ];
    for (name, n, statuses) in want {
        let (mem, done) = vmm_fuzz::virtio_blk::drain(&seed("virtio_blk", name))
            .unwrap_or_else(|| panic!("{name}: the queue was refused"));
        assert_eq!(done, n, "{name}: requests done");
        for (i, &st) in statuses.iter().enumerate() {
            let got: u8 = mem.read_obj(GuestAddress(0x2c00 + i as u64)).unwrap();
            assert_eq!(got, st, "{name}: status of request {i}");
        }
    }
    // The read-back request of the three (its buffer at 0x4000) saw the write's bytes.
    let (mem, _) =
        vmm_fuzz::virtio_blk::drain(&seed("virtio_blk", "write-read-flush-event-idx")).unwrap();
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
    assert_eq!(back, [0xa5; 512]);
}

#[test]
fn corpus_virtio_net() {
    replay("virtio_net", vmm_fuzz::virtio_net::run);
}

/// Each virtio_net seed moves the frames its name says: the fuzzer starts from frames the
/// device sends and receives and from bad chains it drops.
#[test]
fn virtio_net_seeds_move_their_frames() {
    let run = |name: &str| {
        vmm_fuzz::virtio_net::serve(&seed("virtio_net", name))
            .unwrap_or_else(|| panic!("{name}: the queue was refused"))
    };
    let (frames, c) = run("tx");
    let want: Vec<u8> = (0..60u8).collect();
    assert_eq!(frames, vec![want.clone(), want], "tx");
    assert_eq!((c.tx_frames, c.tx_dropped), (2, 0), "tx");
    let (frames, c) = run("tx-bad");
    assert!(frames.is_empty(), "tx-bad: {frames:?}");
    assert_eq!(c.tx_dropped, 3, "tx-bad");
    // The runt never reaches a buffer; 60 and 1514 bytes fit 2 KiB buffers, 9000 does not fit
    // the third, which goes back empty (the 9 KiB one waits for a next frame).
    let (_, c) = run("rx");
    assert_eq!((c.rx_frames, c.rx_dropped), (2, 2), "rx: {c:?}");
    // The runt, then 60 and 1514 bytes on the bad buffers; 9000 on the good one.
    let (_, c) = run("rx-bad");
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 3), "rx-bad: {c:?}");
}

#[test]
fn corpus_virtio_balloon() {
    replay("virtio_balloon", vmm_fuzz::virtio_balloon::run);
}

/// Each virtio_balloon seed reaches the drop path as its name says (or, for deflate and the
/// statistics, does not).
#[test]
fn virtio_balloon_seeds_drop_what_they_name() {
    let drops = |name: &str| {
        vmm_fuzz::virtio_balloon::serve(&seed("virtio_balloon", name))
            .unwrap_or_else(|| panic!("{name}: the queue was refused"))
    };
    let (d, info) = drops("inflate");
    assert_eq!(
        d,
        vec![
            (0x10_0000, 0x3000),
            (0x20_0000, 0x1000),
            (0x500_0000, 0x1000),
            (0xfff_ffff_f000, 0x1000)
        ]
    );
    assert_eq!(info["inflated_pages"].as_u64(), Some(6), "{info}");
    assert_eq!(drops("deflate").0, vec![]);
    // 12 KiB and single pages hold no whole 2 MiB page.
    assert_eq!(drops("inflate-huge").0, vec![]);
    for name in ["report", "report-huge"] {
        // The range ending at 2^64 is dropped by nobody.
        assert_eq!(
            drops(name).0,
            vec![(0x20_0000, 2 << 20), (0x80_0000, 4 << 20)],
            "{name}"
        );
    }
    let (d, info) = drops("stats");
    assert_eq!(d, vec![]);
    assert_eq!(info["stats"]["free_memory"], 100u64 << 20, "{info}");
    assert_eq!(info["stats"]["tag_99"], 1, "{info}");
}

#[test]
fn corpus_stage2_ops() {
    replay("stage2_ops", vmm_fuzz::stage2_ops::run);
}

/// Each compressed bzImage seed takes the fast path: its payload decompresses on the host
/// and the vmlinux inside is entered directly.
#[test]
fn kernel_seeds_load() {
    let ram = GuestRam::new(64 << 20, BackingKind::Small).unwrap();
    let mut fast = 0;
    for f in files("kernel_image") {
        let name = f.file_name().unwrap().to_str().unwrap().to_owned();
        let data = std::fs::read(&f).unwrap();
        if !(name.starts_with("bzimage") || name == "elf") {
            continue;
        }
        let mut img = KernelImage::parse(&f, data[1..].to_vec()).unwrap();
        img.decompress_on_host().unwrap();
        let spec = boot::BootSpec {
            kernel: &img,
            initrd: None,
            cmdline: "console=ttyS0",
            acpi_rsdp: None,
        };
        let l = boot::load(&ram, &spec).unwrap();
        match name.as_str() {
            "elf" => assert_eq!(l.path, BootPath::Elf),
            "bzimage-unknown-payload" => assert_eq!(l.path, BootPath::InGuestDecompressor),
            _ => {
                assert!(matches!(l.path, BootPath::HostDecompressed(_)), "{name}");
                fast += 1;
            }
        }
    }
    assert_eq!(fast, 7, "one seed per compression");
}

/// The stream seeds are whole migrations a destination accepts.
#[test]
fn migration_seeds_are_received() {
    for (name, vcpus, pager, postcopy) in [
        ("precopy", 1, false, false),
        ("precopy-2vcpus", 2, false, false),
        ("precopy-pager", 1, true, false),
        ("postcopy-pager", 1, true, true),
        ("small", 1, false, false),
    ] {
        let data = seed("migration_stream", name);
        let mem = guest_memory();
        let fake = FakePager::new(&mem);
        let pager = pager.then_some(&fake as &dyn RamPager);
        let (mut r, layout) = StreamReader::open(&data[1..]).unwrap();
        let got = receive_stream(
            &mut r,
            &mut StreamWriter::headless(std::io::sink()),
            &layout,
            &mem,
            vcpus,
            &REGIONS,
            pager,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.vcpus.len(), vcpus);
        assert_eq!(got.postcopy.is_some(), postcopy);
        assert!(got.serial.is_some() && got.i8042.is_some(), "{name}");
    }
}

/// The control-socket seeds that are requests succeed against the do-nothing VM.
#[test]
fn control_seeds_succeed() {
    use vmm::api::handle_line;
    use vmm_fuzz::control_socket::NullVm;
    for name in [
        "stats",
        "info",
        "pause",
        "reclaim-strings",
        "reclaim-numbers",
        "reclaim-suffixes",
        "migrate",
        "migrate-postcopy",
    ] {
        let v = handle_line(&seed("control_socket", name), &NullVm);
        assert_eq!(v["ok"], true, "{name}: {v}");
    }
}
