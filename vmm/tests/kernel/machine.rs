//! A booted kernel on the machine: the project's test kernel and initramfs
//! (`tools/build-test-kernel`, `tools/build-test-initramfs`) on the stage-2 pager by default,
//! driven over the control socket (info, stats, shutdown), and migrated live in the middle of
//! its boot (precopy, then postcopy) to a destination given nothing but `--incoming ADDR`: the
//! destination's console continues the source's byte for byte (no line lost or repeated, the
//! kernel's timestamps monotonic) and reaches the same point as an unmigrated boot.
//!
//! On this machine's software KVM the test kernel reaches `Run /init as init process` about
//! 20-50 s (guest clock) into its boot; /init then prints `MARKER <value>` (its system calls
//! through the VMM's syscall relay, its console output through COM1's interrupt, which the DSDT
//! describes) and powers off (ACPI S5): that is "the end" on both sides of a migration.

use crate::common::cores;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{
    request, spawn, stamp, test_kernel, tmp, wait_for_path, KernelVm, BOOT_LIMIT, SMALL,
};

use crate::migrate_util::{free_port, LISTENING};
use serde_json::{json, Value};
use vmm::exit::{EXIT_IDLE, EXIT_REBOOT, EXIT_SHUTDOWN_FORCED};

/// Where the unmigrated and the migrated boot both get to on this host.
const LAST_LINE: &str = "Run /init as init process";
const CMDLINE: &str = "console=ttyS0 noxsave panic=-1 marker=kernel-machine";

/// The test kernel with `initrd` and [`CMDLINE`] on the small machine.
fn boot(kernel: &Path, initrd: &Path, name: &str, extra: &[&str]) -> KernelVm {
    KernelVm::boot(kernel, initrd, name, CMDLINE, SMALL, extra)
}

/// The test kernel with any initrd and command line on the small machine.
fn boot_with(
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    name: &str,
    extra: &[&str],
) -> KernelVm {
    KernelVm::boot_with(kernel, initrd, name, cmdline, SMALL, extra)
}

/// A kernel VM is a machine like a test guest: demand paging through stage2 by default, and
/// the control socket's info, stats (with the emulation counters) and shutdown. So early in the
/// boot the kernel has not set up ACPI yet and cannot hear the power button: `shutdown` stops
/// the VM after --shutdown-timeout with the "forced" exit code.
#[test]
fn kernel_vm_pages_on_demand_and_answers_info_stats_and_shutdown() {
    let Some((k, i)) = test_kernel("kernel_vm_pages_on_demand_and_answers_info_stats_and_shutdown")
    else {
        return;
    };
    // One VM with one vCPU: it shares the host's cores with another such test.
    let _g = cores(1);
    let sock = tmp("info.sock");
    let stats = tmp("info.json");
    let mut vm = boot(
        &k,
        &i,
        "info",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--stats-json",
            stats.to_str().unwrap(),
            "--shutdown-timeout",
            "3",
        ],
    );
    assert!(
        vm.wait_for("Memory:", BOOT_LIMIT),
        "the kernel printed its memory line:\n{}",
        vm.text()
    );
    wait_for_path(&sock);
    let info = request(&sock, json!({"cmd": "info"}))["info"].clone();
    assert_eq!(info["payload"], "kernel", "{info}");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["vcpus"], 1, "{info}");
    assert_eq!(info["memory_bytes"], 256u64 << 20, "{info}");
    assert_eq!(info["demand_paging"], true, "{info}");
    assert_eq!(info["backing"], "4K pages", "{info}");
    assert!(info["uptime_s"].as_f64().unwrap() > 0.0, "{info}");

    let st = request(&sock, json!({"cmd": "stats"}))["stats"].clone();
    let missing = st["paging"]["events_missing"].as_u64().unwrap();
    assert!(
        missing > 0,
        "the kernel's first touches were userfaultfd faults: {st}"
    );
    assert!(st["stage2"].is_object(), "{st}");
    for kind in [
        "int3",
        "fwait",
        "popcnt",
        "clac",
        "stac",
        "cmpxchg16b",
        "ldmxcsr",
    ] {
        assert!(st["emulation"][kind].is_u64(), "{kind} counted: {st}");
    }

    let down = request(&sock, json!({"cmd": "shutdown"}))["shutdown"].clone();
    assert_eq!(down["how"], "stopped after timeout", "{down}");
    assert_eq!(down["exit_code"], EXIT_SHUTDOWN_FORCED, "{down}");
    assert!(down["seconds"].as_f64().unwrap() >= 3.0, "{down}");
    let (code, err, _) = vm.wait_end(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(EXIT_SHUTDOWN_FORCED),
        "shutdown without a power-off ends the VM with 4: {err}"
    );
    assert!(err.contains("did not power off within 3 s"), "{err}");
    assert!(!sock.exists(), "the control socket is removed");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let _ = std::fs::remove_file(&stats);
    assert_eq!(doc["payload"], "kernel", "{doc}");
    assert!(
        doc["demand_paging"]["paging"]["events_missing"]
            .as_u64()
            .unwrap()
            >= missing,
        "{doc}"
    );
}

