//! Devices and the bus that routes a vCPU's `in`/`out` exits to them by port range and its
//! MMIO exits by guest-physical address range (the virtio-mmio windows, [`crate::virtio`]).

pub mod acpi;
pub mod i8042;
pub mod serial;

use std::fmt;
use std::ops::RangeInclusive;
use std::sync::Arc;

use log::debug;

/// A device on the port-I/O bus. Called from vCPU threads, possibly several at once.
pub trait PioDevice: Send + Sync {
    /// Guest `in` from `port` (inside the registered range): fill `data` (1, 2 or 4 bytes).
    fn read(&self, vcpu: usize, port: u16, data: &mut [u8]);
    /// Guest `out` of `data` to `port`.
    fn write(&self, vcpu: usize, port: u16, data: &[u8]);
}

/// A device in a window of guest-physical addresses: its MMIO exits. Called from vCPU threads,
/// possibly several at once.
pub trait MmioDevice: Send + Sync {
    /// A read of `data.len()` bytes at `offset` into the device's window.
    fn read(&self, vcpu: usize, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the device's window.
    fn write(&self, vcpu: usize, offset: u64, data: &[u8]);
}

/// Registration error: the new window overlaps one already on the bus.
#[derive(Debug, thiserror::Error)]
#[error("MMIO window {new:#x?} overlaps {old:#x?} already on the bus")]
pub struct MmioOverlap {
    /// The window being added.
    pub new: std::ops::Range<u64>,
    /// The window it collides with.
    pub old: std::ops::Range<u64>,
}

/// Registration error: the new range overlaps one already on the bus.
#[derive(Debug, thiserror::Error)]
#[error("port range {new:#x?} overlaps {old:#x?} already on the I/O bus")]
pub struct PioOverlap {
    /// The range being added.
    pub new: RangeInclusive<u16>,
    /// The range it collides with.
    pub old: RangeInclusive<u16>,
}

/// Routes port I/O and MMIO to devices; unknown ports and addresses read as all ones and
/// ignore writes.
#[derive(Default, Clone)]
pub struct IoBus {
    // Sorted by range start, non-overlapping.
    devices: Vec<(RangeInclusive<u16>, Arc<dyn PioDevice>)>,
    // Sorted by window start, non-overlapping.
    mmio: Vec<(std::ops::Range<u64>, Arc<dyn MmioDevice>)>,
}

impl fmt::Debug for IoBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(r, _)| r))
            .finish()
    }
}

impl IoBus {
    /// An empty bus.
    pub fn new() -> IoBus {
        IoBus::default()
    }

    /// Puts `device` on the ports `range`.
    pub fn register(
        &mut self,
        range: RangeInclusive<u16>,
        device: Arc<dyn PioDevice>,
    ) -> Result<(), PioOverlap> {
        if let Some((old, _)) = self
            .devices
            .iter()
            .find(|(r, _)| r.start() <= range.end() && range.start() <= r.end())
        {
            return Err(PioOverlap {
                new: range,
                old: old.clone(),
            });
        }
        let at = self
            .devices
            .partition_point(|(r, _)| r.start() < range.start());
        self.devices.insert(at, (range, device));
        Ok(())
    }

    /// Puts `device` on the guest-physical window `window`.
    pub fn register_mmio(
        &mut self,
        window: std::ops::Range<u64>,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), MmioOverlap> {
        if let Some((old, _)) = self
            .mmio
            .iter()
            .find(|(r, _)| r.start < window.end && window.start < r.end)
        {
            return Err(MmioOverlap {
                new: window,
                old: old.clone(),
            });
        }
        let at = self.mmio.partition_point(|(r, _)| r.start < window.start);
        self.mmio.insert(at, (window, device));
        Ok(())
    }

    /// The device whose window holds all of `[addr, addr+len)`, and the offset of `addr` in it.
    fn find_mmio(&self, addr: u64, len: usize) -> Option<(&Arc<dyn MmioDevice>, u64)> {
        let i = self.mmio.partition_point(|(r, _)| r.start <= addr);
        let (window, dev) = self.mmio.get(i.checked_sub(1)?)?;
        let end = addr.checked_add(len as u64)?;
        (window.contains(&addr) && end <= window.end).then_some((dev, addr - window.start))
    }

