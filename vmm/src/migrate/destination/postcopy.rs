//! The destination's postcopy phase: the pager's [`PageSource`] while pages are still owed
//! (a fault on one asks the source for it and waits), the receiver that places them as they
//! arrive, and the "all received" that goes back when none is owed any more.
//!
//! Pages move in whole host pages of the destination (4 KiB, or 2 MiB on hugetlbfs): the
//! destination drops its stale copy of every host page that holds a page dirtied after it was
//! sent, so all of that host page comes from the source, which is paused and final.

use std::collections::HashSet;
use std::io::BufReader;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::migrate::error::MigrateError;
use crate::migrate::page_set::PageSet;
use crate::migrate::priority::MigrationPriority;
use crate::migrate::ram::{check_range, page_crc, RamDigest, RamError, RamPager};
use crate::migrate::stream::{
    chunk_name, Chunk, StreamError, StreamReader, StreamWriter, PAGE_SIZE,
};
use crate::migrate::transport::Connection;
use crate::pager::PageSource;

const PAGE: u64 = PAGE_SIZE as u64;

/// The destination's side of postcopy: the page source of its pager and the receiver of the
/// pages still owed by the source.
pub struct PostcopyTarget {
    mem: GuestMemoryMmap,
    pager: Arc<dyn RamPager>,
    host_page: u64,
    state: Mutex<TargetState>,
    arrived: Condvar,
    /// The reply direction (page requests, guest running, all received).
    back: Mutex<Reply>,
    started: Instant,
    /// Told once why the postcopy failed (stops the VM).
    on_fail: Box<dyn Fn(&str) + Send + Sync>,
    /// The source's digest (`--migrate-verify`): each owed page is checked as it arrives.
    digest: Option<RamDigest>,
}

/// The destination's reply direction and what it has said on it.
struct Reply {
    w: StreamWriter<Connection>,
    /// "Guest running" was sent.
    running: bool,
    /// Every owed page arrived before "guest running" was sent: "all received" goes right
    /// after it. The source ends the migration (and closes the connection) when it reads "all
    /// received", so said first it would leave "guest running" to a closed connection.
    all_received_due: bool,
}

struct TargetState {
    /// Host pages the source still owes.
    owed: PageSet,
    /// Owed host pages already requested.
    requested: HashSet<u64>,
    /// Why the source is gone, once it is.
    failed: Option<String>,
    /// Faults that had to wait for the source.
    faults: u64,
    /// Owed 4 KiB pages checked against the digest, and how many differed.
    verified: u64,
    differ: u64,
}

/// The destination's figures of the postcopy phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetFigures {
    /// Host pages the source owed at the switch.
    pub owed: u64,
    /// Faults served on demand (a vCPU waited for the source).
    pub faults: u64,
    /// Host pages that arrived from the source.
    pub received: u64,
    /// From the switch until every page was present.
    pub all_present: Duration,
    /// 4 KiB pages checked on arrival against the source's digest (`--migrate-verify`).
    pub verified: u64,
    /// Of those, pages that differed.
    pub differ: u64,
}

impl std::fmt::Debug for PostcopyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyTarget")
            .field("host_page", &self.host_page)
            .finish_non_exhaustive()
    }
}

impl PostcopyTarget {
    /// A target owing `owed` (host pages dropped at the switch), replying on `back`;
    /// `on_fail` is called once with the reason if the pages stop coming (it should stop the
    /// VM: from then on faults are answered with zeroes so that no thread stays blocked).
    pub fn new(
        mem: GuestMemoryMmap,
        pager: Arc<dyn RamPager>,
        owed: PageSet,
        back: Connection,
        on_fail: impl Fn(&str) + Send + Sync + 'static,
        digest: Option<RamDigest>,
    ) -> PostcopyTarget {
        PostcopyTarget {
            mem,
            host_page: pager.host_page(),
            pager,
            state: Mutex::new(TargetState {
                owed,
                requested: HashSet::new(),
                failed: None,
                faults: 0,
                verified: 0,
                differ: 0,
            }),
            arrived: Condvar::new(),
            back: Mutex::new(Reply {
                w: StreamWriter::headless(back),
                running: false,
                all_received_due: false,
            }),
            started: Instant::now(),
            on_fail: Box::new(on_fail),
            digest,
        }
    }

