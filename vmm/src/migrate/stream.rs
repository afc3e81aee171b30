//! The migration wire format: a versioned header naming the guest layout, then typed chunks
//! (RAM pages, zero-page runs, vCPU and device state, round markers, end, the destination's
//! "guest running" acknowledgement), each framed with its length and a CRC-32.
//!
//! ```text
//! stream := MAGIC (8 bytes) VERSION (u32 LE) header-chunk chunk* end-chunk
//! chunk  := kind (u32 LE) len (u32 LE) payload (len bytes) crc (u32 LE)
//!           crc = CRC-32 (IEEE, crc32fast) over kind, len and payload
//! ```
//!
//! Payloads (all integers little-endian):
//!
//! | kind | payload |
//! |------|---------|
//! | `HEADER` | page_size u32, vcpus u32, nr_regions u32, then (gpa u64, len u64) per region, then spec_len u32 and the machine spec (JSON: memory, vCPUs, backing, payload; empty when none) |
//! | `PAGES` | gpa u64, then a whole number of pages (at most [`MAX_PAGES_PER_CHUNK`]) |
//! | `ZERO_PAGES` | gpa u64, count u64: `count` pages of zeros, no data |
//! | `VCPU` | vcpu id u32, then the state blob |
//! | `DEVICE` | name length u8, name (UTF-8), then the state blob |
//! | `ROUND` | round u32, dirty pages u64 |
//! | `END` | empty |
//! | `GUEST_RUNNING` | empty (destination to source) |
//! | `PAGE_REQUEST` | gpa u64, count u32 (destination to source, postcopy: send these first) |
//! | `DEST_INFO` | host page size u64, flags u32 (destination to source, right after accept) |
//! | `DISCARD` | (gpa u64, count u32) runs: pages whose copy here is stale (postcopy switch) |
//! | `POSTCOPY` | empty: the guest may run; the discarded pages follow, then `END` |
//! | `ALL_RECEIVED` | empty (destination to source: every postcopy page is in place) |
//! | `ROUND_APPLIED` | round u32 (destination to source: that round is in guest RAM here; the source waits for it before it times the round and harvests again) |
//!
//! The reader keeps one reusable buffer, so reading a chunk allocates nothing after the first
//! large one; [`StreamReader::next_chunk_into`] reads page data straight into the caller's
//! memory instead. The writer checksums page data straight from the caller's slice.

use std::io::{self, BufWriter, Read, Write};

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"VMMMIGR\0";
/// The format version this code writes and reads (2: postcopy chunks; 3: the destination
/// acknowledges each precopy round once it has applied it; 4: the header carries the machine
/// spec, so a destination needs nothing but its address; 5: a vCPU's state carries its XSAVE
/// image, which has MXCSR).
pub const VERSION: u32 = 5;
/// The page size of `PAGES` and `ZERO_PAGES` chunks.
pub const PAGE_SIZE: usize = 4096;
/// Most pages carried by one `PAGES` chunk (1 MiB of data).
pub const MAX_PAGES_PER_CHUNK: usize = 256;
/// Largest payload a reader accepts: a full `PAGES` chunk plus its address.
pub const MAX_PAYLOAD: usize = MAX_PAGES_PER_CHUNK * PAGE_SIZE + 8;
/// Bytes of a chunk frame around the payload (kind, len, crc).
pub const FRAME_OVERHEAD: usize = 12;
/// Most RAM regions a header may list (a corrupted count is refused before allocating).
const MAX_REGIONS: usize = 64;
/// Longest machine spec a header may carry.
pub const MAX_SPEC: usize = 64 << 10;
/// Capacity of the writer's buffer.
const WRITE_BUFFER: usize = 256 << 10;

/// Chunk kinds on the wire.
mod kind {
    pub const HEADER: u32 = 1;
    pub const PAGES: u32 = 2;
    pub const ZERO_PAGES: u32 = 3;
    pub const VCPU: u32 = 4;
    pub const DEVICE: u32 = 5;
    pub const ROUND: u32 = 6;
    pub const END: u32 = 7;
    pub const GUEST_RUNNING: u32 = 8;
    pub const PAGE_REQUEST: u32 = 9;
    pub const DEST_INFO: u32 = 10;
    pub const DISCARD: u32 = 11;
    pub const POSTCOPY: u32 = 12;
    pub const ALL_RECEIVED: u32 = 13;
    pub const ROUND_APPLIED: u32 = 14;
    /// The highest kind a reader accepts.
    pub const LAST: u32 = ROUND_APPLIED;
}

/// `DEST_INFO` flag: the destination runs with demand paging (it can receive postcopy).
pub const DEST_DEMAND_PAGING: u32 = 1 << 0;
/// Bytes of one `DISCARD` run on the wire (gpa u64, count u32).
const DISCARD_RUN_BYTES: usize = 12;
/// Most runs one `DISCARD` chunk carries.
pub const MAX_DISCARD_RUNS: usize = (MAX_PAYLOAD - 8) / DISCARD_RUN_BYTES;

