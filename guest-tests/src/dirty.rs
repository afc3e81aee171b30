//! Host-side exact check of a `dirty` guest's memory: replays its pseudo-random writes.
//!
//! The `dirty` guest's sequence of page writes depends only on the parameter block
//! (seed, vCPU id, slice, writes per generation), and it counts completed writes in
//! `VcpuBlock::writes` after each one. So the host, with the vCPUs stopped, can
//! compute what every page of a slice must hold and compare — on the migration
//! destination this proves that no page was lost. The one write that may be in
//! flight when the vCPU stopped (index `writes`) is allowed to have landed or not.

use std::fmt;

use crate::params::{rng_seed, scale, xorshift64, VcpuBlock, PAGE_SIZE};

/// What a replay checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtySummary {
    /// Pages of the slice compared.
    pub pages: u64,
    /// Pages written at least once.
    pub written_pages: u64,
    /// Writes replayed.
    pub writes: u64,
}

/// A page that does not hold what the replay says it must.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMismatch {
    /// Guest-physical address of the wrong word.
    pub gpa: u64,
    /// Values it may hold.
    pub expected: Vec<u64>,
    /// Value found.
    pub actual: u64,
}

impl fmt::Display for DirtyMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gpa {:#x} holds {:#x}, expected one of {:x?}",
            self.gpa, self.actual, self.expected
        )
    }
}

/// The page index and generation of the `dirty` guest's `n`-th writes, in order.
#[derive(Clone, Debug)]
pub struct DirtyWrites {
    state: u64,
    pages: u64,
    writes_per_gen: u64,
    done: u64,
}

impl DirtyWrites {
    /// The write sequence of `vcpu` with `seed`, over `pages` pages, `writes_per_gen`
    /// writes per generation (0 is treated as 1 to avoid an empty generation).
    pub fn new(seed: u64, vcpu: u64, pages: u64, writes_per_gen: u64) -> DirtyWrites {
        DirtyWrites {
            state: rng_seed(seed, vcpu, 0),
            pages,
            writes_per_gen: writes_per_gen.max(1),
            done: 0,
        }
    }
}

impl Iterator for DirtyWrites {
    /// (page index in the slice, generation written there)
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let page = scale(xorshift64(&mut self.state), self.pages);
        let generation = self.done / self.writes_per_gen + 1;
        self.done += 1;
        Some((page, generation))
    }
}

/// The `gpa ^ generation` sum the guest keeps over its first `writes` writes.
pub fn dirty_checksum(
    seed: u64,
    vcpu: u64,
    block: &VcpuBlock,
    writes_per_gen: u64,
    writes: u64,
) -> u64 {
    let pages = block.slice_len / PAGE_SIZE;
    DirtyWrites::new(seed, vcpu, pages, writes_per_gen)
        .take(writes as usize)
        .fold(0u64, |sum, (page, generation)| {
            sum.wrapping_add((block.slice_base + page * PAGE_SIZE) ^ generation)
        })
}

