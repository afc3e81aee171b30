//! The 16550A UART at COM1 (0x3f8, IRQ 4) over vm-superio: guest output to stdout or a file,
//! host input queued into the receive FIFO, interrupts through a KVM irqfd.

use std::io::Write;
use std::sync::Mutex;

use log::warn;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::PioDevice;

/// First port of COM1 (PC/AT convention).
pub const COM1_BASE: u16 = 0x3f8;
/// Last port of COM1 (eight registers).
pub const COM1_LAST: u16 = COM1_BASE + 7;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// An interrupt line as an event fd (registered with KVM as an irqfd).
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Receive FIFO bytes vm-superio's `Serial` holds at most (its `FIFO_SIZE`, not exported).
pub const FIFO_BYTES: usize = 0x40;

/// Where guest serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// COM1 on the port bus.
pub struct SerialDevice {
    uart: Mutex<Serial<IrqLine, vm_superio::serial::NoEvents, SerialOut>>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART writing to `out`, raising `irq` (an event fd) for interrupts.
    pub fn new(irq: EventFd, out: SerialOut) -> SerialDevice {
        SerialDevice {
            uart: Mutex::new(Serial::new(IrqLine(irq), out)),
        }
    }

    /// A UART with a fresh interrupt event fd; returns the device and a clone of the fd to
    /// register with KVM.
    pub fn with_new_irq(out: SerialOut) -> std::io::Result<(SerialDevice, EventFd)> {
        let evt = EventFd::new(EFD_NONBLOCK)?;
        let clone = evt.try_clone()?;
        Ok((SerialDevice::new(evt, out), clone))
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        match uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                warn!("serial input dropped: {e}");
                0
            }
        }
    }

    /// Room in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fifo_capacity()
    }
}

impl SerialDevice {
    /// The UART's registers and receive FIFO, for migration.
    pub fn state(&self) -> SerialState {
        self.uart.lock().unwrap_or_else(|p| p.into_inner()).state()
    }

    /// Replaces the UART's registers and receive FIFO with `st`, keeping its output and
    /// interrupt line. A restored pending interrupt is raised again.
    pub fn restore(&self, st: &SerialState) -> Result<(), String> {
        if st.in_buffer.len() > FIFO_BYTES {
            return Err(format!(
                "serial state holds {} input bytes, more than the FIFO's {FIFO_BYTES}: the \
                 migration stream is corrupted",
                st.in_buffer.len()
            ));
        }
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        let irq = || {
            uart_irq(&uart).map_err(|e| format!("cannot duplicate the serial interrupt fd: {e}"))
        };
        let (keep, spare) = (irq()?, irq()?);
        let old = std::mem::replace(&mut *uart, Serial::new(spare, Box::new(std::io::sink())));
        let out = old.into_writer();
        *uart = Serial::from_state(st, keep, NoEvents, out)
            .map_err(|e| format!("restoring the serial state: {e:?}"))?;
        Ok(())
    }
}

fn uart_irq(uart: &Serial<IrqLine, NoEvents, SerialOut>) -> std::io::Result<IrqLine> {
    uart.interrupt_evt().0.try_clone().map(IrqLine)
}

impl PioDevice for SerialDevice {
    fn read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        let v = uart.read((port - COM1_BASE) as u8);
        data.fill(0);
        data[0] = v;
    }

    fn write(&self, _vcpu: usize, port: u16, data: &[u8]) {
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = uart.write((port - COM1_BASE) as u8, data[0]) {
            warn!("serial write: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_goes_to_output_and_input_reaches_rbr() {
        let out = Shared::default();
        let (dev, irq) = SerialDevice::with_new_irq(Box::new(out.clone())).unwrap();
        for b in b"hi" {
            dev.write(0, COM1_BASE, &[*b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi");
        // Enable the "received data available" interrupt (IER bit 0), then feed input.
        dev.write(0, COM1_BASE + 1, &[1]);
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert_eq!(irq.read().unwrap(), 1, "input raised IRQ 4");
        let mut d = [0u8];
        dev.read(0, COM1_BASE, &mut d);
        assert_eq!(d, [b'x']);
    }

    #[test]
    fn state_round_trips_into_another_uart() {
        /// LCR (offset 3) value 0x03: 8 data bits; scratch register at offset 7.
        const LCR: u16 = COM1_BASE + 3;
        const SCR: u16 = COM1_BASE + 7;
        const IER: u16 = COM1_BASE + 1;
        let (a, _) = SerialDevice::with_new_irq(Box::new(std::io::sink())).unwrap();
        a.write(0, LCR, &[0x03]);
        a.write(0, SCR, &[0x5a]);
        a.write(0, IER, &[0x01]);
        assert_eq!(a.enqueue_input(b"xyz"), 3);
        let st = a.state();
        let out = Shared::default();
        let (b, _) = SerialDevice::with_new_irq(Box::new(out.clone())).unwrap();
        assert_ne!(b.state(), st);
        b.restore(&st).unwrap();
        assert_eq!(b.state(), st);
        let mut d = [0u8];
        b.read(0, SCR, &mut d);
        assert_eq!(d[0], 0x5a);
        b.read(0, COM1_BASE, &mut d);
        assert_eq!(d[0], b'x', "the receive FIFO moved");
        b.write(0, COM1_BASE, b"!");
        assert_eq!(
            *out.0.lock().unwrap(),
            b"!",
            "output still goes to the kept writer"
        );
        let mut big = st.clone();
        big.in_buffer = vec![0; FIFO_BYTES + 1];
        assert!(b.restore(&big).unwrap_err().contains("FIFO"));
    }
}
