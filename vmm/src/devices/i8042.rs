//! The i8042 keyboard controller, only as far as a guest uses it to reset the machine: writing
//! 0xfe (pulse reset line) to the command port 0x64 ends the VM with exit code 0.

use std::sync::Mutex;

use vm_superio::{I8042Device, Trigger};

use super::PioDevice;
use crate::vcpu::{ExitRequest, EXIT_OK};

/// Data port.
pub const I8042_DATA: u16 = 0x60;
/// Command/status port.
pub const I8042_COMMAND: u16 = 0x64;

/// Turns the controller's reset line into a VM exit request.
#[derive(Debug)]
pub struct ResetLine(pub ExitRequest);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0
            .request(EXIT_OK, "guest reset through the i8042 controller");
        Ok(())
    }
}

/// The i8042 on ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042 {
    dev: Mutex<I8042Device<ResetLine>>,
}

impl I8042 {
    /// A controller whose reset ends the VM through `exit`.
    pub fn new(exit: ExitRequest) -> I8042 {
        I8042 {
            dev: Mutex::new(I8042Device::new(ResetLine(exit))),
        }
    }
}

impl PioDevice for I8042 {
    fn read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        data.fill(0);
        data[0] = self
            .dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read((port - I8042_DATA) as u8);
    }

    fn write(&self, _vcpu: usize, port: u16, data: &[u8]) {
        // The trigger cannot fail.
        let _ = self
            .dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write((port - I8042_DATA) as u8, data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_exit_zero() {
        let exit = ExitRequest::new().unwrap();
        let dev = I8042::new(exit.clone());
        dev.write(0, I8042_COMMAND, &[0xaa]);
        assert_eq!(exit.code(), None);
        dev.write(0, I8042_COMMAND, &[0xfe]);
        assert_eq!(exit.code(), Some(0));
    }
}
