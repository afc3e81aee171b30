//! Exit codes a script can trust, on the `vmm` binary with a built-in test guest: SIGTERM and
//! SIGINT stop the VM cleanly (control socket removed, `--stats-json` written) with 143 and
//! 130, and a destination still waiting for its source at once; the control socket's
//! `shutdown` stops a guest without a power button with 4; a failed `--migrate-to` turns the
//! guest's later pass into 6.

mod common;
#[path = "migrate/util.rs"]
mod migrate_util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmm::exit::{EXIT_MIGRATE_FAILED, EXIT_SHUTDOWN_FORCED, EXIT_SIGINT, EXIT_SIGTERM};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-lifecycle-{}-{name}", std::process::id()))
}

/// A `dirty` guest that writes until stopped (at most a minute), with a control socket and
/// `--stats-json`.
fn spawn_running_guest(sock: &Path, stats: &Path) -> Child {
    Command::new(VMM)
        .args([
            "--guest",
            "dirty",
            "--mem",
            "64M",
            "--hugepages",
            "none",
            "--generations",
            "0",
            "--run-for",
            "60",
            "--api-socket",
            sock.to_str().unwrap(),
            "--stats-json",
            stats.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

fn wait_for_path(p: &Path) {
    let t = Instant::now();
    while !p.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.exists(), "{} appeared", p.display());
}

/// Waits for the process to end (killing it after `limit`); (exit code, stderr).
fn wait_end(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let t = Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (code, err)
}

fn signal_stops_cleanly(test: &str, sig: i32, want: i32, name: &str) {
    if !common::kvm_or_skip(test) {
        return;
    }
    let sock = tmp(&format!("{test}.sock"));
    let stats = tmp(&format!("{test}.json"));
    let child = spawn_running_guest(&sock, &stats);
    wait_for_path(&sock);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    let (code, err) = wait_end(child, Duration::from_secs(30));
    assert_eq!(
        code,
        Some(want),
        "{name} ends the VM with {want}; stderr:\n{err}"
    );
    assert!(err.contains(&format!("{name} received")), "{err}");
    assert!(!sock.exists(), "the control socket is removed");
    let doc = std::fs::read_to_string(&stats).expect("--stats-json written on the way out");
    let _ = std::fs::remove_file(&stats);
    assert!(doc.contains("\"guest\": \"dirty\""), "{doc}");
}

#[test]
fn sigterm_stops_a_guest_with_143_and_removes_its_socket() {
    signal_stops_cleanly(
        "sigterm_stops_a_guest_with_143_and_removes_its_socket",
        libc::SIGTERM,
        EXIT_SIGTERM,
        "SIGTERM",
    );
}

#[test]
fn sigint_stops_a_guest_with_130_and_removes_its_socket() {
    signal_stops_cleanly(
        "sigint_stops_a_guest_with_130_and_removes_its_socket",
        libc::SIGINT,
        EXIT_SIGINT,
        "SIGINT",
    );
}

/// A test guest has no power button: `shutdown` stops it at once, with the "forced" code.
#[test]
fn shutdown_of_a_guest_without_a_power_button_stops_it_with_4() {
    if !common::kvm_or_skip("shutdown_of_a_guest_without_a_power_button_stops_it_with_4") {
        return;
    }
    let sock = tmp("shutdown.sock");
    let stats = tmp("shutdown.json");
    let child = spawn_running_guest(&sock, &stats);
    wait_for_path(&sock);
    let v = vmm::api::request(&sock, &json!({"cmd": "shutdown"})).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["shutdown"]["how"], "stopped", "{v}");
    assert_eq!(v["shutdown"]["exit_code"], EXIT_SHUTDOWN_FORCED, "{v}");
    let (code, err) = wait_end(child, Duration::from_secs(30));
    let _ = std::fs::remove_file(&stats);
    assert_eq!(code, Some(EXIT_SHUTDOWN_FORCED), "{err}");
    assert!(err.contains("no power button"), "{err}");
    assert!(!sock.exists());
}

/// Nothing listens at the destination: the migration fails, the guest runs on here and
/// passes, and the exit code still says the migration did not happen.
#[test]
fn a_failed_migrate_to_exits_non_zero_although_the_guest_passes() {
    if !common::kvm_or_skip("a_failed_migrate_to_exits_non_zero_although_the_guest_passes") {
        return;
    }
    let port = migrate_util::free_port();
    let out = Command::new(VMM)
        .args([
            "--guest",
            "dirty",
            "--mem",
            "64M",
            "--hugepages",
            "none",
            "--migrate-to",
            &format!("tcp:127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("PASS"), "the guest passed:\n{stdout}");
    assert!(
        stdout.contains("failed") || stderr.contains("failed"),
        "{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(EXIT_MIGRATE_FAILED),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stderr.contains("--migrate-to failed"), "{stderr}");
}

/// A destination waiting for its source has no VM yet: SIGTERM ends it at once with 143 and
/// removes the Unix socket it listened on.
#[test]
fn sigterm_ends_a_waiting_destination_and_removes_its_socket() {
    let sock = tmp("incoming.sock");
    let child = Command::new(VMM)
        .args(["--incoming", &format!("unix:{}", sock.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    wait_for_path(&sock);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let (code, err) = wait_end(child, Duration::from_secs(30));
    assert_eq!(code, Some(EXIT_SIGTERM), "{err}");
    assert!(err.contains("SIGTERM received while no VM runs"), "{err}");
    assert!(!sock.exists(), "the listening socket is removed");
}
