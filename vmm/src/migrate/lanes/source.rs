//! The source's side of a migration's connections: what a round sends ([`RoundWork`]) cut
//! into shares, the main connection's share sent by the caller's thread and each lane's by a
//! thread of its own.

use std::io::Write;

use vm_memory::GuestMemoryMmap;

use super::{boundaries, LANE_ALIGN, PAGE};
use crate::dirty::DirtyBitmap;
use crate::migrate::auth::{self, Secret};
use crate::migrate::error::MigrateError;
use crate::migrate::ram::{open_pagemap, RamPager, RamSender};
use crate::migrate::stream::{StreamError, StreamWriter, LANE_TOKEN};
use crate::migrate::transport::{Address, Connection};
use crate::seccomp::{self, ThreadKind};

/// Pages coalesced into one `send_range` call at most (the sender's buffer splits further).
const MAX_RUN_PAGES: u64 = 1024;
/// Bytes of guest RAM per `send_range` call of the full pass.
const FULL_PASS_STEP: u64 = 64 << 20;

/// The pages one round sends.
#[derive(Clone, Copy, Debug)]
pub enum RoundWork<'a> {
    /// All of guest RAM: the regions as (gpa, len).
    Full(&'a [(u64, u64)]),
    /// The dirty pages of a harvest.
    Dirty(&'a DirtyBitmap),
}

impl RoundWork<'_> {
    /// Pages in the round.
    pub fn pages(&self) -> u64 {
        match self {
            RoundWork::Full(regions) => regions.iter().map(|r| r.1 / PAGE).sum(),
            RoundWork::Dirty(bm) => bm.count(),
        }
    }

    /// The round's pages as runs (gpa, pages) in address order.
    fn runs(&self) -> Box<dyn Iterator<Item = (u64, u64)> + '_> {
        match *self {
            RoundWork::Full(regions) => Box::new(regions.iter().map(|&(g, l)| (g, l / PAGE))),
            RoundWork::Dirty(bm) => Box::new(bm.iter().map(|g| (g, 1))),
        }
    }

    /// Sends the round's pages in `[lo, hi)` on `w`: runs of dirty pages (at most
    /// [`MAX_RUN_PAGES`] each), or the regions in [`FULL_PASS_STEP`] pieces; pages the pager
    /// never populated go as zero runs, unread.
    pub fn send_share<W: Write>(
        &self,
        w: &mut StreamWriter<W>,
        sender: &mut RamSender,
        mem: &GuestMemoryMmap,
        pager: Option<&dyn RamPager>,
        lo: u64,
        hi: u64,
    ) -> Result<(), MigrateError> {
        match *self {
            RoundWork::Full(regions) => {
                for &(gpa, len) in regions {
                    let mut at = gpa.max(lo);
                    let end = (gpa + len).min(hi);
                    while at < end {
                        let n = FULL_PASS_STEP.min(end - at);
                        sender.send_range(w, mem, at, n, pager)?;
                        at += n;
                    }
                }
            }
            RoundWork::Dirty(bm) => {
                let mut run: Option<(u64, u64)> = None;
                for gpa in bm.iter().skip_while(|&g| g < lo).take_while(|&g| g < hi) {
                    run = match run {
                        Some((start, n)) if start + n * PAGE == gpa && n < MAX_RUN_PAGES => {
                            Some((start, n + 1))
                        }
                        Some((start, n)) => {
                            sender.send_range(w, mem, start, n * PAGE, pager)?;
                            Some((gpa, 1))
                        }
                        None => Some((gpa, 1)),
                    };
                }
                if let Some((start, n)) = run {
                    sender.send_range(w, mem, start, n * PAGE, pager)?;
                }
            }
        }
        Ok(())
    }
}

/// One lane: its stream and its sender's buffer.
struct LaneOut {
    w: StreamWriter<Connection>,
    sender: RamSender,
}

/// The lanes of a migration (none with one connection).
#[derive(Default)]
pub struct SourceLanes {
    lanes: Vec<LaneOut>,
    /// Bytes written on each lane, once they are finished.
    finished: Vec<u64>,
}

impl std::fmt::Debug for SourceLanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceLanes")
            .field("lanes", &self.lanes.len())
            .finish()
    }
}

