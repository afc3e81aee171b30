//! Guest RAM through a migration stream: send ranges of guest memory (zero pages as runs
//! without data) and write received page chunks into the destination's memory.

use std::io::{Read, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::stream::{Chunk, StreamError, StreamWriter, MAX_PAGES_PER_CHUNK, PAGE_SIZE};

/// Errors applying RAM chunks.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A page chunk names memory outside guest RAM.
    #[error("migration stream names guest memory {gpa:#x}+{len:#x} outside this VM's RAM: the stream is corrupted or the layouts differ")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Sends guest memory with one reusable 1 MiB buffer (no per-page allocation).
#[derive(Debug)]
pub struct RamSender {
    buf: Vec<u8>,
    /// Pages sent with data.
    pub data_pages: u64,
    /// Pages sent as zero runs.
    pub zero_pages: u64,
}

impl Default for RamSender {
    fn default() -> Self {
        RamSender::new()
    }
}

impl RamSender {
    /// A sender with its buffer.
    pub fn new() -> RamSender {
        RamSender {
            buf: vec![0; MAX_PAGES_PER_CHUNK * PAGE_SIZE],
            data_pages: 0,
            zero_pages: 0,
        }
    }

    /// Sends `len` bytes (whole pages) of guest memory at `gpa`.
    pub fn send_range<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len: u64,
    ) -> Result<(), RamError> {
        let mut at = gpa;
        let end = gpa + len;
        while at < end {
            let n = ((end - at) as usize).min(self.buf.len());
            let buf = &mut self.buf[..n];
            mem.read_slice(buf, GuestAddress(at))
                .map_err(|_| RamError::OutOfRange {
                    gpa: at,
                    len: n as u64,
                })?;
            let zeros = w.ram(at, buf)?;
            self.zero_pages += zeros;
            self.data_pages += (n / PAGE_SIZE) as u64 - zeros;
            at += n as u64;
        }
        Ok(())
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Writes a `Pages` or `ZeroPages` chunk into `mem`; returns false for any other chunk.
pub fn apply_chunk(mem: &GuestMemoryMmap, chunk: &Chunk<'_>) -> Result<bool, RamError> {
    match *chunk {
        Chunk::Pages { gpa, data } => {
            mem.write_slice(data, GuestAddress(gpa))
                .map_err(|_| RamError::OutOfRange {
                    gpa,
                    len: data.len() as u64,
                })?;
            Ok(true)
        }
        Chunk::ZeroPages { gpa, count } => {
            let out_of_range = || RamError::OutOfRange {
                gpa,
                len: count.saturating_mul(PAGE_SIZE as u64),
            };
            for i in 0..count {
                let at = (i * PAGE_SIZE as u64)
                    .checked_add(gpa)
                    .ok_or_else(out_of_range)?;
                mem.write_slice(&ZERO_PAGE, GuestAddress(at))
                    .map_err(|_| out_of_range())?;
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Receives chunks into `mem` until a chunk that is not RAM, which it returns as an owned
/// summary (its name); used by tests and the simple full-copy path.
pub fn receive_ram<R: Read>(
    r: &mut super::StreamReader<R>,
    mem: &GuestMemoryMmap,
) -> Result<&'static str, RamError> {
    loop {
        let c = r.next_chunk()?;
        if !apply_chunk(mem, &c)? {
            return Ok(super::stream::chunk_name(&c));
        }
    }
}
