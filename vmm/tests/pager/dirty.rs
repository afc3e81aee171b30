//! The pager's own stage2-wp dirty logging against the real kernel: writer threads write
//! generation counters into random pages of a userfaultfd-write-protect-tracked mapping while a
//! harvester runs 200 harvests; no write between two harvests may be missing from the later one.
//! Real userfaultfd, real threads standing in for vCPUs; the 2 MiB test skips with a reason when
//! the huge page pool cannot give the pages.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use stage2::{Bitmap, PageSize};
use vmm::pager::{Pager, PagerConfig, PagingError};

use super::util::{tracking_cfg, xorshift, Ram, PAGE};

const WRITERS: usize = 2;
const HARVESTS: usize = 200;

fn is_set(bm: &Bitmap, page: u64) -> bool {
    bm.is_set(page * PAGE)
}

/// Word `t` of every page (the writers' words).
fn snapshot(ram: &Ram) -> Vec<[u64; WRITERS]> {
    (0..ram.len / PAGE)
        .map(|p| std::array::from_fn(|t| ram.read(p * PAGE + 8 * t as u64)))
        .collect()
}

/// Per-writer progress: `started` is stored before a write, `done` after it (SeqCst), so a
/// harvester that reads them knows which writes lie wholly between two harvests.
struct Progress {
    started: [AtomicU64; WRITERS],
    done: [AtomicU64; WRITERS],
    stop: AtomicBool,
}

fn run(ram: Ram, page: PageSize) {
    let ram = Arc::new(ram);
    let pages = ram.len / PAGE;
    let pager = Pager::start_with_regions(&[ram.region()], page, tracking_cfg(WRITERS)).unwrap();
    // Every page present before logging starts (the first harvest reports the start-up writes).
    for p in 0..pages {
        ram.write(p * PAGE, 0);
    }
    pager.start_dirty_log().unwrap();
    let mut bitmaps = vec![pager.harvest_dirty(0, ram.len).unwrap()];
    let mut snaps = vec![snapshot(&ram)];
    let prog = Arc::new(Progress {
        started: std::array::from_fn(|_| AtomicU64::new(0)),
        done: std::array::from_fn(|_| AtomicU64::new(0)),
        stop: AtomicBool::new(false),
    });
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (ram, prog) = (ram.clone(), prog.clone());
            thread::spawn(move || {
                // log[i - 1] = page of write i.
                let mut log = Vec::new();
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x2545_f491);
                let mut i = 0u64;
                while !prog.stop.load(Ordering::Relaxed) {
                    i += 1;
                    let p = xorshift(&mut seed) % pages;
                    prog.started[t].store(i, Ordering::SeqCst);
                    ram.write(p * PAGE + 8 * t as u64, ((t as u64) << 48) | i);
                    prog.done[t].store(i, Ordering::SeqCst);
                    log.push(p);
                }
                log
            })
        })
        .collect();
    // before[k][t]: writes of t up to this one were complete before harvest k began.
    // after[k][t]: writes of t after this one began after harvest k returned.
    let mut before = vec![[0u64; WRITERS]];
    let mut after = vec![[0u64; WRITERS]];
    for _ in 0..HARVESTS {
        thread::sleep(Duration::from_micros(500));
        before.push(std::array::from_fn(|t| prog.done[t].load(Ordering::SeqCst)));
        bitmaps.push(pager.harvest_dirty(0, ram.len).unwrap());
        after.push(std::array::from_fn(|t| {
            prog.started[t].load(Ordering::SeqCst)
        }));
        snaps.push(snapshot(&ram));
    }
    prog.stop.store(true, Ordering::SeqCst);
    let logs: Vec<Vec<u64>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    // A last harvest with every writer stopped: it must hold every write since the one before.
    before.push(std::array::from_fn(|t| prog.done[t].load(Ordering::SeqCst)));
    bitmaps.push(pager.harvest_dirty(0, ram.len).unwrap());
    after.push(before[before.len() - 1]);
    snaps.push(snapshot(&ram));
    let st = pager.stats();
    println!("{st}");
    let writes: usize = logs.iter().map(Vec::len).sum();
    let reported: u64 = bitmaps.iter().map(Bitmap::count).sum();
    println!(
        "{writes} writes, {} harvests, {reported} pages reported, {} WP faults ({} waited for a harvest)",
        bitmaps.len() - 1,
        st.events_wp,
        st.wp_waited
    );
    assert!(
        writes > HARVESTS,
        "the writers hardly ran ({writes} writes)"
    );
    assert!(st.events_wp > 0);
    assert_eq!(st.harvests, bitmaps.len() as u64);

    // 1. Every write that began after harvest k-1 returned and was complete before harvest k
    //    began is in harvest k.
    let mut exact = 0;
    for (t, log) in logs.iter().enumerate() {
        for k in 1..bitmaps.len() {
            for i in after[k - 1][t] + 1..=before[k][t] {
                let p = log[(i - 1) as usize];
                assert!(
                    is_set(&bitmaps[k], p),
                    "write {i} of writer {t} to page {p} (between harvests {} and {k}) is not in harvest {k}",
                    k - 1
                );
                exact += 1;
            }
        }
    }
    // 2. Every page whose content changed between the snapshots after harvests k-1 and k is in
    //    harvest k, or in harvest k+1 when the write overlapped harvest k (the last harvest,
    //    with the writers stopped, has no such overlap).
    let mut changed = 0;
    for k in 1..snaps.len() {
        for p in 0..pages {
            if snaps[k][p as usize] == snaps[k - 1][p as usize] {
                continue;
            }
            changed += 1;
            let later = bitmaps.get(k + 1).is_some_and(|b| is_set(b, p)) && k + 1 < bitmaps.len();
            assert!(
                is_set(&bitmaps[k], p) || later,
                "page {p} changed between harvests {} and {k} and is in neither harvest {k} nor {}",
                k - 1,
                k + 1
            );
        }
    }
    // The last interval is exact: nothing overlapped the last harvest.
    let last = snaps.len() - 1;
    for p in 0..pages {
        if snaps[last][p as usize] != snaps[last - 1][p as usize] {
            assert!(
                is_set(&bitmaps[last], p),
                "page {p} missing from the last harvest"
            );
        }
    }
    println!("{exact} writes checked exactly, {changed} page changes checked");
    assert!(exact > 0 && changed > 0);
    pager.stop_dirty_log().unwrap();
    pager.stop();
}

