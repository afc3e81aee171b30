//! Real-KVM test of the emulation fallback: hand-assembled 64-bit code at CPL 0 runs popcnt
//! (register, memory, RIP-relative; 16/32/64-bit), stac/clac, fwait, lock cmpxchg16b (a match
//! and a mismatch), ldmxcsr (a valid value, and one with a reserved bit that must raise #GP)
//! with stmxcsr to read it back, and int3 (whose #BP handler records its return address and iretq's), stores what it sees,
//! and reports on an I/O port. Whatever this KVM emulates itself or leaves to the VMM, the
//! results must be the architectural ones; the counters show which instructions exited.

mod common;

use common::vm::{idt_gate, long_mode_vcpu, IDT_GPA};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::arch::x86_64::emulate::{EmulationStats, Kind};
use vmm::devices::{IoBus, PioDevice};
use vmm::dirty::{DirtyBitmap, HostChanges, SlotInfo, VmmDirty};
use vmm::exit::ExitRequest;
use vmm::hypervisor::VcpuOps;
use vmm::hypervisor::Vm;
use vmm::memory::{BackingKind, GuestRam};
use vmm::vcpu::{EmulationHooks, VcpuHooks, VmControl};

const CODE_GPA: u64 = 0x10_0000;
const DATA_GPA: u64 = 0x20_0000;
const DONE_PORT: u16 = 0x510;
/// The byte the program writes to `DONE_PORT` when it has run to its end.
const DONE: u8 = 0x42;

/// Offsets in `CODE` (from the listing below).
const BP_HANDLER: u64 = 0xf8;
const GP_HANDLER: u64 = 0x111;
/// The instruction after `int3`: the #BP handler's return address.
const AFTER_INT3: u64 = 0xda;

/// RFLAGS bits (Intel SDM Vol. 1 §3.4.3).
const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const AC: u64 = 1 << 18;

/// Initial 16 bytes at DATA+0x200, compared by the first cmpxchg16b.
const CAS_INITIAL: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
/// MXCSR loaded by the first ldmxcsr: flush-to-zero + all exceptions masked + DAZ.
const MXCSR_GOOD: u32 = 0x9fc0;
/// MXCSR with reserved bit 16 set: ldmxcsr must raise #GP(0).
const MXCSR_RESERVED: u32 = 0x1_1f80;

/// How many of each kind the program executes (ldmxcsr: one completes, one raises #GP).
const IN_PROGRAM: [(Kind, u64); 8] = [
    (Kind::Popcnt, 5),
    (Kind::Stac, 1),
    (Kind::Clac, 1),
    (Kind::Fwait, 1),
    (Kind::Cmpxchg16b, 2),
    (Kind::Ldmxcsr, 2),
    (Kind::Stmxcsr, 2),
    (Kind::Int3, 1),
];

