//! KVM's per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, falling back to
//! `KVM_CAP_DIRTY_LOG_RING`): enabling on the VM, mapping each vCPU's ring, collecting its
//! entries and `KVM_RESET_DIRTY_RINGS`; and [`KvmRingLog`], the `kvm-ring` [`DirtyLog`] over
//! them.
//!
//! kvm-ioctls (0.25) has no dirty-ring wrapper: the ring is mapped from the vCPU fd at
//! `KVM_DIRTY_LOG_PAGE_OFFSET` pages and the reset is issued through vmm-sys-util's ioctl
//! helpers, here and nowhere else.
//!
//! Protocol (Documentation/virt/kvm/api.rst §8.29): KVM publishes an entry `{flags, slot,
//! offset}` with `flags = DIRTY` (a release store on ACQ_REL hosts); we read flags with acquire
//! ordering, then slot and offset, then store `RESET` with release ordering, in ring order, and
//! stop at the first entry that is not DIRTY. `KVM_RESET_DIRTY_RINGS` then write-protects the
//! pages of the RESET entries again and frees their slots. The caller copies pages only after
//! the reset, so a write made between the collection and the reset is in the copy.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use log::{debug, info, warn};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr};

use super::bitmap::set_log_flag;
use super::error::DirtyError;
use super::log::{DirtyLog, HarvestStats};
use super::mode::DirtyMode;
use super::pages::{DirtyBitmap, SlotInfo};

/// `kvm_dirty_gfn.slot` holds the address space in its upper 16 bits (api.rst §8.29).
const RING_SLOT_ID_MASK: u32 = 0xffff;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// `kvm_dirty_gfn.flags` bits (include/uapi/linux/kvm.h, api.rst §8.29).
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// Set by userspace once the entry is collected.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// Bytes of one ring entry.
pub const ENTRY_BYTES: u32 = std::mem::size_of::<kvm_dirty_gfn>() as u32;

/// Which capability the VM's rings were enabled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingFlavor {
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: KVM publishes with release, we read with acquire.
    AcqRel,
    /// `KVM_CAP_DIRTY_LOG_RING` (x86's strongly ordered flavour), used when ACQ_REL is absent.
    Plain,
}

/// Enables dirty rings of `bytes` bytes per vCPU on `vm`; must come before any vCPU exists.
pub(super) fn enable(vm: &File, bytes: u32) -> Result<RingFlavor, DirtyError> {
    if !bytes.is_power_of_two() || bytes < 4096 {
        return Err(DirtyError::RingSize { bytes, max: 0 });
    }
    let mut flavor = RingFlavor::AcqRel;
    // SAFETY: KVM_CHECK_EXTENSION takes an integer and touches no memory of ours.
    let mut max = unsafe {
        ioctl_with_val(
            vm,
            KVM_CHECK_EXTENSION(),
            KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into(),
        )
    };
    let mut cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
    if max <= 0 {
        warn!("KVM lacks KVM_CAP_DIRTY_LOG_RING_ACQ_REL; using KVM_CAP_DIRTY_LOG_RING (x86 is strongly ordered, so the same protocol holds)");
        flavor = RingFlavor::Plain;
        cap = KVM_CAP_DIRTY_LOG_RING;
        // SAFETY: as above.
        max = unsafe { ioctl_with_val(vm, KVM_CHECK_EXTENSION(), cap.into()) };
        if max <= 0 {
            return Err(DirtyError::NoRing);
        }
    }
    if bytes > max as u32 {
        return Err(DirtyError::RingSize {
            bytes,
            max: max as u32,
        });
    }
    let mut en = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    en.args[0] = u64::from(bytes);
    // SAFETY: KVM_ENABLE_CAP reads one `kvm_enable_cap` that lives for the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_ENABLE_CAP(), &en) };
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Err(DirtyError::RingAfterVcpus);
        }
        return Err(DirtyError::Kvm {
            what: "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING*)",
            source: e,
        });
    }
    Ok(flavor)
}

