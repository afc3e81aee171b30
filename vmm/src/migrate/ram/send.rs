//! Sending guest RAM: [`RamSender`] turns ranges of guest memory into page and zero-run
//! chunks, skipping what was never populated and testing zero pages in place.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::range::{check_range, host_page_end, RamError, PAGE_BYTES};
use super::residency::{is_private, Residency, RESIDENCY_WINDOW};
use crate::migrate::pager::RamPager;
use crate::migrate::stream::{StreamWriter, MAX_PAGES_PER_CHUNK, PAGE_SIZE};

/// Sends guest memory with one reusable 1 MiB buffer (no per-page allocation).
#[derive(Debug)]
pub struct RamSender {
    buf: Vec<u8>,
    /// Pages sent with data.
    pub data_pages: u64,
    /// Pages sent as zero runs.
    pub zero_pages: u64,
    /// Set by the caller once nothing writes guest RAM any more (every vCPU paused, before
    /// the last round): page data is then checksummed and sent straight from guest memory,
    /// without the copy that keeps chunk and checksum consistent under a running guest.
    pub guest_paused: bool,
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
            guest_paused: false,
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
        let host_page = match pager {
            Some(p) => p.host_page(),
            // Without a pager, only private memory tells which pages were never populated
            // (see [`Residency`]); shared memory is read whole.
            None if is_private(mem, gpa) => PAGE_BYTES,
            None => return self.send_present(w, mem, gpa, len),
        };
        let end = gpa + len;
        let mut window = gpa;
        while window < end {
            let window_end = end.min(window + RESIDENCY_WINDOW);
            let res = Residency::of(mem, window, window_end - window)?;
            let mut at = window;
            while at < window_end {
                let populated = res.populated(at);
                let mut next = window_end.min(host_page_end(at, host_page));
                while next < window_end && res.populated(next) == populated {
                    next = window_end.min(host_page_end(next, host_page));
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
            window = window_end;
        }
        Ok(())
    }

    /// Sends the pages of `[gpa, gpa+len)`, all populated: each page is tested for zero in
    /// guest memory, zero runs go without data and only data runs are copied out (into the
    /// buffer, so that the checksum covers exactly the bytes sent while the guest writes on).
    fn send_present<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len: u64,
    ) -> Result<(), RamError> {
        use vm_memory::GuestMemoryBackend;
        check_range(mem, gpa, len)?;
        if len == 0 {
            return Ok(());
        }
        let host = mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| RamError::OutOfRange { gpa, len })? as *const u8;
        let zero_at = |at: u64| {
            // SAFETY: callers pass a page `at` in `[gpa, gpa+len)`, which is guest RAM inside
            // one region (checked above), mapped for the VM's life and page aligned.
            unsafe { guest_page_is_zero(host.add((at - gpa) as usize)) }
        };
        let max_data = self.buf.len() as u64;
        let end = gpa + len;
        let mut at = gpa;
        while at < end {
            let zero = zero_at(at);
            let mut next = at + PAGE_BYTES;
            while next < end && (zero || next - at < max_data) && zero_at(next) == zero {
                next += PAGE_BYTES;
            }
            let pages = (next - at) / PAGE_BYTES;
            if zero {
                w.zero_pages(at, pages)?;
                self.zero_pages += pages;
            } else if self.guest_paused {
                // SAFETY: `[at, next)` lies in `[gpa, gpa+len)`, guest RAM inside one region
                // (checked above) mapped for the VM's life; with the guest paused nothing
                // writes it while this shared slice lives (the chunk's CRC and send).
                let data = unsafe {
                    std::slice::from_raw_parts(host.add((at - gpa) as usize), (next - at) as usize)
                };
                w.pages(at, data)?;
                self.data_pages += pages;
            } else {
                let buf = &mut self.buf[..(next - at) as usize];
                mem.read_slice(buf, GuestAddress(at))
                    .map_err(|_| RamError::OutOfRange {
                        gpa: at,
                        len: next - at,
                    })?;
                w.pages(at, buf)?;
                self.data_pages += pages;
            }
            at = next;
        }
        Ok(())
    }
}

/// True when the 4 KiB guest page at `page` reads all zeroes, tested in place (no copy).
/// Guest memory changes under the VMM's feet (running vCPUs), so it is read with relaxed
/// atomic loads, which are plain loads on x86-64; a page written meanwhile is dirty in the
/// next harvest and goes again, so a stale answer is never final.
///
/// # Safety
/// `page` must be 8-byte aligned and valid for reads of [`PAGE_SIZE`] bytes for the call.
pub(super) unsafe fn guest_page_is_zero(page: *const u8) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    const WORDS: usize = PAGE_SIZE / 8;
    /// Words OR-ed before each test: a data page usually fails the first block.
    const BLOCK: usize = 8;
    let words = page.cast::<u64>().cast_mut();
    for block in (0..WORDS).step_by(BLOCK) {
        let mut acc = 0u64;
        for i in block..block + BLOCK {
            // SAFETY: `i < WORDS`, so the word lies in the page the caller vouches for;
            // aligned as the page is. The memory is only read.
            acc |= unsafe { AtomicU64::from_ptr(words.add(i)) }.load(Ordering::Relaxed);
        }
        if acc != 0 {
            return false;
        }
    }
    true
}
