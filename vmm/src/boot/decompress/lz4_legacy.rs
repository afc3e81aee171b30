//! The LZ4 legacy frame (`lz4 -l`), as the kernel's `lib/decompress_unlz4.c` reads it.
//!
//! Format (lz4's `doc/lz4_Frame_format.md`, "Legacy frame"): the magic
//! `0x184C2102` (u32 LE), then blocks, each a u32 LE compressed size and that
//! many bytes of one LZ4 block that decompresses to 8 MiB (the last block to
//! less). There is no end marker and no checksum: the frame ends where the
//! input ends. Another legacy magic in place of a block size starts a
//! concatenated frame and is skipped, as the kernel does.

/// The legacy frame magic, 0x184C2102 little-endian.
pub const MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Uncompressed size of every block but the last (`LEGACY_BLOCKSIZE`).
const BLOCK_SIZE: usize = 8 << 20;
/// `LZ4_COMPRESSBOUND(BLOCK_SIZE)`: no valid block is larger.
const MAX_COMPRESSED_BLOCK: usize = BLOCK_SIZE + BLOCK_SIZE / 255 + 16;

/// What is wrong with a legacy frame.
#[derive(Debug, thiserror::Error)]
pub enum Lz4LegacyError {
    /// A block size field is cut off.
    #[error("a block size field at byte {offset} is cut off by the end of the stream")]
    TruncatedSize {
        /// Offset of the field.
        offset: usize,
    },
    /// A block runs past the end of the input.
    #[error("the block at byte {offset} declares {size} bytes but only {available} remain")]
    TruncatedBlock {
        /// Offset of the block's data.
        offset: usize,
        /// Declared compressed size.
        size: usize,
        /// Bytes left in the input.
        available: usize,
    },
    /// A block size larger than LZ4 can produce for 8 MiB.
    #[error("the block at byte {offset} declares {size} compressed bytes, more than an 8 MiB block can take")]
    BlockTooLarge {
        /// Offset of the block's data.
        offset: usize,
        /// Declared compressed size.
        size: usize,
    },
    /// LZ4 rejected a block (or it would overflow the declared size).
    #[error("the block at byte {offset}: {source} (or it decompresses beyond the declared {size} bytes)")]
    Block {
        /// Offset of the block's data.
        offset: usize,
        /// Declared total uncompressed size.
        size: usize,
        /// The LZ4 block decoder's error.
        source: lz4_flex::block::DecompressError,
    },
}

/// Decompresses a legacy frame (starting with [`MAGIC`]) whose output is
/// declared to be `size` bytes; returns the bytes produced, at most `size`.
pub fn decompress(stream: &[u8], size: usize) -> Result<Vec<u8>, Lz4LegacyError> {
    let mut out = vec![0u8; size];
    let mut produced = 0;
    let mut pos = MAGIC.len();
    while pos < stream.len() {
        let Some(field) = stream.get(pos..pos + 4) else {
            return Err(Lz4LegacyError::TruncatedSize { offset: pos });
        };
        pos += 4;
        if field == MAGIC {
            continue;
        }
        let block_len = u32::from_le_bytes([field[0], field[1], field[2], field[3]]) as usize;
        if block_len > MAX_COMPRESSED_BLOCK {
            return Err(Lz4LegacyError::BlockTooLarge {
                offset: pos,
                size: block_len,
            });
        }
        let available = stream.len() - pos;
        if block_len > available {
            return Err(Lz4LegacyError::TruncatedBlock {
                offset: pos,
                size: block_len,
                available,
            });
        }
        let dst_end = size.min(produced + BLOCK_SIZE);
        let written = lz4_flex::block::decompress_into(
            &stream[pos..pos + block_len],
            &mut out[produced..dst_end],
        )
        .map_err(|source| Lz4LegacyError::Block {
            offset: pos,
            size,
            source,
        })?;
        produced += written;
        pos += block_len;
    }
    out.truncate(produced);
    Ok(out)
}
