//! Real-thread races of a collapse against writers into the table being collapsed: a write fault
//! relaxing one of its pages, and a split of one of its blocks. Each round uses a fresh engine and
//! two threads released together by a barrier; after each round the page the writer was granted
//! must still be writable, and the live table counter must equal the reachable table pages.
//!
//! The loom models in `loom_bbm.rs` (`loom_write_fault_racing_collapse_keeps_its_permission`,
//! `loom_split_racing_collapse_leaks_no_table`) find both races deterministically; here, on real
//! threads, the windows are a few tens of nanoseconds wide, so these rounds hit them rarely (not
//! once in 40 000 rounds on the 2-core development machine) but check the same properties. The
//! page and block raced on are the first of the table, where the window is widest.

#![cfg(not(loom))]

use std::sync::Barrier;
use std::time::{Duration, Instant};

use stage2::{
    Access, Backing, Config, Ept, Fault, NoopTlb, Outcome, PageSize, Perms, Resolved, Stage2,
};

const FRAME_BASE: u64 = 1 << 40;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const RUN_FOR: Duration = Duration::from_millis(1500);
const MAX_ROUNDS: u64 = 20_000;

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

fn engine() -> Stage2<Ept, NoopTlb> {
    Stage2::new(Ept, NoopTlb, Config::default())
}

#[test]
fn stress_write_fault_racing_collapse_keeps_its_permission() {
    let deadline = Instant::now() + RUN_FOR;
    let mut rounds = 0;
    let mut collapsed_rounds = 0;
    while rounds < MAX_ROUNDS && Instant::now() < deadline {
        let s2 = engine();
        s2.map_range(0, MIB2, FRAME_BASE, Perms::R, PageSize::Size4K)
            .unwrap();
        let gpa = 0;
        let start = Barrier::new(2);
        let (out, collapsed) = std::thread::scope(|s| {
            let c = s.spawn(|| {
                start.wait();
                s2.collapse(0..MIB2)
            });
            start.wait();
            let out = s2.handle_fault(
                Fault {
                    gpa,
                    access: Access::Write,
                    vcpu: 0,
                },
                &Ram,
                s2.invalidate_seq(),
            );
            (out, c.join().unwrap())
        });
        if matches!(
            out,
            Outcome::Relaxed { .. } | Outcome::Spurious | Outcome::Installed { .. }
        ) {
            assert!(
                s2.translate(gpa, Access::Write).is_ok(),
                "round {rounds}: write fault at {gpa:#x} returned {out:?}, collapse {collapsed}, and the page is not writable"
            );
        }
        collapsed_rounds += collapsed as u64;
        rounds += 1;
    }
    println!("{rounds} rounds, {collapsed_rounds} collapsed");
}

#[test]
fn stress_split_racing_collapse_leaks_no_table() {
    let deadline = Instant::now() + RUN_FOR;
    let mut rounds = 0;
    while rounds < MAX_ROUNDS && Instant::now() < deadline {
        let s2 = engine();
        s2.map_range(0, GIB, FRAME_BASE, Perms::RW, PageSize::Size2M)
            .unwrap();
        let block = 0;
        let start = Barrier::new(2);
        let (split, collapsed) = std::thread::scope(|s| {
            let c = s.spawn(|| {
                start.wait();
                s2.collapse(0..GIB)
            });
            start.wait();
            let split = s2.split(block..block + MIB2, PageSize::Size4K);
            (split, c.join().unwrap())
        });
        assert_eq!(
            s2.count_reachable_tables(),
            s2.live_table_pages(),
            "round {rounds}: split {split}, collapsed {collapsed}: live counter vs reachable tables"
        );
        rounds += 1;
    }
    println!("{rounds} rounds");
}
