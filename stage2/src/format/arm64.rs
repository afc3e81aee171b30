//! ARM64 VMSAv8-64 stage-2 descriptors, 4 KiB granule, bit-exact (Arm ARM DDI 0487, D8.3).

use super::Format;
use crate::types::Perms;

/// Bit 0: valid (D8.3, "Translation table descriptor formats": bit 0 = 0 is a Fault
/// encoding; bits 63:1 are then ignored).
pub const VALID: u64 = 1 << 0;
/// Bit 1: at levels 0–2, 1 = table descriptor, 0 = block; at level 3, 1 = page (0 is reserved).
pub const TABLE_OR_PAGE: u64 = 1 << 1;
/// Bits 5:2: stage-2 MemAttr (D8 "Memory attributes", stage 2 encoding without FEAT_S2FWB).
pub const MEMATTR_SHIFT: u32 = 2;
/// Mask of MemAttr.
pub const MEMATTR_MASK: u64 = 0b1111 << MEMATTR_SHIFT;
/// MemAttr 0b1111: Normal, Outer Write-Back Cacheable, Inner Write-Back Cacheable.
pub const MEMATTR_NORMAL_WB: u64 = 0b1111;
/// MemAttr 0b0001: Device-nGnRE.
pub const MEMATTR_DEVICE_NGNRE: u64 = 0b0001;
/// Bit 6: `S2AP[0]`, read access allowed (D8 "Memory access control", stage 2 data access
/// permissions).
pub const S2AP_READ: u64 = 1 << 6;
/// Bit 7: `S2AP[1]`, write access allowed.
pub const S2AP_WRITE: u64 = 1 << 7;
/// Bits 9:8: shareability.
pub const SH_SHIFT: u32 = 8;
/// Mask of SH.
pub const SH_MASK: u64 = 0b11 << SH_SHIFT;
/// SH 0b11: Inner Shareable.
pub const SH_INNER: u64 = 0b11;
/// SH 0b10: Outer Shareable.
pub const SH_OUTER: u64 = 0b10;
/// SH 0b00: Non-shareable.
pub const SH_NON: u64 = 0b00;
/// Bit 10: access flag (set, so that no Access flag fault is taken).
pub const AF: u64 = 1 << 10;
/// Bits 47:12: output address (48-bit OA, 4 KiB granule).
pub const OA_MASK: u64 = 0x0000_ffff_ffff_f000;
/// Bit 51: dirty bit modifier (FEAT_HAFDBS: the CPU may set S2AP[1] on a write).
pub const DBM: u64 = 1 << 51;
/// Bit 52: contiguous hint (one of 16 adjacent, aligned entries with equal attributes).
pub const CONTIGUOUS: u64 = 1 << 52;
/// Bits 54:53: stage-2 `XN[1:0]` (D8 "Memory access control", stage 2 instruction execution
/// permissions; bit 53 is XN[0] with FEAT_XNX, RES0 without it).
pub const XN_SHIFT: u32 = 53;
/// Mask of XN.
pub const XN_MASK: u64 = 0b11 << XN_SHIFT;
/// XN 0b00: executable at EL1 and EL0.
pub const XN_NONE: u64 = 0b00;
/// XN 0b01 (FEAT_XNX): executable at EL0, not at EL1.
pub const XN_EL1: u64 = 0b01;
/// XN 0b10: executable at no EL.
pub const XN_NEVER: u64 = 0b10;
/// XN 0b11 (FEAT_XNX): executable at EL1, not at EL0.
pub const XN_EL0: u64 = 0b11;
/// Bit 55 (software, reserved for software use 58:55): "write-protected for dirty logging".
pub const SW_DIRTY_WP: u64 = 1 << 55;
/// Bit 56 (software) in an invalid descriptor (bit 0 = 0): the break-before-make marker.
pub const SW_LOCKED: u64 = 1 << 56;

