//! The pager with a page source (postcopy's data path) against the real kernel: faults filled from
//! the source, `place` racing faults on the same pages, `place` on present pages, a failing source.
//! Real userfaultfd, real threads standing in for vCPUs; hugetlb tests skip with a reason when the
//! 2 MiB pool cannot give the pages.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use stage2::{Access, PageSize};
use vmm::pager::{PageSource, Pager, PagingError};

use super::util::{cfg, paged, xorshift, Ram, HUGE_2M, PAGE};

/// The source's contents of the word at `gpa` (never zero, different for every word).
fn pattern(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

fn fill_pattern(gpa: u64, buf: &mut [u8]) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern(gpa + 8 * i as u64).to_ne_bytes());
    }
}

/// A source that serves [`pattern`] and records what it was asked for.
#[derive(Default)]
struct PatternSource {
    fetches: AtomicU64,
    bytes: AtomicU64,
    /// (gpa, len) of every fetch.
    asked: Mutex<Vec<(u64, u64)>>,
    /// Fail every fetch with this reason.
    fail: Option<String>,
}

impl PageSource for PatternSource {
    fn fetch(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.asked.lock().unwrap().push((gpa, buf.len() as u64));
        if let Some(why) = &self.fail {
            return Err(why.clone());
        }
        fill_pattern(gpa, buf);
        Ok(())
    }
}

/// Every 4 KiB page of `[0, len)` reads the source's pattern (first, last and a middle word).
fn assert_pattern(ram: &Ram, len: u64) {
    for p in (0..len).step_by(PAGE as usize) {
        for w in [0, 256, 511] {
            let a = p + w * 8;
            assert_eq!(ram.read(a), pattern(a), "word at {a:#x}");
        }
    }
}

