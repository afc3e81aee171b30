//! A page bitmap of one guest-physical range, a bit a page (4 KiB unless made with another page
//! size), and the iterator over a word's set bits.
//!
//! It is the form dirty pages take from harvest to send (here and in the VMM), and the store of
//! the VMM's sets of host pages (2 MiB or 1 GiB pages for hugetlbfs guest RAM).

use std::ops::Range;

use crate::invalidate::page_range_of;

const PAGE_SHIFT: u32 = 12;

/// A page bitmap of a guest-physical range, at 4 KiB precision unless made with
/// [`with_page_size`](Self::with_page_size): bit `i % 64` of word `i / 64` is page
/// `base + i * page_size` (LSB first, KVM's `KVM_GET_DIRTY_LOG` layout). Bits past
/// [`pages`](Self::pages) in the last word are always clear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    base: u64,
    pages: u64,
    /// log2 of the page size.
    shift: u32,
    words: Vec<u64>,
}

impl Default for Bitmap {
    /// An empty bitmap of 4 KiB pages at address 0.
    fn default() -> Self {
        Bitmap::new(0..0)
    }
}

impl Bitmap {
    /// An all-clear bitmap of `range` (rounded out to 4 KiB pages).
    pub fn new(range: Range<u64>) -> Self {
        Bitmap::with_page_size(range, 1 << PAGE_SHIFT)
    }

    /// An all-clear bitmap of `range` (rounded out to pages) with a bit per page of
    /// `page_size` bytes, a power of two of 4 KiB or more (2 MiB, 1 GiB).
    pub fn with_page_size(range: Range<u64>, page_size: u64) -> Self {
        assert!(
            page_size.is_power_of_two() && page_size >= 1 << PAGE_SHIFT,
            "page size {page_size:#x} is not a power of two of 4 KiB or more"
        );
        let shift = page_size.trailing_zeros();
        let r = page_range_of(&range, shift);
        let pages = (r.end - r.start) >> shift;
        Bitmap {
            base: r.start,
            pages,
            shift,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Bytes of guest-physical memory a bit stands for.
    pub fn page_size(&self) -> u64 {
        1 << self.shift
    }

    /// First guest-physical address covered.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The guest-physical range covered.
    pub fn range(&self) -> Range<u64> {
        self.base..self.base + (self.pages << self.shift)
    }

    /// The raw words (bit i of word w = page 64w + i).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The raw words for a writer that fills them whole, such as `KVM_GET_DIRTY_LOG`; the
    /// bits past [`pages`](Self::pages) are cleared again on the next [`or_words`](Self::or_words)
    /// or [`merge`](Self::merge) into another bitmap, and a writer must leave them clear.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    fn index(&self, gpa: u64) -> Option<u64> {
        let i = gpa.checked_sub(self.base)? >> self.shift;
        (i < self.pages).then_some(i)
    }

    /// Whether `gpa`'s page is set.
    pub fn is_set(&self, gpa: u64) -> bool {
        self.index(gpa)
            .is_some_and(|i| self.words[(i / 64) as usize] & (1 << (i % 64)) != 0)
    }

    /// Whether page `index` of the range is set (false past its end).
    pub fn is_set_index(&self, index: u64) -> bool {
        index < self.pages && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Set `gpa`'s page (ignored outside the range).
    pub fn set(&mut self, gpa: u64) {
        if let Some(i) = self.index(gpa) {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clear `gpa`'s page (ignored outside the range).
    pub fn unset(&mut self, gpa: u64) {
        if let Some(i) = self.index(gpa) {
            self.unset_index(i);
        }
    }

    /// Clear page `index` of the range (ignored past its end); false when it is past the end.
    pub fn unset_index(&mut self, index: u64) -> bool {
        if index >= self.pages {
            return false;
        }
        self.words[(index / 64) as usize] &= !(1 << (index % 64));
        true
    }

    /// Set page `index` of the range (ignored past its end); false when it is past the end.
    pub fn set_index(&mut self, index: u64) -> bool {
        if index >= self.pages {
            return false;
        }
        self.words[(index / 64) as usize] |= 1 << (index % 64);
        true
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Whether no page is set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Clears every page.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Guest-physical addresses of the set pages, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(w, &bits)| {
            let base = self.base + ((w as u64 * 64) << self.shift);
            BitIter(bits).map(move |b| base + ((b as u64) << self.shift))
        })
    }

    /// Indices (within the range) of the set pages, ascending.
    pub fn indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(w, &bits)| BitIter(bits).map(move |b| w as u64 * 64 + u64::from(b)))
    }

    /// OR an LSB-first bitmap of this range's pages into `self` (KVM's bitmap of a slot, or
    /// vm-memory's `AtomicBitmap::get_and_reset()`): words and bits past the range are ignored.
    pub fn or_words(&mut self, words: &[u64]) {
        for (d, w) in self.words.iter_mut().zip(words) {
            *d |= *w;
        }
        self.clear_tail();
    }

    /// OR `other` into `self` (pages outside `self`'s range are ignored); word by word when
    /// both start at the same address with the same page size.
    pub fn merge(&mut self, other: &Bitmap) {
        if self.same_layout(other) {
            self.or_words(&other.words);
            return;
        }
        for gpa in other.iter() {
            self.set(gpa);
        }
    }

    /// Clears every page of `self` that holds a set page of `other` (pages outside `self`'s
    /// range are ignored); word by word when both start at the same address with the same
    /// page size.
    pub fn subtract(&mut self, other: &Bitmap) {
        if self.same_layout(other) {
            for (d, w) in self.words.iter_mut().zip(&other.words) {
                *d &= !*w;
            }
            return;
        }
        for gpa in other.iter() {
            self.unset(gpa);
        }
    }

    /// Whether bit `i` of `self` and of `other` stand for the same page.
    fn same_layout(&self, other: &Bitmap) -> bool {
        self.base == other.base && self.shift == other.shift
    }

    fn clear_tail(&mut self) {
        let used = self.pages % 64;
        if used != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << used) - 1;
            }
        }
    }
}

