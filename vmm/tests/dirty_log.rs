//! The kernel selftest dirty_log_test's rule on real KVM, in every dirty-tracking mode: every
//! page whose content changed after a harvest returned is dirty in the next harvest (or, when
//! the write raced with that harvest's clear, in the one after), and after the guest stopped
//! (vCPUs paused, then `DirtyTracker::settle`, as the migration's last round does), the final
//! harvest holds every change. Also: with the guest stopped, a harvest reports no page of the
//! test area (precision, strict in every mode), and the VMM's own writes are merged in.
//!
//! The vCPUs run on the VMM's own run loop (`VmControl::start_with_hooks`), which answers
//! `KVM_EXIT_DIRTY_RING_FULL` through the tracker's hook.
//!
//! The guest (ring 3, see `GUEST_ASM`) writes unique values `vcpu << 56 | counter` at offset
//! `8 * vcpu` of pages picked by a per-vCPU xorshift PRNG in a test area, until the host raises
//! a stop flag. The host harvests and snapshots the area while it runs.

mod common;

use common::vm::{long_mode_vcpu, PML4_GPA};

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::long_mode;
use vmm::devices::IoBus;
use vmm::dirty::{DirtyBitmap, DirtyMode, DirtyTracker};
use vmm::exit::{ExitRequest, EXIT_VCPU_FAILED};
use vmm::hypervisor::Vm;
use vmm::hypervisor::{Vcpu, VcpuOps};
use vmm::memory::{BackingKind, GuestRam};
use vmm::pager::{Pager, PagerConfig};
use vmm::vcpu::{VcpuHooks, VmControl};

const MEM: u64 = 64 << 20;
const CODE_GPA: u64 = 0x10_0000;
const PARAMS_GPA: u64 = 0x20_0000;
const AREA_GPA: u64 = 0x40_0000;
/// Pages in the test area (a power of two: the guest masks its PRNG with PAGES - 1).
const PAGES: u64 = 2048;
const VCPUS: u8 = 2;
const STOP_PORT: u16 = 0x510;
/// x86 page-table entry bits (Intel SDM Vol. 3A §4.5, Table 4-19): present, user.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_USER: u64 = 1 << 2;
/// Accessed and Dirty (same table; D is ignored in non-leaf entries).
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
/// RFLAGS.IOPL = 3 (Intel SDM Vol. 1 §3.4.3.3): ring-3 port I/O.
const RFLAGS_IOPL_3: u64 = 3 << 12;

// Parameters at PARAMS_GPA: [0] area base, [8] page mask, [16] stop flag.
// rdi = vCPU id. Writes `vcpu << 56 | n` at area + page * 4096 + vcpu * 8; checks the stop
// flag every 256 writes and leaves through an `out` to STOP_PORT.
core::arch::global_asm!(
    ".pushsection .text.dirty_test_guest, \"ax\"",
    ".global dirty_test_guest_start",
    ".global dirty_test_guest_end",
    "dirty_test_guest_start:",
    "mov r10, [rsi]",
    "mov r11, [rsi + 8]",
    "mov r9, rdi",
    "shl r9, 56",
    "lea rax, [rdi + 1]",
    "mov rcx, 0x9E3779B97F4A7C15",
    "imul rax, rcx",
    "mov r8, rax",
    "lea rbx, [rdi * 8]",
    "2:",
    "mov rax, r8",
    "shl rax, 13",
    "xor r8, rax",
    "mov rax, r8",
    "shr rax, 7",
    "xor r8, rax",
    "mov rax, r8",
    "shl rax, 17",
    "xor r8, rax",
    "mov rax, r8",
    "and rax, r11",
    "shl rax, 12",
    "add rax, r10",
    "inc r9",
    "mov [rax + rbx], r9",
    "test r9b, r9b",
    "jnz 2b",
    "cmp qword ptr [rsi + 16], 0",
    "je 2b",
    "mov dx, {port}",
    "out dx, al",
    "jmp 2b",
    "dirty_test_guest_end:",
    ".popsection",
    port = const STOP_PORT,
);

extern "C" {
    static dirty_test_guest_start: u8;
    static dirty_test_guest_end: u8;
}