/// Assembled with GNU as (`.intel_syntax noprefix`), bytes copied from `objdump -d`.
/// RDI holds DATA_GPA throughout; results go to DATA + the offsets the test reads.
#[rustfmt::skip]
const CODE: &[u8] = &[
    // start:
    0xbf, 0x00, 0x00, 0x20, 0x00, // 0x000: mov edi,0x200000
    0x48, 0xc7, 0xc0, 0xf0, 0xf0, 0x00, 0x00, // 0x005: mov rax,0xf0f0
    0xf3, 0x48, 0x0f, 0xb8, 0xd8, // 0x00c: popcnt rbx,rax
    0x48, 0x89, 0x1f, // 0x011: mov qword [rdi],rbx
    0x9c, // 0x014: pushf
    0x58, // 0x015: pop rax
    0x48, 0x89, 0x47, 0x08, // 0x016: mov qword [rdi+0x8],rax
    0xf3, 0x0f, 0xb8, 0x8f, 0x00, 0x01, 0x00, 0x00, // 0x01a: popcnt ecx,dword [rdi+0x100]
    0x48, 0x89, 0x4f, 0x10, // 0x022: mov qword [rdi+0x10],rcx
    0x48, 0xba, 0x44, 0x44, 0x33, 0x33, 0x22, 0x22, 0x11, 0x11, // 0x026: movabs rdx,0x1111222233334444
    0xb8, 0xff, 0x00, 0x00, 0x00, // 0x030: mov eax,0xff
    0x66, 0xf3, 0x0f, 0xb8, 0xd0, // 0x035: popcnt dx,ax
    0x48, 0x89, 0x57, 0x18, // 0x03a: mov qword [rdi+0x18],rdx
    0x31, 0xc0, // 0x03e: xor eax,eax
    0xf3, 0x4c, 0x0f, 0xb8, 0xc8, // 0x040: popcnt r9,rax
    0x9c, // 0x045: pushf
    0x58, // 0x046: pop rax
    0x48, 0x89, 0x47, 0x20, // 0x047: mov qword [rdi+0x20],rax
    0x4c, 0x89, 0x4f, 0x28, // 0x04b: mov qword [rdi+0x28],r9
    0xf3, 0x4c, 0x0f, 0xb8, 0x15, 0x98, 0x00, 0x00, 0x00, // 0x04f: popcnt r10,qword [rip+0x98]
    0x4c, 0x89, 0x57, 0x30, // 0x058: mov qword [rdi+0x30],r10
    0x0f, 0x01, 0xcb, // 0x05c: stac
    0x9c, // 0x05f: pushf
    0x58, // 0x060: pop rax
    0x48, 0x89, 0x47, 0x38, // 0x061: mov qword [rdi+0x38],rax
    0x0f, 0x01, 0xca, // 0x065: clac
    0x9c, // 0x068: pushf
    0x58, // 0x069: pop rax
    0x48, 0x89, 0x47, 0x40, // 0x06a: mov qword [rdi+0x40],rax
    0x9b, // 0x06e: fwait
    0x48, 0xc7, 0x47, 0x48, 0x01, 0x00, 0x00, 0x00, // 0x06f: mov qword [rdi+0x48],0x1
    0x48, 0x8b, 0x87, 0x00, 0x02, 0x00, 0x00, // 0x077: mov rax,qword [rdi+0x200]
    0x48, 0x8b, 0x97, 0x08, 0x02, 0x00, 0x00, // 0x07e: mov rdx,qword [rdi+0x208]
    0xbb, 0x11, 0x11, 0x00, 0x00, // 0x085: mov ebx,0x1111
    0xb9, 0x22, 0x22, 0x00, 0x00, // 0x08a: mov ecx,0x2222
    0xf0, 0x48, 0x0f, 0xc7, 0x8f, 0x00, 0x02, 0x00, 0x00, // 0x08f: lock cmpxchg16b [rdi+0x200]
    0x9c, // 0x098: pushf
    0x5e, // 0x099: pop rsi
    0x48, 0x89, 0x77, 0x50, // 0x09a: mov qword [rdi+0x50],rsi
    0x31, 0xc0, // 0x09e: xor eax,eax
    0x31, 0xd2, // 0x0a0: xor edx,edx
    0xbb, 0x33, 0x33, 0x00, 0x00, // 0x0a2: mov ebx,0x3333
    0xb9, 0x44, 0x44, 0x00, 0x00, // 0x0a7: mov ecx,0x4444
    0xf0, 0x48, 0x0f, 0xc7, 0x8f, 0x00, 0x02, 0x00, 0x00, // 0x0ac: lock cmpxchg16b [rdi+0x200]
    0x9c, // 0x0b5: pushf
    0x5e, // 0x0b6: pop rsi
    0x48, 0x89, 0x77, 0x58, // 0x0b7: mov qword [rdi+0x58],rsi
    0x48, 0x89, 0x47, 0x60, // 0x0bb: mov qword [rdi+0x60],rax
    0x48, 0x89, 0x57, 0x68, // 0x0bf: mov qword [rdi+0x68],rdx
    0x0f, 0xae, 0x97, 0x10, 0x01, 0x00, 0x00, // 0x0c3: ldmxcsr dword [rdi+0x110]
    0x0f, 0xae, 0x5f, 0x70, // 0x0ca: stmxcsr dword [rdi+0x70]
    0x0f, 0xae, 0x97, 0x14, 0x01, 0x00, 0x00, // 0x0ce: ldmxcsr dword [rdi+0x114]
    0x0f, 0xae, 0x5f, 0x78, // 0x0d5: stmxcsr dword [rdi+0x78]
    0xcc, // 0x0d9: int3
    0x48, 0xc7, 0x87, 0x80, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // 0x0da: mov qword [rdi+0x80],0x1
    0x66, 0xba, 0x10, 0x05, // 0x0e5: mov dx,0x510
    0xb0, 0x42, // 0x0e9: mov al,0x42
    0xee, // 0x0eb: out dx,al
    0xf4, // 0x0ec: hlt
    0xeb, 0xfd, // 0x0ed: jmp ec <start+0xec>
    0x90, // 0x0ef: nop (padding)
    // pattern:
    0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 0x0f0: .quad 7
    // bp_handler:
    0x50, // 0x0f8: push rax
    0x48, 0x8b, 0x44, 0x24, 0x08, // 0x0f9: mov rax,qword [rsp+0x8]
    0x48, 0x89, 0x04, 0x25, 0x90, 0x00, 0x20, 0x00, // 0x0fe: mov qword ds:0x200090,rax
    0x48, 0xff, 0x04, 0x25, 0x98, 0x00, 0x20, 0x00, // 0x106: inc qword ds:0x200098
    0x58, // 0x10e: pop rax
    0x48, 0xcf, // 0x10f: iretq
    // gp_handler:
    0x50, // 0x111: push rax
    0x48, 0x8b, 0x44, 0x24, 0x08, // 0x112: mov rax,qword [rsp+0x8]
    0x48, 0x89, 0x04, 0x25, 0xa0, 0x00, 0x20, 0x00, // 0x117: mov qword ds:0x2000a0,rax
    0x48, 0x83, 0x44, 0x24, 0x10, 0x07, // 0x11f: add qword [rsp+0x10],0x7
    0x48, 0xff, 0x04, 0x25, 0xa8, 0x00, 0x20, 0x00, // 0x125: inc qword ds:0x2000a8
    0x58, // 0x12d: pop rax
    0x48, 0x83, 0xc4, 0x08, // 0x12e: add rsp,0x8
    0x48, 0xcf, // 0x132: iretq
];

