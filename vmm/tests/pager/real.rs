//! The demand pager against the real kernel: real userfaultfd, real memory, real threads standing
//! in for vCPUs (no KVM needed; the KVM-level suites run the built-in guests). Hugetlb tests skip
//! with a reason when the 2 MiB pool cannot give the pages.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use stage2::{Access, PageSize};
use vmm::memory::RamRegion;
use vmm::pager::{Pager, PagingError};

use super::util::{cfg, paged, touch_storm, xorshift, Ram, GIB, HUGE_2M, PAGE};

/// Pages (of `page` bytes) touched by `threads` threads at `per_thread` random 4 KiB addresses
/// each; every thread checks that an untouched word of the page reads zero, then writes its tag.
fn touch_random(ram: &Arc<Ram>, threads: usize, per_thread: usize, page: u64) -> HashSet<u64> {
    let mut touched = HashSet::new();
    let mut handles = Vec::new();
    for t in 0..threads {
        let mut seed = 0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x1234_5678);
        let addrs: Vec<u64> = (0..per_thread)
            .map(|_| (xorshift(&mut seed) % (ram.len / PAGE)) * PAGE)
            .collect();
        touched.extend(addrs.iter().map(|a| a & !(page - 1)));
        let ram = ram.clone();
        handles.push(thread::spawn(move || {
            for a in addrs {
                // Word 500 of each 4 KiB page is never written: it must read zero.
                assert_eq!(ram.read(a + 500 * 8), 0, "fresh page at {a:#x} not zero");
                ram.write(a + (t as u64) * 8, 0xabc0_0000 + t as u64);
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    touched
}

#[test]
fn threads_touching_random_4k_pages_get_zero_pages_and_one_install_each() {
    let Some((ram, pager)) = paged(64 << 20, false, cfg(4, 1)) else {
        return;
    };
    let touched = touch_random(&ram, 4, 2000, PAGE);
    let st = pager.stats();
    println!("{st}");
    assert_eq!(st.stage2.installs_4k, touched.len() as u64);
    assert_eq!(st.installed, touched.len() as u64);
    assert_eq!(st.populated_4k, touched.len() as u64 * PAGE);
    assert_eq!(st.stage2.mapped_4k, touched.len() as u64);
    // Every touched page is mapped in stage2 and present on the host.
    for &p in &touched {
        assert!(pager.stage2().translate(p, Access::Write).is_ok(), "{p:#x}");
        assert!(ram.present(p));
    }
    pager.stop();
}

#[test]
fn hugetlb_2m_installs_equal_touched_huge_pages() {
    let Some((ram, pager)) = paged(128 << 20, true, cfg(2, 16)) else {
        return;
    };
    let touched = touch_random(&ram, 3, 40, HUGE_2M);
    let st = pager.stats();
    println!("{st}");
    assert_eq!(st.stage2.installs_2m, touched.len() as u64);
    assert_eq!(st.stage2.installs_4k, 0);
    assert_eq!(st.populated_2m, touched.len() as u64 * HUGE_2M);
    // One fault per huge page at most per thread; every 4 KiB of a touched huge page is there.
    for &p in &touched {
        let t = pager.stage2().translate(p + 0x1234, Access::Read).unwrap();
        assert_eq!(t.size, PageSize::Size2M);
        assert_eq!(t.pa, ram.addr + p + 0x1234, "stage2 maps the host block");
    }
    pager.stop();
}

/// `threads` threads wait on a barrier and touch the same page (half read, half write), for
/// `rounds` different pages.
fn racing_touches(ram: &Arc<Ram>, pager: &Pager, threads: usize, rounds: u64, stride: u64) {
    let barrier = Arc::new(Barrier::new(threads));
    let mut hs = Vec::new();
    for t in 0..threads {
        let (ram, barrier) = (ram.clone(), barrier.clone());
        hs.push(thread::spawn(move || {
            for r in 0..rounds {
                barrier.wait();
                let a = r * stride + 64 * t as u64;
                if t.is_multiple_of(2) {
                    ram.write(a, r + 1);
                } else {
                    let v = ram.read(a);
                    assert_eq!(v, 0, "a word nobody writes reads zero");
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    let st = pager.stats();
    println!("{st}");
}

#[test]
fn racing_touches_on_one_4k_page_install_once() {
    let Some((ram, pager)) = paged(16 << 20, false, cfg(4, 1)) else {
        return;
    };
    let rounds = 200;
    racing_touches(&ram, &pager, 6, rounds, PAGE);
    let st = pager.stats();
    assert_eq!(
        st.stage2.installs_4k, rounds,
        "exactly one install per page"
    );
    // Every other fault on a page was answered without a second install, and nobody looped.
    // Each MISSING event ends in one final answer (a Retry is deferred and asked again).
    assert_eq!(
        st.events_missing,
        st.installed + st.spurious + st.relaxed,
        "{st}"
    );
    assert_eq!(st.deferred_dropped, 0);
    assert_eq!(st.denied, 0);
    assert!(st.events_missing >= rounds);
    for r in 0..rounds {
        assert_eq!(ram.read(r * PAGE), r + 1);
    }
    pager.stop();
}

#[test]
fn racing_touches_on_one_2m_hugetlb_page_install_once() {
    let Some((ram, pager)) = paged(32 * HUGE_2M, true, cfg(4, 1)) else {
        return;
    };
    let rounds = 32;
    racing_touches(&ram, &pager, 6, rounds, HUGE_2M);
    let st = pager.stats();
    assert_eq!(
        st.stage2.installs_2m, rounds,
        "exactly one install per huge page"
    );
    assert_eq!(
        st.populated_2m,
        rounds * HUGE_2M,
        "one host fill per huge page"
    );
    assert_eq!(st.installed, rounds);
    pager.stop();
}

/// Populates a few pages of every 2 MiB of `[0, len)` with a non-zero value.
fn populate_sparse(ram: &Ram, len: u64, step: u64) -> u64 {
    let mut n = 0;
    let mut a = 0;
    while a < len {
        ram.write(a + 8, 0x5555_0000 + a);
        n += 1;
        a += step;
    }
    n
}

#[test]
fn reclaim_of_a_populated_1g_range_gives_fresh_zero_pages() {
    let Some((ram, pager)) = paged(2 * GIB, false, cfg(2, 16)) else {
        return;
    };
    // Populate a spread of pages in [1 GiB, 2 GiB) (with fault-around: 16 pages each).
    let n = populate_sparse(&ram, GIB, 256 << 10);
    for i in 0..n {
        assert_eq!(
            ram.read(GIB + i * (256 << 10) + 8),
            0,
            "the second GiB is untouched"
        );
    }
    let before = pager.stats();
    let mapped_before = before.stage2.mapped_4k;
    assert!(mapped_before >= n, "{before}");
    let rep = pager.reclaim(0, GIB).unwrap();
    println!("reclaim of 1 GiB populated: {rep:?}");
    assert!(rep.zapped as u64 >= n, "{rep:?}");
    let mid = pager.stats();
    assert_eq!(mid.reclaims, 1);
    assert!(
        mid.own_removes >= 1,
        "the REMOVE of our own drop was recognised"
    );
    assert_eq!(mid.external_invalidations, 0);
    // stage2 kept only the second GiB's pages (those read above).
    assert_eq!(
        mid.stage2.mapped_4k,
        mapped_before - rep.zapped as u64,
        "{mid}"
    );
    for i in 0..n {
        let a = i * (256 << 10);
        assert!(pager.stage2().translate(a, Access::Read).is_err());
        assert!(!ram.present(a), "host page {a:#x} dropped");
    }
    // Touch again: fresh zero pages, counted as new faults and installs.
    for i in 0..n {
        assert_eq!(
            ram.read(i * (256 << 10) + 8),
            0,
            "fresh zero page after reclaim"
        );
    }
    let after = pager.stats();
    println!("{after}");
    assert!(after.events_missing >= before.events_missing + n);
    assert!(after.stage2.zapped >= rep.zapped as u64);
    assert!(after.installed >= before.installed + n);
    pager.stop();
}

#[test]
fn reclaim_of_a_populated_1g_hugetlb_range_refaults_whole_huge_pages() {
    let Some((ram, pager)) = paged(GIB, true, cfg(2, 16)) else {
        return;
    };
    // Touch every other huge page.
    let n = populate_sparse(&ram, GIB, 2 * HUGE_2M);
    assert_eq!(pager.stats().stage2.installs_2m, n);
    let rep = pager.reclaim(0, GIB).unwrap();
    println!("reclaim of 1 GiB of 2 MiB hugetlb: {rep:?}");
    assert_eq!(rep.zapped as u64, n, "one 2 MiB leaf per touched huge page");
    for i in 0..n {
        assert_eq!(ram.read(i * 2 * HUGE_2M + 8), 0, "fresh zero huge page");
    }
    let st = pager.stats();
    assert_eq!(
        st.stage2.installs_2m,
        2 * n,
        "refaults install whole huge pages"
    );
    assert_eq!(st.populated_2m, 2 * n * HUGE_2M);
    pager.stop();
}

#[test]
fn reclaim_of_an_empty_1g_range_works_and_zaps_nothing() {
    let Some((ram, pager)) = paged(2 * GIB, false, cfg(1, 16)) else {
        return;
    };
    ram.write(8, 1);
    let rep = pager.reclaim(GIB, GIB).unwrap();
    println!("reclaim of an empty 1 GiB range: {rep:?}");
    assert_eq!(rep.zapped, 0);
    assert_eq!(ram.read(8), 1, "memory outside the range is kept");
    assert!(pager.stage2().translate(0, Access::Read).is_ok());
    pager.stop();
}

#[test]
fn bad_reclaim_ranges_are_refused_with_a_clear_error_and_paging_goes_on() {
    let Some((ram, pager)) = paged(64 << 20, false, cfg(1, 16)) else {
        return;
    };
    let end = 64 << 20;
    let cases: [(u64, u64, &str); 6] = [
        (end, PAGE, "not inside guest RAM"),
        (end - PAGE, 2 * PAGE, "not inside guest RAM"),
        (u64::MAX - PAGE + 1, PAGE, "not inside guest RAM"),
        (0x1001, PAGE, "not aligned"),
        (0, 0x1800, "not aligned"),
        (0, 0, "is empty"),
    ];
    for (gpa, len, want) in cases {
        let e = pager.reclaim(gpa, len).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(want), "reclaim({gpa:#x}, {len:#x}): {msg}");
        assert!(
            matches!(
                e,
                PagingError::OutsideRam { .. }
                    | PagingError::Unaligned { .. }
                    | PagingError::EmptyRange { .. }
            ),
            "{e:?}"
        );
    }
    // Nothing was dropped or invalidated, and paging still works.
    assert_eq!(pager.stats().reclaims, 0);
    assert_eq!(ram.read(PAGE * 3), 0);
    assert_eq!(pager.stats().installed, 1);
    pager.stop();
}

#[test]
fn reclaim_storm_during_touches_keeps_stage2_and_host_consistent() {
    // Touchers write and re-read pages while a reclaimer drops 2 MiB ranges under them. After
    // the storm, every page the host has must be mapped in stage2 (stage2 never under-reports),
    // and every value read is either the writer's or zero (a reclaimed page).
    let len = 64 << 20;
    let Some((ram, pager)) = paged(len, false, cfg(2, 8)) else {
        return;
    };
    let pager = Arc::new(pager);
    let reclaimer = pager.clone();
    let mut seed = 5;
    let (touches, reclaims) = touch_storm(&ram, 77, Duration::from_secs(2), move || {
        let gpa = (xorshift(&mut seed) % (len / HUGE_2M)) * HUGE_2M;
        reclaimer.reclaim(gpa, HUGE_2M).unwrap();
    });
    // Let deferred installs finish (they retry every millisecond).
    thread::sleep(Duration::from_millis(50));
    let st = pager.stats();
    println!("{touches} touches, {reclaims} reclaims\n{st}");
    assert!(reclaims > 0 && touches > 0);
    assert!(st.stage2.zapped > 0 && st.installed > 0);
    let mut under = Vec::new();
    for p in (0..len).step_by(PAGE as usize) {
        if ram.present(p) && pager.stage2().translate(p, Access::Read).is_err() {
            under.push(p);
        }
    }
    assert!(
        under.is_empty(),
        "{} host pages unknown to stage2, e.g. {:#x?}",
        under.len(),
        &under[..under.len().min(8)]
    );
    Arc::try_unwrap(pager).unwrap().stop();
}

#[test]
fn external_madvise_is_bracketed_and_refaults_zero() {
    // A drop the VMM did not make (REMOVE event from someone else's madvise) is bracketed by
    // the handler: stage2 forgets the range, and the next touch gets a fresh zero page.
    let Some((ram, pager)) = paged(8 << 20, false, cfg(1, 1)) else {
        return;
    };
    ram.write(PAGE, 42);
    assert!(pager.stage2().translate(PAGE, Access::Read).is_ok());
    // SAFETY: drops one page of the test's own mapping.
    let r = unsafe {
        libc::madvise(
            (ram.addr + PAGE) as *mut libc::c_void,
            PAGE as usize,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    // The handler read the REMOVE before madvise returned; give it a moment to bracket.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pager.stats().external_invalidations == 0 {
        assert!(std::time::Instant::now() < deadline, "REMOVE not handled");
        thread::yield_now();
    }
    assert_eq!(ram.read(PAGE), 0, "fresh zero page");
    let st = pager.stats();
    assert_eq!(st.events_remove, 1);
    assert_eq!(
        st.stage2.installs_4k, 2,
        "installed, zapped, installed again"
    );
    pager.stop();
}

#[test]
fn write_tracking_relaxes_in_place_on_the_first_write() {
    let Some(ram) = Ram::new(8 << 20, false) else {
        return;
    };
    let ram = Arc::new(ram);
    let mut c = cfg(1, 1);
    c.write_tracking = true;
    let pager = Pager::start_with_regions(&[ram.region()], PageSize::Size4K, c).unwrap();
    pager.stage2().dirty().enable(stage2::SplitPolicy::Lazy);
    // A read installs a read-only entry and maps the host page write-protected...
    assert_eq!(ram.read(5 * PAGE), 0);
    let t = pager.stage2().translate(5 * PAGE, Access::Read).unwrap();
    assert!(!t.perms.contains(stage2::Perms::W));
    // ...the first write raises a WP fault: stage2 relaxes in place, the host unprotects.
    ram.write(5 * PAGE + 8, 7);
    assert_eq!(ram.read(5 * PAGE + 8), 7);
    let st = pager.stats();
    println!("{st}");
    assert_eq!(st.events_wp, 1);
    assert_eq!(st.relaxed, 1);
    assert_eq!(st.wp_cleared, 1);
    assert_eq!(
        st.stage2.installs_4k, 1,
        "no second install: permission-only update"
    );
    assert!(pager.stage2().translate(5 * PAGE, Access::Write).is_ok());
    let dirty = pager.stage2().dirty().harvest(0..8 << 20);
    assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![5 * PAGE]);
    pager.stop();
}

#[test]
fn bad_configuration_is_refused() {
    let Some(ram) = Ram::new(4 << 20, false) else {
        return;
    };
    let e = Pager::start_with_regions(&[ram.region()], PageSize::Size4K, cfg(0, 1)).unwrap_err();
    assert!(e.to_string().contains("at least one"), "{e}");
    let e = Pager::start_with_regions(&[ram.region()], PageSize::Size4K, cfg(1, 0)).unwrap_err();
    assert!(e.to_string().contains("fault_around_pages"), "{e}");
    let odd = RamRegion {
        len: 3 << 20,
        ..ram.region()
    };
    let e = Pager::start_with_regions(&[odd], PageSize::Size2M, cfg(1, 1)).unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
}

#[test]
fn hugetlb_1g_fault_fills_the_whole_gigabyte_and_installs_one_block() {
    /// `MAP_HUGE_1GB`: log2(1 GiB) at `MAP_HUGE_SHIFT` (include/uapi/asm-generic/hugetlb_encode.h).
    const MAP_HUGE_1GB: i32 = 30 << 26;
    // SAFETY: a fresh 1 GiB hugetlb mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            GIB as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | MAP_HUGE_1GB,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        eprintln!(
            "skipping: no free 1 GiB huge page ({}); reserve one in /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
            std::io::Error::last_os_error()
        );
        return;
    }
    let ram = Arc::new(Ram {
        addr: p as u64,
        len: GIB,
    });
    // The first gigabyte page is not there yet: nothing to record.
    let pager = Pager::start_with_regions(&[ram.region()], PageSize::Size1G, cfg(1, 1)).unwrap();
    assert_eq!(pager.record_present().unwrap(), 0);
    let r = ram.clone();
    let seen = thread::spawn(move || {
        let first = r.read(0x1234_5000);
        r.write(GIB - 8, 9);
        (first, r.read(0), r.read(GIB - 8))
    })
    .join()
    .unwrap();
    assert_eq!(seen, (0, 0, 9));
    let st = pager.stats();
    assert_eq!(st.events_missing, 1, "one fault for the whole gigabyte");
    assert_eq!(st.stage2.installs_1g, 1);
    assert_eq!(st.populated_1g, GIB);
    let t = pager
        .stage2()
        .translate(0x3000_0000, Access::Write)
        .unwrap();
    assert_eq!(t.size, PageSize::Size1G);
    // Reclaim of the whole gigabyte drops the block; the next touch refaults it.
    let rep = pager.reclaim(0, GIB).unwrap();
    assert_eq!(rep.zapped, 1);
    let r = ram.clone();
    assert_eq!(thread::spawn(move || r.read(GIB - 8)).join().unwrap(), 0);
    assert_eq!(pager.stats().stage2.installs_1g, 2);
    pager.stop();
    // A new pager over the populated gigabyte records it as one 1 GiB block.
    let pager = Pager::start_with_regions(&[ram.region()], PageSize::Size1G, cfg(1, 1)).unwrap();
    assert_eq!(pager.record_present().unwrap(), 1);
    let t = pager.stage2().translate(GIB - 8, Access::Read).unwrap();
    assert_eq!(t.size, PageSize::Size1G);
    pager.stop();
}

#[test]
fn external_drop_storm_during_touches_never_hangs_and_reads_zero_or_the_write() {
    // Someone else (not the pager) drops pages with madvise while threads write and re-read
    // them: every REMOVE is bracketed by a handler, removes and faults for the same pages
    // arrive in any order, and every access completes with the written value or a zero page.
    let len = 16 << 20;
    let Some((ram, pager)) = paged(len, false, cfg(2, 4)) else {
        return;
    };
    let dropped = ram.clone();
    let mut seed = 99;
    let (touches, drops) = touch_storm(&ram, 1000, Duration::from_secs(2), move || {
        let a = (xorshift(&mut seed) % (len / PAGE / 8)) * PAGE * 8;
        // SAFETY: drops 8 pages of the test's own mapping.
        let r = unsafe {
            libc::madvise(
                (dropped.addr + a) as *mut libc::c_void,
                (8 * PAGE) as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        // A drop in flight makes every fill fail with EAGAIN (the kernel's mmap_changing);
        // back-to-back drops would starve the touchers.
        thread::sleep(Duration::from_micros(20));
    });
    let st = pager.stats();
    println!("{touches} touches, {drops} external drops\n{st}");
    assert!(touches > 0 && drops > 0);
    assert_eq!(st.events_remove, drops, "one REMOVE per madvise");
    assert_eq!(
        st.external_invalidations, drops,
        "each bracketed by a handler"
    );
    assert_eq!(st.own_removes, 0);
    pager.stop();
}

#[test]
fn record_present_maps_pages_written_before_the_pager_started() {
    let Some(ram) = Ram::new(8 << 20, false) else {
        return;
    };
    // The "loader" writes pages 0..3 and page 100 before demand paging starts.
    for p in [0, 1, 2, 100] {
        ram.write(p * PAGE, 0x77);
    }
    let pager = Pager::start_with_regions(&[ram.region()], PageSize::Size4K, cfg(1, 1)).unwrap();
    assert_eq!(pager.record_present().unwrap(), 4);
    for p in [0, 1, 2, 100] {
        let t = pager.stage2().translate(p * PAGE, Access::Write).unwrap();
        assert_eq!(t.pa, ram.addr + p * PAGE);
    }
    assert!(pager.stage2().translate(3 * PAGE, Access::Read).is_err());
    assert_eq!(pager.stats().events_missing, 0, "no fault was needed");
    pager.stop();
}

/// The host protection that makes writes visible comes only from the dirty log (the pager has
/// no raw protect call: one outside the dirty lock could leave a page writable with no bit):
/// `start_dirty_log` protects every page, the first write to a page faults once and is
/// reported, and each harvest protects the page again so the next write faults once more.
#[test]
fn dirty_log_makes_the_next_write_after_each_harvest_fault_once() {
    let Some(ram) = Ram::new(8 << 20, false) else {
        return;
    };
    let mut c = cfg(1, 1);
    c.write_tracking = true;
    let pager = Pager::start_with_regions(&[ram.region()], PageSize::Size4K, c).unwrap();
    ram.write(0, 1);
    assert_eq!(pager.stats().events_wp, 0, "a write fill is writable");
    pager.start_dirty_log().unwrap();
    ram.write(8, 2);
    ram.write(16, 3);
    assert_eq!(
        pager.stats().events_wp,
        1,
        "the protected page faulted once"
    );
    assert_eq!(pager.stats().wp_cleared, 1);
    let bm = pager.harvest_dirty(0, ram.len).unwrap();
    assert!(bm.is_set(0));
    assert_eq!(bm.count(), 1);
    // Protected again by the harvest: one more fault, one more report.
    ram.write(24, 4);
    ram.write(32, 5);
    assert_eq!(pager.stats().events_wp, 2);
    let bm = pager.harvest_dirty(0, ram.len).unwrap();
    assert_eq!(bm.count(), 1);
    assert!(bm.is_set(0));
    assert_eq!(ram.read(32), 5);
    assert!(matches!(
        pager.harvest_dirty(8 << 20, PAGE),
        Err(PagingError::OutsideRam { .. })
    ));
    pager.stop();
}

/// A quiet batch drop (the postcopy switch's): every run's host pages and stage2 leaves go,
/// no REMOVE event is raised for them, the pages between runs keep their data, and the range
/// is registered again after the batch: a touch of a dropped page is a pager fault that fills
/// a fresh zero page.
#[test]
fn quiet_batch_drop_drops_every_run_without_events_and_stays_registered() {
    let Some((ram, pager)) = paged(GIB, false, cfg(2, 1)) else {
        return;
    };
    // 1100 runs: more than one batch of the pager's drop (1024 runs per process_madvise).
    const PAGES: u64 = 4 * 1100;
    for i in 0..PAGES {
        ram.write(i * PAGE + 8, 0x7700 + i);
    }
    // Every other pair of pages: runs of 2 pages.
    let runs: Vec<(u64, u64)> = (0..PAGES / 4).map(|k| (k * 4 * PAGE, 2 * PAGE)).collect();
    let before = pager.stats();
    pager.drop_runs_quiet(&runs).unwrap();
    let mid = pager.stats();
    assert_eq!(mid.reclaims, before.reclaims + runs.len() as u64, "{mid}");
    assert_eq!(
        mid.own_removes, before.own_removes,
        "no REMOVE event: {mid}"
    );
    assert_eq!(mid.external_invalidations, 0, "{mid}");
    for i in 0..PAGES {
        let a = i * PAGE;
        let dropped = (i % 4) < 2;
        assert_eq!(!ram.present(a), dropped, "host page {a:#x}");
        assert_eq!(
            pager.stage2().translate(a, Access::Read).is_err(),
            dropped,
            "stage2 leaf {a:#x}"
        );
        if !dropped {
            assert_eq!(ram.read(a + 8), 0x7700 + i, "kept page {a:#x}");
        }
    }
    // Registered again: touching a dropped page is a MISSING fault the pager fills.
    for (gpa, _) in &runs {
        assert_eq!(ram.read(gpa + 8), 0, "fresh zero page at {gpa:#x}");
    }
    let after = pager.stats();
    assert!(
        after.events_missing >= mid.events_missing + runs.len() as u64,
        "every dropped page came back through the pager: {after}"
    );
    pager.stop();
}
