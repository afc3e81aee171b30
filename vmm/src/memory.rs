//! Guest RAM: the physical layout (RAM below the 32-bit PCI hole, the rest above 4 GiB), its host
//! backing (private: hugetlbfs 2 MiB / 1 GiB, THP, 4 KiB pages; shared: a memfd per region, with
//! a second mapping for the VMM) and the e820 map that describes it.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Start of the 32-bit PCI/MMIO hole: RAM above this guest-physical address is moved above 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the 32-bit hole (4 GiB): the second RAM region starts here.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// Start of the legacy EBDA/VGA/BIOS area (e820 "reserved", ACPI spec 6.5 §15 / the PC memory map).
pub const LEGACY_HOLE_START: u64 = 0x9_fc00;
/// End of the legacy area: the first megabyte ends here.
pub const LEGACY_HOLE_END: u64 = 0x10_0000;

const SZ_4K: u64 = 4 << 10;
const SZ_2M: u64 = 2 << 20;
const SZ_1G: u64 = 1 << 30;

/// `MAP_HUGE_SHIFT` (include/uapi/asm-generic/hugetlb_encode.h): log2(page size) goes in the
/// mmap flags at this shift to choose the hugetlb page size.
const MAP_HUGE_SHIFT: i32 = 26;
const MAP_HUGE_2MB: i32 = 21 << MAP_HUGE_SHIFT;
const MAP_HUGE_1GB: i32 = 30 << MAP_HUGE_SHIFT;
/// `MFD_HUGE_2MB` / `MFD_HUGE_1GB` (include/uapi/linux/memfd.h): memfd_create(2) encodes the
/// hugetlb page size like mmap does (`MFD_HUGE_SHIFT` = `MAP_HUGE_SHIFT`).
const MFD_HUGE_2MB: u32 = MAP_HUGE_2MB as u32;
const MFD_HUGE_1GB: u32 = MAP_HUGE_1GB as u32;

/// Whether guest RAM is private anonymous memory or a shared memfd (`--memory-backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum MemoryBackend {
    /// Private anonymous memory (MAP_PRIVATE | MAP_ANONYMOUS).
    #[default]
    Private,
    /// A memfd per RAM region mapped MAP_SHARED (hugetlbfs memfd for 2M / 1G pages), with a
    /// second mapping of the same file for the VMM (the "host view").
    Shared,
}

/// How guest RAM is backed on the host (`--hugepages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// 2 MiB hugetlbfs when the free pool covers the guest, else THP.
    Auto,
    /// Anonymous hugetlbfs mapping with 2 MiB pages.
    Hugetlb2M,
    /// Anonymous hugetlbfs mapping with 1 GiB pages.
    Hugetlb1G,
    /// Anonymous memory with `MADV_HUGEPAGE` (transparent huge pages).
    Thp,
    /// Anonymous memory with 4 KiB pages.
    Small,
    /// Shared memfd: 2 MiB hugetlbfs when the free pool covers the guest, else 4 KiB shmem.
    SharedAuto,
    /// Shared memfd (shmem) with 4 KiB pages.
    Shared4K,
    /// Shared hugetlbfs memfd with 2 MiB pages.
    Shared2M,
    /// Shared hugetlbfs memfd with 1 GiB pages.
    Shared1G,
}

impl BackingKind {
    /// Host page size of this backing (the granularity of demand paging); 4 KiB for THP.
    pub fn page_size(self) -> u64 {
        match self {
            BackingKind::Hugetlb2M | BackingKind::Shared2M => SZ_2M,
            BackingKind::Hugetlb1G | BackingKind::Shared1G => SZ_1G,
            BackingKind::Auto
            | BackingKind::Thp
            | BackingKind::Small
            | BackingKind::SharedAuto
            | BackingKind::Shared4K => SZ_4K,
        }
    }

    /// True for the hugetlbfs backings (private or shared).
    pub fn is_hugetlb(self) -> bool {
        matches!(
            self,
            BackingKind::Hugetlb2M
                | BackingKind::Hugetlb1G
                | BackingKind::Shared2M
                | BackingKind::Shared1G
        )
    }

    /// True for the shared memfd backings.
    pub fn is_shared(self) -> bool {
        matches!(
            self,
            BackingKind::SharedAuto
                | BackingKind::Shared4K
                | BackingKind::Shared2M
                | BackingKind::Shared1G
        )
    }