/// Ends the VM when every vCPU has reported `DONE` on the port (code 0), or at once on any
/// other byte (code 1).
struct DonePort {
    exit: ExitRequest,
    waiting: AtomicUsize,
}

impl PioDevice for DonePort {
    fn read(&self, _vcpu: usize, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, vcpu: usize, _port: u16, data: &[u8]) {
        if data[0] != DONE {
            self.exit
                .request(1, &format!("vCPU {vcpu} reported {:#x}", data[0]));
        } else if self.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.exit.request(0, "every vCPU reported DONE");
        }
    }
}

fn data_u64(mem: &GuestMemoryMmap, off: u64) -> u64 {
    mem.read_obj(GuestAddress(DATA_GPA + off)).unwrap()
}

/// What a run left behind.
struct Outcome {
    ram: GuestRam,
    stats: Arc<EmulationStats>,
    code: Option<i32>,
    /// MXCSR in the vCPU's state after the run (KVM_GET_XSAVE).
    mxcsr: u32,
}

/// Fills the data and IDT that `CODE` expects.
fn prepare_program(mem: &GuestMemoryMmap) {
    mem.write_obj(u64::MAX, GuestAddress(DATA_GPA + 0x100))
        .unwrap();
    mem.write_obj(MXCSR_GOOD, GuestAddress(DATA_GPA + 0x110))
        .unwrap();
    mem.write_obj(MXCSR_RESERVED, GuestAddress(DATA_GPA + 0x114))
        .unwrap();
    mem.write_slice(&CAS_INITIAL.to_le_bytes(), GuestAddress(DATA_GPA + 0x200))
        .unwrap();
    mem.write_slice(
        &idt_gate(CODE_GPA + BP_HANDLER),
        GuestAddress(IDT_GPA + 3 * 16),
    )
    .unwrap();
    mem.write_slice(
        &idt_gate(CODE_GPA + GP_HANDLER),
        GuestAddress(IDT_GPA + 13 * 16),
    )
    .unwrap();
}

