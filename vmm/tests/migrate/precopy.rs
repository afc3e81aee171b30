//! Precopy live migration between two real `vmm --guest dirty` processes over loopback TCP:
//! the destination verifies every page; a cut connection leaves the source running and
//! passing; a corrupted stream makes the destination stop with a checksum error and exit 1.

use crate::common::{kvm_or_skip, serial};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::Duration;

use vmm::migrate::{Chunk, StreamReader, StreamWriter};

use crate::util::{
    self, api_guest, assert_guest_passed, assert_source_passed_after_failed_migration, finish,
    lines, listening, migrate_json_path, read_migrate_json, run_to_end,
};

/// The precopy suite runs without demand paging (KVM populates RAM), as it was first built;
/// migrate_modes runs every mode with demand paging on.
fn vmm(extra: &[&str]) -> Child {
    let mut args = vec!["--no-demand-paging"];
    args.extend_from_slice(extra);
    util::vmm(&args)
}

#[test]
fn precopy_dirty_guest_passes_on_the_destination() {
    if !kvm_or_skip("precopy_dirty_guest_passes_on_the_destination") {
        return;
    }
    let _g = serial();
    // --run-for 0: the guest is stopped as soon as it runs here, so it finishes its current
    // generation only and most pages still hold what the source wrote: a page lost on the way
    // fails the replay (a longer run would overwrite every page many times and hide a loss).
    let dst = listening(vmm, &["--run-for", "0"]);
    let json = migrate_json_path("migrate-precopy");
    let (scode, sout, serr) = run_to_end(vmm(&[
        "--migrate-to",
        &dst.addr,
        "--migrate-json",
        json.to_str().unwrap(),
    ]));
    assert_eq!(scode, 0, "source: {sout}\n{serr}");
    assert!(
        sout.contains("round 0:"),
        "a progress line per round: {sout}"
    );
    assert!(sout.contains("complete"), "{sout}");
    // The --migrate-json summary: precopy, every round listed, the full pass covers RAM.
    let doc = read_migrate_json(&json);
    assert_eq!(doc["mode"], "precopy", "{doc}");
    assert_eq!(doc["dirty_mode"], "kvm-bitmap", "{doc}");
    assert!(doc["postcopy"].is_null(), "{doc}");
    assert_eq!(doc["vcpus"], 2, "{doc}");
    assert_eq!(doc["ram_bytes"], 512u64 << 20, "{doc}");
    let rounds = doc["rounds"].as_array().expect("rounds");
    assert!(rounds.len() >= 2, "full pass and the paused round: {doc}");
    assert_eq!(rounds[0]["dirty_pages"], (512u64 << 20) / 4096, "{doc}");
    let bytes: u64 = rounds.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    assert!(bytes <= doc["bytes_sent"].as_u64().unwrap(), "{doc}");
    assert!(doc["downtime_ms"].as_f64().unwrap() <= doc["total_ms"].as_f64().unwrap());
    assert_guest_passed("destination", &dst.finish());
}

#[test]
fn cut_connection_leaves_the_source_running_and_passing() {
    if !kvm_or_skip("cut_connection_leaves_the_source_running_and_passing") {
        return;
    }
    let _g = serial();
    // A fake destination that reads a few MB and then drops the connection; it never
    // acknowledges a round, so a source waiting for that gets the cut there instead.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let cutter = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
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
    assert!(
        cutter.join().unwrap() > 0,
        "the source started the migration"
    );
    let src = finish(src, src_rx);
    let err = &src.2;
    assert!(
        err.contains("failed") && err.contains("keeps running here"),
        "{err}"
    );
    assert_source_passed_after_failed_migration("the source's guest", &src);
}

