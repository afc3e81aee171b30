//! The i8042 keyboard controller with no keyboard or mouse behind it: enough for a guest to
//! find the controller (self-test, command byte read and write, port enable/disable, loop-back)
//! and to reset the machine with command 0xfe, which ends the VM with `EXIT_REBOOT`.

use std::sync::Mutex;

use log::debug;

use super::PioDevice;
use crate::exit::{ExitRequest, EXIT_REBOOT};

/// Data port.
pub const I8042_DATA: u16 = 0x60;
/// Command (write) / status (read) port.
pub const I8042_COMMAND: u16 = 0x64;
/// The keyboard's ISA interrupt (PC/AT convention), as the DSDT describes it.
pub const KBD_IRQ: u32 = 1;
/// The auxiliary (mouse) port's ISA interrupt.
pub const MOUSE_IRQ: u32 = 12;

/// Status register bits (IBM PS/2 Technical Reference, 8042 status byte; the names Linux's
/// drivers/input/serio/i8042.h gives them).
pub mod status {
    /// Output buffer full: a byte waits on the data port.
    pub const OBF: u8 = 1 << 0;
    /// Input buffer full: the controller has not taken the last write yet (never, here).
    pub const IBF: u8 = 1 << 1;
    /// System flag: the controller passed its self-test (mirrors command-byte bit 2).
    pub const SYS: u8 = 1 << 2;
    /// The last write went to the command port (1) or the data port (0).
    pub const CMD: u8 = 1 << 3;
    /// Keyboard not inhibited (the keylock switch is open).
    pub const UNLOCKED: u8 = 1 << 4;
    /// The byte in the output buffer came from the auxiliary (mouse) port.
    pub const AUXDATA: u8 = 1 << 5;
}

/// Command byte (controller configuration, "CTR" in Linux) bits.
pub mod ctr {
    /// Raise IRQ 1 when keyboard data arrives.
    pub const KBDINT: u8 = 1 << 0;
    /// Raise IRQ 12 when aux data arrives.
    pub const AUXINT: u8 = 1 << 1;
    /// System flag (copied to the status register).
    pub const SYS: u8 = 1 << 2;
    /// Keyboard interface disabled.
    pub const KBDDIS: u8 = 1 << 4;
    /// Aux interface disabled.
    pub const AUXDIS: u8 = 1 << 5;
    /// Translate keyboard scan codes to set 1.
    pub const XLATE: u8 = 1 << 6;
}

/// Controller commands written to [`I8042_COMMAND`].
pub mod cmd {
    /// Read the command byte: it appears on the data port.
    pub const READ_CTR: u8 = 0x20;
    /// Write the command byte: the next data-port byte.
    pub const WRITE_CTR: u8 = 0x60;
    /// Disable the aux interface (sets CTR AUXDIS).
    pub const AUX_DISABLE: u8 = 0xa7;
    /// Enable the aux interface (clears CTR AUXDIS).
    pub const AUX_ENABLE: u8 = 0xa8;
    /// Test the aux interface: 0x00 means no fault.
    pub const AUX_TEST: u8 = 0xa9;
    /// Controller self-test: answers [`SELF_TEST_OK`](super::SELF_TEST_OK).
    pub const SELF_TEST: u8 = 0xaa;
    /// Test the keyboard interface: 0x00 means no fault.
    pub const KBD_TEST: u8 = 0xab;
    /// Disable the keyboard interface (sets CTR KBDDIS).
    pub const KBD_DISABLE: u8 = 0xad;
    /// Enable the keyboard interface (clears CTR KBDDIS).
    pub const KBD_ENABLE: u8 = 0xae;
    /// Write the output port: the next data byte; bit 0 clear pulls the reset line.
    pub const WRITE_OUTPUT_PORT: u8 = 0xd1;
    /// Put the next data byte in the output buffer as if the keyboard had sent it.
    pub const KBD_LOOP: u8 = 0xd2;
    /// Put the next data byte in the output buffer as if the mouse had sent it.
    pub const AUX_LOOP: u8 = 0xd3;
    /// Send the next data byte to the mouse (there is none: it is dropped).
    pub const AUX_SEND: u8 = 0xd4;
    /// Pulse output line 0 (the CPU reset line) low.
    pub const PULSE_RESET: u8 = 0xfe;
}