fn kind_name(k: u32) -> &'static str {
    match k {
        kind::HEADER => "header",
        kind::PAGES => "pages",
        kind::ZERO_PAGES => "zero-pages",
        kind::VCPU => "vcpu-state",
        kind::DEVICE => "device-state",
        kind::ROUND => "round",
        kind::END => "end",
        kind::GUEST_RUNNING => "guest-running",
        kind::PAGE_REQUEST => "page-request",
        kind::DEST_INFO => "destination-info",
        kind::DISCARD => "discard",
        kind::POSTCOPY => "postcopy",
        kind::ALL_RECEIVED => "all-received",
        kind::ROUND_APPLIED => "round-applied",
        _ => "unknown",
    }
}

/// Errors reading or writing a migration stream. Offsets are byte offsets from the start of
/// the stream; chunk numbers count from 0 (the header chunk).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The transport failed.
    #[error("migration stream I/O error at offset {offset}: {source}")]
    Io {
        /// Where.
        offset: u64,
        /// The error.
        source: io::Error,
    },
    /// The stream ended in the middle of something.
    #[error("migration stream truncated at offset {offset} inside chunk {chunk} ({what}): the source stopped or the connection dropped; the source VM keeps running, retry the migration")]
    Truncated {
        /// Where the data ran out.
        offset: u64,
        /// Chunk number.
        chunk: u64,
        /// Which part was missing.
        what: &'static str,
    },
    /// Not a migration stream.
    #[error("not a vmm migration stream (magic {found:02x?}): check that --incoming and the source's --to name the same address")]
    BadMagic {
        /// The first bytes read.
        found: [u8; 8],
    },
    /// Another format version.
    #[error("migration stream version {found}, this vmm reads version {VERSION}: run the same vmm build on both sides")]
    Version {
        /// The stream's version.
        found: u32,
    },
    /// A chunk's checksum does not match its bytes.
    #[error("migration stream corrupted: checksum mismatch in chunk {chunk} ({kind}) at offset {offset} (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Chunk number.
        chunk: u64,
        /// Chunk kind name.
        kind: &'static str,
        /// Offset of the chunk frame.
        offset: u64,
        /// CRC on the wire.
        stored: u32,
        /// CRC of the bytes received.
        computed: u32,
    },
    /// A chunk frame is impossible (unknown kind, oversized length, bad payload shape).
    #[error("migration stream corrupted: chunk {chunk} at offset {offset}: {what}")]
    Malformed {
        /// Chunk number.
        chunk: u64,
        /// Offset of the chunk frame.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A chunk arrived where another was required.
    #[error("migration stream out of order: chunk {chunk} at offset {offset} is {found}, expected {expected}")]
    Unexpected {
        /// Chunk number.
        chunk: u64,
        /// Offset of the chunk frame.
        offset: u64,
        /// What came.
        found: &'static str,
        /// What was required.
        expected: &'static str,
    },
    /// Source and destination disagree on the vCPU count.
    #[error("source has {source_vcpus} vCPUs, this VM has {here}: start the destination with --cpus {source_vcpus}")]
    VcpuMismatch {
        /// Source's count.
        source_vcpus: u32,
        /// Ours.
        here: u32,
    },
    /// Source and destination disagree on guest RAM.
    #[error("source guest RAM is {source_ram} ({source_regions}), this VM has {here_ram} ({here_regions}): start the destination with --mem {source_ram}")]
    RamMismatch {
        /// Source's total, human readable.
        source_ram: String,
        /// Source's regions.
        source_regions: String,
        /// Our total.
        here_ram: String,
        /// Our regions.
        here_regions: String,
    },
    /// Source and destination disagree on the page size.
    #[error("source streams {source_page}-byte pages, this vmm uses {here}: run the same vmm build on both sides")]
    PageSizeMismatch {
        /// Source's page size.
        source_page: u32,
        /// Ours.
        here: u32,
    },
    /// A writer call with impossible arguments (a bug in the caller).
    #[error("invalid migration chunk: {0}")]
    InvalidArgument(String),
}

/// What both ends must agree on before any page moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Page size of page chunks (always [`PAGE_SIZE`] for this version).
    pub page_size: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM regions as (gpa, len), in guest-physical order.
    pub regions: Vec<(u64, u64)>,
    /// What the destination builds before it receives: the machine spec as JSON
    /// (`crate::machine::spec`), empty when the sender has none. Not compared by
    /// [`accept`](Layout::accept).
    pub spec: Vec<u8>,
}