#[test]
fn writes_between_two_harvests_are_in_the_later_one_4k() {
    let Some(ram) = Ram::new(16 << 20, false) else {
        return;
    };
    run(ram, PageSize::Size4K);
}

#[test]
fn writes_between_two_harvests_are_in_the_later_one_2m_hugetlb() {
    let Some(ram) = Ram::new(32 << 20, true) else {
        return;
    };
    run(ram, PageSize::Size2M);
}

#[test]
fn a_dirty_page_on_hugetlb_reports_its_whole_huge_page() {
    let Some(ram) = Ram::new(8 << 20, true) else {
        return;
    };
    let pager = Pager::start_with_regions(&[ram.region()], PageSize::Size2M, tracking_cfg(WRITERS))
        .unwrap();
    ram.write(0, 1);
    ram.write(2 << 20, 1);
    pager.start_dirty_log().unwrap();
    assert!(pager.harvest_dirty(0, ram.len).unwrap().is_empty());
    // One write into the second huge page: all 512 of its 4 KiB pages are reported, no other.
    ram.write((2 << 20) + 5 * PAGE, 7);
    let bm = pager.harvest_dirty(0, ram.len).unwrap();
    let dirty: HashSet<u64> = (0..ram.len / PAGE).filter(|&p| is_set(&bm, p)).collect();
    assert_eq!(dirty, (512..1024).collect::<HashSet<u64>>());
    // Protected again: a second write to another page of it is seen.
    ram.write((2 << 20) + 100 * PAGE, 8);
    let bm = pager.harvest_dirty(2 << 20, 2 << 20).unwrap();
    assert_eq!(bm.words().len(), 8);
    assert!(bm.words().iter().all(|w| *w == u64::MAX));
    pager.stop();
}

#[test]
fn dirty_log_calls_are_refused_with_the_reason() {
    let Some(ram) = Ram::new(4 << 20, false) else {
        return;
    };
    let untracked = Pager::start_with_regions(
        &[ram.region()],
        PageSize::Size4K,
        PagerConfig {
            write_tracking: false,
            ..tracking_cfg(WRITERS)
        },
    )
    .unwrap();
    let e = untracked.start_dirty_log().unwrap_err();
    assert!(e.to_string().contains("write_tracking = true"), "{e}");
    untracked.stop();
    let pager = Pager::start_with_regions(&[ram.region()], PageSize::Size4K, tracking_cfg(WRITERS))
        .unwrap();
    let e = pager.harvest_dirty(0, ram.len).unwrap_err();
    assert!(e.to_string().contains("start_dirty_log"), "{e}");
    pager.start_dirty_log().unwrap();
    ram.write(3 * PAGE, 1);
    assert!(matches!(
        pager.harvest_dirty(0x800, PAGE),
        Err(PagingError::Unaligned { .. })
    ));
    assert!(matches!(
        pager.harvest_dirty(0, ram.len + PAGE),
        Err(PagingError::OutsideRam { .. })
    ));
    let bm = pager.harvest_dirty(0, ram.len).unwrap();
    assert!(is_set(&bm, 3));
    // Stopped: writes go through (the host protection is lifted by the first write's fault)
    // and harvests are refused.
    pager.stop_dirty_log().unwrap();
    ram.write(3 * PAGE, 2);
    ram.write(3 * PAGE + 8, 3);
    assert_eq!(ram.read(3 * PAGE), 2);
    assert!(pager.harvest_dirty(0, ram.len).is_err());
    pager.stop();
}
