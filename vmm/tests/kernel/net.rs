//! virtio-net under the test kernel: a tap in a network namespace of the test's own, the guest's
//! address set by its `net` program, and a host-side peer (a thread of the test, in the same
//! namespace) exchanging patterns with it over TCP, with a checksum each way; and the same
//! across a live migration to another namespace with a tap of its own.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::cores;
use crate::devices::{fnv, pattern};
use crate::util::{test_kernel, KernelVm, BOOT_LIMIT, SMALL};

/// The first `bytes` bytes (at most 1 MiB) of the `net` program's pattern of `seed` (the
/// `disk` pattern).
fn pattern_of(bytes: usize, seed: u64) -> Vec<u8> {
    let mut p = pattern(1, seed);
    p.truncate(bytes);
    p
}

/// What a peer saw of one connection: the round and whether the guest's data was the round's
/// pattern (then the peer sent its own back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    round: u64,
    whole: bool,
}

/// Serves `net` rounds on `l` until `stop`: per connection, reads the round number and the
/// guest's data (until the guest shuts its side, or 30 s of silence), and when the data is the
/// round's pattern (`seed + 2r`) sends back the pattern of `seed + 2r + 1`.
fn serve_rounds(
    l: &TcpListener,
    bytes: usize,
    seed: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<Seen> {
    l.set_nonblocking(true).unwrap();
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut conn = match l.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => panic!("accept: {e}"),
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        if conn.read_to_end(&mut got).is_err() || got.len() < 8 {
            // A connection cut by the move.
            continue;
        }
        let round = u64::from_le_bytes(got[..8].try_into().unwrap());
        let whole = got[8..] == pattern_of(bytes, seed + 2 * round)[..];
        if whole {
            let _ = conn.write_all(&pattern_of(bytes, seed + 2 * round + 1));
        }
        seen.push(Seen { round, whole });
    }
    seen
}

