//! The lzop file format (`lzop -9`, the kernel's `CONFIG_KERNEL_LZO`): header, block list and checksums around LZO1X blocks.
//!
//! Layout, as lzop 1.0x writes it (all integers big-endian):
//!
//! ```text
//! magic[9]  version:u16  lib_version:u16  [version_needed:u16]  method:u8
//! [level:u8]  flags:u32  [filter:u32 if F_H_FILTER]  mode:u32  mtime_low:u32
//! [mtime_high:u32]  name_len:u8  name  header_checksum:u32
//! [extra_len:u32  extra  extra_checksum:u32 if F_H_EXTRA_FIELD]
//! blocks: dst_len:u32 (0 ends the file)  src_len:u32
//!         [d_adler32] [d_crc32] [c_adler32] [c_crc32]   (by flags; the c_
//!         checksums only for a compressed block, src_len < dst_len)
//!         src_len bytes: LZO1X data, or the bytes themselves if src_len == dst_len
//! ```
//!
//! Fields in brackets marked by no flag exist from format version 0x0940
//! on. Every checksum present is verified.

use super::lzo1x::{self, Lzo1xError};

/// lzop's file magic.
pub const MAGIC: [u8; 9] = [0x89, b'L', b'Z', b'O', 0x00, 0x0d, 0x0a, 0x1a, 0x0a];

/// Header flags (lzop `conf.h`).
const F_ADLER32_D: u32 = 0x0000_0001;
const F_ADLER32_C: u32 = 0x0000_0002;
const F_H_EXTRA_FIELD: u32 = 0x0000_0040;
const F_CRC32_D: u32 = 0x0000_0100;
const F_CRC32_C: u32 = 0x0000_0200;
const F_H_FILTER: u32 = 0x0000_0800;
const F_H_CRC32: u32 = 0x0000_1000;
/// Methods: LZO1X-1, LZO1X-1(15), LZO1X-999; all decode with LZO1X.
const M_LZO1X_1: u8 = 1;
const M_LZO1X_1_15: u8 = 2;
const M_LZO1X_999: u8 = 3;
/// Format version from which `version_needed`, `level` and `mtime_high` exist.
const VERSION_WITH_LEVEL: u16 = 0x0940;
/// lzop's `MAX_BLOCK_SIZE`.
const MAX_BLOCK_SIZE: usize = 64 << 20;