/// The indices of the set bits of one word, lowest first.
#[derive(Clone, Copy, Debug)]
pub struct BitIter(pub u64);

impl Iterator for BitIter {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_iter_yields_each_set_bit_once_lowest_first() {
        assert_eq!(BitIter(0).count(), 0);
        assert_eq!(
            BitIter((1 << 63) | (1 << 5) | 1).collect::<Vec<_>>(),
            vec![0, 5, 63]
        );
    }

    #[test]
    fn or_words_ignores_pages_past_the_range() {
        // 100 pages: two words, 36 bits of the second in use.
        let mut b = Bitmap::new(0x10_0000..0x10_0000 + 100 * 4096);
        b.or_words(&[0b1, u64::MAX, u64::MAX]);
        assert_eq!(b.count(), 1 + 36);
        assert!(b.is_set(0x10_0000) && b.is_set(0x10_0000 + 99 * 4096));
        assert!(!b.is_set(0x10_0000 + 100 * 4096));
        assert_eq!(b.iter().last(), Some(0x10_0000 + 99 * 4096));
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn merge_of_the_same_range_and_of_another_agree() {
        let mut a = Bitmap::new(0..64 * 4096);
        a.set(3 * 4096);
        let mut same = Bitmap::new(0..64 * 4096);
        same.set(7 * 4096);
        let mut shifted = Bitmap::new(4 * 4096..128 * 4096);
        shifted.set(7 * 4096);
        shifted.set(100 * 4096); // outside `a`
        let mut by_words = a.clone();
        by_words.merge(&same);
        let mut by_pages = a.clone();
        by_pages.merge(&shifted);
        assert_eq!(by_words, by_pages);
        assert_eq!(
            by_words.iter().collect::<Vec<_>>(),
            vec![3 * 4096, 7 * 4096]
        );
    }

    #[test]
    fn unset_clears_one_page_and_ignores_the_outside() {
        let mut b = Bitmap::new(0x4000..0x4000 + 70 * 4096);
        for i in [0, 5, 69] {
            assert!(b.set_index(i));
        }
        b.unset(0x4000 + 5 * 4096 + 0x123);
        b.unset(0x3000); // below the range
        b.unset(0x4000 + 70 * 4096); // past it
        assert_eq!(b.indices().collect::<Vec<_>>(), vec![0, 69]);
        assert!(b.is_set_index(69) && !b.is_set_index(5) && !b.is_set_index(70));
        assert!(b.unset_index(69));
        assert!(!b.unset_index(70));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0x4000]);
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn subtract_of_the_same_range_and_of_another_agree() {
        let mut a = Bitmap::new(0..128 * 4096);
        for p in [1u64, 3, 64, 100] {
            a.set(p * 4096);
        }
        let mut same = Bitmap::new(0..128 * 4096);
        same.set(3 * 4096);
        same.set(100 * 4096);
        same.set(101 * 4096); // not in `a`
        let mut shifted = Bitmap::new(2 * 4096..200 * 4096);
        shifted.set(3 * 4096);
        shifted.set(100 * 4096);
        shifted.set(150 * 4096); // outside `a`
        let mut by_words = a.clone();
        by_words.subtract(&same);
        let mut by_pages = a.clone();
        by_pages.subtract(&shifted);
        assert_eq!(by_words, by_pages);
        assert_eq!(by_words.iter().collect::<Vec<_>>(), vec![4096, 64 * 4096]);
    }

    #[test]
    fn huge_page_bitmaps_have_a_bit_per_huge_page() {
        const M2: u64 = 2 << 20;
        // Rounded out: 3 MiB from 1 MiB is the 2 MiB pages at 0 and 2 MiB.
        let mut b = Bitmap::with_page_size((1 << 20)..(4 << 20), M2);
        assert_eq!((b.base(), b.pages(), b.page_size()), (0, 2, M2));
        assert_eq!(b.range(), 0..4 << 20);
        b.set(M2 + 0x1234);
        assert!(b.is_set(M2) && b.is_set(2 * M2 - 1) && !b.is_set(0));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![M2]);
        assert_eq!(b.indices().collect::<Vec<_>>(), vec![1]);
        // 4 KiB pages merged in or taken away hit the huge page that holds them.
        let mut small = Bitmap::new(0..4 << 20);
        small.set(0x5000);
        b.merge(&small);
        assert_eq!(b.indices().collect::<Vec<_>>(), vec![0, 1]);
        let mut small = Bitmap::new(0..4 << 20);
        small.set(M2 + 0x5000);
        b.subtract(&small);
        assert_eq!(b.indices().collect::<Vec<_>>(), vec![0]);
        // Same layout: word by word.
        let mut other = Bitmap::with_page_size(0..4 << 20, M2);
        other.set(M2);
        b.merge(&other);
        assert_eq!(b.count(), 2);
        b.subtract(&other);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0]);
        assert_eq!(Bitmap::default(), Bitmap::new(0..0));
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn page_sizes_below_4k_are_refused() {
        let _ = Bitmap::with_page_size(0..1 << 20, 2048);
    }

    #[test]
    fn set_index_stops_at_the_end_of_the_range() {
        let mut b = Bitmap::new(0x4000..0x4000 + 10 * 4096);
        assert!(b.set_index(9));
        assert!(!b.set_index(10));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0x4000 + 9 * 4096]);
        assert_eq!(b.range(), 0x4000..0x4000 + 10 * 4096);
    }
}
