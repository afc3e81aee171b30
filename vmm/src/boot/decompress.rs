//! Host-side decompression of a bzImage's payload into the vmlinux ELF, for every compression the kernel supports.
//!
//! A bzImage carries the kernel proper (`vmlinux`, an ELF file, followed by
//! its relocation table on relocatable kernels) compressed inside the
//! protected-mode part of the image; the decompressor linked in front of it
//! unpacks it in the guest at boot, which is slow on a KVM without EPT.
//! [`decompress_bzimage`] does that work on the host instead, so the loader
//! can enter the ELF directly. It recognises the payload by its magic bytes,
//! the way the kernel's `lib/decompress.c` does, and returns `Ok(None)` for a
//! compression it does not know: the caller then boots the bzImage as it is
//! and lets the in-guest decompressor run.
//!
//! Layout, from the x86 boot protocol (`Documentation/arch/x86/boot.rst`,
//! "The Real-Mode Kernel Header", fields `payload_offset` and
//! `payload_length`, protocol 2.08+) and `arch/x86/boot/compressed/Makefile`:
//!
//! ```text
//! file offset 0                      (setup_sects + 1) * 512
//! | boot sector + setup header + setup | protected-mode code ...
//!                                       + payload_offset
//!                                       | compressed vmlinux | u32 LE size |
//!                                       <------- payload_length -------->
//! ```
//!
//! Every x86 compression rule in that Makefile appends the uncompressed size
//! (`size_append`), so the payload always ends with it; the decompressors
//! here read the stream in front of it and check their output against it.

mod buffer;
mod lz4_legacy;
mod lzo1x;
mod lzop;

pub(crate) use buffer::advise_huge_pages;
use buffer::output_buffer;

use std::fmt;
use std::io::Read;
use std::time::Instant;

/// The compressions the kernel's x86 boot code can carry (`CONFIG_KERNEL_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// `gzip -n -9`: RFC 1952 member, CRC-32 and size checked.
    Gzip,
    /// `bzip2 -9`.
    Bzip2,
    /// `lzma -9`: the legacy `.lzma` ("LZMA alone") container.
    Lzma,
    /// `xz --check=crc32 --x86 --lzma2=dict=32MiB` (`scripts/xz_wrap.sh`).
    Xz,
    /// `lzop -9`: the lzop file format around LZO1X blocks.
    Lzo,
    /// `lz4 -l -9`: the LZ4 legacy frame (8 MiB blocks, no checksums).
    Lz4,
    /// `zstd -22 --ultra`.
    Zstd,
}

impl Compression {
    /// Every compression, in the order of the kernel's Kconfig choice.
    pub const ALL: [Compression; 7] = [
        Compression::Gzip,
        Compression::Bzip2,
        Compression::Lzma,
        Compression::Xz,
        Compression::Lzo,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// The name used by the kernel's Kconfig and Makefiles.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Xz => "xz",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// The magic bytes that open a stream of this compression, as matched by
    /// the kernel's `lib/decompress.c` (`compressed_formats[]`), except that
    /// lzma is matched on its usual properties byte and the two low bytes of
    /// its dictionary size, and lz4 on the whole legacy-frame magic.
    pub fn magic(self) -> &'static [u8] {
        match self {
            Compression::Gzip => &GZIP_MAGIC,
            Compression::Bzip2 => &BZIP2_MAGIC,
            Compression::Lzma => &LZMA_MAGIC,
            Compression::Xz => &XZ_MAGIC,
            Compression::Lzo => &lzop::MAGIC,
            Compression::Lz4 => &lz4_legacy::MAGIC,
            Compression::Zstd => &ZSTD_MAGIC,
        }
    }

