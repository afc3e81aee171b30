//! Writing a migration stream: framing and checksumming chunks over any `Write`.

use std::io::{BufWriter, Write};

use super::error::StreamError;
use super::format::{
    kind, kind_name, DISCARD_RUN_BYTES, LANE_MAGIC, LANE_TOKEN, MAGIC, MAX_DIGEST_PAGES,
    MAX_DISCARD_RUNS, MAX_PAGES_PER_CHUNK, MAX_PAYLOAD, PAGE_SIZE, VERSION,
};
use super::layout::Layout;

/// Capacity of the writer's buffer.
const WRITE_BUFFER: usize = 256 << 10;

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

    /// Starts lane `index` of a migration whose header carried `token`: lane magic, version
    /// and the lane chunk; flushes (the destination accepts lanes before the first round).
    pub fn lane(
        out: W,
        token: &[u8; LANE_TOKEN],
        index: u32,
    ) -> Result<StreamWriter<W>, StreamError> {
        let mut w = StreamWriter::headless(out);
        let mut start = [0u8; 12];
        start[..8].copy_from_slice(&LANE_MAGIC);
        start[8..].copy_from_slice(&VERSION.to_le_bytes());
        w.put(&start)?;
        w.chunk(kind::LANE, &[token, &index.to_le_bytes()])?;
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

    /// The CRCs of the pages from `gpa` on (`--migrate-verify`), as many chunks as needed.
    pub fn digest(&mut self, gpa: u64, crcs: &[u32]) -> Result<(), StreamError> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) || crcs.is_empty() {
            return Err(StreamError::InvalidArgument(format!(
                "digest of {} pages at {gpa:#x}",
                crcs.len()
            )));
        }
        for (k, part) in crcs.chunks(MAX_DIGEST_PAGES).enumerate() {
            let at = gpa + (k * MAX_DIGEST_PAGES * PAGE_SIZE) as u64;
            let bytes: Vec<u8> = part.iter().flat_map(|c| c.to_le_bytes()).collect();
            self.chunk(kind::DIGEST, &[&at.to_le_bytes(), &bytes])?;
        }
        Ok(())
    }

    /// On a lane: its share of round `round` is sent; flushes.
    pub fn lane_end(&mut self, round: u32) -> Result<(), StreamError> {
        self.chunk(kind::LANE_END, &[&round.to_le_bytes()])?;
        self.flush()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::stream::{Chunk, StreamReader};

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
