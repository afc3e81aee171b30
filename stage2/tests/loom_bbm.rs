//! Loom models of faults and walkers racing break-before-make (a split on ARM64 without FEAT_BBM,
//! a collapse on EPT), and of a split racing a collapse.
//!
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p stage2 --release --test loom_bbm`
//!
//! Rule 2 of the seeds: a thread that meets the marker gets `Retry` at once, a walker never sees a
//! half-built state, and the translation is the same before, during and after a split or a
//! collapse. A live-allocation counter (4 KiB aligned allocations on this test thread) catches a
//! table page that is leaked even when the engine's counters agree.

#![cfg(loom)]

use std::collections::BTreeSet;
use std::sync::Mutex as StdMutex;

use loom::sync::Arc;
use loom::thread;
use stage2::{
    Access, Arm64, Backing, Config, Ept, Fault, Format, NoopTlb, Outcome, PageSize, Perms,
    Resolved, Stage2, TranslateError,
};

#[path = "support/table_alloc.rs"]
mod table_alloc;
use table_alloc::live_table_allocations;

const FRAME_BASE: u64 = 1 << 40;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// Guest RAM backed linearly at `FRAME_BASE` in blocks of `max_size`, read/write.
struct Ram {
    max_size: PageSize,
}

impl Backing for Ram {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        let block = gpa & !(self.max_size.bytes() - 1);
        Some(Resolved {
            frame: FRAME_BASE + block,
            max_size: self.max_size,
            perms: Perms::RW,
        })
    }
}

fn config() -> Config {
    Config {
        nr_vcpus: 2,
        ring_size: 4,
        dirty_limit: MIB2,
        ..Config::default()
    }
}

/// Run a loom model with a raised branch limit (a table check reads 512 entries); the preemption
/// bound is `LOOM_MAX_PREEMPTIONS` (default 3). Prints the number of executions explored.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.max_branches = 200_000;
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

fn granted(out: Outcome) -> bool {
    matches!(
        out,
        Outcome::Installed { .. } | Outcome::Relaxed { .. } | Outcome::Spurious
    )
}

fn fault<F: Format>(
    s2: &Stage2<F, NoopTlb>,
    gpa: u64,
    access: Access,
    ram: &impl Backing,
) -> Outcome {
    let seq = s2.invalidate_seq();
    s2.handle_fault(
        Fault {
            gpa,
            access,
            vcpu: 1,
        },
        ram,
        seq,
    )
}

/// ARM64 without FEAT_BBM splits a 2 MiB block with break-before-make. A walker racing it sees the
/// old block or the new table (same output address) or the marker as "not mapped" — never a marker
/// taken for a mapping; a write fault racing it relaxes the block before the break (the split then
/// copies RW), relaxes a new 4 KiB page after the make, or answers `Retry` on the marker.
#[test]
fn loom_fault_and_translate_racing_arm64_split_bbm() {
    let seen = std::sync::Arc::new(StdMutex::new(BTreeSet::new()));
    let seen_in = seen.clone();
    model(move || {
        let s2 = Arc::new(Stage2::new(Arm64 { bbm_level2: false }, NoopTlb, config()));
        let ram = Arc::new(Ram {
            max_size: PageSize::Size2M,
        });
        assert_eq!(
            fault(&s2, 0, Access::Read, &*ram),
            Outcome::Installed {
                gpa: 0,
                size: PageSize::Size2M
            }
        );
        let vcpu = {
            let (s2, ram) = (s2.clone(), ram.clone());
            thread::spawn(move || {
                let gpa = 0x1000;
                let walker = match s2.translate(gpa, Access::Read) {
                    Ok(t) => {
                        assert_eq!(
                            t.pa,
                            FRAME_BASE + gpa,
                            "a walker saw a wrong output address"
                        );
                        format!("{}", t.size)
                    }
                    Err(TranslateError::NotMapped { .. }) => "marker".to_string(),
                    Err(e) => panic!("walker during a split: {e}"),
                };
                let out = fault(&s2, gpa, Access::Write, &*ram);
                assert!(
                    matches!(out, Outcome::Relaxed { .. } | Outcome::Retry),
                    "write fault on a read-only mapping during a split gave {out:?}"
                );
                if granted(out) {
                    // Writable now, or the split is between its break and its make (the walker
                    // then faults and retries); never mapped without W.
                    match s2.translate(gpa, Access::Write) {
                        Ok(_) | Err(TranslateError::NotMapped { .. }) => {}
                        Err(e) => panic!("{out:?}, yet {e}"),
                    }
                }
                (walker, out)
            })
        };
        assert_eq!(
            s2.split(0..MIB2, PageSize::Size4K),
            1,
            "the block is split exactly once"
        );
        let (seen_by_walker, out) = vcpu.join().unwrap();
        let gpa = 0x1000;
        seen_in
            .lock()
            .unwrap()
            .insert(format!("walker saw {seen_by_walker}; fault {out:?}"));
        let t = s2
            .translate(gpa, Access::Read)
            .expect("mapped after the split");
        assert_eq!((t.pa, t.size), (FRAME_BASE + gpa, PageSize::Size4K));
        if granted(out) {
            assert!(
                s2.translate(gpa, Access::Write).is_ok(),
                "relax lost by the split"
            );
        }
        let st = s2.stats();
        assert_eq!(st.bbms, 1, "one break-before-make for the split");
        assert_eq!(s2.count_reachable_tables(), 4);
        assert_eq!(st.tables_live, 4);
    });
    let seen = seen.lock().unwrap();
    println!("seen: {seen:#?}");
    assert!(
        seen.iter().any(|s| s.contains("walker saw marker")),
        "the model never let the walker meet the marker"
    );
    assert!(
        seen.iter().any(|s| s.contains("Retry")),
        "the model never let the fault meet the marker"
    );
}

/// EPT: a 2 MiB range mapped read-only in 512 pages is collapsed into one block while a vCPU takes
/// a write fault on its first page. If the fault says the page was made writable (`Relaxed`) or
/// already was (`Spurious`), the page must be writable afterwards: a relax published into the
/// table being collapsed must not be lost.
#[test]
fn loom_write_fault_racing_collapse_keeps_its_permission() {
    model(move || {
        let s2 = Arc::new(Stage2::new(Ept, NoopTlb, config()));
        let ram = Arc::new(Ram {
            max_size: PageSize::Size2M,
        });
        assert_eq!(
            s2.map_range(0, MIB2, FRAME_BASE, Perms::R, PageSize::Size4K),
            Ok(512)
        );
        let collapser = {
            let s2 = s2.clone();
            thread::spawn(move || s2.collapse(0..MIB2))
        };
        let vcpu = {
            let (s2, ram) = (s2.clone(), ram.clone());
            thread::spawn(move || fault(&s2, 0, Access::Write, &*ram))
        };
        let out = vcpu.join().unwrap();
        let collapsed = collapser.join().unwrap();
        if granted(out) {
            assert!(
                s2.translate(0, Access::Write).is_ok(),
                "write fault returned {out:?} but page 0 is not writable (collapsed: {collapsed})"
            );
        }
        assert_eq!(
            s2.lookup(0x1000).map(|t| t.pa),
            Some(FRAME_BASE + 0x1000),
            "translation changed"
        );
        assert_eq!(s2.count_reachable_tables(), s2.live_table_pages());
    });
}

/// EPT: a 1 GiB range mapped with 512 2 MiB blocks is collapsed into one 1 GiB block while another
/// thread splits its first 2 MiB block. Whatever wins, the table page the split links must stay
/// reachable or be freed: the live counter equals the reachable pages and nothing leaks.
#[test]
fn loom_split_racing_collapse_leaks_no_table() {
    model(move || {
        let before = live_table_allocations();
        {
            let s2 = Arc::new(Stage2::new(Ept, NoopTlb, config()));
            assert_eq!(
                s2.map_range(0, GIB, FRAME_BASE, Perms::RW, PageSize::Size2M),
                Ok(512)
            );
            let splitter = {
                let s2 = s2.clone();
                thread::spawn(move || s2.split(0..MIB2, PageSize::Size4K))
            };
            let collapser = {
                let s2 = s2.clone();
                thread::spawn(move || s2.collapse(0..GIB))
            };
            let collapsed = collapser.join().unwrap();
            let split = splitter.join().unwrap();
            assert_eq!(
                s2.count_reachable_tables(),
                s2.live_table_pages(),
                "live counter vs reachable tables (split {split}, collapsed {collapsed})"
            );
            let t = s2.lookup(0x1000).expect("still mapped");
            assert_eq!(t.pa, FRAME_BASE + 0x1000);
        }
        assert_eq!(
            live_table_allocations(),
            before,
            "table pages leaked after the engine dropped"
        );
    });
}

/// Guest RAM whose host memory moved (output addresses shifted by `shift`), without an
/// invalidation: the next fault sees another output address and must break-before-make.
struct Moved {
    shift: u64,
}

impl Backing for Moved {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        Some(Resolved {
            frame: FRAME_BASE + self.shift + (gpa & !(MIB2 - 1)),
            max_size: PageSize::Size2M,
            perms: Perms::RW,
        })
    }
}

/// EPT: a 2 MiB block maps old memory; two vCPUs fault on it against the moved backing. One
/// replaces the block with break-before-make; the other (and a walker) sees the old block, the
/// marker (not mapped, `Retry`), or the new block — never anything else — and the end state is the
/// new block, replaced exactly once.
#[test]
fn loom_output_change_bbm_racing_fault_and_walker() {
    const SHIFT: u64 = 1 << 36;
    let seen = std::sync::Arc::new(StdMutex::new(BTreeSet::new()));
    let seen_in = seen.clone();
    model(move || {
        let s2 = Arc::new(Stage2::new(Ept, NoopTlb, config()));
        let old = Ram {
            max_size: PageSize::Size2M,
        };
        assert!(granted(fault(&s2, 0, Access::Read, &old)));
        let spawn_vcpu = |gpa: u64| {
            let s2 = s2.clone();
            thread::spawn(move || {
                let moved = Moved { shift: SHIFT };
                let seen = s2.translate(gpa, Access::Read);
                if let Ok(t) = seen {
                    assert!(
                        t.pa == FRAME_BASE + gpa || t.pa == FRAME_BASE + SHIFT + gpa,
                        "walker saw {t:?}"
                    );
                }
                let out = fault(&s2, gpa, Access::Read, &moved);
                assert!(
                    matches!(
                        out,
                        Outcome::Installed { .. } | Outcome::Spurious | Outcome::Retry
                    ),
                    "{out:?}"
                );
                out
            })
        };
        let a = spawn_vcpu(0x1000);
        let b = spawn_vcpu(0x3000);
        let outs = [a.join().unwrap(), b.join().unwrap()];
        seen_in.lock().unwrap().insert(format!("{outs:?}"));
        let moved = Moved { shift: SHIFT };
        for (out, gpa) in outs.iter().zip([0x1000, 0x3000]) {
            if *out == Outcome::Retry {
                assert!(granted(fault(&s2, gpa, Access::Read, &moved)));
            }
        }
        for gpa in [0, 0x1000, 0x3000, MIB2 - 0x1000] {
            let t = s2.translate(gpa, Access::Read).expect("mapped");
            assert_eq!((t.pa, t.size), (FRAME_BASE + SHIFT + gpa, PageSize::Size2M));
        }
        let st = s2.stats();
        assert_eq!(st.bbms, 1, "the block is replaced once: {st:?}");
        assert_eq!(st.mapped_2m, 1);
    });
    let seen = seen.lock().unwrap();
    println!("seen: {seen:#?}");
    assert!(
        seen.iter().any(|s| s.contains("Retry")),
        "the model never let a fault meet the marker"
    );
}
