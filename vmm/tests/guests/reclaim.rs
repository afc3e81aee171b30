//! Reclaims under a running `stress` guest on real KVM: a storm of 1 GiB ranges, and the
//! control socket (stats, reclaim, bad requests, pause/resume) while the guest keeps running;
//! reclaims on shared memfd memory without demand paging (hole punch); a reclaim under a real
//! KVM dirty tracker is in its next harvest.

use crate::common::{hugetlb_or_skip, kvm_or_skip, serial};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{run_guest, vmm_guest};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};
use vmm::dirty::{DirtyMode, DirtyTracker, HostChanges};
use vmm::guest::layout::LOW_RESERVED;
use vmm::hypervisor::Vm;
use vmm::machine::reclaim::{madvise_dontneed, Handshake, ReclaimError, Reclaimer};
use vmm::memory::{BackingKind, GuestRam};

const GIB: u64 = 1 << 30;
const SZ_2M: u64 = 2 << 20;

#[test]
fn reclaim_storm_of_1g_ranges_on_hugetlb_2m_passes_with_zaps_and_refaults() {
    let test = "reclaim_storm_on_hugetlb_2m";
    let storm = ["--generations", "15", "--reclaim-storm", "6"];
    let Some(run) = run_guest(test, "stress", 4, 4, "2M", "2M hugetlbfs", &storm) else {
        return;
    };
    let touched_2m = run.stats()["slice_bytes"].as_u64().unwrap() * 4 / SZ_2M;
    let reclaims = run.counter("paging", "reclaims");
    assert!(
        reclaims >= 1,
        "the storm reclaimed nothing: {}",
        run.stats()
    );
    assert!(run.counter("paging", "zapped") > 0, "no stage2 leaf zapped");
    assert!(run.counter("stage2", "invalidations") >= reclaims);
    // Pages dropped while the guest used them faulted in again: more installs than pages.
    assert!(
        run.counter("stage2", "installs_2m") > touched_2m,
        "no refault: {} installs for {touched_2m} pages",
        run.counter("stage2", "installs_2m")
    );
    eprintln!(
        "{reclaims} reclaims, {} leaves zapped, {} pages re-initialised by the guest",
        run.counter("paging", "zapped"),
        run.vcpu_sum("reinit")
    );
}

#[test]
fn reclaim_storm_on_4k_pages_passes_with_zaps_and_refaults() {
    let test = "reclaim_storm_on_4k_pages";
    let storm = ["--generations", "6", "--reclaim-storm", "3"];
    let Some(run) = run_guest(test, "stress", 1, 4, "none", "4K pages", &storm) else {
        return;
    };
    let touched = run.stats()["slice_bytes"].as_u64().unwrap() * 4 / 4096;
    assert!(run.counter("paging", "reclaims") >= 1);
    assert!(run.counter("paging", "zapped") > 0);
    assert!(run.counter("stage2", "installs_4k") > touched);
}

fn request(path: &Path, req: Value) -> Value {
    vmm::api::request(path, &req).unwrap_or_else(|e| panic!("request {req}: {e}"))
}

fn raw_request(path: &Path, line: &str) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.write_all(line.as_bytes()).unwrap();
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp).unwrap();
    serde_json::from_str(&resp).expect("JSON answer")
}

