//! Tests of sending and receiving guest RAM through a stream.

use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::range::PAGE_BYTES;
use super::residency::{Residency, RESIDENCY_WINDOW};
use super::send::guest_page_is_zero;
use super::*;
use crate::migrate::stream::{Chunk, StreamReader, StreamWriter, PAGE_SIZE};

/// A pager over a plain mapping: places by writing, records what it was asked.
struct FakePager {
    mem: GuestMemoryMmap,
    host_page: u64,
    placed: Mutex<Vec<(u64, u64)>>,
}

impl RamPager for FakePager {
    fn host_page(&self) -> u64 {
        self.host_page
    }
    fn is_populated(&self, gpa: u64) -> bool {
        Residency::of(&self.mem, gpa / PAGE_BYTES * PAGE_BYTES, PAGE_BYTES)
            .unwrap()
            .populated(gpa)
    }
    fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, String> {
        self.placed.lock().unwrap().push((gpa, data.len() as u64));
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
        Ok(true)
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), String> {
        unreachable!("not a postcopy test")
    }
}

fn fake(pages: usize, host_page: u64) -> FakePager {
    FakePager {
        // Anonymous private memory: a page is resident only once touched.
        mem: GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), pages * PAGE_SIZE)]).unwrap(),
        host_page,
        placed: Mutex::new(Vec::new()),
    }
}

/// Data in pages 0, 1 and 5 (`page + 7` at offset 8); page 9 written but zero (populated,
/// read, found zero); the other pages of 16 never touched.
fn write_sample(mem: &GuestMemoryMmap) {
    for page in [0u64, 1, 5] {
        mem.write_obj(page + 7, GuestAddress(page * PAGE_BYTES + 8))
            .unwrap();
    }
    mem.write_obj(0u64, GuestAddress(9 * PAGE_BYTES)).unwrap();
}

/// The chunks [`write_sample`]'s 16 pages go out as.
const SAMPLE_CHUNKS: [(&str, u64, u64); 6] = [
    ("data", 0, 2),
    ("zero", 2, 3),
    ("data", 5, 1),
    ("zero", 6, 3),
    ("zero", 9, 1),
    ("zero", 10, 6),
];

/// Sends the first 16 pages of `mem`; returns the stream and the sender's counts.
fn send_sample(
    mem: &GuestMemoryMmap,
    pager: Option<&dyn RamPager>,
    guest_paused: bool,
) -> (Vec<u8>, RamSender) {
    let mut w = StreamWriter::headless(Vec::new());
    let mut s = RamSender::new();
    s.guest_paused = guest_paused;
    s.send_range(&mut w, mem, 0, 16 * PAGE_BYTES, pager)
        .unwrap();
    w.end().unwrap();
    (w.into_inner().unwrap(), s)
}

/// The 4 KiB pages among the first `pages` of `mem` that the host has.
fn resident_pages(mem: &GuestMemoryMmap, pages: u64) -> Vec<u64> {
    let res = Residency::of(mem, 0, pages * PAGE_BYTES).unwrap();
    (0..pages)
        .filter(|&i| res.populated(i * PAGE_BYTES))
        .collect()
}

/// The cursor gives each page's own residency across window and region boundaries, and
/// asking again below the last window (a new window) answers right too.
#[test]
fn residency_cursor_reads_windows_across_regions() {
    let window_pages = RESIDENCY_WINDOW / PAGE_BYTES;
    // Two regions with a hole between them; the first spans more than two windows.
    let first = (2 * window_pages + 10) * PAGE_BYTES;
    let second_at = first + (1 << 30);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), first as usize),
        (GuestAddress(second_at), 64 * PAGE_SIZE),
    ])
    .unwrap();
    let written: Vec<u64> = [0, 5, window_pages - 1, window_pages, 2 * window_pages + 9]
        .iter()
        .map(|p| p * PAGE_BYTES)
        .chain([second_at, second_at + 63 * PAGE_BYTES])
        .collect();
    for &gpa in &written {
        mem.write_obj(0x5au8, GuestAddress(gpa)).unwrap();
    }
    let mut cur = ResidencyCursor::new(&mem);
    let asked: Vec<u64> = (0..first / PAGE_BYTES)
        .step_by(3)
        .map(|p| p * PAGE_BYTES)
        .chain(written.iter().copied())
        .chain((0..64).map(|p| second_at + p * PAGE_BYTES))
        .collect();
    for gpa in asked {
        assert_eq!(
            cur.populated(gpa + 17).unwrap(),
            written.contains(&gpa),
            "page {gpa:#x}"
        );
    }
    assert!(matches!(
        cur.populated(first),
        Err(RamError::OutOfRange { .. })
    ));
}