fn guest_code() -> &'static [u8] {
    // SAFETY: both symbols delimit the guest's bytes in this binary's text section.
    unsafe {
        let start = std::ptr::addr_of!(dirty_test_guest_start);
        let end = std::ptr::addr_of!(dirty_test_guest_end);
        std::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// Guest RAM with code, parameters and ring-3 identity paging written.
fn guest_ram() -> GuestRam {
    let ram = GuestRam::new(MEM, BackingKind::Small).unwrap();
    let mem = ram.memory();
    mem.write_slice(guest_code(), GuestAddress(CODE_GPA))
        .unwrap();
    mem.write_obj(AREA_GPA, GuestAddress(PARAMS_GPA)).unwrap();
    mem.write_obj(PAGES - 1, GuestAddress(PARAMS_GPA + 8))
        .unwrap();
    mem.write_obj(0u64, GuestAddress(PARAMS_GPA + 16)).unwrap();
    ram
}

fn make_vcpu(vm: &Vm, mem: &GuestMemoryMmap, id: u8) -> Vcpu {
    let fd = long_mode_vcpu(vm, mem, MEM, id, CODE_GPA, PARAMS_GPA);
    // Ring 3 with IOPL 3: this KVM runs ring-3 guest code natively (ring 0 is interpreted).
    let mut sregs = fd.get_sregs().unwrap();
    for seg in [
        &mut sregs.cs,
        &mut sregs.ss,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        seg.dpl = 3;
        seg.selector |= 3;
    }
    fd.set_sregs(&sregs).unwrap();
    let mut regs = fd.get_regs().unwrap();
    regs.rflags |= RFLAGS_IOPL_3;
    fd.set_regs(&regs).unwrap();
    fd
}

/// Makes the identity tables user-accessible; with `preset_ad`, also sets Accessed and Dirty in
/// every entry, so that KVM never writes them (see the stage2-wp test).
fn make_tables_user(mem: &GuestMemoryMmap, preset_ad: bool) {
    let len = long_mode::page_table_bytes(MEM) as usize;
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(PML4_GPA)).unwrap();
    for e in bytes.chunks_exact_mut(8) {
        let v = u64::from_le_bytes(e.try_into().unwrap());
        if v & PTE_PRESENT != 0 {
            let ad = if preset_ad {
                PTE_ACCESSED | PTE_DIRTY
            } else {
                0
            };
            e.copy_from_slice(&(v | PTE_USER | ad).to_le_bytes());
        }
    }
    mem.write_slice(&bytes, GuestAddress(PML4_GPA)).unwrap();
}

/// Starts `fds` on the VMM's own run loop with `tracker`'s ring-full hook; returns their
/// control and the exit latch a failing vCPU sets.
fn run_vcpus(
    fds: Vec<Vcpu>,
    ram: &GuestRam,
    tracker: &Arc<DirtyTracker>,
) -> (VmControl, ExitRequest) {
    let exit = ExitRequest::new().unwrap();
    let hooks = VcpuHooks {
        dirty_ring_full: Some(tracker.ring_full_hook()),
    };
    let ctl = VmControl::start_with_hooks(
        fds,
        Arc::new(IoBus::new()),
        ram.memory().clone(),
        exit.clone(),
        hooks,
    )
    .unwrap();
    (ctl, exit)
}

/// The area's words as the host sees them: `[page][vcpu]`.
fn snapshot(ram: &GuestRam) -> Vec<u64> {
    let host = ram.gpa_to_host(AREA_GPA).unwrap();
    let mut out = Vec::with_capacity((PAGES * u64::from(VCPUS)) as usize);
    for p in 0..PAGES {
        for v in 0..u64::from(VCPUS) {
            let addr = (host + p * 4096 + v * 8) as *const u64;
            // SAFETY: inside the live guest RAM mapping; the guest writes it concurrently, so a
            // volatile aligned 8-byte read (atomic on x86-64).
            out.push(unsafe { std::ptr::read_volatile(addr) });
        }
    }
    out
}

fn changed(a: &[u64], b: &[u64]) -> Vec<u64> {
    (0..PAGES)
        .filter(|&p| {
            let r = (p * u64::from(VCPUS)) as usize..((p + 1) * u64::from(VCPUS)) as usize;
            a[r.clone()] != b[r]
        })
        .collect()
}

