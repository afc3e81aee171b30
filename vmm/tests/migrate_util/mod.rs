//! Shared by the migration suites: real `vmm --guest dirty` processes, their output as a
//! channel of lines, free ports, one migration at a time.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Mutex;
use std::time::Duration;

/// One migration at a time: the machine has 2 cores.
pub static SERIAL: Mutex<()> = Mutex::new(());
/// Guest RAM of every migration test (small: the suite stays fast).
pub const MEM: &str = "512M";
/// vCPUs of every migration test.
pub const CPUS: &str = "2";
/// Generous per-process limit: a stuck run fails the test instead of hanging it.
pub const LIMIT: Duration = Duration::from_secs(90);

/// False (with the reason printed) when this machine has no KVM.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("{test}: skipped: /dev/kvm is absent");
    false
}

/// True when the 2 MiB hugetlb pool has `pages` free (not reserved) pages; prints why a test
/// is skipped otherwise (other suites share the pool: run again when it is free).
pub fn free_2m_pages_or_skip(test: &str, pages: u64) -> bool {
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let free = read("free_hugepages").saturating_sub(read("resv_hugepages"));
    if free >= pages {
        return true;
    }
    eprintln!("{test}: skipped: the 2 MiB hugetlb pool has {free} free pages, {pages} needed");
    false
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `dirty` guest that writes until stopped, on 4 KiB pages, with `extra` flags.
pub fn vmm(extra: &[&str]) -> Child {
    vmm_on("none", extra)
}

/// A `dirty` guest that writes until stopped, on `--hugepages backing`, with `extra` flags.
pub fn vmm_on(backing: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "--guest",
            "dirty",
            "--mem",
            MEM,
            "--cpus",
            CPUS,
            "--hugepages",
            backing,
            "--generations",
            "0",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

/// Forwards a child's stdout lines to a channel (and echoes them).
pub fn lines(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            println!("| {l}");
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line containing `needle`; returns the lines seen up to it.
pub fn wait_for(rx: &Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(LIMIT) {
            Ok(l) => {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(e) => panic!("no line with {needle:?} ({e}); saw {seen:?}"),
        }
    }
}

/// Waits for the child (killing it after LIMIT); returns (code, rest of stdout, stderr).
pub fn finish(mut child: Child, rx: Receiver<String>) -> (i32, String, String) {
    let t = std::time::Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code().unwrap_or(-1);
        }
        if t.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmm did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    eprintln!("{err}");
    // The reader thread may still hold the last lines: wait for it to see the end.
    let mut out: Vec<String> = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        out.push(l);
    }
    (code, out.join("\n"), err)
}

/// Asserts that a `dirty` guest's process, as [`finish`] returned it, passed: exit code 0,
/// `PASS` on stdout, and one "dirty replay of" line per vCPU on stderr (every vCPU's replay
/// matched every page of its slice). `who` names the process in the failure message.
pub fn assert_guest_passed(who: &str, (code, out, err): &(i32, String, String)) {
    assert_eq!(*code, 0, "{who}: {out}\n{err}");
    assert!(out.contains("PASS"), "{who}: {out}");
    let vcpus: usize = CPUS.parse().expect("CPUS is a number");
    assert_eq!(
        err.matches("dirty replay of").count(),
        vcpus,
        "{who}: each vCPU verified: {err}"
    );
}
