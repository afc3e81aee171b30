//! Dropping guest ranges under a running guest: the range checks and the migration gate every
//! reclaim passes, the test guests' reclaim-sequence handshake, and the reclaim-storm thread.
//!
//! With a [`Handshake`] (the built-in test guests), every drop is bracketed by two increments of `Params::reclaim_seq` in guest memory
//! (odd while the drop runs). The stores are SeqCst (`xchg` on x86), so they are
//! globally visible before the host starts zapping and after it has finished; a guest
//! that finds a zeroed page and then reads the sequence unchanged and even knows no
//! reclaim can explain it, and reports FAIL.
//!
//! A reclaim changes guest RAM behind the dirty tracker's back (the range reads zero after,
//! and the sequence word moved), so every one runs through [`HostChanges::change`]: while a
//! migration runs, the range and the sequence's page are marked for its next round; during
//! its last round, and after the guest moved away, reclaims are refused. On a postcopy
//! destination a range that still has pages owed by the source is refused too (the source's
//! copy arriving after the drop would undo it); see [`Reclaimer::refuse_owed`].

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::dirty::{HostChangeRefused, HostChanges, PAGE_SIZE};

/// A guest that is told about reclaims: the sequence word it reads, and the low memory (its
/// code, tables and stacks) that must never be reclaimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// Guest-physical address of the reclaim sequence (a u64, odd while a drop runs).
    pub seq_gpa: u64,
    /// Ranges below this address are refused.
    pub reserved_below: u64,
}

/// Drops the host memory behind a guest range (the pager's reclaim, or a plain madvise);
/// returns a JSON report of what it did.
pub type DropFn = dyn Fn(u64, u64) -> anyhow::Result<serde_json::Value> + Send + Sync;

