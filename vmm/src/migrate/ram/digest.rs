//! A digest of guest RAM, one CRC-32 per 4 KiB page (`--migrate-verify`): the source takes it
//! with the guest paused and sends it with the state; the destination takes its own of what
//! it received and compares them page by page before its guest runs (postcopy: the pages it
//! still owes are compared as they arrive).

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::range::{check_range, RamError, PAGE_BYTES, ZERO_PAGE};
use super::residency::{is_private, Residency, RESIDENCY_WINDOW};
use crate::migrate::pager::RamPager;

/// The CRC-32 of one page.
pub fn page_crc(page: &[u8]) -> u32 {
    crc32fast::hash(page)
}

/// One CRC-32 per 4 KiB page of guest RAM, region by region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamDigest {
    regions: Vec<(u64, u64)>,
    crcs: Vec<u32>,
    /// How many pages have their CRC (all of them for a taken digest).
    set: u64,
    /// Which pages of a received digest have their CRC, one bit each: a source that sent a
    /// page's twice is refused, so `set` counts distinct pages.
    seen: Vec<u64>,
}

/// What comparing two digests found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DigestCheck {
    /// Pages compared.
    pub verified: u64,
    /// Of those, pages that differ.
    pub differ: u64,
    /// The first page that differs.
    pub first: Option<u64>,
}

impl RamDigest {
    /// A digest over `regions` with no page known yet, to fill with [`Self::set`].
    pub fn empty(regions: &[(u64, u64)]) -> RamDigest {
        let pages = regions.iter().map(|r| r.1 / PAGE_BYTES).sum::<u64>() as usize;
        RamDigest {
            regions: regions.to_vec(),
            crcs: vec![0; pages],
            set: 0,
            seen: vec![0; pages.div_ceil(64)],
        }
    }

    /// The digest of `mem` over `regions` now. Nothing may write guest RAM meanwhile (the
    /// guest is paused, or has not run). Pages that were never populated are not read (that
    /// would fault them in): they count as zero, as the migration sends them. With a pager
    /// or on private memory the residency tells which; otherwise every page is read.
    pub fn of(
        mem: &GuestMemoryMmap,
        regions: &[(u64, u64)],
        pager: Option<&dyn RamPager>,
    ) -> Result<RamDigest, RamError> {
        use vm_memory::GuestMemoryBackend;
        let zero = page_crc(&ZERO_PAGE);
        let mut d = RamDigest::empty(regions);
        let mut i = 0;
        for &(gpa, len) in regions {
            check_range(mem, gpa, len)?;
            let host =
                mem.get_host_address(GuestAddress(gpa))
                    .map_err(|_| RamError::OutOfRange { gpa, len })? as *const u8;
            let sparse = pager.is_some() || is_private(mem, gpa);
            let mut window = gpa;
            while window < gpa + len {
                let end = (gpa + len).min(window + RESIDENCY_WINDOW);
                let res = match sparse {
                    true => Some(Residency::of(mem, window, end - window)?),
                    false => None,
                };
                let mut at = window;
                while at < end {
                    d.crcs[i] = match &res {
                        Some(r) if !r.populated(at) => zero,
                        _ => {
                            // SAFETY: `at` is a page of `[gpa, gpa+len)`, guest RAM inside one
                            // region (checked above) mapped for the VM's life; nothing writes
                            // it during the call (the caller's promise) and the slice does not
                            // outlive the CRC.
                            let page = unsafe {
                                std::slice::from_raw_parts(
                                    host.add((at - gpa) as usize),
                                    PAGE_BYTES as usize,
                                )
                            };
                            page_crc(page)
                        }
                    };
                    i += 1;
                    at += PAGE_BYTES;
                }
                window = end;
            }
        }
        d.set = d.crcs.len() as u64;
        for i in 0..d.crcs.len() {
            d.seen[i / 64] |= 1 << (i % 64);
        }
        Ok(d)
    }

    /// Pages of RAM it covers.
    pub fn pages(&self) -> u64 {
        self.crcs.len() as u64
    }

    /// Whether every page has its CRC (a received digest is complete).
    pub fn complete(&self) -> bool {
        self.set == self.pages()
    }

    /// Index of the page at `gpa`, when it is RAM.
    fn index(&self, gpa: u64) -> Option<usize> {
        let mut base = 0u64;
        for &(start, len) in &self.regions {
            if gpa >= start && gpa - start < len {
                return Some((base + (gpa - start) / PAGE_BYTES) as usize);
            }
            base += len / PAGE_BYTES;
        }
        None
    }

    /// Sets the CRCs of the pages from `gpa` on (a received digest chunk); all of them must be
    /// RAM of one region.
    pub fn set(
        &mut self,
        gpa: u64,
        crcs: impl ExactSizeIterator<Item = u32>,
    ) -> Result<(), String> {
        let n = crcs.len() as u64;
        let last = gpa.checked_add(n.saturating_sub(1) * PAGE_BYTES);
        let (Some(first), Some(end)) = (self.index(gpa), last.and_then(|l| self.index(l))) else {
            return Err(format!(
                "a digest of {n} pages at {gpa:#x} outside guest RAM"
            ));
        };
        if end + 1 - first != n as usize {
            return Err(format!(
                "a digest of {n} pages at {gpa:#x} spans two RAM regions"
            ));
        }
        if let Some(twice) = (first..=end).find(|&i| self.seen[i / 64] & (1 << (i % 64)) != 0) {
            return Err(format!(
                "the digest of page {:#x} came twice",
                gpa + (twice - first) as u64 * PAGE_BYTES
            ));
        }
        for (i, c) in (first..=end).zip(crcs) {
            self.crcs[i] = c;
            self.seen[i / 64] |= 1 << (i % 64);
        }
        self.set += n;
        Ok(())
    }

