//! Real-thread stress through the software TLB model: vCPU threads access guest memory the way a
//! CPU does (hit in their own TLB, or walk and cache the result, valid or not; a miss or a
//! permission failure becomes a stage-2 fault), while a host thread harvests the dirty log and
//! invalidates whole GiBs, remapping them to new memory (a new generation) inside each
//! invalidation.
//!
//! Checks: an access that completes while its GiB's generation is stable reaches that generation's
//! memory (no stale TLB entry survives an invalidation); every write that completed is in a
//! harvest that started after the write (no stale writable TLB entry survives a harvest's
//! re-protection); a fault on RW memory is never denied; every access completes after a bounded
//! number of faults answered `Installed`, `Relaxed` or `Spurious` in a row (a vCPU whose TLB keeps
//! an entry that a spurious fault did not flush would fault forever).
//!
//! A vCPU that panics or hangs fails the test within its time limit (`support/threads.rs`).

#![cfg(not(loom))]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stage2::{
    Access, Backing, Config, Ept, Fault, Outcome, PageSize, Perms, Resolved, SoftTlb, SplitPolicy,
    Stage2, TlbAccess,
};

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;
#[path = "support/threads.rs"]
mod threads;

const GIB: u64 = 1 << 30;
const NR_GIB: u64 = 2;
const HOT_PAGES: u64 = 2048;
const FRAME_BASE: u64 = 1 << 40;
const GEN_STRIDE: u64 = 1 << 36;
const VCPUS: usize = 3;
const RUN_FOR: Duration = Duration::from_secs(2);
const MAX_ACCESSES_PER_VCPU: u64 = 2_000_000;
/// Faults answered with a mapping that allows the access (installed, relaxed or spurious) one
/// access may take in a row before it must complete. Between two of them the host may re-protect
/// (a harvest) or zap (an invalidation) the page, every few hundred microseconds: a handful is
/// normal, this many is a vCPU that makes no progress.
const MAX_GRANTED_REFAULTS: u32 = 100;
/// How long the vCPUs may overrun `RUN_FOR` before the test reports a hang.
const HANG_LIMIT: Duration = Duration::from_secs(30);

/// GiB 0 in 2 MiB blocks, GiB 1 in 4 KiB pages, both RW, each with a generation.
struct Host {
    generation: [AtomicU64; NR_GIB as usize],
}

impl Host {
    fn frame(gpa: u64, generation: u64) -> u64 {
        FRAME_BASE + generation * GEN_STRIDE + gpa
    }
}

impl Backing for Host {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        if gpa >= NR_GIB * GIB {
            return None;
        }
        let generation = self.generation[(gpa / GIB) as usize].load(Ordering::Acquire);
        let max_size = if gpa < GIB {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        let block = gpa & !(max_size.bytes() - 1);
        Some(Resolved {
            frame: Host::frame(block, generation),
            max_size,
            perms: Perms::RW,
        })
    }
}

type Engine = Stage2<Ept, SoftTlb>;

