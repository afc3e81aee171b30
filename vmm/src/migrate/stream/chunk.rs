//! A chunk as read off the wire: the typed [`Chunk`], its payload parser and its name.

#[cfg(doc)]
use super::format::DEST_DEMAND_PAGING;
use super::format::{kind, kind_name, DISCARD_RUN_BYTES, PAGE_SIZE};

/// One chunk as read; data borrows the reader's buffer until the next read.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// Pages starting at `gpa`; `data.len()` is a multiple of [`PAGE_SIZE`].
    Pages {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// The page contents.
        data: &'a [u8],
    },
    /// `count` zero pages starting at `gpa`.
    ZeroPages {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// Number of pages.
        count: u64,
    },
    /// The state blob of one vCPU.
    Vcpu {
        /// vCPU id.
        id: u32,
        /// Encoded [`crate::migrate::state::VcpuState`].
        blob: &'a [u8],
    },
    /// The state blob of one device (or of the VM: irqchip, PIT, clock).
    Device {
        /// Device name.
        name: &'a str,
        /// Encoded state.
        blob: &'a [u8],
    },
    /// Marks the end of precopy round `round`, which sent `dirty_pages` pages.
    Round {
        /// Round number.
        round: u32,
        /// Pages sent in the round.
        dirty_pages: u64,
    },
    /// The source has sent everything.
    End,
    /// The destination's guest runs (sent back to the source).
    GuestRunning,
    /// Postcopy: the destination faulted on `count` pages at `gpa` and needs them first.
    PageRequest {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// Number of pages.
        count: u32,
    },
    /// What the destination can receive (sent once, right after it accepts).
    DestInfo {
        /// Its host page size: postcopy pages travel in whole pages of this size.
        host_page: u64,
        /// [`DEST_DEMAND_PAGING`] and future flags.
        flags: u32,
    },
    /// Postcopy: the pages of these runs changed since they were sent; the destination drops
    /// its copies and takes them from the postcopy phase. Sent in a discard round before the
    /// source pauses and again at the switch; after it, the source sends no data for those
    /// pages until the switch (the destination would keep such a copy over the pushed one).
    Discard {
        /// Raw runs, 12 bytes each; iterate with [`discard_runs`].
        runs: &'a [u8],
    },
    /// Postcopy switch: the state is complete, the guest may run; the discarded pages follow.
    Postcopy,
    /// Destination to source: every postcopy page is in place; the source may exit.
    AllReceived,
    /// Destination to source: everything up to the end of precopy round `round` is in
    /// guest memory here. The source times its rounds (and so its downtime estimate) by
    /// these, not by how fast its socket takes bytes.
    RoundApplied {
        /// Round number.
        round: u32,
    },
    /// The CRC-32 of each page from `gpa` on, as the source's RAM was at the pause.
    Digest {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// Raw little-endian u32s, one per page; iterate with [`digest_crcs`].
        crcs: &'a [u8],
    },
    /// On a lane: this lane's share of round `round` is sent.
    LaneEnd {
        /// Round number.
        round: u32,
    },
}

/// The (gpa, count) runs of a `Discard` chunk's payload.
pub fn discard_runs(runs: &[u8]) -> impl Iterator<Item = (u64, u32)> + '_ {
    runs.chunks_exact(DISCARD_RUN_BYTES).map(|r| {
        (
            u64::from_le_bytes(r[..8].try_into().unwrap()),
            u32::from_le_bytes(r[8..].try_into().unwrap()),
        )
    })
}

/// The CRCs of a `Digest` chunk's payload.
pub fn digest_crcs(crcs: &[u8]) -> impl ExactSizeIterator<Item = u32> + '_ {
    crcs.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
}

/// A little-endian reader over a payload with errors naming what was short.
pub(super) struct Cursor<'a>(pub(super) &'a [u8]);

impl<'a> Cursor<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "payload too short: needs {n} more bytes, has {}",
                self.0.len()
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(super) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub(super) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub(super) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    pub(super) fn finish(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} unexpected trailing payload bytes",
                self.0.len()
            ))
        }
    }
}

/// `gpa` if it is page aligned, as every writer puts it (a reader refuses what no writer
/// sends: an unaligned address would reach guest memory or the pager as a partial page).
fn page_aligned(gpa: u64, what: &str) -> Result<u64, String> {
    if gpa.is_multiple_of(PAGE_SIZE as u64) {
        Ok(gpa)
    } else {
        Err(format!("{what} chunk at unaligned address {gpa:#x}"))
    }
}

