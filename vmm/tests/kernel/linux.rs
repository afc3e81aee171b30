//! A real Linux to userspace on the stage-2 path: the project's test kernel boots to the test
//! initramfs's `/init`, which prints `MARKER <value>`, runs the program the command line names
//! and powers off through ACPI (exit code 0); on 4 KiB pages, THP, and 2 MiB hugetlbfs with two
//! vCPUs (the precopy test), and shut down through the ACPI power button. On this host's software KVM that takes the
//! emulation fallback (ring-0 instructions KVM cannot run) and the syscall relay (a user
//! `syscall` KVM leaves at CPL 3); the emulation counters show both at work.
//!
//! Also: the counter program migrated live (precopy and postcopy) with no value lost or
//! repeated and its checksum intact, and the memory program passing while the host reclaims
//! guest memory the kernel does not use.

use crate::common::{cores, serial};
use std::time::Duration;

use crate::migrate_util::{free_port, LISTENING};
use crate::util::{request, test_kernel, tmp, wait_for_path, KernelVm, BOOT_LIMIT, SMALL};
use serde_json::{json, Value};

/// The FNV-1a chain the guest's counter prints (tools/test-initramfs/counter.c): each value
/// in decimal with a newline.
fn fnv_chain(values: impl IntoIterator<Item = u64>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in format!("{v}\n").bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// `COUNTER <n> <checksum>` lines of a console, in order.
fn counter_lines(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "COUNTER").then_some(())?;
            let n = w.next()?.parse().ok()?;
            let sum = u64::from_str_radix(w.next()?, 16).ok()?;
            Some((n, sum))
        })
        .collect()
}

/// Checks a counter transcript: 1, 2, 3, ... with nothing lost, repeated or reordered, each
/// checksum the chain over the values so far.
fn check_counter(lines: &[(u64, u64)]) {
    assert!(!lines.is_empty(), "no COUNTER line");
    for (i, (n, sum)) in lines.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64 + 1,
            "counter value {i} (lost or repeated line)"
        );
        assert_eq!(*sum, fnv_chain(1..=*n), "checksum of line {n}");
    }
}

fn stats_doc(path: &std::path::Path) -> Value {
    let doc = serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default())
        .unwrap_or(Value::Null);
    let _ = std::fs::remove_file(path);
    doc
}

/// On a software KVM the boot needs the fallback and the relay; the counters show them.
fn check_emulation_counters(doc: &Value) {
    if vmm::hypervisor::software_kvm().is_none() {
        return;
    }
    let e = &doc["emulation"];
    assert!(
        e["syscall"].as_u64().unwrap_or(0) > 0,
        "relayed syscalls: {e}"
    );
    for kind in ["cmpxchg16b", "popcnt", "clac", "int3"] {
        assert!(e[kind].as_u64().unwrap_or(0) > 0, "{kind} emulated: {e}");
    }
}

