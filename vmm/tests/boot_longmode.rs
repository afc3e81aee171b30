//! Real-KVM tests of the vCPU machinery: 64-bit entry through `long_mode::setup`, port I/O
//! routing, pause / resume / stop of running vCPUs, and the i8042 reset ending the VM with 0.

mod common;

use common::vm::long_mode_vcpu;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::{i8042::I8042, IoBus, PioDevice};
use vmm::exit::ExitRequest;
use vmm::hypervisor::Vm;
use vmm::memory::{BackingKind, GuestRam};
use vmm::vcpu::VmControl;

const CODE_GPA: u64 = 0x10_0000;
const TEST_PORT: u16 = 0x510;

/// Counts `out`s per vCPU and remembers the last byte.
#[derive(Default)]
struct Counter {
    per_vcpu: [AtomicU64; 4],
    last: Mutex<Vec<(usize, u8)>>,
}

impl PioDevice for Counter {
    fn read(&self, _vcpu: usize, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, vcpu: usize, _port: u16, data: &[u8]) {
        self.per_vcpu[vcpu].fetch_add(1, Ordering::SeqCst);
        let mut l = self.last.lock().unwrap();
        if l.len() < 16 {
            l.push((vcpu, data[0]));
        }
    }
}

fn total(c: &Counter) -> u64 {
    c.per_vcpu.iter().map(|a| a.load(Ordering::SeqCst)).sum()
}

fn start_vm(code: &[u8], cpus: u8, bus: IoBus, exit: ExitRequest) -> (GuestRam, Vm, VmControl) {
    let ram = GuestRam::new(64 << 20, BackingKind::Small).unwrap();
    ram.memory()
        .write_slice(code, GuestAddress(CODE_GPA))
        .unwrap();
    let vm = Vm::new(&ram, cpus).unwrap();
    let fds = (0..cpus)
        .map(|id| long_mode_vcpu(&vm, ram.memory(), ram.size(), id, CODE_GPA, 0))
        .collect();
    let ctl = VmControl::start(fds, Arc::new(bus), ram.memory().clone(), exit).unwrap();
    (ram, vm, ctl)
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn vcpus_run_in_long_mode_and_pause_resume_stop() {
    if !common::kvm_or_skip("vcpus_run_in_long_mode_and_pause_resume_stop") {
        return;
    }
    // mov dx, TEST_PORT; mov eax, edi; loop: out dx, al; pause; jmp loop
    let port = TEST_PORT.to_le_bytes();
    let code = [
        0x66, 0xba, port[0], port[1], 0x89, 0xf8, 0xee, 0xf3, 0x90, 0xeb, 0xfb,
    ];
    let counter = Arc::new(Counter::default());
    let mut bus = IoBus::new();
    bus.register(TEST_PORT..=TEST_PORT, counter.clone())
        .unwrap();
    let exit = ExitRequest::new().unwrap();
    let (_ram, _vm, mut ctl) = start_vm(&code, 2, bus, exit.clone());

    assert!(
        wait_until(Duration::from_secs(20), || counter.per_vcpu[0]
            .load(Ordering::SeqCst)
            > 10
            && counter.per_vcpu[1].load(Ordering::SeqCst) > 10),
        "both vCPUs write their id to the test port"
    );
    for (vcpu, byte) in counter.last.lock().unwrap().iter() {
        assert_eq!(*vcpu as u8, *byte, "RDI carried the vCPU id");
    }
    ctl.pause_all().unwrap();
    let paused_at = total(&counter);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(total(&counter), paused_at, "no I/O while paused");
    ctl.resume_all().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || total(&counter)
            > paused_at + 100),
        "runs again"
    );
    ctl.stop_all();
    let stopped_at = total(&counter);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(total(&counter), stopped_at, "no I/O after stop");
    assert_eq!(exit.code(), None, "nobody asked the VM to exit");
}

#[test]
fn i8042_reset_ends_the_vm_with_the_reboot_code() {
    if !common::kvm_or_skip("i8042_reset_ends_the_vm_with_the_reboot_code") {
        return;
    }
    // mov al, 0xfe; out 0x64, al; hlt
    let code = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];
    let exit = ExitRequest::new().unwrap();
    let mut bus = IoBus::new();
    bus.register(0x60..=0x64, Arc::new(I8042::new(exit.clone())))
        .unwrap();
    let (_ram, _vm, mut ctl) = start_vm(&code, 1, bus, exit.clone());
    assert_eq!(
        exit.wait_timeout(Duration::from_secs(30)),
        Some(vmm::exit::EXIT_REBOOT),
        "a pulse-reset is a reboot (exit code 3), not a poweroff"
    );
    ctl.stop_all();
}