impl Layout {
    /// The layout of a VM with `vcpus` vCPUs over `regions`.
    pub fn new(vcpus: u32, regions: impl IntoIterator<Item = (u64, u64)>) -> Layout {
        Layout {
            page_size: PAGE_SIZE as u32,
            vcpus,
            regions: regions.into_iter().collect(),
            spec: Vec::new(),
        }
    }

    /// This layout with `spec` as its machine spec.
    pub fn with_spec(mut self, spec: Vec<u8>) -> Layout {
        self.spec = spec;
        self
    }

    /// Total RAM bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }

    /// Checks that a stream from `source` can be received by a VM with this layout.
    pub fn accept(&self, source: &Layout) -> Result<(), StreamError> {
        if source.page_size != self.page_size {
            return Err(StreamError::PageSizeMismatch {
                source_page: source.page_size,
                here: self.page_size,
            });
        }
        if source.regions != self.regions {
            let regions = |l: &Layout| {
                l.regions
                    .iter()
                    .map(|(g, n)| format!("{g:#x}+{n:#x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(StreamError::RamMismatch {
                source_ram: crate::memory::human(source.ram_bytes()),
                source_regions: regions(source),
                here_ram: crate::memory::human(self.ram_bytes()),
                here_regions: regions(self),
            });
        }
        if source.vcpus != self.vcpus {
            return Err(StreamError::VcpuMismatch {
                source_vcpus: source.vcpus,
                here: self.vcpus,
            });
        }
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + 16 * self.regions.len());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.vcpus.to_le_bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (gpa, len) in &self.regions {
            out.extend_from_slice(&gpa.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(&(self.spec.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.spec);
        out
    }

    fn decode(p: &[u8]) -> Result<Layout, String> {
        let mut c = Cursor(p);
        let page_size = c.u32()?;
        let vcpus = c.u32()?;
        let n = c.u32()? as usize;
        if n > MAX_REGIONS {
            return Err(format!(
                "header lists {n} RAM regions (at most {MAX_REGIONS})"
            ));
        }
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            regions.push((c.u64()?, c.u64()?));
        }
        let spec_len = c.u32()? as usize;
        if spec_len > MAX_SPEC {
            return Err(format!(
                "header carries a {spec_len}-byte machine spec (at most {MAX_SPEC})"
            ));
        }
        let spec = c.take(spec_len)?.to_vec();
        c.finish()?;
        Ok(Layout {
            page_size,
            vcpus,
            regions,
            spec,
        })
    }
}

/// A little-endian reader over a payload with errors naming what was short.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
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
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn finish(&self) -> Result<(), String> {
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
        /// Encoded [`super::state::VcpuState`].
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

/// Writes a migration stream over any `Write`, buffered, counting the bytes.
pub struct StreamWriter<W: Write> {
    out: BufWriter<W>,
    offset: u64,
}

impl<W: Write> std::fmt::Debug for StreamWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream: magic, version and the header chunk describing `layout`.
    pub fn new(out: W, layout: &Layout) -> Result<StreamWriter<W>, StreamError> {
        let mut w = StreamWriter::headless(out);
        let mut start = [0u8; 12];
        start[..8].copy_from_slice(&MAGIC);
        start[8..].copy_from_slice(&VERSION.to_le_bytes());
        w.put(&start)?;
        w.chunk(kind::HEADER, &[&layout.encode()])?;
        // The destination builds its machine from the header before it says what it can
        // receive, which a postcopy source waits for: the header must not sit in the buffer.
        w.flush()?;
        Ok(w)
    }

    /// A writer of bare chunks without magic or header: the destination's reply channel.
    pub fn headless(out: W) -> StreamWriter<W> {
        StreamWriter {
            out: BufWriter::with_capacity(WRITE_BUFFER, out),
            offset: 0,
        }
    }

    fn put(&mut self, b: &[u8]) -> Result<(), StreamError> {
        let offset = self.offset;
        self.out
            .write_all(b)
            .map_err(|source| StreamError::Io { offset, source })?;
        self.offset += b.len() as u64;
        Ok(())
    }

    /// One frame whose payload is the concatenation of `parts` (no copy of the parts).
    fn chunk(&mut self, k: u32, parts: &[&[u8]]) -> Result<(), StreamError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_PAYLOAD {
            return Err(StreamError::InvalidArgument(format!(
                "{} chunk of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit",
                kind_name(k)
            )));
        }
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&k.to_le_bytes());
        head[4..].copy_from_slice(&(len as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        self.put(&head)?;
        for p in parts {
            crc.update(p);
            self.put(p)?;
        }
        self.put(&crc.finalize().to_le_bytes())
    }

    /// Pages at `gpa`: `data` is a whole number of pages, split into chunks of at most
    /// [`MAX_PAGES_PER_CHUNK`] pages.
    pub fn pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), StreamError> {
        if !data.len().is_multiple_of(PAGE_SIZE) || !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(StreamError::InvalidArgument(format!(
                "pages at {gpa:#x} of {} bytes are not whole {PAGE_SIZE}-byte pages",
                data.len()
            )));
        }
        for (i, run) in data.chunks(MAX_PAGES_PER_CHUNK * PAGE_SIZE).enumerate() {
            let at = gpa + (i * MAX_PAGES_PER_CHUNK * PAGE_SIZE) as u64;
            self.chunk(kind::PAGES, &[&at.to_le_bytes(), run])?;
        }
        Ok(())
    }