/// `threads` threads read `per_thread` random words each and check them against the pattern.
fn read_random(ram: &Arc<Ram>, threads: usize, per_thread: usize) {
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let ram = ram.clone();
            thread::spawn(move || {
                let mut seed = 0x2545_f491_4f6c_dd1d ^ ((t as u64 + 1) * 0x1357_9bdf);
                for _ in 0..per_thread {
                    let a = (xorshift(&mut seed) % (ram.len / 8)) * 8;
                    assert_eq!(ram.read(a), pattern(a), "word at {a:#x}");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

#[test]
fn faults_on_4k_backing_read_the_source_bytes_fetched_in_fault_around_runs() {
    let Some((ram, pager)) = paged(16 << 20, false, cfg(2, 16)) else {
        return;
    };
    let src = Arc::new(PatternSource::default());
    pager.set_page_source(Some(src.clone()));
    read_random(&ram, 3, 3000);
    let st = pager.stats();
    println!("{st}");
    // Every fetch is a run of whole 4 KiB pages, at most the fault-around window, and nothing
    // was fetched twice.
    let asked = src.asked.lock().unwrap().clone();
    let mut pages = std::collections::HashSet::new();
    for &(gpa, len) in &asked {
        assert_eq!(gpa % PAGE, 0);
        assert!(len > 0 && len % PAGE == 0 && len <= 16 * PAGE, "{len:#x}");
        for p in (gpa..gpa + len).step_by(PAGE as usize) {
            assert!(pages.insert(p), "page {p:#x} fetched twice");
        }
    }
    assert!(
        asked.iter().any(|&(_, l)| l > PAGE),
        "fault-around never used"
    );
    assert_eq!(st.populated_4k, src.bytes.load(Ordering::Relaxed));
    assert_eq!(st.stage2.installs_4k, pages.len() as u64);
    // Every fetched page holds the source's bytes; pages never fetched are not there.
    for p in (0..ram.len).step_by(PAGE as usize) {
        if pages.contains(&p) {
            assert!(ram.present(p));
            assert_eq!(ram.read(p + 8), pattern(p + 8));
        } else {
            assert!(!pager.is_populated(p), "{p:#x} present but never fetched");
        }
    }
    // Back to zero fill.
    pager.set_page_source(None);
    let fresh = (0..ram.len)
        .step_by(PAGE as usize)
        .find(|p| !pages.contains(p))
        .unwrap();
    assert_eq!(ram.read(fresh), 0);
    pager.stop();
}

#[test]
fn faults_on_2m_hugetlb_read_the_source_bytes_one_huge_page_per_fetch() {
    let Some((ram, pager)) = paged(32 << 20, true, cfg(2, 16)) else {
        return;
    };
    let src = Arc::new(PatternSource::default());
    pager.set_page_source(Some(src.clone()));
    read_random(&ram, 3, 400);
    let st = pager.stats();
    println!("{st}");
    let asked = src.asked.lock().unwrap().clone();
    for &(gpa, len) in &asked {
        assert_eq!(
            (gpa % HUGE_2M, len),
            (0, HUGE_2M),
            "one whole huge page per fetch"
        );
    }
    assert_eq!(
        st.stage2.installs_2m,
        asked.len() as u64,
        "one install per fetch"
    );
    assert_eq!(st.populated_2m, asked.len() as u64 * HUGE_2M);
    assert_eq!(ram.len / HUGE_2M, 16);
    // 1200 random reads over 16 huge pages touch them all.
    assert_eq!(asked.len(), 16);
    assert_pattern(&ram, ram.len);
    pager.stop();
}

/// Two placers place every chunk of `chunk` bytes (in different orders) while `readers` threads
/// fault random words; the fault path fetches from the same source.
fn place_races_faults(ram: &Arc<Ram>, page: PageSize, chunk: u64, readers: usize, reads: usize) {
    let pager = Arc::new(Pager::start_with_regions(&[ram.region()], page, cfg(2, 16)).unwrap());
    let src = Arc::new(PatternSource::default());
    pager.set_page_source(Some(src.clone()));
    let chunks = ram.len / chunk;
    let placed = Arc::new(AtomicU64::new(0));
    let present = Arc::new(AtomicU64::new(0));
    let placers: Vec<_> = (0..2u64)
        .map(|t| {
            let (pager, placed, present) = (pager.clone(), placed.clone(), present.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; chunk as usize];
                for i in 0..chunks {
                    // One placer goes up, the other down: they meet in the middle.
                    let c = if t == 0 { i } else { chunks - 1 - i };
                    let gpa = c * chunk;
                    fill_pattern(gpa, &mut buf);
                    if pager.place(gpa, &buf).unwrap() {
                        placed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        present.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    read_random(ram, readers, reads);
    for p in placers {
        p.join().unwrap();
    }
    let st = pager.stats();
    println!("{st}");
    println!(
        "place: {} placed, {} already present; source: {} fetches",
        placed.load(Ordering::Relaxed),
        present.load(Ordering::Relaxed),
        src.fetches.load(Ordering::Relaxed)
    );
    assert_pattern(ram, ram.len);
    // Each host page was populated exactly once (by a fault fill or by a place) and installed
    // in stage2 exactly once.
    let host_pages = ram.len / page.bytes();
    let (installs, mapped, populated) = match page {
        PageSize::Size4K => (st.stage2.installs_4k, st.stage2.mapped_4k, st.populated_4k),
        PageSize::Size2M => (st.stage2.installs_2m, st.stage2.mapped_2m, st.populated_2m),
        PageSize::Size1G => unreachable!(),
    };
    assert_eq!(installs, host_pages, "one install per host page");
    assert_eq!(mapped, host_pages);
    assert_eq!(populated, ram.len, "every byte populated exactly once");
    assert_eq!(st.fatal, 0);
    assert_eq!(st.deferred_dropped, 0);
    assert!(
        placed.load(Ordering::Relaxed) > 0,
        "no place ever won a race"
    );
    Arc::try_unwrap(pager).unwrap().stop();
}

#[test]
fn place_racing_faults_on_4k_pages_installs_each_page_once_with_the_source_bytes() {
    for round in 0..3 {
        let Some(ram) = Ram::new(8 << 20, false) else {
            return;
        };
        println!("round {round}");
        place_races_faults(&Arc::new(ram), PageSize::Size4K, 4 * PAGE, 3, 2000);
    }
}

#[test]
fn place_racing_faults_on_2m_pages_installs_each_page_once_with_the_source_bytes() {
    let Some(ram) = Ram::new(32 << 20, true) else {
        return;
    };
    place_races_faults(&Arc::new(ram), PageSize::Size2M, HUGE_2M, 3, 200);
}

#[test]
fn place_on_a_present_page_returns_false_and_does_not_overwrite() {
    let Some((ram, pager)) = paged(4 << 20, false, cfg(1, 1)) else {
        return;
    };
    let mut data = vec![0u8; 2 * PAGE as usize];
    fill_pattern(0x10_0000, &mut data);
    // A fresh page: placed, readable, recorded in stage2; nothing was fetched (no source).
    assert!(!pager.is_populated(0x10_0000));
    assert!(pager.place(0x10_0000, &data).unwrap());
    assert!(pager.is_populated(0x10_0000) && pager.is_populated(0x10_1000));
    assert_eq!(ram.read(0x10_1008), pattern(0x10_1008));
    assert!(pager.stage2().translate(0x10_1000, Access::Write).is_ok());
    let installs = pager.stats().stage2.installs_4k;
    assert_eq!(installs, 2);
    // Placing again: present, nothing written.
    ram.write(0x10_0000, 7);
    assert!(!pager.place(0x10_0000, &data).unwrap());
    assert_eq!(ram.read(0x10_0000), 7, "place overwrote a present page");
    // A page the guest touched (zero fill) is not overwritten either.
    assert_eq!(ram.read(0x20_0000), 0);
    fill_pattern(0x20_0000, &mut data);
    assert!(!pager.place(0x20_0000, &data[..PAGE as usize]).unwrap());
    assert_eq!(ram.read(0x20_0008), 0);
    // A run with a present page in the middle: the missing pages around it are placed.
    assert_eq!(ram.read(0x30_1000), 0);
    let mut run = vec![0u8; 3 * PAGE as usize];
    fill_pattern(0x30_0000, &mut run);
    assert!(pager.place(0x30_0000, &run).unwrap());
    assert_eq!(ram.read(0x30_0000), pattern(0x30_0000));
    assert_eq!(ram.read(0x30_1008), 0, "the present middle page is kept");
    assert_eq!(ram.read(0x30_2000), pattern(0x30_2000));
    assert_eq!(pager.stats().stage2.installs_4k, installs + 4);
    // Bad ranges are refused with the reason.
    assert!(matches!(
        pager.place(0x123, &data[..PAGE as usize]),
        Err(PagingError::Unaligned { .. })
    ));
    assert!(matches!(
        pager.place(0, &data[..100]),
        Err(PagingError::Unaligned { .. })
    ));
    assert!(matches!(
        pager.place(4 << 20, &data[..PAGE as usize]),
        Err(PagingError::OutsideRam { .. })
    ));
    assert!(matches!(
        pager.place(0, &[]),
        Err(PagingError::EmptyRange { .. })
    ));
    pager.stop();
}

#[test]
fn a_failing_source_stops_the_vm_through_on_fatal() {
    let Some((ram, pager)) = paged(4 << 20, false, cfg(1, 4)) else {
        return;
    };
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    pager.on_fatal(move |why| {
        let _ = tx.lock().unwrap().send(why.to_string());
    });
    pager.set_page_source(Some(Arc::new(PatternSource {
        fail: Some("connection to the migration source lost".into()),
        ..PatternSource::default()
    })));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (ram, done) = (ram.clone(), done.clone());
        thread::spawn(move || {
            let v = ram.read(0x4000);
            done.store(true, Ordering::SeqCst);
            v
        })
    };
    let why = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        why.contains("connection to the migration source lost"),
        "{why}"
    );
    assert!(why.contains("0x4000"), "{why}");
    // The vCPU stays blocked: it was not woken onto a page that is not there.
    thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst));
    assert_eq!(pager.stats().fatal, 1);
    // Stopping the pager closes the userfaultfd; the kernel then resolves the fault itself.
    pager.stop();
    assert_eq!(reader.join().unwrap(), 0);
}
