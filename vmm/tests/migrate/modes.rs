//! Live migration in every dirty-tracking mode (kvm-bitmap, kvm-ring, stage2-wp), precopy and
//! postcopy, between two real `vmm --guest dirty` processes with demand paging on both ends:
//! the destination's replay of every write must PASS. Also: a connection cut in the middle of
//! postcopy stops both ends with exit 1 and says why; a cut in the discard round before the
//! pause leaves the source's guest running; a postcopy request to a destination without
//! demand paging is refused and the source's guest goes on and passes.

use crate::common::{free_2m_pages_or_skip, kvm_or_skip, serial};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::hosts::TwoHosts;
use crate::util::{
    api_guest, assert_guest_passed, assert_source_passed_after_failed_migration, finish, guest_on,
    lines, listening, listening_at, migrate_json_path, read_migrate_json, run_to_end, vmm, vmm_on,
    vmm_on_host,
};

/// The source's flags of a migration to `addr` of at most 4 rounds, starting `delay_ms` after
/// the guest, its figures written to `json`.
fn migrate_to<'a>(addr: &'a str, json: &'a std::path::Path, delay_ms: &'a str) -> Vec<&'a str> {
    vec![
        "--migrate-to",
        addr,
        "--migrate-json",
        json.to_str().unwrap(),
        "--max-rounds",
        "4",
        "--migrate-delay-ms",
        delay_ms,
    ]
}

/// Migrates a writing `dirty` guest with `src_flags`; the destination stops the guest as
/// soon as it runs (`--run-for 0`), so most pages still hold what the source wrote and a lost
/// page fails the replay. Between two network namespaces ([`TwoHosts`]) when `between_hosts`,
/// else over loopback. Returns the source's `--migrate-json` document.
fn migrate_and_verify(
    test: &str,
    src_flags: &[&str],
    between_hosts: bool,
) -> Option<serde_json::Value> {
    migrate_and_verify_on(test, "none", src_flags, between_hosts)
}

/// [`migrate_and_verify`] with both ends on `--hugepages backing`.
fn migrate_and_verify_on(
    test: &str,
    backing: &str,
    src_flags: &[&str],
    between_hosts: bool,
) -> Option<serde_json::Value> {
    migrate_and_verify_with(test, backing, src_flags, &[], between_hosts)
}