/// Cacheability of one level (outer or inner) of Normal memory in a stage-2 MemAttr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cacheability {
    /// 0b01: Non-cacheable.
    NonCacheable,
    /// 0b10: Write-Through Cacheable.
    WriteThrough,
    /// 0b11: Write-Back Cacheable.
    WriteBack,
}

impl Cacheability {
    const fn bits(self) -> u64 {
        match self {
            Cacheability::NonCacheable => 0b01,
            Cacheability::WriteThrough => 0b10,
            Cacheability::WriteBack => 0b11,
        }
    }

    const fn from_bits(v: u64) -> Option<Cacheability> {
        Some(match v {
            0b01 => Cacheability::NonCacheable,
            0b10 => Cacheability::WriteThrough,
            0b11 => Cacheability::WriteBack,
            _ => return None,
        })
    }
}

/// The Device memory types of a stage-2 MemAttr (MemAttr[3:2] = 0b00, the type in MemAttr[1:0]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceType {
    /// 0b00: Device-nGnRnE.
    NGnRnE,
    /// 0b01: Device-nGnRE.
    NGnRE,
    /// 0b10: Device-nGRE.
    NGRE,
    /// 0b11: Device-GRE.
    Gre,
}

/// Stage-2 MemAttr[3:0] without FEAT_S2FWB (D8 "Memory region attributes", stage 2 memory type
/// and Cacheability): Device memory of a type, or Normal memory with outer (MemAttr[3:2]) and
/// inner (MemAttr[1:0]) cacheability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemAttr {
    /// Device memory.
    Device(DeviceType),
    /// Normal memory.
    Normal {
        /// MemAttr[3:2].
        outer: Cacheability,
        /// MemAttr[1:0].
        inner: Cacheability,
    },
}

impl MemAttr {
    /// Normal, Outer and Inner Write-Back Cacheable: guest RAM.
    pub const NORMAL_WB: MemAttr = MemAttr::Normal {
        outer: Cacheability::WriteBack,
        inner: Cacheability::WriteBack,
    };

    /// The 4-bit encoding.
    pub const fn bits(self) -> u64 {
        match self {
            MemAttr::Device(t) => match t {
                DeviceType::NGnRnE => 0b0000,
                DeviceType::NGnRE => MEMATTR_DEVICE_NGNRE,
                DeviceType::NGRE => 0b0010,
                DeviceType::Gre => 0b0011,
            },
            MemAttr::Normal { outer, inner } => outer.bits() << 2 | inner.bits(),
        }
    }

    /// The attribute an encoding stands for; `None` for Normal memory with inner 0b00 (reserved).
    pub const fn from_bits(v: u64) -> Option<MemAttr> {
        let (outer, inner) = ((v >> 2) & 0b11, v & 0b11);
        if outer == 0 {
            return Some(MemAttr::Device(match inner {
                0b00 => DeviceType::NGnRnE,
                0b01 => DeviceType::NGnRE,
                0b10 => DeviceType::NGRE,
                _ => DeviceType::Gre,
            }));
        }
        match (
            Cacheability::from_bits(outer),
            Cacheability::from_bits(inner),
        ) {
            (Some(outer), Some(inner)) => Some(MemAttr::Normal { outer, inner }),
            _ => None,
        }
    }
}

/// Shareability, SH[1:0] (0b01 is reserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shareability {
    /// 0b00: Non-shareable.
    Non,
    /// 0b10: Outer Shareable.
    Outer,
    /// 0b11: Inner Shareable.
    Inner,
}

/// Execution at EL0 relative to EL1, which the leaf's `Perms::X` decides (stage-2 XN[1:0]; the
/// two values other than `AsEl1` need FEAT_XNX).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum El0Exec {
    /// EL0 may execute exactly when EL1 may (XN 0b00 or 0b10).
    #[default]
    AsEl1,
    /// EL0 may not execute even where EL1 may (XN 0b11 with X, 0b10 without).
    Never,
    /// EL0 may execute even where EL1 may not (XN 0b01 without X, 0b00 with).
    Always,
}

