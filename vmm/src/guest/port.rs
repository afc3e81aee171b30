//! The test-port device (ports 0xf4..=0xf7): decodes the guests' commands, keeps the
//! `Report`, asks the VM to stop when every vCPU has finished or one has failed, and
//! holds a vCPU thread while its guest idles or sleeps between paced writes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_tests::params::{pace_sleep, MAILBOX_ARGS};
use guest_tests::protocol::{decode_bytes, TEST_PORT};
use guest_tests::{Event, Params, Report};
use log::{debug, error, info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::PioDevice;
use crate::exit::ExitRequest;

/// Exit code the device requests when every vCPU passed.
pub const EXIT_PASS: i32 = 0;
/// Exit code the device requests when a vCPU failed.
pub const EXIT_FAIL: i32 = 1;

/// How long an IDLE write from a finished guest holds its vCPU thread.
pub const IDLE_SLEEP: Duration = Duration::from_millis(10);

/// The test port of one guest run.
pub struct TestPort {
    mem: GuestMemoryMmap,
    params_gpa: u64,
    report: Arc<Mutex<Report>>,
    exit: ExitRequest,
}

impl TestPort {
    /// A device reading mailboxes of the parameter block at `params_gpa` in `mem`,
    /// recording into `report` and stopping the VM through `exit`.
    pub fn new(
        mem: GuestMemoryMmap,
        params_gpa: u64,
        report: Arc<Mutex<Report>>,
        exit: ExitRequest,
    ) -> TestPort {
        TestPort {
            mem,
            params_gpa,
            report,
            exit,
        }
    }

    /// The guest's TSC frequency in kHz from the parameter block (0 = unknown or unreadable).
    fn tsc_khz(&self) -> u64 {
        let gpa = Params::pacing_gpa(self.params_gpa);
        self.mem
            .read_obj::<u64>(GuestAddress(gpa))
            .unwrap_or_else(|e| {
                error!("cannot read the TSC frequency in the parameter block at {gpa:#x}: {e}");
                0
            })
    }

    fn mailbox(&self, vcpu: usize) -> [u64; MAILBOX_ARGS] {
        let mut bytes = [0u8; MAILBOX_ARGS * 8];
        let gpa = Params::args_gpa(self.params_gpa, vcpu);
        if let Err(e) = self.mem.read_slice(&mut bytes, GuestAddress(gpa)) {
            error!("vcpu{vcpu}: cannot read the test mailbox at {gpa:#x}: {e}");
        }
        core::array::from_fn(|i| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()))
    }

    /// Handles one port write from `vcpu` (also the unit-test entry point).
    pub fn handle(&self, vcpu: usize, port: u16, data: &[u8]) {
        if port != TEST_PORT {
            debug!("vcpu{vcpu}: write {data:x?} to unused test port {port:#x}");
            return;
        }
        let event = decode_bytes(data, &self.mailbox(vcpu));
        if event == Event::Idle {
            // A finished guest repeats this write until the VM stops: sleep a little so
            // it costs no CPU, yet return soon enough for pause and stop commands.
            self.exit.wait_timeout(IDLE_SLEEP);
            return;
        }
        if let Event::Sleep { cycles } = event {
            // A paced guest ahead of its next write: hold this vCPU thread (it runs the
            // guest, so the CPU goes to other threads) for at most the wait and at most
            // PACE_SLEEP_MAX_MS, so a pause or stop of the VM is never held up longer.
            // A stop request ends the sleep at once; the guest re-reads its TSC either way.
            let t = pace_sleep(cycles, self.tsc_khz());
            if !t.is_zero() {
                self.exit.wait_timeout(t);
            }
            return;
        }
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        report.record(vcpu, event, Instant::now());
        match event {
            Event::Start { tsc, .. } => debug!("vcpu{vcpu}: started (tsc {tsc})"),
            Event::Progress {
                generation,
                pages,
                writes,
                ..
            } => debug!("vcpu{vcpu}: generation {generation} done ({pages} pages verified, {writes} writes)"),
            Event::Pass { pages, writes, .. } => {
                info!("vcpu{vcpu}: PASS ({pages} pages, {writes} writes)")
            }
            _ => {
                let why = report.vcpus()[vcpu.min(report.vcpus().len() - 1)]
                    .failure
                    .clone()
                    .unwrap_or_default();
                error!("vcpu{vcpu}: FAIL: {why}");
            }
        }
        if report.any_failed() {
            self.exit
                .request(EXIT_FAIL, &format!("test guest failed on vCPU {vcpu}"));
        } else if report.all_finished() {
            self.exit
                .request(EXIT_PASS, "every vCPU of the test guest passed");
        }
    }
}