/// [`migrate_and_verify_on`] with `dst_flags` for the destination too.
pub(crate) fn migrate_and_verify_with(
    test: &str,
    backing: &str,
    src_flags: &[&str],
    dst_flags: &[&str],
    between_hosts: bool,
) -> Option<serde_json::Value> {
    if !kvm_or_skip(test) {
        return None;
    }
    let _g = serial();
    // Both ends' RAM on 2 MiB pages: 512M each.
    if backing == "2M" && !free_2m_pages_or_skip(test, 2 * 256) {
        return None;
    }
    let hosts = match between_hosts {
        true => Some(TwoHosts::new(test)?),
        false => None,
    };
    let json = migrate_json_path(test);
    let mut dst_args = vec!["--run-for", "0"];
    dst_args.extend_from_slice(dst_flags);
    let dst = match &hosts {
        Some(h) => listening_at(
            h.dst_addr(),
            |a| vmm_on_host(Some(&h.dst), backing, a),
            &dst_args,
        ),
        None => listening(|a| vmm_on(backing, a), &dst_args),
    };
    // The guest writes for a while first: there are dirty pages to move.
    let mut args = migrate_to(&dst.addr, &json, "300");
    args.extend_from_slice(src_flags);
    let src_ns = hosts.as_ref().map(|h| h.src.as_str());
    let (scode, sout, serr) = run_to_end(vmm_on_host(src_ns, backing, &args));
    assert_eq!(scode, 0, "source: {sout}\n{serr}");
    assert!(
        sout.contains("round 0:"),
        "a progress line per round: {sout}"
    );
    assert!(sout.contains("complete"), "{sout}");
    let dst = dst.finish();
    assert_guest_passed("destination", &dst);
    let dout = &dst.1;
    let doc = read_migrate_json(&json);
    if doc["mode"] == "postcopy" {
        assert!(
            dout.contains("faults served on demand"),
            "the destination's postcopy figures: {dout}"
        );
        // The discard round dropped the stale copies of its dirty pages before the pause.
        let discard = doc["rounds"].as_array().unwrap().last().unwrap().clone();
        if discard["dirty_pages"].as_u64().unwrap() > 0 {
            let early = dout
                .split("stale copies dropped: ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("the destination's drop figures: {dout}"));
            assert!(early > 0, "runs dropped before the pause: {dout}");
        }
    }
    Some(doc)
}

pub(crate) fn check_precopy(doc: &serde_json::Value, mode: &str) {
    assert_eq!(doc["mode"], "precopy", "{doc}");
    assert_eq!(doc["dirty_mode"], mode, "{doc}");
    assert!(doc["postcopy"].is_null(), "{doc}");
    assert!(doc["rounds"].as_array().unwrap().len() >= 2, "{doc}");
}

pub(crate) fn check_postcopy(doc: &serde_json::Value, mode: &str) {
    assert_eq!(doc["mode"], "postcopy", "{doc}");
    assert_eq!(doc["dirty_mode"], mode, "{doc}");
    // --postcopy-after 2: the full pass and one dirty round, then the discard round (no page
    // data: 12 bytes per run and a chunk header or two), then the switch.
    let rounds = doc["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "{doc}");
    let discard = &rounds[2];
    let runs_bytes = 12 * discard["dirty_pages"].as_u64().unwrap();
    assert!(
        discard["bytes"].as_u64().unwrap() <= runs_bytes + 256,
        "the discard round carries no page data: {discard}"
    );
    let pc = &doc["postcopy"];
    let moved = pc["requested_pages"].as_u64().unwrap() + pc["pushed_pages"].as_u64().unwrap();
    assert!(moved > 0, "pages moved after the switch: {doc}");
}

/// 2 MiB hugetlbfs on both ends: pages move and are placed in whole huge pages (the
/// destination drops and the source owes 2 MiB at a time).
#[test]
fn postcopy_on_2m_huge_pages_passes() {
    if let Some(doc) = migrate_and_verify_on(
        "postcopy_on_2m_huge_pages_passes",
        "2M",
        &["--postcopy-after", "2"],
        false,
    ) {
        check_postcopy(&doc, "kvm-bitmap");
        // Everything after the switch moves in whole 2 MiB pages.
        let pc = &doc["postcopy"];
        let moved = pc["requested_pages"].as_u64().unwrap() + pc["pushed_pages"].as_u64().unwrap();
        assert_eq!(moved % 512, 0, "{doc}");
    }
}

/// Migrates with dirty mode `mode` (the default, kvm-bitmap, without the flag), in precopy or
/// postcopy after 2 rounds, over loopback or between two hosts, and checks the source's
/// summary.
fn passes_in(test: &str, mode: &str, postcopy: bool, between_hosts: bool) {
    let mut flags = Vec::new();
    if mode != "kvm-bitmap" {
        flags.extend(["--dirty-mode", mode]);
    }
    if postcopy {
        flags.extend(["--postcopy-after", "2"]);
    }
    if let Some(doc) = migrate_and_verify(test, &flags, between_hosts) {
        match postcopy {
            false => check_precopy(&doc, mode),
            true => check_postcopy(&doc, mode),
        }
    }
}

/// Two tests per (name, dirty mode, postcopy) row, each running [`passes_in`]: one over
/// loopback, one between two network namespaces (`NAME_between_hosts`).
macro_rules! mode_tests {
    ($($name:ident, $hosts:ident: $mode:literal, $postcopy:literal;)*) => {$(
        #[test]
        fn $name() {
            passes_in(stringify!($name), $mode, $postcopy, false);
        }
        #[test]
        fn $hosts() {
            passes_in(stringify!($hosts), $mode, $postcopy, true);
        }
    )*};
}

mode_tests! {
    precopy_kvm_bitmap_passes, precopy_kvm_bitmap_passes_between_hosts: "kvm-bitmap", false;
    precopy_kvm_ring_passes, precopy_kvm_ring_passes_between_hosts: "kvm-ring", false;
    precopy_stage2_wp_passes, precopy_stage2_wp_passes_between_hosts: "stage2-wp", false;
    postcopy_kvm_bitmap_passes, postcopy_kvm_bitmap_passes_between_hosts: "kvm-bitmap", true;
    postcopy_kvm_ring_passes, postcopy_kvm_ring_passes_between_hosts: "kvm-ring", true;
    postcopy_stage2_wp_passes, postcopy_stage2_wp_passes_between_hosts: "stage2-wp", true;
}

/// Chunk kind of page data on the wire (stream.rs `kind::PAGES`).
const KIND_PAGES: u32 = 2;
/// Chunk kind of a discard list on the wire (stream.rs `kind::DISCARD`).
const KIND_DISCARD: u32 = 11;
/// Chunk kind of the postcopy switch on the wire (stream.rs `kind::POSTCOPY`).
const KIND_POSTCOPY: u32 = 12;
/// Magic and version before the first chunk.
const STREAM_START: usize = 12;
/// Frame bytes around a payload: kind, len, crc.
const FRAME: usize = 12;

/// Reads one chunk frame from `from` into a byte vector (kind, whole frame); None at EOF.
fn read_frame(from: &mut TcpStream) -> Option<(u32, Vec<u8>)> {
    let mut head = [0u8; 8];
    from.read_exact(&mut head).ok()?;
    let kind = u32::from_le_bytes(head[..4].try_into().unwrap());
    let len = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
    let mut frame = head.to_vec();
    frame.resize(len + FRAME, 0);
    from.read_exact(&mut frame[8..]).ok()?;
    Some((kind, frame))
}

/// What the proxy does with a source-to-destination chunk.
enum Step {
    /// Forward it.
    Pass,
    /// Forward it, then cut both directions.
    Cut,
    /// Forward it, then pass nothing more from the source while holding both connections
    /// open (a source that stops answering) for [`HANG`].
    Hang,
}

/// How long a [`Step::Hang`] proxy holds the connections open.
const HANG: std::time::Duration = std::time::Duration::from_secs(8);

/// A proxy between a source and the destination at `dst_addr` that passes the stream chunk by
/// chunk, calling `step(kind, frame, n)` on each chunk from the source (n = chunks since the
/// postcopy switch, `None` before it) with the count of chunks the destination sent back so
/// far. Returns the address for the source's --migrate-to and a handle whose result says
/// whether the switch went through.
fn chunk_proxy(
    dst_addr: &str,
    mut step: impl FnMut(u32, &mut Vec<u8>, Option<u32>, u64) -> Step + Send + 'static,
) -> (String, std::thread::JoinHandle<bool>) {
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let src_addr = format!("tcp:{}", proxy.local_addr().unwrap());
    let dst_addr = dst_addr.to_owned();
    let handle = std::thread::spawn(move || {
        let back_chunks = Arc::new(AtomicU64::new(0));
        let (mut from_src, _) = proxy.accept().unwrap();
        let mut to_dst = TcpStream::connect(&dst_addr).unwrap();
        let (mut from_dst, mut to_src) =
            (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        let back = back_chunks.clone();
        std::thread::spawn(move || {
            while let Some((_, f)) = read_frame(&mut from_dst) {
                if to_src.write_all(&f).is_err() {
                    break;
                }
                back.fetch_add(1, Ordering::SeqCst);
            }
            // The destination is gone: so is the source's connection.
            let _ = to_src.shutdown(Shutdown::Both);
        });
        let mut start = [0u8; STREAM_START];
        from_src.read_exact(&mut start).unwrap();
        to_dst.write_all(&start).unwrap();
        let mut after_switch = None;
        while let Some((kind, mut f)) = read_frame(&mut from_src) {
            if let Some(n) = after_switch.as_mut() {
                *n += 1;
            }
            let what = step(
                kind,
                &mut f,
                after_switch,
                back_chunks.load(Ordering::SeqCst),
            );
            if to_dst.write_all(&f).is_err() {
                break;
            }
            if kind == KIND_POSTCOPY {
                after_switch = Some(0u32);
            }
            match what {
                Step::Pass => {}
                Step::Cut => break,
                Step::Hang => {
                    std::thread::sleep(HANG);
                    break;
                }
            }
        }
        let _ = to_dst.shutdown(Shutdown::Both);
        let _ = from_src.shutdown(Shutdown::Both);
        after_switch.is_some()
    });
    (src_addr, handle)
}

/// A source that migrates to `to` (a proxy), switching to postcopy after `after` rounds, once
/// its guest has written for 300 ms; with its output lines.
fn postcopy_source(
    to: &str,
    after: &str,
    extra: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut args = vec![
        "--migrate-to",
        to,
        "--postcopy-after",
        after,
        "--migrate-delay-ms",
        "300",
    ];
    args.extend_from_slice(extra);
    let mut src = vmm(&args);
    let rx = lines(&mut src);
    (src, rx)
}

#[test]
fn connection_cut_during_postcopy_stops_both_ends_with_exit_1() {
    if !kvm_or_skip("connection_cut_during_postcopy_stops_both_ends_with_exit_1") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &["--run-for", "0"]);
    // Once the destination's guest runs (DEST_INFO and GUEST_RUNNING went back) and some
    // postcopy pages went forward, cut: the source is gone in the middle of postcopy.
    let (src_addr, cutter) = chunk_proxy(dst.host_port(), |_, _, n, back| match n {
        Some(n) if n >= 64 && back >= 2 => Step::Cut,
        _ => Step::Pass,
    });
    let (src, src_rx) = postcopy_source(&src_addr, "2", &[]);
    assert!(
        cutter.join().unwrap(),
        "the stream reached the postcopy switch"
    );
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 1, "destination: {dout}\n{derr}");
    assert!(
        derr.contains("the guest cannot continue"),
        "the destination says why: {derr}"
    );
    assert!(!dout.contains("\nPASS"), "{dout}");
    let (scode, sout, serr) = finish(src, src_rx);
    assert_eq!(scode, 1, "source: {sout}\n{serr}");
    assert!(
        serr.contains("during postcopy"),
        "the source says why: {serr}"
    );
}

/// A postcopy source that stops answering the destination's page requests and pushing pages,
/// without closing the connection (a proxy holds it open and passes nothing more): the
/// destination does not wait for ever. Its read of the owed pages fails after
/// `--migrate-timeout` and it stops with exit code 1 naming the limit; the source, whose
/// pushes nobody takes, stops the same way.
#[test]
fn unanswered_postcopy_page_requests_time_out() {
    if !kvm_or_skip("unanswered_postcopy_page_requests_time_out") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &["--run-for", "0", "--migrate-timeout", "2"]);
    let (src_addr, proxy) = chunk_proxy(dst.host_port(), |_, _, n, back| match n {
        Some(n) if n >= 64 && back >= 2 => Step::Hang,
        _ => Step::Pass,
    });
    let (src, src_rx) = postcopy_source(&src_addr, "2", &["--migrate-timeout", "2"]);
    let t = std::time::Instant::now();
    let (dcode, dout, derr) = dst.finish();
    let took = t.elapsed();
    assert_eq!(dcode, 1, "destination: {dout}\n{derr}");
    assert!(
        derr.contains("sent nothing for 2 s (--migrate-timeout)"),
        "the destination names the limit: {derr}"
    );
    assert!(!dout.contains("\nPASS"), "{dout}");
    assert!(
        took < HANG,
        "the destination waited {took:?}, as long as the proxy hung"
    );
    let (scode, sout, serr) = finish(src, src_rx);
    assert_eq!(scode, 1, "source: {sout}\n{serr}");
    assert!(
        serr.contains("during postcopy"),
        "the source says why: {serr}"
    );
    assert!(
        proxy.join().unwrap(),
        "the stream reached the postcopy switch"
    );
}

