//! Dropping guest ranges under a running test guest: the reclaim-sequence handshake that
//! keeps the `stress` guest's verification exact, and the reclaim-storm thread.
//!
//! Every drop is bracketed by two increments of `Params::reclaim_seq` in guest memory
//! (odd while the drop runs). The stores are SeqCst (`xchg` on x86), so they are
//! globally visible before the host starts zapping and after it has finished; a guest
//! that finds a zeroed page and then reads the sequence unchanged and even knows no
//! reclaim can explain it, and reports FAIL.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_tests::params::PAGE_SIZE;
use log::{info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::LOW_RESERVED;

/// Drops the host memory behind a guest range (the pager's reclaim, or a plain madvise);
/// returns a JSON report of what it did.
pub type DropFn = dyn Fn(u64, u64) -> anyhow::Result<serde_json::Value> + Send + Sync;

/// Errors a reclaim request can have; the text says what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// Not aligned to the backing's page size, or empty.
    #[error("reclaim range {gpa:#x}+{len:#x} is empty or not aligned to the backing's {page:#x}-byte pages: give a gpa and a non-zero length that are multiples of {page:#x}")]
    Unaligned {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Backing page size.
        page: u64,
    },
    /// Outside RAM or crossing a hole.
    #[error("reclaim range {gpa:#x}+{len:#x} is not inside one RAM region {regions:x?}")]
    OutsideRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// The RAM regions (gpa, len).
        regions: Vec<(u64, u64)>,
    },
    /// Touches the guest's code, tables and stacks.
    #[error("reclaim range {gpa:#x}+{len:#x} overlaps the test guest's code, page tables and stacks below {LOW_RESERVED:#x}: reclaim slice memory only")]
    Reserved {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The drop itself failed.
    #[error("reclaim of {gpa:#x}+{len:#x} failed: {source}")]
    Drop {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Cause.
        source: anyhow::Error,
    },
}

/// Reclaims guest ranges with the sequence handshake.
pub struct Reclaimer {
    mem: GuestMemoryMmap,
    seq_gpa: u64,
    regions: Vec<(u64, u64)>,
    page: u64,
    drop_range: Box<DropFn>,
    lock: Mutex<()>,
    done: AtomicU64,
    bytes: AtomicU64,
}

