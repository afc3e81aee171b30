//! The pager on shared memfd memory against the real kernel (no KVM): pages the file already has
//! (written through the VMM's host view) are mapped by UFFDIO_CONTINUE on a MINOR fault, the
//! others are filled on a MISSING fault; reclaim punches a hole in the file and the next access
//! reads zeroes. At 4 KiB (shmem) and 2 MiB (hugetlbfs memfd; skipped with the reason when the
//! pool cannot give the pages).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread;

use stage2::{Access, PageSize};
use vmm::pager::{Pager, PagerConfig};

use super::util::{SharedRam, PAGE};

fn cfg(write_tracking: bool) -> PagerConfig {
    PagerConfig {
        handlers: 2,
        write_tracking,
        fault_around_pages: 16,
        vcpus: 2,
    }
}

fn pattern(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// Host pages of `page` bytes written through the host view: every third one.
fn view_written(host_page: u64) -> bool {
    host_page.is_multiple_of(3)
}

fn minor_and_missing(sr: SharedRam, page: PageSize) {
    let hp = page.bytes();
    let n = sr.ram.len / hp;
    let pager = Pager::start_shared(&[sr.shared_region()], page, cfg(false)).unwrap();
    // The VMM writes through its own view: the pages go into the file, the guest mapping does
    // not map them yet.
    for h in (0..n).filter(|&h| view_written(h)) {
        sr.view_write(h * hp + 8, pattern(h * hp + 8));
    }
    assert_eq!(pager.stats().events_minor, 0);
    // Two threads read a word of every 4 KiB page of guest RAM.
    let sr = Arc::new(sr);
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let sr = sr.clone();
            thread::spawn(move || {
                for p in 0..sr.ram.len / PAGE {
                    // One thread goes up, the other down.
                    let p = if t == 0 { p } else { sr.ram.len / PAGE - 1 - p };
                    let a = p * PAGE + 8;
                    let want = if view_written(a / hp) && a % hp == 8 {
                        pattern(a)
                    } else {
                        0
                    };
                    assert_eq!(sr.ram.read(a), want, "word at {a:#x}");
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let st = pager.stats();
    println!("{st}");
    let from_view = (0..n).filter(|&h| view_written(h)).count() as u64;
    assert!(st.shared_memory);
    assert!(
        st.events_minor >= from_view,
        "one MINOR fault per view-written page at least"
    );
    assert_eq!(
        st.continued,
        from_view * hp,
        "each view-written page continued once"
    );
    let populated = st.populated_4k + st.populated_2m;
    assert_eq!(
        populated + st.continued,
        sr.ram.len,
        "every page filled or continued once"
    );
    let (installs, mapped) = match page {
        PageSize::Size4K => (st.stage2.installs_4k, st.stage2.mapped_4k),
        _ => (st.stage2.installs_2m, st.stage2.mapped_2m),
    };
    assert_eq!(installs, n, "one stage2 install per host page");
    assert_eq!(mapped, n);
    assert_eq!(st.fatal, 0);
    pager.stop();
}

#[test]
fn shmem_4k_minor_faults_are_continued_and_missing_faults_filled() {
    let Some(sr) = SharedRam::new(4 << 20, false) else {
        return;
    };
    minor_and_missing(sr, PageSize::Size4K);
}

#[test]
fn hugetlb_2m_memfd_minor_faults_are_continued_and_missing_faults_filled() {
    let Some(sr) = SharedRam::new(16 << 20, true) else {
        return;
    };
    minor_and_missing(sr, PageSize::Size2M);
}

fn punch_reclaim(sr: SharedRam, page: PageSize) {
    let hp = page.bytes();
    let pager = Pager::start_shared(&[sr.shared_region()], page, cfg(false)).unwrap();
    let ram = &sr.ram;
    for p in 0..ram.len / PAGE {
        ram.write(p * PAGE, pattern(p * PAGE));
    }
    let before = pager.stats();
    let leaves = before.stage2.mapped_4k + before.stage2.mapped_2m;
    // Reclaim the second half.
    let (gpa, len) = (ram.len / 2, ram.len / 2);
    let rep = pager.reclaim(gpa, len).unwrap();
    let after = pager.stats();
    println!("{after}");
    assert_eq!(after.hole_punches, 1);
    assert_eq!(after.reclaims, 1);
    assert_eq!(after.reclaimed_bytes, len);
    assert_eq!(
        rep.zapped as u64,
        len / hp,
        "one stage2 leaf per host page zapped"
    );
    assert_eq!(
        after.stage2.mapped_4k + after.stage2.mapped_2m,
        leaves - len / hp
    );
    assert_eq!(after.stage2.invalidations, before.stage2.invalidations + 1);
    assert!(pager.stage2().translate(gpa, Access::Read).is_err());
    // The file lost the pages (read with pread: a read through a mapping would allocate a page
    // in the hole), the first half is untouched.
    assert!(!pager.is_populated(gpa));
    let file_word = |off: u64| {
        let mut b = [0u8; 8];
        sr.file.read_exact_at(&mut b, off).unwrap();
        u64::from_ne_bytes(b)
    };
    assert_eq!(file_word(gpa), 0);
    assert_eq!(file_word(0), pattern(0));
    assert!(!pager.is_populated(gpa), "pread allocated nothing");
    // The guest's next access faults (MISSING: the file has no page) and reads zero; so does
    // the host view afterwards.
    for p in (gpa..gpa + len).step_by(PAGE as usize) {
        assert_eq!(ram.read(p), 0, "{p:#x} after the punch");
    }
    for p in (0..gpa).step_by(PAGE as usize) {
        assert_eq!(ram.read(p), pattern(p));
    }
    let refault = pager.stats();
    assert_eq!(sr.view_read(gpa), 0);
    assert_eq!(
        refault.events_missing - after.events_missing,
        if page == PageSize::Size4K {
            // Fault-around: one fault per 16 pages.
            len / PAGE / 16
        } else {
            len / hp
        }
    );
    let installs = |s: &vmm::pager::PagingStats| s.stage2.installs_4k + s.stage2.installs_2m;
    assert_eq!(
        installs(&refault) - installs(&after),
        len / hp,
        "each refault installed once"
    );
    assert_eq!(refault.stage2.mapped_4k + refault.stage2.mapped_2m, leaves);
    assert!(pager.stage2().translate(gpa, Access::Read).is_ok());
    // Misaligned or outside ranges are refused as on private memory.
    assert!(pager.reclaim(gpa + 1, hp).is_err());
    assert!(pager.reclaim(ram.len, hp).is_err());
    pager.stop();
}

#[test]
fn shmem_4k_punch_hole_reclaim_then_refault_reads_zero() {
    let Some(sr) = SharedRam::new(4 << 20, false) else {
        return;
    };
    punch_reclaim(sr, PageSize::Size4K);
}

#[test]
fn hugetlb_2m_memfd_punch_hole_reclaim_then_refault_reads_zero() {
    let Some(sr) = SharedRam::new(16 << 20, true) else {
        return;
    };
    punch_reclaim(sr, PageSize::Size2M);
}

#[test]
fn dirty_logging_on_shmem_sees_guest_writes() {
    let Some(sr) = SharedRam::new(4 << 20, false) else {
        return;
    };
    let pager = Pager::start_shared(&[sr.shared_region()], PageSize::Size4K, cfg(true)).unwrap();
    let ram = &sr.ram;
    for p in 0..ram.len / PAGE {
        ram.write(p * PAGE, 1);
    }
    // A page only the host view wrote, then read by the guest: continued write-protected.
    pager.start_dirty_log().unwrap();
    let bm = pager.harvest_dirty(0, ram.len).unwrap();
    assert!(bm.is_empty(), "no write since start");
    ram.write(5 * PAGE, 2);
    ram.write(700 * PAGE + 8, 3);
    let bm = pager.harvest_dirty(0, ram.len).unwrap();
    let dirty: Vec<u64> = bm.iter().map(|gpa| gpa / PAGE).collect();
    assert_eq!(dirty, vec![5, 700]);
    ram.write(5 * PAGE, 4);
    let bm = pager.harvest_dirty(0, ram.len).unwrap();
    assert_eq!(bm.words()[0], 1 << 5, "protected again after the harvest");
    pager.stop_dirty_log().unwrap();
    pager.stop();
}

/// Serves [`pattern`] for every word.
struct PatternSource;

impl vmm::pager::PageSource for PatternSource {
    fn fetch(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&pattern(gpa + 8 * i as u64).to_ne_bytes());
        }
        Ok(())
    }
}

/// Postcopy's destination on shared memory: MISSING faults are filled from the page source
/// (UFFDIO_COPY into the file), pages the host view wrote are continued, never fetched.
fn source_fills(sr: SharedRam, page: PageSize) {
    let hp = page.bytes();
    let pager = Pager::start_shared(&[sr.shared_region()], page, cfg(false)).unwrap();
    pager.set_page_source(Some(Arc::new(PatternSource)));
    // Host page 1 is in the file already, with other contents.
    sr.view_write(hp, 77);
    for p in 0..sr.ram.len / PAGE {
        let a = p * PAGE + 16;
        let want = if a / hp == 1 { 0 } else { pattern(a) };
        assert_eq!(sr.ram.read(a), want, "word at {a:#x}");
    }
    assert_eq!(sr.ram.read(hp), 77);
    let st = pager.stats();
    println!("{st}");
    assert_eq!(st.continued, hp);
    assert_eq!(st.populated_4k + st.populated_2m, sr.ram.len - hp);
    assert_eq!(
        st.stage2.installs_4k + st.stage2.installs_2m,
        sr.ram.len / hp
    );
    // The file holds the fetched data: the host view reads it.
    assert_eq!(sr.view_read(3 * hp + 16), pattern(3 * hp + 16));
    pager.stop();
}

#[test]
fn shmem_4k_missing_faults_are_filled_from_the_page_source() {
    let Some(sr) = SharedRam::new(4 << 20, false) else {
        return;
    };
    source_fills(sr, PageSize::Size4K);
}

#[test]
fn hugetlb_2m_memfd_missing_faults_are_filled_from_the_page_source() {
    let Some(sr) = SharedRam::new(16 << 20, true) else {
        return;
    };
    source_fills(sr, PageSize::Size2M);
}