#[test]
fn connection_cut_in_the_discard_round_leaves_the_source_running_and_passing() {
    if !kvm_or_skip("connection_cut_in_the_discard_round_leaves_the_source_running_and_passing") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &["--run-for", "0"]);
    // The first discard list goes before the source pauses (the discard round): forward it
    // so that the destination drops its stale copies, then cut. The guest never left the
    // source, which must keep running it.
    let (src_addr, cutter) = chunk_proxy(dst.host_port(), |kind, _, n, _| {
        if n.is_none() && kind == KIND_DISCARD {
            Step::Cut
        } else {
            Step::Pass
        }
    });
    let (src, src_rx) = postcopy_source(&src_addr, "1", &["--run-for", "2"]);
    assert!(!cutter.join().unwrap(), "cut before the postcopy switch");
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 1, "destination: {dout}\n{derr}");
    assert!(!dout.contains("\nPASS"), "{dout}");
    let src = finish(src, src_rx);
    assert!(
        src.1.contains("round 0:") && !src.1.contains("switching to postcopy"),
        "the cut came after the full pass and before the pause: {}",
        src.1
    );
    assert!(
        src.2.contains("failed") && src.2.contains("keeps running here"),
        "the source says its guest stays: {}",
        src.2
    );
    assert_source_passed_after_failed_migration("the source's guest", &src);
}

