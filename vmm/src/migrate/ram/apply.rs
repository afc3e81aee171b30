//! How a plain page chunk lands in guest memory: [`apply_chunk`] and [`receive_ram`] (no
//! pager, no bookkeeping).

use std::io::Read;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::range::{check_range, RamError, PAGE_BYTES, ZERO_PAGE};
use super::residency::{is_private, Residency, RESIDENCY_WINDOW};
use crate::migrate::stream::{chunk_name, Chunk, StreamReader, PAGE_SIZE};

/// Writes a `Pages` or `ZeroPages` chunk into `mem`; returns false for any other chunk.
pub fn apply_chunk(mem: &GuestMemoryMmap, chunk: &Chunk<'_>) -> Result<bool, RamError> {
    match *chunk {
        Chunk::Pages { gpa, data } => {
            mem.write_slice(data, GuestAddress(gpa))
                .map_err(|_| RamError::OutOfRange {
                    gpa,
                    len: data.len() as u64,
                })?;
            Ok(true)
        }
        Chunk::ZeroPages { gpa, count } => {
            let len = count
                .checked_mul(PAGE_BYTES)
                .ok_or(RamError::OutOfRange { gpa, len: u64::MAX })?;
            check_range(mem, gpa, len)?;
            // On private memory a page never populated reads as zero already: writing zeroes
            // would only allocate it (a whole huge page on THP or hugetlbfs).
            let private = is_private(mem, gpa);
            let end = gpa + len;
            let mut window = gpa;
            while window < end {
                let window_end = end.min(window + RESIDENCY_WINDOW);
                let res = if private {
                    Some(Residency::of(mem, window, window_end - window)?)
                } else {
                    None
                };
                for at in (window..window_end).step_by(PAGE_SIZE) {
                    if res.as_ref().is_none_or(|r| r.populated(at)) {
                        mem.write_slice(&ZERO_PAGE, GuestAddress(at)).map_err(|_| {
                            RamError::OutOfRange {
                                gpa: at,
                                len: PAGE_BYTES,
                            }
                        })?;
                    }
                }
                window = window_end;
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Receives chunks into `mem` until a chunk that is not RAM, which it returns as an owned
/// summary (its name); used by tests and the simple full-copy path.
pub fn receive_ram<R: Read>(
    r: &mut StreamReader<R>,
    mem: &GuestMemoryMmap,
) -> Result<&'static str, RamError> {
    loop {
        let c = r.next_chunk()?;
        if !apply_chunk(mem, &c)? {
            return Ok(chunk_name(&c));
        }
    }
}