#[test]
fn corrupted_stream_stops_the_destination_with_exit_1() {
    if !kvm_or_skip("corrupted_stream_stops_the_destination_with_exit_1") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &[]);
    // A proxy that flips one byte 3 MB into the stream (inside page data).
    let dst_addr = dst.host_port().to_owned();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let src_addr = format!("tcp:{}", proxy.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut from, _) = proxy.accept().unwrap();
        let mut to = TcpStream::connect(&dst_addr).unwrap();
        // The destination's replies (round acknowledgements) go back unchanged.
        let (mut back_from, mut back_to) = (to.try_clone().unwrap(), from.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
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
    // The guest writes for a second first, so that its full pass carries far more than
    // 3 MB of page data (pages never written go as zero runs).
    let mut src = vmm(&[
        "--migrate-to",
        &src_addr,
        "--migrate-delay-ms",
        "1000",
        "--run-for",
        "2",
    ]);
    let src_rx = lines(&mut src);
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 1, "{dout}\n{derr}");
    assert!(derr.to_lowercase().contains("checksum"), "{derr}");
    // The source notices and keeps its guest, which still passes.
    let (scode, sout, serr) = finish(src, src_rx);
    assert!(serr.contains("keeps running here"), "{serr}");
    assert_eq!(scode, vmm::exit::EXIT_MIGRATE_FAILED, "{sout}\n{serr}");
    assert!(sout.contains("PASS"), "{sout}");
}

#[test]
fn destination_lost_after_the_pause_resumes_the_source() {
    if !kvm_or_skip("destination_lost_after_the_pause_resumes_the_source") {
        return;
    }
    let _g = serial();
    // A fake destination that takes the whole stream, acknowledging each round as a real
    // one does, and then hangs up without the guest-running acknowledgement: the source has
    // paused its guest by then.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // Magic and version, then the header chunk (kind, length, payload, CRC), unchecked.
        let mut start = [0u8; 20];
        s.read_exact(&mut start).unwrap();
        let header_len = u32::from_le_bytes(start[16..20].try_into().unwrap()) as usize;
        let mut header = vec![0u8; header_len + 4];
        s.read_exact(&mut header).unwrap();
        let mut acks = StreamWriter::headless(s.try_clone().unwrap());
        let mut r = StreamReader::headless(s);
        let mut rounds = 0;
        loop {
            match r.next_chunk().unwrap() {
                Chunk::Round { round, .. } => {
                    acks.round_applied(round).unwrap();
                    rounds += 1;
                }
                Chunk::End => break,
                _ => {}
            }
        }
        rounds
    });
    let mut src = vmm(&["--migrate-to", &addr, "--run-for", "1"]);
    let src_rx = lines(&mut src);
    assert!(sink.join().unwrap() > 1, "the source sent its rounds");
    let src = finish(src, src_rx);
    let (out, err) = (&src.1, &src.2);
    assert!(
        out.contains("(paused)"),
        "the source reached the final round: {out}"
    );
    assert!(err.contains("keeps running here"), "{err}");
    assert_source_passed_after_failed_migration("the resumed guest", &src);
}

#[test]
fn migrate_command_on_the_control_socket_moves_the_guest() {
    if !kvm_or_skip("migrate_command_on_the_control_socket_moves_the_guest") {
        return;
    }
    let _g = serial();
    let sock = std::env::temp_dir().join(format!("migrate-api-{}.sock", std::process::id()));
    let dst = listening(vmm, &["--run-for", "0"]);
    let (src, src_rx) = api_guest(vmm, &sock, &[]);
    let bad = vmm::api::request(&sock, &serde_json::json!({"cmd": "migrate"})).unwrap();
    assert_eq!(bad["ok"], false, "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("\"to\""), "{bad}");
    let resp = vmm::api::request(
        &sock,
        &serde_json::json!({"cmd": "migrate", "to": dst.addr}),
    )
    .unwrap();
    assert_eq!(resp["ok"], true, "{resp}");
    assert!(
        resp["migrate"]["rounds"].as_array().unwrap().len() >= 2,
        "{resp}"
    );
    assert_eq!(resp["migrate"]["mode"], "precopy", "{resp}");
    let (scode, sout, serr) = finish(src, src_rx);
    assert_eq!(scode, 0, "{sout}\n{serr}");
    assert_guest_passed("destination", &dst.finish());
}

