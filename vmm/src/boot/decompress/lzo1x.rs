//! The LZO1X block decoder (what `lzo1x_decompress_safe` accepts), bounds-checked on every byte.
//!
//! The instruction encoding is the one documented in the kernel's
//! `Documentation/staging/lzo.rst`. Each instruction is a back-reference
//! (length, distance) optionally followed by 0-3 literals, whose count `S` is
//! carried in the instruction; an opcode below 16 means different things
//! depending on how many literals the previous instruction copied (the
//! decoder's `state`):
//!
//! ```text
//! first byte 18..255      copy (byte - 17) literals
//! 0000LLLL  state 0       literal run of 3 + (L or 15 + ext) bytes
//! 0000DDSS  state 1..3    match 2 bytes, distance (H << 2) + D + 1
//! 0000DDSS  state 4       match 3 bytes, distance (H << 2) + D + 2049
//! 0001HLLL                match 2 + (L or 7 + ext), distance 16384 + (H << 14) + D
//!                         (distance 16384 ends the stream)
//! 001LLLLL                match 2 + (L or 31 + ext), distance D + 1
//! 01LDDDSS                match 3 + L, distance (H << 3) + D + 1
//! 1LLDDDSS                match 5 + L, distance (H << 3) + D + 1
//! ```
//!
//! `H` is the next byte; for the 16-bit forms the next LE16 holds `D << 2 | S`;
//! `ext` is a run of zero bytes (255 each) closed by a non-zero byte.

/// What is wrong with an LZO1X block.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Lzo1xError {
    /// The block ends in the middle of an instruction or literal run.
    #[error("the compressed block ends in the middle of an instruction")]
    InputOverrun,
    /// The block produces more than its declared size.
    #[error("the block decompresses to more than its declared size")]
    OutputOverrun,
    /// A back-reference points before the start of the block.
    #[error("a back-reference of distance {distance} points before the start of the block ({produced} bytes produced)")]
    LookBehindOverrun {
        /// Distance of the reference.
        distance: usize,
        /// Bytes produced so far.
        produced: usize,
    },
    /// Bytes remain after the end-of-stream instruction.
    #[error("{0} bytes follow the end-of-stream instruction")]
    InputNotConsumed(usize),
}

/// Opcodes at or above this are the short-distance matches (`01LDDDSS`, `1LLDDDSS`).
const OP_M2_MIN: u8 = 64;
/// `001LLLLL`: match within 16 KiB.
const OP_M3_MIN: u8 = 32;
/// `0001HLLL`: match within 16..48 KiB.
const OP_M4_MIN: u8 = 16;
/// First byte above this is a literal run of (byte - 17) bytes.
const FIRST_LITERAL_BIAS: u8 = 17;
/// Base distance of the `0001HLLL` matches; exactly this distance ends the stream.
const M4_BASE_DISTANCE: usize = 16384;
/// Base distance of the 3-byte match after a literal run of 4 or more.
const M1_AFTER_RUN_BASE_DISTANCE: usize = 2049;
/// `state` after a literal run of 4 or more bytes.
const STATE_LONG_RUN: usize = 4;

struct Decoder<'a> {
    input: &'a [u8],
    ip: usize,
    out: &'a mut Vec<u8>,
    base: usize,
    limit: usize,
}