    /// `count` zero pages at `gpa`, without data.
    pub fn zero_pages(&mut self, gpa: u64, count: u64) -> Result<(), StreamError> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(StreamError::InvalidArgument(format!(
                "zero pages at unaligned {gpa:#x}"
            )));
        }
        self.chunk(
            kind::ZERO_PAGES,
            &[&gpa.to_le_bytes(), &count.to_le_bytes()],
        )
    }

    /// Guest memory `data` at `gpa` (whole pages): runs of zero pages become zero-page chunks,
    /// the rest page chunks. Returns the number of zero pages found.
    pub fn ram(&mut self, gpa: u64, data: &[u8]) -> Result<u64, StreamError> {
        let pages = data.len() / PAGE_SIZE;
        let mut zeros = 0u64;
        let mut i = 0;
        while i < pages {
            let zero = is_zero(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
            let mut j = i + 1;
            while j < pages && is_zero(&data[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]) == zero {
                j += 1;
            }
            let at = gpa + (i * PAGE_SIZE) as u64;
            if zero {
                zeros += (j - i) as u64;
                self.zero_pages(at, (j - i) as u64)?;
            } else {
                self.pages(at, &data[i * PAGE_SIZE..j * PAGE_SIZE])?;
            }
            i = j;
        }
        Ok(zeros)
    }

    /// The state blob of vCPU `id`.
    pub fn vcpu(&mut self, id: u32, blob: &[u8]) -> Result<(), StreamError> {
        self.chunk(kind::VCPU, &[&id.to_le_bytes(), blob])
    }

    /// The state blob of device `name` (at most 255 bytes of UTF-8).
    pub fn device(&mut self, name: &str, blob: &[u8]) -> Result<(), StreamError> {
        let n = u8::try_from(name.len()).map_err(|_| {
            StreamError::InvalidArgument(format!("device name `{name}` is over 255 bytes"))
        })?;
        self.chunk(kind::DEVICE, &[&[n], name.as_bytes(), blob])
    }

    /// The end of round `round`, which sent `dirty_pages` pages.
    pub fn round(&mut self, round: u32, dirty_pages: u64) -> Result<(), StreamError> {
        self.chunk(
            kind::ROUND,
            &[&round.to_le_bytes(), &dirty_pages.to_le_bytes()],
        )
    }

    /// End of stream; flushes.
    pub fn end(&mut self) -> Result<(), StreamError> {
        self.chunk(kind::END, &[])?;
        self.flush()
    }

    /// The destination's "guest running" acknowledgement; flushes.
    pub fn guest_running(&mut self) -> Result<(), StreamError> {
        self.chunk(kind::GUEST_RUNNING, &[])?;
        self.flush()
    }

    /// Postcopy: asks the source for `count` pages at `gpa` ahead of its background push; flushes.
    pub fn page_request(&mut self, gpa: u64, count: u32) -> Result<(), StreamError> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) || count == 0 {
            return Err(StreamError::InvalidArgument(format!(
                "page request for {count} pages at {gpa:#x}"
            )));
        }
        self.chunk(
            kind::PAGE_REQUEST,
            &[&gpa.to_le_bytes(), &count.to_le_bytes()],
        )?;
        self.flush()
    }

    /// Destination to source: what this destination can receive; flushes.
    pub fn dest_info(&mut self, host_page: u64, flags: u32) -> Result<(), StreamError> {
        self.chunk(
            kind::DEST_INFO,
            &[&host_page.to_le_bytes(), &flags.to_le_bytes()],
        )?;
        self.flush()
    }

    /// Postcopy switch: runs of stale pages, as many chunks as needed.
    pub fn discard(&mut self, runs: &[(u64, u32)]) -> Result<(), StreamError> {
        for part in runs.chunks(MAX_DISCARD_RUNS) {
            let mut payload = Vec::with_capacity(part.len() * DISCARD_RUN_BYTES);
            for (gpa, count) in part {
                if !gpa.is_multiple_of(PAGE_SIZE as u64) || *count == 0 {
                    return Err(StreamError::InvalidArgument(format!(
                        "discard run of {count} pages at {gpa:#x}"
                    )));
                }
                payload.extend_from_slice(&gpa.to_le_bytes());
                payload.extend_from_slice(&count.to_le_bytes());
            }
            self.chunk(kind::DISCARD, &[&payload])?;
        }
        Ok(())
    }

    /// Postcopy switch: the guest may run on the destination; flushes.
    pub fn postcopy(&mut self) -> Result<(), StreamError> {
        self.chunk(kind::POSTCOPY, &[])?;
        self.flush()
    }

    /// Destination to source: every postcopy page is in place; flushes.
    pub fn all_received(&mut self) -> Result<(), StreamError> {
        self.chunk(kind::ALL_RECEIVED, &[])?;
        self.flush()
    }

    /// Destination to source: round `round` is applied; flushes.
    pub fn round_applied(&mut self, round: u32) -> Result<(), StreamError> {
        self.chunk(kind::ROUND_APPLIED, &[&round.to_le_bytes()])?;
        self.flush()
    }

    /// Pushes buffered bytes to the transport.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        let offset = self.offset;
        self.out
            .flush()
            .map_err(|source| StreamError::Io { offset, source })
    }

    /// Bytes written so far (including buffered ones).
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Flushes and returns the transport.
    pub fn into_inner(self) -> Result<W, StreamError> {
        let offset = self.offset;
        self.out.into_inner().map_err(|e| StreamError::Io {
            offset,
            source: e.into_error(),
        })
    }
}