/// Migrates a booting kernel once its console has `at`, to a destination given only
/// `--incoming`, and checks the two consoles together.
fn migrate_mid_boot(test: &str, postcopy_after: Option<u32>) {
    let Some((k, i)) = test_kernel(test) else {
        return;
    };
    // One vCPU on the small machine: the source runs until the move, the destination after it
    // (they overlap only while the postcopy pages go), so one of the host's cores.
    let _g = cores(1);
    let sock = tmp(&format!("{test}.sock"));
    let mut src = boot(
        &k,
        &i,
        &format!("{test}-src"),
        &["--api-socket", sock.to_str().unwrap()],
    );
    // Mid-boot: after the memory set-up, well before /init.
    assert!(
        src.wait_for("NR_IRQS", BOOT_LIMIT),
        "source boot:\n{}",
        src.text()
    );
    wait_for_path(&sock);

    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let dst_console = tmp(&format!("{test}-dst.console"));
    let dst_serial = format!("file:{}", dst_console.display());
    let mut dst = spawn(&["--incoming", &addr, "--serial", &dst_serial]);
    let rx = crate::migrate_util::lines(&mut dst);
    crate::migrate_util::wait_for(&rx, LISTENING);

    let mut req = json!({"cmd": "migrate", "to": addr});
    if let Some(n) = postcopy_after {
        req["postcopy_after"] = json!(n);
    }
    let figures = request(&sock, req)["migrate"].clone();
    assert_eq!(
        figures["mode"],
        if postcopy_after.is_some() {
            "postcopy"
        } else {
            "precopy"
        },
        "{figures}"
    );
    let (src_code, src_err, src_text) = src.wait_end(Duration::from_secs(60));
    assert_eq!(
        src_code,
        Some(0),
        "the source ends once migrated: {src_err}"
    );

    let mut dst = KernelVm {
        child: dst,
        console: dst_console,
    };
    let ended = dst.wait_for(LAST_LINE, BOOT_LIMIT);
    // /init then prints the marker and powers off, and the destination ends by itself.
    let (dst_code, dst_err, dst_text) = dst.wait_end(Duration::from_secs(120));
    assert!(
        ended,
        "the destination continued the boot to {LAST_LINE:?}:\n{dst_text}"
    );
    assert!(!dst_text.is_empty(), "the destination printed nothing");

    // One console: the destination's bytes continue the source's (a line cut by the pause
    // is finished there), no line twice, timestamps never going back.
    let whole = format!("{src_text}{dst_text}");
    let lines: Vec<&str> = whole.lines().collect();
    let mut last = 0.0f64;
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        if let Some(t) = stamp(l) {
            assert!(t >= last, "timestamp went back at {l:?} (after {last})");
            last = t;
            assert!(seen.insert(*l), "line printed twice: {l:?}");
        }
    }
    let seam = src_text.lines().count();
    assert!(
        seam > 10 && lines.len() > seam + 10,
        "both sides printed part of the boot"
    );
    assert!(
        whole
            .lines()
            .any(|l| l.trim_end() == "MARKER kernel-machine"),
        "the same end as an unmigrated boot: /init's marker, then its poweroff:\n{}",
        &whole[whole.len().saturating_sub(2000)..]
    );
    assert_eq!(dst_code, Some(0), "the destination powered off: {dst_err}");
}

