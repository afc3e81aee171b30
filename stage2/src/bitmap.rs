//! A page bitmap of one guest-physical range at 4 KiB precision, the form dirty pages take from
//! harvest to send (here and in the VMM), and the iterator over a word's set bits.

use std::ops::Range;

use crate::invalidate::page_range;

const PAGE_SHIFT: u32 = 12;

/// A dirty bitmap of a guest-physical range at 4 KiB precision: bit `i % 64` of word `i / 64`
/// is page `base + i * 4096` (LSB first, KVM's `KVM_GET_DIRTY_LOG` layout). Bits past
/// [`pages`](Self::pages) in the last word are always clear.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Bitmap {
    base: u64,
    pages: u64,
    words: Vec<u64>,
}

impl Bitmap {
    /// An all-clear bitmap of `range` (rounded out to pages).
    pub fn new(range: Range<u64>) -> Self {
        let r = page_range(&range);
        let pages = (r.end - r.start) >> PAGE_SHIFT;
        Bitmap {
            base: r.start,
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
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
        self.base..self.base + (self.pages << PAGE_SHIFT)
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
        let i = gpa.checked_sub(self.base)? >> PAGE_SHIFT;
        (i < self.pages).then_some(i)
    }

    /// Whether `gpa`'s page is set.
    pub fn is_set(&self, gpa: u64) -> bool {
        self.index(gpa)
            .is_some_and(|i| self.words[(i / 64) as usize] & (1 << (i % 64)) != 0)
    }

    /// Set `gpa`'s page (ignored outside the range).
    pub fn set(&mut self, gpa: u64) {
        if let Some(i) = self.index(gpa) {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
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
            let base = self.base + ((w as u64 * 64) << PAGE_SHIFT);
            BitIter(bits).map(move |b| base + ((b as u64) << PAGE_SHIFT))
        })
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
    /// both start at the same address.
    pub fn merge(&mut self, other: &Bitmap) {
        if other.base == self.base {
            self.or_words(&other.words);
            return;
        }
        for gpa in other.iter() {
            self.set(gpa);
        }
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
    fn set_index_stops_at_the_end_of_the_range() {
        let mut b = Bitmap::new(0x4000..0x4000 + 10 * 4096);
        assert!(b.set_index(9));
        assert!(!b.set_index(10));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0x4000 + 9 * 4096]);
        assert_eq!(b.range(), 0x4000..0x4000 + 10 * 4096);
    }
}
