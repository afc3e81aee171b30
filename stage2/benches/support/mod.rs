//! Shared pieces of the stage2 benches: a linear backing, engine constructors and the timed workloads
//! (each workload is one function so criterion and the `compare` table measure the same thing).

#![allow(dead_code)] // each bench binary uses a subset

pub mod x86_baseline;

use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use stage2::{
    Access, Backing, Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms, Resolved, Stage2,
};

/// CPU time the calling thread has used so far (unaffected by time spent preempted).
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One GiB.
pub const GIB: u64 = 1 << 30;
/// 4 KiB pages in 1 GiB.
pub const PAGES_4K_PER_GIB: u64 = GIB >> 12;
/// Output address the benches map guest memory to (any 1 GiB aligned value works).
pub const FRAME_BASE: u64 = 1 << 40;

/// The engine type every bench measures.
pub type Engine = Stage2<Ept, NoopTlb>;

/// Guest memory backed linearly at `FRAME_BASE`, in blocks of at most `max_size`, read/write/exec.
pub struct Linear {
    /// Largest mapping the backing allows.
    pub max_size: PageSize,
}

impl Backing for Linear {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        let block = gpa & !(self.max_size.bytes() - 1);
        Some(Resolved {
            frame: FRAME_BASE + block,
            max_size: self.max_size,
            perms: Perms::RWX,
        })
    }
}

/// A fresh engine; `global_lock` selects the one-mutex baseline mode.
pub fn engine(global_lock: bool, nr_vcpus: usize) -> Engine {
    let config = Config {
        nr_vcpus,
        global_lock,
        dirty_limit: 8 * GIB,
        ..Config::default()
    };
    Stage2::new(Ept, NoopTlb, config)
}

/// Fault every 4 KiB page of `[0, pages * 4 KiB)` in, with `threads` threads taking alternate 2 MiB
/// chunks (so they share the upper tables). With `outer_mutex`, every fault is taken under one
/// `std::sync::Mutex` held by the bench itself (a baseline independent of the engine's own mode).
/// Returns the wall time from the start barrier to the last thread's end.
pub fn fault_in_4k(s2: &Engine, pages: u64, threads: usize, outer_mutex: bool) -> Duration {
    fault_in_4k_cpu(s2, pages, threads, outer_mutex, false).0
}

/// As [`fault_in_4k`], also returning the CPU time all threads used (the sum). With `pinned`, each
/// thread holds one [`Stage2::pin`] guard across its faults (a handler pinning per batch).
pub fn fault_in_4k_cpu(
    s2: &Engine,
    pages: u64,
    threads: usize,
    outer_mutex: bool,
    pinned: bool,
) -> (Duration, Duration) {
    let backing = Linear {
        max_size: PageSize::Size4K,
    };
    let lock = Mutex::new(());
    let start = Barrier::new(threads + 1);
    let chunks = pages.div_ceil(512);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (backing, lock, start) = (&backing, &lock, &start);
                s.spawn(move || {
                    start.wait();
                    let _pin = pinned.then(|| s2.pin());
                    let cpu0 = thread_cpu();
                    let mut chunk = t as u64;
                    while chunk < chunks {
                        for i in chunk * 512..((chunk + 1) * 512).min(pages) {
                            let fault = Fault {
                                gpa: i << 12,
                                access: Access::Write,
                                vcpu: t,
                            };
                            let seq = s2.invalidate_seq();
                            let out = if outer_mutex {
                                let _g = lock.lock().unwrap();
                                s2.handle_fault(fault, backing, seq)
                            } else {
                                s2.handle_fault(fault, backing, seq)
                            };
                            debug_assert!(matches!(out, Outcome::Installed { .. }), "{out:?}");
                            std::hint::black_box(out);
                        }
                        chunk += threads as u64;
                    }
                    thread_cpu() - cpu0
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let cpu: Duration = handles
            .into_iter()
            .map(|h| h.join().expect("fault thread panicked"))
            .sum();
        (t0.elapsed(), cpu)
    })
}

/// Map `[0, pages * 4 KiB)` with one `map_range` batch of 4 KiB pages.
pub fn map_range_4k(s2: &Engine, pages: u64) {
    let n = s2
        .map_range(0, pages << 12, FRAME_BASE, Perms::RW, PageSize::Size4K)
        .expect("map_range on an empty engine");
    assert_eq!(
        n as u64, pages,
        "map_range installed a different number of pages"
    );
}

/// Write-fault every `every`-th 4 KiB page of `[0, pages * 4 KiB)` (dirty logging on: each fault
/// relaxes a write-protected page in place and marks it dirty). Returns the pages written.
pub fn dirty_every(s2: &Engine, pages: u64, every: u64) -> u64 {
    let backing = Linear {
        max_size: PageSize::Size4K,
    };
    let mut written = 0;
    for i in (0..pages).step_by(every as usize) {
        let seq = s2.invalidate_seq();
        let out = s2.handle_fault(
            Fault {
                gpa: i << 12,
                access: Access::Write,
                vcpu: 0,
            },
            &backing,
            seq,
        );
        assert!(
            matches!(out, Outcome::Relaxed { .. } | Outcome::Installed { .. }),
            "write fault on a write-protected page gave {out:?}"
        );
        written += 1;
    }
    written
}

/// An engine with `[0, pages * 4 KiB)` mapped in 4 KiB pages and dirty logging enabled (all pages
/// write-protected, nothing dirty yet).
pub fn logging_engine(pages: u64) -> Engine {
    let s2 = engine(false, 1);
    map_range_4k(&s2, pages);
    s2.dirty().enable(stage2::SplitPolicy::Eager);
    s2
}

/// Median of `runs` timings of `f`, each on fresh state made by `setup` (setup is not timed).
pub fn median<S>(
    runs: usize,
    mut setup: impl FnMut() -> S,
    mut f: impl FnMut(&S) -> Duration,
) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let state = setup();
            f(&state)
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Smallest of `runs` measurements of `f` (each a pair of durations, ordered by the first), each on
/// fresh state made by `setup`: on a busy host, interference only ever adds time.
pub fn best<S>(
    runs: usize,
    mut setup: impl FnMut() -> S,
    mut f: impl FnMut(&S) -> (Duration, Duration),
) -> (Duration, Duration) {
    (0..runs)
        .map(|_| {
            let state = setup();
            f(&state)
        })
        .min()
        .expect("at least one run")
}

/// Wall and CPU time of one call of `f` on this thread.
pub fn timed_cpu(f: impl FnOnce()) -> (Duration, Duration) {
    let (t0, c0) = (Instant::now(), thread_cpu());
    f();
    (t0.elapsed(), thread_cpu() - c0)
}

/// Time one call of `f`.
pub fn timed(f: impl FnOnce()) -> Duration {
    let t0 = Instant::now();
    f();
    t0.elapsed()
}

/// An engine whose first 1 GiB entry is empty but whose root and 512 GiB entry are present (one page
/// is mapped at 2 GiB): invalidating `0..1 GiB` must cost one entry read.
pub fn empty_1g_entry_engine() -> Engine {
    let s2 = engine(false, 1);
    let seq = s2.invalidate_seq();
    let out = s2.handle_fault(
        Fault {
            gpa: 2 * GIB,
            access: Access::Read,
            vcpu: 0,
        },
        &Linear {
            max_size: PageSize::Size4K,
        },
        seq,
    );
    assert!(matches!(out, Outcome::Installed { .. }), "{out:?}");
    s2
}