/// True when every byte of `page` is zero. Works 64 bytes at a time: the OR of eight words
/// vectorises, and a data page usually exits in its first block.
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    for block in &mut blocks {
        let acc = block.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap())
        });
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Where [`StreamReader::next_chunk_into`] may put the data of a `Pages` chunk.
pub trait PageSink {
    /// The memory for the `len` bytes of pages at `gpa`, or `None` to receive them in the
    /// reader's buffer as a plain [`Chunk::Pages`] (e.g. a range outside guest RAM, which the
    /// caller then reports).
    fn direct(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]>;
}

/// What [`StreamReader::next_chunk_into`] read.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// Any chunk, as [`StreamReader::next_chunk`] returns it.
    Chunk(Chunk<'a>),
    /// `len` bytes of pages at `gpa`, already in the sink's memory with a good checksum.
    PagesInPlace {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// Bytes.
        len: usize,
    },
}

/// Reads a migration stream from any `Read`. Each chunk costs two reads (frame head, then payload
/// and CRC); wrap the transport in a `BufReader` when it carries many small chunks.
pub struct StreamReader<R: Read> {
    input: R,
    offset: u64,
    chunk: u64,
    buf: Vec<u8>,
    ended: bool,
}

impl<R: Read> std::fmt::Debug for StreamReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("offset", &self.offset)
            .field("chunk", &self.chunk)
            .finish_non_exhaustive()
    }
}

impl<R: Read> StreamReader<R> {
    /// Reads magic, version and header; checks the source's layout against `here`.
    pub fn new(input: R, here: &Layout) -> Result<(StreamReader<R>, Layout), StreamError> {
        let (r, layout) = StreamReader::open(input)?;
        here.accept(&layout)?;
        Ok((r, layout))
    }

    /// Reads magic, version and header, and returns the source's layout unchecked (a
    /// destination that builds its VM from the header's spec checks it afterwards).
    pub fn open(input: R) -> Result<(StreamReader<R>, Layout), StreamError> {
        let mut r = StreamReader::headless(input);
        let mut start = [0u8; 12];
        r.fill(&mut start, "magic and version")?;
        let magic: [u8; 8] = start[..8].try_into().unwrap();
        if magic != MAGIC {
            return Err(StreamError::BadMagic { found: magic });
        }
        let version = u32::from_le_bytes(start[8..].try_into().unwrap());
        if version != VERSION {
            return Err(StreamError::Version { found: version });
        }
        let frame = r.offset;
        let (k, len) = r.frame()?;
        if k != kind::HEADER {
            return Err(StreamError::Unexpected {
                chunk: 0,
                offset: frame,
                found: kind_name(k),
                expected: "header",
            });
        }
        let layout = Layout::decode(&r.buf[..len]).map_err(|what| StreamError::Malformed {
            chunk: 0,
            offset: frame,
            what,
        })?;
        r.chunk = 1;
        Ok((r, layout))
    }