    /// Dispatches an MMIO read: returns false (and fills 0xff) when no device owns `addr`.
    pub fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> bool {
        match self.find_mmio(addr, data.len()) {
            Some((dev, offset)) => {
                dev.read(vcpu, offset, data);
                true
            }
            None => {
                debug!(
                    "vcpu{vcpu}: MMIO read of {} bytes at {addr:#x}: no device, all ones",
                    data.len()
                );
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches an MMIO write: returns false when no device owns `addr` (it is dropped).
    pub fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) -> bool {
        match self.find_mmio(addr, data.len()) {
            Some((dev, offset)) => {
                dev.write(vcpu, offset, data);
                true
            }
            None => {
                debug!("vcpu{vcpu}: MMIO write {data:x?} at {addr:#x}: no device, ignored");
                false
            }
        }
    }

    fn find(&self, port: u16) -> Option<&Arc<dyn PioDevice>> {
        let i = self.devices.partition_point(|(r, _)| *r.start() <= port);
        let (range, dev) = self.devices.get(i.checked_sub(1)?)?;
        range.contains(&port).then_some(dev)
    }

    /// Dispatches an `in`: returns false (and fills 0xff) when no device owns `port`.
    pub fn read(&self, vcpu: usize, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some(dev) => {
                dev.read(vcpu, port, data);
                true
            }
            None => {
                debug!("vcpu{vcpu}: in from unclaimed port {port:#x}");
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches an `out`: returns false when no device owns `port` (the write is dropped).
    pub fn write(&self, vcpu: usize, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some(dev) => {
                dev.write(vcpu, port, data);
                true
            }
            None => {
                debug!("vcpu{vcpu}: out {data:x?} to unclaimed port {port:#x}");
                false
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records writes and answers reads with the low byte of the port.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) writes: Mutex<Vec<(usize, u16, Vec<u8>)>>,
    }

    impl PioDevice for Recorder {
        fn read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
            data.fill(port as u8);
        }
        fn write(&self, vcpu: usize, port: u16, data: &[u8]) {
            self.writes
                .lock()
                .unwrap()
                .push((vcpu, port, data.to_vec()));
        }
    }

    /// Records writes (offset, bytes) and answers reads with the low byte of the offset.
    #[derive(Default)]
    struct Window {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl MmioDevice for Window {
        fn read(&self, _vcpu: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, _vcpu: usize, offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn mmio_routes_by_window_with_offsets_and_refuses_overlaps_and_straddles() {
        let mut bus = IoBus::new();
        let a = Arc::new(Window::default());
        let b = Arc::new(Window::default());
        bus.register_mmio(0xd000_1000..0xd000_2000, b.clone())
            .unwrap();
        bus.register_mmio(0xd000_0000..0xd000_1000, a.clone())
            .unwrap();
        let e = bus
            .register_mmio(0xd000_0800..0xd000_1800, Arc::new(Window::default()))
            .unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        let mut d = [0u8; 4];
        assert!(bus.mmio_read(0, 0xd000_1070, &mut d));
        assert_eq!(d, [0x70; 4]);
        assert!(bus.mmio_write(1, 0xd000_0050, &[1, 0, 0, 0]));
        assert_eq!(*a.writes.lock().unwrap(), vec![(0x50, vec![1, 0, 0, 0])]);
        assert!(b.writes.lock().unwrap().is_empty());
        // Outside every window, and across the end of one: all ones, writes dropped.
        for addr in [0xcfff_fffc, 0xd000_2000, 0xd000_1ffe] {
            let mut d = [0u8; 4];
            assert!(!bus.mmio_read(0, addr, &mut d), "{addr:#x}");
            assert_eq!(d, [0xff; 4]);
            assert!(!bus.mmio_write(0, addr, &[1, 2, 3, 4]), "{addr:#x}");
        }
        assert!(!bus.mmio_read(0, u64::MAX - 1, &mut [0u8; 4]));
    }

    #[test]
    fn routes_by_range_and_defaults_unknown_ports() {
        let mut bus = IoBus::new();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        bus.register(0x3f8..=0x3ff, a.clone()).unwrap();
        bus.register(0x60..=0x64, b.clone()).unwrap();
        assert!(bus.write(1, 0x3f9, &[7]));
        assert!(bus.write(0, 0x64, &[0xfe]));
        assert!(!bus.write(0, 0x65, &[1]));
        let mut d = [0u8; 2];
        assert!(bus.read(0, 0x3fa, &mut d));
        assert_eq!(d, [0xfa, 0xfa]);
        assert!(!bus.read(0, 0x400, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(*a.writes.lock().unwrap(), vec![(1, 0x3f9, vec![7])]);
        assert_eq!(*b.writes.lock().unwrap(), vec![(0, 0x64, vec![0xfe])]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = IoBus::new();
        bus.register(0x10..=0x1f, Arc::new(Recorder::default()))
            .unwrap();
        assert!(bus
            .register(0x1f..=0x20, Arc::new(Recorder::default()))
            .is_err());
        assert!(bus
            .register(0x0..=0x10, Arc::new(Recorder::default()))
            .is_err());
        bus.register(0x20..=0x20, Arc::new(Recorder::default()))
            .unwrap();
    }
}
