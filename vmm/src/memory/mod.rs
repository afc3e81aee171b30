//! Guest RAM: `GuestRam`, which maps the layout on its backing and answers for it.
//!
//! Regions, address translation both ways, prefault, the shared memfds and the e820 map; the
//! parts live in `backing` (kinds), `choose` (pools, auto), `layout`, `mmap`, `error` and `size`.

mod backing;
mod choose;
mod error;
mod layout;
mod mmap;
mod size;

use std::fs::File;
use std::sync::Arc;

use log::info;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

pub use backing::{BackingKind, MemoryBackend};
pub use error::MemoryError;
pub use layout::{
    layout, E820Entry, E820Type, RamRegion, LEGACY_HOLE_END, LEGACY_HOLE_START, MMIO_HOLE_END,
    MMIO_HOLE_START,
};
pub use size::human;

use choose::{check_pool, resolve_auto};
use layout::e820_for;
use mmap::{map_backing, map_shared, HostView};
use size::SZ_4K;

/// One RAM region of shared guest RAM: the memfd behind it (file offset 0 = `region.gpa`) and
/// the VMM's own second mapping of that file. Pages written through `host_view` are in the file
/// and appear in guest RAM (under demand paging, as MINOR faults resolved by UFFDIO_CONTINUE).
#[derive(Clone, Debug)]
pub struct SharedRegion {
    /// The region as the guest (and KVM) sees it; `host_addr` is the guest mapping.
    pub region: RamRegion,
    /// The memfd.
    pub file: Arc<File>,
    /// Host address of the VMM's second mapping of the file (valid while the `GuestRam` lives).
    pub host_view: u64,
}

/// Guest RAM: a `GuestMemoryMmap` laid out around the PCI hole on the chosen backing.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<RamRegion>,
    backing: BackingKind,
    size: u64,
    /// Shared backing: the memfd and host view of each region (empty for private memory).
    shared: Vec<SharedRegion>,
    _views: Vec<HostView>,
}

/// Bytes one prefault worker populates at a time.
const PREFAULT_PART: u64 = 64 << 20;

impl GuestRam {
    /// Maps `size` bytes of guest RAM on `backing`. Nothing is prefaulted: the host pages are
    /// populated on first touch (by KVM, or by the userfaultfd handlers when they register).
    pub fn new(size: u64, backing: BackingKind) -> Result<GuestRam, MemoryError> {
        if size == 0 {
            return Err(MemoryError::Empty);
        }
        let backing = match backing {
            BackingKind::SharedAuto => resolve_auto(
                size,
                BackingKind::Shared2M,
                BackingKind::Shared4K,
                "shared guest RAM",
            ),
            BackingKind::Auto => {
                resolve_auto(size, BackingKind::Hugetlb2M, BackingKind::Thp, "guest RAM")
            }
            b => b,
        };
        let page = backing.page_size().max(SZ_4K);
        if !size.is_multiple_of(page) {
            return Err(MemoryError::Unaligned {
                size,
                backing,
                page,
            });
        }
        if backing.is_hugetlb() {
            check_pool(backing, size)?;
        }
        let mut mm_regions = Vec::new();
        let mut regions = Vec::new();
        let mut shared = Vec::new();
        let mut views = Vec::new();
        for (gpa, len) in layout(size) {
            let mapping = if backing.is_shared() {
                let (mapping, file, view) = map_shared(gpa, len, backing)?;
                shared.push(SharedRegion {
                    region: RamRegion {
                        gpa,
                        len,
                        host_addr: mapping.as_ptr() as u64,
                    },
                    file,
                    host_view: view.addr,
                });
                views.push(view);
                mapping
            } else {
                map_backing(len, backing)?
            };
            let host_addr = mapping.as_ptr() as u64;
            regions.push(RamRegion {
                gpa,
                len,
                host_addr,
            });
            mm_regions.push(
                GuestRegionMmap::new(mapping, GuestAddress(gpa))
                    .ok_or_else(|| MemoryError::Layout(format!("region at {gpa:#x} overflows")))?,
            );
        }
        let mem = GuestMemoryMmap::from_regions(mm_regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        info!(
            "guest RAM: {} on {backing}, regions {regions:x?}",
            human(size)
        );
        Ok(GuestRam {
            mem,
            regions,
            backing,
            size,
            shared,
            _views: views,
        })
    }

    /// Populates every host page of guest RAM now (MADV_POPULATE_WRITE, in parts spread over
    /// the host's cores), so that nothing faults later: what QEMU's -mem-prealloc does. The
    /// pages are zeroed by the kernel as on any first touch; guest memory reads zero after.
    /// Call it before anything (a pager, a vCPU) uses the memory.
    pub fn prefault(&self) -> Result<(), MemoryError> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // Parts small enough to share out, whole huge pages (1 GiB at most).
        let part = self.page_size().max(PREFAULT_PART);
        let parts: Vec<(RamRegion, u64)> = self
            .regions
            .iter()
            .flat_map(|r| (0..r.len).step_by(part as usize).map(move |off| (*r, off)))
            .collect();
        let next = AtomicUsize::new(0);
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(parts.len());
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| -> Result<(), MemoryError> {
                        while let Some(&(r, off)) = parts.get(next.fetch_add(1, Ordering::Relaxed))
                        {
                            let len = part.min(r.len - off);
                            // SAFETY: [host_addr+off, +len) lies inside a guest RAM mapping
                            // this GuestRam owns for its life; populating it only allocates
                            // (zeroed) pages, which no one has read or written yet.
                            let ret = unsafe {
                                libc::madvise(
                                    (r.host_addr + off) as *mut libc::c_void,
                                    len as usize,
                                    libc::MADV_POPULATE_WRITE,
                                )
                            };
                            if ret != 0 {
                                return Err(MemoryError::Prefault {
                                    gpa: r.gpa + off,
                                    len,
                                    source: std::io::Error::last_os_error(),
                                });
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("prefault worker panicked"))
        })
    }

