//! The userfaultfd layer against the real kernel: real fds, real memory, real faulting threads.
//! No KVM needed. Hugetlb tests skip with a reason when the 2 MiB pool has no free page.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vmm::uffd::*;

const PAGE: u64 = 4096;
const HUGE_2M: u64 = 2 << 20;

/// An anonymous mapping unmapped on drop.
struct Mapping {
    addr: u64,
    len: u64,
}

impl Mapping {
    fn new(len: u64, extra_flags: i32) -> std::io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses; no existing memory
        // is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: p as u64,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: the tests only read addresses inside their own live mappings.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

fn write_u64(addr: u64, v: u64) {
    // SAFETY: the tests only write addresses inside their own live mappings.
    unsafe { std::ptr::write_volatile(addr as *mut u64, v) }
}

/// Waits for the next batch of events, failing the test after 10 s.
fn next_events(uffd: &Uffd) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut evs = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no userfaultfd event within 10 s"
        );
        if uffd.poll_readable(100).unwrap() && uffd.read_events(&mut evs, 16).unwrap() > 0 {
            return evs;
        }
    }
}

fn copy_from(uffd: &Uffd, dst: u64, buf: &[u8], mode: u64) -> Result<u64, UffdError> {
    // SAFETY: `buf` is a live slice for the duration of the call.
    unsafe { uffd.copy(dst, buf.as_ptr() as u64, buf.len() as u64, mode) }
}

#[test]
fn zeropage_and_copy_resolve_missing_faults_of_a_touching_thread() {
    let uffd = Uffd::new(UFFD_FEATURE_THREAD_ID, 0).unwrap();
    let m = Mapping::new(4 * PAGE, 0).unwrap();
    let ioctls = uffd
        .register(m.addr, m.len, UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    assert!(ioctls.zeropage() && ioctls.copy() && ioctls.wake());
    let base = m.addr;
    let toucher_tid = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let t = toucher_tid.clone();
    let toucher = thread::spawn(move || {
        // SAFETY: gettid has no arguments and cannot fail.
        t.store(unsafe { libc::gettid() } as u32, Ordering::SeqCst);
        (read_u64(base), read_u64(base + PAGE + 8))
    });

    let pattern: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8 + 1).collect();
    let mut faults = Vec::new();
    while faults.len() < 2 {
        for ev in next_events(&uffd) {
            let Event::Pagefault {
                addr, write, tid, ..
            } = ev
            else {
                panic!("unexpected event {ev:?}");
            };
            assert!(!write, "the toucher only reads");
            assert_eq!(
                tid,
                toucher_tid.load(Ordering::SeqCst),
                "THREAD_ID names the toucher"
            );
            faults.push(addr);
            if addr == base {
                assert_eq!(uffd.zeropage(base, PAGE, 0).unwrap(), PAGE);
            } else {
                assert_eq!(addr, base + PAGE, "fault on an untouched page");
                assert_eq!(copy_from(&uffd, addr, &pattern, 0).unwrap(), PAGE);
            }
        }
    }
    let (zero, copied) = toucher.join().unwrap();
    assert_eq!(zero, 0, "zeropage gives zeroes");
    assert_eq!(
        copied,
        u64::from_le_bytes(pattern[8..16].try_into().unwrap()),
        "copy gives the source content"
    );
    assert_eq!(faults, vec![base, base + PAGE]);
}

