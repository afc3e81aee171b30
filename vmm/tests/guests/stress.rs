//! `vmm --guest stress|touch|dirty` on real KVM: every mode on 4 KiB, THP and 2 MiB hugetlbfs
//! backing, with exact stage2 install counts where the backing makes them exact.

use crate::common::{kvm_or_skip, serial};
use crate::util::{run_guest, vmm_guest, Run};

const SZ_2M: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// Bytes of all slices of a run (every vCPU has the same slice length).
fn slice_bytes(run: &Run, cpus: u64) -> u64 {
    run.stats()["slice_bytes"].as_u64().expect("slice_bytes") * cpus
}

/// `--hugepages` values with the backing each must report: the every-backing tests' loop.
const BACKINGS: [(&str, &str); 3] = [("none", "4K pages"), ("thp", "THP"), ("2M", "2M hugetlbfs")];

fn stress_4x1g(test: &str, hugepages: &str, backing: &str) -> Option<Run> {
    let run = run_guest(test, "stress", 4, 4, hugepages, backing, &[])?;
    // Both generations verified every page of every slice.
    let pages = slice_bytes(&run, 4) / PAGE;
    assert!(pages >= 4 * 1000 * 256, "slices of ~1 GiB: {pages} pages");
    assert_eq!(run.vcpu_sum("pages"), 2 * pages);
    Some(run)
}

#[test]
fn stress_sequential_4x1g_on_4k_pages() {
    if let Some(run) = stress_4x1g("stress_sequential_4x1g_on_4k_pages", "none", "4K pages") {
        // Every first touch went through userfaultfd and stage2.
        let touched = slice_bytes(&run, 4) / PAGE;
        assert!(run.counter("stage2", "installs_4k") >= touched);
        assert_eq!(run.counter("stage2", "installs_2m"), 0);
        assert!(run.counter("paging", "events_missing") > 0);
    }
}

#[test]
fn stress_sequential_4x1g_on_thp() {
    if let Some(run) = stress_4x1g("stress_sequential_4x1g_on_thp", "thp", "THP") {
        let touched = slice_bytes(&run, 4) / PAGE;
        assert!(
            run.counter("stage2", "mapped_4k") + 512 * run.counter("stage2", "mapped_2m")
                >= touched
        );
    }
}

#[test]
fn stress_sequential_4x1g_on_hugetlb_2m_installs_each_touched_2m_page_once() {
    let test = "stress_sequential_4x1g_on_hugetlb_2m";
    if let Some(run) = stress_4x1g(test, "2M", "2M hugetlbfs") {
        let touched_2m = slice_bytes(&run, 4) / SZ_2M;
        assert_eq!(run.counter("stage2", "installs_2m"), touched_2m);
        assert_eq!(run.counter("stage2", "installs_4k"), 0);
        assert_eq!(run.counter("paging", "installed"), touched_2m);
        assert_eq!(run.counter("stage2", "mapped_2m"), touched_2m);
    }
}

#[test]
fn stress_random_on_every_backing() {
    let test = "stress_random_on_every_backing";
    for (hp, backing) in BACKINGS {
        let Some(run) = run_guest(test, "stress", 1, 4, hp, backing, &["--mode", "random"]) else {
            continue;
        };
        // Random mode makes as many steps per generation as the slice has pages.
        assert_eq!(run.vcpu_sum("pages"), 2 * slice_bytes(&run, 4) / PAGE);
        if hp == "2M" {
            // Random pages touch almost every 2 MiB page, each installed once.
            assert_eq!(
                run.counter("stage2", "installs_2m"),
                run.counter("stage2", "mapped_2m")
            );
        }
    }
}

#[test]
fn stress_shared_hot_on_every_backing_one_install_for_the_hot_page() {
    let test = "stress_shared_hot_on_every_backing";
    for (hp, backing) in BACKINGS {
        let extra = ["--mode", "shared-hot", "--generations", "50"];
        let Some(run) = run_guest(test, "stress", 1, 4, hp, backing, &extra) else {
            continue;
        };
        // Writers (vCPUs 0, 2) verify their half of the hot page each generation, readers
        // (1, 3) all 512 pages of it.
        assert_eq!(run.vcpu_sum("pages"), 50 * (256 + 512 + 256 + 512));
        let missing = run.counter("paging", "events_missing");
        let installed = run.counter("paging", "installed");
        let spurious = run.counter("paging", "spurious");
        let relaxed = run.counter("paging", "relaxed");
        assert_eq!(run.counter("paging", "denied"), 0);
        if hp == "2M" {
            // Racing handlers on the one hot 2 MiB page: exactly one install, every other
            // fault spurious or relaxed, none retried.
            assert_eq!(run.counter("stage2", "installs_2m"), 1);
            assert_eq!(installed, 1);
            assert_eq!(run.counter("paging", "retry"), 0);
            assert_eq!(missing, installed + spurious + relaxed, "{}", run.stats());
        }
    }
}

#[test]
fn touch_and_dirty_on_4_vcpus() {
    let test = "touch_and_dirty_on_4_vcpus";
    if !kvm_or_skip(test) {
        return;
    }
    let hp = if crate::common::free_2m_pages() >= 512 {
        "2M"
    } else {
        "thp"
    };
    let _one = serial();
    let touch = vmm_guest(
        test,
        &[
            "--guest",
            "touch",
            "--mem",
            "1G",
            "--cpus",
            "4",
            "--hugepages",
            hp,
        ],
    );
    touch.assert_pass();
    assert_eq!(touch.vcpu_sum("pages"), slice_bytes(&touch, 4) / PAGE);
    assert!(touch.vcpu_sum("cycles") > 0, "touch reports its time");

    // The runner replays every vCPU's writes against guest memory before it says PASS.
    let dirty = vmm_guest(
        test,
        &[
            "--guest",
            "dirty",
            "--mem",
            "1G",
            "--cpus",
            "4",
            "--hugepages",
            hp,
            "--generations",
            "6",
        ],
    );
    dirty.assert_pass();
    let per_gen = slice_bytes(&dirty, 1) / PAGE / 4;
    assert_eq!(dirty.vcpu_sum("writes"), 4 * 6 * per_gen);
}

/// 1 GiB hugetlbfs under demand paging: each touched GiB is one UFFDIO_COPY and one 1 GiB stage2
/// block. Regression: the copy used to fail with ENOMEM when the guest held the whole pool (the
/// kernel retried through a temporary huge page) and the vCPU then faulted forever.
#[test]
fn stress_on_hugetlb_1g_installs_one_block_per_touched_gib() {
    let test = "stress_on_hugetlb_1g_installs_one_block_per_touched_gib";
    if !kvm_or_skip(test) {
        return;
    }
    let free = crate::common::free_huge_pages("hugepages-1048576kB");
    if free < 2 {
        eprintln!("{test}: skipped: the 1 GiB hugetlb pool has {free} free pages, 2 needed");
        return;
    }
    let _one = serial();
    let run = vmm_guest(
        test,
        &[
            "--guest",
            "stress",
            "--mem",
            "2G",
            "--cpus",
            "2",
            "--hugepages",
            "1G",
        ],
    );
    run.assert_pass();
    run.assert_backing("1G hugetlbfs");
    let installs = run.counter("stage2", "installs_1g");
    assert!(
        (1..=2).contains(&installs),
        "2 GiB of RAM: one or two 1 GiB blocks, got {installs}"
    );
    assert_eq!(run.counter("stage2", "installs_2m"), 0);
    assert_eq!(run.counter("stage2", "installs_4k"), 0);
    assert_eq!(run.counter("paging", "fatal"), 0);
}
