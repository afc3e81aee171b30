//! vCPU and VM state on real KVM: distinctive values survive capture, encoding, a stream and
//! restore into a fresh VM; and a running guest moves from VM A to VM B (RAM through the stream,
//! state through its chunks) and continues counting where it stopped.

use std::os::unix::net::UnixStream;
use std::thread;

use kvm_bindings::{
    kvm_mp_state, kvm_msr_entry, Msrs, KVM_MP_STATE_HALTED, KVM_VCPUEVENT_VALID_NMI_PENDING,
};
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::{configure_vcpu, long_mode};
use vmm::hypervisor::Vm;
use vmm::hypervisor::{Vcpu, VcpuOps, VmExit, VmOps};
use vmm::memory::{BackingKind, GuestRam};
use vmm::migrate::ram::{apply_chunk, RamSender};
use vmm::migrate::state::{
    complete_pending_io, restore_vcpu, restore_vm, save_vcpu, save_vm, VcpuCaps, VcpuState, VmState,
};
use vmm::migrate::{Chunk, Layout, StreamReader, StreamWriter, DEVICE_KVM_VM};

const RAM: u64 = 64 << 20;
const CODE_GPA: u64 = 0x10_0000;
const COUNTER_GPA: u64 = 0x20_0000;
const PML4_GPA: u64 = 0x1000;
const GDT_GPA: u64 = 0x500;
const PORT: u16 = 0x510;

// MSR indices (Intel SDM Vol. 4 Table 2-2) and LAPIC register offsets (SDM Vol. 3A Table 11-1).
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
use vmm::arch::x86_64::msrs::MSR_LSTAR;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const APIC_TPR: usize = 0x80;
const APIC_LVT_TIMER: usize = 0x320;
const APIC_TIMER_ICR: usize = 0x380;

/// A 1-vCPU VM over fresh RAM with `code` at CODE_GPA, in 64-bit mode at its entry.
fn vm_with_code(code: &[u8]) -> (GuestRam, Vm, Vcpu) {
    let ram = GuestRam::new(RAM, BackingKind::Small).unwrap();
    ram.memory()
        .write_slice(code, GuestAddress(CODE_GPA))
        .unwrap();
    let vm = Vm::new(&ram, 1).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    configure_vcpu(&vm, &vcpu, 0).unwrap();
    long_mode::setup(
        ram.memory(),
        &vcpu,
        long_mode::LongModeConfig {
            pml4_gpa: PML4_GPA,
            identity_map_bytes: ram.size(),
            gdt_gpa: GDT_GPA,
            entry: CODE_GPA,
            rsp: 0x8_0000,
            rsi: 0,
            rdi: 0,
        },
    )
    .unwrap();
    (ram, vm, vcpu)
}

/// An empty VM with one vCPU that only KVM_CREATE_VCPU touched.
fn fresh_vm() -> (GuestRam, Vm, Vcpu) {
    let ram = GuestRam::new(RAM, BackingKind::Small).unwrap();
    let vm = Vm::new(&ram, 1).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    (ram, vm, vcpu)
}

fn lapic_reg(l: &kvm_bindings::kvm_lapic_state, off: usize) -> u32 {
    let b: Vec<u8> = l.regs[off..off + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes(b.try_into().unwrap())
}

fn set_lapic_reg(l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        l.regs[off + i] = b as _;
    }
}

