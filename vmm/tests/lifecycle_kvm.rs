//! Real-KVM tests of the life cycle on the real machine path ([`Machine`], its port bus and
//! vCPU threads): hand-assembled ring-0 guests power off through the ACPI sleep control
//! register (exit 0), reset through the ACPI reset register (exit 3), answer the power button
//! (the GED's GSI through the in-kernel IOAPIC) by powering off, halt with interrupts off, and
//! halt with interrupts on with and without a LAPIC timer that will wake them.

mod common;

use common::vm::{idt_gate, GDT_GPA, IDT_GPA, PML4_GPA};

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::long_mode;
use vmm::cli::MachineArgs;
use vmm::devices::acpi::{
    sleep, AcpiPm, ACPI_PM_PORTS, GED_GSI, RESET_PORT, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL_PORT,
};
use vmm::devices::{IoBus, PioDevice};
use vmm::dirty::DirtyMode;
use vmm::exit::{EXIT_IDLE, EXIT_OK, EXIT_REBOOT};
use vmm::hypervisor::VcpuOps;
use vmm::machine::session::{Session, SessionConfig, Waited};
use vmm::machine::{Machine, MachineConfig, MigrationPlan};
use vmm::memory::BackingKind;
use vmm::vcpu::VmControl;

const CODE_GPA: u64 = 0x10_0000;
/// The guests write [`READY`] here when set up.
const READY_PORT: u16 = 0x510;
const READY: u8 = b'R';
/// The timer guests' interrupt handler writes this to [`READY_PORT`].
const FIRED: u8 = b'T';

/// Records that the guest reached its ready point (and how often its timer fired).
#[derive(Default)]
struct ReadyPort(AtomicBool, AtomicU32);

