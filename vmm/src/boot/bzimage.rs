//! The x86 bzImage setup header: validating a file as a 64-bit-bootable bzImage and reading the
//! fields the loader needs (Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header").

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

/// File offset of the setup header (the `setup_sects` field).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
const OFF_SETUP_SECTS: usize = 0x1f1;
const OFF_SYSSIZE: usize = 0x1f4;
const OFF_BOOT_FLAG: usize = 0x1fe;
const OFF_HEADER: usize = 0x202;
const OFF_VERSION: usize = 0x206;
const OFF_LOADFLAGS: usize = 0x211;
const OFF_CODE32_START: usize = 0x214;
const OFF_INITRD_ADDR_MAX: usize = 0x22c;
const OFF_XLOADFLAGS: usize = 0x236;
const OFF_CMDLINE_SIZE: usize = 0x238;
const OFF_PAYLOAD_OFFSET: usize = 0x248;
const OFF_PAYLOAD_LENGTH: usize = 0x24c;
const OFF_PREF_ADDRESS: usize = 0x258;
const OFF_INIT_SIZE: usize = 0x260;
/// The header ends after `init_size` + `handover_offset` + `kernel_info_offset` (protocol 2.15).
const HEADER_END: usize = 0x268;

/// The boot sector signature 0xAA55 at 0x1fe.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS", the boot-protocol magic at 0x202.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// The 64-bit entry (`startup_64`) needs protocol 2.12 or later (XLF_KERNEL_64 appears there).
pub const MIN_PROTOCOL_64BIT: u16 = 0x020c;
/// xloadflags bit 0: the kernel has the legacy 64-bit entry point at 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// loadflags bit 0: the protected-mode code is loaded at 0x100000 (a bzImage, not a zImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// Where a bzImage's protected-mode code goes: `code32_start` is never lower (boot.rst).
const HIGH_LOAD_ADDRESS: u32 = 0x10_0000;
/// Offset of `startup_64` from the start of the protected-mode code.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// A sector, the unit of `setup_sects`.
const SECTOR: usize = 512;
/// `setup_sects` of 0 means 4 (boot.rst).
const DEFAULT_SETUP_SECTS: usize = 4;
/// `syssize` counts 16-byte paragraphs.
const PARAGRAPH: usize = 16;

/// Why a file is not a usable bzImage. The first four have messages of their own in
/// [`super::BootError`]; the others say which header fields disagree with the file.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderProblem {
    /// Too short to hold the setup header.
    #[error("is {len} bytes, too short for the setup header")]
    TooShort {
        /// File length.
        len: usize,
    },
    /// Boot sector signature present but "HdrS" missing.
    #[error("has {found:#010x} at 0x202, not \"HdrS\"")]
    BadMagic {
        /// The four bytes found at 0x202.
        found: u32,
    },
    /// Protocol too old for a 64-bit entry.
    #[error("speaks boot protocol {version:#06x}")]
    OldProtocol {
        /// The version word.
        version: u16,
    },
    /// Not a 64-bit kernel.
    #[error("has no 64-bit entry point")]
    Not64Bit,
    /// The file ends before the end its header promises.
    #[error("promises {need} bytes (setup_sects, syssize) but the file has {len}")]
    Truncated {
        /// File length.
        len: usize,
        /// Length the header promises.
        need: usize,
    },
    /// `payload_length` 0: no compressed kernel.
    #[error("declares no compressed kernel (payload_length is 0)")]
    NoPayload,
    /// The payload lies (partly) outside the protected-mode code.
    #[error(
        "puts the compressed kernel (payload_offset {offset:#x}, payload_length {length:#x}) at \
         file bytes {start:#x}..{end:#x}, beyond the kernel code that ends at {code_end:#x} \
         (setup_sects, syssize)"
    )]
    PayloadOutOfBounds {
        /// `payload_offset`.
        offset: u32,
        /// `payload_length`.
        length: u32,
        /// File offset of the payload.
        start: u64,
        /// File offset of its end.
        end: u64,
        /// End of the protected-mode code in the file.
        code_end: usize,
    },
    /// A zImage: its code loads at 0x10000.
    #[error("has LOADED_HIGH clear in loadflags (a zImage, whose code loads below 1 MiB)")]
    NotLoadedHigh,
    /// `code32_start` below 1 MiB.
    #[error("puts the kernel code at {0:#x} (code32_start), below 1 MiB")]
    LowCode32Start(u32),
    /// `init_size` cannot even hold the kernel code.
    #[error("says the kernel needs {init_size:#x} bytes to run (init_size), less than its own {code:#x} bytes of code")]
    InitSizeTooSmall {
        /// `init_size`.
        init_size: u32,
        /// Bytes of protected-mode code.
        code: usize,
    },
}