impl SourceLanes {
    /// Opens `connections - 1` lanes to `to`, each authenticated with `secret` when given and
    /// named by `token` (which the header sent on the main connection).
    pub fn open(
        to: &Address,
        connections: u32,
        token: &[u8; LANE_TOKEN],
        idle: Option<std::time::Duration>,
        secret: Option<&Secret>,
    ) -> Result<SourceLanes, MigrateError> {
        let io = |source| StreamError::Io { offset: 0, source };
        if connections > 1 {
            // The lanes read residency from /proc/self/pagemap, which their filter may not open.
            open_pagemap().map_err(io)?;
        }
        let mut lanes = Vec::new();
        for index in 1..connections {
            let mut conn = to.connect()?;
            conn.set_idle_timeout(idle).map_err(io)?;
            if let Some(secret) = secret {
                auth::prove_source(&mut conn, secret, &to.to_string())?;
            }
            lanes.push(LaneOut {
                w: StreamWriter::lane(conn, token, index)?,
                sender: RamSender::new(),
            });
        }
        Ok(SourceLanes {
            lanes,
            finished: Vec::new(),
        })
    }

    /// Connections in all (the main one and the lanes).
    pub fn connections(&self) -> usize {
        self.lanes.len() + 1
    }

    /// Bytes written on the lanes.
    pub fn bytes_written(&self) -> u64 {
        self.lane_bytes().iter().sum()
    }

    /// Bytes written on each lane, in lane order.
    pub fn lane_bytes(&self) -> Vec<u64> {
        let live = self.lanes.iter().map(|l| l.w.bytes_written());
        self.finished.iter().copied().chain(live).collect()
    }

    /// Sends round `round`'s `work`: the main connection's share on `w` with `sender` from
    /// this thread (the caller then ends the round with `ROUND`), each lane's from a thread of
    /// its own, ended with `LANE_END`. Returns when every share is sent; `guest_paused` as
    /// [`RamSender::guest_paused`].
    #[allow(clippy::too_many_arguments)]
    pub fn send_round<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        sender: &mut RamSender,
        mem: &GuestMemoryMmap,
        pager: Option<&dyn RamPager>,
        work: RoundWork<'_>,
        round: u32,
        guest_paused: bool,
    ) -> Result<(), MigrateError> {
        if self.lanes.is_empty() {
            return work.send_share(w, sender, mem, pager, 0, u64::MAX);
        }
        let b = boundaries(work.runs(), work.pages(), self.connections(), LANE_ALIGN);
        std::thread::scope(|s| {
            let mut threads = Vec::with_capacity(self.lanes.len());
            for (i, lane) in self.lanes.iter_mut().enumerate() {
                let (lo, hi) = (b[i + 1], b[i + 2]);
                lane.sender.guest_paused = guest_paused;
                let t = std::thread::Builder::new()
                    .name(format!("migrate-lane-{}", i + 1))
                    .spawn_scoped(s, move || -> Result<(), MigrateError> {
                        seccomp::enter(ThreadKind::MigrationLane);
                        work.send_share(&mut lane.w, &mut lane.sender, mem, pager, lo, hi)?;
                        lane.w.lane_end(round)?;
                        Ok(())
                    })
                    .map_err(|source| StreamError::Io { offset: 0, source })?;
                threads.push(t);
            }
            let mine = work.send_share(w, sender, mem, pager, b[0], b[1]);
            let mut res = mine;
            for (i, t) in threads.into_iter().enumerate() {
                let lane = t
                    .join()
                    .unwrap_or_else(|_| Err(MigrateError::Refused("its thread panicked".into())));
                if let (Ok(()), Err(e)) = (&res, lane) {
                    res = Err(MigrateError::Lane {
                        index: i as u32 + 1,
                        source: Box::new(e),
                    });
                }
            }
            res
        })
    }

    /// Ends every lane (`END`, flushed) and closes it: the rest of the migration uses the
    /// main connection only.
    pub fn finish(&mut self) -> Result<(), MigrateError> {
        for (i, lane) in self.lanes.drain(..).enumerate() {
            let mut w = lane.w;
            w.end().map_err(|e| MigrateError::Lane {
                index: i as u32 + 1,
                source: Box::new(e.into()),
            })?;
            self.finished.push(w.bytes_written());
            let conn = w.into_inner()?;
            let _ = conn.shutdown_write();
        }
        Ok(())
    }
}