/// The attributes of an ARM64 stage-2 leaf besides output address and S2AP/X permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct S2Attrs {
    /// Bits 5:2, MemAttr.
    pub mem_attr: MemAttr,
    /// Bits 9:8, SH.
    pub shareability: Shareability,
    /// Bits 54:53 together with `Perms::X`.
    pub el0_exec: El0Exec,
    /// Bit 10, the access flag (clear: the first access takes an Access flag fault).
    pub access_flag: bool,
    /// Bit 51, DBM (FEAT_HAFDBS).
    pub dbm: bool,
    /// Bit 52, the contiguous hint.
    pub contiguous: bool,
}

impl Default for S2Attrs {
    /// Guest RAM: Normal Write-Back, Inner Shareable, access flag set, EL0 as EL1, no hints.
    fn default() -> Self {
        S2Attrs {
            mem_attr: MemAttr::NORMAL_WB,
            shareability: Shareability::Inner,
            el0_exec: El0Exec::AsEl1,
            access_flag: true,
            dbm: false,
            contiguous: false,
        }
    }
}

/// The ARM64 stage-2 format with a 4 KiB granule, starting at level 0 (48-bit IPA).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Arm64 {
    /// The CPU implements FEAT_BBM level 2: a block may be replaced by a table mapping the same
    /// memory without the break step (Arm ARM D8, "Support levels for changing block size").
    pub bbm_level2: bool,
}

#[inline]
fn level_mask(level: usize) -> u64 {
    OA_MASK & !(crate::types::level_bytes(level) - 1)
}

impl Format for Arm64 {
    const DIRTY_WP: u64 = SW_DIRTY_WP;

    const NAME: &'static str = "arm64";

    #[inline]
    fn split_without_bbm(&self) -> bool {
        self.bbm_level2
    }

    #[inline]
    fn locked(&self) -> u64 {
        SW_LOCKED
    }

    #[inline]
    fn is_present(&self, d: u64) -> bool {
        d & VALID != 0
    }

    #[inline]
    fn is_table(&self, d: u64, level: usize) -> bool {
        level < 3 && d & (VALID | TABLE_OR_PAGE) == VALID | TABLE_OR_PAGE
    }

    #[inline]
    fn is_leaf(&self, d: u64, level: usize) -> bool {
        match level {
            // Level 3: page descriptor is 0b11.
            3 => d & (VALID | TABLE_OR_PAGE) == VALID | TABLE_OR_PAGE,
            // Levels 1 and 2: block descriptor is 0b01 (no level-0 blocks with a 4 KiB granule).
            1 | 2 => d & (VALID | TABLE_OR_PAGE) == VALID,
            _ => false,
        }
    }

    #[inline]
    fn table(&self, next: u64) -> u64 {
        (next & OA_MASK) | TABLE_OR_PAGE | VALID
    }

    #[inline]
    fn table_addr(&self, d: u64) -> u64 {
        d & OA_MASK
    }

    type Attrs = S2Attrs;

    #[inline]
    fn leaf_with(&self, oa: u64, level: usize, perms: Perms, a: S2Attrs) -> u64 {
        let kind = if level == 3 {
            TABLE_OR_PAGE | VALID
        } else {
            VALID
        };
        let flag = |on: bool, bit: u64| if on { bit } else { 0 };
        let sh = match a.shareability {
            Shareability::Non => SH_NON,
            Shareability::Outer => SH_OUTER,
            Shareability::Inner => SH_INNER,
        };
        (oa & level_mask(level))
            | kind
            | (a.mem_attr.bits() << MEMATTR_SHIFT)
            | (sh << SH_SHIFT)
            | flag(a.access_flag, AF)
            | flag(a.dbm, DBM)
            | flag(a.contiguous, CONTIGUOUS)
            | perm_bits(perms, a.el0_exec)
    }