#[test]
fn double_copy_and_zeropage_over_a_present_page_are_eexist() {
    let uffd = Uffd::new(0, 0).unwrap();
    let m = Mapping::new(2 * PAGE, 0).unwrap();
    uffd.register(m.addr, m.len, UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    let buf = vec![7u8; PAGE as usize];
    copy_from(&uffd, m.addr, &buf, UFFDIO_COPY_MODE_DONTWAKE).unwrap();
    assert!(matches!(
        copy_from(&uffd, m.addr, &buf, UFFDIO_COPY_MODE_DONTWAKE),
        Err(UffdError::Exists { addr }) if addr == m.addr
    ));
    assert!(matches!(
        uffd.zeropage(m.addr, PAGE, UFFDIO_ZEROPAGE_MODE_DONTWAKE),
        Err(UffdError::Exists { .. })
    ));
    // A range whose second page is present stops there: the first page is done, and the
    // kernel reports the partial result as EAGAIN with the bytes done.
    let m2 = Mapping::new(2 * PAGE, 0).unwrap();
    uffd.register(m2.addr, m2.len, UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    copy_from(&uffd, m2.addr + PAGE, &buf, UFFDIO_COPY_MODE_DONTWAKE).unwrap();
    match uffd.zeropage(m2.addr, 2 * PAGE, UFFDIO_ZEROPAGE_MODE_DONTWAKE) {
        Err(UffdError::Again { done, .. }) => assert_eq!(done, PAGE),
        other => panic!("expected a partial zeropage, got {other:?}"),
    }
    assert_eq!(read_u64(m2.addr), 0);
    assert_eq!(read_u64(m2.addr + PAGE), 0x0707_0707_0707_0707);
}

#[test]
fn hugetlb_copy_fills_the_whole_2m_page_with_one_fault() {
    let uffd = Uffd::new(UFFD_FEATURE_MISSING_HUGETLBFS, 0).unwrap();
    let m = match Mapping::new(HUGE_2M, libc::MAP_HUGETLB) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipping: no free 2 MiB huge page ({e}); reserve some in /proc/sys/vm/nr_hugepages");
            return;
        }
    };
    let ioctls = uffd
        .register(m.addr, m.len, UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    assert!(ioctls.copy());
    assert!(!ioctls.zeropage(), "hugetlbfs offers no UFFDIO_ZEROPAGE");
    let base = m.addr;
    // Touch in the middle first, then every 4 KiB page.
    let toucher = thread::spawn(move || {
        let mut v = vec![read_u64(base + 7 * PAGE)];
        for i in 0..HUGE_2M / PAGE {
            v.push(read_u64(base + i * PAGE));
        }
        v
    });
    let evs = next_events(&uffd);
    assert_eq!(evs.len(), 1);
    let Event::Pagefault { addr, .. } = evs[0] else {
        panic!("unexpected event {:?}", evs[0]);
    };
    assert_eq!(addr & !(HUGE_2M - 1), base, "fault inside the huge page");
    // The source: page i holds the value i in its first word.
    let mut src = vec![0u8; HUGE_2M as usize];
    for i in 0..HUGE_2M / PAGE {
        let o = (i * PAGE) as usize;
        src[o..o + 8].copy_from_slice(&i.to_le_bytes());
    }
    // A copy smaller than the huge page is refused.
    assert!(copy_from(
        &uffd,
        base,
        &src[..PAGE as usize],
        UFFDIO_COPY_MODE_DONTWAKE
    )
    .is_err());
    assert_eq!(copy_from(&uffd, base, &src, 0).unwrap(), HUGE_2M);
    let seen = toucher.join().unwrap();
    assert_eq!(seen[0], 7);
    for (i, v) in seen[1..].iter().enumerate() {
        assert_eq!(*v, i as u64, "4 KiB page {i} of the huge page");
    }
    // No other fault came: the one copy populated every 4 KiB of the huge page.
    let mut evs = Vec::new();
    assert_eq!(uffd.read_events(&mut evs, 16).unwrap(), 0, "{evs:?}");
}

#[test]
fn write_protect_raises_a_wp_fault_and_unprotect_wakes_the_writer() {
    let uffd = Uffd::new(UFFD_FEATURE_PAGEFAULT_FLAG_WP, 0).unwrap();
    let m = Mapping::new(PAGE, 0).unwrap();
    let ioctls = uffd
        .register(
            m.addr,
            m.len,
            UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
        )
        .unwrap();
    assert!(ioctls.writeprotect());
    let buf = vec![1u8; PAGE as usize];
    copy_from(&uffd, m.addr, &buf, UFFDIO_COPY_MODE_DONTWAKE).unwrap();
    uffd.write_protect(m.addr, PAGE, true, false).unwrap();
    // Reads of a protected page do not fault.
    assert_eq!(read_u64(m.addr), 0x0101_0101_0101_0101);

    let done = Arc::new(AtomicBool::new(false));
    let (base, d) = (m.addr, done.clone());
    let writer = thread::spawn(move || {
        write_u64(base + 16, 0xdead_beef);
        d.store(true, Ordering::SeqCst);
    });
    let evs = next_events(&uffd);
    assert_eq!(
        evs,
        vec![Event::Pagefault {
            addr: base,
            write: true,
            wp: true,
            minor: false,
            tid: 0
        }]
    );
    thread::sleep(Duration::from_millis(50));
    assert!(
        !done.load(Ordering::SeqCst),
        "the writer waits while protected"
    );
    uffd.write_protect(m.addr, PAGE, false, false).unwrap();
    writer.join().unwrap();
    assert_eq!(read_u64(m.addr + 16), 0xdead_beef);
    assert_eq!(read_u64(m.addr), 0x0101_0101_0101_0101, "content kept");
}

#[test]
fn madv_dontneed_raises_remove_then_a_new_missing_fault() {
    let uffd = Uffd::new(UFFD_FEATURE_EVENT_REMOVE, 0).unwrap();
    assert_ne!(uffd.features() & UFFD_FEATURE_EVENT_REMOVE, 0);
    let m = Mapping::new(2 * PAGE, 0).unwrap();
    uffd.register(m.addr, m.len, UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    let buf = vec![9u8; PAGE as usize];
    copy_from(&uffd, m.addr, &buf, UFFDIO_COPY_MODE_DONTWAKE).unwrap();
    assert_eq!(read_u64(m.addr), 0x0909_0909_0909_0909);

    // madvise blocks until a reader takes the REMOVE event.
    let base = m.addr;
    let dropper = thread::spawn(move || {
        // SAFETY: drops the first page of the test's own mapping.
        unsafe {
            libc::madvise(
                base as *mut libc::c_void,
                PAGE as usize,
                libc::MADV_DONTNEED,
            )
        }
    });
    // While the REMOVE is pending (queued, not read), fills of the range are refused with
    // EAGAIN: the race Firecracker's handler documents. A handler must not treat it as fatal.
    assert!(uffd.poll_readable(10_000).unwrap(), "REMOVE event queued");
    match uffd.zeropage(base + PAGE, PAGE, UFFDIO_ZEROPAGE_MODE_DONTWAKE) {
        Err(UffdError::Again { done: 0, .. }) => {}
        other => panic!("expected EAGAIN while a remove is pending, got {other:?}"),
    }
    let evs = next_events(&uffd);
    assert_eq!(
        evs,
        vec![Event::Remove {
            start: base,
            end: base + PAGE
        }]
    );
    assert_eq!(dropper.join().unwrap(), 0);
    // Once read, the fill works again.
    uffd.zeropage(base + PAGE, PAGE, UFFDIO_ZEROPAGE_MODE_DONTWAKE)
        .unwrap();

    // The dropped page faults again at the next access and gets a fresh zero page.
    let toucher = thread::spawn(move || read_u64(base));
    let evs = next_events(&uffd);
    assert!(
        matches!(evs[..], [Event::Pagefault { addr, .. }] if addr == base),
        "{evs:?}"
    );
    uffd.zeropage(base, PAGE, 0).unwrap();
    assert_eq!(
        toucher.join().unwrap(),
        0,
        "a fresh zero page after the drop"
    );
}

#[test]
fn wake_lets_a_waiting_thread_fault_again() {
    let uffd = Uffd::new(0, 0).unwrap();
    let m = Mapping::new(PAGE, 0).unwrap();
    uffd.register(m.addr, m.len, UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    let base = m.addr;
    let toucher = thread::spawn(move || read_u64(base));
    let first = next_events(&uffd);
    assert_eq!(first.len(), 1);
    // Waking without filling: the thread retries the access and faults again.
    uffd.wake(base, PAGE).unwrap();
    let second = next_events(&uffd);
    assert_eq!(
        second, first,
        "the same fault is raised again after a bare wake"
    );
    uffd.zeropage(base, PAGE, 0).unwrap();
    assert_eq!(toucher.join().unwrap(), 0);
}

#[test]
fn missing_required_feature_is_named() {
    // Bit 63 is no feature of any kernel: the error must name what is missing.
    let err = Uffd::new(1 << 63, 0).unwrap_err();
    assert!(matches!(err, UffdError::MissingFeature { missing, .. } if missing == 1 << 63));
    assert!(err.to_string().contains("0x8000000000000000"), "{err}");
    assert!(Uffd::supported_features().unwrap() & UFFD_FEATURE_EVENT_REMOVE != 0);
}