/// `KVM_RESET_DIRTY_RINGS`: re-protects the pages of every RESET entry of every ring. Returns
/// the number of entries reset.
pub(super) fn reset_all(vm: &File) -> Result<u64, DirtyError> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(DirtyError::kvm("KVM_RESET_DIRTY_RINGS"));
    }
    Ok(ret as u64)
}

/// One vCPU's ring, mapped from its fd.
#[derive(Debug)]
pub struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    map_len: usize,
    /// Next entry to collect (free-running; the slot is `fetch % entries`).
    fetch: u32,
}

// SAFETY: the mapping is shared memory owned by this struct; entries are accessed through
// atomics for `flags` and plain reads for slot/offset after an acquire load of `flags`. Callers
// serialize collection of one ring (the tracker keeps each ring under a mutex).
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring of the vCPU behind `vcpu_fd` (`bytes` as given to [`enable`]).
    pub(super) fn map(vcpu_fd: &impl AsRawFd, bytes: u32) -> Result<Ring, DirtyError> {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        let offset = i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        // SAFETY: a fresh shared mapping of the vCPU fd's ring area; KVM checks the offset and
        // the length against the ring size. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyError::kvm("mmap of the vCPU dirty ring"));
        }
        Ok(Ring {
            base: p.cast(),
            entries: bytes / ENTRY_BYTES,
            map_len: bytes as usize,
            fetch: 0,
        })
    }

    /// Entries in the ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Collects every published entry in ring order, hands `(slot, offset)` to `f`, and marks it
    /// RESET. Returns the number collected.
    pub(super) fn collect(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let idx = (self.fetch % self.entries) as usize;
            // SAFETY: idx < entries, inside the live mapping.
            let e = unsafe { self.base.add(idx) };
            // SAFETY: `flags` is the first u32 of the entry, naturally aligned; KVM and we
            // access it concurrently, hence the atomic view.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the acquire load above orders these reads after KVM's publication.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).offset)),
                )
            };
            f(slot, offset);
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `map` with this length and is not used afterwards.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}

/// `kvm-ring`: KVM's per-vCPU dirty rings. The rings exist from the VM's start (KVM takes them
/// only before vCPUs), but KVM logs into them only while the slots carry
/// `KVM_MEM_LOG_DIRTY_PAGES`: from the first harvest until [`DirtyLog::stop`].
pub struct KvmRingLog {
    vm: File,
    slots: Vec<SlotInfo>,
    bytes: u32,
    flavor: RingFlavor,
    rings: Mutex<Vec<Arc<Mutex<Ring>>>>,
    /// Entries collected on ring-full exits, waiting for the next harvest.
    pending: Mutex<DirtyBitmap>,
    /// `KVM_MEM_LOG_DIRTY_PAGES` is on: set by the first harvest, cleared by `stop`.
    logging: Mutex<bool>,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits answered by [`KvmRingLog::on_ring_full`].
    ring_full: AtomicU64,
}

impl KvmRingLog {
    /// Enables rings of `bytes` bytes per vCPU on `vm` (before any vCPU exists); logging
    /// starts with the first harvest.
    pub(super) fn new(vm: File, slots: &[SlotInfo], bytes: u32) -> Result<Self, DirtyError> {
        let flavor = enable(&vm, bytes)?;
        Ok(KvmRingLog {
            vm,
            slots: slots.to_vec(),
            bytes,
            flavor,
            rings: Mutex::new(Vec::new()),
            pending: Mutex::new(DirtyBitmap::empty(slots)),
            logging: Mutex::new(false),
            ring_full: AtomicU64::new(0),
        })
    }

    /// The capability the rings were enabled with.
    pub fn flavor(&self) -> RingFlavor {
        self.flavor
    }