    /// A reader of bare chunks (the source reading the destination's acknowledgement).
    pub fn headless(input: R) -> StreamReader<R> {
        StreamReader {
            input,
            offset: 0,
            chunk: 0,
            buf: Vec::new(),
            ended: false,
        }
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    fn fill(&mut self, dst: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        let mut done = 0;
        while done < dst.len() {
            match self.input.read(&mut dst[done..]) {
                Ok(0) => {
                    return Err(StreamError::Truncated {
                        offset: self.offset + done as u64,
                        chunk: self.chunk,
                        what,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StreamError::Io {
                        offset: self.offset + done as u64,
                        source,
                    })
                }
            }
        }
        self.offset += done as u64;
        Ok(())
    }

    /// Reads one frame into `buf`, checking length and CRC; returns (kind, payload length).
    fn frame(&mut self) -> Result<(u32, usize), StreamError> {
        let frame = self.offset;
        let mut head = [0u8; 8];
        self.fill(&mut head, "chunk header")?;
        self.frame_after_head(frame, head)
    }

    /// [`Self::frame`] once the 8-byte `head` of the frame at `frame` is read.
    fn frame_after_head(&mut self, frame: u64, head: [u8; 8]) -> Result<(u32, usize), StreamError> {
        let k = u32::from_le_bytes(head[..4].try_into().unwrap());
        let len = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
        if !(kind::HEADER..=kind::LAST).contains(&k) {
            return Err(StreamError::Malformed {
                chunk: self.chunk,
                offset: frame,
                what: format!("unknown chunk kind {k}"),
            });
        }
        if len > MAX_PAYLOAD {
            return Err(StreamError::Malformed {
                chunk: self.chunk,
                offset: frame,
                what: format!(
                    "{} chunk claims {len} payload bytes (at most {MAX_PAYLOAD})",
                    kind_name(k)
                ),
            });
        }
        if self.buf.len() < len + 4 {
            self.buf.resize(len + 4, 0);
        }
        let mut body = std::mem::take(&mut self.buf);
        let res = self.fill(&mut body[..len + 4], "chunk payload and checksum");
        self.buf = body;
        res?;
        self.check_crc(frame, k, &head, len)?;
        Ok((k, len))
    }

    /// Checks the CRC after the `len` payload bytes in `buf` against head and payload.
    fn check_crc(&self, frame: u64, k: u32, head: &[u8; 8], len: usize) -> Result<(), StreamError> {
        let stored = u32::from_le_bytes(self.buf[len..len + 4].try_into().unwrap());
        let mut crc = crc32fast::Hasher::new();
        crc.update(head);
        crc.update(&self.buf[..len]);
        self.compare_crc(frame, k, stored, crc.finalize())
    }

    /// The checksum error for the chunk at `frame` of kind `k`, unless the CRCs agree.
    fn compare_crc(
        &self,
        frame: u64,
        k: u32,
        stored: u32,
        computed: u32,
    ) -> Result<(), StreamError> {
        if stored != computed {
            return Err(StreamError::Checksum {
                chunk: self.chunk,
                kind: kind_name(k),
                offset: frame,
                stored,
                computed,
            });
        }
        Ok(())
    }

    /// The next chunk, with the data of a `Pages` chunk read straight into the memory
    /// `sink` offers for it (one copy from the socket instead of two). The checksum is
    /// tested after the data landed: on a mismatch the memory holds the corrupted bytes and
    /// the error says so, so a sink is only for memory nothing uses until the stream ends
    /// well (a destination's RAM before its guest runs).
    pub fn next_chunk_into(
        &mut self,
        sink: &mut dyn PageSink,
    ) -> Result<Received<'_>, StreamError> {
        if self.ended {
            return Ok(Received::Chunk(Chunk::End));
        }
        let frame = self.offset;
        let mut head = [0u8; 8];
        self.fill(&mut head, "chunk header")?;
        let k = u32::from_le_bytes(head[..4].try_into().unwrap());
        let len = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
        let data_len = len.wrapping_sub(8);
        if k != kind::PAGES || len <= 8 || len > MAX_PAYLOAD || !data_len.is_multiple_of(PAGE_SIZE)
        {
            // Not page data (or a malformed frame, which the common path reports).
            let (k, len) = self.frame_after_head(frame, head)?;
            return self.parse(frame, k, len).map(Received::Chunk);
        }
        let mut gpa_bytes = [0u8; 8];
        self.fill(&mut gpa_bytes, "chunk payload and checksum")?;
        let gpa = u64::from_le_bytes(gpa_bytes);
        let Some(dst) = sink.direct(gpa, data_len) else {
            if self.buf.len() < len + 4 {
                self.buf.resize(len + 4, 0);
            }
            self.buf[..8].copy_from_slice(&gpa_bytes);
            let mut body = std::mem::take(&mut self.buf);
            let res = self.fill(&mut body[8..len + 4], "chunk payload and checksum");
            self.buf = body;
            res?;
            self.check_crc(frame, k, &head, len)?;
            return self.parse(frame, k, len).map(Received::Chunk);
        };
        self.fill(dst, "chunk payload and checksum")?;
        let mut stored = [0u8; 4];
        self.fill(&mut stored, "chunk payload and checksum")?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&gpa_bytes);
        crc.update(dst);
        self.compare_crc(frame, k, u32::from_le_bytes(stored), crc.finalize())?;
        self.chunk += 1;
        Ok(Received::PagesInPlace { gpa, len: data_len })
    }