    /// Shared backing: the memfd and host view of each region, in guest-physical order (empty
    /// for private memory).
    pub fn shared_regions(&self) -> &[SharedRegion] {
        &self.shared
    }

    /// The RAM regions in guest-physical order.
    pub fn regions(&self) -> impl Iterator<Item = RamRegion> + '_ {
        self.regions.iter().copied()
    }

    /// Total RAM bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The highest guest-physical address of RAM plus one.
    pub fn end_gpa(&self) -> u64 {
        self.regions.last().map(|r| r.gpa + r.len).unwrap_or(0)
    }

    /// Host address of guest-physical `gpa`, if it is RAM.
    pub fn gpa_to_host(&self, gpa: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)
            .map(|r| r.host_addr + (gpa - r.gpa))
    }

    /// Guest-physical address of host address `hva`, if it lies in guest RAM.
    pub fn host_to_gpa(&self, hva: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| hva >= r.host_addr && hva - r.host_addr < r.len)
            .map(|r| r.gpa + (hva - r.host_addr))
    }

    /// The resolved backing (never `Auto`).
    pub fn backing(&self) -> BackingKind {
        self.backing
    }

    /// Host page size of the backing (4 KiB for THP and small pages).
    pub fn page_size(&self) -> u64 {
        self.backing.page_size()
    }

    /// The vm-memory view of guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The e820 map: every byte of RAM, the legacy area below 1 MiB marked reserved.
    pub fn e820_entries(&self) -> Vec<E820Entry> {
        e820_for(&self.regions)
    }
}

#[cfg(test)]
mod tests {
    use super::choose::pool_available;
    use super::size::SZ_2M;
    use super::*;
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_backing_maps_and_translates() {
        let ram = GuestRam::new(64 << 20, BackingKind::Small).unwrap();
        assert_eq!(ram.backing(), BackingKind::Small);
        let r = ram.regions().next().unwrap();
        assert_eq!(ram.gpa_to_host(0x1000), Some(r.host_addr + 0x1000));
        assert_eq!(ram.host_to_gpa(r.host_addr + 0x2000), Some(0x2000));
        assert_eq!(ram.gpa_to_host(64 << 20), None);
        assert_eq!(ram.memory().num_regions(), 1);
        let last = ram.memory().iter().next().unwrap().last_addr();
        assert_eq!(last.raw_value(), (64 << 20) - 1);
    }