    /// The compression whose magic opens `stream`, if any.
    pub fn detect(stream: &[u8]) -> Option<Compression> {
        Compression::ALL
            .into_iter()
            .find(|c| stream.starts_with(c.magic()))
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a bzImage's payload could not be turned into a vmlinux ELF.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// The file ends before the end of the setup header.
    #[error(
        "the bzImage is {len} bytes long, too short for the x86 setup header (which ends at byte \
         {needed}): the file is truncated or is not a bzImage"
    )]
    TooShort {
        /// Length of the file.
        len: usize,
        /// Bytes needed to read the setup header.
        needed: usize,
    },
    /// No "HdrS" at 0x202.
    #[error(
        "the bzImage has no \"HdrS\" boot-protocol magic at offset {:#x}: it is not a bzImage \
         (boot protocol 2.00 or later)",
        HEADER_MAGIC_OFFSET
    )]
    NoHeaderMagic,
    /// Boot protocol without `payload_offset`.
    #[error(
        "the bzImage uses boot protocol {major}.{minor:02}, which has no payload_offset (needs \
         2.08, Linux 2.6.26 or later): boot it with --no-fast-boot"
    )]
    ProtocolTooOld {
        /// Major protocol version.
        major: u8,
        /// Minor protocol version.
        minor: u8,
    },
    /// `payload_offset`/`payload_length` point outside the file.
    #[error(
        "the bzImage's payload ({length} bytes at offset {offset:#x}) ends beyond the {file_len}-byte \
         file: the file is truncated or its setup header is corrupt; fetch the kernel again"
    )]
    PayloadOutOfBounds {
        /// File offset of the payload.
        offset: u64,
        /// Declared payload length.
        length: u64,
        /// Length of the file.
        file_len: usize,
    },
    /// The payload cannot even hold the size trailer.
    #[error(
        "the bzImage's payload is {length} bytes, too short for a compressed kernel and its \
         4-byte size: the setup header is corrupt"
    )]
    PayloadTooShort {
        /// Declared payload length.
        length: usize,
    },
    /// The size trailer is beyond what a kernel can be.
    #[error(
        "the bzImage's payload declares an uncompressed kernel of {size} bytes, more than the \
         {max} bytes accepted: the payload is corrupt"
    )]
    SizeImplausible {
        /// Declared size.
        size: u64,
        /// Largest size accepted.
        max: usize,
    },
    /// The decompressor rejected the stream.
    #[error(
        "the bzImage's {format} payload is corrupt ({reason}): fetch the kernel again, or boot \
         with --no-fast-boot to let the kernel's own decompressor judge it"
    )]
    Corrupt {
        /// Compression of the payload.
        format: Compression,
        /// What the decompressor found wrong.
        reason: String,
    },
    /// The output length differs from the size trailer.
    #[error(
        "the bzImage's {format} payload decompressed to {actual} bytes but the image declares \
         {expected}: the payload is corrupt; fetch the kernel again"
    )]
    SizeMismatch {
        /// Compression of the payload.
        format: Compression,
        /// Size from the trailer.
        expected: usize,
        /// Size produced.
        actual: usize,
    },
    /// The output is not an ELF file.
    #[error(
        "the bzImage's {format} payload decompressed to data that is not an ELF file (it starts \
         with {head:02x?}), which the kernel's own decompressor refuses too: build or fetch the \
         kernel again"
    )]
    NotElf {
        /// Compression of the payload.
        format: Compression,
        /// First bytes of the output.
        head: Vec<u8>,
    },
}

/// Setup header fields, from `Documentation/arch/x86/boot.rst`, "The
/// Real-Mode Kernel Header" (offsets from the start of the file).
const SETUP_SECTS_OFFSET: usize = 0x1f1;
/// "HdrS", the boot-protocol magic (`header` field).
const HEADER_MAGIC_OFFSET: usize = 0x202;
const HEADER_MAGIC: [u8; 4] = *b"HdrS";
/// Boot protocol version, major in the high byte (`version` field).
const VERSION_OFFSET: usize = 0x206;
/// `payload_offset` (protocol 2.08+): payload start, relative to the
/// protected-mode code.
const PAYLOAD_OFFSET_OFFSET: usize = 0x248;
/// `payload_length` (protocol 2.08+).
const PAYLOAD_LENGTH_OFFSET: usize = 0x24c;
/// First boot protocol with `payload_offset`/`payload_length`.
const MIN_PROTOCOL: u16 = 0x0208;
/// The setup code is counted in 512-byte sectors, after the boot sector.
const SECTOR_SIZE: u64 = 512;
/// "If this field is 0, the real value is 4" (`setup_sects`).
const DEFAULT_SETUP_SECTS: u8 = 4;
/// Bytes needed to read every field above.
const SETUP_HEADER_END: usize = PAYLOAD_LENGTH_OFFSET + 4;

