//! The baseline mapper the benches compare against: the `x86_64` crate's `OffsetPageTable` over a
//! pre-allocated arena of 4 KiB frames, mapping consecutive 4 KiB pages.

use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Bytes in one x86 page-table page (Intel SDM Vol. 3A, 4.5: a 4-KByte naturally aligned table).
const TABLE_BYTES: usize = 4096;
/// Page-table pages needed to map 1 GiB with 4 KiB pages: one PML4, one PDPT, one PD, 512 PTs.
pub const TABLES_FOR_1G_4K: usize = 1 + 1 + 1 + 512;

/// One naturally aligned 4 KiB frame of the arena.
#[repr(C, align(4096))]
pub struct Frame([u8; TABLE_BYTES]);

/// An arena of frames whose "physical" address is the frame's index times 4 KiB, so that the
/// mapper's physical-memory offset is simply the arena's host address.
pub struct Arena {
    frames: Vec<Frame>,
}

impl Arena {
    /// An arena of `nr` zeroed frames (frame 0 is the PML4).
    pub fn new(nr: usize) -> Self {
        let frames = (0..nr).map(|_| Frame([0; TABLE_BYTES])).collect();
        Self { frames }
    }

    /// Map `nr_pages` consecutive 4 KiB pages from virtual address 0 to frames from `frame_base`,
    /// read/write, with a fresh set of tables; returns the number of table frames used.
    pub fn map_4k(&mut self, nr_pages: u64, frame_base: u64) -> usize {
        let base = self.frames.as_mut_ptr();
        let len = self.frames.len();
        // SAFETY: frame 0 of the arena is a zeroed, 4 KiB aligned page that nothing else references
        // while the mapper lives; a zeroed page is a valid empty `PageTable`.
        let l4 = unsafe { &mut *(base as *mut PageTable) };
        // SAFETY: every "physical" frame address the allocator hands out is an index into the arena,
        // so physical address + offset is that frame's host address, valid for the mapper's lifetime.
        let mut mapper = unsafe { OffsetPageTable::new(l4, VirtAddr::new(base as u64)) };
        let mut alloc = ArenaAlloc { next: 1, len };
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        for i in 0..nr_pages {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(i << 12));
            let frame = PhysFrame::containing_address(PhysAddr::new(frame_base + (i << 12)));
            // SAFETY: the virtual range is only described by these tables, never dereferenced.
            let flush = unsafe { mapper.map_to(page, frame, flags, &mut alloc) };
            flush
                .expect("x86_64 baseline: arena too small or page mapped twice")
                .ignore();
        }
        alloc.next
    }
}

/// Hands out arena frames in order; the mapper zeroes each new table itself.
struct ArenaAlloc {
    next: usize,
    len: usize,
}

// SAFETY: each frame is handed out once, is 4 KiB aligned and unused by anything else.
unsafe impl FrameAllocator<Size4KiB> for ArenaAlloc {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        if self.next == self.len {
            return None;
        }
        let frame = PhysFrame::containing_address(PhysAddr::new((self.next * TABLE_BYTES) as u64));
        self.next += 1;
        Some(frame)
    }
}
