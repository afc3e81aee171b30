//! The platform's hardware-reduced ACPI registers on the port bus and its power button: the
//! sleep control and status registers through which a guest powers off (S5), the reset
//! register through which it reboots, and the Generic Event Device's interrupt line that
//! carries a power-button press. The DSDT and FADT that describe them are built from the
//! constants here (`arch::x86_64::acpi`).

use std::sync::atomic::{AtomicU8, Ordering};

use log::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::PioDevice;
use crate::exit::{ExitRequest, EXIT_OK, EXIT_REBOOT};

/// SLEEP_CONTROL_REG (ACPI 6.5 §4.8.3.7), one byte.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// SLEEP_STATUS_REG (ACPI 6.5 §4.8.3.8), one byte.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// RESET_REG (ACPI 6.5 §4.8.3.6), one byte.
pub const RESET_PORT: u16 = 0x602;
/// The ports of [`AcpiPm`].
pub const ACPI_PM_PORTS: std::ops::RangeInclusive<u16> = SLEEP_CONTROL_PORT..=RESET_PORT;
/// The FADT's RESET_VALUE: writing it to [`RESET_PORT`] resets the machine.
pub const RESET_VALUE: u8 = 0x01;
/// The SLP_TYP value of the `\_S5` package: soft off.
pub const S5_SLP_TYP: u8 = 5;
/// The IOAPIC input of the Generic Event Device (ACPI0013). The MADT maps GSIs 0-23 to the one
/// IOAPIC with no overrides; 0-15 are the ISA IRQs, so the GED takes the last pin.
pub const GED_GSI: u32 = 23;
/// The GED's `_EVT` method notifies the power button with this value: "button pressed"
/// (ACPI 6.5 §4.8.3.1.1, Notify value 0x80 for a control-method power button).
pub const POWER_BUTTON_NOTIFY: u8 = 0x80;

/// Bits of the sleep registers (ACPI 6.5 §4.8.3.7, §4.8.3.8).
pub mod sleep {
    /// SLEEP_CONTROL_REG bits 4:2: SLP_TYPx.
    pub const SLP_TYP_SHIFT: u8 = 2;
    /// SLP_TYPx is three bits.
    pub const SLP_TYP_MASK: u8 = 0x7;
    /// SLEEP_CONTROL_REG bit 5: SLP_EN, enter the sleep state in SLP_TYPx.
    pub const SLP_EN: u8 = 1 << 5;
    /// SLEEP_STATUS_REG bit 7: WAK_STS, the system woke (write 1 to clear).
    pub const WAK_STS: u8 = 1 << 7;
}

/// The sleep control, sleep status and reset registers. Powering off (S5) ends the VM with
/// [`EXIT_OK`], the reset value ends it with [`EXIT_REBOOT`]; other sleep states are not
/// supported (the DSDT offers only S5): such a request wakes at once.
pub struct AcpiPm {
    exit: ExitRequest,
    status: AtomicU8,
}

impl AcpiPm {
    /// Registers whose power-off and reset end the VM through `exit`.
    pub fn new(exit: ExitRequest) -> AcpiPm {
        AcpiPm {
            exit,
            status: AtomicU8::new(0),
        }
    }

    fn sleep_control(&self, value: u8) {
        if value & sleep::SLP_EN == 0 {
            return;
        }
        let typ = (value >> sleep::SLP_TYP_SHIFT) & sleep::SLP_TYP_MASK;
        if typ == S5_SLP_TYP {
            self.exit.request(
                EXIT_OK,
                "guest powered off (ACPI S5 through the sleep control register)",
            );
        } else {
            warn!("guest asked for ACPI sleep type {typ}, which this VM does not offer; it wakes at once");
            self.status.fetch_or(sleep::WAK_STS, Ordering::SeqCst);
        }
    }
}