/// The test kernel exchanges checksummed patterns with a peer over its virtio-net device, round
/// after round, while the VM migrates live to another host: two network namespaces joined by
/// a veth pair (the migration's link), each with a tap of the same name, address and MAC and a
/// peer of its own at the same address. The device's state moves with the VM and the
/// destination attaches to its host's tap; the round cut by the move is tried again (its
/// connection is reset: the destination's peer never heard of it), the rounds carry on with the
/// destination's peer, every round passes exactly once, and the guest powers off there.
#[test]
fn net_rounds_carry_on_after_a_live_migration_to_another_host_with_its_own_tap() {
    let test = "net_rounds_carry_on_after_a_live_migration_to_another_host_with_its_own_tap";
    let Some((k, i)) = test_kernel(test) else {
        return;
    };
    let _g = cores(1);
    let Some(hosts) = crate::hosts::TwoHosts::new(test) else {
        return;
    };
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("{test}: skipped: no /dev/net/tun (modprobe tun)");
        return;
    }
    // The guest's network on each host: the same tap, peer address and MAC, so the guest's
    // route and neighbour entry stay right after the move.
    let (tap, peer_ip, guest_ip, port) = ("vmnet0", "172.30.0.1", "172.30.0.2", 5555u16);
    for ns in [&hosts.src, &hosts.dst] {
        for args in [
            vec!["-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"],
            vec!["-n", ns, "link", "set", tap, "address", "02:00:00:00:00:01"],
            vec!["-n", ns, "addr", "add", "172.30.0.1/24", "dev", tap],
            vec!["-n", ns, "link", "set", tap, "up"],
        ] {
            crate::hosts::ip(&args).unwrap_or_else(|e| panic!("{test}: {e}"));
        }
    }
    let enter = |ns: &str| {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns on an open namespace fd; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    };
    // 128 KiB each way a round: about 5 s here (this software KVM's guest moves 50-70 KB/s).
    let (bytes, seed, rounds) = (128usize << 10, 41u64, 8u64);
    let net = format!("tap={tap},mac=52:54:00:00:00:02");
    let tag = "netmove";
    let sock = crate::util::tmp(&format!("{tag}.sock"));
    let dst_console = crate::util::tmp(&format!("{tag}-dst.console"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let cmdline = format!(
        "console=ttyS0 marker={tag} run=net,{guest_ip},24,{peer_ip},{port},{bytes},{seed},{rounds}"
    );
    let serial = format!("file:{}", dst_console.display());
    std::thread::scope(|s| {
        let peers: Vec<_> = [&hosts.src, &hosts.dst]
            .into_iter()
            .map(|ns| {
                let stop = &stop;
                s.spawn(move || {
                    enter(ns);
                    let l = TcpListener::bind((peer_ip, port)).unwrap();
                    serve_rounds(&l, bytes, seed, stop)
                })
            })
            .collect();
        // The source in its namespace (the VMM opens its tap there).
        let mut src = s
            .spawn(|| {
                enter(&hosts.src);
                KernelVm::boot(
                    &k,
                    &i,
                    &format!("{tag}-src"),
                    &cmdline,
                    SMALL,
                    &["--net", &net, "--api-socket", sock.to_str().unwrap()],
                )
            })
            .join()
            .unwrap();
        assert!(
            src.wait_for("NET round 1 ", BOOT_LIMIT),
            "two rounds on the source:\n{}",
            src.text()
        );
        let mut dst = s
            .spawn(|| {
                enter(&hosts.dst);
                crate::util::spawn(&[
                    "--incoming",
                    &hosts.dst_addr(),
                    "--serial",
                    &serial,
                    "--net",
                    &net,
                ])
            })
            .join()
            .unwrap();
        let rx = crate::migrate_util::lines(&mut dst);
        crate::migrate_util::wait_for(&rx, crate::migrate_util::LISTENING);
        let r = crate::util::request(
            &sock,
            serde_json::json!({"cmd": "migrate", "to": hosts.dst_addr()}),
        );
        eprintln!("{test}: {r}");
        assert_eq!(r["ok"], true, "the migration completed: {r}");
        let (src_code, src_err, src_text) = src.wait_end(Duration::from_secs(60));
        assert_eq!(
            src_code,
            Some(0),
            "the source ends once migrated: {src_err}"
        );
        let dst = KernelVm {
            child: dst,
            console: dst_console.clone(),
        };
        let (dst_code, dst_err, dst_text) = dst.wait_end(BOOT_LIMIT);
        stop.store(true, Ordering::Relaxed);
        let seen: Vec<Vec<Seen>> = peers.into_iter().map(|p| p.join().unwrap()).collect();
        assert_eq!(
            dst_code,
            Some(0),
            "the guest powered off on the destination: {dst_err}\n{dst_text}"
        );
        let whole = format!("{src_text}{dst_text}");
        let ok_rounds = |text: &str| -> Vec<u64> {
            text.lines()
                .filter_map(|l| l.trim_end().strip_prefix("NET round "))
                .filter(|l| l.ends_with(" ok"))
                .map(|l| l.split(' ').next().unwrap().parse().unwrap())
                .collect()
        };
        assert!(
            !whole.contains(" FAIL"),
            "no round got wrong data:\n{whole}"
        );
        assert_eq!(
            ok_rounds(&whole),
            (0..rounds).collect::<Vec<_>>(),
            "every round once, in order:\n{whole}"
        );
        assert!(
            src_text.contains("NET eth0 mac 52:54:00:00:00:02"),
            "the guest has the address the VMM offered:\n{src_text}"
        );
        // Each round's checksums, as the guest computed them, are the host's.
        for r in 0..rounds {
            let line = format!(
                "NET round {r} sent {bytes} sum {} received {bytes} sum {} ",
                fnv(&pattern_of(bytes, seed + 2 * r)),
                fnv(&pattern_of(bytes, seed + 2 * r + 1))
            );
            assert!(whole.contains(&line), "{line}...:\n{whole}");
        }
        let on_dst = ok_rounds(&dst_text);
        assert!(
            !on_dst.is_empty(),
            "rounds ran on the destination:\n{dst_text}"
        );
        assert!(
            dst_text.contains(&format!("NET cycle {rounds} rounds ok")),
            "{dst_text}"
        );
        // The peers agree: each round the guest passed was whole at the peer of the host it
        // ran on.
        for r in ok_rounds(&src_text) {
            assert!(
                seen[0].contains(&Seen {
                    round: r,
                    whole: true
                }),
                "{r}: {seen:?}"
            );
        }
        for &r in &on_dst {
            assert!(
                seen[1].contains(&Seen {
                    round: r,
                    whole: true
                }),
                "{r}: {seen:?}"
            );
        }
        // A connection the move cut never ends cleanly at the source's peer (it times out,
        // and is not counted); one that ended cleanly carried the whole pattern.
        assert!(seen.iter().flatten().all(|s| s.whole), "{seen:?}");
        for l in whole.lines().filter(|l| l.starts_with("NET ")) {
            eprintln!("{test}: {l}");
        }
        eprintln!(
            "{test}: {} rounds on the source, {} on the destination",
            rounds as usize - on_dst.len(),
            on_dst.len()
        );
    });
}
