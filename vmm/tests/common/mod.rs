//! Shared by every test binary of `vmm/tests`: the binary's one run lock, and the checks that
//! skip a test, with the reason printed, where /dev/kvm or free huge pages are missing.
//!
//! Each binary declares this module once at its root (`mod common;`, or with `#[path]` from a
//! folder), and the helpers shared between suites (`migrate/util.rs`, `guests/util.rs`) use it
//! from there, so a binary holds exactly one [`SERIAL`] however many helper files it loads.

#![allow(dead_code)] // each binary uses part of the helpers

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// One VM at a time per test binary: the machine has 2 cores and the hugetlb pool is shared.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// Holds [`SERIAL`] (a test that panicked holding it does not stop the others).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// False, with the reason printed, when this machine has no /dev/kvm. Where /dev/kvm is there
/// the test runs: a /dev/kvm the test cannot open is a failure with KVM's own error, not a skip.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("{test}: skipped: /dev/kvm is absent");
    false
}

/// Free (not reserved) pages of the huge page pool `pool` (a folder of
/// /sys/kernel/mm/hugepages); 0 where the pool does not exist.
pub fn free_huge_pages(pool: &str) -> u64 {
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/{pool}/{f}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

/// Free, unreserved 2 MiB hugetlb pages.
pub fn free_2m_pages() -> u64 {
    free_huge_pages("hugepages-2048kB")
}

/// True when the 2 MiB hugetlb pool has `pages` free (not reserved) pages; prints why a test
/// is skipped otherwise (other suites share the pool: run again when it is free).
pub fn free_2m_pages_or_skip(test: &str, pages: u64) -> bool {
    let free = free_2m_pages();
    if free >= pages {
        return true;
    }
    eprintln!("{test}: skipped: the 2 MiB hugetlb pool has {free} free pages, {pages} needed");
    false
}

/// True when the 2 MiB pool can back `bytes`; prints why a test is skipped otherwise.
pub fn hugetlb_or_skip(test: &str, bytes: u64) -> bool {
    free_2m_pages_or_skip(test, bytes / (2 << 20))
}
