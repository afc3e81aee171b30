//! Shared by every test binary of `vmm/tests`: the host's cores shared out between a binary's
//! tests ([`cores`], [`serial`]), and the checks that skip a test, with the reason printed,
//! where /dev/kvm or free huge pages are missing.
//!
//! Each binary declares this module once at its root (`mod common;`, or with `#[path]` from a
//! folder), and the helpers shared between suites (`migrate/util.rs`, `guests/util.rs`) use it
//! from there, so a binary has exactly one count of taken cores however many helper files it
//! loads.

#![allow(dead_code)] // each binary uses part of the helpers

pub mod vm;

use std::path::Path;
use std::sync::{Condvar, Mutex};

/// The cores this binary's running tests have taken ([`cores`]).
static TAKEN: Mutex<usize> = Mutex::new(0);
/// Signalled whenever cores are given back.
static GIVEN_BACK: Condvar = Condvar::new();

/// The host's cores a test binary shares out: this machine has 2, and a VM's vCPU keeps one
/// busy (on this host's software KVM the guest's ring 0 runs in the vCPU thread).
pub fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `n` of the host's cores, held by a test until the guard drops ([`cores`]).
#[must_use = "the cores are given back when the guard drops"]
pub struct Cores(usize);

impl Drop for Cores {
    fn drop(&mut self) {
        let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
        *taken -= self.0;
        GIVEN_BACK.notify_all();
    }
}

/// Waits until `n` of the host's cores are free and takes them (at most all of them): a test
/// whose one VM has one vCPU takes 1, so two such tests run side by side on this 2-core host;
/// a test with more vCPUs or several VMs takes [`serial`]. A test that panicked holding cores
/// gives them back as it unwinds.
pub fn cores(n: usize) -> Cores {
    let n = n.clamp(1, host_cores());
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    while *taken + n > host_cores() {
        taken = GIVEN_BACK.wait(taken).unwrap_or_else(|p| p.into_inner());
    }
    *taken += n;
    Cores(n)
}

/// Every core of the host: one VM at a time in this binary (the hugetlb pool is shared too).
pub fn serial() -> Cores {
    cores(host_cores())
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