    /// This page-size choice on `backend`: the private kinds map to their shared twins (THP,
    /// which is for private anonymous memory only, is refused for shared memory).
    pub fn on_backend(self, backend: MemoryBackend) -> Result<BackingKind, MemoryError> {
        if backend == MemoryBackend::Private || self.is_shared() {
            return Ok(self);
        }
        Ok(match self {
            BackingKind::Auto => BackingKind::SharedAuto,
            BackingKind::Small => BackingKind::Shared4K,
            BackingKind::Hugetlb2M => BackingKind::Shared2M,
            BackingKind::Hugetlb1G => BackingKind::Shared1G,
            BackingKind::Thp => return Err(MemoryError::ThpShared),
            shared => shared,
        })
    }

    fn sysfs_dir(self) -> Option<&'static str> {
        match self {
            BackingKind::Hugetlb2M | BackingKind::Shared2M => {
                Some("/sys/kernel/mm/hugepages/hugepages-2048kB")
            }
            BackingKind::Hugetlb1G | BackingKind::Shared1G => {
                Some("/sys/kernel/mm/hugepages/hugepages-1048576kB")
            }
            _ => None,
        }
    }

    /// The knob an administrator writes to grow this pool.
    pub fn pool_knob(self) -> &'static str {
        match self {
            BackingKind::Hugetlb1G | BackingKind::Shared1G => {
                "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
            }
            _ => "/proc/sys/vm/nr_hugepages",
        }
    }
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackingKind::Auto => "auto",
            BackingKind::Hugetlb2M => "2M hugetlbfs",
            BackingKind::Hugetlb1G => "1G hugetlbfs",
            BackingKind::Thp => "THP",
            BackingKind::Small => "4K pages",
            BackingKind::SharedAuto => "shared memfd (auto)",
            BackingKind::Shared4K => "shared memfd, 4K pages",
            BackingKind::Shared2M => "shared memfd, 2M hugetlbfs",
            BackingKind::Shared1G => "shared memfd, 1G hugetlbfs",
        })
    }
}

/// Errors building guest RAM; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Zero bytes of RAM.
    #[error("guest memory size is 0: give --mem a size such as 512M or 4G")]
    Empty,
    /// Size not a multiple of the backing's page size.
    #[error("guest memory size {size:#x} is not a multiple of the {backing} page size ({page:#x}): round --mem to a multiple of {page_h}", page_h = human(*page))]
    Unaligned {
        /// Requested size.
        size: u64,
        /// Backing chosen.
        backing: BackingKind,
        /// Its page size.
        page: u64,
    },
    /// The hugetlb pool has too few free pages.
    #[error("{backing} pool too small: the guest needs {needed} free pages, {free} are free (short by {short}); raise the pool with `echo {want} > {knob}` (as root) or choose {alternative}")]
    PoolTooSmall {
        /// Backing asked for.
        backing: BackingKind,
        /// Pages needed.
        needed: u64,
        /// Pages free and unreserved.
        free: u64,
        /// needed - free.
        short: u64,
        /// A pool size that would be enough.
        want: u64,
        /// The sysfs knob.
        knob: &'static str,
        /// The backing to choose instead.
        alternative: &'static str,
    },
    /// The kernel has no pool of this size at all.
    #[error("{backing} pages are not available on this host ({dir} is missing): choose --hugepages 2M, thp or none")]
    NoPool {
        /// Backing asked for.
        backing: BackingKind,
        /// The missing sysfs dir.
        dir: PathBuf,
    },
    /// mmap failed.
    #[error(
        "cannot map {size} of guest memory ({backing}): {source}; lower --mem or free host memory"
    )]
    Mmap {
        /// Human size.
        size: String,
        /// Backing.
        backing: BackingKind,
        /// The OS error.
        source: std::io::Error,
    },
    /// THP asked for shared memory.
    #[error("--hugepages thp works with private memory only: with --memory-backend shared choose --hugepages 2M, 1G, none or auto")]
    ThpShared,
    /// memfd_create or ftruncate failed.
    #[error("cannot create the {size} memfd of shared guest memory ({backing}): {source}; lower --mem, free host memory or use --memory-backend private")]
    Memfd {
        /// Human size.
        size: String,
        /// Backing.
        backing: BackingKind,
        /// The OS error.
        source: std::io::Error,
    },
    /// vm-memory refused the layout (a bug, not user input).
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
    /// Populating guest RAM up front failed.
    #[error("cannot prefault guest memory at {gpa:#x}+{len:#x}: {source}; the host is short of memory (or of huge pages): lower --mem or drop --prefault")]
    Prefault {
        /// Guest-physical start of the part that failed.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// One contiguous range of guest RAM and where it lives in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address of `gpa`.
    pub host_addr: u64,
}

