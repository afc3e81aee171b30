//! Loom models of racing faults on one entry (seed 001's fight) and of two threads installing the
//! same missing intermediate tables.
//!
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p stage2 --release --test loom_fault_race`
//!
//! A live-allocation counter on this test thread counts the 4 KiB aligned allocations (table pages)
//! so a leaked table page is seen even when the engine's own counters agree with each other.

#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use stage2::{
    Access, Backing, Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms, Resolved, Stage2,
};

#[path = "support/table_alloc.rs"]
mod table_alloc;
use table_alloc::live_table_allocations;

const FRAME_BASE: u64 = 1 << 40;

/// Guest RAM backed linearly at `FRAME_BASE` in blocks of `max_size` with `perms`.
struct Ram {
    max_size: PageSize,
    perms: Perms,
}

impl Backing for Ram {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        let block = gpa & !(self.max_size.bytes() - 1);
        Some(Resolved {
            frame: FRAME_BASE + block,
            max_size: self.max_size,
            perms: self.perms,
        })
    }
}

type Engine = Stage2<Ept, NoopTlb>;

/// Run a loom model. Checking a table page reads its 512 entries (each a loom branch), so the
/// branch limit is raised; the preemption bound is `LOOM_MAX_PREEMPTIONS` (default 3).
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

/// A small engine: two vCPUs, tiny rings, a dirty bitmap of one chunk.
fn engine() -> Engine {
    Stage2::new(
        Ept,
        NoopTlb,
        Config {
            nr_vcpus: 2,
            ring_size: 4,
            dirty_limit: 2 << 20,
            ..Config::default()
        },
    )
}

/// Take a fault, taking it again on `Retry` a bounded number of times (a vCPU re-enters the guest
/// and faults again; under the model the other thread may not have run meanwhile).
fn fault(s2: &Engine, gpa: u64, access: Access, vcpu: usize, ram: &Ram) -> Outcome {
    let mut out = Outcome::Retry;
    for _ in 0..2 {
        let seq = s2.invalidate_seq();
        out = s2.handle_fault(Fault { gpa, access, vcpu }, ram, seq);
        if out != Outcome::Retry {
            break;
        }
    }
    out
}

fn granted(out: Outcome) -> bool {
    matches!(
        out,
        Outcome::Installed { .. } | Outcome::Relaxed { .. } | Outcome::Spurious
    )
}

/// Seed 001: vCPU A faults for read, vCPU B for write, on the same missing 4 KiB page (its tables
/// exist). Whoever wins, the entry ends RW: the read never downgrades the write, nothing breaks
/// the entry (zero break-before-make), and each vCPU's access is allowed as soon as its fault
/// returned.
fn read_write_fight(first: Access, second: Access, backing: Perms, want: Perms) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let seen_in = seen.clone();
    model(move || {
        let s2 = Arc::new(engine());
        let ram = Arc::new(Ram {
            max_size: PageSize::Size4K,
            perms: backing,
        });
        // The neighbour page builds the tables: the race is on the leaf alone.
        assert!(granted(fault(&s2, 0x1000, Access::Read, 0, &ram)));
        let t = {
            let (s2, ram) = (s2.clone(), ram.clone());
            thread::spawn(move || {
                let out = fault(&s2, 0, second, 1, &ram);
                if granted(out) {
                    assert!(
                        s2.translate(0, second).is_ok(),
                        "{second:?} fault returned {out:?} but the entry does not allow it"
                    );
                }
                out
            })
        };
        let a = {
            let (s2, ram) = (s2.clone(), ram.clone());
            thread::spawn(move || {
                let out = fault(&s2, 0, first, 0, &ram);
                if granted(out) {
                    assert!(
                        s2.translate(0, first).is_ok(),
                        "{first:?} fault returned {out:?} but the entry does not allow it"
                    );
                }
                out
            })
        };
        let out_a = a.join().unwrap();
        let out_b = t.join().unwrap();
        seen_in
            .lock()
            .unwrap()
            .insert(format!("{first:?}: {out_a:?} / {second:?}: {out_b:?}"));
        // A vCPU whose faults all met the other's marker takes the fault again now.
        for (out, access) in [(out_a, first), (out_b, second)] {
            if !granted(out) {
                assert_eq!(out, Outcome::Retry, "{access:?}");
                assert!(granted(fault(&s2, 0, access, 0, &ram)));
            }
        }
        let t = s2.translate(0, Access::Read).expect("page 0 mapped");
        assert_eq!(t.perms, want, "the fight must end {want}, never downgraded");
        assert_eq!(t.pa, FRAME_BASE, "output address");
        let st = s2.stats();
        assert_eq!(st.bbms, 0, "a permission fight needs no break-before-make");
        assert_eq!(
            st.installs_4k, 2,
            "one install of page 0 (plus the neighbour)"
        );
        assert_eq!(st.mapped_4k, 2);
    });
    // The model must have explored both orders (each side installing first).
    let seen = seen.lock().unwrap();
    println!("outcomes seen: {seen:#?}");
    assert!(
        seen.iter()
            .any(|o| o.starts_with(&format!("{first:?}: Installed")))
            && seen
                .iter()
                .any(|o| o.contains(&format!("{second:?}: Installed"))),
        "the model did not explore both install orders: {seen:?}"
    );
}

#[test]
fn loom_read_and_write_faults_end_rw_without_bbm() {
    read_write_fight(Access::Read, Access::Write, Perms::RW, Perms::RW);
}

#[test]
fn loom_exec_and_write_faults_end_rwx_without_bbm() {
    read_write_fight(Access::Exec, Access::Write, Perms::RWX, Perms::RWX);
}

/// Two vCPUs fault in an empty table: both need the same missing 1 GiB-level and 2 MiB-level
/// tables. Exactly one page per level stays linked, the losers' pages are freed, the live counter
/// equals the pages reachable from the root, and nothing leaks when the engine drops.
fn table_install_race(gpa_a: u64, gpa_b: u64) {
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let lost_in = lost.clone();
    model(move || {
        let before = live_table_allocations();
        {
            let s2 = Arc::new(engine());
            let ram = Arc::new(Ram {
                max_size: PageSize::Size2M,
                perms: Perms::RW,
            });
            let t = {
                let (s2, ram) = (s2.clone(), ram.clone());
                thread::spawn(move || fault(&s2, gpa_b, Access::Write, 1, &ram))
            };
            let a = {
                let (s2, ram) = (s2.clone(), ram.clone());
                thread::spawn(move || fault(&s2, gpa_a, Access::Read, 0, &ram))
            };
            let out_a = a.join().unwrap();
            let out_b = t.join().unwrap();
            for (out, gpa) in [(out_a, gpa_a), (out_b, gpa_b)] {
                if !granted(out) {
                    assert_eq!(out, Outcome::Retry);
                    assert!(granted(fault(&s2, gpa, Access::Read, 0, &ram)));
                }
            }
            // root + the 1 GiB-level table + the 2 MiB-level table.
            assert_eq!(s2.count_reachable_tables(), 3, "reachable table pages");
            let st = s2.stats();
            assert_eq!(
                st.tables_live, 3,
                "live counter must equal the reachable pages"
            );
            assert_eq!(st.tables_pending_free, 0);
            // Every page that exists is linked or back in the pool (a lost race's page).
            let existing = live_table_allocations() - before;
            assert_eq!(
                existing as u64, st.tables_allocated,
                "allocator vs engine count"
            );
            assert!(
                st.tables_allocated - st.tables_live <= st.table_races_lost,
                "pages neither linked nor from a lost race: {st:?}"
            );
            lost_in.fetch_max(st.table_races_lost, std::sync::atomic::Ordering::Relaxed);
            let blocks = if gpa_a == gpa_b { 1 } else { 2 };
            assert_eq!(st.mapped_2m, blocks, "2 MiB blocks mapped");
            assert_eq!(st.installs_2m, blocks, "one install per block");
        }
        assert_eq!(
            live_table_allocations(),
            before,
            "table pages leaked after the engine dropped"
        );
    });
    // The model must have reached the lost-install path (both levels lost in the worst case).
    let lost = lost.load(std::sync::atomic::Ordering::Relaxed);
    println!("most table install races lost in one execution: {lost}");
    assert!(lost >= 2, "the model never made both table installs race");
}

#[test]
fn loom_two_faults_install_the_same_missing_tables() {
    table_install_race(0, 2 << 20);
}

#[test]
fn loom_two_faults_same_page_install_tables_and_leaf_once() {
    table_install_race(0x1000, 0x1000);
}
