//! Real-thread race of one fault against one range invalidation (the host's mmu notifier), many
//! rounds: a fault that resolved its backing before the invalidation must never leave a mapping
//! of the memory the invalidation took away.
//!
//! Each round has a fresh engine (so the fault's walk allocates the missing tables, the widest
//! window between its early check of the invalidation state and the lock of its leaf) and two
//! threads released together by a spinning barrier, each after its own random delay: the vCPU
//! reads the sequence, resolves the backing (generation `r - 1`) and faults; the notifier starts
//! an invalidation of the page's 2 MiB, moves the host memory to generation `r` and ends it.
//! Afterwards the page is unmapped or maps generation `r`. The fault's re-check of the
//! invalidation state once its leaf is locked (`install_leaf`) is what keeps this true when the
//! invalidation starts after the fault's first check; `loom_invalidate_race.rs` explores the
//! same race exhaustively, this test checks it on real threads.

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

const FRAME_BASE: u64 = 1 << 40;
const GEN_STRIDE: u64 = 1 << 36;
/// Generations wrap: output addresses stay below 2^52 (and a round's differs from the last one's).
const GENERATIONS: u64 = 1024;
const MIB2: u64 = 2 << 20;
/// The page raced on.
const GPA: u64 = 0x12_3000;
const RUN_FOR: Duration = Duration::from_millis(2500);
const MAX_ROUNDS: u64 = 200_000;
/// Random start delays, in spin-loop iterations: wide enough to slide each side across the
/// other's few microseconds of work.
const MAX_DELAY_SPINS: u64 = 1500;
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
    stop: AtomicBool,
}

fn spin(n: u64) {
    for _ in 0..n {
        spin_loop();
    }
}

/// The vCPU: one fault per round; returns how often each outcome came back.
fn vcpu(sh: &Shared) -> [u64; 3] {
    let mut rng = Rng(0x1f5a_0000_0000_0001);
    let mut seen = [0u64; 3];
    let mut last = 0;
    loop {
        let r = loop {
            if sh.stop.load(Ordering::Acquire) {
                return seen;
            }
            let r = sh.round.load(Ordering::Acquire);
            if r != last {
                break r;
            }
            spin_loop();
        };
        last = r;
        let s2 = sh
            .engine
            .lock()
            .unwrap()
            .clone()
            .expect("the round's engine");
        spin(rng.below(MAX_DELAY_SPINS));
        let seq = s2.invalidate_seq();
        let out = s2.handle_fault(
            Fault {
                gpa: GPA,
                access: Access::Write,
                vcpu: 0,
            },
            &sh.host,
            seq,
        );
        seen[match out {
            Outcome::Installed { .. } => 0,
            Outcome::Retry => 1,
            other => panic!("round {r}: a write fault on RW memory gave {other:?}"),
        }] += 1;
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
        stop: AtomicBool::new(false),
    });
    let v = {
        let sh = sh.clone();
        std::thread::spawn(move || vcpu(&sh))
    };
    let mut rng = Rng(0x2e77_0000_0000_0001);
    let deadline = Instant::now() + RUN_FOR;
    let hang_at = deadline + HANG_LIMIT;
    let mut rounds = 0;
    let mut stale = None;
    while rounds < MAX_ROUNDS && Instant::now() < deadline {
        let r = rounds + 1;
        let s2: Arc<Engine> = Arc::new(Stage2::new(Ept, NoopTlb, Config::default()));
        *sh.engine.lock().unwrap() = Some(s2.clone());
        sh.round.store(r, Ordering::Release);
        spin(rng.below(MAX_DELAY_SPINS));
        s2.invalidate_range_start(0..MIB2);
        sh.host.generation.store(r, Ordering::SeqCst);
        s2.invalidate_range_end(0..MIB2);
        while sh.done.load(Ordering::Acquire) != r {
            if v.is_finished() || Instant::now() > hang_at {
                break;
            }
            spin_loop();
        }
        if sh.done.load(Ordering::Acquire) != r {
            break;
        }
        if let Some(t) = s2.lookup(GPA) {
            if t.pa != Host::frame(GPA, r) {
                stale = Some((r, t));
                break;
            }
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
    if let Some((r, t)) = stale {
        panic!(
            "round {r}: after the invalidation ended the page maps {:#x}, memory the invalidation took away (this round's memory is {:#x}; the fault resolved its backing before the invalidation and installed it anyway)",
            t.pa,
            Host::frame(GPA, r)
        );
    }
    assert!(rounds > 1000, "only {rounds} rounds ran");
    // Both orders happened: faults that installed and faults that met the invalidation.
    assert!(
        seen[0] > 0 && seen[1] > 0,
        "{rounds} rounds never raced: installed {}, retry {}",
        seen[0],
        seen[1]
    );
    println!("{rounds} rounds: installed {}, retry {}", seen[0], seen[1]);
}