    #[test]
    fn shared_backing_is_a_memfd_seen_through_both_mappings() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20, BackingKind::Shared4K).unwrap();
        assert!(ram.backing().is_shared());
        let shared = ram.shared_regions();
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].region, ram.regions().next().unwrap());
        assert_ne!(shared[0].host_view, shared[0].region.host_addr);
        assert_eq!(shared[0].file.metadata().unwrap().len(), 16 << 20);
        // A write through the host view is guest memory.
        // SAFETY: inside the live host view of the 16 MiB file.
        unsafe { std::ptr::write_volatile((shared[0].host_view + 0x5000) as *mut u64, 42) };
        let v: u64 = ram.memory().read_obj(GuestAddress(0x5000)).unwrap();
        assert_eq!(v, 42);
        assert!(GuestRam::new(16 << 20, BackingKind::Small)
            .unwrap()
            .shared_regions()
            .is_empty());
        assert!(matches!(
            BackingKind::Thp.on_backend(MemoryBackend::Shared),
            Err(MemoryError::ThpShared)
        ));
        assert_eq!(
            BackingKind::Hugetlb2M
                .on_backend(MemoryBackend::Shared)
                .unwrap(),
            BackingKind::Shared2M
        );
        assert_eq!(BackingKind::Shared2M.page_size(), SZ_2M);
        assert!(BackingKind::Shared1G.is_hugetlb());
    }

    #[test]
    fn unaligned_size_for_hugetlb_is_an_error() {
        let err = GuestRam::new((2 << 20) + 4096, BackingKind::Hugetlb2M).unwrap_err();
        assert!(matches!(err, MemoryError::Unaligned { .. }), "{err}");
        assert!(err.to_string().contains("--mem"));
    }

    #[test]
    fn oversized_pool_request_names_the_knob() {
        // 1 TiB of 2 MiB pages is more than any pool on a test machine.
        let err = GuestRam::new(1 << 40, BackingKind::Hugetlb2M).unwrap_err();
        match err {
            MemoryError::PoolTooSmall { knob, .. } => {
                assert_eq!(knob, "/proc/sys/vm/nr_hugepages")
            }
            MemoryError::NoPool { .. } => {}
            ref e => panic!("unexpected {e}"),
        }
    }

    /// The `KernelPageSize` of the mapping that holds `addr`, from /proc/self/smaps.
    fn kernel_page_size(addr: u64) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("KernelPageSize:") {
                    return v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .map(|k| k << 10);
                }
            }
        }
        None
    }

    fn hugetlb_backing_is_real(backing: BackingKind, size: u64) {
        if pool_available(backing).unwrap_or(0) < size / backing.page_size() {
            eprintln!(
                "skipped: the {backing} pool has no {} free pages right now",
                size / backing.page_size()
            );
            return;
        }
        let ram = match GuestRam::new(size, backing) {
            Ok(r) => r,
            // Another process may take the pages between the check and the mmap.
            Err(e @ MemoryError::PoolTooSmall { .. }) | Err(e @ MemoryError::Mmap { .. }) => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(ram.backing(), backing);
        assert_eq!(ram.page_size(), backing.page_size());
        let r = ram.regions().next().unwrap();
        assert_eq!(
            r.host_addr % backing.page_size(),
            0,
            "host mapping aligned to the page size"
        );
        assert_eq!(kernel_page_size(r.host_addr), Some(backing.page_size()));
    }

    #[test]
    fn hugetlb_2m_backing_uses_2m_pages() {
        hugetlb_backing_is_real(BackingKind::Hugetlb2M, 4 << 20);
    }

    #[test]
    fn hugetlb_1g_backing_uses_1g_pages() {
        hugetlb_backing_is_real(BackingKind::Hugetlb1G, 1 << 30);
    }

    #[test]
    fn thp_backing_is_aligned_and_advised() {
        let ram = GuestRam::new(8 << 20, BackingKind::Thp).unwrap();
        let r = ram.regions().next().unwrap();
        assert_eq!(ram.backing(), BackingKind::Thp);
        assert_eq!(r.host_addr % SZ_2M, 0, "2 MiB aligned so THP can back it");
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let vma = smaps
            .split("\n")
            .skip_while(|l| !l.starts_with(&format!("{:x}-", r.host_addr)))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            vma.contains("VmFlags:") && vma.contains(" hg"),
            "MADV_HUGEPAGE set (hg flag): {vma}"
        );
    }

    #[test]
    fn auto_picks_a_concrete_backing() {
        let ram = GuestRam::new(4 << 20, BackingKind::Auto).unwrap();
        assert!(matches!(
            ram.backing(),
            BackingKind::Hugetlb2M | BackingKind::Thp
        ));
    }

    /// After prefault every 4 KiB page of guest RAM is resident and reads zero.
    #[test]
    fn prefault_populates_every_page() {
        let ram = GuestRam::new(64 << 20, BackingKind::Small).unwrap();
        let resident = |ram: &GuestRam| -> usize {
            ram.regions()
                .map(|r| {
                    let mut vec = vec![0u8; (r.len / SZ_4K) as usize];
                    // SAFETY: one live mapping of `r.len` bytes; `vec` has a byte per page.
                    let ret = unsafe {
                        libc::mincore(
                            r.host_addr as *mut libc::c_void,
                            r.len as usize,
                            vec.as_mut_ptr(),
                        )
                    };
                    assert_eq!(ret, 0);
                    vec.iter().filter(|v| *v & 1 != 0).count()
                })
                .sum()
        };
        assert_eq!(resident(&ram), 0, "nothing is populated before");
        ram.prefault().unwrap();
        assert_eq!(resident(&ram) as u64, (64 << 20) / SZ_4K);
        assert_eq!(
            vm_memory::Bytes::read_obj::<u64>(ram.memory(), GuestAddress(40 << 20)).unwrap(),
            0
        );
    }
}
