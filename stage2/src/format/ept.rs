//! Intel EPT paging-structure entries, bit-exact (Intel SDM Vol. 3C §29.3.2, Tables 29-1 to 29-6).

use super::Format;
use crate::types::Perms;

/// Bit 0: read access (all EPT entries; Table 29-1..29-6).
pub const READ: u64 = 1 << 0;
/// Bit 1: write access.
pub const WRITE: u64 = 1 << 1;
/// Bit 2: execute access (supervisor-mode execute when mode-based execute control is on).
pub const EXEC: u64 = 1 << 2;
/// Bits 2:0 together: an entry is present when any of them is set (§29.3.2: "not present" if 2:0 = 0).
pub const RWX_MASK: u64 = READ | WRITE | EXEC;
/// Bits 5:3: EPT memory type of a leaf (§29.3.7).
pub const MEMTYPE_SHIFT: u32 = 3;
/// Mask of the memory-type field.
pub const MEMTYPE_MASK: u64 = 0b111 << MEMTYPE_SHIFT;
/// Memory type 6: write-back (§29.3.7; encodings as for the PAT: 0 UC, 1 WC, 4 WT, 5 WP, 6 WB).
pub const MEMTYPE_WB: u64 = 6;
/// Bit 6: ignore the guest PAT memory type (leaves only).
pub const IGNORE_PAT: u64 = 1 << 6;
/// Bit 7: the entry maps a page (1 GiB in a PDPTE, Table 29-2; 2 MiB in a PDE, Table 29-4).
pub const LARGE_PAGE: u64 = 1 << 7;
/// Bit 8: accessed flag (set by the CPU when A/D flags are enabled in the EPTP).
pub const ACCESSED: u64 = 1 << 8;
/// Bit 9: dirty flag (leaves only, with A/D flags enabled).
pub const DIRTY: u64 = 1 << 9;
/// Bit 10: user-mode execute access (mode-based execute control).
pub const USER_EXEC: u64 = 1 << 10;
/// Bits 51:12: physical address of the 4 KiB frame or next table (bits above MAXPHYADDR must be 0).
pub const FRAME_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bit 52 (software, ignored by the CPU in every entry): "write-protected for dirty logging": the
/// mapping is writable but W is withheld until the next write fault records the page as dirty.
pub const SW_DIRTY_WP: u64 = 1 << 52;
/// Bit 53 (software): in a not-present entry (bits 2:0 = 0), the break-before-make marker.
pub const SW_LOCKED: u64 = 1 << 53;
/// Bit 63: suppress #VE (ignored unless EPT-violation #VE is enabled).
pub const SUPPRESS_VE: u64 = 1 << 63;

/// The EPT memory type of a leaf, bits 5:3 (§29.3.7, "EPT and Memory Typing"; the encodings are
/// the PAT's; 2, 3 and 7 are reserved and make the entry misconfigured).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemType {
    /// 0: uncacheable (UC).
    Uncacheable,
    /// 1: write-combining (WC).
    WriteCombining,
    /// 4: write-through (WT).
    WriteThrough,
    /// 5: write-protected (WP).
    WriteProtected,
    /// 6: write-back (WB), guest RAM.
    #[default]
    WriteBack,
}

impl MemType {
    /// The 3-bit encoding.
    pub const fn bits(self) -> u64 {
        match self {
            MemType::Uncacheable => 0,
            MemType::WriteCombining => 1,
            MemType::WriteThrough => 4,
            MemType::WriteProtected => 5,
            MemType::WriteBack => MEMTYPE_WB,
        }
    }

    /// The type an encoding stands for; `None` for the reserved 2, 3 and 7.
    pub const fn from_bits(v: u64) -> Option<MemType> {
        Some(match v {
            0 => MemType::Uncacheable,
            1 => MemType::WriteCombining,
            4 => MemType::WriteThrough,
            5 => MemType::WriteProtected,
            6 => MemType::WriteBack,
            _ => return None,
        })
    }
}

