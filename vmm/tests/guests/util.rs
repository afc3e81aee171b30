//! Helpers of the `vmm --guest` suites: run the real binary, skip without KVM or huge pages,
//! read the `--stats-json` file.

#![allow(dead_code)] // each suite uses part of the helpers

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{hugetlb_or_skip, kvm_or_skip, serial};

/// What one `vmm --guest` run gave.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub wall: Duration,
    /// The `--stats-json` document, if one was asked for and written.
    pub stats: Option<Value>,
}

impl Run {
    /// Panics with the whole output unless the run passed.
    pub fn assert_pass(&self) {
        assert!(
            self.code == 0 && self.stdout.lines().any(|l| l == "PASS"),
            "expected PASS, exit code {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
    }

    /// Panics unless the first line names the backing (`4K pages`, `THP`, `2M hugetlbfs`).
    pub fn assert_backing(&self, backing: &str) {
        let first = self.stdout.lines().next().unwrap_or_default();
        assert!(
            first.contains(&format!("of RAM on {backing},")),
            "the guest ran on another backing than {backing:?} (is --hugepages passed to \
             vmm::guest::run_on in main.rs?): {first}"
        );
    }

    /// The stats document.
    pub fn stats(&self) -> &Value {
        self.stats.as_ref().expect("run with stats")
    }

    /// A counter of the demand-paging part of the stats (`paging` or `stage2` section).
    pub fn counter(&self, section: &str, name: &str) -> u64 {
        self.stats()["demand_paging"][section][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no demand_paging.{section}.{name} in {}", self.stats()))
    }

    /// Sum of a per-vCPU field.
    pub fn vcpu_sum(&self, name: &str) -> u64 {
        self.stats()["vcpus"]
            .as_array()
            .expect("vcpus")
            .iter()
            .map(|v| v[name].as_u64().unwrap_or(0))
            .sum()
    }
}

fn stats_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-guest-{}-{tag}.json", std::process::id()))
}

/// Runs `vmm` with `args` plus `--stats-json`, a 300 s guest timeout and warn-level logs.
pub fn vmm_guest(tag: &str, args: &[&str]) -> Run {
    let stats = stats_path(tag);
    let _ = std::fs::remove_file(&stats);
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .args([
            "--log-level",
            "warn",
            "--guest-timeout",
            "300",
            "--stats-json",
        ])
        .arg(&stats)
        .output()
        .expect("spawn vmm");
    let wall = t.elapsed();
    let doc = std::fs::read_to_string(&stats)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("stats JSON"));
    let _ = std::fs::remove_file(&stats);
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        wall,
        stats: doc,
    };
    eprintln!(
        "vmm {} -> exit {} in {:.2} s",
        args.join(" "),
        run.code,
        wall.as_secs_f64()
    );
    run
}

/// Runs `vmm --guest guest --mem {gib}G --cpus cpus --hugepages hugepages` and `extra`
/// flags (as [`vmm_guest`] does) holding [`serial`] for the run, and checks that it passed on
/// `backing` (see [`Run::assert_backing`]). None, with the reason printed, without KVM or
/// when `hugepages` is `2M` and the pool cannot back the RAM.
pub fn run_guest(
    test: &str,
    guest: &str,
    gib: u64,
    cpus: u32,
    hugepages: &str,
    backing: &str,
    extra: &[&str],
) -> Option<Run> {
    if !kvm_or_skip(test) || (hugepages == "2M" && !hugetlb_or_skip(test, gib << 30)) {
        return None;
    }
    let (mem, cpus) = (format!("{gib}G"), cpus.to_string());
    let mut args = vec![
        "--guest",
        guest,
        "--mem",
        &mem,
        "--cpus",
        &cpus,
        "--hugepages",
        hugepages,
    ];
    args.extend_from_slice(extra);
    let _one = serial();
    let run = vmm_guest(test, &args);
    run.assert_pass();
    run.assert_backing(backing);
    Some(run)
}

/// Runs `vmm` with exactly `args` (no extra options).
pub fn vmm_plain(args: &[&str]) -> Run {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("spawn vmm");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        wall: t.elapsed(),
        stats: None,
    }
}
