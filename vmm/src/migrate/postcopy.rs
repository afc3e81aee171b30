//! Postcopy: after the precopy rounds the guest moves at once and its stale pages follow.
//! The source answers the destination's page requests first and pushes the rest in the
//! background ([`push`]); the destination ([`PostcopyTarget`]) is the pager's
//! [`PageSource`]: a fault on a page still owed asks the source for it and waits, pushed pages
//! are placed as they arrive, and "all received" goes back when none is owed any more.
//!
//! Pages move in whole host pages of the destination (4 KiB, or 2 MiB on hugetlbfs): the
//! destination drops its stale copy of every host page that holds a page dirtied after it was
//! sent, so all of that host page comes from the source, which is paused and final.

use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::precopy::MigrateError;
use super::ram::{check_range, RamError, RamPager, RamSender};
use super::stream::{Chunk, StreamError, StreamReader, StreamWriter, PAGE_SIZE};
use super::summary::PostcopyFigures;
use super::transport::Connection;
use crate::dirty::DirtyBitmap;
use crate::pager::PageSource;

const PAGE: u64 = PAGE_SIZE as u64;
/// Most bytes the source pushes in one go before it looks at requests again.
const PUSH_BATCH: u64 = 1 << 20;
/// Interval of the source's postcopy progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const MB: f64 = 1_000_000.0;

/// A set of host pages of guest RAM, one bit each.
#[derive(Clone, Debug)]
pub struct PageSet {
    regions: Vec<(u64, u64)>,
    shift: u32,
    words: Vec<Vec<u64>>,
    count: u64,
}

impl PageSet {
    /// An empty set over `regions` (gpa, len) in host pages of `host_page` bytes.
    pub fn new(regions: &[(u64, u64)], host_page: u64) -> PageSet {
        let shift = host_page.trailing_zeros();
        PageSet {
            regions: regions.to_vec(),
            shift,
            words: regions
                .iter()
                .map(|(_, len)| vec![0; (len >> shift).div_ceil(64) as usize])
                .collect(),
            count: 0,
        }
    }

    /// Host page size.
    pub fn host_page(&self) -> u64 {
        1 << self.shift
    }

    fn slot(&self, gpa: u64) -> Option<(usize, u64)> {
        self.regions
            .iter()
            .position(|&(g, l)| gpa >= g && gpa - g < l)
            .map(|i| (i, (gpa - self.regions[i].0) >> self.shift))
    }

    /// Adds the host page holding `gpa`; false when it was there (or outside RAM).
    pub fn insert(&mut self, gpa: u64) -> bool {
        let Some((r, i)) = self.slot(gpa) else {
            return false;
        };
        let w = &mut self.words[r][(i / 64) as usize];
        let bit = 1 << (i % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.count += 1;
        true
    }

    /// Removes the host page holding `gpa`; false when it was not there.
    pub fn remove(&mut self, gpa: u64) -> bool {
        let Some((r, i)) = self.slot(gpa) else {
            return false;
        };
        let w = &mut self.words[r][(i / 64) as usize];
        let bit = 1 << (i % 64);
        if *w & bit == 0 {
            return false;
        }
        *w &= !bit;
        self.count -= 1;
        true
    }

    /// Whether the host page holding `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        self.slot(gpa)
            .is_some_and(|(r, i)| self.words[r][(i / 64) as usize] & (1 << (i % 64)) != 0)
    }

    /// Whether any host page overlapping `[gpa, gpa + len)` is in the set.
    pub fn any_in(&self, gpa: u64, len: u64) -> bool {
        if self.count == 0 || len == 0 {
            return false;
        }
        let end = gpa.saturating_add(len);
        let mut at = gpa >> self.shift << self.shift;
        while at < end {
            if self.contains(at) {
                return true;
            }
            at += self.host_page();
        }
        false
    }

    /// Host pages in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The host pages holding a dirty page of `bm`.
    pub fn of_dirty(bm: &DirtyBitmap, regions: &[(u64, u64)], host_page: u64) -> PageSet {
        let mut s = PageSet::new(regions, host_page);
        for gpa in bm.iter() {
            s.insert(gpa);
        }
        s
    }