    /// The next chunk. After `End`, further calls return `End` again without reading.
    pub fn next_chunk(&mut self) -> Result<Chunk<'_>, StreamError> {
        if self.ended {
            return Ok(Chunk::End);
        }
        let frame = self.offset;
        let (k, len) = self.frame()?;
        self.parse(frame, k, len)
    }

    /// Parses the frame of kind `k` at `frame` whose `len` payload bytes are in `buf`.
    fn parse(&mut self, frame: u64, k: u32, len: usize) -> Result<Chunk<'_>, StreamError> {
        let chunk = self.chunk;
        self.chunk += 1;
        if k == kind::END {
            self.ended = true;
        }
        let malformed = |what: String| StreamError::Malformed {
            chunk,
            offset: frame,
            what,
        };
        parse_payload(k, &self.buf[..len]).map_err(malformed)
    }

    /// Waits for the destination's acknowledgement that the guest runs (skipping its
    /// destination-info, which precopy does not need, and the acknowledgement of the last
    /// round, which the guest-running one implies).
    pub fn expect_guest_running(&mut self) -> Result<(), StreamError> {
        loop {
            let offset = self.offset;
            let chunk = self.chunk;
            match self.next_chunk()? {
                Chunk::GuestRunning => return Ok(()),
                Chunk::DestInfo { .. } | Chunk::RoundApplied { .. } => {}
                other => {
                    return Err(StreamError::Unexpected {
                        chunk,
                        offset,
                        found: chunk_name(&other),
                        expected: "guest-running",
                    })
                }
            }
        }
    }

    /// Waits for the destination's acknowledgement of round `round` (skipping its
    /// destination-info, which precopy does not need).
    pub fn expect_round_applied(&mut self, round: u32) -> Result<(), StreamError> {
        loop {
            let offset = self.offset;
            let chunk = self.chunk;
            match self.next_chunk()? {
                Chunk::RoundApplied { round: r } if r == round => return Ok(()),
                Chunk::DestInfo { .. } => {}
                other => {
                    return Err(StreamError::Unexpected {
                        chunk,
                        offset,
                        found: chunk_name(&other),
                        expected: "round-applied for the round just sent",
                    })
                }
            }
        }
    }

    /// Where the next chunk starts (offset, chunk number), for errors naming it.
    pub fn position(&self) -> (u64, u64) {
        (self.offset, self.chunk)
    }
}

