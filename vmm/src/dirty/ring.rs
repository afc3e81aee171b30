//! KVM's per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, falling back to
//! `KVM_CAP_DIRTY_LOG_RING`): enabling on the VM, mapping each vCPU's ring, collecting its
//! entries and `KVM_RESET_DIRTY_RINGS`.
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
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use log::warn;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr};

use super::DirtyError;

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
