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

/// One block of the frame: where its compressed bytes are in the stream.
#[derive(Clone, Copy, Debug)]
struct Block {
    /// Offset of the block's data (after its size field), for error messages.
    offset: usize,
    /// Its compressed length.
    len: usize,
}

/// Walks the frame's block headers (no decompression), checking each size against the input.
fn blocks(stream: &[u8]) -> Result<Vec<Block>, Lz4LegacyError> {
    let mut out = Vec::new();
    let mut pos = MAGIC.len();
    while pos < stream.len() {
        let Some(field) = stream.get(pos..pos + 4) else {
            return Err(Lz4LegacyError::TruncatedSize { offset: pos });
        };
        pos += 4;
        if field == MAGIC {
            continue;
        }
        let len = u32::from_le_bytes([field[0], field[1], field[2], field[3]]) as usize;
        if len > MAX_COMPRESSED_BLOCK {
            return Err(Lz4LegacyError::BlockTooLarge {
                offset: pos,
                size: len,
            });
        }
        let available = stream.len() - pos;
        if len > available {
            return Err(Lz4LegacyError::TruncatedBlock {
                offset: pos,
                size: len,
                available,
            });
        }
        out.push(Block { offset: pos, len });
        pos += len;
    }
    Ok(out)
}

/// Decompresses a legacy frame (starting with [`MAGIC`]) whose output is
/// declared to be `size` bytes; returns the bytes produced, at most `size`.
///
/// The blocks are independent (no match reaches into an earlier block), so they are decompressed
/// on up to [`std::thread::available_parallelism`] threads, block `k` straight into bytes
/// `k * 8 MiB ..` of the output. That placement assumes every block but the last fills its
/// 8 MiB, as `lz4 -l` writes them; a frame that breaks the assumption (or any block error) is
/// decompressed again one block after another, which gives the exact output or error.
pub fn decompress(stream: &[u8], size: usize) -> Result<Vec<u8>, Lz4LegacyError> {
    let blocks = blocks(stream)?;
    let mut out = vec![0u8; size];
    super::buffer::advise_huge_pages(out.as_ptr(), out.len());
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(blocks.len());
    if threads > 1 && blocks.len() <= size.div_ceil(BLOCK_SIZE) {
        if let Some(produced) = decompress_parallel(stream, &blocks, &mut out, threads) {
            out.truncate(produced);
            return Ok(out);
        }
    }
    let produced = decompress_sequential(stream, &blocks, &mut out, size)?;
    out.truncate(produced);
    Ok(out)
}

/// Block `k` into `out[k * BLOCK_SIZE..]`, blocks shared out over `threads` threads. Returns the
/// bytes produced, or `None` when a block fails or a block but the last is short (the caller
/// then decompresses sequentially for the exact result).
fn decompress_parallel(
    stream: &[u8],
    blocks: &[Block],
    out: &mut [u8],
    threads: usize,
) -> Option<usize> {
    let mut jobs: Vec<Vec<(usize, Block, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (k, (block, dst)) in blocks.iter().zip(out.chunks_mut(BLOCK_SIZE)).enumerate() {
        jobs[k % threads].push((k, *block, dst));
    }
    let mut written = vec![None; blocks.len()];
    std::thread::scope(|s| {
        let workers: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                s.spawn(move || {
                    job.into_iter()
                        .map(|(k, b, dst)| {
                            let src = &stream[b.offset..b.offset + b.len];
                            (k, lz4_flex::block::decompress_into(src, dst).ok())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for w in workers {
            // A worker only panics if lz4_flex does; treat it as a failed block.
            for (k, n) in w.join().unwrap_or_default() {
                written[k] = n;
            }
        }
    });
    let last = blocks.len().checked_sub(1)?;
    let mut produced = 0;
    for (k, n) in written.into_iter().enumerate() {
        let n = n?;
        if k < last && n != BLOCK_SIZE {
            return None;
        }
        produced += n;
    }
    Some(produced)
}

/// The blocks one after another, each right after the previous one's output.
fn decompress_sequential(
    stream: &[u8],
    blocks: &[Block],
    out: &mut [u8],
    size: usize,
) -> Result<usize, Lz4LegacyError> {
    let mut produced = 0;
    for b in blocks {
        let dst_end = size.min(produced + BLOCK_SIZE);
        let written = lz4_flex::block::decompress_into(
            &stream[b.offset..b.offset + b.len],
            &mut out[produced..dst_end],
        )
        .map_err(|source| Lz4LegacyError::Block {
            offset: b.offset,
            size,
            source,
        })?;
        produced += written;
    }
    Ok(produced)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A legacy frame of `data` cut into blocks of the given uncompressed lengths.
    fn frame(data: &[u8], block_lens: &[usize]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        let mut at = 0;
        for &len in block_lens {
            let c = lz4_flex::block::compress(&data[at..at + len]);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
            at += len;
        }
        assert_eq!(at, data.len());
        out
    }

    /// Bytes that compress somewhat and differ from block to block.
    fn data(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_u32;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 7 < 4 {
                    (i / 4096) as u8
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn several_full_blocks_and_a_short_last_one_round_trip() {
        let d = data(3 * BLOCK_SIZE + 12345);
        let f = frame(&d, &[BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE, 12345]);
        assert!(decompress(&f, d.len()).unwrap() == d);
    }

    #[test]
    fn a_short_block_before_the_last_is_placed_right_after_the_previous_one() {
        // The parallel placement assumes full blocks; this frame needs the sequential path.
        let d = data(2 * BLOCK_SIZE - 100);
        let f = frame(&d, &[BLOCK_SIZE - 100, BLOCK_SIZE]);
        assert!(decompress(&f, d.len()).unwrap() == d);
    }

    #[test]
    fn a_concatenated_frame_magic_is_skipped() {
        let d = data(BLOCK_SIZE + 10);
        let mut f = frame(&d[..BLOCK_SIZE], &[BLOCK_SIZE]);
        f.extend_from_slice(&frame(&d[BLOCK_SIZE..], &[10]));
        assert!(decompress(&f, d.len()).unwrap() == d);
    }

    #[test]
    fn a_corrupt_block_is_reported_with_its_offset() {
        let d = data(2 * BLOCK_SIZE);
        let mut f = frame(&d, &[BLOCK_SIZE, BLOCK_SIZE]);
        let second = 4 + 4 + u32::from_le_bytes(f[4..8].try_into().unwrap()) as usize + 4;
        // A literal run claiming more bytes than the block holds.
        f[second] = 0xf0;
        f[second + 1] = 0xff;
        match decompress(&f, d.len()) {
            Err(Lz4LegacyError::Block { offset, .. }) => assert_eq!(offset, second),
            other => panic!("expected a block error, got {:?}", other.map(|v| v.len())),
        }
    }

    #[test]
    fn output_beyond_the_declared_size_is_an_error() {
        let d = data(BLOCK_SIZE + 1000);
        let f = frame(&d, &[BLOCK_SIZE, 1000]);
        assert!(matches!(
            decompress(&f, d.len() - 1),
            Err(Lz4LegacyError::Block { .. })
        ));
    }
}
