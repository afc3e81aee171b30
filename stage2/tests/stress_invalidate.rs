//! Real-thread race of faults against a range invalidation (the host's mmu notifier), many
//! rounds: a fault that resolved its backing before the invalidation must never leave a mapping
//! of the memory the invalidation took away.
//!
//! Each round has a fresh engine and two threads released together by a spinning barrier: the
//! vCPU faults one page in each of 64 regions of 512 GiB, highest first (each fault reads the
//! sequence, resolves the backing, then walks, allocating the region's three tables between its
//! early check of the invalidation state and the lock of its leaf); after a random delay that
//! lands somewhere in that train of faults, the notifier starts an invalidation of all 64
//! regions, moves the host memory to generation `r` and ends it. Afterwards every page is
//! unmapped or maps generation `r`. The fault's re-check of the invalidation state once its leaf
//! is locked (`install_leaf`) is what keeps this true when the invalidation starts after the
//! fault's first check; `loom_invalidate_race.rs` explores the same race exhaustively, this test
//! checks it on real threads.

#![cfg(not(loom))]

use std::hint::spin_loop;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stage2::{
    Access, Backing, Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms, Resolved, Stage2,
};

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;
#[path = "support/threads.rs"]
mod threads;

const FRAME_BASE: u64 = 1 << 47;
const GEN_STRIDE: u64 = 1 << 48;
/// Generations wrap: output addresses stay below 2^52 (and a round's differs from the last one's).
const GENERATIONS: u64 = 8;
/// Bytes one root entry maps: each page below is in its own, so each fault allocates three
/// tables between its early check of the invalidation state and the lock of its leaf.
const REGION: u64 = 1 << 39;
/// Pages the vCPU faults in each round, one per region, from the highest region down: the
/// invalidation's zap, which walks upwards over regions not faulted yet (one empty root entry
/// each), reaches the fault in flight within a few entry reads of its start.
const PAGES: u64 = 64;
/// The range the notifier invalidates: every page of the round.
const RANGE: std::ops::Range<u64> = 0..PAGES * REGION;
/// The page faulted in region `k`.
const fn page(k: u64) -> u64 {
    k * REGION + 0x3000
}
const RUN_FOR: Duration = Duration::from_millis(2500);
/// On a busy host the test runs past `RUN_FOR`, up to this long, until it has `MIN_ROUNDS` rounds
/// and at least one fault that met the invalidation.
const MAX_RUN: Duration = Duration::from_secs(20);
const MIN_ROUNDS: u64 = 200;
const MAX_ROUNDS: u64 = 200_000;
/// The notifier's random start delay, in spin-loop iterations: wide enough to land anywhere in the
/// vCPU's train of faults (tens of microseconds).
const MAX_DELAY_SPINS: u64 = 1500;
/// The vCPU's, a little jitter.
const MAX_VCPU_DELAY_SPINS: u64 = 100;
const HANG_LIMIT: Duration = Duration::from_secs(30);

type Engine = Stage2<Ept, NoopTlb>;

/// Guest memory in 4 KiB pages whose host memory moves to a new generation in each round.
struct Host {
    generation: AtomicU64,
}

impl Host {
    fn frame(gpa: u64, generation: u64) -> u64 {
        FRAME_BASE + (generation % GENERATIONS) * GEN_STRIDE + (gpa & !0xfff)
    }
}

impl Backing for Host {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        Some(Resolved {
            frame: Host::frame(gpa, self.generation.load(Ordering::SeqCst)),
            max_size: PageSize::Size4K,
            perms: Perms::RW,
        })
    }
}

/// What the two threads share: the round's engine and the barrier's counters.
struct Shared {
    engine: Mutex<Option<Arc<Engine>>>,
    host: Host,
    /// The round the vCPU may start (0: none yet).
    round: AtomicU64,
    /// The last round the vCPU finished.
    done: AtomicU64,
    /// Whether a fault met the invalidation (answered `Retry`) yet.
    raced: AtomicBool,
    stop: AtomicBool,
}

fn spin(n: u64) {
    for _ in 0..n {
        spin_loop();
    }
}

