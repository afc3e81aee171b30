//! KVM's per-memslot dirty bitmap with manual protect: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
//! (initially all set), `KVM_GET_DIRTY_LOG` to read a slot's bitmap, `KVM_CLEAR_DIRTY_LOG` per
//! chunk to clear the bits read and write-protect exactly those pages again.
//!
//! With manual protect, `KVM_GET_DIRTY_LOG` only copies the bitmap; nothing is re-protected
//! until `KVM_CLEAR_DIRTY_LOG` (Documentation/virt/kvm/api.rst §4.118). A write that lands
//! between the get and the clear of its page is in memory before the harvest returns, so the
//! caller's copy (made after the harvest) sees it; a write after the clear faults and sets the
//! bit again. kvm-ioctls has `get_dirty_log` but allocates on every call and has no
//! `KVM_CLEAR_DIRTY_LOG`: both ioctls are issued here through vmm-sys-util's helpers.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use super::error::DirtyError;
use super::log::{DirtyLog, HarvestStats};
use super::mode::DirtyMode;
use super::pages::{DirtyBitmap, SlotInfo};

/// KVM's ioctl type (include/uapi/linux/kvm.h `KVMIO`).
const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);

/// Default pages cleared per `KVM_CLEAR_DIRTY_LOG` call: 1 GiB of 4 KiB pages. KVM requires
/// `first_page` and `num_pages` to be multiples of 64 (api.rst §4.118), except at the slot's
/// end; chunks with no bit set are skipped.
pub const CLEAR_CHUNK_PAGES: u64 = 1 << 18;
/// KVM's alignment of `first_page` and `num_pages` in `KVM_CLEAR_DIRTY_LOG` (api.rst §4.118).
pub const CLEAR_ALIGN_PAGES: u64 = 64;

/// Turns on manual protect with initially-set bitmaps, then re-issues every memslot with
/// `KVM_MEM_LOG_DIRTY_PAGES`. After this every page reads dirty once (initially set), and KVM
/// write-protects lazily, page by page, as the bits are cleared.
pub(super) fn enable(vm: &File, slots: &[SlotInfo]) -> Result<(), DirtyError> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
    // SAFETY: KVM_ENABLE_CAP reads one `kvm_enable_cap` that lives for the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_ENABLE_CAP(), &cap) };
    if ret < 0 {
        return Err(DirtyError::kvm(
            "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)",
        ));
    }
    set_log_flag(vm, slots, true)
}

/// Sets or clears `KVM_MEM_LOG_DIRTY_PAGES` on every slot (same slot, address and size).
pub(super) fn set_log_flag(vm: &File, slots: &[SlotInfo], on: bool) -> Result<(), DirtyError> {
    for s in slots {
        let region = kvm_userspace_memory_region {
            slot: s.slot,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: s.gpa,
            memory_size: s.len,
            userspace_addr: s.host_addr,
        };
        // SAFETY: the slot is re-issued with the host range it already had (a live mapping the
        // caller keeps for the VM's life); only the flags change.
        let ret = unsafe { ioctl_with_ref(vm, KVM_SET_USER_MEMORY_REGION(), &region) };
        if ret < 0 {
            return Err(DirtyError::kvm(
                "KVM_SET_USER_MEMORY_REGION (toggling KVM_MEM_LOG_DIRTY_PAGES)",
            ));
        }
    }
    Ok(())
}

/// Copies slot `slot`'s dirty bitmap into `words` (one bit per page, LSB first; `words` holds
/// at least `pages.div_ceil(64)` words).
pub(super) fn get(vm: &File, slot: u32, words: &mut [u64]) -> Result<(), DirtyError> {
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: words.as_mut_ptr().cast(),
        },
    };
    // SAFETY: KVM writes the slot's bitmap (pages/8 bytes rounded up to 8) into `words`, which
    // the caller sized for the slot; `log` lives for the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if ret < 0 {
        return Err(DirtyError::kvm("KVM_GET_DIRTY_LOG"));
    }
    Ok(())
}

