//! Populate-rate benchmark of the demand pager (prints figures, asserts nothing about speed).
//!
//! Threads standing in for vCPUs write one word per 4 KiB page of their own slice, once (the
//! access pattern of the kernel selftest `demand_paging_test` and of our `touch` guest), on
//! memory registered with the pager, and the same on plain memory the kernel populates alone.
//!
//! ```text
//! cargo bench -p vmm --bench paging_bench
//! ```
//!
//! Environment: `PAGING_BENCH_MIB` (per thread, default 256), `PAGING_BENCH_THREADS` (default 2),
//! `PAGING_BENCH_REPS` (runs per case, default 5; the best and the median are printed). Pages/s
//! counts 4 KiB pages populated.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use stage2::PageSize;
use vmm::memory::RamRegion;
use vmm::pager::{Pager, PagerConfig};

#[allow(dead_code)] // the pager suite's helpers; the benchmark uses the mapping only
#[path = "../tests/pager/util.rs"]
mod util;
use util::{Ram, PAGE};

const HUGE_2M: u64 = 2 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The measured memory: the suites' mapping, with THP kept out of the 4 KiB case (the
/// kernel-alone baseline would otherwise get 2 MiB pages).
fn mem(len: u64, hugetlb: bool) -> Option<Ram> {
    let ram = Ram::new(len, hugetlb)?;
    if !hugetlb {
        // SAFETY: advice on the fresh mapping `ram` owns.
        unsafe {
            libc::madvise(
                ram.addr as *mut libc::c_void,
                len as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
    }
    Some(ram)
}

/// `threads` threads write one word in every 4 KiB page of their slice; returns the time from
/// the common start to the last thread's end.
fn touch_all(mem: &Ram, threads: u64) -> Duration {
    let slice = mem.len / threads;
    let barrier = Arc::new(Barrier::new(threads as usize + 1));
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let b = barrier.clone();
            let base = mem.addr + t * slice;
            thread::spawn(move || {
                b.wait();
                let mut a = base;
                while a < base + slice {
                    // SAFETY: inside the live mapping.
                    unsafe { std::ptr::write_volatile(a as *mut u64, a) };
                    a += PAGE;
                }
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    for h in hs {
        h.join().unwrap();
    }
    t0.elapsed()
}

fn row(name: &str, bytes: u64, best: Duration, median: Duration, extra: &str) {
    let pages = (bytes / PAGE) as f64;
    println!(
        "{name:<48} {:>5} MiB  best {:>7.1} ms {:>9.0} pages/s  median {:>7.1} ms {:>9.0} pages/s {extra}",
        bytes >> 20,
        best.as_secs_f64() * 1e3,
        pages / best.as_secs_f64(),
        median.as_secs_f64() * 1e3,
        pages / median.as_secs_f64(),
    );
}

/// Runs one case `reps` times on fresh memory; prints the best and the median.
fn case(hugetlb: bool, threads: u64, per_thread: u64, reps: usize, pager_cfg: Option<PagerConfig>) {
    let len = threads * per_thread;
    let kind = if hugetlb { "2M hugetlb" } else { "4K" };
    let label = match &pager_cfg {
        None => format!("{kind}, kernel alone, {threads} thr"),
        Some(c) => format!(
            "{kind}, pager {} handler(s), fault-around {}, {threads} thr",
            c.handlers, c.fault_around_pages
        ),
    };
    let page = if hugetlb {
        PageSize::Size2M
    } else {
        PageSize::Size4K
    };
    let mut times = Vec::new();
    let mut extra = String::new();
    for _ in 0..reps {
        let Some(mem) = mem(len, hugetlb) else {
            return;
        };
        let Some(cfg) = pager_cfg.clone() else {
            times.push(touch_all(&mem, threads));
            continue;
        };
        let region = RamRegion {
            gpa: 0,
            len,
            host_addr: mem.addr,
        };
        let pager = Pager::start_with_regions(&[region], page, cfg).unwrap();
        times.push(touch_all(&mem, threads));
        let st = pager.stats();
        extra = format!(
            "(events {}, installs 4K {} 2M {})",
            st.events_missing, st.stage2.installs_4k, st.stage2.installs_2m
        );
        pager.stop();
    }
    times.sort();
    row(&label, len, times[0], times[times.len() / 2], &extra);
}

fn main() {
    let threads = env_u64("PAGING_BENCH_THREADS", 2);
    let per_thread = env_u64("PAGING_BENCH_MIB", 256) << 20;
    let reps = env_u64("PAGING_BENCH_REPS", 5) as usize;
    assert!(
        per_thread.is_multiple_of(HUGE_2M),
        "PAGING_BENCH_MIB must be even"
    );
    let cfg = |handlers: usize, fa: usize| {
        Some(PagerConfig {
            handlers,
            write_tracking: false,
            fault_around_pages: fa,
            vcpus: threads as usize,
        })
    };
    println!(
        "populate: {threads} thread(s) x {} MiB, one write per 4 KiB page",
        per_thread >> 20
    );
    case(false, threads, per_thread, reps, None);
    case(false, threads, per_thread, reps, cfg(threads as usize, 1));
    case(false, threads, per_thread, reps, cfg(threads as usize, 16));
    case(false, threads, per_thread, reps, cfg(threads as usize, 64));
    case(false, threads, per_thread, reps, cfg(1, 16));
    case(true, threads, per_thread, reps, None);
    case(true, threads, per_thread, reps, cfg(threads as usize, 1));
    case(true, threads, per_thread, reps, cfg(1, 1));
}
