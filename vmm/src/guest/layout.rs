//! Where a test guest's pieces go in guest-physical memory: the low reserved area (GDT,
//! identity page tables, parameter block, code, stacks) and the per-vCPU slices.

use guest_tests::params::{LARGE_PAGE_SIZE, PAGE_SIZE};
use guest_tests::{GuestKind, Mode};

use crate::memory::human;

/// Bytes at the bottom of RAM kept for the guest's code, tables and stacks (two 2 MiB
/// pages); slices start above it and reclaims never touch it.
pub const LOW_RESERVED: u64 = 4 << 20;
/// GDT (5 entries).
pub const GDT_GPA: u64 = 0x1000;
/// PML4; the PDPT and one page directory per GiB follow.
pub const PML4_GPA: u64 = 0x2000;
/// Parameter block (`guest_tests::Params`, about 33 KiB).
pub const PARAMS_GPA: u64 = 0x20_0000;
/// Guest code.
pub const CODE_GPA: u64 = 0x21_0000;
/// Most bytes of guest code.
pub const CODE_MAX: u64 = 0x1_0000;
/// Bottom of the stacks: vCPU `i` owns `[STACKS_GPA + i * STACK_SIZE, + STACK_SIZE)`.
pub const STACKS_GPA: u64 = 0x22_0000;
/// Stack per vCPU.
pub const STACK_SIZE: u64 = 0x1000;

/// Largest guest-physical span the page tables between `PML4_GPA` and `PARAMS_GPA` can
/// identity-map (PML4 + PDPT + one page directory per GiB).
pub const MAX_IDENTITY_BYTES: u64 = ((PARAMS_GPA - PML4_GPA) / PAGE_SIZE - 2) << 30;

const _: () = assert!(STACKS_GPA + 256 * STACK_SIZE <= LOW_RESERVED);
const _: () = assert!(CODE_GPA + CODE_MAX <= STACKS_GPA);

/// A vCPU's slice of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// First byte (2 MiB aligned).
    pub base: u64,
    /// Bytes (a multiple of 2 MiB).
    pub len: u64,
}

/// Why a layout cannot be made; the text says what to change.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Not enough RAM above the reserved area.
    #[error(
        "--mem {mem} is too small for the {guest} guest on {cpus} vCPU(s): it needs at least \
         {min} ({reserved} for code, page tables and stacks, plus {per} per vCPU slice); \
         raise --mem or lower --cpus",
        mem = human(*mem), min = human(*min), reserved = human(LOW_RESERVED), per = human(*per)
    )]
    TooSmall {
        /// Guest name.
        guest: &'static str,
        /// RAM given.
        mem: u64,
        /// vCPUs.
        cpus: u8,
        /// Minimum RAM.
        min: u64,
        /// Bytes each slice needs at least.
        per: u64,
    },
    /// RAM too large for the identity page tables of the low area.
    #[error("guest RAM ends at {end:#x}, beyond the {max} the test guests' identity map covers; lower --mem", max = human(MAX_IDENTITY_BYTES))]
    TooLarge {
        /// End of RAM.
        end: u64,
    },
}

/// The smallest RAM a guest needs on `cpus` vCPUs.
pub fn min_mem(mode: Mode, cpus: u8) -> u64 {
    match mode {
        Mode::SharedHot => LOW_RESERVED + LARGE_PAGE_SIZE,
        _ => LOW_RESERVED + u64::from(cpus) * LARGE_PAGE_SIZE,
    }
}

/// Splits the RAM `regions` (gpa, len) above [`LOW_RESERVED`] into one slice per vCPU.
/// Slices are 2 MiB aligned, equal in size, as large as possible, and each lies in one
/// region. In shared-hot mode every vCPU gets the same single 2 MiB page.
pub fn plan_slices(
    kind: GuestKind,
    mode: Mode,
    cpus: u8,
    regions: &[(u64, u64)],
) -> Result<Vec<Slice>, LayoutError> {
    let mem: u64 = regions.iter().map(|r| r.1).sum();
    let end = regions.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
    if end > MAX_IDENTITY_BYTES {
        return Err(LayoutError::TooLarge { end });
    }
    let too_small = || LayoutError::TooSmall {
        guest: kind.name(),
        mem,
        cpus,
        min: min_mem(mode, cpus),
        per: LARGE_PAGE_SIZE,
    };
    // Whole 2 MiB chunks per region above the reserved area: (first chunk gpa, count).
    let runs: Vec<(u64, u64)> = regions
        .iter()
        .filter_map(|&(gpa, len)| {
            let start = gpa.max(LOW_RESERVED).next_multiple_of(LARGE_PAGE_SIZE);
            let stop = (gpa + len) / LARGE_PAGE_SIZE * LARGE_PAGE_SIZE;
            (stop > start).then(|| (start, (stop - start) / LARGE_PAGE_SIZE))
        })
        .collect();
    let n = u64::from(cpus);
    if n == 0 {
        return Err(too_small());
    }
    if mode == Mode::SharedHot {
        let &(base, _) = runs.first().ok_or_else(too_small)?;
        return Ok(vec![
            Slice {
                base,
                len: LARGE_PAGE_SIZE
            };
            cpus as usize
        ]);
    }
    let total: u64 = runs.iter().map(|r| r.1).sum();
    // The largest chunk count k per slice such that the regions hold n slices of k.
    let mut k = total / n;
    while k > 0 && runs.iter().map(|r| r.1 / k).sum::<u64>() < n {
        k -= 1;
    }
    if k == 0 {
        return Err(too_small());
    }
    let mut slices = Vec::with_capacity(cpus as usize);
    'runs: for &(start, count) in &runs {
        for i in 0..count / k {
            if slices.len() == cpus as usize {
                break 'runs;
            }
            slices.push(Slice {
                base: start + i * k * LARGE_PAGE_SIZE,
                len: k * LARGE_PAGE_SIZE,
            });
        }
    }
    Ok(slices)
}

