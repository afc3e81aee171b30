//! Virtio devices on the virtio-mmio transport (virtio 1.2 §4.2), with rust-vmm's
//! `virtio-queue` for the split virtqueues.
//!
//! Why MMIO and not PCI: a guest finds an MMIO device from one entry in the DSDT the VMM
//! already builds (`_HID "LNRO0005"`, a memory window and an interrupt:
//! [`crate::arch::x86_64::acpi::VirtioMmio`]), with no PCI host bridge, configuration space or
//! MSI-X table to emulate. Firecracker made the same choice for the same reasons. Its cost is
//! one interrupt line per device and no MSI; at a handful of devices that is fine. (The kernel's
//! `virtio_mmio.device=` command-line form does not work on this machine: its ACPI is
//! hardware-reduced, so no legacy PIC maps the ISA lines, and an interrupt no table names
//! cannot be requested.)
//!
//! A device's queues are served on a thread of its own: the guest's write of a queue's index to
//! `QueueNotify` reaches it through an ioeventfd (KVM signals the queue's event without an exit
//! to the VMM; where no ioeventfd is registered, the transport signals it on the MMIO exit),
//! and its "used buffer" interrupt goes to the guest through an irqfd.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
mod thread;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::dirty::HostChanges;

pub use mmio::{MmioTransport, QueueSnapshot, TransportState};

/// `VIRTIO_F_VERSION_1`: a modern (virtio 1.x) device; the MMIO transport's version 2 needs it.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device types (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;
/// A block device.
pub const TYPE_BLOCK: u32 = 2;
/// A memory balloon.
pub const TYPE_BALLOON: u32 = 5;

/// `InterruptStatus` bit: a queue has used buffers.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// The device's interrupt line: the status bits the driver reads and acknowledges, and the
/// irqfd that raises the line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// A line raised through `irqfd` (registered with KVM on the device's GSI).
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in `InterruptStatus` and raises the line.
    pub fn raise(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::AcqRel);
        self.irqfd.write(1)
    }

    /// `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Sets `InterruptStatus` to a migrated device's and, when a bit is set, raises the line
    /// again: a spurious interrupt is harmless to the driver, a lost one is not.
    pub fn restore(&self, bits: u32) -> std::io::Result<()> {
        self.status.store(bits, Ordering::Release);
        if bits != 0 {
            self.irqfd.write(1)?;
        }
        Ok(())
    }

    /// `InterruptACK`: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The irqfd, for registering with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Where a device records the guest RAM it wrote: the machine's [`HostChanges`] gate, so that
/// a running migration sends those pages again (the VMM's own writes are in no KVM dirty log,
/// and stage2-wp sees only the guest's). Without a gate (tests, the fuzz targets) nothing is
/// recorded.
#[derive(Clone, Debug, Default)]
pub struct GuestWrites(Option<Arc<HostChanges>>);

impl GuestWrites {
    /// Records through `gate`.
    pub fn new(gate: Arc<HostChanges>) -> GuestWrites {
        GuestWrites(Some(gate))
    }

    /// Records `(gpa, len)` ranges the device has written (call after the writes).
    pub fn record(&self, ranges: &[(u64, u64)]) {
        if let Some(g) = &self.0 {
            g.record(ranges);
        }
    }
}

/// Reads `data.len()` bytes of a configuration space laid out in `config` from `offset`: bytes
/// past its end (and offsets past `usize`) read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// The guest RAM a device may write for `chain`: its device-writable buffers.
pub fn writable_ranges<'a>(
    chain: &DescriptorChain<&'a GuestMemoryMmap>,
) -> impl Iterator<Item = (u64, u64)> + 'a {
    chain
        .clone()
        .filter(|d| d.is_write_only())
        .map(|d| (d.addr().0, u64::from(d.len())))
}

/// The guest RAM of `queue`'s used ring (flags, index, the elements, `avail_event`): what the
/// device writes when it returns buffers.
pub fn used_ring_range(queue: &Queue) -> (u64, u64) {
    (queue.used_ring(), 6 + 8 * u64::from(queue.size()))
}

/// Takes up to `max` chains of `queue`, runs `each` on them, puts them in the used ring with
/// the length it returns, and interrupts the driver if it wants to hear of it. Returns the
/// chains done and whether more wait (the caller serves them after looking for a stop: a
/// driver can keep a ring busy for long). `device` names the device in warnings.
pub fn drain(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    interrupt: &Interrupt,
    device: &str,
    max: usize,
    mut each: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> (usize, bool) {
    let mut done = 0;
    let mut more = false;
    'drain: loop {
        // Notifications off while the ring is drained, then on and a last look (virtio 1.2
        // §2.7.10): a buffer the driver adds in between is not missed.
        let _ = queue.disable_notification(mem);
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped = true;
            let head = chain.head_index();
            let used = each(chain);
            if let Err(e) = queue.add_used(mem, head, used) {
                log::warn!("{device}: cannot put buffer {head} in the used ring: {e:?}");
            }
            done += 1;
            if done == max {
                more = true;
                break 'drain;
            }
        }
        match queue.enable_notification(mem) {
            // More offered, but a pass that took nothing will take nothing again: the
            // available index is one the queue refuses (more than a ring ahead). A fuzzer
            // found the block device's thread spinning here for ever.
            Ok(true) if !popped => {
                log::warn!("{device}: the available ring's index is invalid; buffers ignored");
                break;
            }
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                log::warn!("{device}: the available ring is not readable: {e:?}");
                break;
            }
        }
    }
    if done > 0 && queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.raise(INT_VRING) {
            log::warn!("{device}: cannot raise the interrupt: {e}");
        }
    }
    (done, more)
}

/// Why a device could not start serving its queues.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the driver set up is not valid in guest memory.
    #[error("virtio queue {0} is not valid in guest memory (its rings lie outside RAM or are misaligned)")]
    BadQueue(usize),
    /// The device's thread could not start.
    #[error("cannot start the device thread: {0}")]
    Thread(std::io::Error),
}

/// What the transport needs of a device.
pub trait VirtioDevice: Send {
    /// Its type (`TYPE_BLOCK`, ...).
    fn device_type(&self) -> u32;
    /// The largest size of each of its queues (their number is the slice's length).
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits it offers.
    fn features(&self) -> u64;
    /// Reads its configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes its configuration space at `offset` (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving `queues` in `mem` once the driver is ready: `events[i]` is signalled when
    /// the driver notifies queue `i`; `interrupt` tells the driver of used buffers.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<virtio_queue::Queue>,
        events: Vec<Arc<EventFd>>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops serving the queues (the driver reset the device); it can be activated again.
    fn reset(&mut self);
    /// Stops serving the queues once every request taken from them is done (its result in
    /// the used ring, a disk's writes in its file: nothing is left in flight), and gives the
    /// queues' state as the device left them, for a migration to save.
    /// [`VirtioDevice::resume`] serves them again. `None` when the device is not active.
    fn pause(&mut self) -> Option<Vec<virtio_queue::QueueState>>;
    /// Serves the queues [`VirtioDevice::pause`] gave back again, with a look at each for
    /// requests that came meanwhile.
    fn resume(&mut self);
    /// What a migration carries of the device beyond its transport and queues (paused):
    /// empty when nothing.
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes a migration source's [`VirtioDevice::save`] before the device is activated on the
    /// destination; refuses state that does not fit this device (another disk size, ...).
    fn restore(&mut self, blob: &[u8]) -> Result<(), String> {
        if blob.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes of device state this device does not have",
                blob.len()
            ))
        }
    }
}