#[test]
fn distinctive_state_survives_capture_encode_restore_into_a_fresh_vm() {
    if !crate::common::kvm_or_skip(
        "distinctive_state_survives_capture_encode_restore_into_a_fresh_vm",
    ) {
        return;
    }
    let (_ram_a, vm_a, vcpu_a) = vm_with_code(&[0xf4]);

    // Distinctive values everywhere.
    let mut regs = vcpu_a.get_regs().unwrap();
    regs.rax = 0x1111_2222_3333_4444;
    regs.rbx = 0xdead_beef;
    regs.r15 = 0x0f0f_0f0f_f0f0_f0f0;
    regs.rip = CODE_GPA + 0x40;
    vcpu_a.set_regs(&regs).unwrap();
    let mut fpu = vcpu_a.get_fpu().unwrap();
    fpu.xmm[3] = [0x5a; 16];
    fpu.mxcsr = 0x1f80 | 0x40; // default plus DAZ
    vcpu_a.set_fpu(&fpu).unwrap();
    // KVM_SET_FPU drops MXCSR here (measured); the guest's own `ldmxcsr` (or the emulation
    // fallback's) lands in the XSAVE image, word 6 (Intel SDM Vol. 1 §10.5.1, Table 10-2).
    let mut xs = vcpu_a.get_xsave().unwrap();
    xs.region[6] = 0x1fc0; // default plus DAZ
    xs.region[128] |= 0b11; // XSTATE_BV: x87 and SSE present, as `ldmxcsr` leaves them
                            // SAFETY: a whole kvm_xsave read from this vCPU, one word changed.
    unsafe { vcpu_a.set_xsave(&xs) }.unwrap();
    let msrs = [
        (MSR_KERNEL_GS_BASE, 0xffff_8888_0000_1000),
        (MSR_LSTAR, 0xffff_ffff_8100_0000),
        (MSR_IA32_SYSENTER_EIP, 0xabcd_e000),
    ];
    let entries: Vec<_> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    assert_eq!(
        vcpu_a
            .set_msrs(&Msrs::from_entries(&entries).unwrap())
            .unwrap(),
        3
    );
    let mut lapic = vcpu_a.get_lapic().unwrap();
    set_lapic_reg(&mut lapic, APIC_TPR, 0x20);
    set_lapic_reg(&mut lapic, APIC_LVT_TIMER, 0x0001_00ef); // masked, vector 0xef
    vcpu_a.set_lapic(&lapic).unwrap();
    // A pending NMI and a halted vCPU: events and MP state must come back as they were.
    let mut events = vcpu_a.get_vcpu_events().unwrap();
    events.nmi.pending = 1;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
    vcpu_a.set_vcpu_events(&events).unwrap();
    vcpu_a
        .set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_HALTED,
        })
        .unwrap();
    let mut pit = vm_a.get_pit2().unwrap();
    pit.channels[2].count = 0x1234;
    vm_a.set_pit2(&pit).unwrap();

    let caps = VcpuCaps::probe(&vm_a).unwrap();
    println!(
        "KVM here: XCRS {}, {} MSRs in the save list",
        caps.xcrs,
        caps.msr_indices.len()
    );
    let saved = save_vcpu(&vcpu_a, 0, &caps).unwrap();
    let vm_saved = save_vm(&vm_a).unwrap();
    println!("XCRs saved: {}", saved.xcrs.is_some());
    for (index, data) in msrs {
        assert_eq!(saved.msr(index), Some(data), "MSR {index:#x} captured");
    }
    assert_eq!(lapic_reg(&saved.lapic, APIC_TPR), 0x20);
    assert_eq!(saved.events.nmi.pending, 1);
    assert_eq!(saved.mp_state.mp_state, KVM_MP_STATE_HALTED);
    assert!(
        saved.msrs.len() > msrs.len(),
        "the index list gives more than the three we set"
    );

    // Through the encoding and a real stream.
    let lay = Layout::new(1, [(0, RAM)]);
    let mut w = StreamWriter::new(Vec::new(), &lay).unwrap();
    w.device(DEVICE_KVM_VM, &vm_saved.encode().unwrap())
        .unwrap();
    w.vcpu(0, &saved.encode().unwrap()).unwrap();
    w.end().unwrap();
    let bytes = w.into_inner().unwrap();
    let (mut r, _) = StreamReader::new(&bytes[..], &lay).unwrap();
    let vm_back = match r.next_chunk().unwrap() {
        Chunk::Device { name, blob } if name == DEVICE_KVM_VM => VmState::decode(blob).unwrap(),
        c => panic!("{c:?}"),
    };
    let back = match r.next_chunk().unwrap() {
        Chunk::Vcpu { id: 0, blob } => VcpuState::decode(blob).unwrap(),
        c => panic!("{c:?}"),
    };
    assert_eq!(back, saved, "encoding is lossless");
    assert!(VcpuState::decode(&bytes[20..60]).is_err());

    let (_ram_b, vm_b, vcpu_b) = fresh_vm();
    restore_vm(&vm_b, &vm_back).unwrap();
    restore_vcpu(&vcpu_b, &back, &caps).unwrap();
    let again = save_vcpu(&vcpu_b, 0, &caps).unwrap();
    let vm_again = save_vm(&vm_b).unwrap();

    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.sregs, saved.sregs);
    assert_eq!(again.fpu, saved.fpu);
    if caps.xsave {
        assert_eq!(
            vcpu_b.get_xsave().unwrap().region[6],
            0x1fc0,
            "MXCSR moved with the XSAVE image"
        );
        assert_eq!(again.xsave, saved.xsave);
    }
    assert_eq!(again.xcrs, saved.xcrs);
    assert_eq!(again.debugregs, saved.debugregs);
    assert_eq!(again.cpuid, saved.cpuid);
    assert_eq!(again.events, saved.events);
    assert_eq!(again.mp_state, saved.mp_state);
    assert_eq!(
        again.lapic.regs[..APIC_TIMER_ICR],
        saved.lapic.regs[..APIC_TIMER_ICR],
        "LAPIC registers up to the timer count"
    );
    let idx = |s: &VcpuState| s.msrs.iter().map(|m| m.index).collect::<Vec<_>>();
    assert_eq!(idx(&again), idx(&saved), "the same MSRs come back");
    for (a, b) in again.msrs.iter().zip(&saved.msrs) {
        if a.index == MSR_IA32_TSC {
            assert!(a.data >= b.data, "TSC restored, then moved on");
        } else {
            assert_eq!(a.data, b.data, "MSR {:#x}", a.index);
        }
    }
    for (name, a, b) in [
        ("PIC master", &vm_again.pic_master, &vm_saved.pic_master),
        ("PIC slave", &vm_again.pic_slave, &vm_saved.pic_slave),
        ("IOAPIC", &vm_again.ioapic, &vm_saved.ioapic),
    ] {
        assert_eq!(
            postcard::to_stdvec(a).unwrap(),
            postcard::to_stdvec(b).unwrap(),
            "{name}"
        );
    }
    assert_eq!(vm_again.pit.channels[2].count, 0x1234);
    assert_eq!(vm_again.pit.flags, vm_saved.pit.flags);
    assert!(
        vm_again.clock.clock >= vm_saved.clock.clock,
        "kvmclock continues from the saved value"
    );
}