    /// Start addresses of the host pages in the set, ascending per region.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions
            .iter()
            .zip(&self.words)
            .flat_map(move |(&(g, _), words)| {
                words.iter().enumerate().flat_map(move |(w, &bits)| {
                    (0..64u64)
                        .filter(move |b| bits & (1 << b) != 0)
                        .map(move |b| g + ((w as u64 * 64 + b) << self.shift))
                })
            })
    }

    /// Adds every member of `other` (a set over the same regions and host page size).
    pub fn union_with(&mut self, other: &PageSet) {
        self.combine(other, |a, b| a | b);
    }

    /// Removes every member of `other` (a set over the same regions and host page size).
    pub fn remove_all(&mut self, other: &PageSet) {
        self.combine(other, |a, b| a & !b);
    }

    fn combine(&mut self, other: &PageSet, f: impl Fn(u64, u64) -> u64) {
        assert!(
            self.regions == other.regions && self.shift == other.shift,
            "page sets over different layouts"
        );
        let mut count = 0;
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a = f(*a, *b);
                count += u64::from(a.count_ones());
            }
        }
        self.count = count;
    }

    /// Runs of consecutive host pages as (gpa, pages of 4 KiB), each at most `u32::MAX` pages.
    pub fn runs(&self) -> Vec<(u64, u32)> {
        let per = (self.host_page() / PAGE) as u32;
        let mut out: Vec<(u64, u32)> = Vec::new();
        for gpa in self.iter() {
            let region = self.slot(gpa).map(|s| s.0);
            match out.last_mut() {
                Some((g, n))
                    if *g + u64::from(*n) * PAGE == gpa
                        && n.checked_add(per).is_some()
                        && self.slot(*g).map(|s| s.0) == region =>
                {
                    *n += per
                }
                _ => out.push((gpa, per)),
            }
        }
        out
    }
}

/// What the destination said about itself (its `DEST_INFO` chunk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestInfo {
    /// Its host page size.
    pub host_page: u64,
    /// Whether it runs with demand paging (needed for postcopy).
    pub demand_paging: bool,
}

/// What the source's reader of the back channel saw.
#[derive(Debug)]
enum Back {
    GuestRunning,
    Request { gpa: u64, count: u32 },
    AllReceived,
    Lost(String),
}

fn read_back(mut r: StreamReader<Connection>, tx: Sender<Back>) {
    loop {
        let ev = match r.next_chunk() {
            Ok(Chunk::GuestRunning) => Back::GuestRunning,
            Ok(Chunk::PageRequest { gpa, count }) => Back::Request { gpa, count },
            Ok(Chunk::AllReceived) => Back::AllReceived,
            Ok(Chunk::DestInfo { .. }) => continue,
            Ok(other) => Back::Lost(format!(
                "the destination sent an unexpected {} chunk",
                super::stream::chunk_name(&other)
            )),
            Err(e) => Back::Lost(e.to_string()),
        };
        let last = matches!(ev, Back::AllReceived | Back::Lost(_));
        if tx.send(ev).is_err() || last {
            return;
        }
    }
}

/// The source's postcopy phase as it ended.
#[derive(Debug)]
pub struct PushOutcome {
    /// Figures of the phase.
    pub figures: PostcopyFigures,
    /// When the destination said its guest runs (the end of the downtime).
    pub guest_running_at: Instant,
}

/// The source after the switch: sends the discard runs, the state (`state` writes the vCPU
/// and device chunks) and the switch, then answers page requests first and pushes every
/// remaining host page; ends the stream and waits for "all received". The guest is paused
/// here and never resumes once the destination said it runs.
///
/// `dirty` holds the pages written since the last harvest; `discarded`, the host pages a
/// discard round before the pause already took from the destination. Both are owed, but
/// only the pages of `dirty` outside `discarded` are discarded now.
#[allow(clippy::too_many_arguments)]
pub fn push<W: Write>(
    w: &mut StreamWriter<W>,
    back: StreamReader<Connection>,
    dest: DestInfo,
    mem: &GuestMemoryMmap,
    regions: &[(u64, u64)],
    dirty: &DirtyBitmap,
    discarded: Option<&PageSet>,
    pager: Option<&dyn RamPager>,
    state: impl FnOnce(&mut StreamWriter<W>) -> Result<(), MigrateError>,
) -> Result<PushOutcome, MigrateError> {
    let mut owed = PageSet::of_dirty(dirty, regions, dest.host_page);
    let switch_at = Instant::now();
    // Pages discarded before the pause have no copy there any more, written since or not.
    if let Some(early) = discarded {
        owed.remove_all(early);
    }
    w.discard(&owed.runs())?;
    if let Some(early) = discarded {
        owed.union_with(early);
    }
    let total = owed.len();
    state(w)?;
    w.postcopy()?;
    // From here on the destination may run the guest: no error lets the source resume.
    push_owed(w, back, dest, mem, owed, total, switch_at, pager).map_err(|e| match e {
        MigrateError::PostcopyLost(_) => e,
        other => MigrateError::PostcopyLost(other.to_string()),
    })
}