impl PioDevice for ReadyPort {
    fn read(&self, _vcpu: usize, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _vcpu: usize, _port: u16, data: &[u8]) {
        match data[0] {
            READY => self.0.store(true, Ordering::SeqCst),
            FIRED => {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

/// A running one-vCPU machine with the ACPI registers and a ready port on its bus.
struct Running {
    machine: Machine,
    control: Arc<std::sync::Mutex<VmControl>>,
    ready: Arc<ReadyPort>,
}

impl Running {
    /// Loads `code` at CODE_GPA (with `vectors`: (vector, offset of its handler in `code`))
    /// and starts it in 64-bit mode at CPL 0, RAM and the first 4 GiB identity-mapped (the
    /// LAPIC and IOAPIC included).
    fn start(code: &[u8], vectors: &[(u8, u64)]) -> Running {
        let machine = Machine::new(MachineConfig {
            mem: 64 << 20,
            cpus: 1,
            backing: BackingKind::Small,
            demand_paging: false,
            prefault: false,
            dirty_mode: DirtyMode::KvmBitmap,
            migrates: false,
            serial_out: Box::new(std::io::sink()),
            host_quirks: false,
        })
        .unwrap();
        let mem = machine.mem().clone();
        mem.write_slice(code, GuestAddress(CODE_GPA)).unwrap();
        for (vector, off) in vectors {
            mem.write_slice(
                &idt_gate(CODE_GPA + off),
                GuestAddress(IDT_GPA + u64::from(*vector) * 16),
            )
            .unwrap();
        }
        let vcpus = machine.create_vcpus().unwrap();
        let cfg = long_mode::LongModeConfig {
            pml4_gpa: PML4_GPA,
            identity_map_bytes: 4 << 30,
            gdt_gpa: GDT_GPA,
            entry: CODE_GPA,
            rsp: 0x8_0000,
            rsi: 0,
            rdi: 0,
        };
        long_mode::setup(&mem, &vcpus[0], cfg).unwrap();
        let mut sregs = vcpus[0].get_sregs().unwrap();
        sregs.idt.base = IDT_GPA;
        sregs.idt.limit = 256 * 16 - 1;
        vcpus[0].set_sregs(&sregs).unwrap();
        let mut bus = IoBus::new();
        bus.register(ACPI_PM_PORTS, Arc::new(AcpiPm::new(machine.exit().clone())))
            .unwrap();
        let ready = Arc::new(ReadyPort::default());
        bus.register(READY_PORT..=READY_PORT, ready.clone())
            .unwrap();
        let control = machine.start(vcpus, bus).unwrap();
        Running {
            machine,
            control,
            ready,
        }
    }

    fn wait_ready(&self, limit: Duration) -> bool {
        let t = Instant::now();
        while !self.ready.0.load(Ordering::SeqCst) {
            if t.elapsed() > limit || self.machine.exit().code().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn stop(self) {
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop_all();
    }
}

/// Says ready, then writes `value` to `port` and halts (interrupts on, nothing pending).
#[rustfmt::skip]
fn write_port(port: u16, value: u8) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![
        0x66, 0xba, 0x10, 0x05, // mov dx, 0x510
        0xb0, READY,            // mov al, 'R'
        0xee,                   // out dx, al
        0x66, 0xba, p[0], p[1], // mov dx, port
        0xb0, value,            // mov al, value
        0xee,                   // out dx, al
        0xf4,                   // 0x0e: hlt
        0xeb, 0xfd,             // jmp 0x0e
    ]
}

/// Says ready, then `cli; hlt` (`interrupts_on` false) or `sti; hlt` (true) for ever. With
/// `sti` nothing is set up that could interrupt it: the LAPIC stays software-disabled, the PIT
/// unprogrammed.
#[rustfmt::skip]
fn ready_then_halt(interrupts_on: bool) -> Vec<u8> {
    vec![
        0x66, 0xba, 0x10, 0x05,                        // mov dx, 0x510
        0xb0, READY,                                   // mov al, 'R'
        0xee,                                          // out dx, al
        if interrupts_on { 0xfb } else { 0xfa },       // sti / cli
        0xf4,                                          // 0x08: hlt
        0xeb, 0xfd,                                    // jmp 0x08
    ]
}

/// Enables its local APIC, routes IOAPIC pin [`GED_GSI`] (23: redirection entry 0x3e/0x3f) to
/// vector 0x40 (fixed, edge, active high, APIC 0), says ready and waits in `sti; hlt`; the
/// handler of vector 0x40 sends the EOI and powers off through the sleep control register.
/// Assembled with GNU as (`.intel_syntax noprefix`), bytes from `objdump -d`.
#[rustfmt::skip]
const BUTTON: &[u8] = &[
    0xb8, 0xf0, 0x00, 0xe0, 0xfe,             // 0x00: mov eax, 0xfee000f0 (LAPIC SVR)
    0xc7, 0x00, 0xff, 0x01, 0x00, 0x00,       // 0x05: mov dword [rax], 0x1ff (enable)
    0xb8, 0x00, 0x00, 0xc0, 0xfe,             // 0x0b: mov eax, 0xfec00000 (IOREGSEL)
    0xc7, 0x00, 0x3f, 0x00, 0x00, 0x00,       // 0x10: mov dword [rax], 0x3f
    0xc7, 0x40, 0x10, 0x00, 0x00, 0x00, 0x00, // 0x16: mov dword [rax+0x10], 0 (APIC 0)
    0xc7, 0x00, 0x3e, 0x00, 0x00, 0x00,       // 0x1d: mov dword [rax], 0x3e
    0xc7, 0x40, 0x10, 0x40, 0x00, 0x00, 0x00, // 0x23: mov dword [rax+0x10], 0x40
    0x66, 0xba, 0x10, 0x05,                   // 0x2a: mov dx, 0x510
    0xb0, READY,                              // 0x2e: mov al, 'R'
    0xee,                                     // 0x30: out dx, al
    0xfb,                                     // 0x31: sti
    0xf4,                                     // 0x32: hlt
    0xeb, 0xfd,                               // 0x33: jmp 0x32
    // handler:
    0xb8, 0xb0, 0x00, 0xe0, 0xfe,             // 0x35: mov eax, 0xfee000b0 (LAPIC EOI)
    0xc7, 0x00, 0x00, 0x00, 0x00, 0x00,       // 0x3a: mov dword [rax], 0
    0x66, 0xba, 0x00, 0x06,                   // 0x40: mov dx, 0x600 (SLEEP_CONTROL_PORT)
    0xb0, 0x34,                               // 0x44: mov al, S5 << 2 | SLP_EN
    0xee,                                     // 0x46: out dx, al
    0x48, 0xcf,                               // 0x47: iretq
];
const BUTTON_VECTOR: u8 = 0x40;
const BUTTON_HANDLER: u64 = 0x35;

/// Enables its LAPIC, programs its timer (LVT timer entry `lvt`, divide by 1, initial count
/// `count`), says ready and waits in `sti; hlt`; the handler writes [`FIRED`] to the ready
/// port and sends the EOI. Assembled with GNU as (`.intel_syntax noprefix`), bytes from
/// `objdump -d`.
#[rustfmt::skip]
fn lapic_timer(lvt: u32, count: u32) -> Vec<u8> {
    let l = lvt.to_le_bytes();
    let c = count.to_le_bytes();
    vec![
        0xb8, 0xf0, 0x00, 0xe0, 0xfe,       // 0x00: mov eax, 0xfee000f0 (SVR)
        0xc7, 0x00, 0xff, 0x01, 0x00, 0x00, // 0x05: mov dword [rax], 0x1ff (enable)
        0xb8, 0xe0, 0x03, 0xe0, 0xfe,       // 0x0b: mov eax, 0xfee003e0 (divide config)
        0xc7, 0x00, 0x0b, 0x00, 0x00, 0x00, // 0x10: mov dword [rax], 0xb (by 1)
        0xb8, 0x20, 0x03, 0xe0, 0xfe,       // 0x16: mov eax, 0xfee00320 (LVT timer)
        0xc7, 0x00, l[0], l[1], l[2], l[3], // 0x1b: mov dword [rax], lvt
        0xb8, 0x80, 0x03, 0xe0, 0xfe,       // 0x21: mov eax, 0xfee00380 (initial count)
        0xc7, 0x00, c[0], c[1], c[2], c[3], // 0x26: mov dword [rax], count
        0x66, 0xba, 0x10, 0x05,             // 0x2c: mov dx, 0x510
        0xb0, READY,                        // 0x30: mov al, 'R'
        0xee,                               // 0x32: out dx, al
        0xfb,                               // 0x33: sti
        0xf4,                               // 0x34: hlt
        0xeb, 0xfd,                         // 0x35: jmp 0x34
        // handler:
        0x66, 0xba, 0x10, 0x05,             // 0x37: mov dx, 0x510
        0xb0, FIRED,                        // 0x3b: mov al, 'T'
        0xee,                               // 0x3d: out dx, al
        0xb8, 0xb0, 0x00, 0xe0, 0xfe,       // 0x3e: mov eax, 0xfee000b0 (EOI)
        0xc7, 0x00, 0x00, 0x00, 0x00, 0x00, // 0x43: mov dword [rax], 0
        0x48, 0xcf,                         // 0x49: iretq
    ]
}
const TIMER_VECTOR: u8 = 0x41;
const TIMER_HANDLER: u64 = 0x37;
/// LVT timer mode bits (Intel SDM Vol. 3A §11.5.4).
const LVT_PERIODIC: u32 = 1 << 17;

fn session<'m>(r: &'m Running, idle_timeout: Option<Duration>) -> Session<'m> {
    Session::new(
        &r.machine,
        r.control.clone(),
        Arc::new(r.machine.reclaimer(None)),
        SessionConfig {
            api_socket: None,
            migrate: {
                let args = MachineArgs::default();
                MigrationPlan::from_args(&args).unwrap().config(&args)
            },
            migrate_json: None,
            spec: Vec::new(),
            i8042: None,
            power_button: None,
            shutdown_timeout: Duration::ZERO,
            idle_timeout,
            api_timeout: Duration::from_secs(30),
            payload: "lifecycle test".into(),
            guest_report: None,
            harvest_every: None,
            migration_blocker: None,
            balloon: None,
            virtio: Vec::new(),
        },
    )
    .unwrap()
}

#[test]
fn s5_through_the_sleep_control_register_ends_with_exit_zero() {
    if !common::kvm_or_skip("s5_through_the_sleep_control_register_ends_with_exit_zero") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let s5 = (S5_SLP_TYP << sleep::SLP_TYP_SHIFT) | sleep::SLP_EN;
    let r = Running::start(&write_port(SLEEP_CONTROL_PORT, s5), &[]);
    let code = r.machine.exit().wait_timeout(Duration::from_secs(60));
    assert!(r.ready.0.load(Ordering::SeqCst), "the guest ran");
    assert_eq!(code, Some(EXIT_OK), "powered off");
    r.stop();
}

#[test]
fn the_acpi_reset_register_ends_with_the_reboot_code() {
    if !common::kvm_or_skip("the_acpi_reset_register_ends_with_the_reboot_code") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let r = Running::start(&write_port(RESET_PORT, RESET_VALUE), &[]);
    let code = r.machine.exit().wait_timeout(Duration::from_secs(60));
    assert!(r.ready.0.load(Ordering::SeqCst), "the guest ran");
    assert_eq!(code, Some(EXIT_REBOOT));
    r.stop();
}

/// The power button reaches the guest as an interrupt on GED_GSI through the in-kernel IOAPIC;
/// until it is pressed the guest sits in `sti; hlt`, which is not idle for good.
#[test]
fn the_power_button_interrupts_the_guest_which_powers_off() {
    if !common::kvm_or_skip("the_power_button_interrupts_the_guest_which_powers_off") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    assert_eq!(GED_GSI, 23, "BUTTON programs redirection entry 23");
    assert_eq!(BUTTON[BUTTON_HANDLER as usize], 0xb8, "listing offsets");
    let r = Running::start(BUTTON, &[(BUTTON_VECTOR, BUTTON_HANDLER)]);
    assert!(r.wait_ready(Duration::from_secs(60)), "the guest set up");
    let button = r.machine.power_button().unwrap();
    assert_eq!(
        r.machine.ged_listening().unwrap().listening(),
        Some(true),
        "the guest unmasked IOAPIC pin 23"
    );
    let s = session(&r, None);
    assert_eq!(
        s.wait(Some(Duration::from_millis(3500))),
        Waited::Timeout,
        "halted with interrupts on: not idle, keeps running"
    );
    button.press().unwrap();
    assert_eq!(
        s.wait(Some(Duration::from_secs(60))),
        Waited::Exit(EXIT_OK),
        "the button's interrupt ran the handler, which powered off"
    );
    drop(s);
    r.stop();
}

/// Measured on this host's kvm_pvm: `cli; hlt` never leaves KVM_RUN (no KVM_EXIT_HLT with the
/// in-kernel irqchip), and KVM_GET_MP_STATE then says HALTED with RFLAGS.IF clear. The
/// session's idle watch sees that and ends the VM with EXIT_IDLE.
#[test]
fn a_halt_with_interrupts_off_ends_the_vm_as_idle() {
    if !common::kvm_or_skip("a_halt_with_interrupts_off_ends_the_vm_as_idle") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let r = Running::start(&ready_then_halt(false), &[]);
    assert!(r.wait_ready(Duration::from_secs(60)));
    assert_eq!(
        r.machine.ged_listening().unwrap().listening(),
        Some(false),
        "a guest that never programmed the IOAPIC does not listen to the power button"
    );
    let t = Instant::now();
    // Whatever --idle-timeout says: nothing can wake this one.
    let s = session(&r, None);
    let waited = s.wait(Some(Duration::from_secs(30)));
    eprintln!("idle found after {:?}", t.elapsed());
    assert_eq!(waited, Waited::Exit(EXIT_IDLE));
    let c = r.control.lock().unwrap();
    let (_, (mp, rflags)) = c
        .probe_vcpu(0, |fd| {
            (
                fd.get_mp_state().unwrap().mp_state,
                fd.get_regs().unwrap().rflags,
            )
        })
        .unwrap();
    assert_eq!((mp, rflags & (1 << 9)), (3, 0), "HALTED, IF clear");
    drop(c);
    drop(s);
    r.stop();
}

/// `sti; hlt` with no LAPIC timer, PIT, console input or control socket: left alone while
/// `--idle-timeout` is off, ended as idle once it is on and the limit has passed.
#[test]
fn a_halt_with_interrupts_on_and_nothing_to_wake_it_ends_after_the_idle_timeout() {
    if !common::kvm_or_skip(
        "a_halt_with_interrupts_on_and_nothing_to_wake_it_ends_after_the_idle_timeout",
    ) {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let r = Running::start(&ready_then_halt(true), &[]);
    assert!(r.wait_ready(Duration::from_secs(60)));
    let s = session(&r, None);
    assert_eq!(
        s.wait(Some(Duration::from_millis(3500))),
        Waited::Timeout,
        "--idle-timeout 0: never ended for sleeping with interrupts on"
    );
    drop(s);
    let limit = Duration::from_secs(2);
    let t = Instant::now();
    let s = session(&r, Some(limit));
    let waited = s.wait(Some(Duration::from_secs(60)));
    eprintln!("idle found after {:?}", t.elapsed());
    assert_eq!(waited, Waited::Exit(EXIT_IDLE));
    assert!(
        t.elapsed() >= limit,
        "not before the limit: {:?}",
        t.elapsed()
    );
    let c = r.control.lock().unwrap();
    let (_, (mp, rflags)) = c
        .probe_vcpu(0, |fd| {
            (
                fd.get_mp_state().unwrap().mp_state,
                fd.get_regs().unwrap().rflags,
            )
        })
        .unwrap();
    assert_eq!((mp, rflags & (1 << 9)), (3, 1 << 9), "HALTED, IF set");
    drop(c);
    drop(s);
    r.stop();
}

/// A periodic LAPIC timer (every 10 ms) wakes the guest for ever: with a 1 s idle timeout the
/// VM still runs 4 s later, and the timer did fire.
#[test]
fn a_periodic_lapic_timer_keeps_a_halted_guest_alive() {
    if !common::kvm_or_skip("a_periodic_lapic_timer_keeps_a_halted_guest_alive") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let code = lapic_timer(LVT_PERIODIC | u32::from(TIMER_VECTOR), 10_000_000);
    assert_eq!(code[TIMER_HANDLER as usize], 0x66, "listing offsets");
    let r = Running::start(&code, &[(TIMER_VECTOR, TIMER_HANDLER)]);
    assert!(r.wait_ready(Duration::from_secs(60)));
    let s = session(&r, Some(Duration::from_secs(1)));
    assert_eq!(
        s.wait(Some(Duration::from_secs(4))),
        Waited::Timeout,
        "a counting periodic timer is something to wake for"
    );
    let fired = r.ready.1.load(Ordering::SeqCst);
    assert!(fired > 10, "the timer fired {fired} times");
    drop(s);
    r.stop();
}

/// A one-shot LAPIC timer of 2^32 - 1 APIC bus cycles (KVM's bus cycle is 1 ns: about 4.3 s)
/// keeps the guest alive while it counts (KVM reports its current count in the saved LAPIC
/// page); once it has fired nothing is left and the VM ends as idle after the 1 s limit.
#[test]
fn a_one_shot_lapic_timer_keeps_a_halted_guest_alive_until_it_fires() {
    if !common::kvm_or_skip("a_one_shot_lapic_timer_keeps_a_halted_guest_alive_until_it_fires") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let code = lapic_timer(u32::from(TIMER_VECTOR), u32::MAX);
    let r = Running::start(&code, &[(TIMER_VECTOR, TIMER_HANDLER)]);
    assert!(r.wait_ready(Duration::from_secs(60)));
    let t = Instant::now();
    let s = session(&r, Some(Duration::from_secs(1)));
    let waited = s.wait(Some(Duration::from_secs(60)));
    let fired = r.ready.1.load(Ordering::SeqCst);
    eprintln!(
        "idle found after {:?}, timer fired {fired} times",
        t.elapsed()
    );
    assert_eq!(waited, Waited::Exit(EXIT_IDLE));
    assert_eq!(fired, 1, "ended only after the one-shot fired, once");
    drop(s);
    r.stop();
}