fn page_gpa(p: u64) -> u64 {
    AREA_GPA + p * 4096
}

struct Outcome {
    harvests: usize,
    changed_pages: u64,
    ring_full_exits: u64,
}

/// One run: start the guest, harvest and snapshot `rounds` times while it writes, stop it,
/// harvest once more; check the rule at every step. Returns figures for the caller to print.
fn run_once(mode: DirtyMode, rounds: usize, pause: Duration) -> Result<Outcome, String> {
    let ram = guest_ram();
    let vm = Vm::new(&ram, VCPUS).unwrap();
    let regions: Vec<_> = ram.regions().collect();
    // KVM rings must be enabled before vCPUs exist; the pager registers RAM after the host
    // wrote the vCPUs' tables (those pages are present and never fault).
    let kvm_tracker = match mode {
        DirtyMode::Stage2Wp => None,
        _ => Some(DirtyTracker::new_kvm(&vm, &regions, mode).unwrap()),
    };
    let fds: Vec<Vcpu> = (0..VCPUS)
        .map(|id| make_vcpu(&vm, ram.memory(), id))
        .collect();
    make_tables_user(ram.memory(), mode == DirtyMode::Stage2Wp);
    let mut pager = None;
    let tracker = match kvm_tracker {
        Some(t) => t,
        None => {
            let mut cfg = PagerConfig::for_vcpus(VCPUS.into());
            cfg.write_tracking = true;
            let p = Arc::new(Pager::start(&ram, cfg).unwrap());
            pager = Some(p.clone());
            DirtyTracker::new_stage2(p, &regions).unwrap()
        }
    };
    let tracker = Arc::new(tracker);
    for (id, fd) in fds.iter().enumerate() {
        tracker.attach_vcpu(id, fd).unwrap();
    }

    // The first harvest (all pages in the bitmap mode: initially set) and its snapshot.
    let mut harvests: Vec<DirtyBitmap> = vec![tracker.harvest().unwrap()];
    let mut snaps = vec![snapshot(&ram)];

    // The production run loop (vcpu.rs), with the tracker's ring-full hook.
    let (mut ctl, exit) = run_vcpus(fds, &ram, &tracker);

    for _ in 0..rounds {
        std::thread::sleep(pause);
        harvests.push(tracker.harvest().unwrap());
        snaps.push(snapshot(&ram));
    }
    // Stop the guest: a VMM write, which the tracker must merge in (it is outside the area).
    ram.memory()
        .write_obj(1u64, GuestAddress(PARAMS_GPA + 16))
        .unwrap();
    tracker.vmm_writes().mark(PARAMS_GPA + 16, 8);
    // Out of the guest: nothing writes the area any more.
    ctl.pause_all().map_err(|e| e.to_string())?;
    if let Some(code) = exit.code() {
        return Err(format!("a vCPU failed (exit code {code}); see the log"));
    }
    // A write fault a vCPU took just before the pause may still be in a pager handler
    // (stage2-wp); settle waits until it is recorded, as the migration's last round does.
    tracker.settle().map_err(|e| e.to_string())?;
    harvests.push(tracker.harvest().unwrap());
    snaps.push(snapshot(&ram));
    // Nothing runs now, in any mode: one more harvest must not report any page of the area.
    let idle = tracker.harvest().unwrap();

    let last = harvests.len() - 1;
    if !harvests[last].is_dirty(PARAMS_GPA) {
        return Err("the VMM's own write (stop flag) is missing from the final harvest".into());
    }
    let mut changed_pages = 0;
    for k in 1..=last {
        let ch = changed(&snaps[k - 1], &snaps[k]);
        changed_pages += ch.len() as u64;
        for &p in &ch {
            let gpa = page_gpa(p);
            let ok = harvests[k].is_dirty(gpa) || (k < last && harvests[k + 1].is_dirty(gpa));
            if !ok {
                return Err(format!(
                    "{mode:?}: page {gpa:#x} changed between snapshots {} and {k} but is in neither harvest {k} nor {}",
                    k - 1,
                    k + 1
                ));
            }
        }
        // KVM may report a page it made writable without a guest write (shadow paging maps a
        // page writable when the guest PTE is dirty), so precision is checked only below, with
        // the guest stopped.
    }
    if let Some(gpa) = (0..PAGES).map(page_gpa).find(|&g| idle.is_dirty(g)) {
        return Err(format!(
            "{mode:?}: page {gpa:#x} reported by a harvest with the guest stopped"
        ));
    }
    if changed_pages == 0 {
        return Err(format!("{mode:?}: the guest wrote nothing"));
    }
    ctl.stop_all();
    let ring_full_exits = tracker.ring_full_exits();
    drop(tracker);
    if let Some(p) = pager {
        if let Ok(p) = Arc::try_unwrap(p) {
            p.stop();
        }
    }
    Ok(Outcome {
        harvests: harvests.len(),
        changed_pages,
        ring_full_exits,
    })
}

