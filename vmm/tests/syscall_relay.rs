//! Real-KVM test of the syscall relay (`vmm::arch::x86_64::emulate::syscall_relay`): a
//! hand-assembled ring-0 "kernel" sets up `syscall` (EFER.SCE, STAR, LSTAR, FMASK), takes a
//! page fault of its own, and drops to a ring-3 program that makes system calls and takes a
//! user page fault. On this host's `kvm_pvm` a user `syscall` is left at CPL 3 by KVM; with
//! the relay on, each one must reach the entry point at CPL 0 with the user's RSP, return
//! address and flags, and `sysretq` must bring the result back. The kernel's and the user's
//! own page faults must still reach the guest's #PF handler. On a KVM that completes
//! `syscall` itself the relay never acts and the same results hold.

mod common;

use common::vm::{idt_gate, long_mode_vcpu, GDT_GPA, IDT_GPA, PML4_GPA};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::gdt;
use vmm::devices::{IoBus, PioDevice};
use vmm::exit::ExitRequest;
use vmm::hypervisor::VcpuOps;
use vmm::hypervisor::Vm;
use vmm::memory::{BackingKind, GuestRam};
use vmm::vcpu::{EmulationHooks, VcpuHooks, VmControl};

const KERNEL_GPA: u64 = 0x10_0000;
const DATA_GPA: u64 = 0x20_0000;
const USER_GPA: u64 = 0x40_0000;
/// The user stack's top, in the user's 2 MiB page.
const USER_RSP: u64 = 0x5f_0000;
/// The kernel stack for events from ring 3 (TSS.RSP0).
const RSP0: u64 = 0x9_0000;
const TSS_GPA: u64 = 0x9000;
/// Not mapped by the guest's page tables: both the kernel and the user program fault on it.
const UNMAPPED: u64 = 0x800_0000;
const DONE_PORT: u16 = 0x510;
const DONE: u8 = 0x42;

/// Offsets in `KERNEL` (from the listing).
const SYSCALL_ENTRY: u64 = 0x59;
const PF_HANDLER: u64 = 0x95;
const GP_HANDLER: u64 = 0xe3;
/// The kernel's own faulting load, and the user's.
const KERNEL_FAULT_RIP: u64 = 0x3d;
const USER_FAULT_RIP: u64 = 0x14;
/// The instruction after the user's last `syscall`.
const AFTER_LAST_SYSCALL: u64 = 0x2d;

/// Linux's GDT layout, which `kvm_pvm` requires of the user selectors: kernel CS 0x10, kernel
/// DS 0x18, user32 CS 0x23, user DS 0x2b, user CS 0x33, TSS 0x40.
const KERNEL_CS: u64 = 0x10;
const USER_CS: u64 = 0x33;
const TSS_SEL: u16 = 0x40;