/// Parses the payload of a chunk of kind `k` (never `HEADER`, which only the start may carry).
pub(super) fn parse_payload(k: u32, payload: &[u8]) -> Result<Chunk<'_>, String> {
    let mut c = Cursor(payload);
    Ok(match k {
        kind::PAGES => {
            let gpa = page_aligned(c.u64()?, "pages")?;
            let data = c.rest();
            if data.is_empty() || !data.len().is_multiple_of(PAGE_SIZE) {
                return Err(format!(
                    "pages chunk carries {} bytes, not a whole number of pages",
                    data.len()
                ));
            }
            Chunk::Pages { gpa, data }
        }
        kind::ZERO_PAGES => {
            let gpa = page_aligned(c.u64()?, "zero-pages")?;
            let count = c.u64()?;
            c.finish()?;
            Chunk::ZeroPages { gpa, count }
        }
        kind::VCPU => {
            let id = c.u32()?;
            Chunk::Vcpu { id, blob: c.rest() }
        }
        kind::DEVICE => {
            let n = c.u8()? as usize;
            let name = std::str::from_utf8(c.take(n)?)
                .map_err(|e| format!("device name is not UTF-8: {e}"))?;
            Chunk::Device {
                name,
                blob: c.rest(),
            }
        }
        kind::ROUND => {
            let round = c.u32()?;
            let dirty_pages = c.u64()?;
            c.finish()?;
            Chunk::Round { round, dirty_pages }
        }
        kind::END => {
            c.finish()?;
            Chunk::End
        }
        kind::GUEST_RUNNING => {
            c.finish()?;
            Chunk::GuestRunning
        }
        kind::PAGE_REQUEST => {
            let gpa = page_aligned(c.u64()?, "page-request")?;
            let count = c.u32()?;
            c.finish()?;
            if count == 0 {
                return Err("page-request chunk asks for 0 pages".into());
            }
            Chunk::PageRequest { gpa, count }
        }
        kind::DEST_INFO => {
            let host_page = c.u64()?;
            let flags = c.u32()?;
            c.finish()?;
            if !host_page.is_power_of_two() || host_page < PAGE_SIZE as u64 {
                return Err(format!(
                    "destination host page size {host_page} is impossible"
                ));
            }
            Chunk::DestInfo { host_page, flags }
        }
        kind::DISCARD => {
            let runs = c.rest();
            if !runs.len().is_multiple_of(DISCARD_RUN_BYTES) {
                return Err(format!(
                    "discard chunk of {} bytes is not whole {DISCARD_RUN_BYTES}-byte runs",
                    runs.len()
                ));
            }
            for (gpa, count) in discard_runs(runs) {
                page_aligned(gpa, "discard")?;
                if count == 0 {
                    return Err(format!("discard chunk has a run of 0 pages at {gpa:#x}"));
                }
            }
            Chunk::Discard { runs }
        }
        kind::POSTCOPY => {
            c.finish()?;
            Chunk::Postcopy
        }
        kind::ALL_RECEIVED => {
            c.finish()?;
            Chunk::AllReceived
        }
        kind::ROUND_APPLIED => {
            let round = c.u32()?;
            c.finish()?;
            Chunk::RoundApplied { round }
        }
        kind::DIGEST => {
            let gpa = page_aligned(c.u64()?, "digest")?;
            let crcs = c.rest();
            if crcs.is_empty() || !crcs.len().is_multiple_of(4) {
                return Err(format!(
                    "digest chunk of {} bytes is not whole 4-byte CRCs",
                    crcs.len()
                ));
            }
            Chunk::Digest { gpa, crcs }
        }
        kind::LANE_END => {
            let round = c.u32()?;
            c.finish()?;
            Chunk::LaneEnd { round }
        }
        _ => return Err(format!("{} chunk after the start", kind_name(k))),
    })
}

/// The wire name of a chunk.
pub fn chunk_name(c: &Chunk<'_>) -> &'static str {
    match c {
        Chunk::Pages { .. } => "pages",
        Chunk::ZeroPages { .. } => "zero-pages",
        Chunk::Vcpu { .. } => "vcpu-state",
        Chunk::Device { .. } => "device-state",
        Chunk::Round { .. } => "round",
        Chunk::End => "end",
        Chunk::GuestRunning => "guest-running",
        Chunk::PageRequest { .. } => "page-request",
        Chunk::DestInfo { .. } => "destination-info",
        Chunk::Discard { .. } => "discard",
        Chunk::Postcopy => "postcopy",
        Chunk::AllReceived => "all-received",
        Chunk::RoundApplied { .. } => "round-applied",
        Chunk::LaneEnd { .. } => "lane-end",
        Chunk::Digest { .. } => "digest",
    }
}