/// Checks every page of `vcpu`'s slice against a replay of its writes. `read` returns
/// the u64 at a guest-physical address (the vCPU must be stopped).
pub fn verify_dirty(
    seed: u64,
    vcpu: u64,
    block: &VcpuBlock,
    writes_per_gen: u64,
    mut read: impl FnMut(u64) -> u64,
) -> Result<DirtySummary, DirtyMismatch> {
    let pages = block.slice_len / PAGE_SIZE;
    let mut seq = DirtyWrites::new(seed, vcpu, pages, writes_per_gen);
    // Generation last written per page; 0 = never written (generations start at 1).
    let mut last = vec![0u64; pages as usize];
    for _ in 0..block.writes {
        let (page, generation) = seq.next().expect("endless sequence");
        last[page as usize] = generation;
    }
    let (in_flight_page, in_flight_gen) = seq.next().expect("endless sequence");

    for page in 0..pages {
        let gpa = block.slice_base + page * PAGE_SIZE;
        let written = last[page as usize] != 0;
        let mut allowed_gen = vec![last[page as usize]];
        if page == in_flight_page {
            allowed_gen.push(in_flight_gen);
        }
        let word0 = read(gpa);
        if !allowed_gen.contains(&word0) {
            return Err(DirtyMismatch {
                gpa,
                expected: allowed_gen,
                actual: word0,
            });
        }
        let mut allowed_tag = Vec::with_capacity(2);
        if written || page == in_flight_page {
            allowed_tag.push(gpa);
        }
        if !written {
            allowed_tag.push(0);
        }
        let word1 = read(gpa + 8);
        if !allowed_tag.contains(&word1) {
            return Err(DirtyMismatch {
                gpa: gpa + 8,
                expected: allowed_tag,
                actual: word1,
            });
        }
    }

    let sum_now = dirty_checksum(seed, vcpu, block, writes_per_gen, block.writes);
    let sum_next =
        sum_now.wrapping_add((block.slice_base + in_flight_page * PAGE_SIZE) ^ in_flight_gen);
    if block.checksum != sum_now && block.checksum != sum_next {
        return Err(DirtyMismatch {
            gpa: 0,
            expected: vec![sum_now, sum_next],
            actual: block.checksum,
        });
    }
    Ok(DirtySummary {
        pages,
        written_pages: last.iter().filter(|&&g| g != 0).count() as u64,
        writes: block.writes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Simulates the guest in Rust over a little memory image.
    fn simulate(
        seed: u64,
        vcpu: u64,
        block: &mut VcpuBlock,
        wpg: u64,
        writes: u64,
    ) -> HashMap<u64, u64> {
        let mut mem = HashMap::new();
        let pages = block.slice_len / PAGE_SIZE;
        for (page, generation) in DirtyWrites::new(seed, vcpu, pages, wpg).take(writes as usize) {
            let gpa = block.slice_base + page * PAGE_SIZE;
            mem.insert(gpa + 8, gpa);
            mem.insert(gpa, generation);
            block.checksum = block.checksum.wrapping_add(gpa ^ generation);
            block.writes += 1;
        }
        mem
    }

    fn block() -> VcpuBlock {
        VcpuBlock {
            slice_base: 0x40_0000,
            slice_len: 64 * PAGE_SIZE,
            ..VcpuBlock::default()
        }
    }

    #[test]
    fn replay_accepts_the_guests_memory() {
        let mut b = block();
        let mem = simulate(9, 1, &mut b, 16, 100);
        let s = verify_dirty(9, 1, &b, 16, |a| mem.get(&a).copied().unwrap_or(0)).unwrap();
        assert_eq!(s.pages, 64);
        assert_eq!(s.writes, 100);
        assert!(s.written_pages > 30 && s.written_pages <= 64);
    }

    #[test]
    fn replay_finds_a_lost_write() {
        let mut b = block();
        let mut mem = simulate(9, 1, &mut b, 16, 100);
        // Lose the last write of generation 7 (write index 99): the page keeps an
        // older generation or zero.
        let (page, generation) = DirtyWrites::new(9, 1, 64, 16).nth(99).unwrap();
        let gpa = b.slice_base + page * PAGE_SIZE;
        assert_eq!(generation, 7);
        mem.insert(gpa, 6);
        let err = verify_dirty(9, 1, &b, 16, |a| mem.get(&a).copied().unwrap_or(0)).unwrap_err();
        assert_eq!(err.gpa, gpa);
        assert_eq!(err.actual, 6);
    }

    #[test]
    fn replay_allows_the_in_flight_write() {
        let mut b = block();
        let mut mem = simulate(3, 0, &mut b, 8, 50);
        // The 51st write landed but the counter was not bumped yet.
        let (page, generation) = DirtyWrites::new(3, 0, 64, 8).nth(50).unwrap();
        let gpa = b.slice_base + page * PAGE_SIZE;
        mem.insert(gpa + 8, gpa);
        mem.insert(gpa, generation);
        verify_dirty(3, 0, &b, 8, |a| mem.get(&a).copied().unwrap_or(0)).unwrap();
    }

    #[test]
    fn replay_rejects_a_wrong_checksum() {
        let mut b = block();
        let mem = simulate(3, 0, &mut b, 8, 50);
        b.checksum ^= 1;
        assert!(verify_dirty(3, 0, &b, 8, |a| mem.get(&a).copied().unwrap_or(0)).is_err());
    }

    #[test]
    fn generations_follow_writes_per_gen() {
        let gens: Vec<u64> = DirtyWrites::new(1, 0, 10, 3)
            .take(7)
            .map(|(_, g)| g)
            .collect();
        assert_eq!(gens, [1, 1, 1, 2, 2, 2, 3]);
    }
}
