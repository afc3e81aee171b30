//! `migrate-demo` end to end with small sizes (512M, 2 vCPUs) on real KVM: it exits 0 on the
//! destination's PASS, its summary has the migration's figures, and its plot is a
//! well-formed SVG with one point per round. Also its errors for a missing vmm, a busy port
//! and a destination that fails at start.
//!
//! The demo runs the `vmm` next to it (target/<profile>/vmm), which `cargo test --workspace`
//! builds; with `cargo test -p tools` alone, build it first (`cargo build -p vmm` with the
//! same profile).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

const DEMO: &str = env!("CARGO_BIN_EXE_migrate-demo");

/// One demo at a time: each runs two guests, and the machine has 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn vmm_next_to_demo() -> PathBuf {
    Path::new(DEMO).with_file_name("vmm")
}

/// True when the demo can run here; prints why a test is skipped otherwise.
fn can_run(test: &str) -> bool {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("{test}: skipped: /dev/kvm is absent");
        return false;
    }
    assert!(
        vmm_next_to_demo().is_file(),
        "{test}: no vmm at {}: build it with the same profile (cargo build -p vmm, or \
         cargo test --workspace)",
        vmm_next_to_demo().display()
    );
    true
}

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("migrate-demo-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn demo(out: &Path, extra: &[&str]) -> Output {
    let o = Command::new(DEMO)
        .args([
            "--mem",
            "512M",
            "--cpus",
            "2",
            "--hugepages",
            "none",
            "--warmup",
            "1",
            "--run-after",
            "1",
            "--timeout",
            "240",
            "--quiet",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .expect("spawn migrate-demo");
    eprintln!(
        "--- migrate-demo {extra:?}: {}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

/// Checks the summary against the run and the plot against the summary; returns the summary.
fn check_outputs(out: &Path, mode: &str) -> Value {
    let s = read_json(&out.join("summary.json"));
    assert_eq!(s["result"], "PASS", "{s:#}");
    assert_eq!(s["reason"], Value::Null, "{s:#}");
    assert_eq!(s["mode"], mode, "{s:#}");
    assert_eq!(s["dirty_mode"], "kvm-bitmap", "{s:#}");
    assert_eq!(s["ram_bytes"], 512u64 << 20, "{s:#}");
    assert_eq!(s["destination_exit"], 0, "{s:#}");
    let total = s["total_ms"].as_f64().expect("total_ms");
    let down = s["downtime_ms"].as_f64().expect("downtime_ms");
    assert!(total > 0.0 && down > 0.0 && down <= total, "{s:#}");
    let rounds = s["per_round"].as_array().expect("per_round");
    assert_eq!(s["rounds"].as_u64(), Some(rounds.len() as u64));
    assert!(!rounds.is_empty(), "{s:#}");
    // Round 0 is the full pass: every page of RAM.
    assert_eq!(rounds[0]["dirty_pages"], (512u64 << 20) / 4096, "{s:#}");
    let round_bytes: u64 = rounds.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    let sent = s["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(round_bytes > 0 && round_bytes <= sent, "{s:#}");
    // The guest's write counters came across with its memory and kept counting.
    assert!(
        s["guest_writes"].as_u64().expect("guest_writes") > 0,
        "{s:#}"
    );
    // The source's own file is there and agrees.
    let m = read_json(&out.join("migration.json"));
    assert_eq!(m["bytes_sent"], s["bytes_sent"]);

    let svg = std::fs::read_to_string(out.join("rounds.svg")).expect("rounds.svg");
    let doc = roxmltree::Document::parse(&svg).expect("the plot is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let points = doc
        .descendants()
        .filter(|e| e.tag_name().name() == "circle")
        .count();
    assert_eq!(points, rounds.len(), "one point per round in the plot");
    let texts: String = doc
        .descendants()
        .filter_map(|e| e.text())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        texts.contains(&format!("{mode} over kvm-bitmap")),
        "{texts}"
    );
    s
}

#[test]
fn precopy_demo_passes_and_writes_summary_and_plot() {
    if !can_run("precopy_demo_passes_and_writes_summary_and_plot") {
        return;
    }
    let _g = serial();
    let out = out_dir("precopy");
    let o = demo(&out, &[]);
    assert!(o.status.success(), "exit {}", o.status);
    assert!(String::from_utf8_lossy(&o.stdout).contains("PASS"));
    let s = check_outputs(&out, "precopy");
    assert_eq!(s["postcopy"], Value::Null);
    // Precopy ends with the paused round, after the full pass.
    assert!(s["rounds"].as_u64().unwrap() >= 2, "{s:#}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn postcopy_demo_passes_and_writes_summary_and_plot() {
    if !can_run("postcopy_demo_passes_and_writes_summary_and_plot") {
        return;
    }
    let _g = serial();
    let help = Command::new(vmm_next_to_demo())
        .arg("--help")
        .output()
        .unwrap();
    if !String::from_utf8_lossy(&help.stdout).contains("--postcopy-after") {
        eprintln!("postcopy_demo_passes_and_writes_summary_and_plot: skipped: this vmm has no postcopy yet");
        return;
    }
    let out = out_dir("postcopy");
    let o = demo(&out, &["--mode", "postcopy"]);
    assert!(o.status.success(), "exit {}", o.status);
    let s = check_outputs(&out, "postcopy");
    assert!(s["postcopy"].is_object(), "{s:#}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// --pause-first: the source's guest is paused before the migration, so nothing is dirtied
/// after the full pass; the guest resumes on the destination and passes there. The
/// destination populated its RAM first (--prefault, the default for precopy).
#[test]
fn paused_precopy_demo_passes_with_an_empty_last_round() {
    if !can_run("paused_precopy_demo_passes_with_an_empty_last_round") {
        return;
    }
    let _g = serial();
    let out = out_dir("paused");
    let o = demo(&out, &["--pause-first"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "exit {}\n{stdout}", o.status);
    assert!(
        stdout.contains("guest is paused (--pause-first)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("--prefault"),
        "the destination prefaults: {stdout}"
    );
    let s = check_outputs(&out, "precopy");
    let m = read_json(&out.join("migration.json"));
    let rounds = m["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "the full pass and the paused round: {m:#}");
    assert_eq!(
        rounds[1]["dirty_pages"], 0,
        "nothing dirtied while paused: {m:#}"
    );
    assert_eq!(s["result"], "PASS", "{s:#}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn missing_vmm_says_how_to_build_it() {
    let out = out_dir("novmm");
    let o = demo(&out, &["--vmm", "/nonexistent/vmm"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no vmm binary at /nonexistent/vmm")
            && err.contains("cargo build --release -p vmm"),
        "{err}"
    );
    // The summary says FAIL and why, so a script reading it cannot take it for a pass.
    let s = read_json(&out.join("summary.json"));
    assert_eq!(s["result"], "FAIL", "{s:#}");
    assert!(
        s["reason"].as_str().unwrap().contains("no vmm binary"),
        "{s:#}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn busy_port_is_reported() {
    if !vmm_next_to_demo().is_file() {
        eprintln!("busy_port_is_reported: skipped: no vmm next to the demo");
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    let out = out_dir("busy");
    let o = demo(&out, &["--port", &port]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("port {port}")) && err.contains("busy"),
        "{err}"
    );
}

#[test]
fn destination_failing_at_start_shows_its_last_lines() {
    if !vmm_next_to_demo().is_file() {
        eprintln!(
            "destination_failing_at_start_shows_its_last_lines: skipped: no vmm next to the demo"
        );
        return;
    }
    let out = out_dir("dstfail");
    // 8M is too small for four vCPU slices: the destination vmm refuses at once.
    let o = Command::new(DEMO)
        .args(["--mem", "8M", "--cpus", "4", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("destination") && err.contains("[dst]") && err.contains("--mem"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
