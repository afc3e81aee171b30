//! Real-thread stress of the fault path against invalidations of whole 1 GiB ranges, splits and
//! collapses, followed by a full consistency check of the tables.
//!
//! Four threads run a seeded random mix for a bounded time and count. The backing remaps a GiB to a
//! new output address (a new "generation") inside every invalidation of it, as a host does when it
//! drops and refaults memory, so a mapping installed from a backing resolved before the invalidation
//! is detectable afterwards. Checks, during the run: `Denied` exactly when the backing forbids the
//! access; a translation seen while the generation is stable maps the current frame. After the run:
//! every present mapping maps the backing's current frame with permissions within the backing's; in
//! the never-invalidated GiB every access once granted is still granted (no downgrade across
//! split/collapse); the live table-page counter equals the tables reachable from the root.

#![cfg(not(loom))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stage2::{
    Access, Arm64, Backing, Config, Ept, Fault, Format, NoopTlb, Outcome, PageSize, Perms,
    Resolved, Stage2,
};

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 1 << 21;
/// GiBs the test uses: 0 = 1 GiB blocks allowed, 1 = 2 MiB blocks with mixed permissions,
/// 2 = 4 KiB only, 3 = 2 MiB blocks and never invalidated (the no-downgrade witness).
const NR_GIB: u64 = 4;
const STABLE_GIB: u64 = 3;
/// Output addresses: generation `g` of GiB `i` starts at `FRAME_BASE + g * GEN_STRIDE + i * GIB`.
const FRAME_BASE: u64 = 1 << 40;
const GEN_STRIDE: u64 = 1 << 36;
const THREADS: usize = 4;
const RUN_FOR: Duration = Duration::from_secs(3);
const MAX_OPS_PER_THREAD: u64 = 400_000;

/// The host memory behind GiBs `0..NR_GIB`, with a generation per GiB bumped by invalidations.
struct Host {
    generation: [AtomicU64; NR_GIB as usize],
}

impl Host {
    fn max_size(gpa: u64) -> PageSize {
        match gpa / GIB {
            0 => PageSize::Size1G,
            2 => PageSize::Size4K,
            _ => PageSize::Size2M,
        }
    }

    fn perms(gpa: u64) -> Perms {
        if gpa / GIB != 1 {
            return Perms::RWX;
        }
        [Perms::RWX, Perms::RW, Perms::RX, Perms::R][((gpa / MIB2) % 4) as usize]
    }

    /// The frame `gpa` is backed by in generation `generation`.
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
        let max_size = Host::max_size(gpa);
        let block = gpa & !(max_size.bytes() - 1);
        Some(Resolved {
            frame: Host::frame(block, generation),
            max_size,
            perms: Host::perms(gpa),
        })
    }
}

fn random_access(rng: &mut Rng) -> Access {
    [Access::Read, Access::Write, Access::Exec][rng.below(3) as usize]
}

