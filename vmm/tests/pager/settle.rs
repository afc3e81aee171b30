//! `Pager::settle` against the real kernel: once the writers are "paused" (kicked out of any
//! userfaultfd wait by a signal, like a vCPU leaving `KVM_RUN`), no write fault may still be
//! resolved, and no dirty bit set, after `settle` returns. Real userfaultfd, real threads
//! standing in for vCPUs (no KVM needed).
//!
//! The pause is a signal whose handler parks the thread until the resume: a writer blocked in
//! `handle_userfault` returns from the fault (its message dropped if unread, or left in a
//! handler's hands if read) and waits in the handler, out of the fault, exactly as a vCPU
//! kicked out of `KVM_RUN` waits in the VMM.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use stage2::{Bitmap, PageSize};
use vmm::pager::{PageSource, Pager, PagingError};

use super::util::{paged, tracking_cfg, xorshift, Ram, PAGE};

/// Writer threads (the "vCPUs").
const WRITERS: usize = 4;
/// Guest RAM of the stress test.
const RAM_BYTES: u64 = 16 << 20;
/// Pause/settle/resume cycles.
const ROUNDS: usize = 300;
/// How long the writers and the harvester run between pauses.
const RUN_FOR: Duration = Duration::from_millis(3);
/// How long a late fault has to show up after the final harvest: several of the handlers'
/// 1 ms deferral polls.
const LATE_WINDOW: Duration = Duration::from_millis(5);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The pause signal, and the state its handler uses (a signal handler sees only statics).
const PAUSE_SIGNAL: i32 = libc::SIGUSR1;
static PAUSED: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn park(_sig: i32) {
    PARKED.fetch_add(1, Ordering::SeqCst);
    while PAUSED.load(Ordering::SeqCst) {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000,
        };
        // SAFETY: nanosleep is async-signal-safe; `ts` lives for the call.
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    }
    PARKED.fetch_sub(1, Ordering::SeqCst);
}

fn install_pause_handler() {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value to fill in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = park as *const () as usize;
    // No SA_RESTART: a thread waiting for a fault must leave it, as a kicked vCPU does.
    sa.sa_flags = 0;
    // SAFETY: installs a handler that only touches atomics and calls nanosleep; `sa` is valid.
    let r = unsafe { libc::sigaction(PAUSE_SIGNAL, &sa, std::ptr::null_mut()) };
    assert_eq!(r, 0, "sigaction: {}", std::io::Error::last_os_error());
}

fn dirty_pages(bm: &Bitmap) -> Vec<u64> {
    bm.iter().map(|gpa| gpa / PAGE).collect()
}

/// Whether the calling thread may harvest now (the harvester runs only while not paused).
struct Gate {
    running: Mutex<bool>,
    cv: Condvar,
}

/// Writers write random pages while a harvester keeps re-protecting them (so that write faults
/// are often deferred behind a harvest holding the dirty lock); every few milliseconds all
/// writers are paused, the harvester stopped, and then: `settle`, the final harvest, a wait,
/// and one more harvest that must be empty: a page there was set by a fault that was still in
/// flight when settle returned. Returns (rounds in which a fault was resolved while settle
/// waited, late pages): the first shows the race was exercised.
fn pause_settle_rounds(pager: Arc<Pager>, ram: Arc<Ram>) -> (usize, Vec<(usize, Vec<u64>)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..WRITERS {
        let (stop, ram) = (stop.clone(), ram.clone());
        writers.push(thread::spawn(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x2545_f491);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let page = xorshift(&mut seed) % (ram.len / PAGE);
                n += 1;
                ram.write(page * PAGE + 8 * t as u64, n);
            }
        }));
    }
    let gate = Arc::new(Gate {
        running: Mutex::new(true),
        cv: Condvar::new(),
    });
    let harvesting = Arc::new(Mutex::new(()));
    let harvester = {
        let (stop, gate, pager, harvesting) = (
            stop.clone(),
            gate.clone(),
            pager.clone(),
            harvesting.clone(),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                {
                    let mut run = gate.running.lock().unwrap();
                    while !*run && !stop.load(Ordering::Relaxed) {
                        run = gate.cv.wait(run).unwrap();
                    }
                }
                let _h = harvesting.lock().unwrap();
                pager.harvest_dirty(0, RAM_BYTES).unwrap();
            }
        })
    };

    let mut exercised = 0;
    let mut late = Vec::new();
    for round in 0..ROUNDS {
        thread::sleep(RUN_FOR);
        // Pause: kick every writer out of whatever it does (a fault wait included) and wait
        // until all are parked.
        PAUSED.store(true, Ordering::SeqCst);
        for w in &writers {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the thread is alive (writers run until `stop`); the signal's handler is
            // installed.
            let r = unsafe { libc::pthread_kill(w.as_pthread_t(), PAUSE_SIGNAL) };
            assert_eq!(r, 0);
        }
        let t0 = Instant::now();
        while PARKED.load(Ordering::SeqCst) < WRITERS {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "writers did not park"
            );
            thread::yield_now();
        }
        // Stop harvesting (the last harvest may have deferred faults behind it).
        *gate.running.lock().unwrap() = false;
        let h = harvesting.lock().unwrap();
        let before = pager.stats();
        pager.settle(SETTLE_TIMEOUT).unwrap();
        let after = pager.stats();
        if after.relaxed + after.installed + after.spurious
            > before.relaxed + before.installed + before.spurious
        {
            exercised += 1;
        }
        pager.harvest_dirty(0, RAM_BYTES).unwrap();
        thread::sleep(LATE_WINDOW);
        let extra = dirty_pages(&pager.harvest_dirty(0, RAM_BYTES).unwrap());
        if !extra.is_empty() {
            late.push((round, extra));
        }
        // Resume.
        drop(h);
        PAUSED.store(false, Ordering::SeqCst);
        while PARKED.load(Ordering::SeqCst) > 0 {
            thread::yield_now();
        }
        *gate.running.lock().unwrap() = true;
        gate.cv.notify_all();
    }
    stop.store(true, Ordering::SeqCst);
    gate.cv.notify_all();
    for w in writers {
        w.join().unwrap();
    }
    harvester.join().unwrap();
    (exercised, late)
}