#[test]
fn migration_flag_misuse_is_refused_with_the_fix() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["--guest", "dirty", "--mem", "64M"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (args, needle) in [
        (
            &["--incoming", "tcp:127.0.0.1:1", "--dirty-mode", "kvm-ring"][..],
            "--dirty-mode is a migration source option",
        ),
        (
            &["--incoming", "tcp:127.0.0.1:1", "--postcopy-after", "1"][..],
            "--postcopy-after is a migration source option",
        ),
        (
            &["--incoming", "tcp:127.0.0.1:1", "--migrate-json", "/tmp/x"][..],
            "--migrate-json is a migration source option",
        ),
        (&["--dirty-mode", "kvm-ring"][..], "this VM never migrates"),
        (
            &["--migrate-to", "tcp:127.0.0.1:1", "--dirty-mode", "ring"][..],
            "use kvm-bitmap, kvm-ring or stage2-wp",
        ),
        (
            &[
                "--migrate-to",
                "tcp:127.0.0.1:1",
                "--dirty-mode",
                "stage2-wp",
                "--no-demand-paging",
            ][..],
            "drop --no-demand-paging",
        ),
        (
            &["--migrate-to", "tcp:127.0.0.1:1", "--postcopy-after", "0"][..],
            "give at least 1",
        ),
        (
            &["--api-socket", "/tmp/x.sock", "--postcopy-after", "2"][..],
            "vmmctl migrate --to ADDR --postcopy-after N",
        ),
        (
            &[
                "--migrate-to",
                "tcp:127.0.0.1:1",
                "--incoming",
                "tcp:127.0.0.1:2",
            ][..],
            "either the source or the destination",
        ),
        (&["--stay"][..], "add --api-socket PATH"),
        (
            &[
                "--stay",
                "--api-socket",
                "/tmp/x.sock",
                "--migrate-to",
                "tcp:127.0.0.1:1",
            ][..],
            "drop --migrate-to",
        ),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
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

/// A destination with --prefault populates its RAM once the source's header has said how much,
/// before any page arrives, says so, receives into memory that is all present (every page
/// data lands in is resident, unlike the other tests' destinations), and its guest passes.
#[test]
fn prefaulted_destination_receives_and_passes() {
    if !kvm_or_skip("prefaulted_destination_receives_and_passes") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &["--run-for", "0", "--prefault"]);
    let (scode, sout, serr) = run_to_end(vmm(&[
        "--migrate-to",
        &dst.addr,
        "--migrate-delay-ms",
        "500",
    ]));
    assert_eq!(scode, 0, "source: {sout}\n{serr}");
    let dst = dst.finish();
    assert!(
        dst.1.lines().any(|l| l.starts_with("prefaulted 512M")),
        "{}",
        dst.1
    );
    let received = dst.1.find("received ").expect("a received line");
    assert!(
        dst.1.find("prefaulted 512M").unwrap() < received,
        "prefaulted before receiving: {}",
        dst.1
    );
    assert_guest_passed("the prefaulted destination", &dst);
}

/// A VM paused before its migration stays paused through it: a reclaim meanwhile is refused
/// (its RAM is sent as it is, uncopied), a failed migration leaves it paused, and the next
/// migration finds nothing dirtied between its rounds. Then the destination runs it and
/// passes.
#[test]
fn paused_vm_stays_paused_through_its_migrations_and_refuses_reclaims() {
    if !kvm_or_skip("paused_vm_stays_paused_through_its_migrations_and_refuses_reclaims") {
        return;
    }
    let _g = serial();
    let sock = std::env::temp_dir().join(format!("migrate-paused-{}.sock", std::process::id()));
    let req = |v: serde_json::Value| vmm::api::request(&sock, &v).unwrap();
    // A fake destination that reads the start of the stream, says so, and cuts when told:
    // it never acknowledges round 0, so the migration waits inside it meanwhile.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = format!("tcp:{}", listener.local_addr().unwrap());
    let (reading_tx, reading_rx) = std::sync::mpsc::channel();
    let (cut_tx, cut_rx) = std::sync::mpsc::channel::<()>();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < 4 << 20 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        reading_tx.send(got).unwrap();
        let _ = cut_rx.recv_timeout(Duration::from_secs(60));
        got
    });
    // Demand paging on (the suite's default is off): reclaims need the pager.
    let (src, src_rx) = api_guest(util::vmm, &sock, &[]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(req(serde_json::json!({"cmd": "pause"}))["ok"], true);
    let sock2 = sock.clone();
    let first = std::thread::spawn(move || {
        vmm::api::request(
            &sock2,
            &serde_json::json!({"cmd": "migrate", "to": fake_addr}),
        )
        .unwrap()
    });
    let got = reading_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the fake destination reads the stream");
    assert!(got >= 4 << 20, "the migration is sending: {got} bytes");
    let refused = req(serde_json::json!({"cmd": "reclaim", "gpa": "0x10000000", "len": "2M"}));
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("a migration of this paused VM"),
        "{refused}"
    );
    cut_tx.send(()).unwrap();
    fake.join().unwrap();
    let failed = first.join().unwrap();
    assert_eq!(failed["ok"], false, "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("paused as it was"),
        "{failed}"
    );
    // Still paused: a migration now sees no page written between its rounds.
    let dst = listening(vmm, &["--run-for", "1"]);
    let done = req(serde_json::json!({"cmd": "migrate", "to": dst.addr}));
    assert_eq!(done["ok"], true, "{done}");
    let rounds = done["migrate"]["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "{done}");
    assert!(
        rounds[1..].iter().all(|r| r["dirty_pages"] == 0),
        "nothing written after the full pass: {done}"
    );
    let (scode, sout, serr) = finish(src, src_rx);
    assert_eq!(scode, 0, "{sout}\n{serr}");
    assert_guest_passed("destination", &dst.finish());
    let _ = std::fs::remove_file(&sock);
}