/// Whether a guest range still has pages owed by a postcopy source.
pub type OwedFn = dyn Fn(u64, u64) -> bool + Send + Sync;

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
    #[error("reclaim range {gpa:#x}+{len:#x} overlaps the test guest's code, page tables and stacks below {below:#x}: reclaim slice memory only")]
    Reserved {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// The reserved low memory's end.
        below: u64,
    },
    /// A migration is taking guest RAM as it is, or took it away.
    #[error("reclaim of {gpa:#x}+{len:#x} refused: {why}")]
    Migrating {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Which phase refuses it.
        why: HostChangeRefused,
    },
    /// Postcopy destination: part of the range has not arrived from the source yet.
    #[error("reclaim range {gpa:#x}+{len:#x} still has pages owed by the postcopy migration source (their copy would arrive after the drop and undo it): retry once postcopy has completed, or reclaim a range whose pages have all arrived")]
    Owed {
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

/// Reclaims guest ranges, with the sequence handshake when the guest has one.
pub struct Reclaimer {
    mem: GuestMemoryMmap,
    handshake: Option<Handshake>,
    regions: Vec<(u64, u64)>,
    page: u64,
    drop_range: Box<DropFn>,
    host: Arc<HostChanges>,
    owed: Option<Box<OwedFn>>,
    lock: Mutex<()>,
    done: AtomicU64,
    bytes: AtomicU64,
}

impl Reclaimer {
    /// A reclaimer over RAM `regions` of backing page size `page`, calling `drop_range`
    /// through the migration gate `host` (and bumping the handshake's sequence around it).
    pub fn new(
        mem: GuestMemoryMmap,
        handshake: Option<Handshake>,
        regions: Vec<(u64, u64)>,
        page: u64,
        drop_range: Box<DropFn>,
        host: Arc<HostChanges>,
    ) -> Reclaimer {
        Reclaimer {
            mem,
            handshake,
            regions,
            page,
            drop_range,
            host,
            owed: None,
            lock: Mutex::new(()),
            done: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Postcopy destination: refuse ranges for which `owed` says pages are still to come
    /// from the source. Refusing is exact without a lock: pages only ever stop being owed.
    /// (Making such a reclaim "safe" instead would mean un-owing the pages, racing with the
    /// receiver placing them, for no gain: the guest's memory there is not even local yet.)
    pub fn refuse_owed(mut self, owed: Box<OwedFn>) -> Reclaimer {
        self.owed = Some(owed);
        self
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
        if let Some(h) = self.handshake.filter(|h| gpa < h.reserved_below) {
            return Err(ReclaimError::Reserved {
                gpa,
                len,
                below: h.reserved_below,
            });
        }
        Ok(())
    }

    /// Drops `[gpa, gpa + len)`, telling the guest through the reclaim sequence if it has one.
    pub fn reclaim(&self, gpa: u64, len: u64) -> Result<serde_json::Value, ReclaimError> {
        self.check(gpa, len)?;
        if self.owed.as_ref().is_some_and(|owed| owed(gpa, len)) {
            return Err(ReclaimError::Owed { gpa, len });
        }
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // The drop zeroes the range and the handshake writes the sequence word: both are
        // marked for a running migration once done (a word store marks its whole page).
        let mut changed = vec![(gpa, len)];
        changed.extend(self.handshake.map(|h| (h.seq_gpa, 8)));
        let result = self
            .host
            .change(&changed, || {
                let Some(h) = self.handshake else {
                    return (self.drop_range)(gpa, len);
                };
                let seq: u64 = self
                    .mem
                    .load(GuestAddress(h.seq_gpa), Ordering::SeqCst)
                    .expect("the parameter block is in RAM");
                self.store_seq(h.seq_gpa, seq.wrapping_add(1));
                let result = (self.drop_range)(gpa, len);
                self.store_seq(h.seq_gpa, seq.wrapping_add(2));
                result
            })
            .map_err(|why| ReclaimError::Migrating { gpa, len, why })?;
        let report = result.map_err(|source| ReclaimError::Drop { gpa, len, source })?;
        self.done.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(report)
    }

    fn store_seq(&self, seq_gpa: u64, value: u64) {
        self.mem
            .store(value, GuestAddress(seq_gpa), Ordering::SeqCst)
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

/// Drops a guest range from its private host mapping ([`crate::uffd::drop_pages`]), for a
/// VM without demand paging; the JSON says what was dropped.
pub fn madvise_dontneed(host_addr: u64, len: u64) -> anyhow::Result<serde_json::Value> {
    crate::uffd::drop_pages(host_addr, len)
        .map_err(|e| anyhow::anyhow!("madvise(MADV_DONTNEED): {e}"))?;
    Ok(serde_json::json!({ "dropped_bytes": len }))
}

/// Frees a guest range of a shared memfd ([`crate::uffd::punch_hole`]), for a VM without
/// demand paging; the JSON says what was dropped.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> anyhow::Result<serde_json::Value> {
    crate::uffd::punch_hole(file, offset, len).map_err(|e| {
        anyhow::anyhow!("fallocate(PUNCH_HOLE) of {offset:#x}+{len:#x} on the guest's memfd: {e}")
    })?;
    Ok(serde_json::json!({ "dropped_bytes": len, "hole_punched": true }))
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
                crate::seccomp::enter(crate::seccomp::ThreadKind::Reclaim);
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
    use crate::dirty::{DirtyBitmap, SlotInfo, VmmDirty};

    /// The test guests' reserved low memory.
    const LOW_RESERVED: u64 = 4 << 20;
    /// The sequence at 0x1000 and the reserved low memory.
    const TEST_HANDSHAKE: Handshake = Handshake {
        seq_gpa: 0x1000,
        reserved_below: LOW_RESERVED,
    };

    fn reclaimer(log: Arc<Mutex<Vec<(u64, u64, u64)>>>) -> Reclaimer {
        reclaimer_gated(log, Arc::new(HostChanges::new()))
    }

    fn reclaimer_gated(log: Arc<Mutex<Vec<(u64, u64, u64)>>>, host: Arc<HostChanges>) -> Reclaimer {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let seen = mem.clone();
        Reclaimer::new(
            mem,
            Some(TEST_HANDSHAKE),
            vec![(0, 8 << 20)],
            PAGE_SIZE,
            Box::new(move |gpa, len| {
                let seq: u64 = seen.read_obj(GuestAddress(0x1000)).unwrap();
                log.lock().unwrap().push((gpa, len, seq));
                Ok(serde_json::Value::Null)
            }),
            host,
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

    fn slots() -> Vec<SlotInfo> {
        vec![SlotInfo {
            slot: 0,
            gpa: 0,
            len: 8 << 20,
            host_addr: 0,
        }]
    }

    #[test]
    fn a_reclaim_during_a_migration_is_in_the_next_harvest_with_the_sequence_page() {
        let host = Arc::new(HostChanges::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let r = reclaimer_gated(log.clone(), host.clone());
        // Before any migration: nothing to record.
        r.reclaim(LOW_RESERVED + 0x10000, 0x1000).unwrap();
        let vmm = Arc::new(VmmDirty::new(&slots()));
        host.track(vmm.clone());
        r.reclaim(LOW_RESERVED, 0x3000).unwrap();
        let mut harvest = DirtyBitmap::empty(&slots());
        vmm.take_into(&mut harvest);
        let got: Vec<u64> = harvest.iter().collect();
        assert_eq!(
            got,
            vec![
                0x1000,
                LOW_RESERVED,
                LOW_RESERVED + 0x1000,
                LOW_RESERVED + 0x2000
            ],
            "the zeroed range and the sequence word's page"
        );
        assert_eq!(log.lock().unwrap().len(), 2);
    }

    #[test]
    fn the_last_round_waits_for_a_running_reclaim_and_refuses_later_ones() {
        let host = Arc::new(HostChanges::new());
        let vmm = Arc::new(VmmDirty::new(&slots()));
        host.track(vmm.clone());
        let entered = Arc::new(std::sync::Barrier::new(2));
        let (e2, h2) = (entered.clone(), host.clone());
        let first = AtomicBool::new(false);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let r = Arc::new(Reclaimer::new(
            mem,
            Some(TEST_HANDSHAKE),
            vec![(0, 8 << 20)],
            PAGE_SIZE,
            Box::new(move |_, _| {
                if !first.swap(true, Ordering::Relaxed) {
                    e2.wait();
                    // The migration seals while this drop runs: it must wait for the mark.
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(serde_json::Value::Null)
            }),
            h2,
        ));
        let r2 = r.clone();
        let t = std::thread::spawn(move || r2.reclaim(LOW_RESERVED, 0x1000));
        entered.wait();
        host.seal();
        // The last harvest, taken after `seal`, has the reclaim that ran across it.
        let mut last = DirtyBitmap::empty(&slots());
        vmm.take_into(&mut last);
        assert!(
            last.is_dirty(LOW_RESERVED),
            "{:?}",
            last.iter().collect::<Vec<_>>()
        );
        t.join().unwrap().unwrap();
        let e = r.reclaim(LOW_RESERVED, 0x1000).unwrap_err();
        assert!(
            matches!(
                e,
                ReclaimError::Migrating {
                    why: HostChangeRefused::LastRound,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("retry"), "{e}");
        assert!(!host.migrated(), "sealed is not migrated yet");
        host.finish(true);
        assert!(host.migrated());
        let e = r.reclaim(LOW_RESERVED, 0x1000).unwrap_err();
        assert!(e.to_string().contains("destination"), "{e}");
        // A failed migration: the VM runs here again, reclaims work unrecorded.
        host.finish(false);
        assert!(!host.migrated());
        r.reclaim(LOW_RESERVED, 0x1000).unwrap();
        let mut after = DirtyBitmap::empty(&slots());
        vmm.take_into(&mut after);
        assert_eq!(after.count(), 0);
        assert_eq!(r.totals().0, 2);
    }

    #[test]
    fn owed_ranges_are_refused_without_touching_the_sequence() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let r = reclaimer(log.clone()).refuse_owed(Box::new(|gpa, len| {
            gpa < LOW_RESERVED + 0x5000 && gpa + len > LOW_RESERVED + 0x4000
        }));
        let e = r.reclaim(LOW_RESERVED, 0x8000).unwrap_err();
        assert!(matches!(e, ReclaimError::Owed { .. }), "{e}");
        assert!(e.to_string().contains("postcopy"), "{e}");
        let seq: u64 = r.mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(seq, 0);
        r.reclaim(LOW_RESERVED + 0x5000, 0x1000).unwrap();
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_hole_punch_zeroes_a_shared_mapping_where_dontneed_does_not() {
        use std::io::Write;
        const LEN: usize = 4 * PAGE_SIZE as usize;
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"reclaim-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh fd nothing else owns.
        let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.write_all(&[0xa5; LEN]).unwrap();
        // SAFETY: a fresh shared mapping of the whole file; unmapped at the end.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let byte = |i: usize| {
            // SAFETY: `i < LEN`, inside the live mapping.
            unsafe { std::ptr::read_volatile((p as *const u8).add(i)) }
        };
        assert_eq!(byte(PAGE_SIZE as usize), 0xa5);
        madvise_dontneed(p as u64 + PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(
            byte(PAGE_SIZE as usize),
            0xa5,
            "MADV_DONTNEED kept the file's page"
        );
        punch_hole(&file, PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert_eq!(byte(0), 0xa5);
        assert_eq!(byte(PAGE_SIZE as usize), 0);
        assert_eq!(byte(3 * PAGE_SIZE as usize - 1), 0);
        assert_eq!(byte(3 * PAGE_SIZE as usize), 0xa5);
        assert_eq!(file.metadata().unwrap().len(), LEN as u64, "size kept");
        // SAFETY: the mapping made above, no reference into it remains.
        unsafe { libc::munmap(p, LEN) };
    }
}
