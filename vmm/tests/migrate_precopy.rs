//! Precopy live migration between two real `vmm --guest dirty` processes over loopback TCP:
//! the destination verifies every page; a cut connection leaves the source running and
//! passing; a corrupted stream makes the destination stop with a checksum error and exit 1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Mutex;
use std::time::Duration;

/// One migration at a time: the machine has 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());
const MEM: &str = "512M";
const CPUS: &str = "2";
/// Generous per-process limit: a stuck run fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(50);

fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("{test}: skipped: /dev/kvm is absent");
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn vmm(extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "--guest",
            "dirty",
            "--mem",
            MEM,
            "--cpus",
            CPUS,
            "--hugepages",
            "none",
            "--no-demand-paging",
            "--generations",
            "0",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

/// Forwards a child's stdout lines to a channel (and keeps them).
fn lines(child: &mut Child) -> Receiver<String> {
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

fn wait_for(rx: &Receiver<String>, needle: &str) -> Vec<String> {
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
fn finish(mut child: Child, rx: Receiver<String>) -> (i32, String, String) {
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
    let out: Vec<String> = rx.try_iter().collect();
    (code, out.join("\n"), err)
}

#[test]
fn precopy_dirty_guest_passes_on_the_destination() {
    if !kvm_or_skip("precopy_dirty_guest_passes_on_the_destination") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    // --run-for 0: the guest is stopped as soon as it runs here, so it finishes its current
    // generation only and most pages still hold what the source wrote: a page lost on the way
    // fails the replay (a longer run would overwrite every page many times and hide a loss).
    let mut dst = vmm(&["--incoming", &addr, "--run-for", "0"]);
    let dst_rx = lines(&mut dst);
    wait_for(&dst_rx, "waiting for the migration source");
    let mut src = vmm(&["--migrate-to", &addr]);
    let src_rx = lines(&mut src);
    let (scode, sout, serr) = finish(src, src_rx);
    assert_eq!(scode, 0, "source: {sout}\n{serr}");
    assert!(
        sout.contains("round 0:"),
        "a progress line per round: {sout}"
    );
    assert!(sout.contains("complete"), "{sout}");
    let (dcode, dout, derr) = finish(dst, dst_rx);
    assert_eq!(dcode, 0, "destination: {dout}\n{derr}");
    assert!(dout.contains("PASS"), "{dout}");
    // Every vCPU's replay matched every page of its slice.
    assert_eq!(
        derr.matches("dirty replay of").count(),
        2,
        "each vCPU verified: {derr}"
    );
}

#[test]
fn cut_connection_leaves_the_source_running_and_passing() {
    if !kvm_or_skip("cut_connection_leaves_the_source_running_and_passing") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // A fake destination that reads a few MB and then drops the connection.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let cutter = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < 8 << 20 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let mut src = vmm(&["--migrate-to", &addr, "--run-for", "2"]);
    let src_rx = lines(&mut src);
    assert!(cutter.join().unwrap() >= 8 << 20, "the source sent data");
    let (code, out, err) = finish(src, src_rx);
    assert!(
        err.contains("failed") && err.contains("keeps running here"),
        "{err}"
    );
    assert_eq!(code, 0, "the source's guest passes: {out}\n{err}");
    assert!(out.contains("PASS"), "{out}");
    assert_eq!(err.matches("dirty replay of").count(), 2, "{err}");
}

#[test]
fn corrupted_stream_stops_the_destination_with_exit_1() {
    if !kvm_or_skip("corrupted_stream_stops_the_destination_with_exit_1") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dst_addr = format!("127.0.0.1:{}", free_port());
    let mut dst = vmm(&["--incoming", &format!("tcp:{dst_addr}")]);
    let dst_rx = lines(&mut dst);
    wait_for(&dst_rx, "waiting for the migration source");
    // A proxy that flips one byte 3 MB into the stream (inside page data).
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let src_addr = format!("tcp:{}", proxy.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut from, _) = proxy.accept().unwrap();
        let mut to = TcpStream::connect(&dst_addr).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0usize;
        let flip = 3 << 20;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (at..at + n).contains(&flip) {
                buf[flip - at] ^= 0x5a;
            }
            at += n;
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut src = vmm(&["--migrate-to", &src_addr, "--run-for", "1"]);
    let src_rx = lines(&mut src);
    let (dcode, dout, derr) = finish(dst, dst_rx);
    assert_eq!(dcode, 1, "{dout}\n{derr}");
    assert!(derr.to_lowercase().contains("checksum"), "{derr}");
    // The source notices and keeps its guest, which still passes.
    let (scode, sout, serr) = finish(src, src_rx);
    assert!(serr.contains("keeps running here"), "{serr}");
    assert_eq!(scode, 0, "{sout}\n{serr}");
}

#[test]
fn destination_lost_after_the_pause_resumes_the_source() {
    if !kvm_or_skip("destination_lost_after_the_pause_resumes_the_source") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // A fake destination that takes the whole stream and then hangs up without the
    // guest-running acknowledgement: the source has paused its guest by then.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        while let Ok(n @ 1..) = s.read(&mut buf) {
            got += n;
        }
        got
    });
    let mut src = vmm(&["--migrate-to", &addr, "--run-for", "1"]);
    let src_rx = lines(&mut src);
    assert!(sink.join().unwrap() > 0, "the source sent its stream");
    let (code, out, err) = finish(src, src_rx);
    assert!(
        out.contains("(paused)"),
        "the source reached the final round: {out}"
    );
    assert!(err.contains("keeps running here"), "{err}");
    assert_eq!(code, 0, "the resumed guest passes: {out}\n{err}");
    assert!(out.contains("PASS"), "{out}");
    assert_eq!(err.matches("dirty replay of").count(), 2, "{err}");
}