/// Runs `code` on one vCPU at CPL 0 (see [`run_on`]).
fn run(code: &[u8], prepare: impl FnOnce(&GuestMemoryMmap)) -> Outcome {
    run_on(1, code, prepare, EmulationHooks::default())
}

/// Runs `code` on `cpus` vCPUs at CPL 0 (RDI = vCPU id, own stacks, an IDT at IDT_GPA) after
/// `prepare` filled guest memory, until every vCPU reported DONE or two minutes pass.
fn run_on(
    cpus: u8,
    code: &[u8],
    prepare: impl FnOnce(&GuestMemoryMmap),
    emulation: EmulationHooks,
) -> Outcome {
    let ram = GuestRam::new(64 << 20, BackingKind::Small).unwrap();
    let mem = ram.memory();
    mem.write_slice(code, GuestAddress(CODE_GPA)).unwrap();
    prepare(mem);
    let vm = Vm::new(&ram, cpus).unwrap();
    let mut fds = Vec::new();
    for id in 0..cpus {
        let fd = long_mode_vcpu(&vm, mem, ram.size(), id, CODE_GPA, 0);
        let mut sregs = fd.get_sregs().unwrap();
        sregs.idt.base = IDT_GPA;
        sregs.idt.limit = 256 * 16 - 1;
        fd.set_sregs(&sregs).unwrap();
        fds.push(fd);
    }

    let exit = ExitRequest::new().unwrap();
    let mut bus = IoBus::new();
    let done = DonePort {
        exit: exit.clone(),
        waiting: AtomicUsize::new(cpus.into()),
    };
    bus.register(DONE_PORT..=DONE_PORT, Arc::new(done)).unwrap();
    let mut ctl = VmControl::start_with_emulation(
        fds,
        Arc::new(bus),
        mem.clone(),
        exit.clone(),
        VcpuHooks::default(),
        emulation,
    )
    .unwrap();
    let stats = ctl.emulation_stats().clone();
    let code = exit.wait_timeout(Duration::from_secs(120));
    ctl.pause_all().unwrap();
    let mxcsr = ctl
        .with_paused_vcpu(0, |fd| fd.get_xsave().unwrap().region[6])
        .unwrap();
    ctl.stop_all();
    drop(vm);
    Outcome {
        ram,
        stats,
        code,
        mxcsr,
    }
}