    /// Records the first failure, tells `on_fail` and wakes every waiting fault.
    fn fail(&self, why: String) {
        let first = {
            let mut st = self.lock();
            let first = st.failed.is_none();
            if first {
                st.failed = Some(why.clone());
            }
            first
        };
        self.arrived.notify_all();
        if first {
            log::error!("{why}");
            (self.on_fail)(&why);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TargetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reply(&self) -> std::sync::MutexGuard<'_, Reply> {
        self.back.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the source the guest runs here (before the vCPUs start: the source then never
    /// resumes its copy).
    pub fn guest_running(&self) -> Result<(), StreamError> {
        let mut reply = self.reply();
        reply.w.guest_running()?;
        reply.running = true;
        if reply.all_received_due {
            reply.all_received_due = false;
            reply.w.all_received()?;
        }
        Ok(())
    }

    /// Whether any host page of `[gpa, gpa + len)` is still owed. Pages only ever leave the
    /// owed set, so a false answer stays false: nothing in the range becomes owed again.
    pub fn owes_any(&self, gpa: u64, len: u64) -> bool {
        self.lock().owed.any_in(gpa, len)
    }

    /// Host pages still owed.
    pub fn owed(&self) -> u64 {
        self.lock().owed.len()
    }

    /// Receives the owed pages from `r` and places them, until the source's `End`; then tells
    /// the source "all received". On a stream error the waiting faults fail with the reason
    /// (the pager stops the VM through its fatal handler) and the error is returned.
    pub fn receive(
        &self,
        mut r: StreamReader<BufReader<Connection>>,
    ) -> Result<TargetFigures, MigrateError> {
        let owed_at_start = self.owed();
        // The destination's guest runs meanwhile: its vCPUs must not starve this thread.
        let _boost = MigrationPriority::raise();
        // A truncated stream here is not the precopy case ("the source keeps running"): the
        // source has handed the guest over.
        let res = self.receive_inner(&mut r).map_err(|e| match e {
            MigrateError::Stream(StreamError::Truncated { offset, chunk, .. }) => {
                MigrateError::Refused(format!(
                    "the connection to the source closed at offset {offset} (chunk {chunk}) \
                     before every page arrived"
                ))
            }
            other => other,
        });
        if let Err(e) = &res {
            self.fail(format!(
                "postcopy: receiving from the migration source failed ({e}); the guest cannot \
                 continue without the {} MiB of its memory still on the source",
                (self.owed() * self.host_page) >> 20
            ));
        }
        res?;
        let st = self.lock();
        if self.digest.is_some() {
            // Said as soon as the last page is in (the figures of the phase come at the VM's end).
            println!(
                "verified {} owed pages on arrival against the source's digest: {} differ",
                st.verified, st.differ
            );
        }
        Ok(TargetFigures {
            owed: owed_at_start,
            faults: st.faults,
            received: owed_at_start,
            all_present: self.started.elapsed(),
            verified: st.verified,
            differ: st.differ,
        })
    }

    fn receive_inner(
        &self,
        r: &mut StreamReader<BufReader<Connection>>,
    ) -> Result<(), MigrateError> {
        let host = self.host_page;
        // One host page being assembled: its start, its bytes, which 4 KiB pages are in.
        let mut asm: Option<(u64, Vec<u8>, u64)> = None;
        let per = host / PAGE;
        loop {
            let (offset, chunk_no) = r.position();
            let c = r.next_chunk()?;
            let (gpa, data, count) = match c {
                Chunk::Pages { gpa, data } => (gpa, Some(data), data.len() as u64 / PAGE),
                Chunk::ZeroPages { gpa, count } => (gpa, None, count),
                Chunk::End => break,
                other => {
                    return Err(StreamError::Unexpected {
                        chunk: chunk_no,
                        offset,
                        found: chunk_name(&other),
                        expected: "postcopy pages or end",
                    }
                    .into())
                }
            };
            let len = count
                .checked_mul(PAGE)
                .ok_or(RamError::OutOfRange { gpa, len: u64::MAX })?;
            check_range(&self.mem, gpa, len)?;
            for i in 0..count {
                let at = gpa + i * PAGE;
                let base = at / host * host;
                if !matches!(&asm, Some((b, _, _)) if *b == base) {
                    // A host page left unfinished is asked for again by its fault, if any.
                    asm = self
                        .lock()
                        .owed
                        .contains(base)
                        .then(|| (base, vec![0u8; host as usize], 0));
                }
                let Some((_, buf, filled)) = asm.as_mut() else {
                    continue;
                };
                if let Some(d) = data {
                    let off = (at - base) as usize;
                    let src = &d[(i * PAGE) as usize..((i + 1) * PAGE) as usize];
                    buf[off..off + PAGE_SIZE].copy_from_slice(src);
                }
                *filled += 1;
                if *filled == per {
                    let (b, buf, _) = asm.take().expect("assembling");
                    self.arrive(b, &buf)?;
                }
            }
        }
        let left = self.owed();
        if left != 0 {
            return Err(MigrateError::Missing(format!(
                "{left} host pages of the postcopy phase"
            )));
        }
        let mut reply = self.reply();
        if reply.running {
            reply.w.all_received()?;
        } else {
            reply.all_received_due = true;
        }
        Ok(())
    }

    /// A whole owed host page arrived: place it and wake whoever waits for it.
    fn arrive(&self, base: u64, data: &[u8]) -> Result<(), MigrateError> {
        let (mut verified, mut differ) = (0, 0);
        if let Some(d) = &self.digest {
            for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
                verified += 1;
                let gpa = base + i as u64 * PAGE;
                if d.expected(gpa) != Some(page_crc(page)) {
                    differ += 1;
                    log::error!("postcopy: the page at {gpa:#x} differs from the source's digest");
                }
            }
        }
        // Only this thread places owed pages, and each once: no lock needed around place.
        self.pager
            .place(base, data)
            .map_err(|e| RamError::Pager(format!("placing {base:#x}: {e}")))?;
        let mut st = self.lock();
        st.verified += verified;
        st.differ += differ;
        st.owed.remove(base);
        st.requested.remove(&base);
        drop(st);
        self.arrived.notify_all();
        Ok(())
    }

    /// Fills `buf` with guest memory at `gpa`: pages not owed are zero (the source's copy was
    /// zero when last sent and not written since), owed ones are asked for and waited on.
    fn fill(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        let host = self.host_page;
        let len = buf.len() as u64;
        let first = gpa / host * host;
        let mut st = self.lock();
        let mut waited = false;
        let mut at = first;
        while at < gpa + len && st.failed.is_none() {
            if st.owed.contains(at) && st.requested.insert(at) {
                drop(st);
                let sent = self.reply().w.page_request(at, (host / PAGE) as u32);
                if let Err(e) = sent {
                    self.fail(format!(
                        "postcopy: asking the migration source for {at:#x} failed ({e}); the \
                         guest cannot continue without the part of its memory still there"
                    ));
                }
                st = self.lock();
            }
            at += host;
        }
        loop {
            if st.failed.is_some() {
                // The VM is stopping with the reason already given: wake this thread (a
                // vCPU, or the VMM itself reading guest memory) with zeroes so that nothing
                // stays blocked on a page that will never come; the run is failed anyway.
                drop(st);
                buf.fill(0);
                return Ok(());
            }
            let mut at = first;
            let mut all = true;
            while at < gpa + len {
                all &= !st.owed.contains(at);
                at += host;
            }
            if all {
                break;
            }
            waited = true;
            st = self.arrived.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if waited {
            st.faults += 1;
        }
        drop(st);
        // Each host page is either placed now (read it back: present, no fault) or was
        // never owed (zero unless placed meanwhile by a racing fill, which reading sees).
        let mut at = gpa;
        while at < gpa + len {
            let off = (at - gpa) as usize;
            let part = &mut buf[off..off + PAGE_SIZE];
            if self.pager.is_populated(at) {
                self.mem
                    .read_slice(part, GuestAddress(at))
                    .map_err(|e| format!("postcopy: reading back {at:#x}: {e}"))?;
            } else {
                part.fill(0);
            }
            at += PAGE;
        }
        Ok(())
    }
}

impl PageSource for PostcopyTarget {
    fn fetch(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.fill(gpa, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pager that is never asked anything: nothing is owed.
    struct NoPages;

    impl RamPager for NoPages {
        fn host_page(&self) -> u64 {
            PAGE
        }
        fn is_populated(&self, _: u64) -> bool {
            true
        }
        fn place(&self, gpa: u64, _: &[u8]) -> Result<bool, String> {
            panic!("nothing is owed, yet {gpa:#x} was placed")
        }
        fn discard(&self, gpa: u64, _: u64) -> Result<(), String> {
            panic!("nothing is owed, yet {gpa:#x} was dropped")
        }
    }

    #[test]
    fn all_received_before_the_guest_runs_is_said_after_guest_running() {
        use std::os::unix::net::UnixStream;
        let regions = [(0u64, 64 * PAGE)];
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * PAGE_SIZE)]).unwrap();
        let (back, source_reads) = UnixStream::pair().unwrap();
        let target = PostcopyTarget::new(
            mem,
            Arc::new(NoPages),
            PageSet::new(&regions, PAGE),
            Connection::Unix(back),
            |why: &str| panic!("postcopy failed: {why}"),
            None,
        );
        // The source's push ends at once: every owed page (none) is in before the
        // destination's guest was said to run.
        let (pages_in, source_writes) = UnixStream::pair().unwrap();
        let mut w = StreamWriter::headless(Connection::Unix(source_writes));
        w.end().unwrap();
        drop(w);
        let r = StreamReader::headless(BufReader::new(Connection::Unix(pages_in)));
        target.receive(r).unwrap();
        target.guest_running().unwrap();
        drop(target);
        let mut replies = StreamReader::headless(Connection::Unix(source_reads));
        assert_eq!(replies.next_chunk().unwrap(), Chunk::GuestRunning);
        assert_eq!(replies.next_chunk().unwrap(), Chunk::AllReceived);
    }
}