fn run_many(mode: DirtyMode, runs: usize) {
    if !common::kvm_or_skip("run_many") {
        return;
    }
    let mut passed = 0;
    let mut ring_full = 0;
    let mut changed = 0;
    let t0 = Instant::now();
    for i in 0..runs {
        match run_once(mode, 10, Duration::from_millis(8)) {
            Ok(o) => {
                passed += 1;
                ring_full += o.ring_full_exits;
                changed += o.changed_pages;
                assert!(o.harvests >= 10);
            }
            Err(e) => panic!("run {i} of {runs}: {e} ({passed} passed before)"),
        }
    }
    eprintln!(
        "{mode:?}: {passed}/{runs} runs passed in {:.1} s; {changed} changed pages checked, {ring_full} ring-full exits",
        t0.elapsed().as_secs_f64()
    );
}

/// The smallest ring KVM accepts: one host page (virt/kvm/kvm_main.c: at least PAGE_SIZE and at
/// least the reserved entries, 64 plus the PML buffer's 512 on hosts with PML, none here), so
/// 256 entries of which 192 fill before the ring-full exit. The guest dirties more pages than
/// that between harvests, so ring-full exits happen in most runs.
const SMALL_RING: DirtyMode = DirtyMode::KvmRing {
    ring_bytes: 4 << 10,
};

#[test]
fn dirty_log_rule_kvm_bitmap() {
    run_many(DirtyMode::KvmBitmap, 20);
}

#[test]
fn dirty_log_rule_kvm_ring() {
    run_many(SMALL_RING, 20);
}

/// Ring-full exits happen with the smallest ring, vcpu.rs's run loop answers them through the
/// tracker's hook (`VcpuHooks::dirty_ring_full`), and every entry they move reaches a harvest.
#[test]
fn dirty_log_rule_kvm_ring_full_exits() {
    if !common::kvm_or_skip("dirty_log_rule_kvm_ring_full_exits") {
        return;
    }
    let mut exits = 0;
    // Harvests 60 ms apart: a ring fills only with 192 pages written since the last reset,
    // which took 10-150 ms on this machine's software KVM (8 ms apart, none filled).
    for i in 0..5 {
        let o = run_once(SMALL_RING, 4, Duration::from_millis(60))
            .unwrap_or_else(|e| panic!("run {i}: {e}"));
        exits += o.ring_full_exits;
    }
    eprintln!("4 KiB rings: {exits} ring-full exits over 5 runs");
    assert!(exits > 0, "the guest never filled a 256-entry ring");
}

#[test]
fn dirty_log_rule_stage2_wp() {
    run_many(DirtyMode::Stage2Wp, 20);
}

#[test]
#[ignore = "long: 100 runs per mode (about a minute); run with --ignored"]
fn dirty_log_rule_100_runs_each_mode() {
    run_many(DirtyMode::KvmBitmap, 100);
    run_many(SMALL_RING, 100);
    run_many(DirtyMode::Stage2Wp, 100);
}

