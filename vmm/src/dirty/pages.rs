//! The dirty pages of a harvest, one [`stage2::Bitmap`] per memslot ([`SlotInfo`],
//! [`DirtyBitmap`]), and the VMM's own writes to guest RAM that every harvest takes in
//! ([`VmmDirty`]).

use std::sync::atomic::{AtomicU64, Ordering};

use stage2::Bitmap;

use crate::memory::RamRegion;

/// Guest page shift: dirty tracking is at 4 KiB precision in every mode.
pub const PAGE_SHIFT: u32 = 12;
/// Guest page size.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// One KVM memslot of guest RAM. The tracker assumes slot `i` is RAM region `i` (vm.rs installs
/// them in that order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// KVM slot id.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// Host address of `gpa`.
    pub host_addr: u64,
}

impl SlotInfo {
    /// The slots of `regions`, numbered as vm.rs numbers them.
    pub fn from_regions(regions: &[RamRegion]) -> Vec<SlotInfo> {
        regions
            .iter()
            .enumerate()
            .map(|(i, r)| SlotInfo {
                slot: i as u32,
                gpa: r.gpa,
                len: r.len,
                host_addr: r.host_addr,
            })
            .collect()
    }
}

/// Dirty pages of one slot: page `gpa + i * 4096` of the slot is page `i` of `pages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotBitmap {
    /// The slot.
    pub info: SlotInfo,
    /// Its pages, over `[info.gpa, info.gpa + info.len)` (the words are KVM's layout).
    pub pages: Bitmap,
}

/// The result of a harvest: one bitmap per slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Per slot, in slot order.
    pub slots: Vec<SlotBitmap>,
}

impl DirtyBitmap {
    /// An all-clear bitmap over `slots`.
    pub fn empty(slots: &[SlotInfo]) -> DirtyBitmap {
        DirtyBitmap {
            slots: slots
                .iter()
                .map(|&info| SlotBitmap {
                    info,
                    pages: Bitmap::new(info.gpa..info.gpa + info.len),
                })
                .collect(),
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.slots.iter().map(|s| s.pages.count()).sum()
    }

    /// Whether the page holding `gpa` is dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.slots.iter().any(|s| s.pages.is_set(gpa))
    }

    /// Marks the page holding `gpa` (ignored outside RAM).
    pub fn set(&mut self, gpa: u64) {
        if let Some(s) = self
            .slots
            .iter_mut()
            .find(|s| s.pages.range().contains(&gpa))
        {
            s.pages.set(gpa);
        }
    }

    /// Guest-physical addresses of the dirty pages, ascending per slot.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().flat_map(|s| s.pages.iter())
    }

    /// The pages of slot index `index`, to fill in place (a harvest's source writes them).
    pub fn slot_mut(&mut self, index: usize) -> Option<&mut Bitmap> {
        self.slots.get_mut(index).map(|s| &mut s.pages)
    }

    /// ORs an LSB-first page bitmap of slot index `index` into this one (vm-memory's
    /// `AtomicBitmap::get_and_reset()` of a 4 KiB-page region, or KVM's own bitmap). Extra words
    /// beyond the slot are ignored.
    pub fn merge_words(&mut self, index: usize, words: &[u64]) {
        if let Some(s) = self.slot_mut(index) {
            s.or_words(words);
        }
    }

    /// ORs `other` (same slots) into this one.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (i, s) in other.slots.iter().enumerate() {
            if let Some(mine) = self.slot_mut(i) {
                mine.merge(&s.pages);
            }
        }
    }

    /// Clears every page.
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.pages.clear();
        }
    }
}

