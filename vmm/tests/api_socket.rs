//! The control socket over a real unix socket, driving a test double of the VM that counts calls.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::api::{request, serve, serve_with, ApiError, ApiTarget, MAX_REQUEST_BYTES};

/// A VM stand-in: counts calls, records reclaim ranges, refuses ranges past 1 GiB.
#[derive(Default)]
struct FakeVm {
    stats: AtomicU64,
    pauses: AtomicU64,
    resumes: AtomicU64,
    reclaims: Mutex<Vec<(u64, u64)>>,
}

impl ApiTarget for FakeVm {
    fn stats(&self) -> Value {
        let n = self.stats.fetch_add(1, Ordering::SeqCst) + 1;
        json!({"calls": n, "installs_4k": 7})
    }
    fn reclaim(&self, gpa: u64, len: u64) -> Result<Value, String> {
        if gpa + len > 1 << 30 {
            return Err(format!("range {gpa:#x}+{len:#x} is outside RAM"));
        }
        self.reclaims.lock().unwrap().push((gpa, len));
        Ok(json!({"gpa": gpa, "len": len, "zapped": 3}))
    }
    fn pause(&self) -> Result<(), String> {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        if self.pauses.load(Ordering::SeqCst) == 0 {
            return Err("the VM is not paused".into());
        }
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn sock_path(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-api-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn commands_reach_the_target_and_answer_ok() {
    let path = sock_path("cmds");
    let vm = Arc::new(FakeVm::default());
    let server = serve(&path, vm.clone()).unwrap();

    let r = request(&path, &json!({"cmd": "stats"})).unwrap();
    assert_eq!(
        r,
        json!({"ok": true, "stats": {"calls": 1, "installs_4k": 7}})
    );

    let r = request(
        &path,
        &json!({"cmd": "reclaim", "gpa": "0x200000", "len": "2M"}),
    )
    .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["reclaim"]["zapped"], 3);
    let r = request(&path, &json!({"cmd": "reclaim", "gpa": 0, "len": 4096})).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        *vm.reclaims.lock().unwrap(),
        vec![(0x20_0000, 2 << 20), (0, 4096)]
    );

    assert_eq!(
        request(&path, &json!({"cmd": "pause"})).unwrap(),
        json!({"ok": true})
    );
    assert_eq!(
        request(&path, &json!({"cmd": "resume"})).unwrap(),
        json!({"ok": true})
    );
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 1);
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1);
    drop(server);
    assert!(
        !path.exists(),
        "the socket is removed when the server stops"
    );
    assert!(request(&path, &json!({"cmd": "stats"})).is_err());
}

#[test]
fn target_errors_come_back_as_error_responses() {
    let path = sock_path("errs");
    let vm = Arc::new(FakeVm::default());
    let _server = serve(&path, vm.clone()).unwrap();
    let r = request(&path, &json!({"cmd": "resume"})).unwrap();
    assert_eq!(r, json!({"ok": false, "error": "the VM is not paused"}));
    let r = request(&path, &json!({"cmd": "reclaim", "gpa": "1G", "len": "1G"})).unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("outside RAM"), "{r}");
    assert!(vm.reclaims.lock().unwrap().is_empty());
}

#[test]
fn malformed_requests_get_errors_and_the_connection_and_server_go_on() {
    let path = sock_path("bad");
    let vm = Arc::new(FakeVm::default());
    let _server = serve(&path, vm.clone()).unwrap();
    let stream = UnixStream::connect(&path).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut ask = |line: &str| -> Value {
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        let mut resp = String::new();
        r.read_line(&mut resp).unwrap();
        serde_json::from_str(&resp).unwrap()
    };
    let cases = [
        ("{not json", "malformed JSON"),
        ("[1,2]", "not a JSON object"),
        ("{\"command\":\"stats\"}", "no \"cmd\""),
        ("{\"cmd\":\"reboot\"}", "unknown command \"reboot\""),
        ("{\"cmd\":\"reclaim\",\"gpa\":0}", "needs \"len\""),
        (
            "{\"cmd\":\"reclaim\",\"gpa\":-1,\"len\":4096}",
            "non-negative",
        ),
        (
            "{\"cmd\":\"reclaim\",\"gpa\":\"zero\",\"len\":4096}",
            "not a size",
        ),
        (
            "{\"cmd\":\"reclaim\",\"gpa\":[],\"len\":4096}",
            "give a number",
        ),
        ("", "empty request"),
    ];
    for (line, want) in cases {
        let resp = ask(line);
        assert_eq!(resp["ok"], false, "{line}: {resp}");
        let msg = resp["error"].as_str().unwrap();
        assert!(msg.contains(want), "{line}: {msg}");
    }
    // Nothing reached the VM, and the same connection still serves good requests.
    assert!(vm.reclaims.lock().unwrap().is_empty());
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 0);
    assert_eq!(ask("{\"cmd\":\"stats\"}")["ok"], true);
    // Invalid UTF-8 too.
    let mut raw = UnixStream::connect(&path).unwrap();
    raw.write_all(b"\xff\xfe\n").unwrap();
    let mut resp = String::new();
    BufReader::new(raw).read_line(&mut resp).unwrap();
    assert!(resp.contains("not UTF-8"), "{resp}");
    // A new connection works as well.
    assert_eq!(
        request(&path, &json!({"cmd": "stats"})).unwrap()["ok"],
        true
    );
}

