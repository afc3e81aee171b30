//! Live migration between two `vmm --guest dirty` processes whose guest RAM is shared memfd
//! memory on both ends (`--memory-backend shared`): stage2-wp dirty logging through the pager on
//! the source, pages placed into the memfd (and fetched on demand in postcopy) on the
//! destination, whose replay of every write must PASS. 4 KiB shmem and 2 MiB hugetlbfs memfd.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::Duration;

/// One migration at a time (2 cores, one huge page pool).
static SERIAL: Mutex<()> = Mutex::new(());

fn free_2m_pages() -> u64 {
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

fn vmm(hugepages: &str, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "--guest",
            "dirty",
            "--mem",
            "512M",
            "--cpus",
            "2",
            "--generations",
            "0",
            "--memory-backend",
            "shared",
            "--hugepages",
            hugepages,
            "--log-level",
            "warn",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

fn text(o: &Output) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn migrate(test: &str, hugepages: &str, src_flags: &[&str]) {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("{test}: skipped: /dev/kvm is absent");
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Both ends hold the guest's RAM at once.
    if hugepages == "2M" && free_2m_pages() < 2 * 256 {
        eprintln!(
            "{test}: skipped: the 2 MiB pool has {} free pages, 512 needed",
            free_2m_pages()
        );
        return;
    }
    let sock = std::env::temp_dir().join(format!("{test}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let addr = format!("unix:{}", sock.display());
    let mut dst = vmm(hugepages, &["--incoming", &addr, "--run-for", "0"]);
    // Collect the destination's stdout on a thread; it listens once it says so.
    let (tx, rx) = mpsc::channel();
    let dst_out = dst.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(dst_out).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.contains("waiting for the migration source") => break,
            Ok(_) => {}
            Err(e) => panic!("the destination never listened: {e}"),
        }
    }
    let mut args = vec!["--migrate-to", &addr, "--max-rounds", "4"];
    args.extend_from_slice(src_flags);
    let src = vmm(hugepages, &args).wait_with_output().unwrap();
    let mut dst = dst.wait_with_output().unwrap();
    dst.stdout = reader.join().unwrap().into_bytes();
    let _ = std::fs::remove_file(&sock);
    assert_eq!(src.status.code(), Some(0), "source: {}", text(&src));
    assert!(
        String::from_utf8_lossy(&src.stdout).contains("complete"),
        "{}",
        text(&src)
    );
    assert_eq!(dst.status.code(), Some(0), "destination: {}", text(&dst));
    let out = String::from_utf8_lossy(&dst.stdout);
    assert!(out.contains("shared memfd"), "{}", text(&dst));
    assert!(out.lines().any(|l| l == "PASS"), "{}", text(&dst));
}

#[test]
fn precopy_stage2_wp_on_shared_4k_passes() {
    migrate(
        "precopy_stage2_wp_on_shared_4k",
        "none",
        &["--dirty-mode", "stage2-wp"],
    );
}

#[test]
fn postcopy_stage2_wp_on_shared_4k_passes() {
    migrate(
        "postcopy_stage2_wp_on_shared_4k",
        "none",
        &["--dirty-mode", "stage2-wp", "--postcopy-after", "2"],
    );
}

#[test]
fn postcopy_on_shared_hugetlb_2m_passes() {
    migrate("postcopy_on_shared_2m", "2M", &["--postcopy-after", "1"]);
}