/// The VMM's own writes to guest RAM, recorded lock-free and taken by every harvest: whoever
/// writes guest RAM from the host while a tracker is live calls [`VmmDirty::mark`] (through
/// [`super::DirtyTracker::vmm_writes`]) for the range it wrote.
///
/// Why not vm-memory's dirty bitmap: `GuestMemoryMmap<AtomicBitmap>` would mark every write
/// made through vm-memory's `Bytes` calls by itself, but guest RAM is a `GuestMemoryMmap<()>`
/// named in the signatures of about fifteen files of four owners (memory, vcpu, boot, arch's
/// long_mode/acpi/mptable, guest and its port/reclaim, migrate's source/destination/ram, this
/// module, dirty-bench and tests); changing its type is not a contained change, so the
/// tracker keeps its own log with the same layout ([`DirtyBitmap::merge_words`] also takes an
/// `AtomicBitmap::get_and_reset()` as is, for the day RAM switches).
///
/// Which host writes into guest RAM exist, and whether they need marking:
/// - loading (kernel, initrd, command line, boot_params, e820, ACPI, MP table, page tables;
///   the test guests' code, parameter block, pacing fields, page tables): all before the vCPUs
///   start, so before any tracker exists; migration's first pass sends every page anyway.
/// - the `--run-for` stop flag (guest.rs): written on the main thread after any migration it
///   ran has returned, so no tracker is live then; a caller that writes it during a migration
///   must mark it (the dirty_log tests do, and check it is in the next harvest).
/// - the migration receiver and postcopy's `Pager::place`: on the destination, which tracks
///   nothing.
/// - devices (serial, i8042, the test port) only read guest RAM; the virtio devices write it
///   (a disk's read data and status bytes, every device's used rings) on their own threads,
///   and record the ranges through [`super::HostChanges::record`] after writing. A migration
///   pauses them (every request they took done) before it refuses host changes.
/// - the emulation fallback (arch/x86_64/emulate) stores for the guest (`cmpxchg16b`,
///   `stmxcsr`) on vCPU threads while the VM runs: through [`super::HostChanges::change`] when the
///   VM's gate is given in `vcpu::EmulationHooks::host_changes`, unrecorded otherwise.
/// - not a write but a content change: a reclaim (`MADV_DONTNEED`, or a hole punch on shared
///   memory) turns a page into zeroes, which no source of dirty pages sees (stage2-wp only sees
///   the guest's next write). Reclaims go through [`super::HostChanges`], which marks the range here
///   (and the reclaim sequence word the reclaimer writes) while a migration runs.
#[derive(Debug)]
pub struct VmmDirty {
    slots: Vec<SlotInfo>,
    words: Vec<Vec<AtomicU64>>,
}

impl VmmDirty {
    /// An all-clear log over `slots`.
    pub fn new(slots: &[SlotInfo]) -> VmmDirty {
        VmmDirty {
            slots: slots.to_vec(),
            words: slots
                .iter()
                .map(|s| {
                    (0..(s.len >> PAGE_SHIFT).div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        }
    }

    /// Records that the VMM wrote `[gpa, gpa+len)` (the parts outside RAM are ignored).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = gpa.saturating_add(len);
        for (s, words) in self.slots.iter().zip(&self.words) {
            let lo = gpa.max(s.gpa);
            let hi = end.min(s.gpa + s.len);
            if lo >= hi {
                continue;
            }
            let first = (lo - s.gpa) >> PAGE_SHIFT;
            let last = (hi - 1 - s.gpa) >> PAGE_SHIFT;
            for p in first..=last {
                words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
            }
        }
    }

    /// Moves the recorded pages into `out` (each word is swapped with 0: a concurrent mark lands
    /// either in this take or in the next).
    pub fn take_into(&self, out: &mut DirtyBitmap) {
        for (i, words) in self.words.iter().enumerate() {
            let Some(pages) = out.slot_mut(i) else {
                continue;
            };
            for (d, w) in pages.words_mut().iter_mut().zip(words) {
                if w.load(Ordering::Relaxed) != 0 {
                    *d |= w.swap(0, Ordering::AcqRel);
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Two 1 MiB slots, at 0 and at 4 GiB.
    pub(in crate::dirty) fn slots() -> Vec<SlotInfo> {
        vec![
            SlotInfo {
                slot: 0,
                gpa: 0,
                len: 1 << 20,
                host_addr: 0,
            },
            SlotInfo {
                slot: 1,
                gpa: 4 << 30,
                len: 1 << 20,
                host_addr: 0,
            },
        ]
    }

    #[test]
    fn vmm_writes_are_merged_and_taken_once() {
        let s = slots();
        let vmm = VmmDirty::new(&s);
        vmm.mark(0x1ff8, 16); // straddles pages 1 and 2
        vmm.mark((4 << 30) + 0x5000, 1);
        vmm.mark(2 << 30, 4096); // not RAM
        let mut out = DirtyBitmap::empty(&s);
        vmm.take_into(&mut out);
        let got: Vec<u64> = out.iter().collect();
        assert_eq!(got, vec![0x1000, 0x2000, (4 << 30) + 0x5000]);
        let mut again = DirtyBitmap::empty(&s);
        vmm.take_into(&mut again);
        assert_eq!(again.count(), 0, "a take moves the bits out");
    }

    #[test]
    fn merge_words_ors_and_ignores_excess() {
        let s = slots();
        let mut b = DirtyBitmap::empty(&s);
        b.set(0x3000);
        let extra = vec![0b101u64; 10];
        b.merge_words(0, &extra);
        assert!(b.is_dirty(0) && b.is_dirty(0x2000) && b.is_dirty(0x3000));
        assert!(!b.is_dirty(0x1000));
        // 1 MiB slot = 256 pages = 4 words: the 6 extra words are ignored.
        assert_eq!(b.count(), 4 * 2 + 1);
        b.merge_words(7, &extra);
        assert_eq!(b.count(), 9);
    }
}
