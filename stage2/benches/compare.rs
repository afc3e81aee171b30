//! One run, one table: the stage2 engine side by side with its baselines (one global mutex; the
//! `x86_64` crate's `OffsetPageTable`), plus invalidation and dirty-harvest costs, each the median of
//! a few runs. `cargo bench -p stage2 --bench compare` (criterion's statistics: `--bench engine`).

mod support;

use std::time::Duration;

use support::*;

/// Runs per figure (the median is printed).
const RUNS: usize = 7;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mpps(pages: u64, d: Duration) -> f64 {
    pages as f64 / d.as_secs_f64() / 1e6
}

fn install(threads: usize, global_lock: bool, outer_mutex: bool) -> Duration {
    median(
        RUNS,
        || engine(global_lock, threads),
        |s2| fault_in_4k(s2, PAGES_4K_PER_GIB, threads, outer_mutex),
    )
}

fn main() {
    let pages = PAGES_4K_PER_GIB;
    println!(
        "stage2 compare: median of {RUNS} runs, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("1. 4 KiB installs over 1 GiB ({pages} faults)");
    println!("   {:<36} {:>10} {:>12}", "variant", "ms", "Mfaults/s");
    let mut rows = Vec::new();
    for (name, threads, global, outer) in [
        ("lock-free, 1 thread", 1, false, false),
        ("lock-free, 2 threads", 2, false, false),
        ("Config::global_lock, 1 thread", 1, true, false),
        ("Config::global_lock, 2 threads", 2, true, false),
        ("bench-side Mutex, 2 threads", 2, false, true),
    ] {
        let d = install(threads, global, outer);
        println!("   {:<36} {:>10.2} {:>12.2}", name, ms(d), mpps(pages, d));
        rows.push(d);
    }
    println!(
        "   ratio lock-free 2t / global_lock 2t: {:.2}x (target >= 2x); lock-free 2t / 1t: {:.2}x; vs bench-side Mutex 2t: {:.2}x",
        rows[3].as_secs_f64() / rows[1].as_secs_f64(),
        rows[0].as_secs_f64() / rows[1].as_secs_f64(),
        rows[4].as_secs_f64() / rows[1].as_secs_f64(),
    );

    println!();
    println!("2. one thread maps 1 GiB in 4 KiB pages");
    let x86 = {
        let mut times: Vec<Duration> = (0..RUNS)
            .map(|_| {
                let mut arena = x86_baseline::Arena::new(x86_baseline::TABLES_FOR_1G_4K);
                timed(|| {
                    std::hint::black_box(arena.map_4k(pages, FRAME_BASE));
                })
            })
            .collect();
        times.sort();
        times[RUNS / 2]
    };
    let batch = median(
        RUNS,
        || engine(false, 1),
        |s2| timed(|| map_range_4k(s2, pages)),
    );
    let fault = install(1, false, false);
    println!(
        "   {:<36} {:>10} {:>12} {:>14}",
        "variant", "ms", "ns/page", "x86_64 / ours"
    );
    for (name, d) in [
        ("x86_64 OffsetPageTable::map_to", x86),
        ("stage2 map_range (one batch)", batch),
        ("stage2 handle_fault per page", fault),
    ] {
        println!(
            "   {:<36} {:>10.2} {:>12.1} {:>13.2}x",
            name,
            ms(d),
            d.as_nanos() as f64 / pages as f64,
            x86.as_secs_f64() / d.as_secs_f64()
        );
    }

    println!();
    println!("3. invalidation (start + end) of 1 GiB");
    let empty = empty_1g_entry_engine();
    const EMPTY_REPS: u32 = 100_000;
    let empty_t = median(
        RUNS,
        || (),
        |_| {
            timed(|| {
                for _ in 0..EMPTY_REPS {
                    std::hint::black_box(empty.invalidate_range_start(0..GIB));
                    empty.invalidate_range_end(0..GIB);
                }
            })
        },
    ) / EMPTY_REPS;
    let mapped = median(
        RUNS,
        || {
            let s2 = engine(false, 1);
            map_range_4k(&s2, pages);
            s2
        },
        |s2| {
            timed(|| {
                std::hint::black_box(s2.invalidate_range_start(0..GIB));
                s2.invalidate_range_end(0..GIB);
            })
        },
    );
    println!(
        "   empty 1 GiB entry: {:.0} ns per start+end (target <= 1000 ns)",
        empty_t.as_nanos() as f64
    );
    println!(
        "   fully mapped, 4 KiB pages: {:.2} ms, {:.2} ns per entry",
        ms(mapped),
        mapped.as_nanos() as f64 / pages as f64
    );

    println!();
    println!("4. harvest (get + clear) of a 4 GiB dirty bitmap, 4 KiB pages");
    let pages4 = 4 * pages;
    let s2 = logging_engine(pages4);
    for (name, every) in [("all pages dirty", 1), ("1% dirty", 100)] {
        let d = median(
            RUNS,
            || dirty_every(&s2, pages4, every),
            |&written| {
                let mut bitmap = None;
                let t = timed(|| bitmap = Some(s2.dirty().harvest(0..4 * GIB)));
                assert_eq!(
                    bitmap.unwrap().count(),
                    written,
                    "harvest lost or invented dirty pages"
                );
                t
            },
        );
        println!("   {:<20} {:>8.2} ms", name, ms(d));
    }
}
