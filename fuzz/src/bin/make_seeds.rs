//! Writes the seed corpora under `corpus/<target>/` (run from `fuzz/`): valid inputs of every
//! kind each target reads, made by this crate's image builders, vmm's own stream writer and
//! the compressors the kernel's Makefile uses (gzip, bzip2, lzma, xz, lzop, lz4, zstd; a
//! missing tool's seeds are skipped with a note).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use vmm::migrate::state::{SerialRegs, VcpuState, VmState};
use vmm::migrate::{Layout, StreamWriter, DEVICE_I8042, DEVICE_KVM_VM, DEVICE_SERIAL};
use vmm_fuzz::images::{fake_bzimage, fake_elf};
use vmm_fuzz::migration_stream::REGIONS;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn with_flag(flag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![flag];
    v.extend_from_slice(bytes);
    v
}

/// `tool args` over `input`, or `None` when the tool is not installed.
fn run_tool(tool: &str, args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
    let mut child = match Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => {
            eprintln!("skipping the {tool} seeds: {tool} is not installed");
            return None;
        }
    };
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{tool} failed");
    Some(out.stdout)
}

fn kernel_seeds() {
    let vmlinux = fake_elf(&[0x90; 64]);
    write("kernel_image", "elf", &with_flag(0, &vmlinux));
    write(
        "kernel_image",
        "bzimage-unknown-payload",
        &with_flag(0, &fake_bzimage(b"\x01\x02\x03\x04 not compressed")),
    );
    write(
        "kernel_image",
        "initrd",
        &with_flag(2, b"070701000000000000000000TRAILER!!!"),
    );
    let tools: [(&str, &str, &[&str]); 7] = [
        ("gzip", "gzip", &["-n", "-9", "-c"]),
        ("bzip2", "bzip2", &["-9", "-c"]),
        ("lzma", "lzma", &["-9", "-c"]),
        (
            "xz",
            "xz",
            &["--check=crc32", "--x86", "--lzma2=dict=1MiB", "-c"],
        ),
        ("lzo", "lzop", &["-9", "-c"]),
        ("lz4", "lz4", &["-l", "-9", "-c"]),
        ("zstd", "zstd", &["-19", "-c", "-q"]),
    ];
    for (name, tool, args) in tools {
        let Some(mut payload) = run_tool(tool, args, &vmlinux) else {
            continue;
        };
        // scripts/Makefile.lib appends the size to every payload but gzip's (gzip's own
        // trailer ends with it).
        if name != "gzip" {
            payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        }
        write(
            "kernel_image",
            &format!("bzimage-{name}"),
            &with_flag(1, &fake_bzimage(&payload)),
        );
        write(
            "kernel_image",
            &format!("payload-{name}"),
            &with_flag(3, &payload),
        );
    }
}