/// What is wrong with an lzop file.
#[derive(Debug, thiserror::Error)]
pub enum LzopError {
    /// Ran out of input.
    #[error("the lzop data ends inside its {0}")]
    Truncated(&'static str),
    /// A method other than LZO1X.
    #[error("lzop method {0} is not LZO1X (1, 2 or 3)")]
    UnsupportedMethod(u8),
    /// A filter was applied before compression.
    #[error("lzop filter {0} is not supported (the kernel never sets one)")]
    UnsupportedFilter(u32),
    /// Checksum mismatch.
    #[error("the {what} checksum is {actual:#010x}, expected {expected:#010x}")]
    Checksum {
        /// Which checksum.
        what: &'static str,
        /// Stored value.
        expected: u32,
        /// Computed value.
        actual: u32,
    },
    /// An impossible block header.
    #[error("block {index} declares {src_len} compressed bytes for {dst_len} bytes of output")]
    BadBlock {
        /// Block number from 0.
        index: usize,
        /// Compressed length.
        src_len: usize,
        /// Uncompressed length.
        dst_len: usize,
    },
    /// A block's LZO1X data ends before its declared size.
    #[error("block {index} decompresses to {actual} bytes, not the declared {expected}")]
    ShortBlock {
        /// Block number from 0.
        index: usize,
        /// Declared uncompressed length.
        expected: usize,
        /// Bytes produced.
        actual: usize,
    },
    /// The output outgrows its declared size.
    #[error("the blocks decompress to more than the declared {0} bytes")]
    TooLong(usize),
    /// A block's LZO1X data is corrupt.
    #[error("block {index}: {source}")]
    Lzo1x {
        /// Block number from 0.
        index: usize,
        /// The decoder's error.
        source: Lzo1xError,
    },
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], LzopError> {
        let bytes = self
            .data
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or(LzopError::Truncated(what))?;
        self.pos += n;
        Ok(bytes)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, LzopError> {
        Ok(self.bytes(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, LzopError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, LzopError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Adler-32 (RFC 1950, section 8.2) continued from `adler`.
fn adler32(adler: u32, data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    /// Largest run before the sums must be reduced to stay within u32.
    const NMAX: usize = 5552;
    let (mut a, mut b) = (adler & 0xffff, adler >> 16);
    for chunk in data.chunks(NMAX) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

fn check(what: &'static str, expected: u32, actual: u32) -> Result<(), LzopError> {
    if expected == actual {
        Ok(())
    } else {
        Err(LzopError::Checksum {
            what,
            expected,
            actual,
        })
    }
}

/// Decompresses an lzop file (starting with [`MAGIC`]) whose output is
/// declared to be `size` bytes; returns the bytes produced, at most `size`.
pub fn decompress(stream: &[u8], size: usize) -> Result<Vec<u8>, LzopError> {
    let mut r = Reader {
        data: stream,
        pos: MAGIC.len(),
    };
    let header_start = r.pos;
    let version = r.u16("header")?;
    r.u16("header")?; // lib_version
    if version >= VERSION_WITH_LEVEL {
        r.u16("header")?; // version_needed_to_extract
    }
    let method = r.u8("header")?;
    if !matches!(method, M_LZO1X_1 | M_LZO1X_1_15 | M_LZO1X_999) {
        return Err(LzopError::UnsupportedMethod(method));
    }
    if version >= VERSION_WITH_LEVEL {
        r.u8("header")?; // level
    }
    let flags = r.u32("header")?;
    if flags & F_H_FILTER != 0 {
        return Err(LzopError::UnsupportedFilter(r.u32("header")?));
    }
    r.u32("header")?; // mode
    r.u32("header")?; // mtime_low
    if version >= VERSION_WITH_LEVEL {
        r.u32("header")?; // mtime_high
    }
    let name_len = usize::from(r.u8("header")?);
    r.bytes(name_len, "header")?;
    let header = &stream[header_start..r.pos];
    let header_sum = r.u32("header")?;
    if flags & F_H_CRC32 != 0 {
        check("header CRC-32", header_sum, crc32fast::hash(header))?;
    } else {
        check("header Adler-32", header_sum, adler32(1, header))?;
    }
    if flags & F_H_EXTRA_FIELD != 0 {
        let extra_start = r.pos;
        let len = r.u32("extra field")? as usize;
        r.bytes(len, "extra field")?;
        let extra = &stream[extra_start..r.pos];
        let sum = r.u32("extra field")?;
        if flags & F_H_CRC32 != 0 {
            check("extra field CRC-32", sum, crc32fast::hash(extra))?;
        } else {
            check("extra field Adler-32", sum, adler32(1, extra))?;
        }
    }

    let mut out = super::buffer::output_buffer(size);
    for index in 0.. {
        let dst_len = r.u32("block list")? as usize;
        if dst_len == 0 {
            break;
        }
        let src_len = r.u32("block header")? as usize;
        if dst_len > MAX_BLOCK_SIZE || src_len > dst_len {
            return Err(LzopError::BadBlock {
                index,
                src_len,
                dst_len,
            });
        }
        if dst_len > size - out.len() {
            return Err(LzopError::TooLong(size));
        }
        let d_adler = (flags & F_ADLER32_D != 0)
            .then(|| r.u32("block header"))
            .transpose()?;
        let d_crc = (flags & F_CRC32_D != 0)
            .then(|| r.u32("block header"))
            .transpose()?;
        let compressed = src_len < dst_len;
        let c_adler = (compressed && flags & F_ADLER32_C != 0)
            .then(|| r.u32("block header"))
            .transpose()?;
        let c_crc = (compressed && flags & F_CRC32_C != 0)
            .then(|| r.u32("block header"))
            .transpose()?;
        let data = r.bytes(src_len, "block data")?;
        if let Some(sum) = c_adler {
            check("compressed block Adler-32", sum, adler32(1, data))?;
        }
        if let Some(sum) = c_crc {
            check("compressed block CRC-32", sum, crc32fast::hash(data))?;
        }

        let start = out.len();
        if compressed {
            lzo1x::decompress_block(data, &mut out, dst_len)
                .map_err(|source| LzopError::Lzo1x { index, source })?;
            if out.len() - start != dst_len {
                return Err(LzopError::ShortBlock {
                    index,
                    expected: dst_len,
                    actual: out.len() - start,
                });
            }
        } else {
            out.extend_from_slice(data);
        }
        let block = &out[start..];
        if let Some(sum) = d_adler {
            check("block Adler-32", sum, adler32(1, block))?;
        }
        if let Some(sum) = d_crc {
            check("block CRC-32", sum, crc32fast::hash(block))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adler32_matches_rfc1950_examples() {
        assert_eq!(adler32(1, b""), 1);
        assert_eq!(adler32(1, b"Wikipedia"), 0x11E6_0398);
        // Long enough to need the periodic reduction.
        let data = vec![0xffu8; 100_000];
        let slow = data.iter().fold((1u64, 0u64), |(a, b), &x| {
            let a = (a + u64::from(x)) % 65521;
            (a, (b + a) % 65521)
        });
        assert_eq!(adler32(1, &data), ((slow.1 << 16) | slow.0) as u32);
    }
}