/// e820 entry types (ACPI spec 6.5 §15.1, Table 15.1 "Address Range Types").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// AddressRangeMemory: usable RAM.
    Ram = 1,
    /// AddressRangeReserved.
    Reserved = 2,
}

/// One e820 map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Type,
}

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

/// A MAP_SHARED mapping of a memfd that this process owns (the host view); unmapped on drop.
#[derive(Debug)]
struct HostView {
    addr: u64,
    len: u64,
}

impl Drop for HostView {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map_shared` created for this view; the
        // `SharedRegion::host_view` contract ends with the `GuestRam`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
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

/// Formats a byte count with the largest exact binary suffix (4G, 512M, 4K, or bytes).
pub fn human(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{}", bytes >> shift, suffix);
        }
    }
    format!("{bytes} bytes")
}

/// The guest-physical ranges (gpa, len) that `size` bytes of RAM occupy.
pub fn layout(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut out = vec![(0, low)];
    if size > low {
        out.push((MMIO_HOLE_END, size - low));
    }
    out
}

fn read_sysfs_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Free, unreserved pages in a hugetlb pool, or `None` when the pool does not exist.
fn pool_available(backing: BackingKind) -> Option<u64> {
    let dir = Path::new(backing.sysfs_dir()?);
    let free = read_sysfs_u64(&dir.join("free_hugepages"))?;
    let resv = read_sysfs_u64(&dir.join("resv_hugepages")).unwrap_or(0);
    Some(free.saturating_sub(resv))
}

fn check_pool(backing: BackingKind, size: u64) -> Result<(), MemoryError> {
    let dir = backing.sysfs_dir().expect("hugetlb backing");
    let Some(free) = pool_available(backing) else {
        return Err(MemoryError::NoPool {
            backing,
            dir: dir.into(),
        });
    };
    let needed = size / backing.page_size();
    if free < needed {
        let total = read_sysfs_u64(&Path::new(dir).join("nr_hugepages")).unwrap_or(0);
        return Err(MemoryError::PoolTooSmall {
            backing,
            needed,
            free,
            short: needed - free,
            want: total + (needed - free),
            knob: backing.pool_knob(),
            alternative: if backing.is_shared() {
                "--hugepages none (4 KiB shared memory)"
            } else {
                "--hugepages thp"
            },
        });
    }
    Ok(())
}

/// `--hugepages auto`: `huge` (2 MiB hugetlbfs) when `size` is a whole number of 2 MiB pages
/// and the free pool covers it, else `fallback`; says which, naming `what` is backed.
fn resolve_auto(size: u64, huge: BackingKind, fallback: BackingKind, what: &str) -> BackingKind {
    let resolved =
        if size.is_multiple_of(SZ_2M) && pool_available(huge).unwrap_or(0) >= size / SZ_2M {
            huge
        } else {
            fallback
        };
    info!(
        "--hugepages auto: backing {} of {what} with {resolved}",
        human(size)
    );
    resolved
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

fn e820_for(regions: &[RamRegion]) -> Vec<E820Entry> {
    let mut out = Vec::new();
    for r in regions {
        let end = r.gpa + r.len;
        if r.gpa < LEGACY_HOLE_END {
            let low_end = end.min(LEGACY_HOLE_START);
            out.push(E820Entry {
                addr: r.gpa,
                size: low_end - r.gpa,
                kind: E820Type::Ram,
            });
            let resv_end = end.min(LEGACY_HOLE_END);
            if resv_end > LEGACY_HOLE_START {
                out.push(E820Entry {
                    addr: LEGACY_HOLE_START,
                    size: resv_end - LEGACY_HOLE_START,
                    kind: E820Type::Reserved,
                });
            }
            if end > LEGACY_HOLE_END {
                out.push(E820Entry {
                    addr: LEGACY_HOLE_END,
                    size: end - LEGACY_HOLE_END,
                    kind: E820Type::Ram,
                });
            }
        } else {
            out.push(E820Entry {
                addr: r.gpa,
                size: r.len,
                kind: E820Type::Ram,
            });
        }
    }
    out
}

/// A memfd of `len` bytes for the region at `gpa`, mapped MAP_SHARED twice: the guest mapping
/// (handed to vm-memory and KVM) and the VMM's host view.
fn map_shared(
    gpa: u64,
    len: u64,
    backing: BackingKind,
) -> Result<(MmapRegion, Arc<File>, HostView), MemoryError> {
    let memfd_err = |source| MemoryError::Memfd {
        size: human(len),
        backing,
        source,
    };
    let mut flags = libc::MFD_CLOEXEC;
    match backing {
        BackingKind::Shared2M => flags |= libc::MFD_HUGETLB | MFD_HUGE_2MB,
        BackingKind::Shared1G => flags |= libc::MFD_HUGETLB | MFD_HUGE_1GB,
        _ => {}
    }
    let name = CString::new(format!("guest-ram-{gpa:#x}")).expect("no NUL in the name");
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(memfd_err(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    file.set_len(len).map_err(memfd_err)?;
    let len_usize = usize::try_from(len)
        .map_err(|_| memfd_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
    let mmap_err = |source| MemoryError::Mmap {
        size: human(len),
        backing,
        source,
    };
    // Shared hugetlbfs mappings reserve the file's huge pages at mmap time: a short pool fails
    // here, not as SIGBUS later.
    let mut region = MmapRegion::build(
        Some(FileOffset::from_arc(file.clone(), 0)),
        len_usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(|e| match e {
        vm_memory::mmap::MmapRegionError::Mmap(io) => mmap_err(io),
        other => mmap_err(std::io::Error::other(other.to_string())),
    })?;
    region.set_hugetlbfs(backing.is_hugetlb());
    // SAFETY: a new shared mapping of the whole memfd at a kernel-chosen address.
    let view = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len_usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if view == libc::MAP_FAILED {
        return Err(mmap_err(std::io::Error::last_os_error()));
    }
    Ok((
        region,
        file,
        HostView {
            addr: view as u64,
            len,
        },
    ))
}

fn map_backing(len: u64, backing: BackingKind) -> Result<MmapRegion, MemoryError> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    match backing {
        BackingKind::Hugetlb2M => {
            flags = (flags & !libc::MAP_NORESERVE) | libc::MAP_HUGETLB | MAP_HUGE_2MB
        }
        BackingKind::Hugetlb1G => {
            flags = (flags & !libc::MAP_NORESERVE) | libc::MAP_HUGETLB | MAP_HUGE_1GB
        }
        _ => {}
    }
    let mmap_err = |source| MemoryError::Mmap {
        size: human(len),
        backing,
        source,
    };
    let len_usize = usize::try_from(len)
        .map_err(|_| mmap_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
    // Hugetlb mappings are private without MAP_NORESERVE: the kernel reserves every huge page at
    // mmap time, so a short pool fails here (ENOMEM) instead of as SIGBUS on a later touch.
    let region = MmapRegion::build(None, len_usize, libc::PROT_READ | libc::PROT_WRITE, flags)
        .map_err(|e| match e {
            vm_memory::mmap::MmapRegionError::Mmap(io) => mmap_err(io),
            other => mmap_err(std::io::Error::other(other.to_string())),
        })?;
    let mut region = region;
    region.set_hugetlbfs(backing.is_hugetlb());
    if backing == BackingKind::Thp {
        // SAFETY: the range is the mapping just created and owned by `region`; madvise only
        // changes the kernel's paging policy for it.
        let ret = unsafe { libc::madvise(region.as_ptr().cast(), len_usize, libc::MADV_HUGEPAGE) };
        if ret != 0 {
            warn!(
                "madvise(MADV_HUGEPAGE) failed: {}; guest RAM may use 4 KiB pages",
                std::io::Error::last_os_error()
            );
        }
        if !(region.as_ptr() as u64).is_multiple_of(SZ_2M) {
            warn!(
                "THP guest RAM mapping at {:p} is not 2 MiB aligned",
                region.as_ptr()
            );
        }
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn layout_splits_at_pci_hole() {
        assert_eq!(layout(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(layout(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(layout(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn e820_covers_all_ram_with_legacy_hole_reserved() {
        let regions: Vec<RamRegion> = layout(4 << 30)
            .into_iter()
            .map(|(gpa, len)| RamRegion {
                gpa,
                len,
                host_addr: 0,
            })
            .collect();
        let e = e820_for(&regions);
        let total: u64 = e.iter().map(|x| x.size).sum();
        assert_eq!(total, 4 << 30);
        let usable: u64 = e
            .iter()
            .filter(|x| x.kind == E820Type::Ram)
            .map(|x| x.size)
            .sum();
        assert_eq!(usable, (4 << 30) - (LEGACY_HOLE_END - LEGACY_HOLE_START));
        assert_eq!(
            e[1],
            E820Entry {
                addr: LEGACY_HOLE_START,
                size: 0x6_0400,
                kind: E820Type::Reserved
            }
        );
        assert_eq!(e[3].addr, 4 << 30);
    }

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

    #[test]
    fn human_sizes() {
        assert_eq!(human(4 << 30), "4G");
        assert_eq!(human(3 << 20), "3M");
        assert_eq!(human(5), "5 bytes");
    }
}
