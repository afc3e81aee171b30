//! The seccomp filters (`vmm/src/seccomp`): a system call outside a thread kind's list is
//! refused (kill: the process ends with exit code 159 and says which kind made which call;
//! log: the call goes through), and a running `vmm` has a filter on every thread.
//!
//! The refusals run in a child process (this test binary re-executed with one ignored test
//! as its entry), since a killed thread ends its whole process.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmm::exit::EXIT_SECCOMP;
use vmm::seccomp::{self, SeccompMode, ThreadKind};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

/// Runs `call` on a thread of a child process that installed `kind`'s filter for `mode`.
fn in_child(kind: ThreadKind, mode: &str, call: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "seccomp_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, format!("{kind:?} {mode} {call}"))
        .output()
        .unwrap()
}

/// The child's side of [`in_child`]: prints `RESULT <return value> <errno>` when the call
/// came back.
#[test]
#[ignore = "the child process of the seccomp tests (they run it with --ignored)"]
fn seccomp_child() {
    let spec = std::env::var(CHILD_ENV).expect("run by the seccomp tests");
    let mut parts = spec.split_whitespace();
    let (kind, mode, call) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().to_string(),
    );
    let kind = *ThreadKind::ALL
        .iter()
        .find(|k| format!("{k:?}") == kind)
        .unwrap();
    let mode = match mode {
        "kill" => SeccompMode::Kill,
        "log" => SeccompMode::Log,
        m => panic!("mode {m}"),
    };
    if call == "panic" {
        // As `vmm` does: the SIGSYS handler and the panic hook of filtered threads.
        seccomp::configure(mode).unwrap();
    } else if mode == SeccompMode::Kill {
        seccomp::install_sigsys_handler().unwrap();
    }
    let t = std::thread::spawn(move || {
        seccomp::apply(kind, mode).unwrap();
        let ret: i64 = match call.as_str() {
            // SAFETY: plain system calls with valid (or deliberately invalid) arguments.
            "socket" => unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) }.into(),
            // SAFETY: a valid NUL-terminated path.
            "open" => unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) }.into(),
            // SAFETY: execve of a valid path with empty argv/envp arrays.
            "execve" => unsafe {
                let argv = [std::ptr::null::<libc::c_char>()];
                libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), argv.as_ptr())
            }
            .into(),
            // SAFETY: TIOCSTI on fd -1: the kernel would fail it with EBADF.
            "tiocsti" => unsafe { libc::ioctl(-1, libc::TIOCSTI, c"x".as_ptr()) }.into(),
            // KVM_GET_API_VERSION on fd -1 (EBADF if it got through).
            // SAFETY: no pointer argument.
            "kvm-ioctl" => unsafe { libc::ioctl(-1, 0xAE00, 0) }.into(),
            // SAFETY: signal 0 to pid 1's thread 1 only checks it exists.
            "tgkill-other" => unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) },
            // SAFETY: getpid has no arguments.
            "getpid" => unsafe { libc::getpid() }.into(),
            "panic" => panic!("a deliberate panic on a filtered thread"),
            c => panic!("call {c}"),
        };
        println!("RESULT {ret} {}", std::io::Error::last_os_error());
    });
    t.join().unwrap();
}

fn killed_for(out: &Output, kind: ThreadKind, nr: i64) {
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(EXIT_SECCOMP),
        "stdout: {stdout}\nstderr: {err}"
    );
    assert!(!stdout.contains("RESULT"), "the call came back: {stdout}");
    let want = format!("a {} thread made system call {nr},", kind.name());
    assert!(err.contains(&want), "wanted {want:?} in: {err}");
}

#[test]
fn a_vcpu_thread_is_killed_for_opening_a_file_or_a_socket() {
    let out = in_child(ThreadKind::Vcpu, "kill", "socket");
    killed_for(&out, ThreadKind::Vcpu, libc::SYS_socket);
    let out = in_child(ThreadKind::Vcpu, "kill", "open");
    killed_for(&out, ThreadKind::Vcpu, libc::SYS_openat);
}

#[test]
fn no_thread_kind_may_execve() {
    for kind in ThreadKind::ALL {
        let out = in_child(kind, "kill", "execve");
        killed_for(&out, kind, libc::SYS_execve);
    }
}