    #[inline]
    fn attrs(&self, d: u64) -> S2Attrs {
        S2Attrs {
            // The engine writes no reserved encoding; one read from elsewhere counts as the
            // strictest Device type.
            mem_attr: MemAttr::from_bits((d & MEMATTR_MASK) >> MEMATTR_SHIFT)
                .unwrap_or(MemAttr::Device(DeviceType::NGnRnE)),
            shareability: match (d & SH_MASK) >> SH_SHIFT {
                SH_INNER => Shareability::Inner,
                SH_OUTER => Shareability::Outer,
                _ => Shareability::Non,
            },
            el0_exec: el0_exec(d),
            access_flag: d & AF != 0,
            dbm: d & DBM != 0,
            contiguous: d & CONTIGUOUS != 0,
        }
    }

    #[inline]
    fn leaf_oa(&self, d: u64, level: usize) -> u64 {
        d & level_mask(level)
    }

    #[inline]
    fn leaf_perms(&self, d: u64) -> Perms {
        let mut p = Perms::NONE;
        if d & S2AP_READ != 0 {
            p = p.union(Perms::R);
        }
        if d & S2AP_WRITE != 0 {
            p = p.union(Perms::W);
        }
        if el1_exec(d) {
            p = p.union(Perms::X);
        }
        p
    }

    #[inline]
    fn with_perms(&self, d: u64, perms: Perms) -> u64 {
        (d & !(S2AP_READ | S2AP_WRITE | XN_MASK)) | perm_bits(perms, el0_exec(d))
    }

    #[inline]
    fn leaf_attrs(&self, d: u64) -> u64 {
        // XN too: two leaves with equal X may still differ at EL0.
        d & (MEMATTR_MASK | SH_MASK | AF | DBM | CONTIGUOUS | XN_MASK | SW_DIRTY_WP)
    }
}

/// Whether XN lets EL1 execute (0b00, 0b11): what the engine calls `Perms::X`.
#[inline]
fn el1_exec(d: u64) -> bool {
    matches!((d & XN_MASK) >> XN_SHIFT, XN_NONE | XN_EL0)
}

/// EL0's execution relative to EL1's, from XN.
#[inline]
fn el0_exec(d: u64) -> El0Exec {
    match (d & XN_MASK) >> XN_SHIFT {
        XN_EL0 => El0Exec::Never,
        XN_EL1 => El0Exec::Always,
        _ => El0Exec::AsEl1,
    }
}