#[allow(clippy::too_many_arguments)]
fn push_owed<W: Write>(
    w: &mut StreamWriter<W>,
    back: StreamReader<Connection>,
    dest: DestInfo,
    mem: &GuestMemoryMmap,
    mut owed: PageSet,
    total: u64,
    switch_at: Instant,
    pager: Option<&dyn RamPager>,
) -> Result<PushOutcome, MigrateError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("postcopy-back".into())
        .spawn(move || read_back(back, tx))
        .map_err(|e| StreamError::Io {
            offset: 0,
            source: e,
        })?;
    let mut sender = RamSender::new();
    let order: Vec<u64> = owed.iter().collect();
    let mut cursor = 0usize;
    let mut running: Option<Instant> = None;
    let mut requested = 0u64;
    let mut pushed = 0u64;
    let mut ended = false;
    let mut last_line = Instant::now();
    let mut bytes_at_line = w.bytes_written();
    let host = dest.host_page;
    let lost = |why: String, running: Option<Instant>| {
        MigrateError::PostcopyLost(match running {
            None => format!("{why} (before it said its guest runs)"),
            Some(_) => why,
        })
    };
    loop {
        // Requests first: a vCPU of the destination waits on each.
        let ev = if ended {
            match rx.recv_timeout(PROGRESS_EVERY) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(lost("the destination's channel closed".into(), running))
                }
            }
        } else {
            rx.try_recv().ok()
        };
        match ev {
            Some(Back::GuestRunning) => {
                running = Some(Instant::now());
                info!(
                    "postcopy: the guest runs on the destination {:.1} ms after the switch",
                    switch_at.elapsed().as_secs_f64() * 1e3
                );
                continue;
            }
            Some(Back::Request { gpa, count }) => {
                let len = u64::from(count) * PAGE;
                check_range(mem, gpa, len).map_err(|e| {
                    lost(format!("the destination asked for bad pages: {e}"), running)
                })?;
                let mut at = gpa / host * host;
                while at < gpa + len {
                    if owed.remove(at) {
                        sender.send_range(w, mem, at, host, pager)?;
                        requested += host / PAGE;
                    }
                    at += host;
                }
                w.flush()?;
                continue;
            }
            Some(Back::AllReceived) if ended => break,
            Some(Back::AllReceived) => {
                return Err(lost(
                    "the destination reported all pages received before the source sent them \
                     all"
                    .into(),
                    running,
                ))
            }
            Some(Back::Lost(why)) => return Err(lost(why, running)),
            None => {}
        }
        if !ended {
            // Push the next consecutive owed host pages, up to a batch.
            while cursor < order.len() && !owed.contains(order[cursor]) {
                cursor += 1;
            }
            if cursor < order.len() {
                let start = order[cursor];
                let mut end = start;
                while cursor < order.len()
                    && order[cursor] == end
                    && owed.contains(end)
                    && (end == start || end - start < PUSH_BATCH)
                {
                    owed.remove(end);
                    end += host;
                    cursor += 1;
                }
                sender.send_range(w, mem, start, end - start, pager)?;
                pushed += (end - start) / PAGE;
            } else {
                w.end()?;
                ended = true;
                debug!("postcopy: every owed page sent; waiting for the destination");
            }
        }
        if last_line.elapsed() >= PROGRESS_EVERY {
            let secs = last_line.elapsed().as_secs_f64();
            let sent = w.bytes_written() - bytes_at_line;
            println!(
                "postcopy {:.1} s: {} of {} host pages sent ({requested} pages on request, {pushed} pushed), {:.1} MB in the last {secs:.1} s, {:.0} MB/s",
                switch_at.elapsed().as_secs_f64(),
                total - owed.len(),
                total,
                sent as f64 / MB,
                sent as f64 / MB / secs
            );
            last_line = Instant::now();
            bytes_at_line = w.bytes_written();
        }
    }
    let figures = PostcopyFigures {
        requested_pages: requested,
        pushed_pages: pushed,
        ms: switch_at.elapsed().as_secs_f64() * 1e3,
    };
    println!(
        "postcopy done: {total} host pages in {:.3} s ({requested} pages on request, {pushed} pushed)",
        figures.ms / 1e3
    );
    Ok(PushOutcome {
        figures,
        // "All received" implies the guest ran there even if its acknowledgement was lost.
        guest_running_at: running.unwrap_or_else(Instant::now),
    })
}

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
            }),
            arrived: Condvar::new(),
            back: Mutex::new(Reply {
                w: StreamWriter::headless(back),
                running: false,
                all_received_due: false,
            }),
            started: Instant::now(),
            on_fail: Box::new(on_fail),
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
        let _boost = super::precopy::MigrationPriority::raise();
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
        Ok(TargetFigures {
            owed: owed_at_start,
            faults: st.faults,
            received: owed_at_start,
            all_present: self.started.elapsed(),
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
                        found: super::stream::chunk_name(&other),
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
        // Only this thread places owed pages, and each once: no lock needed around place.
        self.pager
            .place(base, data)
            .map_err(|e| RamError::Pager(format!("placing {base:#x}: {e}")))?;
        let mut st = self.lock();
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

/// Waits for the destination's `DEST_INFO` on the back channel (postcopy only).
pub fn read_dest_info(r: &mut StreamReader<Connection>) -> Result<DestInfo, MigrateError> {
    let (offset, chunk) = r.position();
    match r.next_chunk()? {
        Chunk::DestInfo { host_page, flags } => Ok(DestInfo {
            host_page,
            demand_paging: flags & super::stream::DEST_DEMAND_PAGING != 0,
        }),
        other => Err(StreamError::Unexpected {
            chunk,
            offset,
            found: super::stream::chunk_name(&other),
            expected: "destination-info",
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::SlotInfo;

    #[test]
    fn any_in_finds_an_owed_host_page_overlapping_a_range() {
        let regions = [(0u64, 8u64 << 20)];
        let mut s = PageSet::new(&regions, 2 << 20);
        assert!(!s.any_in(0, 8 << 20), "empty");
        s.insert(4 << 20);
        assert!(s.any_in((6 << 20) - 0x1000, 0x1000), "last 4K of the page");
        assert!(s.any_in(0, 8 << 20));
        assert!(!s.any_in(0, 4 << 20), "ends where the owed page starts");
        assert!(!s.any_in(6 << 20, 2 << 20));
        assert!(!s.any_in(4 << 20, 0), "empty range");
        s.remove(4 << 20);
        assert!(!s.any_in(0, 8 << 20));
    }

    #[test]
    fn page_set_counts_iterates_and_runs() {
        let regions = [(0u64, 8u64 << 20), (4 << 30, 4 << 20)];
        let mut s = PageSet::new(&regions, 2 << 20);
        assert!(s.insert(0x1000));
        assert!(!s.insert(0x1fff), "same 2 MiB page");
        assert!(s.insert(2 << 20));
        assert!(s.insert((4 << 30) + (3 << 20)));
        assert!(!s.insert(5 << 30), "outside RAM");
        assert_eq!(s.len(), 3);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![0, 2 << 20, (4 << 30) + (2 << 20)]
        );
        assert_eq!(s.runs(), vec![(0, 1024), ((4 << 30) + (2 << 20), 512)]);
        assert!(s.remove(0x10));
        assert!(!s.remove(0x10));
        assert!(!s.contains(0) && s.contains(2 << 20));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn union_and_removal_keep_members_and_count() {
        let regions = [(0u64, 1 << 20), (4 << 30, 1 << 20)];
        let mut a = PageSet::new(&regions, PAGE);
        let mut b = PageSet::new(&regions, PAGE);
        for p in [0u64, 3, 64, 200] {
            a.insert(p * PAGE);
        }
        for p in [3u64, 65, 255] {
            b.insert(p * PAGE);
        }
        b.insert(4 << 30);
        let mut u = a.clone();
        u.union_with(&b);
        assert_eq!(u.len(), 7);
        assert_eq!(
            u.iter().collect::<Vec<_>>(),
            [0u64, 3, 64, 65, 200, 255]
                .iter()
                .map(|p| p * PAGE)
                .chain([4 << 30])
                .collect::<Vec<_>>()
        );
        u.remove_all(&a);
        assert_eq!(u.len(), 3, "only b's pages outside a are left");
        assert_eq!(
            u.iter().collect::<Vec<_>>(),
            vec![65 * PAGE, 255 * PAGE, 4 << 30]
        );
        assert!(!u.contains(3 * PAGE));
    }

    #[test]
    fn owed_pages_are_the_host_pages_of_dirty_ones() {
        let slots = [SlotInfo {
            slot: 0,
            gpa: 0,
            len: 8 << 20,
            host_addr: 0,
        }];
        let mut bm = DirtyBitmap::empty(&slots);
        for gpa in [0x3000, 0x4000, (6 << 20) + 0x1000] {
            bm.set(gpa);
        }
        let four_k = PageSet::of_dirty(&bm, &[(0, 8 << 20)], PAGE);
        assert_eq!(four_k.runs(), vec![(0x3000, 2), ((6 << 20) + 0x1000, 1)]);
        let two_m = PageSet::of_dirty(&bm, &[(0, 8 << 20)], 2 << 20);
        assert_eq!(two_m.runs(), vec![(0, 512), (6 << 20, 512)]);
    }

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