/// One vCPU: returns the writes it completed, each with the number of harvests completed before
/// the write started.
fn vcpu(
    s2: &Engine,
    host: &Host,
    v: usize,
    completed: &AtomicUsize,
    deadline: Instant,
) -> Vec<(u64, usize)> {
    let mut rng = Rng(0x7b1b_0000_0000_0001 + v as u64 * 0x9e37_79b9);
    let mut writes = Vec::new();
    for n in 0..MAX_ACCESSES_PER_VCPU {
        if n % 256 == 0 && Instant::now() >= deadline {
            break;
        }
        let gib = rng.below(NR_GIB);
        let gpa = gib * GIB + (rng.below(HOT_PAGES) << 12) + rng.below(512) * 8;
        let access = if rng.below(2) == 0 {
            Access::Read
        } else {
            Access::Write
        };
        let generation = &host.generation[gib as usize];
        let before = completed.load(Ordering::Acquire);
        let gen_before = generation.load(Ordering::Acquire);
        // Like a CPU: retry the access until it completes; each failure is a stage-2 fault.
        let mut granted_refaults = 0;
        loop {
            match s2.tlb().access(s2, v, gpa, access) {
                TlbAccess::Ok(pa) => {
                    if generation.load(Ordering::Acquire) == gen_before {
                        assert_eq!(
                            pa,
                            Host::frame(gpa, gen_before),
                            "vCPU {v}: {access:?} at {gpa:#x} reached stale memory"
                        );
                    }
                    if access == Access::Write {
                        writes.push((gpa & !0xfff, before));
                    }
                    break;
                }
                TlbAccess::Fault { from_cache } => {
                    let seq = s2.invalidate_seq();
                    let out = s2.handle_fault(
                        Fault {
                            gpa,
                            access,
                            vcpu: v,
                        },
                        host,
                        seq,
                    );
                    assert_ne!(
                        out,
                        Outcome::Denied,
                        "vCPU {v}: {access:?} at {gpa:#x} denied on RW memory"
                    );
                    if out != Outcome::Retry {
                        granted_refaults += 1;
                    }
                    assert!(
                        granted_refaults <= MAX_GRANTED_REFAULTS,
                        "vCPU {v}: {access:?} at {gpa:#x} faulted again after {granted_refaults} faults answered with a usable mapping (last {out:?}, from cache: {from_cache}): no progress"
                    );
                }
            }
        }
    }
    writes
}

#[test]
fn stress_tlb_no_stale_translation_no_lost_write() {
    let s2: Arc<Engine> = Arc::new(Stage2::new(
        Ept,
        SoftTlb::new(VCPUS),
        Config {
            nr_vcpus: VCPUS,
            dirty_limit: NR_GIB * GIB,
            ..Config::default()
        },
    ));
    let host = Arc::new(Host {
        generation: Default::default(),
    });
    s2.dirty().enable(SplitPolicy::Eager);
    let completed = Arc::new(AtomicUsize::new(0));
    let harvests: Arc<Mutex<Vec<HashSet<u64>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + RUN_FOR;
    let vcpus: Vec<_> = (0..VCPUS)
        .map(|v| {
            let (s2, host, completed) = (s2.clone(), host.clone(), completed.clone());
            let h = std::thread::spawn(move || vcpu(&s2, &host, v, &completed, deadline));
            (format!("vCPU {v}"), h)
        })
        .collect();
    let harvester = {
        let (s2, host, completed, harvests, stop) = (
            s2.clone(),
            host.clone(),
            completed.clone(),
            harvests.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let pages: HashSet<u64> = s2.dirty().harvest(0..NR_GIB * GIB).iter().collect();
                harvests.lock().unwrap().push(pages);
                completed.fetch_add(1, Ordering::AcqRel);
                n += 1;
                if n.is_multiple_of(4) {
                    let gib = (n / 4) % NR_GIB;
                    let range = gib * GIB..(gib + 1) * GIB;
                    s2.invalidate_range_start(range.clone());
                    host.generation[gib as usize].fetch_add(1, Ordering::AcqRel);
                    s2.invalidate_range_end(range);
                }
                std::thread::sleep(Duration::from_micros(300));
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
    harvests.push(s2.dirty().harvest(0..NR_GIB * GIB).iter().collect());
    assert!(
        harvests.len() > 10 && writes.len() > 1000,
        "the run did too little: {} harvests, {} writes",
        harvests.len(),
        writes.len()
    );
    for &(page, before) in &writes {
        assert!(
            harvests[before..].iter().any(|h| h.contains(&page)),
            "write to {page:#x} after harvest {before} is in no later harvest (of {})",
            harvests.len()
        );
    }
    println!(
        "{} writes, {} harvests, TLB flushes {:?}\n{}",
        writes.len(),
        harvests.len(),
        s2.tlb().flushes(),
        s2.stats()
    );
}
