//! One run, one table: the stage2 engine side by side with its baselines (one global mutex; the
//! `x86_64` crate's `OffsetPageTable`), plus invalidation and dirty-harvest costs.
//! `cargo bench -p stage2 --bench compare` (criterion's statistics: `--bench engine`).
//!
//! Each figure is the best of a few runs, as wall time and as CPU time (the sum over the threads,
//! read with `CLOCK_THREAD_CPUTIME_ID`): on a shared, busy host the CPU time is the cost of the code
//! itself, the wall time what a caller waited. The load average is printed with the table.

mod support;

use std::time::Duration;

use support::*;

/// Runs per figure (the best is printed).
const RUNS: usize = 7;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn per(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

fn install(threads: usize, global_lock: bool, outer_mutex: bool) -> (Duration, Duration) {
    best(
        RUNS,
        || engine(global_lock, threads),
        |s2| fault_in_4k_cpu(s2, PAGES_4K_PER_GIB, threads, outer_mutex, false),
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() {
    let pages = PAGES_4K_PER_GIB;
    println!(
        "stage2 compare: best of {RUNS} runs, {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    println!();
    println!("1. 4 KiB installs over 1 GiB ({pages} faults)");
    println!(
        "   {:<34} {:>9} {:>11} {:>13}",
        "variant", "wall ms", "Mfaults/s", "CPU ns/fault"
    );
    let mut rows = Vec::new();
    for (name, threads, global, outer) in [
        ("lock-free, 1 thread", 1, false, false),
        ("lock-free, 2 threads", 2, false, false),
        ("Config::global_lock, 1 thread", 1, true, false),
        ("Config::global_lock, 2 threads", 2, true, false),
        ("bench-side Mutex, 2 threads", 2, false, true),
    ] {
        let (wall, cpu) = install(threads, global, outer);
        println!(
            "   {:<34} {:>9.2} {:>11.2} {:>13.1}",
            name,
            ms(wall),
            pages as f64 / wall.as_secs_f64() / 1e6,
            per(cpu, pages)
        );
        rows.push(wall);
    }
    println!(
        "   wall-time ratios: lock-free 2t vs global_lock 2t {:.2}x (target >= 2x); lock-free 2t vs 1t {:.2}x; vs bench-side Mutex 2t {:.2}x",
        rows[3].as_secs_f64() / rows[1].as_secs_f64(),
        rows[0].as_secs_f64() / rows[1].as_secs_f64(),
        rows[4].as_secs_f64() / rows[1].as_secs_f64(),
    );

    println!();
    println!("2. one thread maps 1 GiB in 4 KiB pages");
    let x86 = (0..RUNS)
        .map(|_| {
            let mut arena = x86_baseline::Arena::new(x86_baseline::TABLES_FOR_1G_4K);
            timed_cpu(|| {
                std::hint::black_box(arena.map_4k(pages, FRAME_BASE));
            })
        })
        .min()
        .unwrap();
    let batch = best(
        RUNS,
        || engine(false, 1),
        |s2| timed_cpu(|| map_range_4k(s2, pages)),
    );
    let fault = install(1, false, false);
    let fault_pinned = best(
        RUNS,
        || engine(false, 1),
        |s2| fault_in_4k_cpu(s2, PAGES_4K_PER_GIB, 1, false, true),
    );
    println!(
        "   {:<34} {:>9} {:>12} {:>16}",
        "variant", "wall ms", "CPU ns/page", "x86_64/ours CPU"
    );
    for (name, (wall, cpu)) in [
        ("x86_64 OffsetPageTable::map_to", x86),
        ("stage2 map_range (one batch)", batch),
        ("stage2 handle_fault per page", fault),
        ("handle_fault, caller holds pin()", fault_pinned),
    ] {
        println!(
            "   {:<34} {:>9.2} {:>12.1} {:>15.2}x",
            name,
            ms(wall),
            per(cpu, pages),
            x86.1.as_secs_f64() / cpu.as_secs_f64()
        );
    }

    println!();
    println!("3. invalidation (start + end) of 1 GiB");
    let empty = empty_1g_entry_engine();
    const EMPTY_REPS: u32 = 100_000;
    let (empty_wall, empty_cpu) = best(
        RUNS,
        || (),
        |_| {
            timed_cpu(|| {
                for _ in 0..EMPTY_REPS {
                    std::hint::black_box(empty.invalidate_range_start(0..GIB));
                    empty.invalidate_range_end(0..GIB);
                }
            })
        },
    );
    let (mapped_wall, mapped_cpu) = best(
        RUNS,
        || {
            let s2 = engine(false, 1);
            map_range_4k(&s2, pages);
            s2
        },
        |s2| {
            timed_cpu(|| {
                std::hint::black_box(s2.invalidate_range_start(0..GIB));
                s2.invalidate_range_end(0..GIB);
            })
        },
    );
    println!(
        "   empty 1 GiB entry: {:.0} ns wall, {:.0} ns CPU per start+end (target <= 1000 ns)",
        per(empty_wall, EMPTY_REPS.into()),
        per(empty_cpu, EMPTY_REPS.into())
    );
    println!(
        "   fully mapped, 4 KiB pages: {:.2} ms wall, {:.1} ns CPU per entry",
        ms(mapped_wall),
        per(mapped_cpu, pages)
    );

    println!();
    println!("4. harvest (get + clear) of a 4 GiB dirty bitmap, 4 KiB pages mapped, logging on");
    let pages4 = 4 * pages;
    let s2 = logging_engine(pages4);
    for (name, every) in [("all pages dirty", 1), ("1% dirty", 100)] {
        let (wall, cpu) = best(
            RUNS,
            || dirty_every(&s2, pages4, every),
            |&written| {
                let mut bitmap = None;
                let t = timed_cpu(|| bitmap = Some(s2.dirty().harvest(0..4 * GIB)));
                assert_eq!(
                    bitmap.unwrap().count(),
                    written,
                    "harvest lost or invented dirty pages"
                );
                t
            },
        );
        println!(
            "   {:<20} {:>8.2} ms wall {:>8.2} ms CPU",
            name,
            ms(wall),
            ms(cpu)
        );
    }
}
