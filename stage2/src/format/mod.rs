//! The `Format` trait: how one architecture encodes stage-2 descriptors (the engine is generic over it).

pub mod arm64;
pub mod ept;

pub use arm64::{Arm64, S2Attrs};
pub use ept::{Ept, EptAttrs};

use crate::types::Perms;

/// One stage-2 descriptor format. Levels count from the root: 0 (512 GiB per entry), 1 (1 GiB),
/// 2 (2 MiB), 3 (4 KiB). Leaves are allowed at levels 1–3. All methods are pure bit manipulation.
///
/// The value `0` is the empty (invalid, unlocked) entry in every format.
pub trait Format: Send + Sync + 'static {
    /// Short name for logs and stats.
    const NAME: &'static str;

    /// Whether a block may be replaced by a table that maps the same memory with the same attributes
    /// without the break step (x86 EPT: yes; ARM64: only with FEAT_BBM level 2).
    fn split_without_bbm(&self) -> bool;

    /// The break-before-make marker: invalid for the hardware, recognisable by the engine.
    fn locked(&self) -> u64;

    /// Whether `d` is the break-before-make marker.
    #[inline]
    fn is_locked(&self, d: u64) -> bool {
        d == self.locked()
    }

    /// Whether the hardware treats `d` as present (a table or a leaf).
    fn is_present(&self, d: u64) -> bool;

    /// Whether `d` at `level` points to a next-level table.
    fn is_table(&self, d: u64, level: usize) -> bool;

    /// Whether `d` at `level` is a present leaf (page or block).
    fn is_leaf(&self, d: u64, level: usize) -> bool;

    /// A table descriptor pointing to the table page at `next` (4 KiB aligned).
    fn table(&self, next: u64) -> u64;

    /// The next-level table address in a table descriptor.
    fn table_addr(&self, d: u64) -> u64;

    /// The format's leaf attributes besides output address and permissions (memory type,
    /// cacheability, shareability, hardware flags), as named fields. `Default` is what the engine
    /// maps guest RAM with: normal write-back cacheable memory.
    type Attrs: Copy + Default + PartialEq + Eq + std::fmt::Debug + Send + Sync;

    /// A leaf at `level` mapping `oa` (aligned to the level's size) with `perms` and `attrs`.
    fn leaf_with(&self, oa: u64, level: usize, perms: Perms, attrs: Self::Attrs) -> u64;

    /// A leaf at `level` mapping `oa` with `perms` and the default attributes (guest RAM).
    #[inline]
    fn leaf(&self, oa: u64, level: usize, perms: Perms) -> u64 {
        self.leaf_with(oa, level, perms, Self::Attrs::default())
    }

    /// The attributes of leaf `d` (what [`Format::leaf_with`] was given).
    fn attrs(&self, d: u64) -> Self::Attrs;

    /// The output address of a leaf at `level`.
    fn leaf_oa(&self, d: u64, level: usize) -> u64;

    /// The permissions the hardware grants through leaf `d`.
    fn leaf_perms(&self, d: u64) -> Perms;

    /// `d` with its hardware permissions replaced by `perms` (everything else kept).
    fn with_perms(&self, d: u64, perms: Perms) -> u64;

    /// The software-available descriptor bit that marks a leaf "write-protected for dirty
    /// logging" (a bit the hardware ignores in a leaf).
    const DIRTY_WP: u64;

    /// Whether leaf `d` carries the software "write-protected for dirty logging" mark.
    #[inline]
    fn is_dirty_wp(&self, d: u64) -> bool {
        d & Self::DIRTY_WP != 0
    }

    /// `d` with the "write-protected for dirty logging" mark set or cleared.
    #[inline]
    fn with_dirty_wp(&self, d: u64, on: bool) -> u64 {
        if on {
            d | Self::DIRTY_WP
        } else {
            d & !Self::DIRTY_WP
        }
    }

    /// Memory-attribute bits of a leaf (everything that must be equal for two leaves to merge into
    /// one block, besides output address and permissions).
    fn leaf_attrs(&self, d: u64) -> u64;
}
