//! Loom models of a fault racing a range invalidation (the host's mmu notifier).
//!
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p stage2 --release --test loom_invalidate_race`
//!
//! The host remaps the range to new memory (generation 0 -> 1) between `invalidate_range_start`
//! and `invalidate_range_end`, as a host does when it drops and refaults a page. The fault reads
//! the sequence, then resolves the backing (reading the generation), then asks the engine. Once both
//! threads are done, no mapping of the range may point at generation 0 memory: a mapping installed
//! from a backing resolved before the invalidation started must not survive it.

#![cfg(loom)]

use std::collections::BTreeSet;
use std::sync::Mutex as StdMutex;

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use stage2::{
    Access, Backing, Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms, Resolved, Stage2,
};

const FRAME_BASE: u64 = 1 << 40;
/// Output-address distance between two generations of the same guest memory.
const GEN_STRIDE: u64 = 1 << 36;
const MIB2: u64 = 2 << 20;

/// Guest RAM in 2 MiB blocks whose host memory changes generation inside an invalidation.
struct Host {
    generation: AtomicU64,
    /// What the last `resolve` read (for the failure message; not part of the model).
    last_seen: std::sync::atomic::AtomicU64,
}

impl Host {
    fn frame(gpa: u64, generation: u64) -> u64 {
        FRAME_BASE + generation * GEN_STRIDE + (gpa & !(MIB2 - 1))
    }
}

impl Backing for Host {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        let generation = self.generation.load(Ordering::SeqCst);
        self.last_seen
            .store(generation, std::sync::atomic::Ordering::Relaxed);
        Some(Resolved {
            frame: Host::frame(gpa, generation),
            max_size: PageSize::Size2M,
            perms: Perms::RW,
        })
    }
}

type Engine = Stage2<Ept, NoopTlb>;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.max_branches = 100_000;
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    b.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f()
    });
    println!(
        "loom: {} executions",
        runs.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// One vCPU faults `access` on page 0 while the host invalidates `0..2 MiB`; `premap` first maps
/// page 0 read-only from generation 0 (so the fault relaxes instead of installing). The block at
/// 2 MiB is mapped beforehand so the tables exist and the race is on the leaf.
fn fault_vs_invalidation(access: Access, premap: bool) {
    let seen = std::sync::Arc::new(StdMutex::new(BTreeSet::new()));
    let seen_in = seen.clone();
    model(move || {
        let s2 = Arc::new(Stage2::new(
            Ept,
            NoopTlb,
            Config {
                nr_vcpus: 1,
                ring_size: 4,
                dirty_limit: 4 << 20,
                ..Config::default()
            },
        ) as Engine);
        let host = Arc::new(Host {
            generation: AtomicU64::new(0),
            last_seen: std::sync::atomic::AtomicU64::new(u64::MAX),
        });
        let pre = |gpa: u64| {
            let seq = s2.invalidate_seq();
            let f = Fault {
                gpa,
                access: Access::Read,
                vcpu: 0,
            };
            assert!(matches!(
                s2.handle_fault(f, &*host, seq),
                Outcome::Installed { .. }
            ));
        };
        pre(MIB2);
        if premap {
            pre(0);
        }
        let vcpu = {
            let (s2, host) = (s2.clone(), host.clone());
            thread::spawn(move || {
                let seq = s2.invalidate_seq();
                let out = s2.handle_fault(
                    Fault {
                        gpa: 0,
                        access,
                        vcpu: 0,
                    },
                    &*host,
                    seq,
                );
                let resolved = host.last_seen.load(std::sync::atomic::Ordering::Relaxed);
                (out, seq, resolved, s2.invalidate_seq())
            })
        };
        let notifier = {
            let (s2, host) = (s2.clone(), host.clone());
            thread::spawn(move || {
                let zapped = s2.invalidate_range_start(0..MIB2);
                host.generation.store(1, Ordering::SeqCst);
                s2.invalidate_range_end(0..MIB2);
                zapped
            })
        };
        let (out, seq, resolved, seq_after) = vcpu.join().unwrap();
        let zapped = notifier.join().unwrap();
        let now = s2.lookup(0);
        if let Some(t) = now {
            assert_eq!(
                t.pa,
                Host::frame(0, 1),
                "stale mapping after the invalidation ended: {t:?} (fault {out:?} with seq {seq}, resolved generation {resolved}, seq after {seq_after}; zapped {zapped})"
            );
        }
        // The block outside the range is untouched.
        assert_eq!(s2.lookup(MIB2).map(|t| t.pa), Some(Host::frame(MIB2, 0)));
        let st = s2.stats();
        let live = st.mapped_2m + st.mapped_4k;
        assert_eq!(
            live,
            1 + u64::from(now.is_some()),
            "mapped counters: {st:?}"
        );
        seen_in.lock().unwrap().insert(format!(
            "fault {out:?}, zapped {zapped}, mapped after: {}",
            now.is_some()
        ));
    });
    let seen = seen.lock().unwrap();
    println!("seen: {seen:#?}");
    assert!(
        seen.iter().any(|s| s.contains("Retry")),
        "the model never made the fault meet the invalidation"
    );
}

#[test]
fn loom_install_racing_invalidation_leaves_no_stale_mapping() {
    fault_vs_invalidation(Access::Write, false);
}

#[test]
fn loom_relax_racing_invalidation_leaves_no_stale_mapping() {
    fault_vs_invalidation(Access::Write, true);
}

#[test]
fn loom_spurious_read_racing_invalidation_leaves_no_stale_mapping() {
    fault_vs_invalidation(Access::Read, true);
}