/// The self-test answer meaning "passed".
pub const SELF_TEST_OK: u8 = 0x55;
/// An interface test's answer meaning "no fault".
const INTERFACE_OK: u8 = 0x00;
/// Output port bit 0: the CPU reset line (active low).
const OUTPUT_PORT_RESET_HIGH: u8 = 1 << 0;
/// Command byte a firmware leaves behind: keyboard interrupt on, system flag set, scan-code
/// translation on, aux port disabled.
const CTR_AT_BOOT: u8 = ctr::KBDINT | ctr::SYS | ctr::XLATE | ctr::AUXDIS;

/// The controller's registers: what a migration would carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(target_arch = "x86_64", derive(serde::Serialize, serde::Deserialize))]
pub struct I8042State {
    /// The command byte.
    pub ctr: u8,
    /// The byte in the output buffer, if full, and whether it came from the aux port.
    pub output: Option<(u8, bool)>,
    /// The last byte read from the data port (read again when the buffer is empty).
    pub last_read: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
    /// Whether the last write went to the command port.
    pub last_write_command: bool,
}

impl Default for I8042State {
    fn default() -> Self {
        I8042State {
            ctr: CTR_AT_BOOT,
            output: None,
            last_read: 0,
            pending: None,
            last_write_command: false,
        }
    }
}

impl I8042State {
    /// The status register.
    pub fn status(&self) -> u8 {
        let mut s = status::UNLOCKED | (self.ctr & ctr::SYS);
        if let Some((_, aux)) = self.output {
            s |= status::OBF;
            if aux {
                s |= status::AUXDATA;
            }
        }
        if self.last_write_command {
            s |= status::CMD;
        }
        s
    }

    fn put(&mut self, byte: u8, aux: bool) {
        self.output = Some((byte, aux));
    }

    fn read_data(&mut self) -> u8 {
        if let Some((b, _)) = self.output.take() {
            self.last_read = b;
        }
        self.last_read
    }

    /// A command-port write; returns true if it pulls the reset line.
    fn command(&mut self, c: u8) -> bool {
        self.last_write_command = true;
        self.pending = None;
        match c {
            cmd::READ_CTR => self.put(self.ctr, false),
            cmd::WRITE_CTR
            | cmd::WRITE_OUTPUT_PORT
            | cmd::KBD_LOOP
            | cmd::AUX_LOOP
            | cmd::AUX_SEND => self.pending = Some(c),
            cmd::AUX_DISABLE => self.ctr |= ctr::AUXDIS,
            cmd::AUX_ENABLE => self.ctr &= !ctr::AUXDIS,
            cmd::AUX_TEST | cmd::KBD_TEST => self.put(INTERFACE_OK, false),
            cmd::SELF_TEST => {
                self.ctr |= ctr::SYS;
                self.put(SELF_TEST_OK, false);
            }
            cmd::KBD_DISABLE => self.ctr |= ctr::KBDDIS,
            cmd::KBD_ENABLE => self.ctr &= !ctr::KBDDIS,
            // 0xf0..=0xff pulse the output lines whose bits are clear; bit 0 is reset.
            0xf0..=0xff if c & OUTPUT_PORT_RESET_HIGH == 0 => return true,
            0xf0..=0xff => {}
            other => debug!("i8042: command {other:#04x} not modelled, ignored"),
        }
        false
    }

    /// A data-port write; returns true if it pulls the reset line.
    fn data(&mut self, b: u8) -> bool {
        self.last_write_command = false;
        match self.pending.take() {
            Some(cmd::WRITE_CTR) => self.ctr = b,
            Some(cmd::WRITE_OUTPUT_PORT) => return b & OUTPUT_PORT_RESET_HIGH == 0,
            Some(cmd::KBD_LOOP) => self.put(b, false),
            Some(cmd::AUX_LOOP) => self.put(b, true),
            Some(_) => debug!("i8042: byte {b:#04x} for the mouse dropped: no mouse"),
            None => debug!("i8042: byte {b:#04x} for the keyboard dropped: no keyboard"),
        }
        false
    }
}

