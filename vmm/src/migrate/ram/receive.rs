//! Receiving guest RAM: [`RamReceiver`] writes page and zero-run chunks into the
//! destination's memory, or places missing host pages whole through the pager.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::apply::apply_chunk;
use super::range::{check_range, host_page_end, RamError, PAGE_BYTES, ZERO_PAGE};
use super::residency::{Residency, RESIDENCY_WINDOW};
use crate::migrate::pager::RamPager;
use crate::migrate::stream::{Chunk, PageSink, PAGE_SIZE};

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
    /// With [`Self::fresh`]: one bit per 4 KiB page of guest-physical space, set while the
    /// page may hold data this receiver or a [`sibling`](Self::sibling) wrote (a zero run
    /// clears it again). Atomic: siblings on other threads write other pages, whose bits may
    /// share a word.
    dirty: Option<Arc<[AtomicU64]>>,
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
            dirty: None,
        }
    }

    /// Declares that `mem` reads all zero now and that only this receiver writes it (a
    /// destination's RAM before its guest runs, prefaulted or not): a zero run then skips
    /// the pages this receiver never wrote instead of writing zeroes over them (or, on memory
    /// not populated yet, allocating them). Without a pager only: the pager path has its own
    /// test (the host page is missing).
    pub fn fresh(mut self) -> RamReceiver<'a> {
        use vm_memory::GuestMemoryBackend;
        if self.pager.is_none() {
            let pages = self.mem.last_addr().0 / PAGE_BYTES + 1;
            self.dirty = Some((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect());
        }
        self
    }

    /// Another receiver into the same memory, through the same pager, and fresh when this one
    /// is (sharing what was written), for another connection of the same migration. The two
    /// may run on two threads as long as they write different pages at a time; the source
    /// sends each page on one connection per round, and a round ends on every connection
    /// before the next begins.
    pub fn sibling(&self) -> RamReceiver<'a> {
        RamReceiver {
            mem: self.mem,
            pager: self.pager,
            page: Vec::new(),
            placed: 0,
            written: 0,
            dirty: self.dirty.clone(),
        }
    }

    /// The memory this receiver writes.
    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// The pager it places pages through, when demand paging is on.
    pub fn pager(&self) -> Option<&'a dyn RamPager> {
        self.pager
    }

    /// Notes that `[gpa, gpa+len)` (page aligned) now holds received data.
    fn mark_written(&mut self, gpa: u64, len: u64) {
        if let Some(bits) = self.dirty.as_ref() {
            for page in gpa / PAGE_BYTES..(gpa + len) / PAGE_BYTES {
                bits[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
    }

    /// Zeroes the pages of `[gpa, gpa+len)` (checked guest RAM) that this receiver wrote
    /// before; the others read zero already.
    fn zero_written(&mut self, gpa: u64, len: u64) -> Result<(), RamError> {
        let Some(bits) = self.dirty.as_ref() else {
            unreachable!("only for fresh receivers");
        };
        for page in gpa / PAGE_BYTES..(gpa + len) / PAGE_BYTES {
            let (word, bit) = ((page / 64) as usize, 1u64 << (page % 64));
            if bits[word].fetch_and(!bit, Ordering::Relaxed) & bit != 0 {
                let at = page * PAGE_BYTES;
                self.mem
                    .write_slice(&ZERO_PAGE, GuestAddress(at))
                    .map_err(|_| RamError::OutOfRange {
                        gpa: at,
                        len: PAGE_BYTES,
                    })?;
            }
        }
        Ok(())
    }

    /// Applies a `Pages` or `ZeroPages` chunk; returns false for any other chunk.
    pub fn apply(&mut self, chunk: &Chunk<'_>) -> Result<bool, RamError> {
        let Some(pager) = self.pager else {
            if self.dirty.is_some() {
                if let Chunk::ZeroPages { gpa, count } = *chunk {
                    let len = count
                        .checked_mul(PAGE_BYTES)
                        .ok_or(RamError::OutOfRange { gpa, len: u64::MAX })?;
                    check_range(self.mem, gpa, len)?;
                    self.zero_written(gpa, len)?;
                    return Ok(true);
                }
            }
            let done = apply_chunk(self.mem, chunk)?;
            if let Chunk::Pages { gpa, data } = *chunk {
                self.written += data.len() as u64;
                self.mark_written(gpa, data.len() as u64);
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
        let end = gpa + len;
        let mut window = gpa;
        while window < end {
            let window_end = end.min(window + RESIDENCY_WINDOW);
            let res = Residency::of(self.mem, window, window_end - window)?;
            let part = data.map(|d| &d[(window - gpa) as usize..(window_end - gpa) as usize]);
            self.write_window(pager, &res, window, part, window_end - window)?;
            window = window_end;
        }
        Ok(())
    }

    /// [`Self::write_through`] for a range whose residency `res` was read at once.
    fn write_window(
        &mut self,
        pager: &dyn RamPager,
        res: &Residency,
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
                while run_end < end && !res.populated(run_end) {
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
            if !res.populated(at) {
                let Some(part) = part else {
                    // Zeroes over a missing page: it reads as zeroes already.
                    at = next;
                    continue;
                };
                // The scratch page is all zeroes between uses: only the part written here
                // is cleared again afterwards.
                self.page.resize(host_page as usize, 0);
                let off = (at - base) as usize;
                self.page[off..off + part.len()].copy_from_slice(part);
                let placed = pager.place(base, &self.page);
                self.page[off..off + part.len()].fill(0);
                if placed.map_err(|e| RamError::Pager(format!("placing {base:#x}: {e}")))? {
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

/// Without a pager, page data is read from the socket straight into guest memory: the
/// destination's vCPUs do not run until the stream has ended well (a corrupted chunk stops
/// the destination), and nothing else writes its RAM meanwhile. With a pager, missing host
/// pages must be placed whole (UFFDIO_COPY from a buffer), so data goes through the buffer.
impl PageSink for RamReceiver<'_> {
    fn direct(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        use vm_memory::GuestMemoryBackend;
        if self.pager.is_some() || check_range(self.mem, gpa, len as u64).is_err() {
            return None;
        }
        let host = self.mem.get_host_address(GuestAddress(gpa)).ok()?;
        self.written += len as u64;
        self.mark_written(gpa, len as u64);
        // SAFETY: `[host, host+len)` is guest RAM inside one region (checked above), mapped
        // for the VM's life. The receiver and its siblings own the destination's RAM while
        // the stream comes in (no vCPU runs), siblings write other pages at a time (see
        // `sibling`), and the slice lives only as long as this `&mut self` borrow, for the
        // one read of the chunk's data.
        Some(unsafe { std::slice::from_raw_parts_mut(host, len) })
    }
}