/// `size_append` in `scripts/Makefile.lib`: the uncompressed size, u32 LE.
const SIZE_TRAILER_LEN: usize = 4;
/// Largest uncompressed kernel accepted; a stripped x86-64 vmlinux with its
/// relocations is well under 100 MiB even for distribution kernels.
pub const MAX_VMLINUX_SIZE: usize = 1 << 30;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const BZIP2_MAGIC: [u8; 3] = *b"BZh";
/// Properties byte 0x5d (lc=3, lp=0, pb=2, what `lzma -9` writes) and the two
/// low bytes of a power-of-two dictionary size.
const LZMA_MAGIC: [u8; 3] = [0x5d, 0x00, 0x00];
const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// `ELFMAG` from `include/uapi/linux/elf.h`.
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// Decompresses the payload of `bzimage` into the vmlinux ELF.
///
/// Returns `Ok(None)` when the payload's compression is not recognised (boot
/// the bzImage through the in-guest decompressor then), and an error for a
/// malformed setup header or a recognised but corrupt payload.
pub fn decompress_bzimage(
    bzimage: &[u8],
) -> Result<Option<(Compression, Vec<u8>)>, DecompressError> {
    decompress_payload(bzimage_payload(bzimage)?)
}

/// The payload of `bzimage` (the compressed kernel and its 4-byte size), as
/// located by the setup header, with every offset checked against the file.
pub fn bzimage_payload(bzimage: &[u8]) -> Result<&[u8], DecompressError> {
    if bzimage.len() < SETUP_HEADER_END {
        return Err(DecompressError::TooShort {
            len: bzimage.len(),
            needed: SETUP_HEADER_END,
        });
    }
    if bzimage[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4] != HEADER_MAGIC {
        return Err(DecompressError::NoHeaderMagic);
    }
    let version = u16::from_le_bytes([bzimage[VERSION_OFFSET], bzimage[VERSION_OFFSET + 1]]);
    if version < MIN_PROTOCOL {
        let [minor, major] = version.to_le_bytes();
        return Err(DecompressError::ProtocolTooOld { major, minor });
    }
    let setup_sects = match bzimage[SETUP_SECTS_OFFSET] {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    let payload_offset = u64::from(read_u32_le(bzimage, PAYLOAD_OFFSET_OFFSET));
    let payload_length = u64::from(read_u32_le(bzimage, PAYLOAD_LENGTH_OFFSET));
    // At most 256 * 512 + 2^32 + 2^32: no overflow in u64.
    let offset = (u64::from(setup_sects) + 1) * SECTOR_SIZE + payload_offset;
    let end = offset + payload_length;
    if end > bzimage.len() as u64 {
        return Err(DecompressError::PayloadOutOfBounds {
            offset,
            length: payload_length,
            file_len: bzimage.len(),
        });
    }
    // Both fit in usize: they are bounded by the slice's length.
    Ok(&bzimage[offset as usize..end as usize])
}

/// Decompresses a bzImage payload (the compressed stream followed by its
/// 4-byte uncompressed size) into the vmlinux ELF; `Ok(None)` when the
/// compression is not recognised.
pub fn decompress_payload(
    payload: &[u8],
) -> Result<Option<(Compression, Vec<u8>)>, DecompressError> {
    let Some(format) = Compression::detect(payload) else {
        log::debug!(
            "bzImage payload starts with {:02x?}: no host-side decompressor for it",
            &payload[..payload.len().min(8)]
        );
        return Ok(None);
    };
    if payload.len() <= SIZE_TRAILER_LEN {
        return Err(DecompressError::PayloadTooShort {
            length: payload.len(),
        });
    }
    let (stream, trailer) = payload.split_at(payload.len() - SIZE_TRAILER_LEN);
    let size = read_u32_le(trailer, 0) as usize;
    if size > MAX_VMLINUX_SIZE {
        return Err(DecompressError::SizeImplausible {
            size: size as u64,
            max: MAX_VMLINUX_SIZE,
        });
    }

    let started = Instant::now();
    let corrupt = |reason: String| DecompressError::Corrupt { format, reason };
    let vmlinux = match format {
        // The kernel appends no size to a gzip payload (scripts/Makefile.lib: cmd_gzip has no
        // size_append): its last 4 bytes are the member's own ISIZE, part of the stream. The
        // decoder reads one member and ignores anything after it.
        Compression::Gzip => read_all(flate2::bufread::GzDecoder::new(payload), size)
            .map_err(|e| corrupt(e.to_string()))?,
        Compression::Bzip2 => read_all(bzip2::bufread::BzDecoder::new(stream), size)
            .map_err(|e| corrupt(e.to_string()))?,
        Compression::Lzma => {
            let decoder = xz2::stream::Stream::new_lzma_decoder(u64::MAX)
                .map_err(|e| corrupt(e.to_string()))?;
            run_liblzma(decoder, stream, size).map_err(corrupt)?
        }
        Compression::Xz => {
            let decoder = xz2::stream::Stream::new_stream_decoder(u64::MAX, 0)
                .map_err(|e| corrupt(e.to_string()))?;
            run_liblzma(decoder, stream, size).map_err(corrupt)?
        }
        Compression::Lzo => lzop::decompress(stream, size).map_err(|e| corrupt(e.to_string()))?,
        Compression::Lz4 => {
            lz4_legacy::decompress(stream, size).map_err(|e| corrupt(e.to_string()))?
        }
        Compression::Zstd => {
            let mut out = output_buffer(size);
            zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(stream, &mut out))
                .map_err(|e| corrupt(format!("{e}, or larger than the declared {size} bytes")))?;
            out
        }
    };
    log::debug!(
        "decompressed {format} payload: {} -> {} bytes in {:?}",
        stream.len(),
        vmlinux.len(),
        started.elapsed()
    );

    if vmlinux.len() != size {
        return Err(DecompressError::SizeMismatch {
            format,
            expected: size,
            actual: vmlinux.len(),
        });
    }
    if !vmlinux.starts_with(&ELF_MAGIC) {
        return Err(DecompressError::NotElf {
            format,
            head: vmlinux[..vmlinux.len().min(8)].to_vec(),
        });
    }
    Ok(Some((format, vmlinux)))
}