/// The attributes of an EPT leaf besides output address and R/W/X (Table 29-6 for a 4 KiB page;
/// Tables 29-2 and 29-4 give 1 GiB and 2 MiB pages the same bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptAttrs {
    /// Bits 5:3, the EPT memory type.
    pub mem_type: MemType,
    /// Bit 6: ignore the guest's PAT memory type, use `mem_type` alone (§29.3.7).
    pub ignore_pat: bool,
    /// Bit 8: accessed (the CPU sets it when A/D flags are enabled in the EPTP, §29.3.5).
    pub accessed: bool,
    /// Bit 9: dirty (set on a write with A/D flags enabled, §29.3.5).
    pub dirty: bool,
    /// Bit 10: user-mode execute (with mode-based execute control; bit 2 is then
    /// supervisor-mode execute).
    pub user_exec: bool,
    /// Bit 63: suppress #VE (an EPT violation through this entry is a VM exit even when
    /// EPT-violation #VE is enabled).
    pub suppress_ve: bool,
}

impl Default for EptAttrs {
    /// Guest RAM: write-back, the guest's PAT respected, no flag set.
    fn default() -> Self {
        EptAttrs {
            mem_type: MemType::WriteBack,
            ignore_pat: false,
            accessed: false,
            dirty: false,
            user_exec: false,
            suppress_ve: false,
        }
    }
}

/// The x86 EPT format (4-level, 4 KiB pages, 2 MiB and 1 GiB large pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ept;

#[inline]
fn level_mask(level: usize) -> u64 {
    // Output address bits of a leaf: 51:12 (4K), 51:21 (2M), 51:30 (1G); the rest are reserved 0.
    FRAME_MASK & !(crate::types::level_bytes(level) - 1)
}

impl Format for Ept {
    const DIRTY_WP: u64 = SW_DIRTY_WP;

    const NAME: &'static str = "ept";

    #[inline]
    fn split_without_bbm(&self) -> bool {
        // Intel allows replacing a large-page entry by a table that maps the same memory with the
        // same attributes in one write (KVM's TDP MMU splits huge pages this way): a stale cached
        // large-page translation stays correct until the flush (SDM Vol. 3C §29.4, "Caching
        // translation information").
        true
    }

    #[inline]
    fn locked(&self) -> u64 {
        SW_LOCKED
    }

    #[inline]
    fn is_present(&self, d: u64) -> bool {
        d & RWX_MASK != 0
    }

    #[inline]
    fn is_table(&self, d: u64, level: usize) -> bool {
        // PML4Es always reference a table (bit 7 reserved); PDPTEs / PDEs with bit 7 clear do.
        self.is_present(d) && level < 3 && (level == 0 || d & LARGE_PAGE == 0)
    }

    #[inline]
    fn is_leaf(&self, d: u64, level: usize) -> bool {
        self.is_present(d) && (level == 3 || ((1..3).contains(&level) && d & LARGE_PAGE != 0))
    }

    #[inline]
    fn table(&self, next: u64) -> u64 {
        // Table 29-1/29-3/29-5: the effective permission is the AND over all levels, so upper
        // levels grant everything and leaves decide.
        (next & FRAME_MASK) | RWX_MASK
    }

    #[inline]
    fn table_addr(&self, d: u64) -> u64 {
        d & FRAME_MASK
    }

    type Attrs = EptAttrs;

    #[inline]
    fn leaf_with(&self, oa: u64, level: usize, perms: Perms, a: EptAttrs) -> u64 {
        let flag = |on: bool, bit: u64| if on { bit } else { 0 };
        (oa & level_mask(level))
            | (a.mem_type.bits() << MEMTYPE_SHIFT)
            | flag(level < 3, LARGE_PAGE)
            | flag(a.ignore_pat, IGNORE_PAT)
            | flag(a.accessed, ACCESSED)
            | flag(a.dirty, DIRTY)
            | flag(a.user_exec, USER_EXEC)
            | flag(a.suppress_ve, SUPPRESS_VE)
            | perms_bits(perms)
    }

    #[inline]
    fn attrs(&self, d: u64) -> EptAttrs {
        EptAttrs {
            // The engine writes no reserved encoding; one read from elsewhere counts as UC.
            mem_type: MemType::from_bits((d & MEMTYPE_MASK) >> MEMTYPE_SHIFT)
                .unwrap_or(MemType::Uncacheable),
            ignore_pat: d & IGNORE_PAT != 0,
            accessed: d & ACCESSED != 0,
            dirty: d & DIRTY != 0,
            user_exec: d & USER_EXEC != 0,
            suppress_ve: d & SUPPRESS_VE != 0,
        }
    }