    /// The CRC of the page at `gpa`.
    pub fn expected(&self, gpa: u64) -> Option<u32> {
        self.index(gpa).map(|i| self.crcs[i])
    }

    /// The digest as (gpa, CRCs) runs of at most `max` pages, none across two regions.
    pub fn runs(&self, max: usize) -> Vec<(u64, &[u32])> {
        let mut out = Vec::new();
        let mut i = 0;
        for &(gpa, len) in &self.regions {
            let pages = (len / PAGE_BYTES) as usize;
            for (k, part) in self.crcs[i..i + pages].chunks(max.max(1)).enumerate() {
                out.push((gpa + (k * max.max(1)) as u64 * PAGE_BYTES, part));
            }
            i += pages;
        }
        out
    }

    /// Compares this digest (the source's) with `here` (the destination's, over the same
    /// regions), page by page, skipping the pages for which `skip` says true.
    pub fn compare(&self, here: &RamDigest, skip: impl Fn(u64) -> bool) -> DigestCheck {
        let mut c = DigestCheck::default();
        let mut i = 0;
        for &(gpa, len) in &self.regions {
            for p in 0..len / PAGE_BYTES {
                let at = gpa + p * PAGE_BYTES;
                if !skip(at) {
                    c.verified += 1;
                    if self.crcs[i] != here.crcs.get(i).copied().unwrap_or(!self.crcs[i]) {
                        c.differ += 1;
                        c.first.get_or_insert(at);
                    }
                }
                i += 1;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const REGIONS: [(u64, u64); 2] = [(0, 64 << 10), (1 << 20, 32 << 10)];

    fn mem() -> GuestMemoryMmap {
        let r: Vec<(GuestAddress, usize)> = REGIONS
            .iter()
            .map(|&(g, n)| (GuestAddress(g), n as usize))
            .collect();
        GuestMemoryMmap::<()>::from_ranges(&r).unwrap()
    }

    #[test]
    fn a_changed_page_is_found_and_skipped_pages_are_not_compared() {
        let (a, b) = (mem(), mem());
        for m in [&a, &b] {
            m.write_slice(&[7; 4096], GuestAddress(0x3000)).unwrap();
            m.write_slice(&[9; 4096], GuestAddress((1 << 20) + 0x1000))
                .unwrap();
        }
        let da = RamDigest::of(&a, &REGIONS, None).unwrap();
        assert_eq!(da.pages(), 24);
        assert!(da.complete());
        let same = da.compare(&RamDigest::of(&b, &REGIONS, None).unwrap(), |_| false);
        assert_eq!(
            same,
            DigestCheck {
                verified: 24,
                differ: 0,
                first: None
            }
        );
        // One byte of one page, and a page written only here (zero at the source).
        b.write_obj(1u8, GuestAddress((1 << 20) + 0x1fff)).unwrap();
        b.write_obj(1u8, GuestAddress(0x8000)).unwrap();
        let db = RamDigest::of(&b, &REGIONS, None).unwrap();
        let c = da.compare(&db, |_| false);
        assert_eq!((c.verified, c.differ, c.first), (24, 2, Some(0x8000)));
        let c = da.compare(&db, |gpa| gpa == 0x8000);
        assert_eq!(
            (c.verified, c.differ, c.first),
            (23, 1, Some((1 << 20) + 0x1000))
        );
    }

    #[test]
    fn a_digest_sent_in_runs_is_received_whole() {
        let a = mem();
        a.write_slice(&[3; 4096], GuestAddress(0x5000)).unwrap();
        let d = RamDigest::of(&a, &REGIONS, None).unwrap();
        let mut got = RamDigest::empty(&REGIONS);
        let runs = d.runs(5);
        assert_eq!(runs.len(), 4 + 2);
        for (gpa, crcs) in runs {
            assert!(!got.complete());
            got.set(gpa, crcs.iter().copied()).unwrap();
        }
        assert!(got.complete());
        assert_eq!(got, d);
        assert_eq!(got.expected(0x5000), Some(page_crc(&[3; 4096])));
        assert!(got.set(0x10000, [1u32].into_iter()).is_err());
        // A range sent twice (and so another never) is refused by name, not miscounted.
        let mut twice = RamDigest::empty(&[(0, 0x4000)]);
        twice.set(0, [1u32, 2].into_iter()).unwrap();
        let e = twice.set(0x1000, [3u32, 4].into_iter()).unwrap_err();
        assert!(e.contains("page 0x1000 came twice"), "{e}");
        assert!(!twice.complete());
        assert!(got.set(0xf000, [1u32, 2].into_iter()).is_err());
    }
}
