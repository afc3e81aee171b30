//! The engine's vocabulary: page sizes, permissions, accesses, faults, backings, outcomes, errors, config.

use std::fmt;

/// Number of translation levels (4-level EPT, ARM64 4 KiB granule starting at level 0).
pub const LEVELS: usize = 4;
/// Entries in one table page.
pub const ENTRIES: usize = 512;
/// Bits of guest-physical address the 4-level tables translate (48).
pub const GPA_BITS: u32 = 48;
/// One past the highest translatable guest-physical address.
pub const GPA_LIMIT: u64 = 1 << GPA_BITS;

/// Size of a leaf mapping: a 4 KiB page or a 2 MiB / 1 GiB block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB page (level 3).
    Size4K,
    /// 2 MiB block (level 2).
    Size2M,
    /// 1 GiB block (level 1).
    Size1G,
}

impl PageSize {
    /// All sizes, largest first.
    pub const ALL_DESC: [PageSize; 3] = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K];

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// The table level whose leaf entries have this size (1 = 1 GiB, 2 = 2 MiB, 3 = 4 KiB).
    pub const fn level(self) -> usize {
        match self {
            PageSize::Size1G => 1,
            PageSize::Size2M => 2,
            PageSize::Size4K => 3,
        }
    }

    /// The leaf size of a level, if leaves are allowed there.
    pub const fn at_level(level: usize) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size1G),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size4K),
            _ => None,
        }
    }

    /// The next smaller size (what a split produces).
    pub const fn smaller(self) -> Option<PageSize> {
        match self {
            PageSize::Size1G => Some(PageSize::Size2M),
            PageSize::Size2M => Some(PageSize::Size4K),
            PageSize::Size4K => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size1G => "1G",
        })
    }
}

/// Bytes covered by one entry at `level` (level 0 = 512 GiB ... level 3 = 4 KiB).
pub const fn level_bytes(level: usize) -> u64 {
    1 << level_shift(level)
}

/// log2 of the bytes covered by one entry at `level`.
pub const fn level_shift(level: usize) -> u32 {
    12 + 9 * (LEVELS - 1 - level) as u32
}

/// Index of `gpa`'s entry in its table at `level`.
#[inline]
pub const fn level_index(gpa: u64, level: usize) -> usize {
    ((gpa >> level_shift(level)) & (ENTRIES as u64 - 1)) as usize
}

/// Access permissions of a mapping (read / write / execute), a small bit set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Perms(u8);

impl Perms {
    /// No access.
    pub const NONE: Perms = Perms(0);
    /// Read.
    pub const R: Perms = Perms(1);
    /// Write.
    pub const W: Perms = Perms(2);
    /// Execute.
    pub const X: Perms = Perms(4);
    /// Read + write.
    pub const RW: Perms = Perms(3);
    /// Read + execute.
    pub const RX: Perms = Perms(5);
    /// Read + write + execute.
    pub const RWX: Perms = Perms(7);

    /// From the raw R=1/W=2/X=4 bits (higher bits dropped).
    pub const fn from_bits(bits: u8) -> Perms {
        Perms(bits & 7)
    }

    /// The raw R=1/W=2/X=4 bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every permission in `other` is in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// Union of both sets.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// `self` without the permissions in `other`.
    pub const fn without(self, other: Perms) -> Perms {
        Perms(self.0 & !other.0)
    }

    /// Intersection of both sets.
    pub const fn intersect(self, other: Perms) -> Perms {
        Perms(self.0 & other.0)
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |p: Perms, ch: char| if self.contains(p) { ch } else { '-' };
        write!(
            f,
            "{}{}{}",
            c(Perms::R, 'r'),
            c(Perms::W, 'w'),
            c(Perms::X, 'x')
        )
    }
}

/// The kind of access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Exec,
}

impl Access {
    /// The permissions this access needs.
    pub const fn perms(self) -> Perms {
        match self {
            Access::Read => Perms::R,
            Access::Write => Perms::W,
            Access::Exec => Perms::X,
        }
    }
}

/// A stage-2 fault taken by a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting guest-physical address.
    pub gpa: u64,
    /// What the vCPU tried to do.
    pub access: Access,
    /// Index of the faulting vCPU (selects its dirty ring and its local TLB flush).
    pub vcpu: usize,
}

/// What the host backs a GPA with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Output address of the naturally aligned block of `max_size` containing the GPA (for the VMM:
    /// the host address of that block). If it is not aligned to `max_size` the engine uses the largest
    /// size it is aligned to.
    pub frame: u64,
    /// Largest mapping the host memory allows around this GPA.
    pub max_size: PageSize,
    /// What the memory itself permits.
    pub perms: Perms,
}

/// The host's view of guest memory, asked by the fault path.
pub trait Backing {
    /// What backs `gpa`, or `None` when it is not RAM (MMIO): the fault is then `Denied`.
    fn resolve(&self, gpa: u64) -> Option<Resolved>;
}

impl<B: Backing + ?Sized> Backing for &B {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        (**self).resolve(gpa)
    }
}

/// The decision of [`crate::Stage2::handle_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new leaf was installed; `gpa` is its base.
    Installed {
        /// Base of the installed page or block.
        gpa: u64,
        /// Its size.
        size: PageSize,
    },
    /// The mapping already allowed the access (the TLB held a stale or invalid entry): at most one
    /// local flush of that address was done.
    Spurious,
    /// Permissions of an existing leaf were widened in place, with no break-before-make.
    Relaxed {
        /// Base of the relaxed page or block.
        gpa: u64,
        /// Its size.
        size: PageSize,
    },
    /// Take the fault again: a break-before-make was in flight, or an invalidation raced.
    Retry,
    /// The backing forbids the access, or there is no backing (MMIO): report it, do not retry.
    Denied,
}

/// Errors of the administrative calls (`map_range`, `split`, ...).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// An address or length is not aligned to the page size asked for.
    #[error("{what} {value:#x} is not aligned to {size} ({align:#x}); round it to the page size")]
    Misaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The page size asked for.
        size: PageSize,
        /// Its alignment.
        align: u64,
    },
    /// The range leaves the translatable guest-physical space.
    #[error("range {start:#x}..{end:#x} is outside the 48-bit guest-physical space; use addresses below {GPA_LIMIT:#x}")]
    OutOfRange {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// A mapping of a different size is in the way.
    #[error("gpa {gpa:#x} is covered by {what}; invalidate or split that range first")]
    Conflict {
        /// The conflicting address.
        gpa: u64,
        /// What is there.
        what: &'static str,
    },
    /// Another thread is changing the entry (break-before-make in flight).
    #[error("gpa {gpa:#x} is being changed by another thread; retry the call")]
    Busy {
        /// The busy address.
        gpa: u64,
    },
}

/// Engine configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of vCPUs (one dirty ring each; faults from a larger index skip the ring).
    pub nr_vcpus: usize,
    /// Capacity of each vCPU's dirty ring (entries); when full, the bitmap still records the page.
    pub ring_size: usize,
    /// Take one global mutex around every public mutating call: the baseline the benchmarks compare
    /// the lock-free engine against. Off by default.
    pub global_lock: bool,
    /// Entries a long walk (invalidation) visits between yields.
    pub yield_every: usize,
    /// Highest guest-physical address + 1 the dirty bitmap covers (rounded up to its chunk size).
    pub dirty_limit: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nr_vcpus: 1,
            ring_size: 4096,
            global_lock: false,
            yield_every: 256,
            dirty_limit: 1 << 40,
        }
    }
}
