//! `vmm --stay`: a process that outlives its VM when it migrates out and takes the next one in
//! when told over its control socket (`receive`), so that a guest can go back and forth between
//! two long-lived processes; a failed migration in leaves it waiting, and a signal ends it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{kvm_or_skip, serial};
use crate::util::{
    self, api_guest, assert_guest_passed, finish, lines, wait_for, wait_state, LISTENING,
};

fn path(test: &str, what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{test}-{}.{what}", std::process::id()))
}

fn ask(sock: &Path, req: Value) -> Value {
    vmm::api::request(sock, &req).unwrap_or_else(|e| panic!("{req} to {}: {e}", sock.display()))
}

/// The names of the process's threads.
fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// No thread of a VM (vCPUs, userfaultfd handlers, migration threads, the reclaim storm) is
/// left in a process whose VM has gone.
fn assert_no_vm_threads(who: &str, pid: u32) {
    let names = threads(pid);
    for n in &names {
        for prefix in ["vcpu", "uffd", "postcopy", "migrate", "reclaim"] {
            assert!(
                !n.starts_with(prefix),
                "{who} with no VM still has thread {n}: {names:?}"
            );
        }
    }
}

/// Kills the processes it names when dropped: a test that fails half way leaves no `vmm
/// --stay` waiting for ever (one that passed has seen them end; a pid is not reused that fast).
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill with a pid and a signal number has no memory effects.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn staying(extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--stay")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

#[test]
fn a_guest_goes_to_a_staying_vmm_and_back_and_passes_where_it_started() {
    let test = "a_guest_goes_to_a_staying_vmm_and_back_and_passes_where_it_started";
    if !kvm_or_skip(test) {
        return;
    }
    let _g = serial();
    let (a_sock, b_sock) = (path(test, "a.sock"), path(test, "b.sock"));
    let (a_mig, b_mig) = (path(test, "a.mig"), path(test, "b.mig"));
    let b_addr = format!("unix:{}", b_mig.display());
    let a_addr = format!("unix:{}", a_mig.display());
    // A: the guest, which finishes 5 s into each of its runs here (the replay then checks
    // every page it wrote, on either process).
    let (a, a_rx) = api_guest(util::vmm, &a_sock, &["--stay", "--run-for", "5"]);
    let mut b = staying(&[
        "--incoming",
        &b_addr,
        "--api-socket",
        b_sock.to_str().unwrap(),
    ]);
    let _kill = KillOnDrop(vec![a.id(), b.id()]);
    let b_rx = lines(&mut b);
    wait_for(&b_rx, LISTENING);
    util::wait_for_socket(&b_sock);
    let info = wait_state(&b_sock, &format!("receiving at {b_addr}"));
    assert_eq!(info["vms"], 0, "{info}");
    let r = ask(
        &b_sock,
        json!({"cmd": "receive", "from": "unix:/nonexistent/x"}),
    );
    assert!(
        r["error"].as_str().unwrap().contains("already receiving"),
        "{r}"
    );
    let r = ask(&a_sock, json!({"cmd": "receive", "from": a_addr}));
    assert!(
        r["error"].as_str().unwrap().contains("a VM runs here"),
        "{r}"
    );

    // A to B, postcopy; A stays, empty.
    let r = ask(
        &a_sock,
        json!({"cmd": "migrate", "to": b_addr, "postcopy_after": 1}),
    );
    assert_eq!(r["migrate"]["mode"], "postcopy", "{r}");
    let info = wait_state(&a_sock, "empty");
    assert_eq!(
        (info["vms"].as_u64(), info["last"].as_str()),
        (Some(1), Some("VM 1 migrated out"))
    );
    assert_no_vm_threads("A", a.id());
    for cmd in ["pause", "resume"] {
        let r = ask(&a_sock, json!({"cmd": cmd}));
        assert!(r["error"].as_str().unwrap().contains("no VM here"), "{r}");
    }
    wait_state(&b_sock, "running");

    // Back to A, precopy; B stays, empty: nothing of the postcopy that brought the guest
    // (its receiver holds the pager, and the pager it) is left behind.
    let r = ask(&a_sock, json!({"cmd": "receive", "from": a_addr}));
    assert_eq!(r["receive"]["listening"], a_addr.as_str(), "{r}");
    let r = ask(&b_sock, json!({"cmd": "migrate", "to": a_addr}));
    assert_eq!(r["migrate"]["mode"], "precopy", "{r}");
    wait_state(&b_sock, "empty");
    assert_no_vm_threads("B", b.id());

    // A took it in: its listener is closed (nobody else may connect), its file gone.
    wait_state(&a_sock, "running");
    assert!(
        !a_mig.exists(),
        "A still listens at {a_addr} while it runs the guest"
    );
    // The guest ends on A and A with it: its code is the guest's.
    let a_end = finish(a, a_rx);
    assert_guest_passed("A", &a_end);
    assert!(!a_sock.exists(), "A left its control socket behind");
    // B ends when told.
    let r = ask(&b_sock, json!({"cmd": "shutdown"}));
    assert_eq!(r["ok"], true, "{r}");
    let (code, out, err) = finish(b, b_rx);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("incoming: dirty on 2 vCPU(s)"), "{out}");
    assert!(!b_sock.exists(), "B left its control socket behind");
}

#[test]
fn a_staying_vmm_outlives_a_failed_migration_in_and_a_signal_ends_it() {
    let test = "a_staying_vmm_outlives_a_failed_migration_in_and_a_signal_ends_it";
    if !kvm_or_skip(test) {
        return;
    }
    let sock = path(test, "sock");
    let secret = crate::auth::secret(test, crate::auth::KEY_A);
    // No payload: it starts with no VM.
    let mut v = staying(&[
        "--api-socket",
        sock.to_str().unwrap(),
        "--migrate-secret",
        secret.to_str().unwrap(),
    ]);
    let _kill = KillOnDrop(vec![v.id()]);
    let rx = lines(&mut v);
    util::wait_for_socket(&sock);
    let info = wait_state(&sock, "empty");
    assert_eq!(
        (info["vms"].as_u64(), info["last"].as_str()),
        (Some(0), Some("no VM yet"))
    );
    let r = ask(&sock, json!({"cmd": "receive", "from": "tcp:nope"}));
    assert_eq!(r["ok"], false, "{r}");
    let port = util::free_port();
    let r = ask(
        &sock,
        json!({"cmd": "receive", "from": format!("tcp:127.0.0.1:{port}")}),
    );
    assert_eq!(r["ok"], true, "{r}");
    // A peer without the secret: refused, and the process waits for the next one.
    let mut peer = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut peer, b"not a migration source\n").unwrap();
    drop(peer);
    let t = Instant::now();
    let info = loop {
        let info = wait_state(&sock, "empty");
        if info["last"]
            .as_str()
            .unwrap()
            .contains("a migration in failed")
        {
            break info;
        }
        assert!(t.elapsed() < util::LIMIT, "never failed: {info}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["vms"], 0, "{info}");
    // SIGTERM with no VM ends the process at once, socket and all.
    // SAFETY: kill with a child's pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(v.id() as i32, libc::SIGTERM) }, 0);
    let (code, out, err) = finish(v, rx);
    assert_eq!(code, vmm::exit::EXIT_SIGTERM, "{out}\n{err}");
    assert!(err.contains("SIGTERM received while no VM runs"), "{err}");
    assert!(err.contains("incoming migration failed"), "{err}");
    assert!(!sock.exists(), "the control socket was left behind");
    let _ = std::fs::remove_file(secret);
}
