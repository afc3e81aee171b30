//! Loom model of dirty logging: a vCPU writes a page (a write fault on its write-protected entry,
//! then a write through the writable translation) while the VMM harvests; the write is in that
//! harvest or in the next one (seed rule 7: no dirty page is lost).
//!
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p stage2 --release --test loom_dirty_race`

#![cfg(loom)]

use std::collections::BTreeSet;
use std::sync::Mutex as StdMutex;

use loom::sync::Arc;
use loom::thread;
use stage2::{
    Access, Backing, Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms, Resolved, SplitPolicy,
    Stage2,
};

const FRAME_BASE: u64 = 1 << 40;
const MIB2: u64 = 2 << 20;

struct Ram;

impl Backing for Ram {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        Some(Resolved {
            frame: FRAME_BASE + (gpa & !(MIB2 - 1)),
            max_size: PageSize::Size2M,
            perms: Perms::RW,
        })
    }
}

/// Run a loom model; the preemption bound is `LOOM_MAX_PREEMPTIONS`, else `default_bound`.
fn model_bounded(default_bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.max_branches = 100_000;
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(default_bound);
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

fn model(f: impl Fn() + Sync + Send + 'static) {
    model_bounded(3, f);
}

/// Page 0 is mapped (read-only) before logging starts, `policy` decides whether enabling splits
/// its 2 MiB block at once or the write fault does. The vCPU's write happens only if its fault
/// left the page writable (as on hardware: it re-enters the guest and writes through the entry).
fn write_racing_harvest(policy: SplitPolicy) {
    let seen = std::sync::Arc::new(StdMutex::new(BTreeSet::new()));
    let seen_in = seen.clone();
    model(move || {
        let s2 = Arc::new(Stage2::new(
            Ept,
            NoopTlb,
            Config {
                nr_vcpus: 1,
                ring_size: 4,
                dirty_limit: MIB2,
                ..Config::default()
            },
        ));
        let read = Fault {
            gpa: 0,
            access: Access::Read,
            vcpu: 0,
        };
        assert!(matches!(
            s2.handle_fault(read, &Ram, s2.invalidate_seq()),
            Outcome::Installed { .. }
        ));
        s2.dirty().enable(policy);
        // A write to the neighbour page before the race: the bitmap chunk exists, so the harvest's
        // clearing is visible to the model (an absent chunk is skipped without any shared access).
        let neighbour = Fault {
            gpa: 0x1000,
            access: Access::Write,
            vcpu: 0,
        };
        assert!(matches!(
            s2.handle_fault(neighbour, &Ram, s2.invalidate_seq()),
            Outcome::Installed { .. } | Outcome::Relaxed { .. }
        ));
        let vcpu = {
            let s2 = s2.clone();
            thread::spawn(move || {
                let write = Fault {
                    gpa: 0,
                    access: Access::Write,
                    vcpu: 0,
                };
                let mut out = Outcome::Retry;
                for _ in 0..2 {
                    out = s2.handle_fault(write, &Ram, s2.invalidate_seq());
                    if out != Outcome::Retry {
                        break;
                    }
                }
                assert_ne!(out, Outcome::Denied);
                // The guest writes only through a writable entry.
                let wrote = s2.translate(0, Access::Write).is_ok();
                (out, wrote)
            })
        };
        let harvester = {
            let s2 = s2.clone();
            thread::spawn(move || s2.dirty().harvest(0..MIB2))
        };
        let first = harvester.join().unwrap();
        let (out, wrote) = vcpu.join().unwrap();
        let second = s2.dirty().harvest(0..MIB2);
        if wrote {
            assert!(
                first.is_set(0) || second.is_set(0),
                "write after fault {out:?} is in neither harvest"
            );
        }
        assert!(
            first.is_set(0x1000),
            "the write before the race is in the first harvest"
        );
        assert!(!second.is_set(0x1000), "nobody wrote the neighbour again");
        assert_eq!(
            first.count() + second.count(),
            1 + u64::from(first.is_set(0)) + u64::from(second.is_set(0)),
            "only pages 0 and 0x1000 were written"
        );
        seen_in.lock().unwrap().insert(format!(
            "fault {out:?}, wrote {wrote}, in first {}, in second {}",
            first.is_set(0),
            second.is_set(0)
        ));
    });
    let seen = seen.lock().unwrap();
    println!("seen: {seen:#?}");
    assert!(
        seen.iter().any(|s| s.contains("wrote true, in first true"))
            && seen
                .iter()
                .any(|s| s.contains("wrote true, in first false")),
        "the model did not put the write on both sides of the harvest"
    );
}

#[test]
fn loom_write_racing_harvest_is_not_lost_eager() {
    write_racing_harvest(SplitPolicy::Eager);
}

#[test]
fn loom_write_racing_harvest_is_not_lost_lazy() {
    write_racing_harvest(SplitPolicy::Lazy);
}

/// Dirty logging is enabled while a vCPU writes a page that was writable before: a write the vCPU
/// makes after `enable` returned (it saw the flag the VMM raised afterwards) must be logged; the
/// enable sweep steals or write-protects whatever the fault was publishing.
fn write_racing_enable(policy: SplitPolicy, max_size: PageSize) {
    let seen = std::sync::Arc::new(StdMutex::new(BTreeSet::new()));
    let seen_in = seen.clone();
    // Bound 2 by default: the eager split of a 2 MiB block makes each execution long.
    model_bounded(2, move || {
        struct Block(PageSize);
        impl Backing for Block {
            fn resolve(&self, gpa: u64) -> Option<Resolved> {
                Some(Resolved {
                    frame: FRAME_BASE + (gpa & !(self.0.bytes() - 1)),
                    max_size: self.0,
                    perms: Perms::RW,
                })
            }
        }
        let s2 = Arc::new(Stage2::new(
            Ept,
            NoopTlb,
            Config {
                nr_vcpus: 1,
                ring_size: 4,
                dirty_limit: MIB2,
                ..Config::default()
            },
        ));
        let read = Fault {
            gpa: 0,
            access: Access::Read,
            vcpu: 0,
        };
        assert!(matches!(
            s2.handle_fault(read, &Block(max_size), s2.invalidate_seq()),
            Outcome::Installed { .. }
        ));
        let enabled = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let vmm = {
            let (s2, enabled) = (s2.clone(), enabled.clone());
            thread::spawn(move || {
                s2.dirty().enable(policy);
                enabled.store(true, loom::sync::atomic::Ordering::Release);
            })
        };
        let vcpu = {
            let (s2, enabled) = (s2.clone(), enabled.clone());
            thread::spawn(move || {
                let write = Fault {
                    gpa: 0,
                    access: Access::Write,
                    vcpu: 0,
                };
                let out = s2.handle_fault(write, &Block(max_size), s2.invalidate_seq());
                assert_ne!(out, Outcome::Denied);
                let after_enable = enabled.load(loom::sync::atomic::Ordering::Acquire);
                let wrote = s2.translate(0, Access::Write).is_ok();
                (out, after_enable, wrote)
            })
        };
        vmm.join().unwrap();
        let (out, after_enable, wrote) = vcpu.join().unwrap();
        let log = s2.dirty().harvest(0..MIB2);
        if after_enable && wrote {
            assert!(
                log.is_set(0),
                "a write after enable returned (fault {out:?}) is not logged"
            );
        }
        // Logging is on: whatever the race, page 0 is not writable without being logged.
        if s2.translate(0, Access::Write).is_ok() {
            assert!(log.is_set(0), "page 0 writable after enable but not dirty");
        }
        seen_in.lock().unwrap().insert(format!(
            "fault {out:?}, after enable {after_enable}, wrote {wrote}, logged {}",
            log.is_set(0)
        ));
    });
    println!("seen: {:#?}", seen.lock().unwrap());
}

#[test]
fn loom_write_racing_enable_eager_2m_block() {
    write_racing_enable(SplitPolicy::Eager, PageSize::Size2M);
}

#[test]
fn loom_write_racing_enable_lazy_4k_page() {
    write_racing_enable(SplitPolicy::Lazy, PageSize::Size4K);
}