fn assert_refused(resp: &Value, needle: &str) {
    assert_eq!(resp["ok"], json!(false), "{resp}");
    let msg = resp["error"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
}

#[test]
fn control_socket_during_stress_and_bad_requests_leave_the_guest_running() {
    let test = "control_socket_during_stress";
    if !kvm_or_skip(test) || !hugetlb_or_skip(test, GIB) {
        return;
    }
    let _one = serial();
    let sock = std::env::temp_dir().join(format!("vmm-guest-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "--guest",
            "stress",
            "--mem",
            "1G",
            "--cpus",
            "2",
            "--hugepages",
            "2M",
            "--generations",
            "100",
            "--expect-reclaim",
            "--log-level",
            "warn",
            "--guest-timeout",
            "300",
            "--api-socket",
        ])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no control socket after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let stats = request(&sock, json!({"cmd": "stats"}));
    assert_eq!(stats["ok"], json!(true), "{stats}");
    assert!(
        stats["stats"]["stage2"]["installs_2m"].as_u64().unwrap() >= 1,
        "{stats}"
    );

    // A good reclaim of one 2 MiB page of vCPU 0's slice (it starts at 4 MiB).
    let ok = request(&sock, json!({"cmd": "reclaim", "gpa": "4M", "len": "2M"}));
    assert_eq!(ok["ok"], json!(true), "{ok}");
    // Bad ones: unaligned, outside RAM, over the guest's code and stacks, malformed.
    assert_refused(
        &request(
            &sock,
            json!({"cmd": "reclaim", "gpa": "0x400800", "len": "4K"}),
        ),
        "aligned",
    );
    assert_refused(
        &request(&sock, json!({"cmd": "reclaim", "gpa": "8G", "len": "2M"})),
        "not inside one RAM region",
    );
    assert_refused(
        &request(&sock, json!({"cmd": "reclaim", "gpa": 0, "len": "2M"})),
        "slice memory only",
    );
    assert_refused(
        &raw_request(&sock, "{\"cmd\": \"reclaim\", \n"),
        "malformed JSON",
    );
    assert_refused(&request(&sock, json!({"cmd": "reboot"})), "unknown command");

    assert_eq!(request(&sock, json!({"cmd": "pause"}))["ok"], json!(true));
    // A fault event a handler read just before the pause may still be in its batch: the kick
    // takes the vCPU out of its wait, and the handler counts the event after. Let it drain.
    std::thread::sleep(Duration::from_millis(100));
    let a = request(&sock, json!({"cmd": "stats"}));
    std::thread::sleep(Duration::from_millis(200));
    let b = request(&sock, json!({"cmd": "stats"}));
    assert_eq!(
        a["stats"]["paging"]["events_missing"], b["stats"]["paging"]["events_missing"],
        "faults while paused"
    );
    assert_eq!(request(&sock, json!({"cmd": "resume"}))["ok"], json!(true));

    let out = child.wait_with_output().expect("vmm output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.lines().any(|l| l == "PASS"), "{stdout}");
    assert!(!sock.exists(), "the socket is removed when the VM ends");
}

/// Bug: with `--memory-backend shared --no-demand-paging` the storm used MADV_DONTNEED, which
/// leaves a MAP_SHARED memfd's pages in the file: the guest read its old data, never zeroes.
/// The stress guest counts the pages it finds zeroed by a reclaim and re-initialises; a storm
/// that really drops pages makes that count positive.
#[test]
fn shared_memfd_without_demand_paging_reclaims_read_zero_and_pass() {
    let test = "shared_memfd_no_demand_paging_storm";
    if !kvm_or_skip(test) {
        return;
    }
    let _one = serial();
    let run = vmm_guest(
        test,
        &[
            "--guest",
            "stress",
            "--mem",
            "1G",
            "--cpus",
            "2",
            "--memory-backend",
            "shared",
            "--hugepages",
            "none",
            "--no-demand-paging",
            "--generations",
            "8",
            "--reclaim-storm",
            "2",
        ],
    );
    run.assert_pass();
    let reinit = run.vcpu_sum("reinit");
    assert!(
        reinit > 0,
        "no page read zero after the storm's reclaims: {}",
        run.stats()
    );
    eprintln!("{reinit} pages found zeroed and re-initialised by the guest");
}

/// A reclaim while a migration tracks dirty pages through KVM's dirty bitmap (which sees only
/// guest writes, never a host drop) is in the tracker's next harvest, with the page of the
/// reclaim sequence word; during the last round reclaims are refused and the range keeps its
/// content.
#[test]
fn a_reclaim_under_a_kvm_bitmap_tracker_is_in_the_next_harvest() {
    let test = "reclaim_under_kvm_bitmap_tracker";
    if !kvm_or_skip(test) {
        return;
    }
    const PAGE: u64 = 4096;
    const SEQ_GPA: u64 = 0x3000;
    let ram = GuestRam::new(64 << 20, BackingKind::Small).expect("guest RAM");
    let vm = Vm::new(&ram, 1).expect("VM");
    let regions: Vec<_> = ram.regions().collect();
    let mem = ram.memory().clone();
    let tracker = DirtyTracker::new_kvm(&vm, &regions, DirtyMode::KvmBitmap).expect("tracker");
    let host = std::sync::Arc::new(HostChanges::new());
    let ram_map: Vec<(u64, u64, u64)> = regions
        .iter()
        .map(|r| (r.gpa, r.len, r.host_addr))
        .collect();
    let reclaimer = Reclaimer::new(
        mem.clone(),
        Some(Handshake {
            seq_gpa: SEQ_GPA,
            reserved_below: LOW_RESERVED,
        }),
        ram_map.iter().map(|&(g, l, _)| (g, l)).collect(),
        ram.page_size(),
        Box::new(move |gpa, len| {
            let &(r, _, h) = ram_map
                .iter()
                .find(|(r, l, _)| gpa >= *r && gpa + len <= r + l)
                .expect("in RAM");
            madvise_dontneed(h + (gpa - r), len)
        }),
        host.clone(),
    );
    let range = (LOW_RESERVED + 0x10_000, 0x4000);
    for p in 0..range.1 / PAGE {
        mem.write_obj(0xabcd_u64, GuestAddress(range.0 + p * PAGE))
            .unwrap();
    }
    // The migration starts: track, then the first harvest (the bitmap starts all set).
    host.track(tracker.vmm_writes().clone());
    tracker.harvest().expect("first harvest");
    assert_eq!(
        tracker.harvest().unwrap().count(),
        0,
        "nothing ran, nothing dirty"
    );

    reclaimer.reclaim(range.0, range.1).expect("reclaim");
    let zero: u64 = mem.read_obj(GuestAddress(range.0 + PAGE)).unwrap();
    assert_eq!(zero, 0, "the reclaimed range reads zero on the source");
    let bm = tracker.harvest().unwrap();
    let got: Vec<u64> = bm.iter().collect();
    let mut want = vec![SEQ_GPA];
    want.extend((0..range.1 / PAGE).map(|p| range.0 + p * PAGE));
    assert_eq!(got, want, "the zeroed pages and the sequence word's page");
    assert_eq!(tracker.harvest().unwrap().count(), 0, "taken once");

    // Last round: refused, nothing changes, nothing to send.
    host.seal();
    let other = LOW_RESERVED + 0x40_000;
    mem.write_obj(0x1234_u64, GuestAddress(other)).unwrap();
    let e = reclaimer.reclaim(other, PAGE).unwrap_err();
    assert!(matches!(e, ReclaimError::Migrating { .. }), "{e}");
    assert_eq!(mem.read_obj::<u64>(GuestAddress(other)).unwrap(), 0x1234);
    assert_eq!(tracker.harvest().unwrap().count(), 0);
    tracker.stop().unwrap();
}