#[test]
fn corrupted_postcopy_page_stops_the_destination_with_exit_1() {
    if !kvm_or_skip("corrupted_postcopy_page_stops_the_destination_with_exit_1") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &["--run-for", "0"]);
    // Flip one byte of page data in the first pages chunk after the switch.
    let mut flipped = false;
    let (src_addr, proxy) = chunk_proxy(dst.host_port(), move |kind, frame, n, _| {
        if n.is_some() && kind == KIND_PAGES && !flipped {
            frame[8 + 8 + 100] ^= 0x5a;
            flipped = true;
        }
        Step::Pass
    });
    let (src, src_rx) = postcopy_source(&src_addr, "1", &[]);
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 1, "destination: {dout}\n{derr}");
    assert!(derr.contains("checksum mismatch"), "{derr}");
    assert!(derr.contains("the guest cannot continue"), "{derr}");
    let (scode, sout, serr) = finish(src, src_rx);
    assert!(
        proxy.join().unwrap(),
        "the stream reached the postcopy switch"
    );
    assert_eq!(scode, 1, "source: {sout}\n{serr}");
    assert!(serr.contains("during postcopy"), "{serr}");
}

#[test]
fn postcopy_kvm_ring_over_the_control_socket_passes() {
    if !kvm_or_skip("postcopy_kvm_ring_over_the_control_socket_passes") {
        return;
    }
    let _g = serial();
    let sock = std::env::temp_dir().join(format!("migrate-pc-{}.sock", std::process::id()));
    let dst = listening(vmm, &["--run-for", "0"]);
    // kvm-ring is chosen when the VM starts (the rings exist before the vCPUs) and the
    // control socket's migration uses it.
    let (src, src_rx) = api_guest(vmm, &sock, &["--dirty-mode", "kvm-ring"]);
    let zero = serde_json::json!({"cmd": "migrate", "to": dst.addr, "postcopy_after": 0});
    let bad = vmm::api::request(&sock, &zero).unwrap();
    assert_eq!(bad["ok"], false, "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("at least 1"),
        "{bad}"
    );
    let req = serde_json::json!({"cmd": "migrate", "to": dst.addr, "postcopy_after": 1});
    let resp = vmm::api::request(&sock, &req).unwrap();
    assert_eq!(resp["ok"], true, "{resp}");
    assert_eq!(resp["migrate"]["mode"], "postcopy", "{resp}");
    assert_eq!(resp["migrate"]["dirty_mode"], "kvm-ring", "{resp}");
    // The full pass and the discard round.
    assert_eq!(
        resp["migrate"]["rounds"].as_array().unwrap().len(),
        2,
        "{resp}"
    );
    let (scode, sout, serr) = finish(src, src_rx);
    assert_eq!(scode, 0, "{sout}\n{serr}");
    assert_guest_passed("destination", &dst.finish());
}

