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

/// What migration needs from the demand pager (implemented by [`crate::pager::Pager`] in
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
    /// Drops every `(gpa, len)` run, with nothing else touching guest RAM meanwhile (a
    /// postcopy destination at its switch): [`crate::pager::Pager`] does it without a
    /// userfaultfd event per run. By default, run by run.
    fn discard_all(&self, runs: &[(u64, u64)]) -> Result<(), String> {
        runs.iter()
            .try_for_each(|&(gpa, len)| self.discard(gpa, len))
    }
}

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
unsafe fn guest_page_is_zero(page: *const u8) -> bool {
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

/// Whether the RAM region holding `gpa` is private anonymous memory (no file behind it):
/// there a page the host never populated and never swapped reads as zero.
fn is_private(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.find_region(GuestAddress(gpa))
        .is_some_and(|r| r.file_offset().is_none())
}

/// Guest bytes whose residency one `mincore` call reads.
const RESIDENCY_WINDOW: u64 = 64 << 20;

/// Which 4 KiB pages of a guest range hold something the host must read, made once for the
/// whole range instead of once per page:
/// - private anonymous memory: pages present or swapped out (`/proc/self/pagemap`); any other
///   page was never populated, or was dropped, and reads as zero. (`mincore` would miss
///   swapped-out pages, whose data is not zero.)
/// - shared memory (a memfd): `mincore`, the test of [`RamPager::is_populated`] (on shmem,
///   "the file has the page"; on hugetlbfs, "this mapping maps it").
///
/// Only the pager populates guest RAM while a migration reads this, so a snapshot stays true
/// for the pages the caller has not placed itself.
struct Residency {
    gpa: u64,
    pages: Vec<u8>,
}

/// `/proc/self/pagemap` entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
/// Swapped out (or another swap-type entry, e.g. a page being migrated).
const PM_SWAP: u64 = 1 << 62;

impl Residency {
    /// The residency of `[gpa, gpa+len)` (page aligned, inside one RAM region).
    fn of(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<Residency, RamError> {
        use vm_memory::GuestMemoryBackend;
        check_range(mem, gpa, len)?;
        let host = mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| RamError::OutOfRange { gpa, len })?;
        let mut pages = vec![0u8; (len / PAGE_BYTES) as usize];
        if pages.is_empty() {
            return Ok(Residency { gpa, pages });
        }
        if is_private(mem, gpa) {
            pagemap_residency(host as u64, &mut pages).map_err(|e| {
                RamError::Pager(format!(
                    "reading /proc/self/pagemap for guest memory {gpa:#x}+{len:#x}: {e}"
                ))
            })?;
            return Ok(Residency { gpa, pages });
        }
        // SAFETY: [host, host+len) is guest RAM mapped for the VM's life (checked to lie
        // in one region above); `pages` has one byte per 4 KiB page of it. mincore only
        // reads the page tables.
        let ret = unsafe {
            libc::mincore(
                host.cast::<libc::c_void>(),
                len as usize,
                pages.as_mut_ptr(),
            )
        };
        if ret != 0 {
            return Err(RamError::Pager(format!(
                "mincore of guest memory {gpa:#x}+{len:#x}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Residency { gpa, pages })
    }

    /// Whether the 4 KiB page holding `gpa` is there.
    fn populated(&self, gpa: u64) -> bool {
        self.pages[((gpa - self.gpa) / PAGE_BYTES) as usize] & 1 != 0
    }
}

/// Residency of guest RAM for addresses asked in ascending order (a postcopy destination
/// sorting out which stale pages it has a copy of): read a window of up to
/// [`RESIDENCY_WINDOW`] at a time, with the test of [`Residency`], instead of one syscall per
/// page.
pub struct ResidencyCursor<'a> {
    mem: &'a GuestMemoryMmap,
    window: Option<Residency>,
}

impl<'a> ResidencyCursor<'a> {
    /// A cursor over `mem`; nothing is read until the first question.
    pub fn new(mem: &'a GuestMemoryMmap) -> ResidencyCursor<'a> {
        ResidencyCursor { mem, window: None }
    }

    /// Whether the 4 KiB page holding `gpa` is populated (present, or swapped out on private
    /// memory). An address below the last one asked costs a new window; outside RAM is an
    /// error.
    pub fn populated(&mut self, gpa: u64) -> Result<bool, RamError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let page = gpa / PAGE_BYTES * PAGE_BYTES;
        if let Some(w) = &self.window {
            if page >= w.gpa && page < w.gpa + w.pages.len() as u64 * PAGE_BYTES {
                return Ok(w.populated(page));
            }
        }
        let region = self
            .mem
            .find_region(GuestAddress(page))
            .ok_or(RamError::OutOfRange {
                gpa,
                len: PAGE_BYTES,
            })?;
        let region_end = region.start_addr().0 + region.len();
        let end = region_end.min(page.saturating_add(RESIDENCY_WINDOW));
        let w = Residency::of(self.mem, page, end - page)?;
        let populated = w.populated(page);
        self.window = Some(w);
        Ok(populated)
    }
}

/// Sets `out[i]` to 1 when the 4 KiB page at `hva + i * 4 KiB` of this process is present or
/// swapped out, from `/proc/self/pagemap` (one 8-byte entry per page).
fn pagemap_residency(hva: u64, out: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const ENTRY: usize = 8;
    static PAGEMAP: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    let file = match PAGEMAP.get() {
        Some(f) => f,
        None => {
            let f = std::fs::File::open("/proc/self/pagemap")?;
            PAGEMAP.get_or_init(|| f)
        }
    };
    let mut raw = vec![0u8; out.len() * ENTRY];
    file.read_exact_at(&mut raw, hva / PAGE_BYTES * ENTRY as u64)?;
    for (o, e) in out.iter_mut().zip(raw.chunks_exact(ENTRY)) {
        let e = u64::from_ne_bytes(e.try_into().expect("8-byte chunk"));
        *o = u8::from(e & (PM_PRESENT | PM_SWAP) != 0);
    }
    Ok(())
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
    /// With [`Self::fresh`]: one bit per 4 KiB page of guest-physical space, set while the
    /// page may hold data this receiver wrote (a zero run clears it again).
    dirty: Option<Vec<u64>>,
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
            self.dirty = Some(vec![0; pages.div_ceil(64) as usize]);
        }
        self
    }

    /// Notes that `[gpa, gpa+len)` (page aligned) now holds received data.
    fn mark_written(&mut self, gpa: u64, len: u64) {
        if let Some(bits) = self.dirty.as_mut() {
            for page in gpa / PAGE_BYTES..(gpa + len) / PAGE_BYTES {
                bits[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
    }

    /// Zeroes the pages of `[gpa, gpa+len)` (checked guest RAM) that this receiver wrote
    /// before; the others read zero already.
    fn zero_written(&mut self, gpa: u64, len: u64) -> Result<(), RamError> {
        let Some(bits) = self.dirty.as_mut() else {
            unreachable!("only for fresh receivers");
        };
        for page in gpa / PAGE_BYTES..(gpa + len) / PAGE_BYTES {
            let (word, bit) = ((page / 64) as usize, 1u64 << (page % 64));
            if bits[word] & bit != 0 {
                bits[word] &= !bit;
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
impl super::stream::PageSink for RamReceiver<'_> {
    fn direct(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        use vm_memory::GuestMemoryBackend;
        if self.pager.is_some() || check_range(self.mem, gpa, len as u64).is_err() {
            return None;
        }
        let host = self.mem.get_host_address(GuestAddress(gpa)).ok()?;
        self.written += len as u64;
        self.mark_written(gpa, len as u64);
        // SAFETY: `[host, host+len)` is guest RAM inside one region (checked above), mapped
        // for the VM's life. The receiver owns the destination's RAM while the stream comes
        // in (no vCPU runs, no other thread writes it), and the slice lives only as long as
        // this `&mut self` borrow, for the one read of the chunk's data.
        Some(unsafe { std::slice::from_raw_parts_mut(host, len) })
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
            let len = count
                .checked_mul(PAGE_BYTES)
                .ok_or(RamError::OutOfRange { gpa, len: u64::MAX })?;
            check_range(mem, gpa, len)?;
            // On private memory a page never populated reads as zero already: writing zeroes
            // would only allocate it (a whole huge page on THP or hugetlbfs).
            let private = is_private(mem, gpa);
            let end = gpa + len;
            let mut window = gpa;
            while window < end {
                let window_end = end.min(window + RESIDENCY_WINDOW);
                let res = if private {
                    Some(Residency::of(mem, window, window_end - window)?)
                } else {
                    None
                };
                for at in (window..window_end).step_by(PAGE_SIZE) {
                    if res.as_ref().is_none_or(|r| r.populated(at)) {
                        mem.write_slice(&ZERO_PAGE, GuestAddress(at)).map_err(|_| {
                            RamError::OutOfRange {
                                gpa: at,
                                len: PAGE_BYTES,
                            }
                        })?;
                    }
                }
                window = window_end;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::stream::StreamReader;
    use std::sync::Mutex;

    /// A pager over a plain mapping: places by writing, records what it was asked.
    struct FakePager {
        mem: GuestMemoryMmap,
        host_page: u64,
        placed: Mutex<Vec<(u64, u64)>>,
    }

    impl RamPager for FakePager {
        fn host_page(&self) -> u64 {
            self.host_page
        }
        fn is_populated(&self, gpa: u64) -> bool {
            Residency::of(&self.mem, gpa / PAGE_BYTES * PAGE_BYTES, PAGE_BYTES)
                .unwrap()
                .populated(gpa)
        }
        fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, String> {
            self.placed.lock().unwrap().push((gpa, data.len() as u64));
            self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
            Ok(true)
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), String> {
            unreachable!("not a postcopy test")
        }
    }

    fn fake(pages: usize, host_page: u64) -> FakePager {
        FakePager {
            // Anonymous private memory: a page is resident only once touched.
            mem: GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), pages * PAGE_SIZE)])
                .unwrap(),
            host_page,
            placed: Mutex::new(Vec::new()),
        }
    }

    /// Data in pages 0, 1 and 5 (`page + 7` at offset 8); page 9 written but zero (populated,
    /// read, found zero); the other pages of 16 never touched.
    fn write_sample(mem: &GuestMemoryMmap) {
        for page in [0u64, 1, 5] {
            mem.write_obj(page + 7, GuestAddress(page * PAGE_BYTES + 8))
                .unwrap();
        }
        mem.write_obj(0u64, GuestAddress(9 * PAGE_BYTES)).unwrap();
    }

    /// The chunks [`write_sample`]'s 16 pages go out as.
    const SAMPLE_CHUNKS: [(&str, u64, u64); 6] = [
        ("data", 0, 2),
        ("zero", 2, 3),
        ("data", 5, 1),
        ("zero", 6, 3),
        ("zero", 9, 1),
        ("zero", 10, 6),
    ];

    /// Sends the first 16 pages of `mem`; returns the stream and the sender's counts.
    fn send_sample(
        mem: &GuestMemoryMmap,
        pager: Option<&dyn RamPager>,
        guest_paused: bool,
    ) -> (Vec<u8>, RamSender) {
        let mut w = StreamWriter::headless(Vec::new());
        let mut s = RamSender::new();
        s.guest_paused = guest_paused;
        s.send_range(&mut w, mem, 0, 16 * PAGE_BYTES, pager)
            .unwrap();
        w.end().unwrap();
        (w.into_inner().unwrap(), s)
    }

    /// The 4 KiB pages among the first `pages` of `mem` that the host has.
    fn resident_pages(mem: &GuestMemoryMmap, pages: u64) -> Vec<u64> {
        let res = Residency::of(mem, 0, pages * PAGE_BYTES).unwrap();
        (0..pages)
            .filter(|&i| res.populated(i * PAGE_BYTES))
            .collect()
    }

    /// The cursor gives each page's own residency across window and region boundaries, and
    /// asking again below the last window (a new window) answers right too.
    #[test]
    fn residency_cursor_reads_windows_across_regions() {
        let window_pages = RESIDENCY_WINDOW / PAGE_BYTES;
        // Two regions with a hole between them; the first spans more than two windows.
        let first = (2 * window_pages + 10) * PAGE_BYTES;
        let second_at = first + (1 << 30);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), first as usize),
            (GuestAddress(second_at), 64 * PAGE_SIZE),
        ])
        .unwrap();
        let written: Vec<u64> = [0, 5, window_pages - 1, window_pages, 2 * window_pages + 9]
            .iter()
            .map(|p| p * PAGE_BYTES)
            .chain([second_at, second_at + 63 * PAGE_BYTES])
            .collect();
        for &gpa in &written {
            mem.write_obj(0x5au8, GuestAddress(gpa)).unwrap();
        }
        let mut cur = ResidencyCursor::new(&mem);
        let asked: Vec<u64> = (0..first / PAGE_BYTES)
            .step_by(3)
            .map(|p| p * PAGE_BYTES)
            .chain(written.iter().copied())
            .chain((0..64).map(|p| second_at + p * PAGE_BYTES))
            .collect();
        for gpa in asked {
            assert_eq!(
                cur.populated(gpa + 17).unwrap(),
                written.contains(&gpa),
                "page {gpa:#x}"
            );
        }
        assert!(matches!(
            cur.populated(first),
            Err(RamError::OutOfRange { .. })
        ));
    }

    fn chunks(bytes: &[u8]) -> Vec<(&'static str, u64, u64)> {
        let mut r = StreamReader::headless(bytes);
        let mut got = Vec::new();
        loop {
            match r.next_chunk().unwrap() {
                Chunk::Pages { gpa, data } => {
                    got.push(("data", gpa / PAGE_BYTES, data.len() as u64 / PAGE_BYTES))
                }
                Chunk::ZeroPages { gpa, count } => got.push(("zero", gpa / PAGE_BYTES, count)),
                Chunk::End => return got,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// With a pager, pages the host never populated go as zero runs and are not read (a
    /// read would fault them in through the pager).
    #[test]
    fn untouched_pages_are_sent_as_zeroes_without_reading_them() {
        let p = fake(16, PAGE_BYTES);
        // Page 9 is populated but holds zeroes: read, found zero, sent as a zero run.
        write_sample(&p.mem);
        let (bytes, _) = send_sample(&p.mem, Some(&p), false);
        assert_eq!(chunks(&bytes), SAMPLE_CHUNKS);
        let resident = resident_pages(&p.mem, 16);
        assert_eq!(resident, vec![0, 1, 5, 9], "nothing else was faulted in");
    }

    /// Without a pager, private memory still tells which pages were never populated: those go
    /// as zero runs unread; populated pages are tested for zero in place, and only data runs
    /// are sent with data (with the same header, whole-page layout and contents).
    #[test]
    fn private_memory_without_a_pager_sends_data_runs_only() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
        // Page 9 is populated, but zero: tested in place and sent as a zero run.
        write_sample(&mem);
        let (bytes, s) = send_sample(&mem, None, false);
        assert_eq!(chunks(&bytes), SAMPLE_CHUNKS);
        assert_eq!((s.data_pages, s.zero_pages), (3, 13));
        // With the guest paused the data goes straight from guest memory: the same stream.
        let (paused, _) = send_sample(&mem, None, true);
        assert_eq!(paused, bytes, "paused and running streams differ");
        let resident = resident_pages(&mem, 16);
        assert_eq!(resident, vec![0, 1, 5, 9], "nothing else was faulted in");

        // The receiver rebuilds the same memory, writing no zeroes over missing pages.
        let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
        let mut r = StreamReader::headless(&bytes[..]);
        let mut rx = RamReceiver::new(&dst, None);
        loop {
            let c = match r.next_chunk_into(&mut rx).unwrap() {
                crate::migrate::stream::Received::PagesInPlace { .. } => continue,
                crate::migrate::stream::Received::Chunk(c) => c,
            };
            if !rx.apply(&c).unwrap() {
                assert_eq!(c, Chunk::End);
                break;
            }
        }
        assert_eq!(rx.written, 3 * PAGE_BYTES, "the data went straight in");
        for page in [0u64, 1, 5] {
            assert_eq!(
                dst.read_obj::<u64>(GuestAddress(page * PAGE_BYTES + 8))
                    .unwrap(),
                page + 7
            );
        }
        let resident = resident_pages(&dst, 16);
        assert_eq!(resident, vec![0, 1, 5], "zero runs allocated nothing");
    }

    /// A fresh receiver writes zeroes only over pages it wrote before; the rest read zero
    /// already and are left alone (not even allocated).
    #[test]
    fn fresh_receiver_zeroes_only_pages_it_wrote() {
        let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
        let mut rx = RamReceiver::new(&dst, None).fresh();
        let data = vec![0xabu8; 2 * PAGE_SIZE];
        assert!(rx
            .apply(&Chunk::Pages {
                gpa: PAGE_BYTES,
                data: &data
            })
            .unwrap());
        assert!(rx.apply(&Chunk::ZeroPages { gpa: 0, count: 2 }).unwrap());
        assert_eq!(dst.read_obj::<u8>(GuestAddress(PAGE_BYTES)).unwrap(), 0);
        assert_eq!(
            dst.read_obj::<u8>(GuestAddress(2 * PAGE_BYTES)).unwrap(),
            0xab
        );
        assert!(rx
            .apply(&Chunk::ZeroPages {
                gpa: 3 * PAGE_BYTES,
                count: 13
            })
            .unwrap());
        let resident = resident_pages(&dst, 16);
        assert_eq!(resident, vec![1, 2], "only the pages data went to");
        assert!(
            rx.apply(&Chunk::ZeroPages {
                gpa: 15 * PAGE_BYTES,
                count: 2
            })
            .is_err(),
            "a zero run past guest RAM is refused"
        );
    }

    #[test]
    fn guest_page_zero_test_sees_one_set_byte_anywhere() {
        let mut page = vec![0u64; PAGE_SIZE / 8];
        // SAFETY: a live, aligned buffer of one page.
        let zero = |p: &[u64]| unsafe { guest_page_is_zero(p.as_ptr().cast()) };
        assert!(zero(&page));
        for word in [0, 7, 8, 300, PAGE_SIZE / 8 - 1] {
            page[word] = 1 << 40;
            assert!(!zero(&page), "word {word}");
            page[word] = 0;
        }
    }

    /// The receiver places missing pages (runs at once on 4 KiB pages, whole zero-padded host
    /// pages on huge ones), writes present ones, and skips zero runs over missing pages.
    #[test]
    fn receiver_places_missing_pages_and_writes_present_ones() {
        let p = fake(1024, PAGE_BYTES);
        p.mem.write_obj(1u64, GuestAddress(2 * PAGE_BYTES)).unwrap();
        let data = vec![0xabu8; 4 * PAGE_SIZE];
        let mut r = RamReceiver::new(&p.mem, Some(&p));
        // Pages 0..4: 0 and 1 missing (one place), 2 present (write), 3 missing (place).
        r.apply(&Chunk::Pages {
            gpa: 0,
            data: &data,
        })
        .unwrap();
        r.apply(&Chunk::ZeroPages {
            gpa: 100 * PAGE_BYTES,
            count: 900,
        })
        .unwrap();
        assert_eq!(
            *p.placed.lock().unwrap(),
            vec![(0, 2 * PAGE_BYTES), (3 * PAGE_BYTES, PAGE_BYTES)]
        );
        assert_eq!((r.placed, r.written), (3, PAGE_BYTES));
        let res = Residency::of(&p.mem, 100 * PAGE_BYTES, 900 * PAGE_BYTES).unwrap();
        assert!(
            (100..1000).all(|i| !res.populated(i * PAGE_BYTES)),
            "a zero run over missing pages touches nothing"
        );
        assert_eq!(
            p.mem.read_obj::<u8>(GuestAddress(2 * PAGE_BYTES)).unwrap(),
            0xab
        );

        let huge = fake(1024, 1 << 20);
        let mut r = RamReceiver::new(&huge.mem, Some(&huge));
        r.apply(&Chunk::Pages {
            gpa: 300 * PAGE_BYTES,
            data: &data[..PAGE_SIZE],
        })
        .unwrap();
        // Page 300 lies in the host page at 256 pages (1 MiB): placed whole.
        assert_eq!(*huge.placed.lock().unwrap(), vec![(1 << 20, 1 << 20)]);
        assert_eq!(
            huge.mem
                .read_obj::<u8>(GuestAddress(300 * PAGE_BYTES))
                .unwrap(),
            0xab
        );
    }
}
