//! `soak --seconds 60` on real KVM, as the suite version: a 4-vCPU stress guest under
//! a reclaim storm moves back and forth (precopy and postcopy alternating) between two
//! long-lived `vmm --stay` processes for a minute; every move must check every page of its
//! 1 GiB (the figures add up to 262144 pages a move), nothing may differ or be lost, and
//! neither process may keep more files or threads after its last move out than its first.
//!
//! The soak runs the `vmm` next to it (target/<profile>/vmm), which `cargo test --workspace`
//! builds; with `cargo test -p tools` alone, build it first.

use std::path::Path;
use std::process::Command;

const SOAK: &str = env!("CARGO_BIN_EXE_soak");

#[test]
fn a_minute_of_moves_checks_every_page_and_loses_none() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!(
            "a_minute_of_moves_checks_every_page_and_loses_none: skipped: /dev/kvm is absent"
        );
        return;
    }
    let vmm = Path::new(SOAK).with_file_name("vmm");
    assert!(
        vmm.is_file(),
        "no vmm at {}: cargo build -p vmm with the same profile",
        vmm.display()
    );
    let out_dir = std::env::temp_dir().join(format!("soak-test-{}", std::process::id()));
    let out = Command::new(SOAK)
        .args(["--seconds", "60", "--out"])
        .arg(&out_dir)
        .output()
        .expect("run soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    let nums: Vec<u64> = last
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    assert!(
        last.starts_with("soak: ")
            && last.ends_with("mismatches, 0 lost dirty pages")
            && nums.len() == 4,
        "the summary line: {last}"
    );
    let (moves, pages, mismatches) = (nums[0], nums[1], nums[2]);
    assert!(
        moves >= 2,
        "at least a precopy and a postcopy move in a minute: {stdout}"
    );
    assert_eq!(mismatches, 0, "{stdout}");
    // 1 GiB of 4 KiB pages, all of them checked on every move (before the guest runs, or as
    // postcopy brings them).
    assert_eq!(pages, moves * 262144, "{stdout}");
    // Two processes carried the guest back and forth, each both running it and empty, and
    // neither kept more files or threads after its last move out than after its first.
    for name in ["vm-a", "vm-b"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("soak: {name} (pid ")))
            .unwrap_or_else(|| panic!("no figures of {name}: {stdout}"));
        assert!(
            line.contains("running the guest: RSS ") && line.contains("; empty: RSS "),
            "{line}"
        );
        let empty = line.split("; empty: ").nth(1).unwrap_or_default();
        let nums: Vec<u64> = empty
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|t| t.parse().ok())
            .collect();
        assert_eq!(nums.len(), 6, "{line}");
        assert!(
            nums[3] <= nums[2] && nums[5] <= nums[4],
            "{name} leaked: {line}"
        );
    }
    assert!(!stdout.contains("leaked"), "{stdout}");
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn bad_arguments_say_what_to_give() {
    let out = Command::new(SOAK)
        .args(["--seconds", "0"])
        .output()
        .expect("run soak");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--seconds 60"), "{err}");
    let out = Command::new(SOAK)
        .args(["--seconds", "5", "--vmm", "/nonexistent/vmm"])
        .output()
        .expect("run soak");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no vmm binary at /nonexistent/vmm"), "{err}");
}