/// mov dx, PORT; loop: inc rbx; inc qword [COUNTER_GPA]; mov eax, ebx; out dx, eax; jmp loop
fn counting_guest() -> Vec<u8> {
    let p = PORT.to_le_bytes();
    let c = (COUNTER_GPA as u32).to_le_bytes();
    vec![
        0x66, 0xba, p[0], p[1], // mov dx, PORT
        0x48, 0xff, 0xc3, // loop: inc rbx
        0x48, 0xff, 0x04, 0x25, c[0], c[1], c[2], c[3], // inc qword [COUNTER_GPA]
        0x89, 0xd8, // mov eax, ebx
        0xef, // out dx, eax
        0xeb, 0xf0, // jmp loop (-16)
    ]
}

/// Runs until `n` outs to PORT; returns their values.
fn run_outs(vcpu: &mut Vcpu, n: usize) -> Vec<u32> {
    let mut seen = Vec::with_capacity(n);
    while seen.len() < n {
        match vcpu.run().expect("KVM_RUN") {
            VmExit::IoOut(port, data) => {
                assert_eq!(port, PORT);
                seen.push(u32::from_le_bytes(data.try_into().unwrap()));
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    seen
}

#[test]
fn a_running_guest_moves_to_a_fresh_vm_and_keeps_counting() {
    if !crate::common::kvm_or_skip("a_running_guest_moves_to_a_fresh_vm_and_keeps_counting") {
        return;
    }
    let (ram_a, vm_a, mut vcpu_a) = vm_with_code(&counting_guest());
    let mut regs = vcpu_a.get_regs().unwrap();
    regs.rbx = 1000;
    vcpu_a.set_regs(&regs).unwrap();
    ram_a
        .memory()
        .write_obj(5000u64, GuestAddress(COUNTER_GPA))
        .unwrap();

    let on_a = run_outs(&mut vcpu_a, 50);
    assert_eq!(on_a, (1001..=1050).collect::<Vec<u32>>());

    // Pause point: out of KVM_RUN after an I/O exit; finish it before reading state.
    complete_pending_io(&mut vcpu_a).unwrap();
    let caps = VcpuCaps::probe(&vm_a).unwrap();
    let vstate = save_vcpu(&vcpu_a, 0, &caps).unwrap();
    let vmstate = save_vm(&vm_a).unwrap();
    let counter_a: u64 = ram_a.memory().read_obj(GuestAddress(COUNTER_GPA)).unwrap();
    assert_eq!(counter_a, 5050);

    // Source: RAM + state over a unix socket pair; destination reads it into VM B.
    let lay = Layout::new(1, ram_a.regions().map(|r| (r.gpa, r.len)));
    let (src_sock, dst_sock) = UnixStream::pair().unwrap();
    let lay_dst = lay.clone();
    let dest = thread::spawn(move || {
        let (ram_b, vm_b, vcpu_b) = fresh_vm();
        let (mut r, _) = StreamReader::new(dst_sock, &lay_dst).unwrap();
        let (mut vcpu_blob, mut vm_blob) = (None, None);
        loop {
            let c = r.next_chunk().unwrap();
            if apply_chunk(ram_b.memory(), &c).unwrap() {
                continue;
            }
            match c {
                Chunk::Vcpu { id: 0, blob } => vcpu_blob = Some(VcpuState::decode(blob).unwrap()),
                Chunk::Device { name, blob } if name == DEVICE_KVM_VM => {
                    vm_blob = Some(VmState::decode(blob).unwrap())
                }
                Chunk::End => break,
                c => panic!("unexpected {c:?}"),
            }
        }
        let caps = VcpuCaps::probe(&vm_b).unwrap();
        restore_vm(&vm_b, &vm_blob.unwrap()).unwrap();
        restore_vcpu(&vcpu_b, &vcpu_blob.unwrap(), &caps).unwrap();
        (ram_b, vm_b, vcpu_b, r.bytes_read())
    });
    let mut w = StreamWriter::new(src_sock, &lay).unwrap();
    let mut sender = RamSender::new();
    for r in ram_a.regions() {
        sender
            .send_range(&mut w, ram_a.memory(), r.gpa, r.len, None)
            .unwrap();
    }
    w.device(DEVICE_KVM_VM, &vmstate.encode().unwrap()).unwrap();
    w.vcpu(0, &vstate.encode().unwrap()).unwrap();
    w.end().unwrap();
    let sent = w.bytes_written();
    let (ram_b, _vm_b, mut vcpu_b, received) = dest.join().unwrap();
    assert_eq!(sent, received);
    assert!(
        sender.zero_pages > sender.data_pages,
        "a mostly empty 64 MiB guest travels mostly as zero runs ({} data, {} zero pages, {sent} bytes)",
        sender.data_pages,
        sender.zero_pages
    );

    let on_b = run_outs(&mut vcpu_b, 50);
    assert_eq!(
        on_b,
        (1051..=1100).collect::<Vec<u32>>(),
        "the counter continues on VM B"
    );
    complete_pending_io(&mut vcpu_b).unwrap();
    assert_eq!(vcpu_b.get_regs().unwrap().rbx, 1100);
    let counter_b: u64 = ram_b.memory().read_obj(GuestAddress(COUNTER_GPA)).unwrap();
    assert_eq!(counter_b, 5100, "guest memory came along and kept counting");
}