#[test]
fn emulated_instructions_give_architectural_results() {
    if !common::kvm_or_skip("emulated_instructions_give_architectural_results") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    assert_eq!(CODE[BP_HANDLER as usize], 0x50, "listing offsets");
    assert_eq!(CODE[GP_HANDLER as usize], 0x50, "listing offsets");
    assert_eq!(CODE[AFTER_INT3 as usize - 1], 0xcc, "listing offsets");

    let Outcome {
        ram,
        stats,
        code,
        mxcsr,
    } = run(CODE, prepare_program);
    eprintln!("emulated on this KVM: {}", stats.to_json());
    assert_eq!(
        code,
        Some(0),
        "the program ran to its end (2: a vCPU failed, see the log)"
    );
    let mem = ram.memory();
    let d = |off| data_u64(mem, off);

    // popcnt
    assert_eq!(d(0x00), 8, "popcnt rbx, rax (0xf0f0)");
    assert_eq!(d(0x08) & ZF, 0, "nonzero source: ZF clear");
    assert_eq!(d(0x10), 32, "popcnt ecx, dword [rdi+0x100] (all ones)");
    assert_eq!(
        d(0x18),
        0x1111_2222_3333_0008,
        "popcnt dx, ax keeps rdx 63:16"
    );
    let zero_flags = d(0x20);
    assert_eq!(zero_flags & ZF, ZF, "zero source: ZF set");
    assert_eq!(
        zero_flags & (CF | PF | AF | SF | OF),
        0,
        "other arithmetic flags clear"
    );
    assert_eq!(d(0x28), 0, "popcnt r9, rax (0)");
    assert_eq!(d(0x30), 3, "popcnt r10, [rip + pattern] (7)");
    // stac / clac
    assert_eq!(d(0x38) & AC, AC, "stac sets AC");
    assert_eq!(d(0x40) & AC, 0, "clac clears AC");
    // fwait
    assert_eq!(d(0x48), 1, "ran past fwait");
    // cmpxchg16b
    assert_eq!(d(0x50) & ZF, ZF, "matching cmpxchg16b sets ZF");
    assert_eq!(d(0x58) & ZF, 0, "mismatching cmpxchg16b clears ZF");
    assert_eq!(
        (d(0x60), d(0x68)),
        (0x1111, 0x2222),
        "mismatch loads rdx:rax"
    );
    assert_eq!(
        (d(0x200), d(0x208)),
        (0x1111, 0x2222),
        "the match stored rcx:rbx, the mismatch stored nothing"
    );
    // ldmxcsr
    assert_eq!(d(0x70) as u32, MXCSR_GOOD, "ldmxcsr then stmxcsr");
    assert_eq!(d(0xa8), 1, "a reserved MXCSR bit raised one #GP");
    assert_eq!(d(0xa0), 0, "#GP error code 0");
    assert_eq!(
        d(0x78) as u32,
        MXCSR_GOOD,
        "the faulting ldmxcsr changed nothing"
    );
    assert_eq!(mxcsr, MXCSR_GOOD, "the vCPU's own MXCSR (KVM_GET_XSAVE)");
    // int3
    assert_eq!(d(0x98), 1, "#BP handler ran once");
    assert_eq!(
        d(0x90),
        CODE_GPA + AFTER_INT3,
        "#BP return address is after int3"
    );
    assert_eq!(d(0x80), 1, "iretq came back after int3");

    // Counters: each kind exited for all of its instances or for none. Measured on this
    // host's kvm_pvm (2026-12-05): every kind exits, each instance.
    let json = stats.to_json();
    for (kind, n) in IN_PROGRAM {
        let c = stats.count(kind);
        assert!(c == 0 || c == n, "{kind}: {c} emulated of {n}");
        assert_eq!(json[kind.name()], c);
    }
}

/// An instruction this KVM stops on and the fallback does not handle (`pxor xmm0, xmm0`,
/// measured) still fails the vCPU with exit code 2, as before the fallback existed.
#[test]
fn unhandled_instruction_still_fails_the_vcpu() {
    if !common::kvm_or_skip("unhandled_instruction_still_fails_the_vcpu") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x66, 0x0f, 0xef, 0xc0, // pxor xmm0, xmm0
        0x66, 0xba, 0x10, 0x05, // mov dx, 0x510
        0xb0, DONE,             // mov al, DONE
        0xee,                   // out dx, al
        0xf4,                   // hlt
    ];
    let Outcome { stats, code, .. } = run(code, |_| ());
    if code == Some(0) {
        eprintln!("skipped: this KVM emulates pxor itself; nothing to check");
        return;
    }
    assert_eq!(code, Some(2), "the vCPU failed and stopped the VM");
    assert_eq!(stats.total(), 0, "nothing was emulated");
}

