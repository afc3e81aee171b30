//! The kinds of host backing of guest RAM: anonymous 4 KiB, THP, hugetlbfs 2 MiB / 1 GiB,
//! shared memfd (4 KiB, 2 MiB, 1 GiB), and what each is (page size, pool, name).

use super::size::{SZ_1G, SZ_2M, SZ_4K};
use std::fmt;

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

    pub(super) fn sysfs_dir(self) -> Option<&'static str> {
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
