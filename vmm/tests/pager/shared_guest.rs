//! `vmm --guest stress --memory-backend shared` on real KVM: guest RAM is a shared memfd (shmem
//! at 4 KiB, a hugetlbfs memfd at 2 MiB) paged through userfaultfd MISSING + MINOR and stage2.

use crate::guest_util::{run_guest, Run};

const SZ_2M: u64 = 2 << 20;
const PAGE: u64 = 4096;

fn stress_shared(test: &str, hugepages: &str, backing: &str) -> Option<Run> {
    let shared = ["--memory-backend", "shared"];
    let run = run_guest(test, "stress", 1, 2, hugepages, backing, &shared)?;
    assert_eq!(
        run.stats()["demand_paging"]["paging"]["memory"],
        "shared",
        "the pager ran on shared memory"
    );
    let slices = run.stats()["slice_bytes"].as_u64().expect("slice_bytes") * 2;
    // Both generations verified every page of both slices.
    assert_eq!(run.vcpu_sum("pages"), 2 * (slices / PAGE));
    Some(run)
}

#[test]
fn stress_on_shared_shmem_4k_passes_through_stage2() {
    let test = "stress_on_shared_shmem_4k";
    if let Some(run) = stress_shared(test, "none", "shared memfd, 4K pages") {
        let slices = run.stats()["slice_bytes"].as_u64().unwrap() * 2;
        assert!(run.counter("paging", "events_missing") > 0);
        assert!(run.counter("stage2", "installs_4k") >= slices / PAGE);
        assert_eq!(run.counter("stage2", "installs_2m"), 0);
    }
}

#[test]
fn stress_on_shared_hugetlb_2m_installs_each_touched_2m_page_once() {
    let test = "stress_on_shared_hugetlb_2m";
    if let Some(run) = stress_shared(test, "2M", "shared memfd, 2M hugetlbfs") {
        let touched_2m = run.stats()["slice_bytes"].as_u64().unwrap() * 2 / SZ_2M;
        assert_eq!(run.counter("stage2", "installs_2m"), touched_2m);
        assert_eq!(run.counter("stage2", "installs_4k"), 0);
        assert_eq!(run.counter("stage2", "mapped_2m"), touched_2m);
    }
}

#[test]
fn thp_on_shared_memory_is_refused_naming_the_choices() {
    let run = crate::guest_util::vmm_plain(&[
        "--guest",
        "stress",
        "--mem",
        "64M",
        "--memory-backend",
        "shared",
        "--hugepages",
        "thp",
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("private memory only") && run.stderr.contains("--hugepages 2M"),
        "{}",
        run.stderr
    );
}