impl PioDevice for AcpiPm {
    fn read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        data.fill(0);
        if port == SLEEP_STATUS_PORT {
            data[0] = self.status.load(Ordering::SeqCst);
        }
    }

    fn write(&self, vcpu: usize, port: u16, data: &[u8]) {
        let value = data[0];
        match port {
            SLEEP_CONTROL_PORT => self.sleep_control(value),
            SLEEP_STATUS_PORT => {
                // Write 1 to clear.
                self.status.fetch_and(!value, Ordering::SeqCst);
            }
            RESET_PORT if value == RESET_VALUE => {
                self.exit
                    .request(EXIT_REBOOT, "guest reset through the ACPI reset register");
            }
            _ => debug!("vcpu{vcpu}: ACPI register {port:#x} write {value:#x} ignored"),
        }
    }
}

/// The power button: an edge on the GED's interrupt line (a KVM irqfd on [`GED_GSI`]: KVM
/// raises and lowers the line for each write), after which the guest's `_EVT` notifies
/// `\_SB.PWRB`.
#[derive(Debug)]
pub struct PowerButton {
    line: EventFd,
}

impl PowerButton {
    /// A button and the event fd to register with KVM as the irqfd of [`GED_GSI`].
    pub fn new() -> std::io::Result<(PowerButton, EventFd)> {
        let line = EventFd::new(EFD_NONBLOCK)?;
        let irqfd = line.try_clone()?;
        Ok((PowerButton { line }, irqfd))
    }

    /// Presses the button once.
    pub fn press(&self) -> std::io::Result<()> {
        self.line.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (AcpiPm, ExitRequest) {
        let exit = ExitRequest::new().unwrap();
        (AcpiPm::new(exit.clone()), exit)
    }

    /// What Linux's `acpi_hw_extended_sleep` writes for S5: SLP_TYP from `\_S5` in bits 4:2
    /// with SLP_EN.
    fn s5() -> u8 {
        (S5_SLP_TYP << sleep::SLP_TYP_SHIFT) | sleep::SLP_EN
    }

    #[test]
    fn s5_with_slp_en_powers_off_with_exit_zero() {
        let (d, exit) = pm();
        d.write(0, SLEEP_STATUS_PORT, &[sleep::WAK_STS]); // Linux clears WAK_STS first
        d.write(0, SLEEP_CONTROL_PORT, &[S5_SLP_TYP << sleep::SLP_TYP_SHIFT]);
        assert_eq!(exit.code(), None, "SLP_TYP without SLP_EN does nothing");
        d.write(0, SLEEP_CONTROL_PORT, &[s5()]);
        assert_eq!(exit.code(), Some(EXIT_OK));
        assert_eq!(s5(), 0x34);
    }

    #[test]
    fn another_sleep_type_wakes_at_once() {
        let (d, exit) = pm();
        d.write(
            0,
            SLEEP_CONTROL_PORT,
            &[(3 << sleep::SLP_TYP_SHIFT) | sleep::SLP_EN],
        );
        assert_eq!(exit.code(), None);
        let mut b = [0u8];
        d.read(0, SLEEP_STATUS_PORT, &mut b);
        assert_eq!(b[0] & sleep::WAK_STS, sleep::WAK_STS);
        d.write(0, SLEEP_STATUS_PORT, &[sleep::WAK_STS]);
        d.read(0, SLEEP_STATUS_PORT, &mut b);
        assert_eq!(b[0], 0, "write 1 to clear");
    }

    #[test]
    fn the_reset_value_reboots_and_others_do_nothing() {
        let (d, exit) = pm();
        d.write(0, RESET_PORT, &[RESET_VALUE + 1]);
        assert_eq!(exit.code(), None);
        d.write(0, RESET_PORT, &[RESET_VALUE]);
        assert_eq!(exit.code(), Some(EXIT_REBOOT));
    }

    #[test]
    fn a_press_is_one_irqfd_event() {
        let (b, irqfd) = PowerButton::new().unwrap();
        b.press().unwrap();
        assert_eq!(irqfd.read().unwrap(), 1);
    }
}