/// One thread's random mix; returns the (gpa, access) pairs granted in the stable GiB.
fn worker<F: Format>(
    s2: &Stage2<F, NoopTlb>,
    host: &Host,
    seed: u64,
    vcpu: usize,
    deadline: Instant,
    ops: &AtomicU64,
) -> Vec<(u64, Access)> {
    let mut rng = Rng(seed);
    let mut granted = Vec::new();
    for op in 0..MAX_OPS_PER_THREAD {
        if op % 256 == 0 && Instant::now() >= deadline {
            break;
        }
        ops.fetch_add(1, Ordering::Relaxed);
        let gpa = rng.below(NR_GIB * GIB) & !0xfff;
        match rng.below(1000) {
            0..=749 => {
                let access = random_access(&mut rng);
                let seq = s2.invalidate_seq();
                let out = s2.handle_fault(Fault { gpa, access, vcpu }, host, seq);
                let allowed = Host::perms(gpa).contains(access.perms());
                assert_eq!(
                    out == Outcome::Denied,
                    !allowed,
                    "seed {seed:#x}: fault {access:?} at {gpa:#x} (backing {}) gave {out:?}",
                    Host::perms(gpa)
                );
                if gpa / GIB == STABLE_GIB && out != Outcome::Retry {
                    granted.push((gpa, access));
                }
            }
            750..=899 => {
                // A translation taken while the GiB's generation is stable maps that generation.
                let generation = &host.generation[(gpa / GIB) as usize];
                let before = generation.load(Ordering::Acquire);
                let t = s2.translate(gpa, Access::Read);
                let after = generation.load(Ordering::Acquire);
                if let (Ok(t), true) = (t, before == after) {
                    assert_eq!(
                        t.pa,
                        Host::frame(gpa, before),
                        "seed {seed:#x}: stale translation of {gpa:#x}"
                    );
                }
            }
            900..=949 => {
                let (size, to) = if rng.below(2) == 0 {
                    (GIB, PageSize::Size2M)
                } else {
                    (MIB2, PageSize::Size4K)
                };
                let base = gpa & !(size - 1);
                s2.split(base..base + size, to);
            }
            950..=996 => {
                let size = if rng.below(4) == 0 { GIB } else { MIB2 };
                let base = gpa & !(size - 1);
                s2.collapse(base..base + size);
            }
            _ => {
                let gib = gpa / GIB;
                if gib == STABLE_GIB {
                    continue;
                }
                let range = gib * GIB..(gib + 1) * GIB;
                s2.invalidate_range_start(range.clone());
                host.generation[gib as usize].fetch_add(1, Ordering::AcqRel);
                s2.invalidate_range_end(range);
            }
        }
    }
    granted
}

#[test]
fn stress_faults_invalidations_splits_collapses_ept() {
    run(Ept);
}

/// ARM64 without FEAT_BBM: every split is a break-before-make, so faults, walkers and the
/// invalidation sweep (which steals markers) meet markers all the time.
#[test]
fn stress_faults_invalidations_splits_collapses_arm64_bbm() {
    run(Arm64 { bbm_level2: false });
}

fn run<F: Format>(format: F) {
    let s2 = Stage2::new(
        format,
        NoopTlb,
        Config {
            nr_vcpus: THREADS,
            ..Config::default()
        },
    );
    let host = Host {
        generation: Default::default(),
    };
    let granted = Mutex::new(Vec::new());
    let ops = AtomicU64::new(0);
    let deadline = Instant::now() + RUN_FOR;
    let base_seed = 0x5eed_0000_0000_0001u64;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (s2, host, granted, ops) = (&s2, &host, &granted, &ops);
            s.spawn(move || {
                let seed = base_seed + t as u64 * 0x9e37_79b9;
                let g = worker(s2, host, seed, t, deadline, ops);
                granted.lock().unwrap().extend(g);
            });
        }
    });

    // Every present mapping maps the backing's current frame, within the backing's permissions.
    let mut mapped = 0u64;
    for gpa in (0..NR_GIB * GIB).step_by(4096) {
        let generation = host.generation[(gpa / GIB) as usize].load(Ordering::Acquire);
        let mut perms = Perms::NONE;
        for access in [Access::Read, Access::Write, Access::Exec] {
            if let Ok(t) = s2.translate(gpa, access) {
                assert_eq!(
                    t.pa,
                    Host::frame(gpa, generation),
                    "stale mapping of {gpa:#x} after the run"
                );
                perms = perms.union(access.perms());
            }
        }
        assert!(
            Host::perms(gpa).contains(perms),
            "{gpa:#x} grants {perms}, backing only {}",
            Host::perms(gpa)
        );
        mapped += u64::from(!perms.is_empty());
    }
    // Nothing granted in the never-invalidated GiB was taken away by a split, collapse or racing fault.
    for &(gpa, access) in granted.lock().unwrap().iter() {
        assert!(
            s2.translate(gpa, access).is_ok(),
            "{access:?} at {gpa:#x} was granted, then lost"
        );
    }
    assert_eq!(
        s2.live_table_pages(),
        s2.count_reachable_tables(),
        "orphan or double-counted table pages"
    );
    println!(
        "stress {}: {} operations, {mapped} 4 KiB pages mapped at the end\n{}",
        F::NAME,
        ops.load(Ordering::Relaxed),
        s2.stats()
    );
}