#[test]
fn an_overlong_line_is_refused_and_the_server_survives() {
    let path = sock_path("long");
    let vm = Arc::new(FakeVm::default());
    let _server = serve(&path, vm.clone()).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    let junk = vec![b'x'; MAX_REQUEST_BYTES + 10];
    // The server may close before reading everything; ignore a write error.
    let _ = s.write_all(&junk);
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp).unwrap();
    assert!(resp.contains("longer than"), "{resp}");
    assert_eq!(
        request(&path, &json!({"cmd": "stats"})).unwrap()["ok"],
        true
    );
}

#[test]
fn a_request_without_newline_before_close_is_answered() {
    let path = sock_path("nonl");
    let vm = Arc::new(FakeVm::default());
    let _server = serve(&path, vm.clone()).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"{\"cmd\":\"pause\"}").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp).unwrap();
    assert_eq!(resp.trim(), "{\"ok\":true}");
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 1);
}

#[test]
fn socket_path_conflicts_are_reported() {
    // A regular file is never replaced.
    let path = sock_path("file");
    std::fs::write(&path, b"keep me").unwrap();
    let err = serve(&path, Arc::new(FakeVm::default())).unwrap_err();
    assert!(matches!(err, ApiError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    std::fs::remove_file(&path).unwrap();

    // A live server is not stolen; a stale socket (server gone) is replaced.
    let path = sock_path("live");
    let first = serve(&path, Arc::new(FakeVm::default())).unwrap();
    let err = serve(&path, Arc::new(FakeVm::default())).unwrap_err();
    assert!(matches!(err, ApiError::InUse(_)), "{err}");
    assert!(err.to_string().contains("another process"));
    drop(first);
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale); // leaves the socket file with nobody listening
    assert!(path.exists());
    let _again = serve(&path, Arc::new(FakeVm::default())).unwrap();
    assert_eq!(
        request(&path, &json!({"cmd": "stats"})).unwrap()["ok"],
        true
    );

    let err = serve(
        std::path::Path::new("/nonexistent-dir/x.sock"),
        Arc::new(FakeVm::default()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("cannot listen"), "{err}");
}

#[test]
fn the_socket_is_for_its_owner_only() {
    let path = sock_path("mode");
    let _server = serve(&path, Arc::new(FakeVm::default())).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
}

/// A client that starts a line and never finishes it, and one that sends nothing, each get an
/// error response naming the timeout and are disconnected; the server serves the next client.
#[test]
fn a_client_that_never_finishes_its_line_is_disconnected_after_the_timeout() {
    let path = sock_path("slow");
    let _server = serve_with(&path, Arc::new(FakeVm::default()), Duration::from_secs(1)).unwrap();
    for (sent, what) in [
        (&b"{\"cmd\": \"sta"[..], "unfinished request line"),
        (&b""[..], "no request"),
    ] {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(sent).unwrap();
        let t = Instant::now();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let waited = t.elapsed();
        assert!(resp.contains(what) && resp.contains("1 s"), "{resp}");
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "closed after {waited:?}"
        );
    }
    let r = request(&path, &json!({"cmd": "stats"})).unwrap();
    assert_eq!(r["ok"], true, "{r}");
}

/// The body of the other-user test, run as a child process under another uid: connects to the
/// socket named by VMM_API_TEST_SOCKET and prints the response line.
#[test]
#[ignore = "a helper: run by another_users_client_is_refused under another uid"]
fn other_user_client() {
    let Ok(path) = std::env::var("VMM_API_TEST_SOCKET") else {
        return;
    };
    let mut s = UnixStream::connect(path).expect("connect");
    // The server refuses on the peer's credentials alone, without reading a request, and may
    // have answered and closed before this write: a broken pipe here is that refusal, and the
    // answer is still waiting to be read.
    if let Err(e) = s.write_all(b"{\"cmd\":\"stats\"}\n") {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp).unwrap();
    println!("RESPONSE {resp}");
}

/// SO_PEERCRED: with the socket opened to everyone (chmod 0666), a client running as another
/// user (nobody) still cannot drive the VM: it gets an error naming its uid, and the VM sees no
/// request. Needs root to run the client as another user.
#[test]
fn another_users_client_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("another_users_client_is_refused: skipped: needs root to run a client as nobody");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-api-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("api.sock");
    let vm = Arc::new(FakeVm::default());
    let _server = serve(&path, vm.clone()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "other_user_client", "--ignored", "--nocapture"])
        .env("VMM_API_TEST_SOCKET", &path)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESPONSE "))
        .unwrap_or_else(|| {
            panic!(
                "no response from the child: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let v: Value = serde_json::from_str(&line["RESPONSE ".len()..]).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("uid 65534") && err.contains("root"), "{err}");
    assert_eq!(
        vm.stats.load(Ordering::SeqCst),
        0,
        "the refused client reached the VM"
    );
    // The owner still can.
    assert_eq!(
        request(&path, &json!({"cmd": "stats"})).unwrap()["ok"],
        true
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