/// Ring 0, at KERNEL_GPA. Assembled with GNU as (`.intel_syntax noprefix`), bytes from
/// `objdump -d`. Results go to DATA_GPA + the offsets the test reads.
#[rustfmt::skip]
const KERNEL: &[u8] = &[
    // start:
    0xb9, 0x80, 0x00, 0x00, 0xc0, // 0x000: mov ecx,0xc0000080
    0x0f, 0x32, // 0x005: rdmsr
    0x83, 0xc8, 0x01, // 0x007: or eax,0x1
    0x0f, 0x30, // 0x00a: wrmsr
    0xb9, 0x81, 0x00, 0x00, 0xc0, // 0x00c: mov ecx,0xc0000081
    0x31, 0xc0, // 0x011: xor eax,eax
    0xba, 0x10, 0x00, 0x23, 0x00, // 0x013: mov edx,0x230010
    0x0f, 0x30, // 0x018: wrmsr
    0xb9, 0x82, 0x00, 0x00, 0xc0, // 0x01a: mov ecx,0xc0000082
    0x48, 0x8d, 0x05, 0x33, 0x00, 0x00, 0x00, // 0x01f: lea rax,[rip+0x33]
    0x48, 0x89, 0xc2, // 0x026: mov rdx,rax
    0x48, 0xc1, 0xea, 0x20, // 0x029: shr rdx,0x20
    0x0f, 0x30, // 0x02d: wrmsr
    0xb9, 0x84, 0x00, 0x00, 0xc0, // 0x02f: mov ecx,0xc0000084
    0xb8, 0x00, 0x77, 0x04, 0x00, // 0x034: mov eax,0x47700
    0x31, 0xd2, // 0x039: xor edx,edx
    0x0f, 0x30, // 0x03b: wrmsr
    0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x08, // 0x03d: mov eax,DWORD PTR ds:0x8000000
    0x6a, 0x2b, // 0x044: push 0x2b
    0x68, 0x00, 0x00, 0x5f, 0x00, // 0x046: push 0x5f0000
    0x68, 0x02, 0x02, 0x00, 0x00, // 0x04b: push 0x202
    0x6a, 0x33, // 0x050: push 0x33
    0x68, 0x00, 0x00, 0x40, 0x00, // 0x052: push 0x400000
    0x48, 0xcf, // 0x057: iretq
    // syscall_entry:
    0x8c, 0x0c, 0x25, 0x20, 0x00, 0x20, 0x00, // 0x059: mov WORD PTR ds:0x200020,cs
    0x48, 0x89, 0x0c, 0x25, 0x28, 0x00, 0x20, // 0x060: mov QWORD PTR ds:0x200028,rcx
    0x00,
    0x4c, 0x89, 0x1c, 0x25, 0x30, 0x00, 0x20, // 0x068: mov QWORD PTR ds:0x200030,r11
    0x00,
    0x48, 0x89, 0x24, 0x25, 0x38, 0x00, 0x20, // 0x070: mov QWORD PTR ds:0x200038,rsp
    0x00,
    0x3d, 0xad, 0xde, 0x00, 0x00, // 0x078: cmp eax,0xdead
    0x74, 0x0e, // 0x07d: je 8d <done>
    0x48, 0xff, 0x04, 0x25, 0x40, 0x00, 0x20, // 0x07f: inc QWORD PTR ds:0x200040
    0x00,
    0x8d, 0x40, 0x01, // 0x087: lea eax,[rax+0x1]
    0x48, 0x0f, 0x07, // 0x08a: sysretq
    // done:
    0x66, 0xba, 0x10, 0x05, // 0x08d: mov dx,0x510
    0xb0, 0x42, // 0x091: mov al,0x42
    0xee, // 0x093: out dx,al
    0xf4, // 0x094: hlt
    // pf:
    0x50, // 0x095: push rax
    0x48, 0xff, 0x04, 0x25, 0x48, 0x00, 0x20, // 0x096: inc QWORD PTR ds:0x200048
    0x00,
    0x0f, 0x20, 0xd0, // 0x09e: mov rax,cr2
    0x48, 0x89, 0x04, 0x25, 0x50, 0x00, 0x20, // 0x0a1: mov QWORD PTR ds:0x200050,rax
    0x00,
    0x48, 0x8b, 0x44, 0x24, 0x10, // 0x0a9: mov rax,QWORD PTR [rsp+0x10]
    0x48, 0x89, 0x04, 0x25, 0x58, 0x00, 0x20, // 0x0ae: mov QWORD PTR ds:0x200058,rax
    0x00,
    0x48, 0x8b, 0x44, 0x24, 0x18, // 0x0b6: mov rax,QWORD PTR [rsp+0x18]
    0x48, 0x89, 0x04, 0x25, 0x60, 0x00, 0x20, // 0x0bb: mov QWORD PTR ds:0x200060,rax
    0x00,
    0x48, 0x83, 0x3c, 0x25, 0x48, 0x00, 0x20, // 0x0c3: cmp QWORD PTR ds:0x200048,0x3
    0x00, 0x03,
    0x73, 0x0d, // 0x0cc: jae db <runaway>
    0x48, 0x83, 0x44, 0x24, 0x10, 0x07, // 0x0ce: add QWORD PTR [rsp+0x10],0x7
    0x58, // 0x0d4: pop rax
    0x48, 0x83, 0xc4, 0x08, // 0x0d5: add rsp,0x8
    0x48, 0xcf, // 0x0d9: iretq
    // runaway:
    0x66, 0xba, 0x10, 0x05, // 0x0db: mov dx,0x510
    0xb0, 0x0e, // 0x0df: mov al,0xe
    0xee, // 0x0e1: out dx,al
    0xf4, // 0x0e2: hlt
    // gp:
    0x66, 0xba, 0x10, 0x05, // 0x0e3: mov dx,0x510
    0xb0, 0x0d, // 0x0e7: mov al,0xd
    0xee, // 0x0e9: out dx,al
    0xf4, // 0x0ea: hlt
];