/// Top of vCPU `id`'s stack.
pub fn stack_top(id: u8) -> u64 {
    STACKS_GPA + (u64::from(id) + 1) * STACK_SIZE
}

/// The 1 GiB-aligned ranges of slice memory (clipped to RAM, to the area above
/// [`LOW_RESERVED`] and to whole backing pages of `page` bytes) that a reclaim storm
/// drops in turn.
pub fn reclaim_ranges(regions: &[(u64, u64)], page: u64) -> Vec<(u64, u64)> {
    const GIB: u64 = 1 << 30;
    let mut out = Vec::new();
    for &(gpa, len) in regions {
        let mut at = gpa.max(LOW_RESERVED).next_multiple_of(page);
        let end = (gpa + len) / page * page;
        while at < end {
            let stop = ((at / GIB) + 1) * GIB;
            let stop = stop.min(end);
            out.push((at, stop - at));
            at = stop;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    fn four_gib() -> Vec<(u64, u64)> {
        // The VMM's layout for 4G: 3 GiB below the PCI hole, 1 GiB above 4 GiB.
        vec![(0, 3 * G), (4 * G, G)]
    }

    #[test]
    fn four_vcpus_on_4g_get_equal_slices_of_almost_1g() {
        let s = plan_slices(GuestKind::Stress, Mode::Sequential, 4, &four_gib()).unwrap();
        assert_eq!(s.len(), 4);
        assert!(s.iter().all(|x| x.len == 1022 * M));
        assert_eq!(s[0].base, LOW_RESERVED);
        assert_eq!(s[3].base, 4 * G);
        for w in s.windows(2) {
            assert!(w[0].base + w[0].len <= w[1].base);
        }
        // No slice crosses the hole.
        for x in &s {
            assert!(x.base + x.len <= 3 * G || x.base >= 4 * G);
        }
    }

    #[test]
    fn shared_hot_gives_every_vcpu_the_same_2m_page() {
        let s = plan_slices(GuestKind::Stress, Mode::SharedHot, 4, &[(0, 6 * M)]).unwrap();
        assert_eq!(
            s,
            vec![
                Slice {
                    base: LOW_RESERVED,
                    len: 2 * M
                };
                4
            ]
        );
    }

    #[test]
    fn too_little_memory_names_the_minimum() {
        let e = plan_slices(GuestKind::Touch, Mode::Sequential, 4, &[(0, 8 * M)]).unwrap_err();
        assert_eq!(
            e,
            LayoutError::TooSmall {
                guest: "touch",
                mem: 8 * M,
                cpus: 4,
                min: 12 * M,
                per: 2 * M
            }
        );
        assert!(e.to_string().contains("at least 12M"), "{e}");
        assert!(plan_slices(GuestKind::Touch, Mode::Sequential, 4, &[(0, 12 * M)]).is_ok());
        assert!(plan_slices(GuestKind::Stress, Mode::SharedHot, 4, &[(0, 4 * M)]).is_err());
    }

    #[test]
    fn huge_ram_is_refused() {
        let e = plan_slices(GuestKind::Dirty, Mode::Random, 1, &[(0, 600 * G)]).unwrap_err();
        assert!(matches!(e, LayoutError::TooLarge { .. }));
    }

    #[test]
    fn reclaim_ranges_skip_the_low_area_and_the_hole() {
        let expected = vec![
            (LOW_RESERVED, G - LOW_RESERVED),
            (G, G),
            (2 * G, G),
            (4 * G, G),
        ];
        assert_eq!(reclaim_ranges(&four_gib(), PAGE_SIZE), expected);
        assert_eq!(reclaim_ranges(&four_gib(), LARGE_PAGE_SIZE), expected);
        // On 1 GiB pages the first GiB holds the reserved area: it is never dropped.
        assert_eq!(
            reclaim_ranges(&four_gib(), G),
            vec![(G, G), (2 * G, G), (4 * G, G)]
        );
    }

    #[test]
    fn stacks_do_not_overlap() {
        assert_eq!(stack_top(0), STACKS_GPA + STACK_SIZE);
        assert!(stack_top(255) <= LOW_RESERVED);
    }
}