    #[inline]
    fn leaf_oa(&self, d: u64, level: usize) -> u64 {
        d & level_mask(level)
    }

    #[inline]
    fn leaf_perms(&self, d: u64) -> Perms {
        Perms::from_bits((d & RWX_MASK) as u8)
    }

    #[inline]
    fn with_perms(&self, d: u64, perms: Perms) -> u64 {
        (d & !RWX_MASK) | perms_bits(perms)
    }

    #[inline]
    fn leaf_attrs(&self, d: u64) -> u64 {
        // Accessed and dirty are the CPU's status flags, not attributes: they do not block a merge.
        d & (MEMTYPE_MASK | IGNORE_PAT | USER_EXEC | SUPPRESS_VE | SW_DIRTY_WP)
    }
}

/// EPT's R/W/X bits 2:0 happen to be the engine's R=1/W=2/X=4 encoding.
#[inline]
fn perms_bits(p: Perms) -> u64 {
    p.bits() as u64 & RWX_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_4k_rw_write_back() {
        // R (bit 0) + W (bit 1) = 0x3; memory type WB = 6 in bits 5:3 = 0x30; frame 0x12345 in 51:12.
        let d = Ept.leaf(0x1234_5000, 3, Perms::RW);
        assert_eq!(d, 0x0000_0000_1234_5033);
        assert!(Ept.is_leaf(d, 3) && !Ept.is_table(d, 3));
        assert_eq!(Ept.leaf_oa(d, 3), 0x1234_5000);
        assert_eq!(Ept.leaf_perms(d), Perms::RW);
    }

    #[test]
    fn block_2m_rwx() {
        // RWX = 0x7, WB 0x30, large page (bit 7) 0x80 -> 0xb7; 2 MiB frame 0x4020_0000 in 51:21.
        let d = Ept.leaf(0x4020_0000, 2, Perms::RWX);
        assert_eq!(d, 0x0000_0000_4020_00b7);
        assert!(Ept.is_leaf(d, 2) && !Ept.is_table(d, 2));
        assert_eq!(Ept.leaf_oa(d, 2), 0x4020_0000);
    }

    #[test]
    fn block_1g_read_only() {
        // R = 0x1, WB 0x30, large page 0x80 -> 0xb1; 1 GiB frame 0x8000_0000 in 51:30.
        let d = Ept.leaf(0x8000_0000, 1, Perms::R);
        assert_eq!(d, 0x0000_0000_8000_00b1);
        assert!(Ept.is_leaf(d, 1));
        assert_eq!(Ept.leaf_perms(d), Perms::R);
    }

    #[test]
    fn table_entry_grants_rwx() {
        // Table 29-3: address of the next table in 51:12, bits 2:0 = RWX, bit 7 = 0.
        let d = Ept.table(0x7f12_3456_7000);
        assert_eq!(d, 0x0000_7f12_3456_7007);
        assert!(Ept.is_table(d, 0) && Ept.is_table(d, 1) && Ept.is_table(d, 2));
        assert!(!Ept.is_table(d, 3), "a PTE never references a table");
        assert_eq!(Ept.table_addr(d), 0x7f12_3456_7000);
    }

    #[test]
    fn locked_marker_is_not_present() {
        // Bit 53 alone: bits 2:0 = 0 -> not present for the CPU (an EPT violation).
        assert_eq!(Ept.locked(), 0x0020_0000_0000_0000);
        assert!(!Ept.is_present(Ept.locked()));
        assert!(!Ept.is_leaf(Ept.locked(), 3) && !Ept.is_table(Ept.locked(), 1));
    }

    #[test]
    fn dirty_write_protect_keeps_mapping() {
        // A read-only 4K page at 0x1000 with the software bit 52 set: 0x1 | 0x30 | 1 << 52.
        let d = Ept.with_dirty_wp(
            Ept.with_perms(Ept.leaf(0x1000, 3, Perms::RW), Perms::R),
            true,
        );
        assert_eq!(d, 0x0010_0000_0000_1031);
        assert!(Ept.is_dirty_wp(d));
        assert_eq!(Ept.leaf_oa(d, 3), 0x1000);
        assert!(!Ept.is_dirty_wp(Ept.with_dirty_wp(d, false)));
    }

    // Attribute vectors, each derived bit by bit from Intel SDM Vol. 3C Table 29-6 (4 KiB page),
    // Table 29-4 (2 MiB page) or Table 29-2 (1 GiB page); memory types from §29.3.7, A/D flags
    // from §29.3.5.

    #[test]
    fn attrs_4k_uncacheable_ignore_pat() {
        // Table 29-6: R (bit 0) = 0x1; memory type UC = 0 in 5:3; ignore PAT (bit 6) = 0x40;
        // frame 0xfee00 in 51:12 (the local APIC page) -> 0xfee0_0041.
        let a = EptAttrs {
            mem_type: MemType::Uncacheable,
            ignore_pat: true,
            ..EptAttrs::default()
        };
        let d = Ept.leaf_with(0xfee0_0000, 3, Perms::R, a);
        assert_eq!(d, 0x0000_0000_fee0_0041);
        assert_eq!(Ept.attrs(d), a);
        assert_eq!(Ept.leaf_perms(d), Perms::R);
    }

    #[test]
    fn attrs_2m_write_combining_accessed_dirty_suppress_ve() {
        // Table 29-4: RWX = 0x7; WC = 1 in 5:3 = 0x08; bit 7 (2 MiB page) = 0x80; accessed
        // (bit 8) = 0x100; dirty (bit 9) = 0x200 -> 0x38f; suppress #VE is bit 63; frame
        // 0x4020_0000 in 51:21.
        let a = EptAttrs {
            mem_type: MemType::WriteCombining,
            accessed: true,
            dirty: true,
            suppress_ve: true,
            ..EptAttrs::default()
        };
        let d = Ept.leaf_with(0x4020_0000, 2, Perms::RWX, a);
        assert_eq!(d, 0x8000_0000_4020_038f);
        assert!(Ept.is_leaf(d, 2));
        assert_eq!(Ept.leaf_oa(d, 2), 0x4020_0000);
        assert_eq!(Ept.attrs(d), a);
    }

    #[test]
    fn attrs_4k_write_through_user_exec() {
        // Table 29-6: R + X (bits 0, 2) = 0x5; WT = 4 in 5:3 = 0x20; user-mode execute
        // (bit 10) = 0x400 -> 0x425; frame 0x7 -> 0x7425.
        let a = EptAttrs {
            mem_type: MemType::WriteThrough,
            user_exec: true,
            ..EptAttrs::default()
        };
        let d = Ept.leaf_with(0x7000, 3, Perms::RX, a);
        assert_eq!(d, 0x0000_0000_0000_7425);
        assert_eq!(Ept.attrs(d), a);
        // A permission change keeps every attribute.
        let w = Ept.with_perms(d, Perms::RWX);
        assert_eq!(w, 0x0000_0000_0000_7427);
        assert_eq!(Ept.attrs(w), a);
    }

    #[test]
    fn attrs_1g_write_protected() {
        // Table 29-2: RW = 0x3; WP = 5 in 5:3 = 0x28; bit 7 (1 GiB page) = 0x80 -> 0xab; frame
        // 0x1_4000_0000 in 51:30.
        let a = EptAttrs {
            mem_type: MemType::WriteProtected,
            ..EptAttrs::default()
        };
        let d = Ept.leaf_with(0x1_4000_0000, 1, Perms::RW, a);
        assert_eq!(d, 0x0000_0001_4000_00ab);
        assert_eq!(Ept.attrs(d), a);
    }

    #[test]
    fn default_attrs_are_write_back_ram() {
        assert_eq!(
            Ept.leaf(0x1234_5000, 3, Perms::RW),
            Ept.leaf_with(0x1234_5000, 3, Perms::RW, EptAttrs::default())
        );
        assert_eq!(
            Ept.attrs(Ept.leaf(0x1000, 3, Perms::R)),
            EptAttrs::default()
        );
        for t in [
            MemType::Uncacheable,
            MemType::WriteCombining,
            MemType::WriteThrough,
            MemType::WriteProtected,
            MemType::WriteBack,
        ] {
            assert_eq!(MemType::from_bits(t.bits()), Some(t));
        }
        assert_eq!(MemType::from_bits(2), None, "reserved");
    }

    #[test]
    fn split_needs_no_break() {
        assert!(Ept.split_without_bbm());
    }
}
