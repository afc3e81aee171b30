//! Guest RAM through a migration stream: send ranges of guest memory (zero pages as runs
//! without data; with demand paging, pages the guest never touched without reading them) and
//! write received page chunks into the destination's memory (with demand paging, missing host
//! pages are placed whole through the pager instead of faulting them in).

use std::io::{Read, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::stream::{Chunk, StreamError, StreamWriter, MAX_PAGES_PER_CHUNK, PAGE_SIZE};

/// Errors applying RAM chunks.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The demand pager refused to place or drop a page.
    #[error("demand paging: {0}")]
    Pager(String),
    /// A page chunk names memory outside guest RAM.
    #[error("migration stream names guest memory {gpa:#x}+{len:#x} outside this VM's RAM: the stream is corrupted or the layouts differ")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// What migration needs from the demand pager (implemented by [`crate::paging::Pager`] in
/// [`super::pager`]; unit tests use a fake).
pub trait RamPager: Send + Sync {
    /// Host page size of guest RAM: places and drops work on whole host pages.
    fn host_page(&self) -> u64;
    /// Whether the host page holding `gpa` is populated (reading it would not fault).
    fn is_populated(&self, gpa: u64) -> bool;
    /// Places whole host pages at `gpa` if missing; `Ok(false)`: already present, unchanged.
    fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, String>;
    /// Drops the host pages of `[gpa, gpa+len)` (whole host pages) so the next access faults.
    fn discard(&self, gpa: u64, len: u64) -> Result<(), String>;
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

    /// Sends `len` bytes (whole pages) of guest memory at `gpa`. With a `pager`, host pages
    /// that are not populated go as zero runs without being read (reading would fault them in).
    pub fn send_range<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len: u64,
        pager: Option<&dyn RamPager>,
    ) -> Result<(), RamError> {
        let Some(pager) = pager else {
            return self.send_present(w, mem, gpa, len);
        };
        let host_page = pager.host_page();
        let end = gpa + len;
        let mut at = gpa;
        while at < end {
            let populated = pager.is_populated(at);
            let mut next = end.min(host_page_end(at, host_page));
            while next < end && pager.is_populated(next) == populated {
                next = end.min(host_page_end(next, host_page));
            }
            if populated {
                self.send_present(w, mem, at, next - at)?;
            } else {
                let pages = (next - at) / PAGE_SIZE as u64;
                w.zero_pages(at, pages)?;
                self.zero_pages += pages;
            }
            at = next;
        }
        Ok(())
    }

    fn send_present<W: Write>(
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

/// The end of the host page of `host_page` bytes that holds `gpa`.
fn host_page_end(gpa: u64, host_page: u64) -> u64 {
    (gpa / host_page + 1) * host_page
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
/// [`PAGE_SIZE`] as the u64 addresses are.
const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// Writes received RAM chunks into guest memory; with a pager, a missing host page is placed
/// whole (the received bytes in a page of zeroes: nothing else was ever sent for it) and a
/// zero run over a missing page costs nothing.
pub struct RamReceiver<'a> {
    mem: &'a GuestMemoryMmap,
    pager: Option<&'a dyn RamPager>,
    /// One host page of scratch, allocated on the first place.
    page: Vec<u8>,
    /// Host pages placed through the pager.
    pub placed: u64,
    /// Bytes written into present memory.
    pub written: u64,
}

impl<'a> RamReceiver<'a> {
    /// A receiver into `mem`, through `pager` when demand paging is on.
    pub fn new(mem: &'a GuestMemoryMmap, pager: Option<&'a dyn RamPager>) -> RamReceiver<'a> {
        RamReceiver {
            mem,
            pager,
            page: Vec::new(),
            placed: 0,
            written: 0,
        }
    }

    /// Applies a `Pages` or `ZeroPages` chunk; returns false for any other chunk.
    pub fn apply(&mut self, chunk: &Chunk<'_>) -> Result<bool, RamError> {
        let Some(pager) = self.pager else {
            let done = apply_chunk(self.mem, chunk)?;
            if let Chunk::Pages { data, .. } = chunk {
                self.written += data.len() as u64;
            }
            return Ok(done);
        };
        match *chunk {
            Chunk::Pages { gpa, data } => {
                check_range(self.mem, gpa, data.len() as u64)?;
                self.write_through(pager, gpa, Some(data), data.len() as u64)?;
                Ok(true)
            }
            Chunk::ZeroPages { gpa, count } => {
                let len = count
                    .checked_mul(PAGE_SIZE as u64)
                    .ok_or(RamError::OutOfRange { gpa, len: u64::MAX })?;
                check_range(self.mem, gpa, len)?;
                self.write_through(pager, gpa, None, len)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// `data` (or zeroes when `None`) at `gpa`, host page by host page.
    fn write_through(
        &mut self,
        pager: &dyn RamPager,
        gpa: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<(), RamError> {
        let host_page = pager.host_page();
        let mut at = gpa;
        let end = gpa + len;
        while at < end {
            let next = end.min(host_page_end(at, host_page));
            let part = data.map(|d| &d[(at - gpa) as usize..(next - gpa) as usize]);
            let base = at / host_page * host_page;
            if let (Some(d), PAGE_BYTES) = (data, host_page) {
                // 4 KiB host pages: the received pages are whole host pages; a run of missing
                // ones is placed with one call, straight from the chunk.
                let mut run_end = at;
                while run_end < end && !pager.is_populated(run_end) {
                    run_end += PAGE_BYTES;
                }
                if run_end > at {
                    let part = &d[(at - gpa) as usize..(run_end - gpa) as usize];
                    let placed = pager
                        .place(at, part)
                        .map_err(|e| RamError::Pager(format!("placing {at:#x}: {e}")))?;
                    if !placed {
                        // Some page of the run appeared meanwhile: write it all through.
                        self.mem.write_slice(part, GuestAddress(at)).map_err(|_| {
                            RamError::OutOfRange {
                                gpa: at,
                                len: run_end - at,
                            }
                        })?;
                        self.written += run_end - at;
                    } else {
                        self.placed += (run_end - at) / PAGE_BYTES;
                    }
                    at = run_end;
                    continue;
                }
            }
            if !pager.is_populated(at) {
                let Some(part) = part else {
                    // Zeroes over a missing page: it reads as zeroes already.
                    at = next;
                    continue;
                };
                self.page.resize(host_page as usize, 0);
                self.page.fill(0);
                let off = (at - base) as usize;
                self.page[off..off + part.len()].copy_from_slice(part);
                if pager
                    .place(base, &self.page)
                    .map_err(|e| RamError::Pager(format!("placing {base:#x}: {e}")))?
                {
                    self.placed += 1;
                    at = next;
                    continue;
                }
            }
            let n = next - at;
            let res = match part {
                Some(p) => self.mem.write_slice(p, GuestAddress(at)),
                None => (0..n / PAGE_SIZE as u64).try_for_each(|i| {
                    self.mem
                        .write_slice(&ZERO_PAGE, GuestAddress(at + i * PAGE_SIZE as u64))
                }),
            };
            res.map_err(|_| RamError::OutOfRange { gpa: at, len: n })?;
            self.written += n;
            at = next;
        }
        Ok(())
    }
}

/// Checks that `[gpa, gpa+len)` is guest RAM.
pub fn check_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), RamError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let bad = || RamError::OutOfRange { gpa, len };
    if len == 0 {
        return Ok(());
    }
    let last = gpa.checked_add(len - 1).ok_or_else(bad)?;
    // Guest RAM regions are separate mappings: the range must lie inside one.
    let first = mem.find_region(GuestAddress(gpa)).ok_or_else(bad)?;
    let end = mem.find_region(GuestAddress(last)).ok_or_else(bad)?;
    if first.start_addr() != end.start_addr() {
        return Err(bad());
    }
    Ok(())
}

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