/// Boots `k` and `i` with `cmdline` after the marker `abc` and `extra` flags, waits for the
/// end, checks the marker, the exit code (the kernel powered off) and the counters; returns
/// the console.
pub(crate) fn marker_and_poweroff(
    test: &str,
    (k, i): (&std::path::Path, &std::path::Path),
    machine: &[&str],
    cmdline: &str,
    extra: &[&str],
) -> String {
    let stats = tmp(&format!("{test}.json"));
    let mut flags = vec!["--stats-json", stats.to_str().unwrap()];
    flags.extend_from_slice(extra);
    let vm = KernelVm::boot(
        k,
        i,
        test,
        &format!("console=ttyS0 marker=abc {cmdline}"),
        machine,
        &flags,
    );
    let (code, err, text) = vm.wait_end(BOOT_LIMIT);
    let tail = &text[text.len().saturating_sub(3000)..];
    assert!(
        text.lines().any(|l| l.trim_end() == "MARKER abc"),
        "/init printed the marker:\n{tail}\n{err}"
    );
    assert_eq!(code, Some(0), "/init powered off:\n{tail}\n{err}");
    assert!(
        err.contains("guest powered off (ACPI S5 through the sleep control register)"),
        "the kernel powered off through the FADT's sleep control register: {err}"
    );
    let doc = stats_doc(&stats);
    check_emulation_counters(&doc);
    assert!(
        doc["demand_paging"]["paging"]["events_missing"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the kernel's memory came through the stage-2 pager: {doc}"
    );
    text
}

/// The control socket's `shutdown` presses the ACPI power button: the test kernel's button
/// driver reports KEY_POWER, /init's acpid powers off, and the VM ends with 0 (not the forced
/// stop's 4). On THP-backed RAM, the backing no other kernel test uses.
#[test]
fn shutdown_powers_off_through_the_guests_power_button_on_thp() {
    let test = "shutdown_powers_off_through_the_guests_power_button_on_thp";
    let Some((k, i)) = test_kernel(test) else {
        return;
    };
    // One VM with one vCPU: it shares the host's cores with another such test.
    let _g = cores(1);
    let sock = tmp(&format!("{test}.sock"));
    let mut vm = KernelVm::boot(
        &k,
        &i,
        test,
        "console=ttyS0 marker=thp run=counter",
        &["--mem", "256M", "--cpus", "1", "--hugepages", "thp"],
        &["--api-socket", sock.to_str().unwrap()],
    );
    assert!(
        vm.wait_for("COUNTER 3 ", BOOT_LIMIT),
        "the counter runs:\n{}",
        vm.text()
    );
    assert!(vm.text().lines().any(|l| l.trim_end() == "MARKER thp"));
    wait_for_path(&sock);
    let info = request(&sock, json!({"cmd": "info"}))["info"].clone();
    assert_eq!(info["backing"], "THP", "{info}");
    let down = request(&sock, json!({"cmd": "shutdown"}))["shutdown"].clone();
    eprintln!("{test}: {down}");
    let (code, err, text) = vm.wait_end(Duration::from_secs(120));
    assert!(
        text.contains("init: power button pressed"),
        "acpid ran the power button's action:\n{}\n{err}",
        &text[text.len().saturating_sub(2000)..]
    );
    assert_eq!(code, Some(0), "the guest powered off: {err}");
}

/// The guest's counter program migrated while it runs: the destination's console carries on
/// with the next value, the checksum chain holds across the move, and the guest powers off
/// on the destination. With `back`, both ends are `--stay` processes and the guest comes back
/// (precopy) to the first one, where it powers off, and that process with it.
fn migrate_counter(test: &str, machine: &[&str], postcopy_after: Option<u32>, back: bool) {
    let Some((k, i)) = test_kernel(test) else {
        return;
    };
    // One vCPU: the source runs until the move, the destination after it (they overlap only
    // while the postcopy pages go), so one of the host's cores; more vCPUs take them all.
    let one_vcpu = machine.windows(2).any(|w| w == ["--cpus", "1"]);
    let _g = if one_vcpu { cores(1) } else { serial() };
    let sock = tmp(&format!("{test}.sock"));
    let dst_sock = tmp(&format!("{test}-dst.sock"));
    let mut src_extra = vec!["--api-socket", sock.to_str().unwrap()];
    if back {
        src_extra.push("--stay");
    }
    // 40 lines, 250 ms apart: about 10 s of guest time, the migration lands in the middle.
    let cmdline = "console=ttyS0 marker=counter run=counter,40,250";
    let mut src = KernelVm::boot(&k, &i, &format!("{test}-src"), cmdline, machine, &src_extra);
    assert!(
        src.wait_for("COUNTER 5 ", BOOT_LIMIT),
        "the counter started on the source:\n{}",
        src.text()
    );
    wait_for_path(&sock);

    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let dst_console = tmp(&format!("{test}-dst.console"));
    let dst_serial = format!("file:{}", dst_console.display());
    let mut dst_args = vec!["--incoming", &addr, "--serial", &dst_serial];
    if back {
        dst_args.extend(["--stay", "--api-socket", dst_sock.to_str().unwrap()]);
    }
    let mut dst = crate::util::spawn(&dst_args);
    let rx = crate::migrate_util::lines(&mut dst);
    crate::migrate_util::wait_for(&rx, LISTENING);

    let mut req = json!({"cmd": "migrate", "to": addr});
    if let Some(n) = postcopy_after {
        req["postcopy_after"] = json!(n);
    }
    let figures = request(&sock, req)["migrate"].clone();
    eprintln!("{test}: {figures}");
    let mut dst = KernelVm {
        child: dst,
        console: dst_console,
    };
    let (src_code, src_err, src_text) = if back {
        // The source stays, with no VM, and takes the guest back a few lines later.
        crate::migrate_util::wait_state(&sock, "empty");
        let before = src.text();
        let back_addr = format!("tcp:127.0.0.1:{}", free_port());
        let r = request(&sock, json!({"cmd": "receive", "from": back_addr}));
        assert_eq!(r["ok"], true, "{r}");
        assert!(
            dst.wait_for("COUNTER 20 ", BOOT_LIMIT),
            "the counter went on at the destination:\n{}",
            dst.text()
        );
        let r = request(&dst_sock, json!({"cmd": "migrate", "to": back_addr}));
        assert_eq!(r["migrate"]["mode"], "precopy", "{r}");
        crate::migrate_util::wait_state(&dst_sock, "empty");
        let r = request(&dst_sock, json!({"cmd": "shutdown"}));
        assert_eq!(r["ok"], true, "{r}");
        // The guest ends on the first process now, and the process with it.
        let (code, err, text) = src.wait_end(BOOT_LIMIT);
        let after = text.get(before.len()..).unwrap_or_default().to_string();
        (code, err, (before, after))
    } else {
        let (code, err, text) = src.wait_end(Duration::from_secs(60));
        (code, err, (text, String::new()))
    };
    let (dst_code, dst_err, dst_text) = dst.wait_end(BOOT_LIMIT);
    assert_eq!(dst_code, Some(0), "the destination's end: {dst_err}");
    assert!(
        dst_text.contains("COUNTER "),
        "the destination went on counting:\n{dst_text}\n{dst_err}"
    );
    // One console: a line the pause cut is finished on the next host.
    let (src_before, src_after) = src_text;
    let whole = format!("{src_before}{dst_text}{src_after}");
    assert!(whole.lines().any(|l| l.trim_end() == "MARKER counter"));
    let all = counter_lines(&whole);
    check_counter(&all);
    assert_eq!(all.last().unwrap().0, 40, "the counter ran to its end");
    let last_host = if back { &src_after } else { &dst_text };
    assert!(
        last_host.contains("RUN-EXIT 0"),
        "the counter exited 0 where it ended:\n{last_host}"
    );
    assert_eq!(
        src_code,
        Some(0),
        "the source ends once migrated (or, back, once the guest powered off): {src_err}"
    );
}

/// Precopy, on two vCPUs and 2 MiB hugetlbfs.
#[test]
fn counter_migrates_live_precopy_on_two_vcpus_and_2m_hugetlbfs() {
    let test = "counter_migrates_live_precopy_on_two_vcpus_and_2m_hugetlbfs";
    // Source and destination: 128 pages each.
    if !crate::common::free_2m_pages_or_skip(test, 256) {
        return;
    }
    migrate_counter(
        test,
        &["--mem", "256M", "--cpus", "2", "--hugepages", "2M"],
        None,
        false,
    );
}

/// Postcopy after one round, on 4 KiB pages, between two `--stay` processes, and back
/// (precopy) to the first.
#[test]
fn counter_migrates_live_postcopy_and_back_between_staying_vmms() {
    migrate_counter(
        "counter_migrates_live_postcopy_and_back_between_staying_vmms",
        SMALL,
        Some(1),
        true,
    );
}

/// Debian's stock cloud kernel (`tools/fetch-kernel`) to userspace with the test initramfs and
/// no command line beyond the console and the marker: on this host the VMM adds what the
/// software KVM needs (`noxsave clearcpuid=ssse3`), emulates what KVM cannot, relays the
/// syscalls, and the DSDT gives the kernel's 8250 its IRQ.
#[test]
#[ignore = "slow here: 16 minutes on this host's software KVM (measured 2026-12-06 beside other \
            work: /init at 915 s of guest time, exit 0 after 978 s), most of it interpreted \
            ring-0 set-up (ftrace, retpoline and alternatives patching, ORC, crypto \
            self-tests); run with --ignored"]
