//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): the register file a driver uses
//! to find a device, agree on features, set up its queues and start it.

use std::sync::{Arc, Mutex};

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
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

/// One queue as a migration carries it: what the driver set up and where the device is in
/// its rings (virtio-queue's `QueueState`, which has no serde).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// The descriptor table's guest address.
    pub desc_table: u64,
    /// The available ring's.
    pub avail_ring: u64,
    /// The used ring's.
    pub used_ring: u64,
    /// The next available entry the device takes.
    pub next_avail: u16,
    /// The next used entry the device fills.
    pub next_used: u16,
    /// `VIRTIO_F_EVENT_IDX` in use.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> QueueSnapshot {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> QueueState {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// A virtio-mmio device as a migration carries it: the transport's registers, the queues
/// where the paused device left them, the interrupt status and the device's own state.
/// Requests the device had taken are done before it is saved (see [`VirtioDevice::pause`]);
/// requests the driver had made available but the device had not taken are in guest RAM and
/// are taken on the destination, which looks at every queue once the device runs there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device type, checked on restore.
    pub device_type: u32,
    /// The device status the driver set.
    pub status: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// The queues, by index.
    pub queues: Vec<QueueSnapshot>,
    /// [`VirtioDevice::save`].
    pub device: Vec<u8>,
}

impl TransportState {
    /// The compact binary encoding (postcard), as the migration stream carries it.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a transport state always encodes")
    }

    /// Decodes [`encode`](Self::encode)'s output.
    pub fn decode(blob: &[u8]) -> Result<TransportState, String> {
        postcard::from_bytes(blob).map_err(|e| {
            format!("a virtio device's state does not decode ({e}): the stream is corrupted or comes from another vmm build")
        })
    }
}

struct State {
    device: Box<dyn VirtioDevice>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    active: bool,
    /// Paused for a migration: the device holds its queues ([`VirtioDevice::pause`]).
    paused: Option<Vec<QueueSnapshot>>,
    /// A migrated state was restored: the interrupt status to raise when it starts.
    restored_interrupt: Option<u32>,
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
                paused: None,
                restored_interrupt: None,
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

    /// Pauses the device for a migration (every request it took done, see
    /// [`VirtioDevice::pause`]) and returns its state; [`MmioTransport::resume`] undoes the
    /// pause. Pausing a paused device returns the same state. Call with the vCPUs paused:
    /// the driver must not change the registers until the resume (or ever, once migrated).
    /// Fails when an active device cannot give its queues back (its thread ended): their
    /// position is then unknown, and a destination would serve requests again.
    pub fn pause(&self) -> Result<TransportState, String> {
        let mut s = self.lock();
        if s.paused.is_none() {
            let queues = match s.device.pause() {
                Some(qs) => qs.into_iter().map(QueueSnapshot::from).collect(),
                None if s.active => {
                    return Err(format!(
                        "the virtio device (type {}) cannot pause: its thread has ended",
                        s.device.device_type()
                    ))
                }
                None => s
                    .queues
                    .iter()
                    .map(|q| QueueSnapshot::from(q.state()))
                    .collect(),
            };
            s.paused = Some(queues);
        }
        Ok(TransportState {
            device_type: s.device.device_type(),
            status: s.status,
            acked_features: s.acked_features,
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            queue_sel: s.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues: s.paused.clone().unwrap_or_default(),
            device: s.device.save(),
        })
    }

    /// Serves the queues again after [`MmioTransport::pause`] (a migration failed: the VM
    /// runs on here).
    pub fn resume(&self) {
        let mut s = self.lock();
        if s.paused.take().is_some() && s.active {
            s.device.resume();
        }
    }