#[inline]
fn perm_bits(p: Perms, el0: El0Exec) -> u64 {
    let mut bits = 0;
    if p.contains(Perms::R) {
        bits |= S2AP_READ;
    }
    if p.contains(Perms::W) {
        bits |= S2AP_WRITE;
    }
    let xn = match (p.contains(Perms::X), el0) {
        (true, El0Exec::AsEl1 | El0Exec::Always) => XN_NONE,
        (true, El0Exec::Never) => XN_EL0,
        (false, El0Exec::Always) => XN_EL1,
        (false, El0Exec::AsEl1 | El0Exec::Never) => XN_NEVER,
    };
    bits | xn << XN_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Arm64 = Arm64 { bbm_level2: false };

    #[test]
    fn page_4k_rw_normal_memory() {
        // Page: valid + bit 1 = 0x3; MemAttr 0b1111 << 2 = 0x3c; S2AP 0b11 << 6 = 0xc0;
        // SH 0b11 << 8 = 0x300; AF = 0x400 -> low bits 0x7ff. Not executable: XN 0b10 << 53.
        let d = A.leaf(0x1234_5000, 3, Perms::RW);
        assert_eq!(d, 0x0040_0000_1234_57ff);
        assert!(A.is_leaf(d, 3) && !A.is_table(d, 3));
        assert_eq!(A.leaf_perms(d), Perms::RW);
        assert_eq!(A.leaf_oa(d, 3), 0x1234_5000);
    }

    #[test]
    fn block_2m_rwx() {
        // Block: valid only (bit 1 = 0) = 0x1; 0x3c + 0xc0 + 0x300 + 0x400 -> 0x7fd; XN = 0b00.
        let d = A.leaf(0x4020_0000, 2, Perms::RWX);
        assert_eq!(d, 0x0000_0000_4020_07fd);
        assert!(A.is_leaf(d, 2) && !A.is_table(d, 2));
        assert_eq!(A.leaf_perms(d), Perms::RWX);
    }

    #[test]
    fn block_1g_read_only() {
        // 0x1 + 0x3c + S2AP read 0x40 + 0x300 + 0x400 = 0x77d; XN 0b10 << 53 = 0x0040_0000_0000_0000.
        let d = A.leaf(0x8000_0000, 1, Perms::R);
        assert_eq!(d, 0x0040_0000_8000_077d);
        assert!(A.is_leaf(d, 1));
        assert_eq!(A.leaf_perms(d), Perms::R);
    }

    #[test]
    fn table_descriptor() {
        // Table: next-level address in 47:12, bits 1:0 = 0b11.
        let d = A.table(0x7f12_3456_7000);
        assert_eq!(d, 0x0000_7f12_3456_7003);
        assert!(A.is_table(d, 0) && A.is_table(d, 2));
        assert!(!A.is_leaf(d, 2));
        // The same bits at level 3 are a page, not a table.
        assert!(!A.is_table(d, 3) && A.is_leaf(d, 3));
    }

    #[test]
    fn locked_marker_is_a_fault_encoding() {
        // Bit 56 with bit 0 clear: a Fault encoding for the walker (D8.3).
        assert_eq!(A.locked(), 0x0100_0000_0000_0000);
        assert!(!A.is_present(A.locked()));
        assert!(!A.is_leaf(A.locked(), 3));
    }

    #[test]
    fn dirty_write_protect_software_bit() {
        // Read-only 4K page at 0x2000 with bit 55: 0x3 + 0x3c + 0x40 + 0x300 + 0x400 = 0x77f,
        // XN 0b10 << 53 | 1 << 55 = 0x00c0_0000_0000_0000.
        let d = A.with_dirty_wp(A.with_perms(A.leaf(0x2000, 3, Perms::RW), Perms::R), true);
        assert_eq!(d, 0x00c0_0000_0000_277f);
        assert!(A.is_dirty_wp(d));
    }

    // Attribute vectors, each derived bit by bit from the Arm ARM (DDI 0487), D8.3 "Translation
    // table descriptor formats" (stage 2 block and page descriptors: MemAttr 5:2, S2AP 7:6,
    // SH 9:8, AF 10, DBM 51, Contiguous 52, XN 54:53), D8 "Memory region attributes" (stage 2
    // MemAttr without FEAT_S2FWB) and D8 "Memory access control" (stage 2 XN[1:0], FEAT_XNX).

    #[test]
    fn attrs_4k_device_ngnre_non_shareable() {
        // Page 0x3; MemAttr 0b0001 (Device-nGnRE) << 2 = 0x4; S2AP RW 0xc0; SH 0b00; AF 0x400
        // -> 0x4c7; XN 0b10 (no X) << 53 = 0x0040_0000_0000_0000; OA 0x0900_0000.
        let a = S2Attrs {
            mem_attr: MemAttr::Device(DeviceType::NGnRE),
            shareability: Shareability::Non,
            ..S2Attrs::default()
        };
        let d = A.leaf_with(0x0900_0000, 3, Perms::RW, a);
        assert_eq!(d, 0x0040_0000_0900_04c7);
        assert_eq!(A.attrs(d), a);
        assert_eq!(A.leaf_perms(d), Perms::RW);
    }

    #[test]
    fn attrs_2m_outer_wb_inner_wt_outer_shareable_el1_only_exec() {
        // Block 0x1; MemAttr 0b1110 (outer WB 0b11, inner WT 0b10) << 2 = 0x38; S2AP read 0x40;
        // SH 0b10 << 8 = 0x200; AF 0x400 -> 0x679; X at EL1 but not EL0: XN 0b11 << 53 =
        // 0x0060_0000_0000_0000; OA 0x4020_0000.
        let a = S2Attrs {
            mem_attr: MemAttr::Normal {
                outer: Cacheability::WriteBack,
                inner: Cacheability::WriteThrough,
            },
            shareability: Shareability::Outer,
            el0_exec: El0Exec::Never,
            ..S2Attrs::default()
        };
        let d = A.leaf_with(0x4020_0000, 2, Perms::RX, a);
        assert_eq!(d, 0x0060_0000_4020_0679);
        assert_eq!(A.attrs(d), a);
        assert_eq!(A.leaf_perms(d), Perms::RX);
        // Taking X away keeps EL0 barred: XN 0b10.
        let nx = A.with_perms(d, Perms::R);
        assert_eq!(nx, 0x0040_0000_4020_0679);
    }

    #[test]
    fn attrs_4k_el0_only_exec_non_cacheable_dbm_contiguous() {
        // Page 0x3; MemAttr 0b0101 (outer and inner Non-cacheable) << 2 = 0x14; S2AP read 0x40;
        // SH 0b11 << 8 = 0x300; AF 0x400 -> 0x757. High bits: DBM 1 << 51 = 0x0008_..., Contiguous
        // 1 << 52 = 0x0010_..., EL0 but not EL1 executes: XN 0b01 << 53 = 0x0020_... -> 0x0038_...;
        // OA 0x8_0000_1000.
        let a = S2Attrs {
            mem_attr: MemAttr::Normal {
                outer: Cacheability::NonCacheable,
                inner: Cacheability::NonCacheable,
            },
            el0_exec: El0Exec::Always,
            dbm: true,
            contiguous: true,
            ..S2Attrs::default()
        };
        let d = A.leaf_with(0x8_0000_1000, 3, Perms::R, a);
        assert_eq!(d, 0x0038_0008_0000_1757);
        assert_eq!(A.attrs(d), a);
        assert_eq!(A.leaf_perms(d), Perms::R, "EL1 may not execute");
    }

    #[test]
    fn attrs_1g_access_flag_clear() {
        // Block 0x1; MemAttr 0b1111 << 2 = 0x3c; S2AP RW 0xc0; SH 0b11 << 8 = 0x300; AF clear
        // -> 0x3fd; XN 0b10 << 53; OA 0x4000_0000.
        let a = S2Attrs {
            access_flag: false,
            ..S2Attrs::default()
        };
        let d = A.leaf_with(0x4000_0000, 1, Perms::RW, a);
        assert_eq!(d, 0x0040_0000_4000_03fd);
        assert_eq!(A.attrs(d), a);
    }

    #[test]
    fn default_attrs_are_normal_write_back_ram() {
        assert_eq!(
            A.leaf(0x1234_5000, 3, Perms::RW),
            A.leaf_with(0x1234_5000, 3, Perms::RW, S2Attrs::default())
        );
        assert_eq!(A.attrs(A.leaf(0x1000, 3, Perms::RWX)), S2Attrs::default());
        for v in 0..16 {
            if let Some(m) = MemAttr::from_bits(v) {
                assert_eq!(m.bits(), v);
            }
        }
        assert_eq!(
            MemAttr::from_bits(0b1100),
            None,
            "Normal with inner 0b00 is reserved"
        );
    }

    #[test]
    fn split_without_break_only_with_bbm_level2() {
        assert!(!A.split_without_bbm());
        assert!(Arm64 { bbm_level2: true }.split_without_bbm());
    }
}