/// Rings made at the VM's start (as `vmm --dirty-mode kvm-ring --api-socket` does, in case a
/// migration comes) log nothing until the first harvest: no ring fills, however much the guest
/// writes. The first harvest starts logging (rings fill, harvests report the area), `stop`
/// ends it (no more ring-full exits), and a later harvest starts it again.
#[test]
fn rings_log_only_between_the_first_harvest_and_stop() {
    if !common::kvm_or_skip("rings_log_only_between_the_first_harvest_and_stop") {
        return;
    }
    const WATCH: Duration = Duration::from_millis(150);
    let ram = guest_ram();
    let vm = Vm::new(&ram, VCPUS).unwrap();
    let regions: Vec<_> = ram.regions().collect();
    let tracker = Arc::new(DirtyTracker::new_kvm(&vm, &regions, SMALL_RING).unwrap());
    let fds: Vec<Vcpu> = (0..VCPUS)
        .map(|id| make_vcpu(&vm, ram.memory(), id))
        .collect();
    make_tables_user(ram.memory(), false);
    for (id, fd) in fds.iter().enumerate() {
        tracker.attach_vcpu(id, fd).unwrap();
    }
    let (mut ctl, exit) = run_vcpus(fds, &ram, &tracker);
    let area_pages = |b: &DirtyBitmap| (0..PAGES).filter(|&p| b.is_dirty(page_gpa(p))).count();
    let before = snapshot(&ram);
    std::thread::sleep(WATCH);
    assert_ne!(snapshot(&ram), before, "the guest writes");
    assert_eq!(
        tracker.ring_full_exits(),
        0,
        "no logging before the first harvest"
    );

    tracker.harvest().unwrap();
    std::thread::sleep(WATCH);
    let logged = tracker.ring_full_exits();
    assert!(logged > 0, "256-entry rings fill once logging is on");
    assert!(area_pages(&tracker.harvest().unwrap()) > 0);

    tracker.stop().unwrap();
    // A ring-full exit KVM raised before the stop may still be on its way through a vCPU
    // thread's hook (counted when it gets there): let those finish first.
    std::thread::sleep(Duration::from_millis(50));
    let stopped_at = tracker.ring_full_exits();
    std::thread::sleep(WATCH);
    assert_eq!(
        tracker.ring_full_exits(),
        stopped_at,
        "no logging after stop"
    );

    tracker.harvest().unwrap();
    std::thread::sleep(WATCH);
    assert!(tracker.ring_full_exits() > stopped_at, "logging again");
    assert!(area_pages(&tracker.harvest().unwrap()) > 0);
    ctl.stop_all();
    assert_eq!(exit.code(), None, "no vCPU failed");
}

#[test]
fn ring_after_vcpus_is_refused_with_a_clear_error() {
    if !common::kvm_or_skip("ring_after_vcpus_is_refused_with_a_clear_error") {
        return;
    }
    let ram = guest_ram();
    let vm = Vm::new(&ram, 1).unwrap();
    let _fd = vm.create_vcpu(0).unwrap();
    let regions: Vec<_> = ram.regions().collect();
    let err = DirtyTracker::new_kvm(&vm, &regions, SMALL_RING).unwrap_err();
    assert!(err.to_string().contains("before any vCPU"), "{err}");
}

/// A VM with dirty rings whose run loop has no ring-full hook cannot make progress once a ring
/// fills: the vCPU fails and the VM stops non-zero with a message (rather than spinning on the
/// exit or dropping entries).
#[test]
fn ring_full_without_a_hook_stops_the_vm() {
    if !common::kvm_or_skip("ring_full_without_a_hook_stops_the_vm") {
        return;
    }
    let ram = guest_ram();
    let vm = Vm::new(&ram, 1).unwrap();
    let regions: Vec<_> = ram.regions().collect();
    let tracker = DirtyTracker::new_kvm(&vm, &regions, SMALL_RING).unwrap();
    let fd = make_vcpu(&vm, ram.memory(), 0);
    make_tables_user(ram.memory(), false);
    tracker.attach_vcpu(0, &fd).unwrap();
    // Logging into the rings starts with the first harvest.
    assert_eq!(tracker.harvest().unwrap().count(), 0);
    let exit = ExitRequest::new().unwrap();
    let mut ctl = VmControl::start(
        vec![fd],
        Arc::new(IoBus::new()),
        ram.memory().clone(),
        exit.clone(),
    )
    .unwrap();
    let code = exit.wait_timeout(Duration::from_secs(60));
    ctl.stop_all();
    assert_eq!(
        code,
        Some(EXIT_VCPU_FAILED),
        "the guest fills a 256-entry ring in well under a minute"
    );
    assert_eq!(tracker.ring_full_exits(), 0);
}
