//! Criterion benches of the stage2 engine: 4 KiB installs over 1 GiB (1 and 2 threads, lock-free and
//! one-global-mutex), mapping 1 GiB against the `x86_64` crate's `OffsetPageTable`, invalidation of
//! 1 GiB (empty and fully mapped), harvest of a 4 GiB dirty bitmap (all and 1% dirty).
//!
//! `cargo bench -p stage2 --bench engine`; the side-by-side ratios are printed by
//! `cargo bench -p stage2 --bench compare`.

mod support;

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use support::*;

/// Small, quick groups: every measurement here is milliseconds long.
fn quick<'a>(
    c: &'a mut Criterion,
    name: &str,
    elements: u64,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(elements));
    g
}

/// Bench 1: 262144 4 KiB faults over 1 GiB, lock-free vs the engine's `global_lock` mode.
fn installs(c: &mut Criterion) {
    let mut g = quick(c, "install_4k_1GiB", PAGES_4K_PER_GIB);
    for (name, threads, global) in [
        ("lockfree/1t", 1, false),
        ("lockfree/2t", 2, false),
        ("global_lock/1t", 1, true),
        ("global_lock/2t", 2, true),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let s2 = engine(global, threads);
                        fault_in_4k(&s2, PAGES_4K_PER_GIB, threads, false)
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

/// Bench 2: one thread maps 1 GiB in 4 KiB pages: our batch, our fault path, x86_64's mapper.
fn vs_x86_64(c: &mut Criterion) {
    let mut g = quick(c, "map_1GiB_4k", PAGES_4K_PER_GIB);
    g.bench_function("stage2_map_range", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let s2 = engine(false, 1);
                    timed(|| map_range_4k(&s2, PAGES_4K_PER_GIB))
                })
                .sum()
        })
    });
    g.bench_function("stage2_fault", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let s2 = engine(false, 1);
                    fault_in_4k(&s2, PAGES_4K_PER_GIB, 1, false)
                })
                .sum()
        })
    });
    g.bench_function("x86_64_OffsetPageTable", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let mut arena = x86_baseline::Arena::new(x86_baseline::TABLES_FOR_1G_4K);
                    timed(|| {
                        std::hint::black_box(arena.map_4k(PAGES_4K_PER_GIB, FRAME_BASE));
                    })
                })
                .sum()
        })
    });
    g.finish();
}

/// Bench 3: invalidation (start + end) of 1 GiB, empty and fully mapped with 4 KiB pages.
fn invalidation(c: &mut Criterion) {
    let mut g = quick(c, "invalidate_1GiB", 1);
    let empty = empty_1g_entry_engine();
    g.bench_function("empty_1G_entry", |b| {
        b.iter(|| {
            let zapped = empty.invalidate_range_start(0..GIB);
            empty.invalidate_range_end(0..GIB);
            zapped
        })
    });
    g.throughput(Throughput::Elements(PAGES_4K_PER_GIB));
    g.bench_function("mapped_4k", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let s2 = engine(false, 1);
                    map_range_4k(&s2, PAGES_4K_PER_GIB);
                    timed(|| {
                        let zapped = s2.invalidate_range_start(0..GIB);
                        s2.invalidate_range_end(0..GIB);
                        assert_eq!(zapped as u64, PAGES_4K_PER_GIB);
                    })
                })
                .sum()
        })
    });
    g.finish();
}

/// Bench 4: harvest (get + clear) of the dirty bitmap of 4 GiB mapped in 4 KiB pages.
fn harvest(c: &mut Criterion) {
    let pages = 4 * PAGES_4K_PER_GIB;
    let mut g = quick(c, "harvest_4GiB", pages);
    let s2 = logging_engine(pages);
    for (name, every) in [("all_dirty", 1), ("1pct_dirty", 100)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let written = dirty_every(&s2, pages, every);
                        let mut bitmap = None;
                        let t = timed(|| bitmap = Some(s2.dirty().harvest(0..4 * GIB)));
                        assert_eq!(bitmap.unwrap().count(), written);
                        t
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, installs, vs_x86_64, invalidation, harvest);
criterion_main!(benches);
