//! The source's postcopy phase: after the switch the guest runs on the destination and its
//! stale pages follow, those the destination asks for first, the rest pushed in the
//! background, until the destination says it has them all.

use std::io::Write;
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use log::{debug, info};
use vm_memory::GuestMemoryMmap;

use crate::dirty::DirtyBitmap;
use crate::migrate::error::MigrateError;
use crate::migrate::page_set::PageSet;
use crate::migrate::ram::{check_range, RamPager, RamSender};
use crate::migrate::stream::{
    chunk_name, Chunk, StreamError, StreamReader, StreamWriter, DEST_DEMAND_PAGING, PAGE_SIZE,
};
use crate::migrate::summary::PostcopyFigures;
use crate::migrate::transport::Connection;

const PAGE: u64 = PAGE_SIZE as u64;
/// Most bytes the source pushes in one go before it looks at requests again.
const PUSH_BATCH: u64 = 1 << 20;
/// Interval of the source's postcopy progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const MB: f64 = 1_000_000.0;

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
                chunk_name(&other)
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
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::MigrationSender);
            read_back(back, tx)
        })
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

/// Waits for the destination's `DEST_INFO` on the back channel (postcopy only).
pub fn read_dest_info(r: &mut StreamReader<Connection>) -> Result<DestInfo, MigrateError> {
    let (offset, chunk) = r.position();
    match r.next_chunk()? {
        Chunk::DestInfo { host_page, flags } => Ok(DestInfo {
            host_page,
            demand_paging: flags & DEST_DEMAND_PAGING != 0,
        }),
        other => Err(StreamError::Unexpected {
            chunk,
            offset,
            found: chunk_name(&other),
            expected: "destination-info",
        }
        .into()),
    }
}