fn read_u32_le(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

/// Reads `decoder` to its end into a buffer sized for `size` bytes, failing
/// if it produces more than that.
fn read_all(decoder: impl Read, size: usize) -> std::io::Result<Vec<u8>> {
    let mut out = output_buffer(size);
    // One byte more than declared is enough to notice an overlong stream;
    // the length check in the caller reports it.
    decoder.take(size as u64 + 1).read_to_end(&mut out)?;
    Ok(out)
}

/// Runs a liblzma decoder (legacy lzma or xz) over `input` into a buffer
/// sized for `size` bytes.
fn run_liblzma(
    mut decoder: xz2::stream::Stream,
    input: &[u8],
    size: usize,
) -> Result<Vec<u8>, String> {
    use xz2::stream::{Action, Status};

    // One byte of room beyond the declared size lets an overlong stream show.
    let mut out = output_buffer(size + 1);
    loop {
        let consumed = decoder.total_in() as usize;
        let produced = out.len();
        let status = decoder
            .process_vec(&input[consumed..], &mut out, Action::Run)
            .map_err(|e| e.to_string())?;
        match status {
            Status::StreamEnd => return Ok(out),
            _ if out.len() == out.capacity() => {
                return Err(format!("more than the declared {size} bytes of output"));
            }
            _ if decoder.total_in() as usize == consumed && out.len() == produced => {
                return Err(format!(
                    "the stream ends after {} bytes without its end marker",
                    input.len()
                ));
            }
            _ => {}
        }
    }
}