/// The setup-header facts the loader uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupInfo {
    /// Protocol version (e.g. 0x020f).
    pub version: u16,
    /// Bytes of real-mode setup code before the protected-mode kernel.
    pub setup_bytes: usize,
    /// Highest address the initrd may end at.
    pub initrd_addr_max: u32,
    /// Longest command line, without the NUL.
    pub cmdline_size: u32,
    /// Where the kernel prefers to run (the decompressor moves it there).
    pub pref_address: u64,
    /// Memory the kernel needs from its run address, including the decompressor's work area.
    pub init_size: u32,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// True if the file carries the bzImage boot-sector signature or the "HdrS" magic.
pub fn looks_like_bzimage(b: &[u8]) -> bool {
    (b.len() >= OFF_BOOT_FLAG + 2 && u16_at(b, OFF_BOOT_FLAG) == BOOT_FLAG_MAGIC)
        || (b.len() >= OFF_HEADER + 4 && u32_at(b, OFF_HEADER) == HDRS_MAGIC)
}

/// Validates a bzImage for the 64-bit boot protocol and reads its header.
pub fn parse(b: &[u8]) -> Result<SetupInfo, HeaderProblem> {
    if b.len() < HEADER_END {
        return Err(HeaderProblem::TooShort { len: b.len() });
    }
    let magic = u32_at(b, OFF_HEADER);
    if magic != HDRS_MAGIC {
        return Err(HeaderProblem::BadMagic { found: magic });
    }
    let version = u16_at(b, OFF_VERSION);
    if version < MIN_PROTOCOL_64BIT {
        return Err(HeaderProblem::OldProtocol { version });
    }
    if u16_at(b, OFF_XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(HeaderProblem::Not64Bit);
    }
    // What linux-loader's BzImage::load requires of the in-guest path.
    if b[OFF_LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(HeaderProblem::NotLoadedHigh);
    }
    let code32_start = u32_at(b, OFF_CODE32_START);
    if code32_start < HIGH_LOAD_ADDRESS {
        return Err(HeaderProblem::LowCode32Start(code32_start));
    }
    let sects = match b[OFF_SETUP_SECTS] as usize {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    let setup_bytes = (sects + 1) * SECTOR;
    let need = setup_bytes + u32_at(b, OFF_SYSSIZE) as usize * PARAGRAPH;
    if b.len() < need {
        return Err(HeaderProblem::Truncated { len: b.len(), need });
    }
    // Protocol 2.08+ (so every 64-bit kernel) locates its compressed kernel inside the code.
    let (offset, length) = (u32_at(b, OFF_PAYLOAD_OFFSET), u32_at(b, OFF_PAYLOAD_LENGTH));
    if length == 0 {
        return Err(HeaderProblem::NoPayload);
    }
    let start = setup_bytes as u64 + u64::from(offset);
    let end = start + u64::from(length);
    if end > need as u64 {
        return Err(HeaderProblem::PayloadOutOfBounds {
            offset,
            length,
            start,
            end,
            code_end: need,
        });
    }
    // The kernel is decompressed in place: its run area holds at least the code itself.
    let init_size = u32_at(b, OFF_INIT_SIZE);
    if (init_size as usize) < need - setup_bytes {
        return Err(HeaderProblem::InitSizeTooSmall {
            init_size,
            code: need - setup_bytes,
        });
    }
    Ok(SetupInfo {
        version,
        setup_bytes,
        initrd_addr_max: u32_at(b, OFF_INITRD_ADDR_MAX),
        cmdline_size: u32_at(b, OFF_CMDLINE_SIZE),
        pref_address: u64_at(b, OFF_PREF_ADDRESS),
        init_size,
    })
}

/// The setup header as linux-loader's `setup_header` (for the zero page).
pub fn setup_header_of(b: &[u8]) -> setup_header {
    let size = std::mem::size_of::<setup_header>();
    let mut hdr = setup_header::default();
    let end = (SETUP_HEADER_OFFSET + size).min(b.len());
    let src = &b[SETUP_HEADER_OFFSET..end];
    hdr.as_mut_slice()[..src.len()].copy_from_slice(src);
    hdr
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A synthetic bzImage header: protocol 2.15, 64-bit, `setup_sects` 1, `syssize` 2, a
    /// 16-byte payload at offset 8 of the code.
    pub(crate) fn fake_bzimage() -> Vec<u8> {
        let mut b = vec![0u8; 2 * SECTOR + 2 * PARAGRAPH];
        b[OFF_SETUP_SECTS] = 1;
        b[OFF_SYSSIZE..OFF_SYSSIZE + 4].copy_from_slice(&2u32.to_le_bytes());
        b[OFF_BOOT_FLAG..OFF_BOOT_FLAG + 2].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        b[OFF_HEADER..OFF_HEADER + 4].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        b[OFF_XLOADFLAGS..OFF_XLOADFLAGS + 2].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        b[OFF_INITRD_ADDR_MAX..OFF_INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[OFF_CMDLINE_SIZE..OFF_CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        b[OFF_PREF_ADDRESS..OFF_PREF_ADDRESS + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[OFF_INIT_SIZE..OFF_INIT_SIZE + 4].copy_from_slice(&0x200_0000u32.to_le_bytes());
        b[OFF_LOADFLAGS] = LOADED_HIGH;
        set_u32(&mut b, OFF_CODE32_START, HIGH_LOAD_ADDRESS);
        set_u32(&mut b, OFF_PAYLOAD_OFFSET, 8);
        set_u32(&mut b, OFF_PAYLOAD_LENGTH, 16);
        b
    }

    /// [`fake_bzimage`] whose protected-mode code is exactly `payload` (padded to a paragraph),
    /// pointed at by `payload_offset` 0 and `payload_length`.
    pub(crate) fn fake_bzimage_with(payload: &[u8]) -> Vec<u8> {
        let mut b = fake_bzimage();
        b.truncate(2 * SECTOR);
        b.extend_from_slice(payload);
        b.resize(2 * SECTOR + payload.len().next_multiple_of(PARAGRAPH), 0);
        set_u32(
            &mut b,
            OFF_SYSSIZE,
            payload.len().div_ceil(PARAGRAPH) as u32,
        );
        set_u32(&mut b, OFF_PAYLOAD_OFFSET, 0);
        set_u32(&mut b, OFF_PAYLOAD_LENGTH, payload.len() as u32);
        b
    }

    fn set_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn parses_a_valid_header() {
        let b = fake_bzimage();
        let info = parse(&b).unwrap();
        assert_eq!(info.setup_bytes, 1024);
        assert_eq!(info.pref_address, 0x100_0000);
        assert_eq!(info.init_size, 0x200_0000);
        assert_eq!(info.cmdline_size, 2047);
        let hdr = setup_header_of(&b);
        let magic = hdr.header;
        assert_eq!(magic, HDRS_MAGIC);
    }

    #[test]
    fn rejects_each_problem() {
        let b = fake_bzimage();
        assert_eq!(
            parse(&b[..0x100]),
            Err(HeaderProblem::TooShort { len: 0x100 })
        );
        assert_eq!(
            parse(&b[..b.len() - 1]),
            Err(HeaderProblem::Truncated {
                len: b.len() - 1,
                need: b.len()
            })
        );
        let mut m = b.clone();
        m[OFF_HEADER] = b'X';
        assert!(matches!(parse(&m), Err(HeaderProblem::BadMagic { .. })));
        assert!(
            looks_like_bzimage(&m),
            "the boot sector signature is still there"
        );
        let mut v = b.clone();
        v[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert_eq!(
            parse(&v),
            Err(HeaderProblem::OldProtocol { version: 0x0206 })
        );
        let mut x = b;
        x[OFF_XLOADFLAGS] = 0;
        assert_eq!(parse(&x), Err(HeaderProblem::Not64Bit));
    }

    #[test]
    fn rejects_sizes_and_offsets_that_disagree_with_the_file() {
        let b = fake_bzimage();
        let mut none = b.clone();
        set_u32(&mut none, OFF_PAYLOAD_LENGTH, 0);
        assert_eq!(parse(&none), Err(HeaderProblem::NoPayload));
        // The code is bytes 1024..1056; a payload at 1032 may be 24 bytes long, not 25.
        let mut edge = b.clone();
        set_u32(&mut edge, OFF_PAYLOAD_LENGTH, 24);
        parse(&edge).unwrap();
        set_u32(&mut edge, OFF_PAYLOAD_LENGTH, 25);
        assert_eq!(
            parse(&edge),
            Err(HeaderProblem::PayloadOutOfBounds {
                offset: 8,
                length: 25,
                start: 1032,
                end: 1057,
                code_end: 1056
            })
        );
        let mut far = b.clone();
        set_u32(&mut far, OFF_PAYLOAD_OFFSET, u32::MAX);
        set_u32(&mut far, OFF_PAYLOAD_LENGTH, u32::MAX);
        let e = parse(&far).unwrap_err();
        assert!(matches!(e, HeaderProblem::PayloadOutOfBounds { .. }), "{e}");
        assert!(e.to_string().contains("payload_offset 0xffffffff"), "{e}");
        let mut small = b.clone();
        set_u32(&mut small, OFF_INIT_SIZE, 31);
        assert_eq!(
            parse(&small),
            Err(HeaderProblem::InitSizeTooSmall {
                init_size: 31,
                code: 32
            })
        );
        let mut zimage = b.clone();
        zimage[OFF_LOADFLAGS] = 0;
        assert_eq!(parse(&zimage), Err(HeaderProblem::NotLoadedHigh));
        let mut low = b.clone();
        set_u32(&mut low, OFF_CODE32_START, 0x1_0000);
        assert_eq!(parse(&low), Err(HeaderProblem::LowCode32Start(0x1_0000)));
        // setup_sects beyond the file: 255 sectors of setup promise 128 KiB.
        let mut sects = b;
        sects[OFF_SETUP_SECTS] = 255;
        assert!(matches!(
            parse(&sects),
            Err(HeaderProblem::Truncated { need: 131_104, .. })
        ));
    }
}