#[test]
fn postcopy_to_a_destination_without_demand_paging_is_refused_and_the_source_runs_on() {
    if !kvm_or_skip("postcopy_to_a_destination_without_demand_paging_is_refused") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &["--no-demand-paging"]);
    let (scode, sout, serr) = run_to_end(vmm(&[
        "--migrate-to",
        &dst.addr,
        "--postcopy-after",
        "1",
        "--run-for",
        "1",
    ]));
    assert!(
        serr.contains("postcopy needs demand paging on the destination"),
        "{serr}"
    );
    assert!(serr.contains("keeps running here"), "{serr}");
    assert_eq!(
        scode,
        vmm::exit::EXIT_MIGRATE_FAILED,
        "the source's guest passes, the failed --migrate-to says so: {sout}\n{serr}"
    );
    assert!(sout.contains("PASS"), "{sout}");
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 1, "{dout}\n{derr}");
    assert!(derr.contains("nothing runs here"), "{derr}");
    assert!(derr.contains("--no-demand-paging"), "{derr}");
}

/// Migrates a `stress` guest while a reclaim storm drops its slices on the source (every
/// 100 ms, all of slice memory): each reclaim is marked for the next round, the ones that
/// would fall into the last round are refused, and the guest (which re-initialises pages it
/// finds zeroed by a reclaim) finishes on the destination with PASS.
///
/// The stress guest cannot see the divergence this guards against by itself (a page the
/// destination kept from before the reclaim holds data the guest once wrote, which it
/// accepts); the lib-level tests (`guest_reclaim`'s
/// `a_reclaim_under_a_kvm_bitmap_tracker_is_in_the_next_harvest`, reclaim.rs's unit tests)
/// assert the marking itself. This one asserts it runs end to end under both tracking modes.
fn stress_migration_under_a_reclaim_storm(test: &str, dirty_mode: &str) {
    if !kvm_or_skip(test) {
        return;
    }
    let _g = serial();
    let json = migrate_json_path(test);
    let stress = |extra: &[&str]| {
        let mut args = vec!["--guest-timeout", "80"];
        args.extend_from_slice(extra);
        guest_on("stress", "none", &args)
    };
    let dst = listening(stress, &[]);
    let mut args = vec![
        "--generations",
        STORM_GENERATIONS,
        "--reclaim-storm",
        "1000",
        "--dirty-mode",
        dirty_mode,
    ];
    args.extend(migrate_to(&dst.addr, &json, "500"));
    let (scode, sout, serr) = run_to_end(stress(&args));
    assert_eq!(scode, 0, "source: {sout}\n{serr}");
    assert!(sout.contains("complete"), "{sout}");
    let storm = serr.matches("reclaim storm: dropped").count();
    assert!(
        storm >= 3,
        "the storm ran before and during the migration: {serr}"
    );
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 0, "destination: {dout}\n{derr}");
    assert!(dout.lines().any(|l| l == "PASS"), "{dout}");
    let doc = read_migrate_json(&json);
    check_precopy(&doc, dirty_mode);
    eprintln!(
        "{test}: {storm} storm reclaims on the source; {} refused in the last round",
        serr.matches("a migration is sending its last round")
            .count()
    );
}