fn chunks(bytes: &[u8]) -> Vec<(&'static str, u64, u64)> {
    let mut r = StreamReader::headless(bytes);
    let mut got = Vec::new();
    loop {
        match r.next_chunk().unwrap() {
            Chunk::Pages { gpa, data } => {
                got.push(("data", gpa / PAGE_BYTES, data.len() as u64 / PAGE_BYTES))
            }
            Chunk::ZeroPages { gpa, count } => got.push(("zero", gpa / PAGE_BYTES, count)),
            Chunk::End => return got,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// With a pager, pages the host never populated go as zero runs and are not read (a
/// read would fault them in through the pager).
#[test]
fn untouched_pages_are_sent_as_zeroes_without_reading_them() {
    let p = fake(16, PAGE_BYTES);
    // Page 9 is populated but holds zeroes: read, found zero, sent as a zero run.
    write_sample(&p.mem);
    let (bytes, _) = send_sample(&p.mem, Some(&p), false);
    assert_eq!(chunks(&bytes), SAMPLE_CHUNKS);
    let resident = resident_pages(&p.mem, 16);
    assert_eq!(resident, vec![0, 1, 5, 9], "nothing else was faulted in");
}

/// Without a pager, private memory still tells which pages were never populated: those go
/// as zero runs unread; populated pages are tested for zero in place, and only data runs
/// are sent with data (with the same header, whole-page layout and contents).
#[test]
fn private_memory_without_a_pager_sends_data_runs_only() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
    // Page 9 is populated, but zero: tested in place and sent as a zero run.
    write_sample(&mem);
    let (bytes, s) = send_sample(&mem, None, false);
    assert_eq!(chunks(&bytes), SAMPLE_CHUNKS);
    assert_eq!((s.data_pages, s.zero_pages), (3, 13));
    // With the guest paused the data goes straight from guest memory: the same stream.
    let (paused, _) = send_sample(&mem, None, true);
    assert_eq!(paused, bytes, "paused and running streams differ");
    let resident = resident_pages(&mem, 16);
    assert_eq!(resident, vec![0, 1, 5, 9], "nothing else was faulted in");

    // The receiver rebuilds the same memory, writing no zeroes over missing pages.
    let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
    let mut r = StreamReader::headless(&bytes[..]);
    let mut rx = RamReceiver::new(&dst, None);
    loop {
        let c = match r.next_chunk_into(&mut rx).unwrap() {
            crate::migrate::stream::Received::PagesInPlace { .. } => continue,
            crate::migrate::stream::Received::Chunk(c) => c,
        };
        if !rx.apply(&c).unwrap() {
            assert_eq!(c, Chunk::End);
            break;
        }
    }
    assert_eq!(rx.written, 3 * PAGE_BYTES, "the data went straight in");
    for page in [0u64, 1, 5] {
        assert_eq!(
            dst.read_obj::<u64>(GuestAddress(page * PAGE_BYTES + 8))
                .unwrap(),
            page + 7
        );
    }
    let resident = resident_pages(&dst, 16);
    assert_eq!(resident, vec![0, 1, 5], "zero runs allocated nothing");
}

/// A fresh receiver writes zeroes only over pages it wrote before; the rest read zero
/// already and are left alone (not even allocated).
#[test]
fn fresh_receiver_zeroes_only_pages_it_wrote() {
    let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
    let mut rx = RamReceiver::new(&dst, None).fresh();
    let data = vec![0xabu8; 2 * PAGE_SIZE];
    assert!(rx
        .apply(&Chunk::Pages {
            gpa: PAGE_BYTES,
            data: &data
        })
        .unwrap());
    assert!(rx.apply(&Chunk::ZeroPages { gpa: 0, count: 2 }).unwrap());
    assert_eq!(dst.read_obj::<u8>(GuestAddress(PAGE_BYTES)).unwrap(), 0);
    assert_eq!(
        dst.read_obj::<u8>(GuestAddress(2 * PAGE_BYTES)).unwrap(),
        0xab
    );
    assert!(rx
        .apply(&Chunk::ZeroPages {
            gpa: 3 * PAGE_BYTES,
            count: 13
        })
        .unwrap());
    let resident = resident_pages(&dst, 16);
    assert_eq!(resident, vec![1, 2], "only the pages data went to");
    assert!(
        rx.apply(&Chunk::ZeroPages {
            gpa: 15 * PAGE_BYTES,
            count: 2
        })
        .is_err(),
        "a zero run past guest RAM is refused"
    );
}

#[test]
fn guest_page_zero_test_sees_one_set_byte_anywhere() {
    let mut page = vec![0u64; PAGE_SIZE / 8];
    // SAFETY: a live, aligned buffer of one page.
    let zero = |p: &[u64]| unsafe { guest_page_is_zero(p.as_ptr().cast()) };
    assert!(zero(&page));
    for word in [0, 7, 8, 300, PAGE_SIZE / 8 - 1] {
        page[word] = 1 << 40;
        assert!(!zero(&page), "word {word}");
        page[word] = 0;
    }
}

/// The receiver places missing pages (runs at once on 4 KiB pages, whole zero-padded host
/// pages on huge ones), writes present ones, and skips zero runs over missing pages.
#[test]
fn receiver_places_missing_pages_and_writes_present_ones() {
    let p = fake(1024, PAGE_BYTES);
    p.mem.write_obj(1u64, GuestAddress(2 * PAGE_BYTES)).unwrap();
    let data = vec![0xabu8; 4 * PAGE_SIZE];
    let mut r = RamReceiver::new(&p.mem, Some(&p));
    // Pages 0..4: 0 and 1 missing (one place), 2 present (write), 3 missing (place).
    r.apply(&Chunk::Pages {
        gpa: 0,
        data: &data,
    })
    .unwrap();
    r.apply(&Chunk::ZeroPages {
        gpa: 100 * PAGE_BYTES,
        count: 900,
    })
    .unwrap();
    assert_eq!(
        *p.placed.lock().unwrap(),
        vec![(0, 2 * PAGE_BYTES), (3 * PAGE_BYTES, PAGE_BYTES)]
    );
    assert_eq!((r.placed, r.written), (3, PAGE_BYTES));
    let res = Residency::of(&p.mem, 100 * PAGE_BYTES, 900 * PAGE_BYTES).unwrap();
    assert!(
        (100..1000).all(|i| !res.populated(i * PAGE_BYTES)),
        "a zero run over missing pages touches nothing"
    );
    assert_eq!(
        p.mem.read_obj::<u8>(GuestAddress(2 * PAGE_BYTES)).unwrap(),
        0xab
    );

    let huge = fake(1024, 1 << 20);
    let mut r = RamReceiver::new(&huge.mem, Some(&huge));
    r.apply(&Chunk::Pages {
        gpa: 300 * PAGE_BYTES,
        data: &data[..PAGE_SIZE],
    })
    .unwrap();
    // Page 300 lies in the host page at 256 pages (1 MiB): placed whole.
    assert_eq!(*huge.placed.lock().unwrap(), vec![(1 << 20, 1 << 20)]);
    assert_eq!(
        huge.mem
            .read_obj::<u8>(GuestAddress(300 * PAGE_BYTES))
            .unwrap(),
        0xab
    );
}