    /// Takes a migration source's state into this transport of a fresh machine, before its
    /// vCPUs run: the registers, the queues where the source's device left them, the device's
    /// own state. Nothing of guest RAM is read (a postcopy destination may not have it yet):
    /// [`MmioTransport::start_restored`] starts the device once RAM can be read.
    pub fn restore(&self, st: &TransportState) -> Result<(), String> {
        let mut s = self.lock();
        let ty = s.device.device_type();
        if st.device_type != ty {
            return Err(format!(
                "the source's device in this slot is of virtio type {}, this one of type {ty}:                  the machine here was built with other devices",
                st.device_type
            ));
        }
        if st.queues.len() != s.queues.len() {
            return Err(format!(
                "the source's device has {} queues, this one {}",
                st.queues.len(),
                s.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(st.queues.len());
        for (i, (q, here)) in st.queues.iter().zip(&s.queues).enumerate() {
            if q.max_size != here.max_size() {
                return Err(format!(
                    "queue {i}: the source's holds {} entries at most, this one {}",
                    q.max_size,
                    here.max_size()
                ));
            }
            let queue = Queue::try_from(QueueState::from(*q))
                .map_err(|e| format!("queue {i}: the source's state is not a queue: {e:?}"))?;
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i}: its rings lie outside this machine's RAM"
                ));
            }
            queues.push(queue);
        }
        s.device.restore(&st.device)?;
        s.queues = queues;
        s.device_features_sel = st.device_features_sel;
        s.driver_features_sel = st.driver_features_sel;
        s.acked_features = st.acked_features;
        s.queue_sel = st.queue_sel;
        s.status = st.status;
        s.restored_interrupt = Some(st.interrupt_status);
        Ok(())
    }

    /// Starts a device [`MmioTransport::restore`] took a state into, if its driver had
    /// started it: it looks at every queue (requests made available before the source paused
    /// are taken now), and a pending interrupt status raises the line again.
    pub fn start_restored(&self) -> Result<(), String> {
        let mut s = self.lock();
        let Some(bits) = s.restored_interrupt.take() else {
            return Ok(());
        };
        let broken = STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED;
        if s.status & STATUS_DRIVER_OK != 0 && s.status & broken == 0 && !s.active {
            self.activate(&mut s);
            if !s.active {
                return Err("the migrated device cannot start here (see the warning)".into());
            }
            for e in &self.events {
                let _ = e.write(1);
            }
        }
        self.interrupt
            .restore(bits)
            .map_err(|e| format!("cannot raise the device's interrupt: {e}"))
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
        s.paused = None;
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
        fn pause(&mut self) -> Option<Vec<QueueState>> {
            None
        }
        fn resume(&mut self) {}
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
        // Not started: its queues are the transport's, a migration may take them.
        let st = t.pause().unwrap();
        assert_eq!(st.status & STATUS_DRIVER_OK, 0);
        t.resume();
        w(&t, STATUS, 0xf);
        assert_eq!(*activated.lock().unwrap(), Some(((1 << 32) | (1 << 9), 1)));
        // Started, a device that gives no queues back (the probe: as a device whose thread
        // ended) cannot pause: where it was in its rings is unknown.
        let e = t.pause().unwrap_err();
        assert!(e.contains("cannot pause"), "{e}");
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

    /// The driver's side of set-up for a mock queue, features VERSION_1 only, then
    /// DRIVER_OK.
    fn start_on(t: &MmioTransport, q: &virtio_queue::mock::MockSplitQueue<'_, GuestMemoryMmap>) {
        w(t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, DRIVER_FEATURES_SEL, 1);
        w(t, DRIVER_FEATURES, 1);
        w(
            t,
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(t, QUEUE_SEL, 0);
        w(t, QUEUE_NUM, 16);
        w(t, QUEUE_DESC_LOW, q.desc_table_addr().0 as u32);
        w(t, QUEUE_DRIVER_LOW, q.avail_addr().0 as u32);
        w(t, QUEUE_DEVICE_LOW, q.used_addr().0 as u32);
        w(t, QUEUE_READY, 1);
        w(t, STATUS, 0xf);
    }

    /// A migration of a virtio-blk device through its transport: it serves a read (the data,
    /// the status byte and the used ring recorded as written, for the migration's dirty log),
    /// pauses (a request made available then waits), and its state, through its encoding,
    /// starts a fresh transport and disk on the same guest memory, which takes the waiting
    /// request from where the source left the ring. That one pauses and resumes, serving what
    /// came meanwhile. A disk of another size, or another device type, refuses the state.
    #[test]
    fn a_paused_disk_moves_its_queue_to_a_fresh_transport_that_carries_on() {
        use crate::dirty::{DirtyBitmap, HostChanges, SlotInfo, VmmDirty};
        use crate::virtio::block::{Block, Disk, DiskConfig};
        use crate::virtio::GuestWrites;
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::Bytes;

        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let img = std::env::temp_dir().join(format!("vmm-mmio-move-{}.img", std::process::id()));
        // Sector i holds the byte i.
        let bytes: Vec<u8> = (0..16u8).flat_map(|i| [i; 512]).collect();
        std::fs::write(&img, &bytes).unwrap();
        let open = |path: &std::path::Path| {
            Disk::open(&DiskConfig {
                path: path.to_path_buf(),
                readonly: false,
                direct: false,
            })
            .unwrap()
        };
        let slots = [SlotInfo {
            slot: 0,
            gpa: 0,
            len: 1 << 20,
            host_addr: 0,
        }];
        let gate = Arc::new(HostChanges::new());
        let log = Arc::new(VmmDirty::new(&slots));
        gate.track(log.clone());
        let transport = |disk: Disk, writes: GuestWrites| {
            let dev = Block::new(disk, writes).unwrap();
            MmioTransport::new(
                Box::new(dev),
                m.clone(),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            )
            .unwrap()
        };
        let src = transport(open(&img), GuestWrites::new(gate.clone()));
        let q = MockSplitQueue::create(&m, GuestAddress(0x1_0000), 16);
        start_on(&src, &q);
        // Request n reads sector `sector` into the page at 0x40000 + n * 0x1000.
        let data = |n: u64| 0x4_0000 + n * 0x1000;
        let read = |n: u16, sector: u64| {
            let hdr = 0x3_0000 + u64::from(n) * 0x100;
            let mut h = [0u8; 16];
            h[8..].copy_from_slice(&sector.to_le_bytes());
            m.write_slice(&h, GuestAddress(hdr)).unwrap();
            // The mock stores `next` as given: the chain's own indices.
            let chain = [
                RawDescriptor::from(Descriptor::new(hdr, 16, NEXT, n * 3 + 1)),
                RawDescriptor::from(Descriptor::new(
                    data(n.into()),
                    512,
                    NEXT | WRITE,
                    n * 3 + 2,
                )),
                RawDescriptor::from(Descriptor::new(hdr + 0x80, 1, WRITE, 0)),
            ];
            q.add_desc_chains(&chain, n * 3).unwrap();
        };
        let wait_used = |n: u16| {
            let t = std::time::Instant::now();
            while q.used().idx().load() < n {
                assert!(t.elapsed().as_secs() < 10, "request {n} was not served");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        let got = |n: u64| {
            let mut b = [0u8; 512];
            m.read_slice(&mut b, GuestAddress(data(n))).unwrap();
            b
        };
        read(0, 3);
        w(&src, QUEUE_NOTIFY, 0);
        wait_used(1);
        assert_eq!(got(0), [3; 512]);
        let mut dirty = DirtyBitmap::empty(&slots);
        log.take_into(&mut dirty);
        for (what, gpa) in [
            ("the data", data(0)),
            ("the status byte", 0x3_0080),
            ("the used ring", q.used_addr().0),
        ] {
            assert!(
                dirty.is_dirty(gpa),
                "{what} at {gpa:#x} is recorded as written"
            );
        }
        assert!(!dirty.is_dirty(0x3_0000 + 0x1000), "and nothing else");

        let st = src.pause().unwrap();
        assert_eq!(st.device_type, crate::virtio::TYPE_BLOCK);
        assert_eq!(st.status, 0xf);
        assert_eq!((st.queues[0].next_avail, st.queues[0].next_used), (1, 1));
        assert_eq!(src.pause().unwrap(), st, "pausing again changes nothing");
        read(1, 5);
        w(&src, QUEUE_NOTIFY, 0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(q.used().idx().load(), 1, "a paused device serves nothing");
        let moved = TransportState::decode(&st.encode()).unwrap();
        assert_eq!(moved, st);
        assert!(TransportState::decode(&[0xff; 3]).is_err());

        let dst = transport(open(&img), GuestWrites::default());
        dst.restore(&moved).unwrap();
        assert_eq!(r(&dst, STATUS), 0xf);
        assert_eq!(r(&dst, QUEUE_READY), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            q.used().idx().load(),
            1,
            "restored, not started: RAM is not read yet"
        );
        dst.start_restored().unwrap();
        wait_used(2);
        assert_eq!(
            got(1),
            [5; 512],
            "the request made during the pause, served here"
        );
        // Paused and resumed: what came meanwhile is served after.
        dst.pause().unwrap();
        read(2, 7);
        w(&dst, QUEUE_NOTIFY, 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(q.used().idx().load(), 2);
        dst.resume();
        wait_used(3);
        assert_eq!(got(2), [7; 512]);

        // Another disk size, another device type: refused, with the reason.
        let small = img.with_extension("small");
        std::fs::write(&small, [0u8; 4096]).unwrap();
        let e = transport(open(&small), GuestWrites::default())
            .restore(&moved)
            .unwrap_err();
        assert!(e.contains("16 sectors") && e.contains("8 sectors"), "{e}");
        let (balloon, _) = crate::virtio::balloon::Balloon::new(GuestWrites::default()).unwrap();
        let other = MmioTransport::new(
            Box::new(balloon),
            m.clone(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        let e = other.restore(&moved).unwrap_err();
        assert!(e.contains("virtio type 2"), "{e}");
        drop((src, dst, other));
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(&small);
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