/// Parses the payload of a chunk of kind `k` (never `HEADER`, which only the start may carry).
fn parse_payload(k: u32, payload: &[u8]) -> Result<Chunk<'_>, String> {
    let mut c = Cursor(payload);
    Ok(match k {
        kind::PAGES => {
            let gpa = c.u64()?;
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
            let gpa = c.u64()?;
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
            let gpa = c.u64()?;
            let count = c.u32()?;
            c.finish()?;
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_sees_one_set_byte_anywhere() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        for at in [0, 7, 63, 64, 1000, PAGE_SIZE - 1] {
            page[at] = 0x80;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(is_zero(&[0u8; 13]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn postcopy_chunks_round_trip() {
        let mut w = StreamWriter::headless(Vec::new());
        w.dest_info(2 << 20, DEST_DEMAND_PAGING).unwrap();
        w.discard(&[(0x1000, 3), (0x20_0000, 512)]).unwrap();
        w.postcopy().unwrap();
        w.page_request(0x40_0000, 512).unwrap();
        w.all_received().unwrap();
        let bytes = w.into_inner().unwrap();
        let mut r = StreamReader::headless(&bytes[..]);
        assert_eq!(
            r.next_chunk().unwrap(),
            Chunk::DestInfo {
                host_page: 2 << 20,
                flags: DEST_DEMAND_PAGING
            }
        );
        match r.next_chunk().unwrap() {
            Chunk::Discard { runs } => assert_eq!(
                discard_runs(runs).collect::<Vec<_>>(),
                vec![(0x1000, 3), (0x20_0000, 512)]
            ),
            c => panic!("{c:?}"),
        }
        assert_eq!(r.next_chunk().unwrap(), Chunk::Postcopy);
        assert_eq!(
            r.next_chunk().unwrap(),
            Chunk::PageRequest {
                gpa: 0x40_0000,
                count: 512
            }
        );
        assert_eq!(r.next_chunk().unwrap(), Chunk::AllReceived);
        assert!(StreamWriter::headless(Vec::new())
            .discard(&[(0x1001, 1)])
            .is_err());
    }

    /// A sink over a plain buffer standing for guest memory at gpa 0.
    struct VecSink(Vec<u8>);

    impl PageSink for VecSink {
        fn direct(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
            self.0.get_mut(gpa as usize..gpa as usize + len)
        }
    }

    /// Page data lands in the sink's memory; other chunks, and pages the sink declines,
    /// come back as chunks; a corrupted page chunk is reported after it landed.
    #[test]
    fn pages_are_read_straight_into_the_sink() {
        let data: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let mut w = StreamWriter::headless(Vec::new());
        w.pages(0x1000, &data).unwrap();
        w.zero_pages(0x8000, 3).unwrap();
        w.pages(0x10_0000, &data[..PAGE_SIZE]).unwrap();
        w.end().unwrap();
        let bytes = w.into_inner().unwrap();

        let mut sink = VecSink(vec![0; 16 * PAGE_SIZE]);
        let mut r = StreamReader::headless(&bytes[..]);
        assert_eq!(
            r.next_chunk_into(&mut sink).unwrap(),
            Received::PagesInPlace {
                gpa: 0x1000,
                len: 2 * PAGE_SIZE
            }
        );
        assert_eq!(
            r.next_chunk_into(&mut sink).unwrap(),
            Received::Chunk(Chunk::ZeroPages {
                gpa: 0x8000,
                count: 3
            })
        );
        // Outside the sink's memory: declined, read into the reader's buffer.
        match r.next_chunk_into(&mut sink).unwrap() {
            Received::Chunk(Chunk::Pages { gpa, data: d }) => {
                assert_eq!((gpa, d), (0x10_0000, &data[..PAGE_SIZE]))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r.next_chunk_into(&mut sink).unwrap(),
            Received::Chunk(Chunk::End)
        );
        assert_eq!(&sink.0[PAGE_SIZE..3 * PAGE_SIZE], &data[..]);
        assert!(sink.0[..PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(sink.0[3 * PAGE_SIZE..].iter().all(|&b| b == 0));
        assert_eq!(r.bytes_read(), bytes.len() as u64);

        // One flipped data byte: the checksum catches it.
        let mut bad = bytes.clone();
        bad[8 + 8 + 100] ^= 1;
        let err = StreamReader::headless(&bad[..])
            .next_chunk_into(&mut VecSink(vec![0; 16 * PAGE_SIZE]))
            .unwrap_err();
        assert!(
            matches!(
                err,
                StreamError::Checksum {
                    chunk: 0,
                    offset: 0,
                    ..
                }
            ),
            "{err}"
        );
        // Cut inside the data: truncated, not a checksum error.
        let err = StreamReader::headless(&bytes[..8 + 8 + 1000])
            .next_chunk_into(&mut VecSink(vec![0; 16 * PAGE_SIZE]))
            .unwrap_err();
        assert!(matches!(err, StreamError::Truncated { .. }), "{err}");
    }

    /// The source waits for the acknowledgement of the round it sent, passing over the
    /// destination-info; an acknowledgement of another round is an error, and the
    /// guest-running wait passes over the last round's acknowledgement.
    #[test]
    fn round_acknowledgements_are_matched_to_their_round() {
        let mut w = StreamWriter::headless(Vec::new());
        w.dest_info(4096, 0).unwrap();
        w.round_applied(0).unwrap();
        w.round_applied(1).unwrap();
        w.round_applied(3).unwrap();
        w.guest_running().unwrap();
        let bytes = w.into_inner().unwrap();
        let mut r = StreamReader::headless(&bytes[..]);
        r.expect_round_applied(0).unwrap();
        r.expect_round_applied(1).unwrap();
        r.expect_guest_running().unwrap();

        let mut w = StreamWriter::headless(Vec::new());
        w.round_applied(2).unwrap();
        let bytes = w.into_inner().unwrap();
        let err = StreamReader::headless(&bytes[..])
            .expect_round_applied(1)
            .unwrap_err();
        assert!(
            matches!(
                err,
                StreamError::Unexpected {
                    found: "round-applied",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn ram_splits_zero_and_data_runs() {
        let mut ram = vec![0u8; 6 * PAGE_SIZE];
        ram[PAGE_SIZE * 2 + 5] = 1;
        ram[PAGE_SIZE * 3] = 1;
        let lay = Layout::new(1, [(0, 1 << 20)]);
        let mut w = StreamWriter::new(Vec::new(), &lay).unwrap();
        assert_eq!(w.ram(0x1000, &ram).unwrap(), 4);
        w.end().unwrap();
        let bytes = w.into_inner().unwrap();
        let (mut r, _) = StreamReader::new(&bytes[..], &lay).unwrap();
        assert_eq!(
            r.next_chunk().unwrap(),
            Chunk::ZeroPages {
                gpa: 0x1000,
                count: 2
            }
        );
        match r.next_chunk().unwrap() {
            Chunk::Pages { gpa, data } => {
                assert_eq!(gpa, 0x3000);
                assert_eq!(data, &ram[2 * PAGE_SIZE..4 * PAGE_SIZE]);
            }
            c => panic!("{c:?}"),
        }
        assert_eq!(
            r.next_chunk().unwrap(),
            Chunk::ZeroPages {
                gpa: 0x5000,
                count: 2
            }
        );
        assert_eq!(r.next_chunk().unwrap(), Chunk::End);
    }
}