/// Ring 3, at USER_GPA.
#[rustfmt::skip]
const USER: &[u8] = &[
    // user:
    0xbf, 0x00, 0x00, 0x20, 0x00, // 0x000: mov edi,0x200000
    0xb8, 0x00, 0x01, 0x00, 0x00, // 0x005: mov eax,0x100
    0x0f, 0x05, // 0x00a: syscall
    0x48, 0x89, 0x47, 0x08, // 0x00c: mov QWORD PTR [rdi+0x8],rax
    0x48, 0x89, 0x67, 0x10, // 0x010: mov QWORD PTR [rdi+0x10],rsp
    0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x08, // 0x014: mov eax,DWORD PTR ds:0x8000000
    0xb8, 0x00, 0x02, 0x00, 0x00, // 0x01b: mov eax,0x200
    0x0f, 0x05, // 0x020: syscall
    0x48, 0x89, 0x47, 0x18, // 0x022: mov QWORD PTR [rdi+0x18],rax
    0xb8, 0xad, 0xde, 0x00, 0x00, // 0x026: mov eax,0xdead
    0x0f, 0x05, // 0x02b: syscall
    0xeb, 0xfe, // 0x02d: jmp 2d <user+0x2d>
];

/// Ends the VM with 0 on DONE, with the byte otherwise (0x0d: the #GP handler ran; 0x0e: a
/// third page fault, more than the program makes).
struct DonePort(ExitRequest, AtomicUsize);

impl PioDevice for DonePort {
    fn read(&self, _vcpu: usize, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _vcpu: usize, _port: u16, data: &[u8]) {
        self.1.fetch_add(1, Ordering::SeqCst);
        let code = if data[0] == DONE {
            0
        } else {
            i32::from(data[0])
        };
        self.0
            .request(code, &format!("guest reported {:#x}", data[0]));
    }
}

struct Run {
    ram: GuestRam,
    code: Option<i32>,
    syscalls_relayed: u64,
    faults_stepped: u64,
}

fn run(relay: bool) -> Run {
    let ram = GuestRam::new(64 << 20, BackingKind::Small).unwrap();
    let mem: &GuestMemoryMmap = ram.memory();
    mem.write_slice(KERNEL, GuestAddress(KERNEL_GPA)).unwrap();
    mem.write_slice(USER, GuestAddress(USER_GPA)).unwrap();
    for (vector, handler) in [(14, PF_HANDLER), (13, GP_HANDLER)] {
        mem.write_slice(
            &idt_gate(KERNEL_GPA + handler),
            GuestAddress(IDT_GPA + vector * 16),
        )
        .unwrap();
    }
    let vm = Vm::new(&ram, 1).unwrap();
    if relay {
        vm.filter_msr_writes(vmm::arch::x86_64::msrs::MSR_LSTAR)
            .unwrap();
    }
    let fd = long_mode_vcpu(&vm, mem, ram.size(), 0, KERNEL_GPA, 0);
    // User access (bit 2) on the walk to the data and user 2 MiB pages only: the kernel's
    // page (and so the syscall entry) stays supervisor-only, as in Linux.
    for entry in [
        PML4_GPA,
        PML4_GPA + 0x1000,
        PML4_GPA + 0x2000 + 8,
        PML4_GPA + 0x2000 + 16,
    ] {
        let e: u64 = mem.read_obj(GuestAddress(entry)).unwrap();
        mem.write_obj(e | 4, GuestAddress(entry)).unwrap();
    }
    // A Linux-shaped GDT and a TSS whose RSP0 takes events from ring 3.
    let tss = gdt::gdt_entry(0x0089, TSS_GPA as u32, 0x67);
    let table: [u64; 10] = [
        0,
        0,
        0x00af_9b00_0000_ffff, // 0x10 kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x18 kernel data
        0x00cf_fb00_0000_ffff, // 0x23 user code, 32-bit
        0x00cf_f300_0000_ffff, // 0x2b user data
        0x00af_fb00_0000_ffff, // 0x33 user code, 64-bit
        0,
        tss,
        0,
    ];
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_GPA + i as u64 * 8))
            .unwrap();
    }
    mem.write_obj(RSP0, GuestAddress(TSS_GPA + 4)).unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.idt.base = IDT_GPA;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.tr = gdt::segment_from_entry(tss, TSS_SEL);
    sregs.tr.type_ = 0xb;
    fd.set_sregs(&sregs).unwrap();

    let exit = ExitRequest::new().unwrap();
    let mut bus = IoBus::new();
    bus.register(
        DONE_PORT..=DONE_PORT,
        Arc::new(DonePort(exit.clone(), AtomicUsize::new(0))),
    )
    .unwrap();
    let mut ctl = VmControl::start_with_emulation(
        vec![fd],
        Arc::new(bus),
        mem.clone(),
        exit.clone(),
        VcpuHooks::default(),
        EmulationHooks {
            syscall_relay: relay,
            ..EmulationHooks::default()
        },
    )
    .unwrap();
    let stats = ctl.emulation_stats().clone();
    let code = exit.wait_timeout(Duration::from_secs(60));
    ctl.stop_all();
    drop(vm);
    Run {
        ram,
        code,
        syscalls_relayed: stats.relayed_syscalls(),
        faults_stepped: stats.stepped_faults(),
    }
}