/// No dirty bit is set after `settle` returns with every writer paused, in any of
/// [`ROUNDS`] pauses taken while faults are being deferred behind harvests; and the pauses
/// did catch faults in flight (else the test would prove nothing).
#[test]
fn no_dirty_bit_lands_after_settle_with_the_writers_paused() {
    let Some(ram) = Ram::new(RAM_BYTES, false) else {
        return;
    };
    install_pause_handler();
    let ram = Arc::new(ram);
    // Every page present before tracking starts: the writers' faults are WP faults.
    for p in 0..RAM_BYTES / PAGE {
        ram.write(p * PAGE, 1);
    }
    let pager = Arc::new(
        Pager::start_with_regions(&[ram.region()], PageSize::Size4K, tracking_cfg(WRITERS))
            .unwrap(),
    );
    assert!(pager.record_present().unwrap() > 0);
    pager.start_dirty_log().unwrap();
    let (exercised, late) = pause_settle_rounds(pager.clone(), ram.clone());
    let st = pager.stats();
    eprintln!(
        "{ROUNDS} pauses: a fault was resolved while settle waited in {exercised}; \
         {} WP faults, {} deferred behind a harvest, {} harvests; late pages in {} round(s)",
        st.events_wp,
        st.wp_waited,
        st.harvests,
        late.len()
    );
    assert!(
        late.is_empty(),
        "dirty bits set after settle returned (round, pages): {:?}",
        late.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        exercised > 0,
        "no pause caught a fault in flight in {ROUNDS} rounds: the test did not exercise settle"
    );
    match Arc::try_unwrap(pager) {
        Ok(p) => p.stop(),
        Err(_) => panic!("pager still shared"),
    }
}

/// A page source that blocks until released (a postcopy source waiting for the network).
struct BlockingSource {
    released: Mutex<bool>,
    cv: Condvar,
}

impl BlockingSource {
    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

/// Releases the source when dropped, also when an assertion fails: the pager's handler
/// blocked in `fetch` must return before the pager can stop.
struct ReleaseOnDrop(Arc<BlockingSource>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl PageSource for BlockingSource {
    fn fetch(&self, _gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut r = self.released.lock().unwrap();
        while !*r {
            r = self.cv.wait(r).unwrap();
        }
        buf.fill(0x5a);
        Ok(())
    }
}

/// A fault held by a handler (here a MISSING fill blocked in its page source) keeps settle
/// waiting; past the timeout it fails with an error that says so; once the fault is resolved
/// it settles. With nothing in flight it settles at once.
#[test]
fn settle_waits_for_a_held_fault_and_times_out_with_the_reason() {
    let Some((ram, pager)) = paged(4 << 20, false, tracking_cfg(WRITERS)) else {
        return;
    };
    let t0 = Instant::now();
    pager.settle(SETTLE_TIMEOUT).unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "idle settle is quick"
    );

    let src = Arc::new(BlockingSource {
        released: Mutex::new(false),
        cv: Condvar::new(),
    });
    pager.set_page_source(Some(src.clone()));
    let release = ReleaseOnDrop(src);
    let r = ram.clone();
    let toucher = thread::spawn(move || r.read(7 * PAGE));
    // The fault is read and held once the handler is inside fetch.
    let t0 = Instant::now();
    while pager.stats().events_missing == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the fault never came"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let e = pager.settle(Duration::from_millis(50)).unwrap_err();
    assert!(
        matches!(e, PagingError::Settle { held: 1, .. }),
        "one fault held: {e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("in flight") && msg.contains("paused"), "{msg}");

    let settled = {
        let p = &pager;
        thread::scope(|s| {
            let waiter = s.spawn(move || p.settle(SETTLE_TIMEOUT));
            thread::sleep(Duration::from_millis(20));
            assert!(!waiter.is_finished(), "settle returned with the fault held");
            release.0.release();
            waiter.join().unwrap()
        })
    };
    settled.unwrap();
    assert_eq!(toucher.join().unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
    pager.stop();
}