/// A destination given nothing but `--incoming ADDR` (and its own `--run-for`) builds the VM
/// from the stream's header: memory size, vCPUs, backing, and the guest with the parameters
/// its replay check needs.
#[test]
fn destination_with_only_incoming_takes_the_vm_from_the_stream() {
    if !kvm_or_skip("destination_with_only_incoming_takes_the_vm_from_the_stream") {
        return;
    }
    let _g = serial();
    let bare = |args: &[&str]| -> Child {
        Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(args)
            .args(["--no-demand-paging", "--run-for", "0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn vmm")
    };
    let dst = listening(bare, &[]);
    let (scode, sout, serr) = run_to_end(vmm(&["--migrate-to", &dst.addr]));
    assert_eq!(scode, 0, "source: {sout}\n{serr}");
    let d = dst.finish();
    assert!(
        d.1.contains("incoming: dirty on 2 vCPU(s), 512M of RAM"),
        "the destination says what it received: {}",
        d.1
    );
    assert_guest_passed("destination", &d);
}

/// A flag given on the destination that disagrees with the source is refused before any page
/// moves, with both values; the source keeps running and passes.
#[test]
fn destination_flag_disagreeing_with_the_source_is_refused_with_both_values() {
    if !kvm_or_skip("destination_flag_disagreeing_with_the_source_is_refused_with_both_values") {
        return;
    }
    let _g = serial();
    let half = |args: &[&str]| -> Child {
        Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(args)
            .args(["--guest", "dirty", "--mem", "256M"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn vmm")
    };
    let dst = listening(half, &[]);
    let src = vmm(&["--migrate-to", &dst.addr, "--run-for", "1"]);
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 1, "{dout}\n{derr}");
    assert!(
        derr.contains("--mem 256M here, but the migrating VM has --mem 512M"),
        "{derr}"
    );
    let s = run_to_end(src);
    assert!(s.2.contains("keeps running here"), "{}", s.2);
    assert_source_passed_after_failed_migration("the source's guest", &s);
}
