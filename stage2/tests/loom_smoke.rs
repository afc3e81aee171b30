//! Loom smoke test: the crate builds and runs under `--cfg loom`, and seed 001's fight (two faults
//! on one GPA wanting R and W) always ends RW with no break-before-make, under every interleaving.
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p stage2 --release --test loom_smoke`
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use stage2::{
    Access, Backing, Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms, Resolved, Stage2,
};

struct Ram;

impl Backing for Ram {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        Some(Resolved {
            frame: (1 << 40) + (gpa & !((1 << 30) - 1)),
            max_size: PageSize::Size1G,
            perms: Perms::RW,
        })
    }
}

/// Take the fault until it is resolved (a `Retry` means: take it again).
fn fault_until_done(s2: &Stage2<Ept, NoopTlb>, access: Access, vcpu: usize) -> Outcome {
    loop {
        let seq = s2.invalidate_seq();
        let out = s2.handle_fault(
            Fault {
                gpa: 0x4000_1000,
                access,
                vcpu,
            },
            &Ram,
            seq,
        );
        if out != Outcome::Retry {
            return out;
        }
        thread::yield_now();
    }
}

/// Run a loom model (preemption bound `LOOM_MAX_PREEMPTIONS`) and print how many executions it
/// explored.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    loom::model::Builder::new().check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f()
    });
    println!(
        "loom: {} executions",
        runs.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
fn seed001_read_and_write_race_ends_rw_without_bbm() {
    model(|| {
        let s2 = Arc::new(Stage2::new(
            Ept,
            NoopTlb,
            Config {
                nr_vcpus: 2,
                dirty_limit: 1 << 31,
                ..Config::default()
            },
        ));
        let s2r = s2.clone();
        let reader = thread::spawn(move || fault_until_done(&s2r, Access::Read, 0));
        let w = fault_until_done(&s2, Access::Write, 1);
        let r = reader.join().unwrap();
        assert_ne!(
            w,
            Outcome::Spurious,
            "a write never finds a read-only mapping sufficient"
        );
        assert_ne!(r, Outcome::Denied);
        let t = s2.translate(0x4000_1000, Access::Write).expect("mapped RW");
        assert_eq!(t.perms, Perms::RW);
        assert_eq!(t.size, PageSize::Size1G);
        assert_eq!(s2.stats().bbms, 0);
        assert_eq!(s2.live_table_pages(), 2);
    });
}