fn data(ram: &GuestRam, off: u64) -> u64 {
    ram.memory().read_obj(GuestAddress(DATA_GPA + off)).unwrap()
}

#[test]
fn user_syscalls_reach_the_kernel_at_cpl0_and_page_faults_stay_the_guests() {
    if !common::kvm_or_skip(
        "user_syscalls_reach_the_kernel_at_cpl0_and_page_faults_stay_the_guests",
    ) {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    assert_eq!(KERNEL[SYSCALL_ENTRY as usize], 0x8c, "listing offsets");
    assert_eq!(KERNEL[PF_HANDLER as usize], 0x50, "listing offsets");
    assert_eq!(KERNEL[KERNEL_FAULT_RIP as usize], 0x8b, "listing offsets");
    assert_eq!(USER[USER_FAULT_RIP as usize], 0x8b, "listing offsets");

    let r = run(true);
    eprintln!(
        "relayed {} syscalls, stepped over {} page faults",
        r.syscalls_relayed, r.faults_stepped
    );
    assert_eq!(r.code, Some(0), "the program ran to its end (13: #GP)");
    let d = |off| data(&r.ram, off);
    assert_eq!(d(0x40), 2, "two syscalls returned through sysretq");
    assert_eq!(d(0x20) & 0xffff, KERNEL_CS, "the entry ran at CPL 0");
    assert_eq!(d(0x38), USER_RSP, "the entry saw the user's RSP");
    assert_eq!(d(0x30), 0x202, "R11 holds the user's RFLAGS");
    assert_eq!(
        d(0x28),
        USER_GPA + AFTER_LAST_SYSCALL,
        "RCX: the last syscall's return address"
    );
    assert_eq!((d(0x08), d(0x18)), (0x101, 0x201), "results came back");
    assert_eq!(d(0x10), USER_RSP, "the user's stack is as it was");
    // Both genuine page faults reached the guest's handler; the last was the user's.
    assert_eq!(d(0x48), 2, "the kernel's and the user's page fault");
    assert_eq!(d(0x50), UNMAPPED, "CR2");
    assert_eq!(d(0x58), USER_GPA + USER_FAULT_RIP, "the user fault's RIP");
    assert_eq!(d(0x60), USER_CS, "the user fault came from ring 3");
    if vmm::hypervisor::software_kvm().is_some() {
        // Measured on kvm_pvm: KVM leaves each of the three user syscalls at CPL 3.
        assert_eq!(
            r.syscalls_relayed, 3,
            "every user syscall went through the relay"
        );
        assert!(
            r.faults_stepped >= 2,
            "the two genuine faults were let through"
        );
    }
}

/// Without the relay a software KVM leaves the syscall at CPL 3: the fetch at the
/// supervisor-only entry point is a user page fault at LSTAR, which this guest's handler
/// skips, and the program never reaches its end the way it should. This is the failure the
/// relay exists for (on hardware KVM the program passes without it).
#[test]
fn without_the_relay_a_software_kvm_faults_at_the_syscall_entry() {
    if !common::kvm_or_skip("without_the_relay_a_software_kvm_faults_at_the_syscall_entry") {
        return;
    }
    if vmm::hypervisor::software_kvm().is_none() {
        eprintln!("skipped: KVM here completes syscall itself");
        return;
    }
    let r = run(false);
    let d = |off| data(&r.ram, off);
    assert_eq!(r.code, Some(0x0e), "the page fault handler gave up");
    assert_eq!(d(0x40), 0, "no syscall reached the entry at CPL 0");
    // The user's syscall faulted at the (supervisor-only) entry point in ring 3; the handler
    // skipped 7 bytes, and the next fetch faulted again: the third fault.
    assert_eq!(
        d(0x50),
        KERNEL_GPA + SYSCALL_ENTRY + 7,
        "CR2 of the third fault"
    );
    assert_eq!(d(0x60), USER_CS, "in ring 3");
}