    /// Maps the ring of vCPU `index`; once per vCPU, in index order, right after creating it.
    pub fn attach_vcpu(&self, index: usize, vcpu_fd: &impl AsRawFd) -> Result<(), DirtyError> {
        let r = Ring::map(vcpu_fd, self.bytes)?;
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        if index != rings.len() {
            return Err(DirtyError::NoVcpuRing(rings.len()));
        }
        rings.push(Arc::new(Mutex::new(r)));
        Ok(())
    }

    /// The vCPU thread's answer to `KVM_EXIT_DIRTY_RING_FULL`: moves that vCPU's ring into the
    /// pending set and resets the rings. No entry is dropped: the pages wait in the pending set
    /// for the next harvest. Returns the entries moved.
    pub fn on_ring_full(&self, vcpu: usize) -> Result<u32, DirtyError> {
        let ring = self
            .rings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vcpu)
            .cloned()
            .ok_or(DirtyError::NoVcpuRing(vcpu))?;
        let n = {
            let mut pend = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let mut r = ring.lock().unwrap_or_else(|p| p.into_inner());
            collect_into(&mut r, &mut pend)?
        };
        reset_all(&self.vm)?;
        self.ring_full.fetch_add(1, Ordering::Relaxed);
        debug!("vCPU {vcpu}: dirty ring full, {n} entries moved to the pending set");
        Ok(n)
    }

    /// Ring-full exits answered so far.
    pub fn ring_full_exits(&self) -> u64 {
        self.ring_full.load(Ordering::Relaxed)
    }

    fn all_rings(&self) -> Vec<Arc<Mutex<Ring>>> {
        self.rings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Collects `r`'s entries into `out`: the entry's slot id (address space masked off) is the
/// index of the slot in `out`, its offset the page in that slot.
fn collect_into(r: &mut Ring, out: &mut DirtyBitmap) -> Result<u32, DirtyError> {
    let mut bad = None;
    let n = r.collect(|slot, offset| {
        let id = (slot & RING_SLOT_ID_MASK) as usize;
        if !out
            .slot_mut(id)
            .is_some_and(|pages| pages.set_index(offset))
        {
            bad = Some(slot);
        }
    });
    match bad {
        Some(slot) => Err(DirtyError::UnknownSlot(slot)),
        None => Ok(n),
    }
}

impl DirtyLog for KvmRingLog {
    fn mode(&self) -> DirtyMode {
        DirtyMode::KvmRing {
            ring_bytes: self.bytes,
        }
    }

    fn harvest(&self, out: &mut DirtyBitmap, st: &mut HarvestStats) -> Result<(), DirtyError> {
        {
            // The first harvest starts logging: every write after this is in a ring.
            let mut on = self.logging.lock().unwrap_or_else(|p| p.into_inner());
            if !*on {
                set_log_flag(&self.vm, &self.slots, true)?;
                *on = true;
                info!("dirty rings: logging started");
            }
        }
        let t0 = Instant::now();
        let rings = self.all_rings();
        let mut pend = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for r in &rings {
            let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
            st.ops += u64::from(collect_into(&mut r, &mut pend)?);
        }
        let t1 = Instant::now();
        st.get_ns = (t1 - t0).as_nanos() as u64;
        // Reset before handing the pages out: the caller copies after this returns.
        reset_all(&self.vm)?;
        st.clear_ns = t1.elapsed().as_nanos() as u64;
        out.merge(&pend);
        pend.clear();
        Ok(())
    }

    fn stop(&self) -> Result<(), DirtyError> {
        // Logging off, then the rings emptied and the pending set dropped: the next harvest
        // starts afresh (the rings stay: KVM cannot make them again).
        let mut on = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        set_log_flag(&self.vm, &self.slots, false)?;
        *on = false;
        let rings = self.all_rings();
        let mut pend = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for r in &rings {
            let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
            collect_into(&mut r, &mut pend)?;
        }
        reset_all(&self.vm)?;
        pend.clear();
        info!("dirty rings: logging stopped (the rings stay for a later harvest)");
        Ok(())
    }
}
