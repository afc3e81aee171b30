//! Shared by the migration suites: real `vmm --guest` processes, their output as a channel
//! of lines, destinations started and listening, free ports, one migration at a time.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// Guest RAM of every migration test (small: the suite stays fast).
pub const MEM: &str = "512M";
/// vCPUs of every migration test.
pub const CPUS: &str = "2";
/// Generous per-process limit: a stuck run fails the test instead of hanging it.
pub const LIMIT: Duration = Duration::from_secs(90);
/// What a destination prints once it listens for its source.
pub const LISTENING: &str = "waiting for the migration source";

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
    vmm_on_host(None, backing, extra)
}

/// [`vmm_on`] in network namespace `ns` (a test host of `migrate/hosts.rs`) when given:
/// `ip netns exec NS vmm ...`, which runs `vmm` itself in that namespace (same process).
pub fn vmm_on_host(ns: Option<&str>, backing: &str, extra: &[&str]) -> Child {
    let mut args = vec!["--generations", "0"];
    args.extend_from_slice(extra);
    let cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_vmm")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_vmm")),
    };
    guest_with(cmd, "dirty", backing, &args)
}

/// The built-in `guest` on [`MEM`] and [`CPUS`], on `--hugepages backing`, with `extra`
/// flags; stdout and stderr piped.
pub fn guest_on(guest: &str, backing: &str, extra: &[&str]) -> Child {
    guest_with(
        Command::new(env!("CARGO_BIN_EXE_vmm")),
        guest,
        backing,
        extra,
    )
}

fn guest_with(mut cmd: Command, guest: &str, backing: &str, extra: &[&str]) -> Child {
    cmd.args([
        "--guest",
        guest,
        "--mem",
        MEM,
        "--cpus",
        CPUS,
        "--hugepages",
        backing,
    ])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn vmm")
}

/// A destination `vmm --incoming ADDR` that has said it listens ([`LISTENING`]).
pub struct Destination {
    /// The process.
    pub child: Child,
    /// Its stdout lines after the listening line.
    pub rx: Receiver<String>,
    /// The address it listens on, as `--incoming` took it: the source's `--migrate-to`.
    pub addr: String,
    /// Its stdout lines up to the listening line, that one included.
    pub before: Vec<String>,
}

impl Destination {
    /// The `HOST:PORT` of a `tcp:` address: what a proxy in front of the destination
    /// connects to.
    pub fn host_port(&self) -> &str {
        self.addr
            .strip_prefix("tcp:")
            .unwrap_or_else(|| panic!("{} is not a tcp: address", self.addr))
    }

    /// [`finish`] of the destination: (code, stdout after the listening line, stderr).
    pub fn finish(self) -> (i32, String, String) {
        finish(self.child, self.rx)
    }
}

/// Starts a destination with `spawn(["--incoming", addr, extra...])` and waits until it
/// listens on `addr`.
pub fn listening_at(
    addr: String,
    spawn: impl FnOnce(&[&str]) -> Child,
    extra: &[&str],
) -> Destination {
    let mut args = vec!["--incoming", addr.as_str()];
    args.extend_from_slice(extra);
    let mut child = spawn(&args);
    let rx = lines(&mut child);
    let before = wait_for(&rx, LISTENING);
    Destination {
        child,
        rx,
        addr,
        before,
    }
}

/// [`listening_at`] a free port of 127.0.0.1.
pub fn listening(spawn: impl FnOnce(&[&str]) -> Child, extra: &[&str]) -> Destination {
    listening_at(format!("tcp:127.0.0.1:{}", free_port()), spawn, extra)
}

/// Starts a `dirty` guest with `spawn(["--api-socket", sock, extra...])` and waits until it
/// writes and its control socket is there; returns it with its output lines.
pub fn api_guest(
    spawn: impl FnOnce(&[&str]) -> Child,
    sock: &Path,
    extra: &[&str],
) -> (Child, Receiver<String>) {
    let mut args = vec!["--api-socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut child = spawn(&args);
    let rx = lines(&mut child);
    wait_for(&rx, "guest dirty on");
    wait_for_socket(sock);
    (child, rx)
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
    let t = Instant::now();
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

/// [`finish`] of a child whose output nobody has read yet: (code, stdout, stderr).
pub fn run_to_end(mut child: Child) -> (i32, String, String) {
    let rx = lines(&mut child);
    finish(child, rx)
}

/// Waits (up to [`LIMIT`]) until the control socket `sock` exists.
pub fn wait_for_socket(sock: &Path) {
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where `test` asks the source to write its `--migrate-json` document.
pub fn migrate_json_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{test}-{}.json", std::process::id()))
}

/// The `--migrate-json` document at `path`, which is removed.
pub fn read_migrate_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("--migrate-json written");
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&text).expect("--migrate-json is JSON")
}

/// Asserts that a `dirty` guest's process, as [`finish`] returned it, passed: exit code 0,
/// `PASS` on stdout, and one "dirty replay of" line per vCPU on stderr (every vCPU's replay
/// matched every page of its slice). `who` names the process in the failure message.
pub fn assert_guest_passed(who: &str, (code, out, err): &(i32, String, String)) {
    assert_eq!(*code, 0, "{who}: {out}\n{err}");
    assert_guest_output_passed(who, out, err);
}

/// Like [`assert_guest_passed`] for a source whose `--migrate-to` failed: its guest ran on and
/// passed, and the process says the migration did not happen with exit code 6
/// (`EXIT_MIGRATE_FAILED`), not 0.
pub fn assert_source_passed_after_failed_migration(
    who: &str,
    (code, out, err): &(i32, String, String),
) {
    assert_eq!(*code, vmm::exit::EXIT_MIGRATE_FAILED, "{who}: {out}\n{err}");
    assert!(err.contains("--migrate-to failed"), "{who}: {err}");
    assert_guest_output_passed(who, out, err);
}

fn assert_guest_output_passed(who: &str, out: &str, err: &str) {
    assert!(out.contains("PASS"), "{who}: {out}");
    let vcpus: usize = CPUS.parse().expect("CPUS is a number");
    assert_eq!(
        err.matches("dirty replay of").count(),
        vcpus,
        "{who}: each vCPU verified: {err}"
    );
}

/// Waits (up to [`LIMIT`]) until `info` on the control socket `sock` says `state` (`running`,
/// `empty`, `receiving at ADDR`); returns the info. The socket may be between owners meanwhile
/// (a `--stay` vmm's VM and its empty control socket).
pub fn wait_state(sock: &Path, state: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        if let Ok(v) = vmm::api::request(sock, &serde_json::json!({"cmd": "info"})) {
            if v["info"]["state"] == state {
                return v["info"].clone();
            }
        }
        assert!(t.elapsed() < LIMIT, "{} never said {state}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}
