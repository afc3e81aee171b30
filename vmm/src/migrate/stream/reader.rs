//! Reading a migration stream: frames checked for length and checksum, parsed into chunks,
//! page data optionally straight into guest memory.

use std::io::{self, Read};

use super::chunk::{chunk_name, parse_payload, Chunk, Cursor};
use super::error::StreamError;
use super::format::{
    kind, kind_name, AUTH_MAGIC, LANE_MAGIC, LANE_TOKEN, MAGIC, MAX_PAYLOAD, PAGE_SIZE, VERSION,
};
use super::layout::Layout;

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
        r.start(&MAGIC)?;
        let (frame, len) = r.first_frame(kind::HEADER, "header")?;
        let layout = Layout::decode(&r.buf[..len]).map_err(|what| StreamError::Malformed {
            chunk: 0,
            offset: frame,
            what,
        })?;
        r.chunk = 1;
        Ok((r, layout))
    }

    /// Reads the start of a lane (lane magic, version, lane chunk) and returns the lane token
    /// and index it names, unchecked.
    pub fn open_lane(input: R) -> Result<(StreamReader<R>, [u8; LANE_TOKEN], u32), StreamError> {
        let mut r = StreamReader::headless(input);
        r.start(&LANE_MAGIC)?;
        let (frame, len) = r.first_frame(kind::LANE, "lane")?;
        let mut c = Cursor(&r.buf[..len]);
        let parsed = (|| {
            let token: [u8; LANE_TOKEN] = c.take(LANE_TOKEN)?.try_into().expect("token bytes");
            let index = c.u32()?;
            c.finish()?;
            Ok::<_, String>((token, index))
        })();
        let (token, index) = parsed.map_err(|what| StreamError::Malformed {
            chunk: 0,
            offset: frame,
            what,
        })?;
        r.chunk = 1;
        Ok((r, token, index))
    }

    /// The first frame after the start, which must be of kind `k` (`what`): its offset and
    /// payload length.
    fn first_frame(&mut self, k: u32, what: &'static str) -> Result<(u64, usize), StreamError> {
        let frame = self.offset;
        let (found, len) = self.frame()?;
        if found != k {
            return Err(StreamError::Unexpected {
                chunk: 0,
                offset: frame,
                found: kind_name(found),
                expected: what,
            });
        }
        Ok((frame, len))
    }

    /// Reads and checks the magic (`want`) and the version.
    fn start(&mut self, want: &[u8; 8]) -> Result<(), StreamError> {
        let mut start = [0u8; 12];
        self.fill(&mut start, "magic and version")?;
        let magic: [u8; 8] = start[..8].try_into().unwrap();
        if magic == AUTH_MAGIC {
            return Err(StreamError::AuthWanted);
        }
        if magic != *want {
            return Err(StreamError::BadMagic { found: magic });
        }
        let version = u32::from_le_bytes(start[8..].try_into().unwrap());
        if version != VERSION {
            return Err(StreamError::Version { found: version });
        }
        Ok(())
    }

    /// The input the chunks are read from.
    pub fn get_ref(&self) -> &R {
        &self.input
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
        // An unaligned address goes the common way, whose parser refuses it.
        let direct = if gpa.is_multiple_of(PAGE_SIZE as u64) {
            sink.direct(gpa, data_len)
        } else {
            None
        };
        let Some(dst) = direct else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::stream::{discard_runs, StreamWriter, DEST_DEMAND_PAGING};

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

    /// A frame of kind `k` around `payload` with a good checksum (for payloads the writer
    /// refuses to write).
    fn frame(k: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = k.to_le_bytes().to_vec();
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        let crc = crc32fast::hash(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        f
    }

    /// Chunks at addresses no writer sends (unaligned, or runs of no pages) are malformed, and
    /// page data at an unaligned address never lands in the sink. Found by the
    /// `migration_stream` fuzz target: such page data reached the pager as a partial page.
    #[test]
    fn unaligned_addresses_are_refused() {
        let mut pages = 0x1001u64.to_le_bytes().to_vec();
        pages.extend_from_slice(&[0xab; PAGE_SIZE]);
        let zero = [0x1001u64.to_le_bytes(), 1u64.to_le_bytes()].concat();
        let request = [&0x1001u64.to_le_bytes()[..], &1u32.to_le_bytes()].concat();
        let no_pages = [&0x1000u64.to_le_bytes()[..], &0u32.to_le_bytes()].concat();
        for (k, payload) in [
            (kind::PAGES, &pages),
            (kind::ZERO_PAGES, &zero),
            (kind::PAGE_REQUEST, &request),
            (kind::PAGE_REQUEST, &no_pages),
            (kind::DISCARD, &request),
            (kind::DISCARD, &no_pages),
        ] {
            let bytes = frame(k, payload);
            let err = StreamReader::headless(&bytes[..]).next_chunk().unwrap_err();
            assert!(
                matches!(err, StreamError::Malformed { .. }),
                "{}: {err}",
                kind_name(k)
            );
            let mut sink = VecSink(vec![0; 4 * PAGE_SIZE]);
            let err = StreamReader::headless(&bytes[..])
                .next_chunk_into(&mut sink)
                .unwrap_err();
            assert!(matches!(err, StreamError::Malformed { .. }), "{err}");
            assert!(sink.0.iter().all(|&b| b == 0), "{}", kind_name(k));
        }
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
}