/// Two vCPUs each add 1 to both halves of one 16-byte counter 2000 times with a
/// `lock cmpxchg16b` retry loop. Both vCPUs' instructions are emulated on their own threads at
/// once, so a lost update or a torn half would show in the final value.
#[test]
fn cmpxchg16b_is_atomic_across_vcpus() {
    if !common::kvm_or_skip("cmpxchg16b_is_atomic_across_vcpus") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    const PER_VCPU: u64 = 2000;
    const COUNTER: u64 = DATA_GPA + 0x200;
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xbe, 0x00, 0x02, 0x20, 0x00,       // 0x00: mov esi, 0x200200 (COUNTER)
        0x41, 0xb8, 0xd0, 0x07, 0x00, 0x00, // 0x05: mov r8d, 2000
        0x48, 0x8b, 0x06,                   // 0x0b: mov rax, [rsi]
        0x48, 0x8b, 0x56, 0x08,             // 0x0e: mov rdx, [rsi + 8]
        0x48, 0x8d, 0x58, 0x01,             // 0x12: lea rbx, [rax + 1]
        0x48, 0x8d, 0x4a, 0x01,             // 0x16: lea rcx, [rdx + 1]
        0xf0, 0x48, 0x0f, 0xc7, 0x0e,       // 0x1a: lock cmpxchg16b [rsi]
        0x75, 0xf1,                         // 0x1f: jne 0x12 (rdx:rax reloaded)
        0x41, 0xff, 0xc8,                   // 0x21: dec r8d
        0x75, 0xe5,                         // 0x24: jne 0x0b
        0x66, 0xba, 0x10, 0x05,             // 0x26: mov dx, 0x510
        0xb0, DONE,                         // 0x2a: mov al, DONE
        0xee,                               // 0x2c: out dx, al
        0xf4,                               // 0x2d: hlt
        0xeb, 0xfd,                         // 0x2e: jmp 0x2d
    ];
    let o = run_on(2, code, |_| (), EmulationHooks::default());
    assert_eq!(o.code, Some(0), "both vCPUs finished");
    let mem = o.ram.memory();
    let lo: u64 = mem.read_obj(GuestAddress(COUNTER)).unwrap();
    let hi: u64 = mem.read_obj(GuestAddress(COUNTER + 8)).unwrap();
    assert_eq!(
        (lo, hi),
        (2 * PER_VCPU, 2 * PER_VCPU),
        "no lost or torn update"
    );
    let n = o.stats.count(Kind::Cmpxchg16b);
    eprintln!("cmpxchg16b emulated {n} times (retries included)");
    assert!(
        n == 0 || n >= 2 * PER_VCPU,
        "all of them exited or none: {n}"
    );
}

/// With a host-change gate that a migration is tracking, the guest RAM the fallback writes
/// (cmpxchg16b, stmxcsr: all in the data page) is marked in the migration's VMM log, and
/// nothing else is: the guest's own writes are KVM's dirty log's business.
#[test]
fn emulated_writes_are_marked_for_a_tracking_migration() {
    if !common::kvm_or_skip("emulated_writes_are_marked_for_a_tracking_migration") {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let gate = Arc::new(HostChanges::new());
    type Saved = (Vec<SlotInfo>, Arc<VmmDirty>);
    let log = Arc::new(std::sync::Mutex::new(None::<Saved>));
    let (gate2, log2) = (gate.clone(), log.clone());
    let emulation = EmulationHooks {
        host_changes: Some(gate),
        ..Default::default()
    };
    let o = run_on(
        1,
        CODE,
        |mem| {
            prepare_program(mem);
            let slots: Vec<SlotInfo> = mem
                .iter()
                .enumerate()
                .map(|(i, r)| SlotInfo {
                    slot: i as u32,
                    gpa: r.start_addr().0,
                    len: r.len(),
                    host_addr: r.as_ptr() as u64,
                })
                .collect();
            let vmm_log = Arc::new(VmmDirty::new(&slots));
            gate2.track(vmm_log.clone());
            *log2.lock().unwrap() = Some((slots, vmm_log));
        },
        emulation,
    );
    assert_eq!(o.code, Some(0));
    let (slots, vmm_log) = log.lock().unwrap().take().unwrap();
    let mut marked = DirtyBitmap::empty(&slots);
    vmm_log.take_into(&mut marked);
    let pages: Vec<u64> = marked.iter().collect();
    if o.stats.count(Kind::Cmpxchg16b) + o.stats.count(Kind::Stmxcsr) == 0 {
        assert!(pages.is_empty(), "nothing emulated wrote: {pages:x?}");
    } else {
        assert_eq!(
            pages,
            vec![DATA_GPA],
            "only the data page, written by the fallback"
        );
    }
}