impl PioDevice for TestPort {
    fn read(&self, _vcpu: usize, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, vcpu: usize, port: u16, data: &[u8]) {
        self.handle(vcpu, port, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_tests::params::PACE_SLEEP_MAX_MS;
    use guest_tests::protocol::{command_word, CMD_FAIL, CMD_PASS, CMD_SLEEP, CMD_START};

    fn setup(n: usize) -> (TestPort, GuestMemoryMmap, Arc<Mutex<Report>>, ExitRequest) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let report = Arc::new(Mutex::new(Report::new(n)));
        let exit = ExitRequest::new().unwrap();
        let port = TestPort::new(mem.clone(), 0x1000, report.clone(), exit.clone());
        (port, mem, report, exit)
    }

    fn send(port: &TestPort, mem: &GuestMemoryMmap, vcpu: usize, cmd: u32, args: [u64; 6]) {
        for (i, a) in args.iter().enumerate() {
            mem.write_obj(
                *a,
                GuestAddress(Params::args_gpa(0x1000, vcpu) + i as u64 * 8),
            )
            .unwrap();
        }
        port.handle(vcpu, TEST_PORT, &command_word(cmd).to_le_bytes());
    }

    #[test]
    fn stops_with_0_when_all_pass() {
        let (port, mem, report, exit) = setup(2);
        for v in 0..2 {
            send(&port, &mem, v, CMD_START, [v as u64, 0, 0, 0, 0, 0]);
        }
        send(&port, &mem, 0, CMD_PASS, [5, 0, 0, 0, 0, 0]);
        assert_eq!(exit.code(), None);
        send(&port, &mem, 1, CMD_PASS, [6, 0, 0, 0, 0, 0]);
        assert_eq!(exit.code(), Some(EXIT_PASS));
        assert_eq!(report.lock().unwrap().total_pages(), 11);
    }

    #[test]
    fn stops_with_1_at_the_first_failure_and_reads_the_mailbox() {
        let (port, mem, report, exit) = setup(2);
        send(&port, &mem, 1, CMD_START, [1, 0, 0, 0, 0, 0]);
        send(&port, &mem, 1, CMD_FAIL, [0x40_2008, 7, 9, 3, 0, 0]);
        assert_eq!(exit.code(), Some(EXIT_FAIL));
        let r = report.lock().unwrap();
        let why = r.vcpus()[1].failure.as_deref().unwrap();
        assert!(why.contains("0x402008"), "{why}");
    }

    #[test]
    fn sleep_holds_the_thread_for_the_wait_capped_and_records_nothing() {
        let (port, mem, report, exit) = setup(1);
        send(&port, &mem, 0, CMD_START, [0, 0, 0, 0, 0, 0]);
        // 1 GHz TSC: 3_000_000 cycles are 3 ms.
        mem.write_obj(1_000_000u64, GuestAddress(Params::pacing_gpa(0x1000)))
            .unwrap();
        let t = Instant::now();
        send(&port, &mem, 0, CMD_SLEEP, [3_000_000, 0, 0, 0, 0, 0]);
        let slept = t.elapsed();
        assert!(slept >= Duration::from_millis(3), "{slept:?}");
        // A wait of 100 s is served PACE_SLEEP_MAX_MS at a time.
        let t = Instant::now();
        send(&port, &mem, 0, CMD_SLEEP, [100_000_000_000, 0, 0, 0, 0, 0]);
        let slept = t.elapsed();
        assert!(
            slept >= Duration::from_millis(PACE_SLEEP_MAX_MS) && slept < Duration::from_secs(5),
            "{slept:?}"
        );
        assert_eq!(exit.code(), None);
        assert_eq!(report.lock().unwrap().vcpus()[0].failure, None);
        // Once the VM is stopping, a sleep returns at once.
        exit.request(EXIT_PASS, "test");
        let t = Instant::now();
        send(&port, &mem, 0, CMD_SLEEP, [100_000_000_000, 0, 0, 0, 0, 0]);
        assert!(t.elapsed() < Duration::from_millis(PACE_SLEEP_MAX_MS));
    }

    #[test]
    fn sleep_with_an_unknown_tsc_frequency_returns_at_once() {
        let (port, mem, _report, exit) = setup(1);
        let t = Instant::now();
        send(&port, &mem, 0, CMD_SLEEP, [100_000_000_000, 0, 0, 0, 0, 0]);
        assert!(t.elapsed() < Duration::from_millis(PACE_SLEEP_MAX_MS));
        assert_eq!(exit.code(), None);
    }

    #[test]
    fn byte_writes_and_other_ports_do_not_count_as_commands() {
        let (port, _mem, report, exit) = setup(1);
        port.handle(0, TEST_PORT + 1, &command_word(CMD_PASS).to_le_bytes());
        assert_eq!(exit.code(), None);
        port.handle(0, TEST_PORT, &[1]);
        assert_eq!(exit.code(), Some(EXIT_FAIL));
        assert!(!report.lock().unwrap().passed());
    }
}
