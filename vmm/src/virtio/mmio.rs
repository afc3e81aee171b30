//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): the register file a driver uses
//! to find a device, agree on features, set up its queues and start it.

use std::sync::{Arc, Mutex};

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::MmioDevice;

/// The size of one device's window: registers up to 0x100, then its configuration space.
pub const WINDOW: u64 = 0x1000;

const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
/// Where the driver writes a queue's index to notify it (an ioeventfd's address).
pub const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// No vendor ID: Linux's driver does not look at it.
const VENDOR: u32 = 0;

/// Device status bits (virtio 1.2 §2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The driver knows how to drive the device.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is ready: the device may use its queues.
pub const STATUS_DRIVER_OK: u32 = 4;
/// The driver accepted the features.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error it cannot recover from.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
/// The driver gave up on the device.
pub const STATUS_FAILED: u32 = 0x80;

struct State {
    device: Box<dyn VirtioDevice>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    active: bool,
}

/// One virtio device behind its MMIO window.
pub struct MmioTransport {
    state: Mutex<State>,
    mem: GuestMemoryMmap,
    events: Vec<Arc<EventFd>>,
    interrupt: Arc<Interrupt>,
}

impl MmioTransport {
    /// `device` on guest memory `mem`, raising its interrupt through `irqfd`. One event per
    /// queue is made here: [`MmioTransport::queue_events`] gives them for KVM's ioeventfds.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> std::io::Result<MmioTransport> {
        let mut queues = Vec::new();
        let mut events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(
                Queue::new(max)
                    .map_err(|e| std::io::Error::other(format!("queue of {max}: {e:?}")))?,
            );
            events.push(Arc::new(EventFd::new(libc::EFD_NONBLOCK)?));
        }
        Ok(MmioTransport {
            state: Mutex::new(State {
                device,
                device_features_sel: 0,
                driver_features_sel: 0,
                acked_features: 0,
                queue_sel: 0,
                queues,
                status: 0,
                active: false,
            }),
            mem,
            events,
            interrupt: Arc::new(Interrupt::new(irqfd)),
        })
    }

    /// The queues' notification events, by queue index.
    pub fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.events
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device status the driver set.
    pub fn status(&self) -> u32 {
        self.lock().status
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_reg(&self, s: &State, offset: u64) -> u32 {
        let queue = s.queues.get(s.queue_sel as usize);
        match offset {
            MAGIC => MAGIC_VALUE,
            VERSION => 2,
            DEVICE_ID => s.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => {
                let f = s.device.features() | (1 << VIRTIO_F_VERSION_1);
                match s.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => s.status,
            CONFIG_GENERATION => 0,
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&self, s: &mut State, offset: u64, v: u32) {
        // Queue and feature set-up is the driver's before DRIVER_OK, never after.
        let setting_up = s.status & STATUS_DRIVER_OK == 0;
        let sel = s.queue_sel as usize;
        let mut queue = |f: &mut dyn FnMut(&mut Queue)| match s.queues.get_mut(sel) {
            Some(q) if setting_up => f(q),
            Some(_) => warn!("virtio-mmio: queue register {offset:#x} written after DRIVER_OK"),
            None => debug!("virtio-mmio: queue register {offset:#x} of no queue {sel}"),
        };
        match offset {
            DEVICE_FEATURES_SEL => s.device_features_sel = v,
            DRIVER_FEATURES_SEL => s.driver_features_sel = v,
            DRIVER_FEATURES if setting_up && s.status & STATUS_FEATURES_OK == 0 => {
                match s.driver_features_sel {
                    0 => s.acked_features = (s.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => s.acked_features = (s.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            QUEUE_SEL => s.queue_sel = v,
            QUEUE_NUM => queue(&mut |q| q.set_size(v as u16)),
            QUEUE_READY => queue(&mut |q| q.set_ready(v == 1)),
            QUEUE_DESC_LOW => queue(&mut |q| q.set_desc_table_address(Some(v), None)),
            QUEUE_DESC_HIGH => queue(&mut |q| q.set_desc_table_address(None, Some(v))),
            QUEUE_DRIVER_LOW => queue(&mut |q| q.set_avail_ring_address(Some(v), None)),
            QUEUE_DRIVER_HIGH => queue(&mut |q| q.set_avail_ring_address(None, Some(v))),
            QUEUE_DEVICE_LOW => queue(&mut |q| q.set_used_ring_address(Some(v), None)),
            QUEUE_DEVICE_HIGH => queue(&mut |q| q.set_used_ring_address(None, Some(v))),
            QUEUE_NOTIFY => {
                // Only without an ioeventfd on this address does the write reach us.
                if let Some(e) = self.events.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(v),
            STATUS => self.set_status(s, v),
            _ => debug!("virtio-mmio: write {v:#x} to read-only or unknown register {offset:#x}"),
        }
    }

    fn set_status(&self, s: &mut State, v: u32) {
        if v == 0 {
            self.reset(s);
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && s.status & STATUS_FEATURES_OK == 0 {
            let offered = s.device.features() | (1 << VIRTIO_F_VERSION_1);
            let acked = s.acked_features;
            if acked & !offered != 0 || acked & (1 << VIRTIO_F_VERSION_1) == 0 {
                // The driver sees FEATURES_OK unset when it reads the status back.
                warn!(
                    "virtio-mmio: the driver asked for features {acked:#x} of {offered:#x} \
                     offered (VERSION_1 is required): refused"
                );
                v &= !STATUS_FEATURES_OK;
            }
        }
        s.status = v;
        if v & STATUS_DRIVER_OK != 0 && !s.active {
            self.activate(s);
        }
    }

    fn activate(&self, s: &mut State) {
        // The device gets copies; the transport keeps its own for the driver's reads.
        let queues: Result<Vec<Queue>, _> = s
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            warn!("virtio-mmio: a queue's state does not make a queue; the device needs a reset");
            s.status |= STATUS_DEVICE_NEEDS_RESET;
            return;
        };
        for (i, q) in queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                warn!(
                    "virtio-mmio: queue {i} is not valid in guest memory; the device needs a reset"
                );
                s.status |= STATUS_DEVICE_NEEDS_RESET;
                return;
            }
        }
        match s.device.activate(
            self.mem.clone(),
            s.acked_features,
            queues,
            self.events.clone(),
            self.interrupt.clone(),
        ) {
            Ok(()) => s.active = true,
            Err(e) => {
                warn!("virtio-mmio: {e}; the device needs a reset");
                s.status |= STATUS_DEVICE_NEEDS_RESET;
            }
        }
    }

    fn reset(&self, s: &mut State) {
        if s.active {
            s.device.reset();
            s.active = false;
        }
        for q in &mut s.queues {
            q.reset();
        }
        s.status = 0;
        s.acked_features = 0;
        s.device_features_sel = 0;
        s.driver_features_sel = 0;
        s.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }
}

impl MmioDevice for MmioTransport {
    fn read(&self, _vcpu: usize, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        if offset >= CONFIG {
            s.device.read_config(offset - CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            debug!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(&s, offset).to_le_bytes());
    }

    fn write(&self, _vcpu: usize, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        if offset >= CONFIG {
            s.device.write_config(offset - CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(&mut s, offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use vm_memory::GuestAddress;

    /// A device that records what the transport did to it.
    struct Probe {
        activated: Arc<Mutex<Option<(u64, usize)>>>,
        resets: Arc<Mutex<u32>>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            super::super::TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << 9
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            acked: u64,
            queues: Vec<Queue>,
            _events: Vec<Arc<EventFd>>,
            _interrupt: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            *self.activated.lock().unwrap() = Some((acked, queues.len()));
            Ok(())
        }
        fn reset(&mut self) {
            *self.resets.lock().unwrap() += 1;
        }
    }

    /// What the probe was activated with: (acked features, queue count).
    type Activated = Arc<Mutex<Option<(u64, usize)>>>;

    fn transport() -> (MmioTransport, Activated, Arc<Mutex<u32>>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let activated = Arc::new(Mutex::new(None));
        let resets = Arc::new(Mutex::new(0));
        let t = MmioTransport::new(
            Box::new(Probe {
                activated: activated.clone(),
                resets: resets.clone(),
            }),
            mem,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        (t, activated, resets)
    }

    fn r(t: &MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(0, off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &MmioTransport, off: u64, v: u32) {
        t.write(0, off, &v.to_le_bytes());
    }

    /// The driver's side of virtio 1.2 §3.1.1 for one 16-entry queue at `base`.
    fn set_up(t: &MmioTransport, features_hi: u32, base: u64) {
        w(t, STATUS, STATUS_ACKNOWLEDGE);
        w(t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, DRIVER_FEATURES_SEL, 0);
        w(t, DRIVER_FEATURES, 1 << 9);
        w(t, DRIVER_FEATURES_SEL, 1);
        w(t, DRIVER_FEATURES, features_hi);
        w(
            t,
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(t, QUEUE_SEL, 0);
        w(t, QUEUE_NUM, 16);
        w(t, QUEUE_DESC_LOW, base as u32);
        w(t, QUEUE_DRIVER_LOW, (base + 0x100) as u32);
        w(t, QUEUE_DEVICE_LOW, (base + 0x200) as u32);
        w(t, QUEUE_READY, 1);
    }

    #[test]
    fn a_driver_finds_sets_up_and_starts_the_device() {
        let (t, activated, _) = transport();
        assert_eq!(r(&t, MAGIC), MAGIC_VALUE);
        assert_eq!(r(&t, VERSION), 2);
        assert_eq!(r(&t, DEVICE_ID), super::super::TYPE_BLOCK);
        w(&t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&t, DEVICE_FEATURES), 1, "VERSION_1 is offered");
        assert_eq!(r(&t, QUEUE_NUM_MAX), 16);
        set_up(&t, 1, 0x1000);
        assert_ne!(r(&t, STATUS) & STATUS_FEATURES_OK, 0);
        assert!(activated.lock().unwrap().is_none());
        w(&t, STATUS, 0xf);
        assert_eq!(*activated.lock().unwrap(), Some(((1 << 32) | (1 << 9), 1)));
        // Config space reads go to the device.
        let mut d = [0u8; 2];
        t.read(0, CONFIG + 8, &mut d);
        assert_eq!(d, [8, 8]);
    }

    #[test]
    fn features_without_version_1_or_not_offered_are_refused() {
        let (t, activated, _) = transport();
        set_up(&t, 0, 0x1000);
        assert_eq!(r(&t, STATUS) & STATUS_FEATURES_OK, 0, "VERSION_1 missing");
        let (t, _, _) = transport();
        w(&t, DRIVER_FEATURES_SEL, 0);
        w(&t, DRIVER_FEATURES, 1 << 3);
        w(&t, DRIVER_FEATURES_SEL, 1);
        w(&t, DRIVER_FEATURES, 1);
        w(&t, STATUS, STATUS_FEATURES_OK);
        assert_eq!(
            r(&t, STATUS) & STATUS_FEATURES_OK,
            0,
            "bit 3 was not offered"
        );
        assert!(activated.lock().unwrap().is_none());
    }

    #[test]
    fn a_queue_outside_guest_memory_is_not_activated() {
        let (t, activated, _) = transport();
        set_up(&t, 1, 0xffff_f000);
        w(&t, STATUS, 0xf);
        assert!(activated.lock().unwrap().is_none());
        assert_ne!(r(&t, STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn status_zero_resets_and_queue_registers_are_frozen_after_driver_ok() {
        let (t, activated, resets) = transport();
        set_up(&t, 1, 0x1000);
        w(&t, STATUS, 0xf);
        w(&t, QUEUE_NUM, 8);
        assert!(activated.lock().unwrap().is_some());
        w(&t, STATUS, 0);
        assert_eq!(*resets.lock().unwrap(), 1);
        assert_eq!(r(&t, STATUS), 0);
        assert_eq!(r(&t, QUEUE_READY), 0);
    }

    #[test]
    fn notify_without_an_ioeventfd_signals_the_queue_event_and_acks_clear_status() {
        let (t, _, _) = transport();
        w(&t, QUEUE_NOTIFY, 0);
        assert_eq!(t.queue_events()[0].read().unwrap(), 1);
        w(&t, QUEUE_NOTIFY, 7); // no such queue: ignored
        t.interrupt().raise(super::super::INT_VRING).unwrap();
        assert_eq!(r(&t, INTERRUPT_STATUS), 1);
        w(&t, INTERRUPT_ACK, 1);
        assert_eq!(r(&t, INTERRUPT_STATUS), 0);
        // Odd sizes and offsets are ignored, not a panic.
        t.write(0, 0x71, &[1]);
        let mut d = [0u8; 2];
        t.read(0, STATUS, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
