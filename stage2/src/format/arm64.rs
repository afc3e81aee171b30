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
/// Bit 10: access flag (set, so that no Access flag fault is taken).
pub const AF: u64 = 1 << 10;
/// Bits 47:12: output address (48-bit OA, 4 KiB granule).
pub const OA_MASK: u64 = 0x0000_ffff_ffff_f000;
/// Bit 51: dirty bit modifier (FEAT_HAFDBS; never set by this engine).
pub const DBM: u64 = 1 << 51;
/// Bit 52: contiguous hint (never set by this engine).
pub const CONTIGUOUS: u64 = 1 << 52;
/// Bits 54:53: stage-2 `XN[1:0]` (D8 "Memory access control", stage 2 execute-never): 0b00 executable at EL1 and EL0, 0b10 not executable.
pub const XN_SHIFT: u32 = 53;
/// Mask of XN.
pub const XN_MASK: u64 = 0b11 << XN_SHIFT;
/// XN 0b10: execute-never at every EL.
pub const XN_NEVER: u64 = 0b10;
/// Bit 55 (software, reserved for software use 58:55): "write-protected for dirty logging".
pub const SW_DIRTY_WP: u64 = 1 << 55;
/// Bit 56 (software) in an invalid descriptor (bit 0 = 0): the break-before-make marker.
pub const SW_LOCKED: u64 = 1 << 56;

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

    #[inline]
    fn leaf(&self, oa: u64, level: usize, perms: Perms) -> u64 {
        let kind = if level == 3 {
            TABLE_OR_PAGE | VALID
        } else {
            VALID
        };
        (oa & level_mask(level))
            | kind
            | (MEMATTR_NORMAL_WB << MEMATTR_SHIFT)
            | (SH_INNER << SH_SHIFT)
            | AF
            | perm_bits(perms)
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
        if (d & XN_MASK) >> XN_SHIFT == 0 {
            p = p.union(Perms::X);
        }
        p
    }

    #[inline]
    fn with_perms(&self, d: u64, perms: Perms) -> u64 {
        (d & !(S2AP_READ | S2AP_WRITE | XN_MASK)) | perm_bits(perms)
    }

    #[inline]
    fn is_dirty_wp(&self, d: u64) -> bool {
        d & SW_DIRTY_WP != 0
    }

    #[inline]
    fn with_dirty_wp(&self, d: u64, on: bool) -> u64 {
        if on {
            d | SW_DIRTY_WP
        } else {
            d & !SW_DIRTY_WP
        }
    }

    #[inline]
    fn leaf_attrs(&self, d: u64) -> u64 {
        d & (MEMATTR_MASK | SH_MASK | AF | DBM | CONTIGUOUS | SW_DIRTY_WP)
    }
}

#[inline]
fn perm_bits(p: Perms) -> u64 {
    let mut bits = 0;
    if p.contains(Perms::R) {
        bits |= S2AP_READ;
    }
    if p.contains(Perms::W) {
        bits |= S2AP_WRITE;
    }
    if !p.contains(Perms::X) {
        bits |= XN_NEVER << XN_SHIFT;
    }
    bits
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

    #[test]
    fn split_without_break_only_with_bbm_level2() {
        assert!(!A.split_without_bbm());
        assert!(Arm64 { bbm_level2: true }.split_without_bbm());
    }
}