impl Reclaimer {
    /// A reclaimer over RAM `regions` of backing page size `page`, bumping the sequence at
    /// `seq_gpa` around each call of `drop_range`.
    pub fn new(
        mem: GuestMemoryMmap,
        seq_gpa: u64,
        regions: Vec<(u64, u64)>,
        page: u64,
        drop_range: Box<DropFn>,
    ) -> Reclaimer {
        Reclaimer {
            mem,
            seq_gpa,
            regions,
            page,
            drop_range,
            lock: Mutex::new(()),
            done: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Checks a request without doing it.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), ReclaimError> {
        if len == 0 || (gpa | len) & (self.page.max(PAGE_SIZE) - 1) != 0 {
            return Err(ReclaimError::Unaligned {
                gpa,
                len,
                page: self.page,
            });
        }
        let end = gpa.checked_add(len);
        let inside =
            end.is_some_and(|end| self.regions.iter().any(|&(r, l)| gpa >= r && end <= r + l));
        if !inside {
            return Err(ReclaimError::OutsideRam {
                gpa,
                len,
                regions: self.regions.clone(),
            });
        }
        if gpa < LOW_RESERVED {
            return Err(ReclaimError::Reserved { gpa, len });
        }
        Ok(())
    }

    /// Drops `[gpa, gpa + len)`, telling the guest through the reclaim sequence.
    pub fn reclaim(&self, gpa: u64, len: u64) -> Result<serde_json::Value, ReclaimError> {
        self.check(gpa, len)?;
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let seq: u64 = self
            .mem
            .load(GuestAddress(self.seq_gpa), Ordering::SeqCst)
            .expect("the parameter block is in RAM");
        self.store_seq(seq.wrapping_add(1));
        let result = (self.drop_range)(gpa, len);
        self.store_seq(seq.wrapping_add(2));
        let report = result.map_err(|source| ReclaimError::Drop { gpa, len, source })?;
        self.done.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(report)
    }

    fn store_seq(&self, value: u64) {
        self.mem
            .store(value, GuestAddress(self.seq_gpa), Ordering::SeqCst)
            .expect("the parameter block is in RAM");
    }

    /// Reclaims done and bytes dropped so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// `madvise(MADV_DONTNEED)` over the host mapping of a guest range: the next guest access
/// gets a fresh zero page (private anonymous and hugetlb mappings alike); KVM's mmu
/// notifier drops its own mappings of the range.
pub fn madvise_dontneed(host_addr: u64, len: u64) -> anyhow::Result<serde_json::Value> {
    // SAFETY: the caller passes a range inside guest RAM's own mapping; MADV_DONTNEED
    // only replaces its contents with zero pages, which is what a reclaim means, and
    // no Rust reference into guest RAM is held across the call.
    let rc = unsafe {
        libc::madvise(
            host_addr as *mut libc::c_void,
            len as usize,
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "madvise(MADV_DONTNEED): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(serde_json::json!({ "dropped_bytes": len }))
}

/// A thread that reclaims `ranges` round robin, one every `interval`, until stopped or
/// `count` reclaims are done.
pub struct Storm {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Storm {
    /// Starts the storm.
    pub fn start(
        reclaimer: Arc<Reclaimer>,
        ranges: Vec<(u64, u64)>,
        count: u64,
        interval: Duration,
    ) -> std::io::Result<Storm> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("reclaim-storm".into())
            .spawn(move || {
                let mut done = 0;
                for &(gpa, len) in ranges.iter().cycle() {
                    if done >= count || flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(interval);
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    match reclaimer.reclaim(gpa, len) {
                        Ok(_) => info!("reclaim storm: dropped {gpa:#x}+{len:#x}"),
                        Err(e) => warn!("reclaim storm: {e}"),
                    }
                    done += 1;
                }
                done
            })?;
        Ok(Storm {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the storm; returns how many reclaims it made.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reclaimer(log: Arc<Mutex<Vec<(u64, u64, u64)>>>) -> Reclaimer {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let seen = mem.clone();
        Reclaimer::new(
            mem,
            0x1000,
            vec![(0, 8 << 20)],
            PAGE_SIZE,
            Box::new(move |gpa, len| {
                let seq: u64 = seen.read_obj(GuestAddress(0x1000)).unwrap();
                log.lock().unwrap().push((gpa, len, seq));
                Ok(serde_json::Value::Null)
            }),
        )
    }

    #[test]
    fn sequence_is_odd_during_the_drop_and_even_after() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let r = reclaimer(log.clone());
        r.reclaim(LOW_RESERVED, 0x2000).unwrap();
        r.reclaim(LOW_RESERVED + 0x2000, 0x1000).unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                (LOW_RESERVED, 0x2000, 1),
                (LOW_RESERVED + 0x2000, 0x1000, 3)
            ]
        );
        let after: u64 = r.mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(after, 4);
        assert_eq!(r.totals(), (2, 0x3000));
    }

    #[test]
    fn bad_ranges_are_refused_without_touching_the_sequence() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let r = reclaimer(log.clone());
        assert!(matches!(
            r.reclaim(LOW_RESERVED + 1, 0x1000),
            Err(ReclaimError::Unaligned { .. })
        ));
        assert!(matches!(
            r.reclaim(LOW_RESERVED, 0),
            Err(ReclaimError::Unaligned { .. })
        ));
        assert!(matches!(
            r.reclaim(7 << 20, 2 << 20),
            Err(ReclaimError::OutsideRam { .. })
        ));
        assert!(matches!(
            r.reclaim(!0xfff, 0x1000),
            Err(ReclaimError::OutsideRam { .. })
        ));
        let e = r.reclaim(0, 0x1000).unwrap_err();
        assert!(e.to_string().contains("slice memory only"), "{e}");
        assert!(log.lock().unwrap().is_empty());
        let seq: u64 = r.mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(seq, 0);
    }
}
