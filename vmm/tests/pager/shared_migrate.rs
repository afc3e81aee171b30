//! Live migration between two `vmm --guest dirty` processes whose guest RAM is shared memfd
//! memory on both ends (`--memory-backend shared`): stage2-wp dirty logging through the pager on
//! the source, pages placed into the memfd (and fetched on demand in postcopy) on the
//! destination, whose replay of every write must PASS. 4 KiB shmem and 2 MiB hugetlbfs memfd.

use crate::common::{free_2m_pages_or_skip, kvm_or_skip, serial};
use std::process::Child;

use crate::migrate_util::{listening_at, run_to_end, vmm_on};

/// A `dirty` guest on shared memfd RAM backed by `--hugepages hugepages`, with `extra` flags.
fn vmm(hugepages: &str, extra: &[&str]) -> Child {
    let mut args = vec!["--memory-backend", "shared", "--log-level", "warn"];
    args.extend_from_slice(extra);
    vmm_on(hugepages, &args)
}

fn migrate(test: &str, hugepages: &str, src_flags: &[&str]) {
    if !kvm_or_skip(test) {
        return;
    }
    let _one = serial();
    // Both ends hold the guest's RAM at once.
    if hugepages == "2M" && !free_2m_pages_or_skip(test, 2 * 256) {
        return;
    }
    let sock = std::env::temp_dir().join(format!("{test}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let dst = listening_at(
        format!("unix:{}", sock.display()),
        |a| vmm(hugepages, a),
        &["--run-for", "0"],
    );
    let mut args = vec!["--migrate-to", &dst.addr, "--max-rounds", "4"];
    args.extend_from_slice(src_flags);
    let (scode, sout, serr) = run_to_end(vmm(hugepages, &args));
    let (dcode, dout, derr) = dst.finish();
    let _ = std::fs::remove_file(&sock);
    assert_eq!(scode, 0, "source: {sout}\n{serr}");
    assert!(sout.contains("complete"), "{sout}\n{serr}");
    assert_eq!(dcode, 0, "destination: {dout}\n{derr}");
    assert!(dout.contains("shared memfd"), "{dout}\n{derr}");
    assert!(dout.lines().any(|l| l == "PASS"), "{dout}\n{derr}");
}

#[test]
fn precopy_stage2_wp_on_shared_4k_passes() {
    migrate(
        "precopy_stage2_wp_on_shared_4k",
        "none",
        &["--dirty-mode", "stage2-wp"],
    );
}

#[test]
fn postcopy_stage2_wp_on_shared_4k_passes() {
    migrate(
        "postcopy_stage2_wp_on_shared_4k",
        "none",
        &["--dirty-mode", "stage2-wp", "--postcopy-after", "2"],
    );
}

#[test]
fn postcopy_on_shared_hugetlb_2m_passes() {
    migrate("postcopy_on_shared_2m", "2M", &["--postcopy-after", "1"]);
}
