//! Bad input to the `vmm` binary: every case is one line `error: ...` naming the cause and the
//! fix, exit code 1, no panic and no backtrace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod files;
mod kernels;

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
fn no_kernel_at_all() {
    expect_error(&run(&[]), &["--kernel"]);
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
