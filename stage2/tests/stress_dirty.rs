//! Real-thread stress of dirty logging: vCPU threads write (by write faults and by writes through
//! writable translations) while a harvester thread repeatedly gets and clears the dirty bitmap and an
//! occasional invalidation zaps a whole GiB; no write may be missing from the harvests that follow it.
//!
//! A write is recorded with the number of harvests completed before it started; it must be in a
//! harvest whose index is at least that number (a harvest that completed before the write started
//! cannot hold it; one of the later ones must). A final harvest after the threads join closes the set.
//! A vCPU that panics or hangs fails the test within its time limit (`support/threads.rs`).

#![cfg(not(loom))]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stage2::{
    Access, Backing, Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms, Resolved, SplitPolicy,
    Stage2,
};

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;
#[path = "support/threads.rs"]
mod threads;

const GIB: u64 = 1 << 30;
/// GiB 0 is backed in 2 MiB blocks (eager split at enable), GiB 1 in 4 KiB pages.
const RANGE: std::ops::Range<u64> = 0..2 * GIB;
/// Pages written are drawn from a small window per GiB so that pages are written again and again.
const HOT_PAGES: u64 = 4096;
const FRAME_BASE: u64 = 1 << 40;
const VCPUS: usize = 3;
const RUN_FOR: Duration = Duration::from_secs(3);
const MAX_OPS_PER_THREAD: u64 = 4_000_000;
/// How long the vCPUs may overrun `RUN_FOR` before the test reports a hang.
const HANG_LIMIT: Duration = Duration::from_secs(30);

struct Linear;

impl Backing for Linear {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        let max_size = if gpa < GIB {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        let block = gpa & !(max_size.bytes() - 1);
        Some(Resolved {
            frame: FRAME_BASE + block,
            max_size,
            perms: Perms::RW,
        })
    }
}

type Engine = Stage2<Ept, NoopTlb>;

/// Writes one vCPU made: (gpa, harvests completed before the write started).
fn vcpu(s2: &Engine, vcpu: usize, completed: &AtomicUsize, deadline: Instant) -> Vec<(u64, usize)> {
    let mut rng = Rng(0xd1e7_0000_0000_0001 + vcpu as u64 * 0x9e37_79b9);
    let mut writes = Vec::new();
    for op in 0..MAX_OPS_PER_THREAD {
        if op % 256 == 0 && Instant::now() >= deadline {
            break;
        }
        let gpa = rng.below(2) * GIB + (rng.below(HOT_PAGES) << 12);
        let before = completed.load(Ordering::Acquire);
        match rng.below(10) {
            0..=5 => {
                let seq = s2.invalidate_seq();
                match s2.handle_fault(
                    Fault {
                        gpa,
                        access: Access::Write,
                        vcpu,
                    },
                    &Linear,
                    seq,
                ) {
                    Outcome::Installed { .. } | Outcome::Relaxed { .. } | Outcome::Spurious => {
                        writes.push((gpa, before))
                    }
                    Outcome::Retry => {}
                    Outcome::Denied => panic!("write fault at {gpa:#x} denied on RW memory"),
                }
            }
            6..=8 => {
                // The guest writes through whatever writable translation the tables hold.
                if s2.translate(gpa, Access::Write).is_ok() {
                    writes.push((gpa, before));
                }
            }
            _ => {
                let seq = s2.invalidate_seq();
                let out = s2.handle_fault(
                    Fault {
                        gpa,
                        access: Access::Read,
                        vcpu,
                    },
                    &Linear,
                    seq,
                );
                assert_ne!(
                    out,
                    Outcome::Denied,
                    "read fault at {gpa:#x} denied on RW memory"
                );
            }
        }
    }
    writes
}

#[test]
fn stress_no_lost_dirty_page_eager_split() {
    run(SplitPolicy::Eager);
}

#[test]
fn stress_no_lost_dirty_page_lazy_split() {
    run(SplitPolicy::Lazy);
}

/// Map the hot window of GiB 0 with 2 MiB blocks (writable), enable logging with `policy`, then
/// race writers against harvests and invalidations.
fn run(policy: SplitPolicy) {
    let s2: Arc<Engine> = Arc::new(Stage2::new(
        Ept,
        NoopTlb,
        Config {
            nr_vcpus: VCPUS,
            dirty_limit: RANGE.end,
            ..Config::default()
        },
    ));
    for gpa in (0..HOT_PAGES << 12).step_by(2 << 20) {
        let fault = Fault {
            gpa,
            access: Access::Write,
            vcpu: 0,
        };
        let out = s2.handle_fault(fault, &Linear, s2.invalidate_seq());
        assert_eq!(
            out,
            Outcome::Installed {
                gpa,
                size: PageSize::Size2M
            }
        );
    }
    s2.dirty().enable(policy);
    // Writes made before logging was enabled are not asked for; start from a clean log.
    let _ = s2.dirty().harvest(RANGE);

    let completed = Arc::new(AtomicUsize::new(0));
    let harvests: Arc<Mutex<Vec<HashSet<u64>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + RUN_FOR;
    let vcpus: Vec<_> = (0..VCPUS)
        .map(|v| {
            let (s2, completed) = (s2.clone(), completed.clone());
            let h = std::thread::spawn(move || vcpu(&s2, v, &completed, deadline));
            (format!("vCPU {v}"), h)
        })
        .collect();
    let harvester = {
        let (s2, completed, harvests, stop) = (
            s2.clone(),
            completed.clone(),
            harvests.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let pages = s2.dirty().harvest(RANGE).iter().collect::<HashSet<u64>>();
                harvests.lock().unwrap().push(pages);
                completed.fetch_add(1, Ordering::AcqRel);
                n += 1;
                if n.is_multiple_of(8) {
                    // Zap a whole GiB: the next write must install again and still be logged.
                    let gib = (n / 8) % 2;
                    let _inv = s2.invalidate(gib * GIB..(gib + 1) * GIB);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let writes: Vec<(u64, usize)> = threads::join_all(
        vcpus,
        deadline + HANG_LIMIT,
        || stop.store(true, Ordering::Release),
        vec![("the harvester".to_string(), harvester)],
        HANG_LIMIT,
    )
    .into_iter()
    .flatten()
    .collect();
    let mut harvests = std::mem::take(&mut *harvests.lock().unwrap());
    harvests.push(s2.dirty().harvest(RANGE).iter().collect::<HashSet<u64>>());
    assert!(
        harvests.len() > 10 && writes.len() > 1000,
        "the run did too little: {} harvests, {} writes",
        harvests.len(),
        writes.len()
    );
    for &(gpa, before) in &writes {
        assert!(
            harvests[before..].iter().any(|h| h.contains(&gpa)),
            "write to {gpa:#x} after harvest {before} is in no later harvest (of {})",
            harvests.len()
        );
    }
    println!(
        "{policy:?}: {} writes, {} harvests\n{}",
        writes.len(),
        harvests.len(),
        s2.stats()
    );
}