/// Clears the bits set in `words` for slot `slot` of `pages` pages and write-protects those
/// pages, one `KVM_CLEAR_DIRTY_LOG` per chunk of `chunk_pages` pages (a multiple of
/// [`CLEAR_ALIGN_PAGES`]) that has a bit set. Returns the number of ioctls issued.
pub(super) fn clear(
    vm: &File,
    slot: u32,
    pages: u64,
    words: &[u64],
    chunk_pages: u64,
) -> Result<u32, DirtyError> {
    debug_assert!(chunk_pages > 0 && chunk_pages.is_multiple_of(CLEAR_ALIGN_PAGES));
    let chunk_words = (chunk_pages / 64) as usize;
    let mut calls = 0;
    for (i, chunk) in words.chunks(chunk_words).enumerate() {
        if chunk.iter().all(|&w| w == 0) {
            continue;
        }
        let first_page = i as u64 * chunk_pages;
        let num_pages = chunk_pages.min(pages - first_page);
        let log = kvm_clear_dirty_log {
            slot,
            num_pages: num_pages as u32,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: chunk.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: KVM reads num_pages bits from `chunk` (it holds chunk_pages bits, or the rest
        // of the slot); the bitmap is only read despite the `*mut` in the uapi struct.
        let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &log) };
        if ret < 0 {
            return Err(DirtyError::kvm("KVM_CLEAR_DIRTY_LOG"));
        }
        calls += 1;
    }
    Ok(calls)
}

/// `kvm-bitmap`: KVM's dirty bitmap with manual protect, read and cleared per slot at every
/// harvest, logging from its creation until [`DirtyLog::stop`].
pub struct KvmBitmapLog {
    vm: File,
    slots: Vec<SlotInfo>,
    /// What `KVM_GET_DIRTY_LOG` writes into (one harvest at a time).
    scratch: Mutex<DirtyBitmap>,
    /// Pages per `KVM_CLEAR_DIRTY_LOG`.
    clear_chunk: AtomicU64,
}

impl KvmBitmapLog {
    /// Turns on manual protect with initially-set bitmaps and logging on every slot of `vm`
    /// (the first harvest so returns every page).
    pub(super) fn start(vm: File, slots: &[SlotInfo]) -> Result<KvmBitmapLog, DirtyError> {
        enable(&vm, slots)?;
        Ok(KvmBitmapLog {
            vm,
            slots: slots.to_vec(),
            scratch: Mutex::new(DirtyBitmap::empty(slots)),
            clear_chunk: AtomicU64::new(CLEAR_CHUNK_PAGES),
        })
    }

    /// Pages per `KVM_CLEAR_DIRTY_LOG` call (default [`CLEAR_CHUNK_PAGES`]); rounded up to a
    /// multiple of [`CLEAR_ALIGN_PAGES`], KVM's alignment.
    pub fn set_clear_chunk_pages(&self, pages: u64) {
        let p = pages.max(1).next_multiple_of(CLEAR_ALIGN_PAGES);
        self.clear_chunk.store(p, Ordering::Relaxed);
    }
}

impl DirtyLog for KvmBitmapLog {
    fn mode(&self) -> DirtyMode {
        DirtyMode::KvmBitmap
    }

    fn harvest(&self, out: &mut DirtyBitmap, st: &mut HarvestStats) -> Result<(), DirtyError> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        for (i, s) in self.slots.iter().enumerate() {
            let pages = scratch.slot_mut(i).expect("scratch has every slot");
            let t0 = Instant::now();
            get(&self.vm, s.slot, pages.words_mut())?;
            let t1 = Instant::now();
            let chunk = self.clear_chunk.load(Ordering::Relaxed);
            st.ops += u64::from(clear(
                &self.vm,
                s.slot,
                pages.pages(),
                pages.words(),
                chunk,
            )?);
            st.get_ns += (t1 - t0).as_nanos() as u64;
            st.clear_ns += t1.elapsed().as_nanos() as u64;
            out.merge_words(i, pages.words());
        }
        Ok(())
    }

    fn stop(&self) -> Result<(), DirtyError> {
        set_log_flag(&self.vm, &self.slots, false)
    }
}