/// One step of a wait for the other thread: spin (the threads must start a round within a few
/// hundred nanoseconds of each other for the race to happen), and give the CPU away only once the
/// wait is long (a millisecond or so: on a busy host the other thread may need this CPU to run).
fn wait_step(waited: &mut u32) {
    *waited += 1;
    if *waited < 100_000 {
        spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// The vCPU: one fault per round; returns how often each outcome came back.
fn vcpu(sh: &Shared) -> [u64; 3] {
    let mut rng = Rng(0x1f5a_0000_0000_0001);
    let mut seen = [0u64; 3];
    let mut last = 0;
    loop {
        let mut waited = 0;
        let r = loop {
            if sh.stop.load(Ordering::Acquire) {
                return seen;
            }
            let r = sh.round.load(Ordering::Acquire);
            if r != last {
                break r;
            }
            wait_step(&mut waited);
        };
        last = r;
        let s2 = sh
            .engine
            .lock()
            .unwrap()
            .clone()
            .expect("the round's engine");
        spin(rng.below(MAX_VCPU_DELAY_SPINS));
        for k in (0..PAGES).rev() {
            let seq = s2.invalidate_seq();
            let out = s2.handle_fault(
                Fault {
                    gpa: page(k),
                    access: Access::Write,
                    vcpu: 0,
                },
                &sh.host,
                seq,
            );
            seen[match out {
                Outcome::Installed { .. } => 0,
                Outcome::Retry => {
                    sh.raced.store(true, Ordering::Relaxed);
                    1
                }
                other => panic!("round {r}: a write fault on RW memory gave {other:?}"),
            }] += 1;
        }
        drop(s2);
        sh.done.store(r, Ordering::Release);
    }
}

#[test]
fn stress_fault_racing_invalidation_never_installs_invalidated_memory() {
    let sh = Arc::new(Shared {
        engine: Mutex::new(None),
        host: Host {
            generation: AtomicU64::new(0),
        },
        round: AtomicU64::new(0),
        done: AtomicU64::new(0),
        raced: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let v = {
        let sh = sh.clone();
        std::thread::spawn(move || vcpu(&sh))
    };
    let mut rng = Rng(0x2e77_0000_0000_0001);
    let start = Instant::now();
    let hang_at = start + MAX_RUN + HANG_LIMIT;
    let raced = || sh.raced.load(Ordering::Relaxed);
    let mut rounds = 0;
    let mut stale = None;
    while rounds < MAX_ROUNDS {
        let t = start.elapsed();
        if t >= MAX_RUN || (t >= RUN_FOR && rounds >= MIN_ROUNDS && raced()) {
            break;
        }
        let r = rounds + 1;
        let s2: Arc<Engine> = Arc::new(Stage2::new(Ept, NoopTlb, Config::default()));
        *sh.engine.lock().unwrap() = Some(s2.clone());
        sh.round.store(r, Ordering::Release);
        spin(rng.below(MAX_DELAY_SPINS));
        s2.invalidate_range_start(RANGE);
        sh.host.generation.store(r, Ordering::SeqCst);
        s2.invalidate_range_end(RANGE);
        let mut waited = 0;
        while sh.done.load(Ordering::Acquire) != r {
            if v.is_finished() || Instant::now() > hang_at {
                break;
            }
            wait_step(&mut waited);
        }
        if sh.done.load(Ordering::Acquire) != r {
            break;
        }
        if let Some((gpa, t)) = (0..PAGES)
            .filter_map(|k| s2.lookup(page(k)).map(|t| (page(k), t)))
            .find(|(gpa, t)| t.pa != Host::frame(*gpa, r))
        {
            stale = Some((r, gpa, t));
            break;
        }
        rounds = r;
    }
    // The vCPU runs until told to stop.
    sh.stop.store(true, Ordering::Release);
    let seen = threads::join_all(
        vec![("the vCPU".to_string(), v)],
        Instant::now() + HANG_LIMIT,
        || {},
        Vec::<(String, std::thread::JoinHandle<()>)>::new(),
        HANG_LIMIT,
    )[0];
    if let Some((r, gpa, t)) = stale {
        panic!(
            "round {r}: after the invalidation ended page {gpa:#x} maps {:#x}, memory the invalidation took away (this round's memory is {:#x}; the fault resolved its backing before the invalidation and installed it anyway)",
            t.pa,
            Host::frame(gpa, r)
        );
    }
    // Tens of thousands of rounds on an idle host, a few hundred on a busy one.
    assert!(
        rounds >= MIN_ROUNDS,
        "only {rounds} rounds ran in {MAX_RUN:?}"
    );
    // Both orders happened: faults that installed and faults that met the invalidation.
    assert!(
        seen[0] > 0 && seen[1] > 0,
        "{rounds} rounds never raced: installed {}, retry {}",
        seen[0],
        seen[1]
    );
    println!("{rounds} rounds: installed {}, retry {}", seen[0], seen[1]);
}
