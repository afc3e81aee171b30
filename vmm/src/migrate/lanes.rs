//! Several connections per migration (`--migrate-connections N`): the main connection and
//! N - 1 lanes (see the stream format, [`crate::migrate::stream::format`]). Each precopy round
//! is cut into N address ranges holding about as many of the round's pages each, one per
//! connection, sent and received by a thread per connection. A cut lies on a
//! [`LANE_ALIGN`] boundary, so that two connections never write one 2 MiB host page of the
//! destination in the same round.

pub mod destination;
pub mod source;

/// Where a round's address ranges may be cut.
pub const LANE_ALIGN: u64 = 2 << 20;

const PAGE: u64 = crate::migrate::stream::PAGE_SIZE as u64;

/// The address boundaries of `n` shares of a round whose pages are `runs` (gpa, pages; in
/// address order, not overlapping) and `total` pages in all: share k is the pages in
/// `[b[k], b[k+1])`, with `b[0] = 0` and `b[n] = u64::MAX`. Inner boundaries are multiples of
/// `align` (a power of two), at or above the first page of the k-th n-th of the pages, so
/// every share holds at most `total / n + 1` pages plus those of one `align` block.
pub fn boundaries(
    runs: impl IntoIterator<Item = (u64, u64)>,
    total: u64,
    n: usize,
    align: u64,
) -> Vec<u64> {
    debug_assert!(n >= 1 && align.is_power_of_two());
    let mut b = Vec::with_capacity(n + 1);
    b.push(0);
    // Share k ends before the page with index `target(k)` in the round's order.
    let target = |k: usize| (k as u128 * total as u128 / n as u128) as u64;
    let mut k = 1;
    let mut seen = 0u64;
    for (gpa, pages) in runs {
        while k < n && target(k) < seen + pages {
            let at = gpa + (target(k) - seen) * PAGE;
            let cut = at.checked_next_multiple_of(align).unwrap_or(u64::MAX);
            b.push(cut.max(*b.last().expect("b[0]")));
            k += 1;
        }
        seen += pages;
        if k == n {
            break;
        }
    }
    // Fewer pages than shares, or `total` larger than the runs: the rest are empty.
    b.resize(n, u64::MAX);
    b.push(u64::MAX);
    b
}

/// A fresh lane token: what each lane of one migration repeats after the header names it.
pub fn token() -> std::io::Result<[u8; crate::migrate::stream::LANE_TOKEN]> {
    crate::migrate::auth::random()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs of a round: gaps and lengths in pages, from address `base`.
    fn runs_of(base: u64, shape: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut at = base;
        shape
            .iter()
            .map(|&(gap, len)| {
                at += gap * PAGE;
                let r = (at, len);
                at += len * PAGE;
                r
            })
            .collect()
    }

    #[test]
    fn one_share_is_everything() {
        let runs = runs_of(0, &[(0, 10), (5, 3)]);
        assert_eq!(boundaries(runs, 13, 1, LANE_ALIGN), vec![0, u64::MAX]);
    }

    #[test]
    fn a_full_pass_of_4_gib_splits_at_gib_boundaries() {
        let pages = (4u64 << 30) / PAGE;
        let b = boundaries([(0, pages)], pages, 4, LANE_ALIGN);
        assert_eq!(b, vec![0, 1 << 30, 2 << 30, 3 << 30, u64::MAX]);
    }

    #[test]
    fn fewer_pages_than_shares_leaves_some_empty() {
        // Share k starts at the page with index k * total / n: 0 for every k here, so the
        // one page goes to the last.
        let b = boundaries([(0, 1)], 1, 4, LANE_ALIGN);
        assert_eq!(b, vec![0, 0, 0, 0, u64::MAX]);
        let b = boundaries(std::iter::empty(), 0, 3, LANE_ALIGN);
        assert_eq!(b, vec![0, u64::MAX, u64::MAX, u64::MAX]);
    }

    proptest! {
        /// Against a direct count: boundaries rise, inner ones are aligned, every page falls
        /// in exactly one share, and no share exceeds its fair part by more than one block.
        #[test]
        fn shares_cover_the_round_once_and_are_balanced(
            base_block in 0u64..4,
            shape in proptest::collection::vec((0u64..2000, 1u64..400), 0..40),
            n in 1usize..9,
            align_shift in 12u32..24,
        ) {
            let align = 1u64 << align_shift;
            let runs = runs_of(base_block << 30, &shape);
            let total: u64 = runs.iter().map(|r| r.1).sum();
            let b = boundaries(runs.iter().copied(), total, n, align);
            prop_assert_eq!(b.len(), n + 1);
            prop_assert_eq!(b[0], 0);
            prop_assert_eq!(b[n], u64::MAX);
            for w in b.windows(2) {
                prop_assert!(w[0] <= w[1], "{b:?}");
            }
            for &x in &b[1..n] {
                prop_assert!(x == u64::MAX || x % align == 0, "{x:#x} not aligned");
            }
            let mut per_share = vec![0u64; n];
            for &(gpa, len) in &runs {
                for p in 0..len {
                    let a = gpa + p * PAGE;
                    let k = b.windows(2).position(|w| w[0] <= a && a < w[1]);
                    prop_assert!(k.is_some(), "page {a:#x} in no share of {b:?}");
                    per_share[k.unwrap()] += 1;
                }
            }
            prop_assert_eq!(per_share.iter().sum::<u64>(), total);
            let block_pages = align.max(PAGE) / PAGE;
            for &c in &per_share {
                prop_assert!(c <= total / n as u64 + 1 + block_pages, "{per_share:?} of {total}");
            }
        }
    }
}