impl Decoder<'_> {
    fn byte(&mut self) -> Result<u8, Lzo1xError> {
        let b = *self.input.get(self.ip).ok_or(Lzo1xError::InputOverrun)?;
        self.ip += 1;
        Ok(b)
    }

    fn le16(&mut self) -> Result<usize, Lzo1xError> {
        let lo = self.byte()?;
        let hi = self.byte()?;
        Ok(usize::from(u16::from_le_bytes([lo, hi])))
    }

    /// The length held in the `mask` bits of `opcode`; when they are zero,
    /// `mask` plus the zero-byte extension that follows.
    fn length(&mut self, opcode: u8, mask: u8) -> Result<usize, Lzo1xError> {
        let l = opcode & mask;
        if l != 0 {
            return Ok(usize::from(l));
        }
        let mut extra = usize::from(mask);
        loop {
            match self.byte()? {
                0 => {
                    extra += 255;
                    // No block is larger than its output; this also keeps
                    // the sum far from overflow.
                    if extra > self.limit {
                        return Err(Lzo1xError::OutputOverrun);
                    }
                }
                b => return Ok(extra + usize::from(b)),
            }
        }
    }

    fn literals(&mut self, n: usize) -> Result<(), Lzo1xError> {
        if n > self.limit - self.out.len() {
            return Err(Lzo1xError::OutputOverrun);
        }
        let bytes = self
            .input
            .get(self.ip..self.ip + n)
            .ok_or(Lzo1xError::InputOverrun)?;
        self.out.extend_from_slice(bytes);
        self.ip += n;
        Ok(())
    }

    fn copy_match(&mut self, distance: usize, len: usize) -> Result<(), Lzo1xError> {
        let produced = self.out.len() - self.base;
        if distance > produced {
            return Err(Lzo1xError::LookBehindOverrun { distance, produced });
        }
        if len > self.limit - self.out.len() {
            return Err(Lzo1xError::OutputOverrun);
        }
        let start = self.out.len() - distance;
        if distance >= len {
            self.out.extend_from_within(start..start + len);
        } else {
            // Overlapping copy: the pattern of `distance` bytes repeats.
            let mut left = len;
            while left > 0 {
                let n = left.min(self.out.len() - start);
                self.out.extend_from_within(start..start + n);
                left -= n;
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), Lzo1xError> {
        let mut state = 0;
        if let Some(&first) = self.input.first() {
            if first > FIRST_LITERAL_BIAS {
                self.ip = 1;
                let n = usize::from(first - FIRST_LITERAL_BIAS);
                self.literals(n)?;
                state = n.min(STATE_LONG_RUN);
            }
        }
        loop {
            let op = self.byte()?;
            let (len, distance, next_literals);
            if op >= OP_M2_MIN {
                let h = usize::from(self.byte()?);
                len = if op >= 128 {
                    5 + usize::from((op >> 5) & 3)
                } else {
                    3 + usize::from((op >> 5) & 1)
                };
                distance = (h << 3) + usize::from((op >> 2) & 7) + 1;
                next_literals = usize::from(op & 3);
            } else if op >= OP_M3_MIN {
                len = 2 + self.length(op, 31)?;
                let v = self.le16()?;
                distance = (v >> 2) + 1;
                next_literals = v & 3;
            } else if op >= OP_M4_MIN {
                len = 2 + self.length(op, 7)?;
                let v = self.le16()?;
                distance = M4_BASE_DISTANCE + (usize::from(op & 8) << 11) + (v >> 2);
                if distance == M4_BASE_DISTANCE {
                    return match self.input.len() - self.ip {
                        0 => Ok(()),
                        n => Err(Lzo1xError::InputNotConsumed(n)),
                    };
                }
                next_literals = v & 3;
            } else if state == 0 {
                let n = 3 + self.length(op, 15)?;
                self.literals(n)?;
                state = STATE_LONG_RUN;
                continue;
            } else {
                let h = usize::from(self.byte()?);
                let d = (h << 2) + usize::from(op >> 2);
                if state == STATE_LONG_RUN {
                    len = 3;
                    distance = d + M1_AFTER_RUN_BASE_DISTANCE;
                } else {
                    len = 2;
                    distance = d + 1;
                }
                next_literals = usize::from(op & 3);
            }
            self.copy_match(distance, len)?;
            self.literals(next_literals)?;
            state = next_literals;
        }
    }
}

/// Decompresses one LZO1X block, appending at most `max_len` bytes to `out`.
/// Back-references may not reach before the bytes this call appends.
pub fn decompress_block(input: &[u8], out: &mut Vec<u8>, max_len: usize) -> Result<(), Lzo1xError> {
    let base = out.len();
    out.reserve(max_len);
    Decoder {
        input,
        ip: 0,
        base,
        limit: base + max_len,
        out,
    }
    .run()
}