#[test]
fn ioctl_and_tgkill_are_refused_outside_their_arguments() {
    // The console may set its terminal's mode, but never push input into it.
    killed_for(
        &in_child(ThreadKind::Console, "kill", "tiocsti"),
        ThreadKind::Console,
        libc::SYS_ioctl,
    );
    // A userfaultfd handler has userfaultfd's ioctls, not KVM's.
    killed_for(
        &in_child(ThreadKind::Pager, "kill", "kvm-ioctl"),
        ThreadKind::Pager,
        libc::SYS_ioctl,
    );
    // tgkill reaches this process's threads only.
    killed_for(
        &in_child(ThreadKind::Api, "kill", "tgkill-other"),
        ThreadKind::Api,
        libc::SYS_tgkill,
    );
}

#[test]
fn allowed_calls_go_through_and_log_mode_lets_refused_ones_through() {
    let out = in_child(ThreadKind::Vcpu, "kill", "getpid");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("RESULT "), "{text}");
    // A vCPU's KVM ioctl passes the filter and fails in the kernel (EBADF on fd -1).
    let out = in_child(ThreadKind::Vcpu, "kill", "kvm-ioctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("RESULT -1 Bad file descriptor"), "{text}");
    let out = in_child(ThreadKind::Vcpu, "log", "socket");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let ret: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no result: {text}"));
    assert!(ret >= 0, "socket() under --seccomp log failed: {text}");
}

/// A panic on a filtered thread, with RUST_BACKTRACE=1, is reported (message and thread kind)
/// without the backtrace, whose file access the filter would refuse: the process is not
/// killed by seccomp for it.
#[test]
fn a_panic_on_a_filtered_thread_is_reported_not_killed() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "seccomp_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "Pager kill panic")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(EXIT_SECCOMP), "{err}");
    assert!(
        err.contains("(userfaultfd handler)") && err.contains("a deliberate panic"),
        "{err}"
    );
    assert!(err.contains("no backtrace under seccomp"), "{err}");
    assert!(!err.contains("vmm: seccomp:"), "{err}");
}

/// Seccomp_filters of every thread of `pid`: (thread name, filters).
fn filters_per_thread(pid: u32) -> Vec<(String, u32)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let p = t.path();
        let Ok(status) = std::fs::read_to_string(p.join("status")) else {
            continue;
        };
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .map(|s| s.trim().parse().unwrap())
            .unwrap_or(0);
        v.push((name.trim().to_string(), n));
    }
    v.sort();
    v
}

/// A running test guest with the control socket: every thread (main, vCPUs, userfaultfd
/// handlers, control socket, signals) has at least one filter under the default
/// `--seccomp kill`, and none under `--seccomp none`; the guest passes in both.
#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    if !common::kvm_or_skip("every_thread_of_a_running_vmm_is_filtered") {
        return;
    }
    let _cores = common::serial();
    for mode in ["kill", "none"] {
        let sock =
            std::env::temp_dir().join(format!("vmm-seccomp-{}-{mode}.sock", std::process::id()));
        let mut child = Command::new(VMM)
            .args(["--guest", "dirty", "--generations", "0", "--mem", "256M"])
            .args(["--cpus", "2", "--hugepages", "none", "--dirty-rate", "20"])
            .args(["--run-for", "3", "--seccomp", mode, "--api-socket"])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&sock);
        // The threads are all up once the socket answers.
        let info = vmm::api::request(&sock, &serde_json::json!({"cmd": "info"})).unwrap();
        assert_eq!(info["ok"], true, "{info}");
        let threads = filters_per_thread(child.id());
        let out = {
            let stdout = child.stdout.take().unwrap();
            let lines: Vec<String> = BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect();
            let status = child.wait().unwrap();
            (status, lines.join("\n"))
        };
        assert!(out.0.success(), "{mode}: {:?}: {}", out.0, out.1);
        for want in ["vmm", "vcpu0", "vcpu1", "uffd-0", "api", "signals"] {
            assert!(
                threads.iter().any(|(n, _)| n == want),
                "{mode}: no {want} thread in {threads:?}"
            );
        }
        for (name, n) in &threads {
            match mode {
                "kill" => assert!(*n >= 1, "{name} runs unfiltered: {threads:?}"),
                _ => assert_eq!(*n, 0, "{name} has a filter: {threads:?}"),
            }
        }
    }
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
}
