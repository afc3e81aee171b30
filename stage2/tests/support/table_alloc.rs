//! A global allocator for the loom tests that counts live allocations aligned like a stage2 table
//! page, so a leaked table page is seen even when the engine's own counters agree with each other.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use stage2::TABLE_PAGE_BYTES;

/// Counts live allocations aligned like a table page, per OS thread (loom runs a model's threads
/// on the test's own OS thread; other tests of this binary run on other OS threads).
pub struct CountTablePages;

thread_local! {
    static TABLE_ALLOCS: Cell<i64> = const { Cell::new(0) };
}

fn count(layout: Layout, delta: i64) {
    if layout.align() == TABLE_PAGE_BYTES as usize {
        let _ = TABLE_ALLOCS.try_with(|c| c.set(c.get() + delta));
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountTablePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout, 1);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(layout, -1);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout, 1);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
}

#[global_allocator]
static ALLOC: CountTablePages = CountTablePages;

pub fn live_table_allocations() -> i64 {
    TABLE_ALLOCS.with(|c| c.get())
}