/// The i8042 on ports 0x60 and 0x64.
#[derive(Debug)]
pub struct I8042 {
    state: Mutex<I8042State>,
    exit: ExitRequest,
}

impl I8042 {
    /// A controller as firmware leaves it, whose reset ends the VM through `exit`.
    pub fn new(exit: ExitRequest) -> I8042 {
        I8042::from_state(exit, I8042State::default())
    }

    /// A controller with saved registers.
    pub fn from_state(exit: ExitRequest, state: I8042State) -> I8042 {
        I8042 {
            state: Mutex::new(state),
            exit,
        }
    }

    /// Its registers now.
    pub fn state(&self) -> I8042State {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, I8042State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reset(&self) {
        self.exit
            .request(EXIT_REBOOT, "guest reset through the i8042 controller");
    }
}

impl PioDevice for I8042 {
    fn read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        data.fill(0);
        let mut st = self.lock();
        data[0] = match port {
            I8042_DATA => st.read_data(),
            I8042_COMMAND => st.status(),
            _ => 0xff,
        };
    }

    fn write(&self, _vcpu: usize, port: u16, data: &[u8]) {
        let reset = {
            let mut st = self.lock();
            match port {
                I8042_DATA => st.data(data[0]),
                I8042_COMMAND => st.command(data[0]),
                _ => false,
            }
        };
        if reset {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, ExitRequest) {
        let exit = ExitRequest::new().unwrap();
        (I8042::new(exit.clone()), exit)
    }

    fn inb(d: &I8042, port: u16) -> u8 {
        let mut b = [0u8];
        d.read(0, port, &mut b);
        b[0]
    }

    fn outb(d: &I8042, port: u16, v: u8) {
        d.write(0, port, &[v]);
    }

    /// Linux's `i8042_flush`: read data while the status says OBF; how many were read.
    fn flush(d: &I8042) -> usize {
        let mut n = 0;
        while inb(d, I8042_COMMAND) & status::OBF != 0 {
            inb(d, I8042_DATA);
            n += 1;
            assert!(n < 16, "the buffer never empties");
        }
        n
    }

    /// Linux's `__i8042_command`: the low byte is the command, bits 15:12 the bytes written
    /// after it, bits 11:8 the bytes read back; each write waits for IBF clear and each read
    /// for OBF set (a bounded wait, as Linux's timeout). Err: a wait timed out.
    fn command(d: &I8042, command: u16, param: &mut [u8]) -> Result<(), &'static str> {
        let wait_write = || {
            (0..100)
                .any(|_| inb(d, I8042_COMMAND) & status::IBF == 0)
                .then_some(())
                .ok_or("IBF stuck")
        };
        wait_write()?;
        outb(d, I8042_COMMAND, command as u8);
        let writes = usize::from((command >> 12) & 0xf);
        let reads = usize::from((command >> 8) & 0xf);
        for p in &param[..writes] {
            wait_write()?;
            outb(d, I8042_DATA, *p);
        }
        for p in &mut param[..reads] {
            if !(0..100).any(|_| inb(d, I8042_COMMAND) & status::OBF != 0) {
                return Err("no reply");
            }
            if command == 0x11d3 && inb(d, I8042_COMMAND) & status::AUXDATA == 0 {
                return Err("loop-back reply not marked as aux data");
            }
            *p = inb(d, I8042_DATA);
        }
        Ok(())
    }