fn debian_cloud_kernel_reaches_userspace() {
    let test = "debian_cloud_kernel_reaches_userspace";
    let Some((_, i)) = test_kernel(test) else {
        return;
    };
    let k = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kernel/vmlinuz");
    if !k.exists() {
        eprintln!(
            "{test}: skipped: {} is missing (run tools/fetch-kernel)",
            k.display()
        );
        return;
    }
    let _g = serial();
    let t = std::time::Instant::now();
    let vm = KernelVm::boot(
        &k,
        &i,
        test,
        "console=ttyS0 marker=stock",
        &["--mem", "512M", "--cpus", "1", "--hugepages", "none"],
        &[],
    );
    let (code, err, text) = vm.wait_end(Duration::from_secs(20 * 60));
    eprintln!("{test}: ended after {:.0?} with {code:?}", t.elapsed());
    let tail = &text[text.len().saturating_sub(3000)..];
    assert!(
        text.lines().any(|l| l.trim_end() == "MARKER stock"),
        "/init printed the marker:\n{tail}\n{err}"
    );
    assert_eq!(code, Some(0), "/init powered off:\n{tail}\n{err}");
}

#[test]
fn the_counter_check_rejects_a_lost_or_repeated_line() {
    let good: Vec<(u64, u64)> = (1..=3).map(|n| (n, fnv_chain(1..=n))).collect();
    // The first values counter.c prints (tools/test-kernel/README.md).
    assert_eq!(
        good,
        vec![
            (1, 0x07f8_bc07_b4ba_5002),
            (2, 0x7a23_85f1_c751_78ae),
            (3, 0xfb3e_fa19_1b39_9257)
        ]
    );
    check_counter(&good);
    let text: String = good
        .iter()
        .map(|(n, s)| format!("COUNTER {n} {s:016x}\nCOUNTER-DONE x\n"))
        .collect();
    assert_eq!(counter_lines(&text), good);
    let lost = vec![good[0], good[2]];
    assert!(std::panic::catch_unwind(|| check_counter(&lost)).is_err());
    let repeated = vec![good[0], good[1], good[1]];
    assert!(std::panic::catch_unwind(|| check_counter(&repeated)).is_err());
}