#[test]
fn kernel_vm_migrates_mid_boot_precopy() {
    migrate_mid_boot("kernel_vm_migrates_mid_boot_precopy", None);
}

#[test]
fn kernel_vm_migrates_mid_boot_postcopy() {
    migrate_mid_boot("kernel_vm_migrates_mid_boot_postcopy", Some(1));
}

/// With no initrd the kernel panics for want of a root file system and, with `panic=5
/// reboot=acpi`, reboots five seconds later through the FADT's reset register: the VM ends with
/// the reboot code. On the way the kernel says it read the tables (the DSDT's AML loaded
/// without errors; S5 is supported: the sleep control/status registers and `\_S5`), and by the
/// panic its GED driver has unmasked the power button's interrupt (`info`). 20 s here
/// (measured 2026-12-06: 20.3 s, the 5 s panic delay included).
#[test]
fn a_kernel_panic_reboots_through_the_acpi_reset_register() {
    let Some((k, _)) = test_kernel("a_kernel_panic_reboots_through_the_acpi_reset_register") else {
        return;
    };
    // One VM with one vCPU: it shares the host's cores with another such test.
    let _g = cores(1);
    let t = Instant::now();
    let sock = tmp("reboot.sock");
    let mut vm = boot_with(
        &k,
        None,
        "console=ttyS0 noxsave panic=5 reboot=acpi",
        "reboot",
        &["--api-socket", sock.to_str().unwrap()],
    );
    assert!(
        vm.wait_for("Kernel panic", BOOT_LIMIT),
        "the kernel panicked:\n{}",
        vm.text()
    );
    let info = request(&sock, json!({"cmd": "info"}))["info"].clone();
    assert_eq!(
        info["power_button"]["guest_listening"], true,
        "Linux's GED driver requested GSI 23: {info}"
    );
    let (code, err, text) = vm.wait_end(BOOT_LIMIT);
    eprintln!("rebooted after {:.1} s", t.elapsed().as_secs_f64());
    for line in [
        "ACPI: 1 ACPI AML tables successfully acquired and loaded",
        "ACPI: PM: (supports S0 S5)",
        "Kernel panic",
    ] {
        assert!(text.contains(line), "console has {line:?}:\n{text}");
    }
    assert!(
        !text.contains("ACPI Error") && !text.contains("ACPI BIOS Error"),
        "no AML or table errors:\n{text}"
    );
    assert_eq!(code, Some(EXIT_REBOOT), "the reboot code: {err}");
    assert!(
        err.contains("guest reset through the ACPI reset register"),
        "through the reset register, not the i8042: {err}"
    );
}

/// Without ACPI (`acpi=off`) the kernel cannot power off: /init's `poweroff -f` ends in
/// "System halted", every vCPU in `hlt` with interrupts off, which the idle watch ends with
/// EXIT_IDLE instead of keeping the process alive. Needs guest userspace (the syscall relay on
/// this host's KVM). 46 s here (measured 2026-12-06).
#[test]
fn a_halted_kernel_ends_as_idle() {
    let Some((k, i)) = test_kernel("a_halted_kernel_ends_as_idle") else {
        return;
    };
    // One VM with one vCPU: it shares the host's cores with another such test.
    let _g = cores(1);
    let t = Instant::now();
    let vm = boot_with(
        &k,
        Some(&i),
        "console=ttyS0 noxsave acpi=off",
        "halted",
        &[],
    );
    let (code, err, text) = vm.wait_end(BOOT_LIMIT);
    eprintln!("ended after {:.1} s", t.elapsed().as_secs_f64());
    assert!(
        text.contains("System halted"),
        "the kernel halted:\n{}",
        &text[text.len().saturating_sub(2000)..]
    );
    assert_eq!(code, Some(EXIT_IDLE), "{err}");
    assert!(
        err.contains("halted with interrupts off and nothing pending"),
        "{err}"
    );
}