    // Linux's encodings (drivers/input/serio/i8042.h).
    const I8042_CMD_CTL_RCTR: u16 = 0x0120;
    const I8042_CMD_CTL_WCTR: u16 = 0x1060;
    const I8042_CMD_CTL_TEST: u16 = 0x01aa;
    const I8042_CMD_AUX_DISABLE: u16 = 0x00a7;
    const I8042_CMD_AUX_ENABLE: u16 = 0x00a8;
    const I8042_CMD_AUX_TEST: u16 = 0x01a9;
    const I8042_CMD_AUX_LOOP: u16 = 0x11d3;
    const I8042_CMD_KBD_DISABLE: u16 = 0x00ad;
    const I8042_CMD_KBD_ENABLE: u16 = 0x00ae;
    const I8042_CMD_KBD_TEST: u16 = 0x01ab;

    #[test]
    fn status_at_boot_is_empty_with_system_flag() {
        let (d, _) = dev();
        let s = inb(&d, I8042_COMMAND);
        assert_eq!(s & (status::OBF | status::IBF), 0);
        assert_eq!(s & status::SYS, status::SYS);
    }

    /// The sequence of `i8042_controller_check`, `i8042_controller_selftest` and
    /// `i8042_controller_init`: flush, self-test, read the CTR twice until equal, write it
    /// back changed, read it again, flush.
    #[test]
    fn linux_probe_sequence_succeeds() {
        let (d, exit) = dev();
        assert_eq!(flush(&d), 0, "controller check: nothing to flush");

        let mut p = [0u8];
        command(&d, I8042_CMD_CTL_TEST, &mut p).unwrap();
        assert_eq!(p[0], SELF_TEST_OK);
        assert_eq!(inb(&d, I8042_COMMAND) & status::SYS, status::SYS);

        let mut a = [0u8];
        let mut b = [0u8];
        command(&d, I8042_CMD_CTL_RCTR, &mut a).expect("Can't read CTR");
        command(&d, I8042_CMD_CTL_RCTR, &mut b).expect("Can't read CTR");
        assert_eq!(a, b, "two reads agree");
        assert_eq!(a[0], CTR_AT_BOOT);

        let mut new = [(a[0] & !ctr::KBDDIS) | ctr::KBDINT | ctr::AUXINT];
        command(&d, I8042_CMD_CTL_WCTR, &mut new).expect("Can't write CTR");
        assert_eq!(
            inb(&d, I8042_COMMAND) & status::CMD,
            0,
            "the CTR byte went to the data port"
        );
        let mut back = [0u8];
        command(&d, I8042_CMD_CTL_RCTR, &mut back).unwrap();
        assert_eq!(back, new);
        assert_eq!(flush(&d), 0);
        assert_eq!(exit.code(), None, "no reset on the way");
    }

    /// `i8042_check_aux` and the port enable/disable checks of `i8042_controller_init`.
    #[test]
    fn aux_and_keyboard_ports_toggle_their_ctr_bits() {
        let (d, _) = dev();
        let mut p = [0x5a];
        command(&d, I8042_CMD_AUX_LOOP, &mut p).unwrap();
        assert_eq!(p[0], 0x5a, "loop-back returns the byte as aux data");

        let rctr = |d: &I8042| {
            let mut c = [0u8];
            command(d, I8042_CMD_CTL_RCTR, &mut c).unwrap();
            c[0]
        };
        command(&d, I8042_CMD_AUX_DISABLE, &mut []).unwrap();
        assert_eq!(rctr(&d) & ctr::AUXDIS, ctr::AUXDIS);
        command(&d, I8042_CMD_AUX_ENABLE, &mut []).unwrap();
        assert_eq!(rctr(&d) & ctr::AUXDIS, 0);
        let mut t = [0xffu8];
        command(&d, I8042_CMD_AUX_TEST, &mut t).unwrap();
        assert_eq!(t[0], INTERFACE_OK);

        command(&d, I8042_CMD_KBD_DISABLE, &mut []).unwrap();
        assert_eq!(rctr(&d) & ctr::KBDDIS, ctr::KBDDIS);
        command(&d, I8042_CMD_KBD_ENABLE, &mut []).unwrap();
        assert_eq!(rctr(&d) & ctr::KBDDIS, 0);
        let mut t = [0xffu8];
        command(&d, I8042_CMD_KBD_TEST, &mut t).unwrap();
        assert_eq!(t[0], INTERFACE_OK);
    }