/// Generations of the stress guest in the storm tests: long enough to outlive the migration.
const STORM_GENERATIONS: &str = "10";

#[test]
fn precopy_kvm_bitmap_under_a_reclaim_storm_passes() {
    stress_migration_under_a_reclaim_storm(
        "precopy_kvm_bitmap_under_a_reclaim_storm_passes",
        "kvm-bitmap",
    );
}

#[test]
fn precopy_stage2_wp_under_a_reclaim_storm_passes() {
    stress_migration_under_a_reclaim_storm(
        "precopy_stage2_wp_under_a_reclaim_storm_passes",
        "stage2-wp",
    );
}

/// `--migrate-verify`: a page damaged on the way (a proxy flips a byte of the first page
/// chunk and makes its CRC right again, so the stream itself looks sound) is found before the
/// destination's guest runs: the destination refuses the migration (exit 1, saying how many
/// pages differ), and the source's guest runs on and passes.
#[test]
fn a_page_damaged_in_flight_is_found_by_the_digest() {
    if !kvm_or_skip("a_page_damaged_in_flight_is_found_by_the_digest") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &["--run-for", "0"]);
    let mut damaged = false;
    let (src_addr, proxy) = chunk_proxy(dst.host_port(), move |kind, f, _, _| {
        if kind == KIND_PAGES && !damaged {
            damaged = true;
            // The first byte of the chunk's data (after kind, len and gpa).
            f[16] ^= 0x5a;
            let n = f.len();
            let crc = crc32fast::hash(&f[..n - 4]);
            f[n - 4..].copy_from_slice(&crc.to_le_bytes());
        }
        Step::Pass
    });
    let s = run_to_end(vmm(&[
        "--migrate-to",
        &src_addr,
        "--migrate-verify",
        "--migrate-delay-ms",
        "200",
        "--run-for",
        "2",
    ]));
    assert_source_passed_after_failed_migration("source", &s);
    let (code, out, err) = dst.finish();
    assert_eq!(code, 1, "destination: {out}\n{err}");
    assert!(
        err.contains("differ from the source's digest"),
        "the destination names the damage: {err}"
    );
    assert!(!out.contains("migrated guest runs here"), "{out}");
    let _ = proxy.join();
}

