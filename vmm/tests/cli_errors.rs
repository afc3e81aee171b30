//! Bad input to the `vmm` binary: every case is one line `error: ...` naming the cause and the
//! fix, exit code 1, no panic and no backtrace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmm::boot::decompress::Compression;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(VMM)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run vmm")
}

/// How long refusing a bad kernel or initrd may take (README "Bad kernels and initrds").
const REFUSED_WITHIN: Duration = Duration::from_secs(1);
/// A run still going after this is killed, so a hang fails the test instead of stalling it.
const HANG: Duration = Duration::from_secs(20);

/// Runs `vmm args` (killed after [`HANG`]) and returns its output and how long it ran.
fn run_timed(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = Command::new(VMM)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmm");
    while child.try_wait().expect("wait for vmm").is_none() {
        if started.elapsed() > HANG {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    (child.wait_with_output().expect("vmm output"), elapsed)
}

/// Runs `vmm args`, asserts it failed as [`expect_error`] checks within [`REFUSED_WITHIN`], and
/// returns the message.
fn expect_refused_fast(args: &[&str], fragments: &[&str]) -> String {
    let (out, elapsed) = run_timed(args);
    assert!(
        elapsed < REFUSED_WITHIN,
        "vmm {args:?} took {elapsed:.2?}; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    expect_error(&out, fragments)
}

/// Asserts the failure shape and that the message contains every fragment; returns the message.
fn expect_error(out: &Output, fragments: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with('[')).collect();
    assert_eq!(out.status.code(), Some(1), "exit code 1; stderr:\n{stderr}");
    assert_eq!(lines.len(), 1, "exactly one error line; stderr:\n{stderr}");
    let msg = lines[0];
    assert!(msg.starts_with("error: "), "{msg}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    for f in fragments {
        assert!(msg.contains(f), "message lacks {f:?}: {msg}");
    }
    msg.to_string()
}

const SECTOR: usize = 512;

/// A bzImage-shaped file: protocol 2.15, 64-bit, 1 setup sector, `syssize` paragraphs promised,
/// loaded high at 1 MiB, an 8-byte payload at the start of the code, `pref_address` 16 MiB and
/// `init_size` 32 MiB.
fn bzimage(syssize: u32, body: usize) -> Vec<u8> {
    let mut b = vec![0u8; 2 * SECTOR + body];
    b[0x1f1] = 1;
    b[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    b[0x260..0x264].copy_from_slice(&0x200_0000u32.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    set_u32(&mut b, 0x214, 0x10_0000); // code32_start
    set_u32(&mut b, PAYLOAD_LENGTH, 8);
    b
}

/// Setup-header fields the header tests change (boot.rst, "The Real-Mode Kernel Header").
const SETUP_SECTS: usize = 0x1f1;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;

fn set_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// [`bzimage`] whose code is exactly `payload` (padded to a 16-byte paragraph).
fn bzimage_with_payload(payload: &[u8]) -> Vec<u8> {
    let mut b = bzimage(payload.len().div_ceil(16) as u32, 0);
    b.extend_from_slice(payload);
    b.resize(2 * SECTOR + payload.len().next_multiple_of(16), 0);
    set_u32(&mut b, PAYLOAD_LENGTH, payload.len() as u32);
    b
}

/// A minimal x86-64 ELF executable: one 16-byte segment at 16 MiB.
fn elf() -> Vec<u8> {
    let mut b = vec![0u8; 0x40 + 0x38 + 16];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
    b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
    b[0x18..0x20].copy_from_slice(&0x100_0000u64.to_le_bytes());
    b[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
    b[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
    b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    let ph = 0x40;
    b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    for (off, v) in [
        (0x08, 0x78u64),
        (0x10, 0x100_0000),
        (0x18, 0x100_0000),
        (0x20, 16),
        (0x28, 0x1000),
    ] {
        b[ph + off..ph + off + 8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn missing_kernel_file() {
    let out = run(&["--kernel", "/nonexistent/bzImage"]);
    let msg = expect_error(&out, &["/nonexistent/bzImage", "No such file", "--kernel"]);
    assert_eq!(
        msg.matches("No such file").count(),
        1,
        "the cause is not repeated: {msg}"
    );
}

/// `path` (not a regular file, `kind` in words) is refused fast as a kernel and as an initrd,
/// without being read or opened for long.
fn assert_not_regular_refused(path: &str, kind: &str) {
    let d = tmpdir("kernel-for-initrd");
    let k = write(&d, "vmlinux", &elf());
    expect_refused_fast(
        &["--kernel", path],
        &[
            "cannot read kernel",
            path,
            kind,
            "not a regular file",
            "give --kernel",
        ],
    );
    expect_refused_fast(
        &["--kernel", &k, "--initrd", path, "--mem", "64M"],
        &[
            "cannot read initrd",
            path,
            kind,
            "not a regular file",
            "give --initrd",
        ],
    );
}

#[test]
fn directory_as_kernel_or_initrd() {
    let d = tmpdir("dir");
    assert_not_regular_refused(d.to_str().unwrap(), "a directory");
}

/// /dev/zero never ends: read whole, it would take all memory.
#[test]
fn character_device_as_kernel_or_initrd() {
    assert_not_regular_refused("/dev/zero", "a character device");
}

#[test]
fn block_device_as_kernel_or_initrd() {
    let found = std::fs::read_dir("/dev").unwrap().flatten().find(|e| {
        e.file_type()
            .is_ok_and(|t| std::os::unix::fs::FileTypeExt::is_block_device(&t))
    });
    let Some(dev) = found else {
        eprintln!("skipped: no block device in /dev here");
        return;
    };
    assert_not_regular_refused(dev.path().to_str().unwrap(), "a block device");
}

/// Opening a FIFO for reading waits for a writer; reading it waits for data.
#[test]
fn fifo_as_kernel_or_initrd() {
    let d = tmpdir("fifo");
    let fifo = d.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert_not_regular_refused(fifo.to_str().unwrap(), "a FIFO");
}

#[test]
fn socket_as_kernel_or_initrd() {
    let d = tmpdir("socket");
    let sock = d.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert_not_regular_refused(sock.to_str().unwrap(), "a socket");
}

/// A kernel file over 1 GiB is refused from its size, before a byte is read.
#[test]
fn kernel_larger_than_any_kernel() {
    let d = tmpdir("hugekernel");
    let k = d.join("vmlinuz");
    std::fs::File::create(&k)
        .unwrap()
        .set_len((1 << 30) + 1)
        .unwrap();
    expect_refused_fast(
        &["--kernel", k.to_str().unwrap()],
        &[
            "1073741825 bytes",
            "more than the 1G accepted",
            "give --kernel",
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// An initrd that no --mem could place (it must end below 2 GiB for this kernel) is refused
/// from its size, before a byte is read.
#[test]
fn initrd_larger_than_any_guest() {
    let d = tmpdir("hugeinitrd");
    let k = write(&d, "vmlinux", &elf());
    let initrd = d.join("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    expect_refused_fast(
        &[
            "--kernel",
            &k,
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem",
            "4G",
        ],
        &[
            "more than any guest can hold",
            "whatever --mem is",
            "0x80000000",
            "give --initrd a smaller initramfs",
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn empty_initrd() {
    let d = tmpdir("emptyinitrd");
    let k = write(&d, "vmlinux", &elf());
    let initrd = write(&d, "initrd", b"");
    expect_refused_fast(
        &["--kernel", &k, "--initrd", &initrd, "--mem", "64M"],
        &["initrd", "is empty", "--initrd"],
    );
}

#[test]
fn no_kernel_at_all() {
    expect_error(&run(&[]), &["--kernel"]);
}

#[test]
fn empty_kernel() {
    let d = tmpdir("empty");
    let k = write(&d, "empty", b"");
    expect_error(&run(&["--kernel", &k]), &["is empty", "bzImage"]);
}

#[test]
fn truncated_bzimage() {
    let d = tmpdir("trunc");
    // The header promises 4096 paragraphs (64 KiB) of protected-mode code; 100 bytes follow.
    let k = write(&d, "bz", &bzimage(4096, 100));
    expect_error(&run(&["--kernel", &k]), &["truncated", "promises"]);
    let short = write(&d, "short", &bzimage(1, 0)[..0x210]);
    expect_error(&run(&["--kernel", &short]), &["truncated"]);
}

/// `setup_sects` says the kernel code starts beyond the end of the file.
#[test]
fn setup_sects_beyond_the_file() {
    let d = tmpdir("sects");
    let mut b = bzimage(1, 16);
    b[SETUP_SECTS] = 200;
    let k = write(&d, "bz", &b);
    expect_refused_fast(&["--kernel", &k], &["truncated", "promises 102928"]);
}

#[test]
fn payload_length_zero() {
    let d = tmpdir("nopayload");
    let mut b = bzimage(1, 16);
    set_u32(&mut b, PAYLOAD_LENGTH, 0);
    let k = write(&d, "bz", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &[
            "not a usable bzImage",
            "payload_length is 0",
            "copy or build it again",
        ],
    );
}

/// `payload_offset`/`payload_length` point past the code (and the file).
#[test]
fn payload_beyond_the_file() {
    let d = tmpdir("farpayload");
    let mut b = bzimage(1, 16);
    set_u32(&mut b, PAYLOAD_OFFSET, 0x10_0000);
    let k = write(&d, "bz", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &[
            "payload_offset 0x100000",
            "beyond the kernel code",
            "copy or build it again",
        ],
    );
    let mut b = bzimage(1, 16);
    set_u32(&mut b, PAYLOAD_LENGTH, u32::MAX);
    let k = write(&d, "bz2", &b);
    expect_refused_fast(&["--kernel", &k], &["payload_length 0xffffffff"]);
}

#[test]
fn init_size_smaller_than_the_code() {
    let d = tmpdir("initsize");
    let mut b = bzimage(1, 16);
    set_u32(&mut b, INIT_SIZE, 4);
    let k = write(&d, "bz", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &["init_size", "less than its own 0x10 bytes"],
    );
}

/// What the in-guest path's loader needs: a bzImage (not a zImage) whose code goes at 1 MiB or
/// above, with a 64-bit entry (protocol 2.12+, XLF_KERNEL_64).
#[test]
fn zimage_low_code32_start_or_no_64bit_entry() {
    let d = tmpdir("zimage");
    let mut b = bzimage(1, 16);
    b[0x211] = 0;
    let k = write(&d, "zimage", &b);
    expect_refused_fast(&["--kernel", &k], &["LOADED_HIGH clear", "zImage"]);
    let mut b = bzimage(1, 16);
    set_u32(&mut b, 0x214, 0x1_0000);
    let k = write(&d, "low", &b);
    expect_refused_fast(&["--kernel", &k], &["at 0x10000 (code32_start)"]);
    let mut b = bzimage(1, 16);
    b[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
    let k = write(&d, "old", &b);
    expect_refused_fast(&["--kernel", &k], &["boot protocol 2.06", "2.12 or later"]);
    let mut b = bzimage(1, 16);
    b[0x236] = 0;
    let k = write(&d, "32bit", &b);
    expect_refused_fast(&["--kernel", &k], &["XLF_KERNEL_64 is clear"]);
}

/// A `pref_address` no guest has RAM at: no --mem is suggested, since none would do.
#[test]
fn kernel_beyond_any_guest_ram() {
    let d = tmpdir("prefaddr");
    let mut b = bzimage(1, 16);
    b[PREF_ADDRESS..PREF_ADDRESS + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let k = write(&d, "bz", &b);
    let msg = expect_refused_fast(
        &["--kernel", &k, "--mem", "4G"],
        &[
            "beyond the 3 GiB below the PCI hole",
            "pref_address",
            "give --kernel",
        ],
    );
    assert!(!msg.contains("use --mem"), "{msg}");
}

/// A payload that opens with the magic of a compression the host knows but does not decompress
/// is an error before any VM exists, for every such compression (it used to boot through the
/// in-guest decompressor, which prints "Decoding failed -- System halted" and stops).
#[test]
fn known_compression_that_does_not_decompress() {
    let d = tmpdir("corrupt");
    for c in Compression::ALL {
        // The magic, 256 pseudo-random bytes, a 4 KiB size trailer.
        let mut payload = c.magic().to_vec();
        let mut x = 0x1234_5678u32;
        for _ in 0..256 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            payload.push((x >> 16) as u8);
        }
        payload.extend_from_slice(&4096u32.to_le_bytes());
        let k = write(&d, c.name(), &bzimage_with_payload(&payload));
        expect_refused_fast(
            &["--kernel", &k, "--mem", "64M"],
            &[
                &format!("kernel {k}: the bzImage's {c} payload is corrupt"),
                "fetch the kernel again",
            ],
        );
    }
}

/// A real gzip stream of a vmlinux, cut in the middle.
#[test]
fn truncated_gzip_payload() {
    use std::io::Write;
    let d = tmpdir("cutgzip");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut vmlinux = elf();
    vmlinux.resize(64 << 10, 0x90);
    gz.write_all(&vmlinux).unwrap();
    let payload = gz.finish().unwrap();
    let k = write(
        &d,
        "bz",
        &bzimage_with_payload(&payload[..payload.len() / 2]),
    );
    expect_refused_fast(
        &["--kernel", &k, "--mem", "64M"],
        &["gzip payload is corrupt", "fetch the kernel again"],
    );
}

/// A vmlinux whose program headers or segment lie beyond the file.
#[test]
fn elf_offsets_beyond_the_file() {
    let d = tmpdir("badelf");
    let mut b = elf();
    b[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes()); // e_phoff
    let k = write(&d, "phoff", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &[
            "not a bootable x86-64 vmlinux",
            "program headers run past the end",
            "give --kernel",
        ],
    );
    let mut b = elf();
    b[0x40 + 0x20..0x40 + 0x28].copy_from_slice(&(1u64 << 20).to_le_bytes()); // p_filesz
    let k = write(&d, "filesz", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &["segment 0 ends at file offset", "beyond the file"],
    );
}

/// A gzip payload that decompresses, but not to an ELF file.
#[test]
fn payload_that_is_not_a_vmlinux() {
    use std::io::Write;
    let d = tmpdir("notelf");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&b"not a kernel\n".repeat(100)).unwrap();
    let k = write(&d, "bz", &bzimage_with_payload(&gz.finish().unwrap()));
    expect_refused_fast(
        &["--kernel", &k, "--mem", "64M"],
        &[
            "gzip payload decompressed to data that is not an ELF file",
            "build or fetch",
        ],
    );
}

#[test]
fn wrong_boot_protocol_magic() {
    let d = tmpdir("magic");
    let mut b = bzimage(1, 16);
    b[0x202..0x206].copy_from_slice(b"XXXX");
    let k = write(&d, "bz", &b);
    expect_error(&run(&["--kernel", &k]), &["HdrS", "not a Linux bzImage"]);
}

#[test]
fn neither_bzimage_nor_elf() {
    let d = tmpdir("text");
    let k = write(&d, "script", b"#!/bin/sh\necho hello\n");
    expect_error(
        &run(&["--kernel", &k]),
        &["neither a bzImage nor an ELF", "--kernel"],
    );
}

#[test]
fn kernel_does_not_fit_in_mem() {
    let d = tmpdir("fit");
    let k = write(&d, "bz", &bzimage(1, 16));
    // pref_address 16 MiB + init_size 32 MiB = 48 MiB needed.
    expect_error(
        &run(&["--kernel", &k, "--mem", "16M"]),
        &["--mem 48M or more"],
    );
}

#[test]
fn initrd_does_not_fit_in_mem() {
    let d = tmpdir("initrd");
    let k = write(&d, "vmlinux", &elf());
    let initrd = d.join("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    expect_refused_fast(
        &[
            "--kernel",
            &k,
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem",
            "32M",
        ],
        &["initrd", "does not fit", "--mem"],
    );
}

#[test]
fn missing_initrd() {
    let d = tmpdir("noinitrd");
    let k = write(&d, "vmlinux", &elf());
    expect_error(
        &run(&["--kernel", &k, "--initrd", "/nonexistent/initrd"]),
        &["cannot read initrd", "--initrd"],
    );
}

#[test]
fn bad_mem_values() {
    expect_error(
        &run(&["--kernel", "k", "--mem", "0"]),
        &["--mem", "cannot be 0"],
    );
    expect_error(
        &run(&["--kernel", "k", "--mem", "1K"]),
        &["--mem", "minimum"],
    );
    expect_error(
        &run(&["--kernel", "k", "--mem", "4X"]),
        &["--mem", "unknown size suffix 'X'", "K, M or G"],
    );
    let d = tmpdir("bigmem");
    let k = write(&d, "vmlinux", &elf());
    expect_error(
        &run(&["--kernel", &k, "--mem", "64T"]),
        &["more than this host", "lower --mem"],
    );
}

#[test]
fn bad_cpu_counts() {
    expect_error(
        &run(&["--kernel", "k", "--cpus", "0"]),
        &["--cpus", "at least one vCPU"],
    );
    expect_error(
        &run(&["--kernel", "k", "--cpus", "255"]),
        &["--cpus", "maximum of 254"],
    );
    expect_error(
        &run(&["--kernel", "k", "--cpus", "two"]),
        &["--cpus", "not a number"],
    );
}

#[test]
fn no_dev_kvm() {
    if !is_root() || Command::new("unshare").arg("--version").output().is_err() {
        eprintln!(
            "skipped: needs root and unshare(1) to hide /dev/kvm in a private mount namespace"
        );
        return;
    }
    let d = tmpdir("nokvm");
    let k = write(&d, "vmlinux", &elf());
    // A private mount namespace with an empty /dev: /dev/kvm is gone for this process only.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {VMM} --kernel {k} --mem 64M"
        ))
        .output()
        .unwrap();
    if String::from_utf8_lossy(&out.stderr).contains("unshare failed") {
        eprintln!("skipped: cannot create a mount namespace here");
        return;
    }
    expect_error(&out, &["/dev/kvm does not exist", "modprobe"]);
}

#[test]
fn no_permission_on_dev_kvm() {
    if !is_root() || !kvm_usable() {
        eprintln!("skipped: needs root (to drop to an unprivileged user) and /dev/kvm");
        return;
    }
    let mode = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    if mode.map(|m| m & 0o006 != 0).unwrap_or(true) {
        eprintln!(
            "skipped: /dev/kvm is open to every user here, so no permission error can happen"
        );
        return;
    }
    let d = tmpdir("perm");
    let k = write(&d, "vmlinux", &elf());
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            VMM,
            "--kernel",
            &k,
            "--mem",
            "64M",
        ])
        .output()
        .unwrap();
    expect_error(&out, &["/dev/kvm", "permission denied", "kvm", "chmod"]);
}

#[test]
fn huge_pages_not_available() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not available (the pool is checked after KVM is opened)");
        return;
    }
    let d = tmpdir("huge");
    let k = write(&d, "vmlinux", &elf());
    // 20 GiB of 1 GiB pages: more than any pool a test host keeps (this one has 2).
    let out = run(&["--kernel", &k, "--mem", "20G", "--hugepages", "1G"]);
    let msg = expect_error(&out, &["1G hugetlbfs"]);
    assert!(
        msg.contains("/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")
            || msg.contains("not available on this host"),
        "names the knob: {msg}"
    );
    if msg.contains("short by") {
        assert!(msg.contains("needs 20 free pages"), "{msg}");
    }
}

#[test]
fn help_lists_every_flag_and_exits_zero() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--mem",
        "--cpus",
        "--hugepages",
        "--serial",
        "--log-level",
        "--no-fast-boot",
    ] {
        assert!(help.contains(flag), "{flag} in --help");
    }
    assert!(help.contains("[default: 1G]") && help.contains("[default: auto]"));
}

#[test]
fn prefault_with_demand_paging_is_refused_with_the_fix() {
    let out = run(&["--guest", "stress", "--mem", "64M", "--prefault"]);
    expect_error(&out, &["--prefault", "add --no-demand-paging"]);
}

/// An output file whose directory is missing is refused before anything runs, naming the flag,
/// for every output flag; nothing is created.
#[test]
fn unwritable_output_paths_are_refused_before_the_guest_starts() {
    let dir = tmpdir("outputs");
    let missing = dir.join("no-such-dir");
    let file = |name: &str| missing.join(name).to_str().unwrap().to_string();
    for (args, flag) in [
        (
            vec![
                "--guest",
                "stress",
                "--mem",
                "64M",
                "--stats-json",
                &file("s.json"),
            ],
            "--stats-json",
        ),
        (
            vec![
                "--guest",
                "stress",
                "--mem",
                "64M",
                "--migrate-to",
                "tcp:127.0.0.1:1",
                "--migrate-json",
                &file("m.json"),
            ],
            "--migrate-json",
        ),
        (
            vec![
                "--kernel",
                "/nonexistent/bzImage",
                "--serial",
                &format!("file:{}", file("c.log")),
            ],
            "--serial file:",
        ),
    ] {
        let out = run(&args);
        let msg = expect_error(&out, &[flag, "no-such-dir", "create its directory"]);
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("guest stress"),
            "refused before the guest started: {msg}"
        );
    }
    assert!(!missing.exists());
    // A directory given as the file is refused too, and an existing directory's new file is
    // not left behind by the check.
    let out = run(&[
        "--guest",
        "stress",
        "--mem",
        "64M",
        "--stats-json",
        dir.to_str().unwrap(),
    ]);
    expect_error(&out, &["--stats-json", "is a directory"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_timeout_is_refused_for_a_test_guest() {
    let out = run(&["--guest", "stress", "--shutdown-timeout", "5"]);
    expect_error(&out, &["--shutdown-timeout", "test guest has none"]);
}