    #[test]
    fn status_bits_follow_the_output_buffer_and_last_write() {
        let (d, _) = dev();
        outb(&d, I8042_COMMAND, cmd::SELF_TEST);
        let s = inb(&d, I8042_COMMAND);
        assert_eq!(s & (status::OBF | status::CMD), status::OBF | status::CMD);
        assert_eq!(s & status::AUXDATA, 0);
        assert_eq!(flush(&d), 1, "the unread self-test answer is flushed");
        assert_eq!(inb(&d, I8042_COMMAND) & status::OBF, 0);
        assert_eq!(
            inb(&d, I8042_DATA),
            SELF_TEST_OK,
            "an empty buffer reads the last byte"
        );

        outb(&d, I8042_COMMAND, cmd::AUX_LOOP);
        outb(&d, I8042_DATA, 0x33);
        let s = inb(&d, I8042_COMMAND);
        assert_eq!(
            s & (status::OBF | status::AUXDATA | status::CMD),
            status::OBF | status::AUXDATA
        );
        assert_eq!(inb(&d, I8042_DATA), 0x33);
        assert_eq!(inb(&d, I8042_COMMAND) & (status::OBF | status::AUXDATA), 0);

        // The system flag follows the command byte.
        outb(&d, I8042_COMMAND, cmd::WRITE_CTR);
        outb(&d, I8042_DATA, 0);
        assert_eq!(inb(&d, I8042_COMMAND) & status::SYS, 0);
    }

    #[test]
    fn keyboard_bytes_without_a_keyboard_are_dropped() {
        let (d, exit) = dev();
        outb(&d, I8042_DATA, 0xf2); // "identify" for a keyboard that is not there
        assert_eq!(inb(&d, I8042_COMMAND) & status::OBF, 0);
        assert_eq!(d.state().ctr, CTR_AT_BOOT);
        assert_eq!(exit.code(), None);
    }

    #[test]
    fn reset_command_requests_the_reboot_exit() {
        let (d, exit) = dev();
        outb(&d, I8042_COMMAND, cmd::SELF_TEST);
        outb(&d, I8042_COMMAND, 0xff); // pulses no line
        assert_eq!(exit.code(), None);
        outb(&d, I8042_COMMAND, cmd::PULSE_RESET);
        assert_eq!(exit.code(), Some(EXIT_REBOOT));
    }

    #[test]
    fn output_port_write_with_reset_bit_clear_resets() {
        let (d, exit) = dev();
        outb(&d, I8042_COMMAND, cmd::WRITE_OUTPUT_PORT);
        outb(&d, I8042_DATA, OUTPUT_PORT_RESET_HIGH);
        assert_eq!(exit.code(), None);
        outb(&d, I8042_COMMAND, cmd::WRITE_OUTPUT_PORT);
        outb(&d, I8042_DATA, 0);
        assert_eq!(exit.code(), Some(EXIT_REBOOT));
    }

    #[test]
    fn state_carries_over_to_a_new_controller() {
        let (d, _) = dev();
        outb(&d, I8042_COMMAND, cmd::WRITE_CTR);
        outb(&d, I8042_DATA, 0x47);
        outb(&d, I8042_COMMAND, cmd::AUX_LOOP);
        outb(&d, I8042_DATA, 0x99);
        outb(&d, I8042_COMMAND, cmd::WRITE_CTR); // pending at save time
        let saved = d.state();
        let (other, _) = dev();
        let e = other.exit.clone();
        let copy = I8042::from_state(e, saved);
        assert_eq!(inb(&copy, I8042_COMMAND), inb(&d, I8042_COMMAND));
        outb(&copy, I8042_DATA, 0x07);
        assert_eq!(
            copy.state().ctr,
            0x07,
            "the pending WRITE_CTR took the byte"
        );
        assert_eq!(copy.state().output, Some((0x99, true)));
    }
}
