//! Virtio devices under the project's test kernel: a virtio-blk disk (`--disk`) written by one
//! boot, read back by the next, and checked on the host; the same disk busy with writes and
//! reads while the VM migrates live; a virtio-balloon (`--balloon`) whose free page reports
//! and inflations give guest memory back to the host.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::cores;
use crate::linux::marker_and_poweroff;
use crate::migrate_util::{free_port, LISTENING};
use crate::util::{request, test_kernel, tmp, wait_for_path, KernelVm, BOOT_LIMIT, SMALL};

/// The pattern `disk write` puts at the start of the disk (tools/test-initramfs/disk.c): word
/// i is splitmix64's finaliser of `seed ^ i`, little-endian.
pub fn pattern(mib: u64, seed: u64) -> Vec<u8> {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..mib * (1 << 20) / 8)
        .flat_map(|i| mix(seed ^ i).to_le_bytes())
        .collect()
}

pub fn fnv(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The kernel found the disk, and `run` exited 0.
fn check_disk_boot(test: &str, text: &str) {
    assert!(
        text.contains("virtio_blk virtio0: [vda]"),
        "{test}: the kernel found the disk:\n{text}"
    );
    assert!(text.contains("RUN-EXIT 0"), "{test}:\n{text}");
}

/// The test kernel finds its virtio-blk disk and writes and reads it back (O_DIRECT, round
/// after round, a new pattern and checksum each) while the VM, its balloon inflated, migrates
/// live (precopy) to a second `vmm`, which takes the disk and both devices' state over: the
/// rounds carry on there, none fails or repeats, the balloon there has the source's target and
/// the guest's count, and the guest powers off there (exit 0). The image holds the last
/// round's pattern on the host, and the next boot, read-only, reads it back from the device.
/// Requests the source had taken are finished before its device state is saved; requests
/// made available after that are taken by the destination from the ring in guest RAM.
#[test]
fn disk_rounds_and_the_balloon_carry_on_across_a_live_migration_and_the_next_boot_reads_the_disk() {
    let test = "disk_rounds_and_the_balloon_carry_on_across_a_live_migration_and_the_next_boot_reads_the_disk";
    let Some((k, i)) = test_kernel(test) else {
        return;
    };
    // Source then destination, one vCPU each: they overlap only during the move.
    let _g = cores(1);
    // Short file names: a unix socket's path has at most 107 bytes.
    let tag = "diskmove";
    let img = tmp(&format!("{tag}.img"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let (mib, seed, rounds) = (1u64, 11u64, 12u64);
    let sock = tmp(&format!("{tag}.sock"));
    let dst_sock = tmp(&format!("{tag}-dst.sock"));
    let disk = format!("path={}", img.display());
    let mut src = KernelVm::boot(
        &k,
        &i,
        &format!("{tag}-src"),
        &format!("console=ttyS0 marker=diskmove run=disk,cycle,/dev/vda,{mib},{seed},{rounds}"),
        SMALL,
        &[
            "--disk",
            &disk,
            "--balloon",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    // The target is set at once: the driver inflates during the boot, so that the rounds
    // (about 1-2.5 s each here, with the host's speed) do not end before the migration.
    wait_for_path(&sock);
    let r = request(&sock, json!({"cmd": "balloon", "size": "4M"}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        src.wait_for("DISK round 1 ", BOOT_LIMIT),
        "the rounds started on the source:\n{}",
        src.text()
    );
    let b = balloon_until(&sock, Duration::from_secs(60), |b| {
        b["actual_bytes"] == 4 * MIB
    });
    assert_eq!(
        b["actual_bytes"],
        4 * MIB,
        "the guest inflated its balloon: {b}"
    );
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let dst_console = tmp(&format!("{tag}-dst.console"));
    let dst_serial = format!("file:{}", dst_console.display());
    // The destination takes the disk from the source's machine spec; given here, it agrees.
    let mut dst = crate::util::spawn(&[
        "--incoming",
        &addr,
        "--serial",
        &dst_serial,
        "--disk",
        &disk,
        "--api-socket",
        dst_sock.to_str().unwrap(),
    ]);
    let rx = crate::migrate_util::lines(&mut dst);
    crate::migrate_util::wait_for(&rx, LISTENING);
    let r = request(&sock, json!({"cmd": "migrate", "to": addr}));
    eprintln!("{test}: {r}");
    assert_eq!(r["ok"], true, "the migration completed: {r}");
    // The balloon moved with its state: the target the host set, the guest's count.
    wait_for_path(&dst_sock);
    let b = request(&dst_sock, json!({"cmd": "balloon"}))["balloon"].clone();
    assert_eq!(b["target_bytes"], 4 * MIB, "{b}");
    assert_eq!(b["actual_bytes"], 4 * MIB, "{b}");
    let (src_code, src_err, src_text) = src.wait_end(Duration::from_secs(60));
    assert_eq!(
        src_code,
        Some(0),
        "the source ends once migrated: {src_err}"
    );
    let dst = KernelVm {
        child: dst,
        console: dst_console,
    };
    let (dst_code, dst_err, dst_text) = dst.wait_end(BOOT_LIMIT);
    assert_eq!(
        dst_code,
        Some(0),
        "the guest powered off on the destination: {dst_err}"
    );
    // One console across the move: every round once, in order, each ok.
    let whole = format!("{src_text}{dst_text}");
    let done: Vec<u64> = whole
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("DISK round "))
        .map(|l| {
            assert!(
                l.ends_with(" ok"),
                "a round failed: DISK round {l}\n{whole}"
            );
            l.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(
        done,
        (0..rounds).collect::<Vec<_>>(),
        "every round once:\n{whole}"
    );
    let on_dst = dst_text
        .lines()
        .filter(|l| l.starts_with("DISK round "))
        .count();
    assert!(
        on_dst > 0,
        "some rounds ran on the destination:\n{dst_text}"
    );
    assert!(
        dst_text.contains(&format!("DISK cycle /dev/vda {mib} MiB {rounds} rounds ok")),
        "{dst_text}"
    );
    assert!(dst_text.contains("RUN-EXIT 0"), "{dst_text}");
    // The image: the last round's pattern, nothing past it.
    let file = std::fs::read(&img).unwrap();
    let last = pattern(mib, seed + rounds - 1);
    assert!(
        file[..last.len()] == last[..],
        "the image holds the last round's pattern"
    );
    assert!(file[last.len()..].iter().all(|&b| b == 0));
    let sum = fnv(&last);
    let last_line = format!("sum {sum} ok");
    assert!(whole.contains(&last_line), "{last_line}:\n{whole}");
    eprintln!(
        "{test}: {} rounds on the source, {on_dst} on the destination",
        rounds as usize - on_dst
    );

    // The next boot reads the last pattern back from the device, read-only, and powers off
    // (through the sleep register; its memory through the stage-2 pager; on a software KVM
    // the emulation counters).
    let last_seed = seed + rounds - 1;
    let text = marker_and_poweroff(
        test,
        (&k, &i),
        SMALL,
        &format!("run=disk,verify,/dev/vda,{mib},{last_seed}"),
        &["--disk", &format!("{disk},readonly=on")],
    );
    check_disk_boot(test, &text);
    let line = format!("DISK verify /dev/vda {mib} MiB seed {last_seed} sum {sum} ok");
    assert!(text.contains(&line), "{line}:\n{text}");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        file,
        "a read-only boot changed the image"
    );
    let _ = std::fs::remove_file(&img);
}

/// The resident memory of process `pid` (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

const MIB: u64 = 1 << 20;

/// Polls the balloon's figures until `done` holds of them, up to `limit`.
fn balloon_until(sock: &std::path::Path, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let b = request(sock, json!({"cmd": "balloon"}))["balloon"].clone();
        if done(&b) || t.elapsed() > limit {
            return b;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What a balloon run does: the machine, memtest's sizes, the inflation, and whether the host
/// reclaims the RAM above the kernel's `mem=` meanwhile.
struct BalloonRun {
    /// `--mem` and the kernel's `mem=` (the RAM above it is the guest's but unused).
    mem: &'static str,
    kernel_mem: Option<&'static str>,
    /// memtest's own MiB, the MiB it touches and frees, and how long it holds after.
    own_mib: u64,
    free_mib: u64,
    hold_s: u64,
    /// How much the balloon is inflated to during the hold, and the RSS fall asked of the
    /// freed memory (most of it).
    inflate_mib: u64,
    fall_mib: u64,
    /// Reclaim `[gpa, gpa + len)` every 500 ms from boot to the end.
    reclaim_unused: Option<(u64, u64)>,
}

/// Boots the test kernel with `--balloon`, runs memtest as `run` says, checks that the RSS
/// falls by `fall_mib` once memtest frees its extra memory (free page reports dropped through
/// stage2), inflates and deflates the balloon during memtest's hold, and checks memtest passes.
fn balloon_run(test: &str, run: BalloonRun) {
    let Some((k, i)) = test_kernel(test) else {
        return;
    };
    // One VM with one vCPU at a time: it shares the host's cores with another such test.
    let _g = cores(1);
    // A socket path must fit in 108 bytes: not the test's name.
    let sock = tmp(&format!("balloon-{}.sock", run.free_mib));
    let sock_arg = sock.display().to_string();
    let cmdline = format!(
        "console=ttyS0 {}run=memtest,{},2,{},{}",
        run.kernel_mem
            .map(|m| format!("mem={m} "))
            .unwrap_or_default(),
        run.own_mib,
        run.free_mib,
        run.hold_s
    );
    let mut vm = KernelVm::boot(
        &k,
        &i,
        test,
        &cmdline,
        &["--mem", run.mem, "--cpus", "1", "--hugepages", "none"],
        &["--balloon", "--api-socket", &sock_arg],
    );
    let pid = vm.child.id();
    wait_for_path(&sock);
    // Once memtest runs (before it, the kernel copies the initrd the VMM put at the top of RAM
    // down below its `mem=`), the host drops the RAM the kernel was told it does not have,
    // again and again, on a thread of its own until the VM ends.
    assert!(
        vm.wait_for("RUN memtest", BOOT_LIMIT),
        "memtest started:\n{}",
        vm.text()
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reclaimer = run.reclaim_unused.map(|(gpa, len)| {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut done = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match vmm::api::request(&sock, &json!({"cmd": "reclaim", "gpa": gpa, "len": len})) {
                    Ok(v) if v["ok"] == true => done += 1,
                    Ok(v) => panic!("reclaim refused: {v}"),
                    Err(_) => break, // the VM ended
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            done
        })
    });
    let touched = format!("memtest: touched {} MiB", run.free_mib);
    // The guest hands out a page in 3-10 ms here (interpreted ring 0; 9.5 ms on 2026-12-07
    // 19:30, with or without the balloon): allow 20 ms a page.
    let touch_limit = BOOT_LIMIT.max(Duration::from_millis(run.free_mib * 256 * 20));
    assert!(
        vm.wait_for(&touched, touch_limit),
        "{touched}:\n{}",
        vm.text()
    );
    let high = rss(pid);
    let freed = format!("memtest: freed {} MiB", run.free_mib);
    assert!(
        vm.wait_for(&freed, Duration::from_secs(300)),
        "{freed}:\n{}",
        vm.text()
    );
    let freed_at = Instant::now();
    let mut low = high;
    while freed_at.elapsed() < Duration::from_secs(30) {
        low = low.min(rss(pid));
        if high.saturating_sub(low) >= run.fall_mib * MIB {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = freed_at.elapsed();
    let b = request(&sock, json!({"cmd": "balloon"}))["balloon"].clone();
    eprintln!(
        "{test}: RSS {} MiB with the {} MiB touched, {} MiB {:.1} s after memtest said it freed \
         them; balloon {b}",
        high / MIB,
        run.free_mib,
        low / MIB,
        took.as_secs_f64()
    );
    assert!(
        high.saturating_sub(low) >= run.fall_mib * MIB,
        "the host's RSS fell by {} MiB of the {} freed (balloon: {b})",
        high.saturating_sub(low) / MIB,
        run.free_mib
    );
    assert!(
        b["reported_bytes"].as_u64().unwrap() >= run.fall_mib * MIB,
        "free page reports: {b}"
    );
    assert!(b["stats"]["total_memory"].as_u64().unwrap() > 0, "{b}");

    // Inflate: the guest gives `inflate_mib`; deflate: it takes them back.
    let want = run.inflate_mib * MIB;
    let set = request(&sock, json!({"cmd": "balloon", "size": want}))["balloon"].clone();
    assert_eq!(set["target_bytes"], want, "{set}");
    assert_eq!(set["driver_told"], true, "{set}");
    let b = balloon_until(&sock, Duration::from_secs(30), |b| {
        b["actual_bytes"] == want
    });
    assert_eq!(b["actual_bytes"], want, "the guest inflated: {b}");
    assert!(b["inflated_pages"].as_u64().unwrap() >= want / 4096, "{b}");
    request(&sock, json!({"cmd": "balloon", "size": 0}));
    let b = balloon_until(&sock, Duration::from_secs(30), |b| b["actual_bytes"] == 0);
    assert_eq!(b["actual_bytes"], 0, "the guest deflated: {b}");
    assert!(b["deflated_pages"].as_u64().unwrap() >= want / 4096, "{b}");

    let (code, err, text) = vm.wait_end(BOOT_LIMIT);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(r) = reclaimer {
        let reclaims = r.join().expect("the reclaim thread");
        assert!(reclaims > 0, "the host reclaimed while memtest ran");
    }
    assert_eq!(code, Some(0), "the guest powered off:\n{text}\n{err}");
    let passed = format!("memtest: PASS {} pages", run.own_mib * MIB / 4096);
    assert!(
        text.contains(&passed) && text.contains("RUN-EXIT 0"),
        "{passed}:\n{text}"
    );
    assert!(text.contains("verified"), "{text}");
    let _ = std::fs::remove_file(&sock);
}

/// The memory program writes and verifies a pattern in RAM the guest owns, on the stage-2
/// path, while the host takes memory back both ways a guest tolerates:
/// - it reclaims, again and again, the RAM the kernel does not use (the VM has 384M, the
///   kernel is told `mem=256M`, the host drops [256M, 384M)): a drop of memory the guest owns
///   would lose its data (private memory comes back as zeroes);
/// - memtest touches 32 MiB more and frees them, the guest's free page reporting hands them
///   to the balloon, which drops them through stage2's reclaim path: the VMM's RSS falls by
///   most of the 32 MiB; then `balloon 16M` inflates the balloon and `balloon 0` deflates it,
///   while memtest checks its own pages once a second. (Linux reports free memory only while
///   its zone keeps 64 MiB above the low watermark besides: with `mem=128M` it reported
///   nothing.)
///
/// (The kernel's first touch of each page, zeroing it in ring 0, is what takes this test's
/// time on a software KVM: about 0.75 s per MiB here, so the sizes are kept small; the 200 MiB
/// of the issue are in the ignored test below.)
#[test]
fn memtest_passes_while_the_host_reclaims_unused_memory_and_the_balloon_takes_freed_memory() {
    balloon_run(
        "memtest_passes_while_the_host_reclaims_unused_memory_and_the_balloon_takes_freed_memory",
        BalloonRun {
            mem: "384M",
            kernel_mem: Some("256M"),
            own_mib: 24,
            free_mib: 32,
            hold_s: 30,
            inflate_mib: 16,
            fall_mib: 24,
            reclaim_unused: Some((256 << 20, 128 << 20)),
        },
    );
}

/// The figure: 200 MiB allocated and freed in a 384M guest, the RSS falls by at least
/// 150 MiB; a 64 MiB inflation.
#[test]
#[ignore = "slow here: 5-12 minutes (306 s at 14:00 on 2026-12-07; at 19:30 the touch of 200 \
            MiB alone took 490 s): the guest kernel zeroes each page it hands memtest in \
            interpreted ring 0 (3-10 ms a page) and frees them as slowly; the suite runs the \
            same with 32 MiB"]
fn freed_guest_memory_goes_back_to_the_host_through_the_balloon_and_memtest_still_passes() {
    balloon_run(
        "freed_guest_memory_goes_back_to_the_host_through_the_balloon_and_memtest_still_passes",
        BalloonRun {
            mem: "384M",
            kernel_mem: None,
            own_mib: 16,
            free_mib: 200,
            hold_s: 40,
            inflate_mib: 64,
            fall_mib: 150,
            reclaim_unused: None,
        },
    );
}