fn vcpu_state(id: u32) -> VcpuState {
    VcpuState {
        id,
        cpuid: vec![Default::default()],
        regs: Default::default(),
        sregs: Default::default(),
        fpu: Default::default(),
        xsave: Some(vec![0; 4]),
        xcrs: Some(Default::default()),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: vec![kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 1,
            ..Default::default()
        }],
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

/// A source's stream: header, RAM rounds, the state of `vcpus` vCPUs and the devices, then
/// `End` or (with `postcopy`) a discard round, the switch and one owed page.
fn stream(vcpus: u32, postcopy: bool) -> Vec<u8> {
    stream_with(vcpus, postcopy, true)
}

/// [`stream`], with page data (`data`) or zero runs only.
fn stream_with(vcpus: u32, postcopy: bool, data: bool) -> Vec<u8> {
    let layout = Layout::new(vcpus, REGIONS).with_spec(br#"{"mem":"320K","vcpus":1}"#.to_vec());
    let mut w = StreamWriter::new(Vec::new(), &layout).unwrap();
    let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    if data {
        w.pages(0x1000, &page).unwrap();
        w.ram(0x4000, &[page.as_slice(), &[0; 4096], &page].concat())
            .unwrap();
    }
    w.zero_pages(0x10000, 4).unwrap();
    if data {
        w.pages((1 << 20) + 0x2000, &page).unwrap();
    }
    w.round(0, 5).unwrap();
    if data {
        w.pages(0x1000, &[7; 4096]).unwrap();
    }
    w.zero_pages(0x4000, 1).unwrap();
    w.round(1, 2).unwrap();
    if postcopy {
        w.discard(&[(0x1000, 1), (0x4000, 2)]).unwrap();
        w.round(2, 0).unwrap();
    }
    for id in 0..vcpus {
        w.vcpu(id, &vcpu_state(id).encode().unwrap()).unwrap();
    }
    w.device(DEVICE_KVM_VM, &vm_state().encode().unwrap())
        .unwrap();
    let serial = SerialRegs {
        line_control: 3,
        in_buffer: b"ab".to_vec(),
        ..Default::default()
    };
    w.device(DEVICE_SERIAL, &serial.encode().unwrap()).unwrap();
    // I8042State in postcard: ctr, output Some((0xfa, false)), last_read, pending None,
    // last_write_command false.
    w.device(DEVICE_I8042, &[0x47, 1, 0xfa, 0, 0, 0, 0])
        .unwrap();
    w.device("virtio-something", b"unknown state").unwrap();
    if postcopy {
        w.discard(&[(0x8000, 1)]).unwrap();
        w.postcopy().unwrap();
        w.pages(0x8000, &page).unwrap();
    }
    w.end().unwrap();
    w.into_inner().unwrap()
}

fn migration_seeds() {
    write(
        "migration_stream",
        "precopy",
        &with_flag(0, &stream(1, false)),
    );
    write(
        "migration_stream",
        "small",
        &with_flag(0, &stream_with(1, false, false)),
    );
    write(
        "migration_stream",
        "precopy-2vcpus",
        &with_flag(4, &stream(2, false)),
    );
    write(
        "migration_stream",
        "precopy-pager",
        &with_flag(2, &stream(1, false)),
    );
    write(
        "migration_stream",
        "postcopy-pager",
        &with_flag(3, &stream(1, true)),
    );
    // A lane: its start, a round's pages and zero pages, the round's end, the end.
    let mut w = StreamWriter::lane(Vec::new(), &[7; 16], 2).unwrap();
    w.pages(0x2000, &[0x5a; 8192]).unwrap();
    w.zero_pages(0x10_0000, 3).unwrap();
    w.lane_end(0).unwrap();
    w.pages(0x3000, &[0xa5; 4096]).unwrap();
    w.lane_end(1).unwrap();
    w.end().unwrap();
    write(
        "migration_stream",
        "lane",
        &with_flag(16, &w.into_inner().unwrap()),
    );
    let mut w = StreamWriter::headless(Vec::new());
    w.dest_info(4096, 1).unwrap();
    w.round_applied(0).unwrap();
    w.page_request(0x3000, 2).unwrap();
    w.all_received().unwrap();
    w.guest_running().unwrap();
    write(
        "migration_stream",
        "replies",
        &with_flag(8, &w.into_inner().unwrap()),
    );
}

fn control_seeds() {
    let lines: [(&str, &str); 14] = [
        ("stats", r#"{"cmd":"stats"}"#),
        ("info", r#"{"cmd":"info"}"#),
        ("pause", r#"{"cmd":"pause"}"#),
        ("resume", "{\"cmd\":\"resume\"}\n"),
        ("shutdown", r#"{"cmd":"shutdown"}"#),
        (
            "reclaim-strings",
            r#"{"cmd":"reclaim","gpa":"1G","len":"0x40000000"}"#,
        ),
        (
            "reclaim-numbers",
            r#"{"cmd":"reclaim","gpa":1073741824,"len":4096}"#,
        ),
        (
            "reclaim-suffixes",
            r#"{"cmd":"reclaim","gpa":"512M","len":"4k"}"#,
        ),
        ("migrate", r#"{"cmd":"migrate","to":"tcp:127.0.0.1:4444"}"#),
        (
            "migrate-postcopy",
            r#"{"cmd":"migrate","to":"unix:/tmp/m.sock","postcopy_after":2}"#,
        ),
        (
            "unknown",
            r#"{"cmd":"frobnicate","x":[1,2.5,null,true,{"y":"\u00e9"}]}"#,
        ),
        ("size-hex", "0xfffffffffffff"),
        ("size-tera", "16T"),
        ("not-object", "[\"cmd\",\"stats\"]"),
    ];
    for (name, line) in lines {
        write("control_socket", name, line.as_bytes());
    }
}

fn stage2_seeds() {
    // Format byte, then (opcode, operands) as `stage2_ops::decode` reads them.
    let seqs: [(&str, Vec<u8>); 5] = [
        // Faults (read, write, exec) across the four regions.
        (
            "faults-ept",
            vec![0, 3, 0, 0, 4, 40, 1, 5, 70, 2, 6, 100, 1, 7, 1, 1],
        ),
        // Map 4K/2M/1G with both output addresses, then fault and invalidate.
        (
            "map-invalidate-arm64",
            vec![
                1, 0, 3, 0x08, 1, 40, 0x0d, 2, 70, 0x26, 3, 3, 1, 11, 0, 0x40, 0, 12, 64, 1, 0,
            ],
        ),
        // Dirty logging: enable eager, write faults, harvest, disable.
        (
            "dirty-eager-ept",
            vec![
                0, 4, 40, 1, 5, 64, 1, 15, 1, 6, 41, 1, 7, 65, 1, 17, 1, 18, 2, 16, 3, 40, 1,
            ],
        ),
        // Lazy dirty logging over 2M leaves, split, collapse.
        (
            "dirty-lazy-split-collapse-bbm2",
            vec![
                2, 4, 33, 1, 15, 0, 5, 34, 1, 17, 1, 16, 13, 36, 0, 14, 1, 3, 33, 0,
            ],
        ),
        // Absent maps over present leaves.
        (
            "map-absent-ept",
            vec![0, 0, 5, 0x28, 0, 5, 0x28, 1, 6, 0x29, 3, 5, 1],
        ),
    ];
    for (name, bytes) in seqs {
        write("stage2_ops", name, &bytes);
    }
}

/// Requests of every type the device serves, several in one ring, and the bad chains it must
/// answer with an error status: see `tests/replay.rs` for what each must give.
fn virtio_blk_seeds() {
    use vmm_fuzz::virtio_blk::{
        Input, D_NEXT, D_WRITE, F_ADDRESSES, F_EVENT_IDX, F_READONLY, T_FLUSH, T_GET_ID, T_IN,
        T_OUT,
    };
    // Past the rings of the largest queue (the used ring of 256 ends at 0x2006).
    const HDR: u64 = 0x2800;
    const STATUS: u64 = 0x2c00;
    const DATA: u64 = 0x3000;
    // header, one data buffer, status: a chain at descriptors 3i..3i+2.
    fn request(inp: &mut Input, i: u16, kind: u32, sector: u64, len: u32, write: bool) {
        let at = u64::from(i);
        inp.header(HDR + 16 * at, kind, sector);
        inp.desc(3 * i, HDR + 16 * at, 16, D_NEXT, 3 * i + 1);
        let dflags = if write { D_WRITE } else { 0 };
        inp.desc(
            3 * i + 1,
            DATA + 0x1000 * at,
            len,
            D_NEXT | dflags,
            3 * i + 2,
        );
        inp.desc(3 * i + 2, STATUS + at, 1, D_WRITE, 0);
        inp.put(STATUS + at, &[0xee]);
    }
    let mut read = Input::new(0, 16);
    request(&mut read, 0, T_IN, 0, 512, true);
    write("virtio_blk", "read", &read.offer(&[0]).bytes());

    let mut w = Input::new(0, 16);
    request(&mut w, 0, T_OUT, 1, 1024, false);
    w.put(DATA, &[0x5a; 1024]);
    write("virtio_blk", "write", &w.offer(&[0]).bytes());

    let mut flush = Input::new(0, 16);
    flush.header(HDR, T_FLUSH, 0);
    flush.desc(0, HDR, 16, D_NEXT, 1);
    flush.desc(1, STATUS, 1, D_WRITE, 0);
    flush.put(STATUS, &[0xee]);
    write("virtio_blk", "flush", &flush.offer(&[0]).bytes());

    let mut id = Input::new(0, 16);
    request(&mut id, 0, T_GET_ID, 0, 20, true);
    write("virtio_blk", "get-id", &id.offer(&[0]).bytes());

    // Write, read it back, flush; with event index on.
    let mut three = Input::new(F_EVENT_IDX, 16);
    request(&mut three, 0, T_OUT, 2, 512, false);
    request(&mut three, 1, T_IN, 2, 512, true);
    request(&mut three, 2, T_FLUSH, 0, 0, true);
    three.put(DATA, &[0xa5; 512]);
    write(
        "virtio_blk",
        "write-read-flush-event-idx",
        &three.offer(&[0, 3, 6]).bytes(),
    );

    let mut ro = Input::new(F_READONLY, 16);
    request(&mut ro, 0, T_OUT, 0, 512, false);
    write("virtio_blk", "write-readonly", &ro.offer(&[0]).bytes());

    // Past the disk's end (64 sectors).
    let mut past = Input::new(0, 16);
    request(&mut past, 0, T_IN, 63, 1024, true);
    write("virtio_blk", "read-past-end", &past.offer(&[0]).bytes());

    // Descriptor 1 leads back to 0: the chain ends at the queue's size.
    let mut lp = Input::new(0, 4);
    lp.header(HDR, T_IN, 0);
    lp.desc(0, HDR, 16, D_NEXT, 1);
    lp.desc(1, DATA, 512, D_NEXT | D_WRITE, 0);
    write("virtio_blk", "loop", &lp.offer(&[0]).bytes());

    // A data buffer in the hole between the regions, one straddling the end of the first.
    let mut hole = Input::new(0, 16);
    request(&mut hole, 0, T_IN, 0, 512, true);
    request(&mut hole, 1, T_IN, 0, 1024, true);
    hole.desc(1, 0x1_8000, 512, D_NEXT | D_WRITE, 2);
    hole.desc(4, 0xfe00, 1024, D_NEXT | D_WRITE, 5);
    write(
        "virtio_blk",
        "buffers-outside-ram",
        &hole.offer(&[0, 3]).bytes(),
    );

    // The ring addresses from the input: the same read with the rings moved.
    let mut moved = read.bytes();
    moved[0] |= F_ADDRESSES;
    let addrs: Vec<u8> = [0u32, 0x1000, 0x1800]
        .iter()
        .flat_map(|a| a.to_le_bytes())
        .collect();
    moved.splice(3..3, addrs);
    write("virtio_blk", "read-addresses", &moved);
}

/// A buffer of each balloon queue: page numbers to inflate and deflate, a statistics buffer,
/// free page reports; on 4 KiB and 2 MiB backing.
fn virtio_balloon_seeds() {
    use vmm_fuzz::virtio_balloon::{F_EVENT_IDX, F_HUGE};
    use vmm_fuzz::virtio_blk::{Input, D_NEXT, D_WRITE};
    const BUF: u64 = 0x3000;
    let pfns: Vec<u8> = [0x100u32, 0x101, 0x102, 0x200, 0x5000, 0xffff_ffff]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    for (name, flags) in [("inflate", 0), ("deflate", 1), ("inflate-huge", F_HUGE)] {
        let mut inp = Input::new(flags, 16);
        inp.put(BUF, &pfns);
        inp.desc(0, BUF, pfns.len() as u32, 0, 0);
        write("virtio_balloon", name, &inp.offer(&[0]).bytes());
    }
    let mut stats = Vec::new();
    for (tag, v) in [
        (4u16, 100u64 << 20),
        (5, 256 << 20),
        (6, 120 << 20),
        (99, 1),
    ] {
        stats.extend_from_slice(&tag.to_le_bytes());
        stats.extend_from_slice(&v.to_le_bytes());
    }
    let mut st = Input::new(2 | F_EVENT_IDX, 16);
    st.put(BUF, &stats);
    st.desc(0, BUF, stats.len() as u32, 0, 0);
    write("virtio_balloon", "stats", &st.offer(&[0]).bytes());
    // Two reports in one chain: 2 MiB at 2 MiB, 4 MiB at 8 MiB (outside this small RAM: the
    // device drops by address, as the guest names it), and one near 2^64.
    for (name, flags) in [("report", 3), ("report-huge", 3 | F_HUGE)] {
        let mut r = Input::new(flags, 16);
        r.desc(0, 0x20_0000, 2 << 20, D_NEXT | D_WRITE, 1);
        r.desc(1, 0x80_0000, 4 << 20, D_NEXT | D_WRITE, 2);
        r.desc(2, u64::MAX - 0xfff, 0x1000, D_WRITE, 0);
        write("virtio_balloon", name, &r.offer(&[0]).bytes());
    }
}

/// Frames to send and buffers to receive in, good and bad (see `vmm_fuzz::virtio_net`).
fn virtio_net_seeds() {
    use vmm_fuzz::virtio_blk::{Input, D_NEXT, D_WRITE};
    use vmm_fuzz::virtio_net::{F_EVENT_IDX, F_RX};
    const BUF: u64 = 0x3000;
    let hdr = [0u8; 12];
    let frame: Vec<u8> = (0..60u8).collect();
    // One frame in one buffer; one over two buffers (the header apart).
    let mut tx = Input::new(0, 16);
    tx.put(BUF, &hdr).put(BUF + 12, &frame);
    tx.desc(0, BUF, 72, 0, 0);
    tx.desc(1, BUF, 12, D_NEXT, 2);
    tx.desc(2, BUF + 12, 60, 0, 0);
    write("virtio_net", "tx", &tx.offer(&[0, 1]).bytes());
    // A device-writable buffer, a runt, a buffer in the hole.
    let mut bad = Input::new(F_EVENT_IDX, 16);
    bad.put(BUF, &hdr).put(BUF + 12, &frame);
    bad.desc(0, BUF, 72, D_WRITE, 0);
    bad.desc(1, BUF, 20, 0, 0);
    bad.desc(2, 0x1_8000, 72, 0, 0);
    write("virtio_net", "tx-bad", &bad.offer(&[0, 1, 2]).bytes());
    // Buffers for the frames: three of 2 KiB (the 9000-byte frame is too long for one), one
    // of 9 KiB as a header buffer and a frame buffer.
    let mut rx = Input::new(F_RX, 16);
    for k in 0..3u16 {
        rx.desc(k, BUF + 0x800 * u64::from(k), 2048, D_WRITE, 0);
    }
    rx.desc(3, BUF + 0x2000, 12, D_WRITE | D_NEXT, 4);
    rx.desc(4, BUF + 0x3000, 9000, D_WRITE, 0);
    rx.put(BUF + 0x5400, &[0]);
    write("virtio_net", "rx", &rx.offer(&[0, 1, 2, 3]).bytes());
    // A readable buffer, one running off the first region into the hole, then a good one.
    let mut rbad = Input::new(F_RX | F_EVENT_IDX, 16);
    rbad.desc(0, BUF, 2048, 0, 0);
    rbad.desc(1, 0xff00, 2048, D_WRITE, 0);
    rbad.desc(2, BUF + 0x1000, 9100, D_WRITE, 0);
    rbad.put(BUF + 0x1000 + 9100, &[0]);
    write("virtio_net", "rx-bad", &rbad.offer(&[0, 1, 2]).bytes());
}

fn main() {
    kernel_seeds();
    migration_seeds();
    control_seeds();
    stage2_seeds();
    virtio_blk_seeds();
    virtio_balloon_seeds();
    virtio_net_seeds();
}