#[test]
fn migrate_command_on_the_control_socket_moves_the_guest() {
    if !kvm_or_skip("migrate_command_on_the_control_socket_moves_the_guest") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let sock = std::env::temp_dir().join(format!("migrate-api-{}.sock", std::process::id()));
    let mut dst = vmm(&["--incoming", &addr, "--run-for", "0"]);
    let dst_rx = lines(&mut dst);
    wait_for(&dst_rx, "waiting for the migration source");
    let mut src = vmm(&["--api-socket", sock.to_str().unwrap()]);
    let src_rx = lines(&mut src);
    wait_for(&src_rx, "guest dirty on");
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    let bad = vmm::api::request(&sock, &serde_json::json!({"cmd": "migrate"})).unwrap();
    assert_eq!(bad["ok"], false, "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("\"to\""), "{bad}");
    let resp =
        vmm::api::request(&sock, &serde_json::json!({"cmd": "migrate", "to": addr})).unwrap();
    assert_eq!(resp["ok"], true, "{resp}");
    assert!(resp["migrate"]["rounds"].as_u64().unwrap() >= 2, "{resp}");
    let (scode, sout, serr) = finish(src, src_rx);
    assert_eq!(scode, 0, "{sout}\n{serr}");
    let (dcode, dout, derr) = finish(dst, dst_rx);
    assert_eq!(dcode, 0, "destination: {dout}\n{derr}");
    assert!(dout.contains("PASS"), "{dout}");
    assert_eq!(derr.matches("dirty replay of").count(), 2, "{derr}");
}

#[test]
fn migration_with_demand_paging_is_refused_with_the_fix() {
    for flag in ["--migrate-to", "--incoming"] {
        let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["--guest", "dirty", "--mem", "64M", flag, "tcp:127.0.0.1:1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {err}");
        assert!(err.contains("add --no-demand-paging"), "{flag}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "--guest",
            "dirty",
            "--no-demand-paging",
            "--migrate-to",
            "tcp:nope",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--migrate-to tcp:nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
