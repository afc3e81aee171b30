//! Port-I/O devices and the bus that routes `in`/`out` exits to them by port range.

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

/// Registration error: the new range overlaps one already on the bus.
#[derive(Debug, thiserror::Error)]
#[error("port range {new:#x?} overlaps {old:#x?} already on the I/O bus")]
pub struct PioOverlap {
    /// The range being added.
    pub new: RangeInclusive<u16>,
    /// The range it collides with.
    pub old: RangeInclusive<u16>,
}

/// Routes port I/O to devices; unknown ports read as all ones and ignore writes.
#[derive(Default, Clone)]
pub struct PioBus {
    // Sorted by range start, non-overlapping.
    devices: Vec<(RangeInclusive<u16>, Arc<dyn PioDevice>)>,
}

impl fmt::Debug for PioBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(r, _)| r))
            .finish()
    }
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> PioBus {
        PioBus::default()
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

    #[test]
    fn routes_by_range_and_defaults_unknown_ports() {
        let mut bus = PioBus::new();
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
        let mut bus = PioBus::new();
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