/// `--migrate-verify` on an undamaged precopy and postcopy: the destination says how many
/// pages it checked, and they add up to all of guest RAM.
#[test]
fn verified_migrations_check_every_page() {
    for (test, flags) in [
        ("verified_precopy", vec!["--migrate-verify"]),
        (
            "verified_postcopy",
            vec!["--migrate-verify", "--postcopy-after", "2"],
        ),
    ] {
        if !kvm_or_skip(test) {
            return;
        }
        let _g = serial();
        let dst = listening(vmm, &["--run-for", "0"]);
        let mut args = vec![
            "--migrate-to",
            dst.addr.as_str(),
            "--migrate-delay-ms",
            "200",
        ];
        args.extend_from_slice(&flags);
        let (code, out, err) = run_to_end(vmm(&args));
        assert_eq!(code, 0, "{test} source: {out}\n{err}");
        assert!(out.contains("digest of 131072 pages"), "{test}: {out}");
        let d = dst.finish();
        assert_guest_passed(test, &d);
        let count = |prefix: &str| -> u64 {
            d.1.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let before = count("verified ");
        let owed =
            d.1.lines()
                .filter(|l| l.contains("owed pages on arrival"))
                .find_map(|l| l.strip_prefix("verified "))
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        // 512M of RAM: 131072 pages, checked before the guest runs or on arrival.
        assert_eq!(before + owed, 131072, "{test}: {}", d.1);
        assert!(d.1.contains("none differ"), "{test}: {}", d.1);
    }
}
