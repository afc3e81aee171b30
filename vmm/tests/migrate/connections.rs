//! `--migrate-connections N`: each precopy round spread over N connections between two real
//! `vmm --guest dirty` processes, with N = 1, 2 and 4, in each dirty-tracking mode, precopy
//! and postcopy (on 2 MiB pages), with a secret between two hosts; the destination's replay
//! of every write must PASS and every connection must have carried its share. A lane cut in
//! the middle of a round fails the migration at both ends, and the source's guest runs on.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use crate::auth::{secret, KEY_A};
use crate::common::{kvm_or_skip, serial};
use crate::modes::{check_postcopy, check_precopy, migrate_and_verify_with};
use crate::util::{assert_source_passed_after_failed_migration, finish, lines, listening, vmm};

/// Migrates over `n` connections with `src_flags` (and `dst_flags` at the destination),
/// verifies the destination's guest, and checks that each connection carried at least
/// 64 KiB and that they add up to the bytes sent. Returns the source's summary.
fn over(
    test: &str,
    n: usize,
    backing: &str,
    src_flags: &[&str],
    dst_flags: &[&str],
    between_hosts: bool,
) -> Option<serde_json::Value> {
    let n_arg = n.to_string();
    let mut flags = vec!["--migrate-connections", n_arg.as_str()];
    flags.extend_from_slice(src_flags);
    let doc = migrate_and_verify_with(test, backing, &flags, dst_flags, between_hosts)?;
    let per: Vec<u64> = doc["connection_bytes"]
        .as_array()
        .unwrap_or_else(|| panic!("connection_bytes: {doc}"))
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert_eq!(per.len(), n, "one figure per connection: {doc}");
    assert_eq!(per.iter().sum::<u64>(), doc["bytes_sent"].as_u64().unwrap());
    for (i, &b) in per.iter().enumerate() {
        assert!(b >= 64 << 10, "connection {i} carried its share: {per:?}");
    }
    Some(doc)
}

#[test]
fn precopy_over_1_connection_passes() {
    if let Some(doc) = over(
        "precopy_over_1_connection_passes",
        1,
        "none",
        &[],
        &[],
        false,
    ) {
        check_precopy(&doc, "kvm-bitmap");
    }
}

#[test]
fn precopy_over_2_connections_passes() {
    let flags = ["--dirty-mode", "kvm-ring"];
    if let Some(doc) = over(
        "precopy_over_2_connections_passes",
        2,
        "none",
        &flags,
        &[],
        false,
    ) {
        check_precopy(&doc, "kvm-ring");
    }
}

#[test]
fn precopy_over_4_connections_passes() {
    let flags = ["--dirty-mode", "stage2-wp"];
    if let Some(doc) = over(
        "precopy_over_4_connections_passes",
        4,
        "none",
        &flags,
        &[],
        false,
    ) {
        check_precopy(&doc, "stage2-wp");
    }
}

/// The lanes place 2 MiB pages through the destination's pager side by side; postcopy
/// then runs on the main connection.
#[test]
fn postcopy_over_4_connections_on_2m_huge_pages_passes() {
    let test = "postcopy_over_4_connections_on_2m_huge_pages_passes";
    if let Some(doc) = over(test, 4, "2M", &["--postcopy-after", "2"], &[], false) {
        check_postcopy(&doc, "kvm-bitmap");
    }
}

/// Every lane authenticates with the secret, between two network namespaces.
#[test]
fn precopy_over_4_connections_with_a_secret_passes_between_hosts() {
    let test = "precopy_over_4_connections_with_a_secret_passes_between_hosts";
    let key = secret(test, KEY_A);
    let k = key.to_str().unwrap();
    let doc = over(
        test,
        4,
        "none",
        &["--migrate-secret", k],
        &["--migrate-secret", k],
        true,
    );
    let _ = std::fs::remove_file(&key);
    if let Some(doc) = doc {
        check_precopy(&doc, "kvm-bitmap");
    }
}

/// A proxy in front of `dst` (host:port) that passes the first connection whole and cuts
/// every later one (a lane) in both directions after `budget` bytes from the source.
fn lane_cutting_proxy(dst: &str, budget: usize) -> String {
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", proxy.local_addr().unwrap());
    let dst = dst.to_owned();
    std::thread::spawn(move || {
        for (i, from_src) in proxy.incoming().enumerate() {
            let Ok(mut from_src) = from_src else { return };
            let mut to_dst = TcpStream::connect(&dst).unwrap();
            let (mut from_dst, mut to_src) =
                (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_dst, &mut to_src);
                let _ = to_src.shutdown(Shutdown::Both);
            });
            std::thread::spawn(move || {
                let limit = if i == 0 { usize::MAX } else { budget };
                let mut buf = vec![0u8; 64 << 10];
                let mut passed = 0;
                while passed < limit {
                    let n = match from_src.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(limit - passed),
                    };
                    if to_dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    passed += n;
                }
                let _ = to_dst.shutdown(Shutdown::Both);
                let _ = from_src.shutdown(Shutdown::Both);
            });
        }
    });
    addr
}

#[test]
fn a_lane_cut_mid_round_fails_both_ends_and_the_source_runs_on() {
    if !kvm_or_skip("a_lane_cut_mid_round_fails_both_ends_and_the_source_runs_on") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &["--run-for", "0", "--migrate-timeout", "5"]);
    // Past the lane's start, inside its first page chunk.
    let to = lane_cutting_proxy(dst.host_port(), 100 << 10);
    let mut src = vmm(&[
        "--migrate-to",
        &to,
        "--migrate-connections",
        "3",
        "--migrate-delay-ms",
        "200",
        "--migrate-timeout",
        "5",
        "--run-for",
        "3",
    ]);
    let rx = lines(&mut src);
    let s = finish(src, rx);
    assert_source_passed_after_failed_migration("source", &s);
    // The source names the lane when its lane's writes fail; when they all fit the socket
    // buffers before the cut, what it sees first is the destination closing the main
    // connection (which the destination does because of the lane). Seen under CPU contention.
    assert!(
        s.2.contains("migration lane") || s.2.contains("truncated"),
        "the source says why: {}",
        s.2
    );
    let (code, out, err) = dst.finish();
    assert_eq!(code, 1, "destination: {out}\n{err}");
    // Whichever it saw first: the cut lane, or the main connection the source then closed.
    assert!(
        err.contains("incoming migration failed; nothing runs here")
            && (err.contains("migration lane") || err.contains("truncated")),
        "the destination says why: {err}"
    );
    assert!(!out.contains("migrated guest runs here"), "{out}");
}
