//! Puts a test guest into guest RAM and its vCPUs into ring 3, and reads back what it left
//! there (its per-vCPU blocks, the dirty guest's writes).

use std::time::Instant;

use anyhow::{bail, Context};
use guest_tests::{payload_of, Params, Report, VcpuBlock};
use log::info;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{CODE_GPA, CODE_MAX, PARAMS_GPA, PML4_GPA};
use super::plan::Plan;
use crate::arch::x86_64::long_mode;
use crate::hypervisor::VcpuOps;

/// Writes the guest's TSC frequency and the `--dirty-rate` pace into the parameter block
/// in guest memory (after `load`: the frequency comes from a vCPU, KVM_GET_TSC_KHZ).
pub(super) fn write_pacing(
    mem: &GuestMemoryMmap,
    fd: &dyn VcpuOps,
    rate_mb_s: u64,
    cpus: u8,
) -> anyhow::Result<()> {
    let tsc_khz = match fd.get_tsc_khz() {
        Ok(khz) => u64::from(khz),
        Err(e) if rate_mb_s == 0 => {
            log::debug!("KVM_GET_TSC_KHZ: {e}; the guest runs unpaced anyway");
            0
        }
        Err(e) => bail!(
            "--dirty-rate needs the guest's TSC frequency and KVM_GET_TSC_KHZ failed ({e}); \
             run without --dirty-rate"
        ),
    };
    let interval = guest_tests::params::write_interval_tsc(rate_mb_s, tsc_khz, u32::from(cpus));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&tsc_khz.to_le_bytes());
    bytes[8..].copy_from_slice(&interval.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(Params::pacing_gpa(PARAMS_GPA)))
        .context("writing the pacing fields of the parameter block")?;
    if rate_mb_s != 0 {
        info!(
            "dirty guest paced to {rate_mb_s} MB/s: TSC {tsc_khz} kHz, {interval} cycles \
             between writes per vCPU"
        );
    }
    Ok(())
}

/// U/S bit of a paging-structure entry: user-mode accesses allowed (Intel SDM Vol. 3A
/// §4.5, Tables 4-15 to 4-19, bit 2).
const PTE_USER: u64 = 1 << 2;
/// P bit of a paging-structure entry (same tables, bit 0).
const PTE_PRESENT: u64 = 1 << 0;
/// RFLAGS.IOPL = 3: `in`/`out` allowed at CPL 3 (Intel SDM Vol. 1 §3.4.3.3).
const RFLAGS_IOPL_3: u64 = 3 << 12;
/// Privilege level 3 in a segment's DPL and a selector's RPL (Intel SDM Vol. 3A §3.4.2, §5.5).
const PL_USER: u8 = 3;

pub(super) fn load(mem: &GuestMemoryMmap, plan: &Plan) -> anyhow::Result<u64> {
    let payload = payload_of(plan.kind);
    if payload.code.len() as u64 > CODE_MAX {
        bail!(
            "the {} payload is {} bytes, more than the {CODE_MAX} reserved for it",
            plan.kind.name(),
            payload.code.len()
        );
    }
    mem.write_slice(payload.code, GuestAddress(CODE_GPA))
        .context("writing the guest code")?;
    mem.write_slice(plan.params.as_bytes(), GuestAddress(PARAMS_GPA))
        .context("writing the parameter block")?;
    Ok(CODE_GPA + payload.entry_offset as u64)
}

/// Sets the U/S bit in every present entry of the identity page tables that
/// `long_mode::setup` wrote for `identity_bytes` at `PML4_GPA`, so ring 3 may use them.
pub(super) fn make_tables_user(mem: &GuestMemoryMmap, identity_bytes: u64) -> anyhow::Result<()> {
    let len = long_mode::page_table_bytes(identity_bytes) as usize;
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(PML4_GPA))
        .context("reading the identity page tables")?;
    for entry in bytes.chunks_exact_mut(8) {
        let mut e = u64::from_le_bytes(entry.try_into().unwrap());
        if e & PTE_PRESENT != 0 {
            e |= PTE_USER;
            entry.copy_from_slice(&e.to_le_bytes());
        }
    }
    mem.write_slice(&bytes, GuestAddress(PML4_GPA))
        .context("writing the identity page tables")?;
    Ok(())
}

/// Moves a vCPU that `long_mode::setup` put at CPL 0 to CPL 3 with IOPL 3.
///
/// This machine's software KVM interprets guest ring-0 code (about 1 µs per
/// instruction) but runs ring-3 code natively, so the test guests, which need no
/// privileged instruction, run in ring 3; IOPL 3 lets them use the test port. The
/// segment caches are set directly (KVM_SET_SREGS); the guests never reload a segment.
pub(super) fn enter_ring3(fd: &dyn VcpuOps, id: u8) -> anyhow::Result<()> {
    let mut sregs = fd
        .get_sregs()
        .with_context(|| format!("vCPU {id}: KVM_GET_SREGS"))?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ss,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        seg.dpl = PL_USER;
        seg.selector |= u16::from(PL_USER);
    }
    fd.set_sregs(&sregs)
        .with_context(|| format!("vCPU {id}: KVM_SET_SREGS"))?;
    let mut regs = fd
        .get_regs()
        .with_context(|| format!("vCPU {id}: KVM_GET_REGS"))?;
    regs.rflags |= RFLAGS_IOPL_3;
    fd.set_regs(&regs)
        .with_context(|| format!("vCPU {id}: KVM_SET_REGS"))?;
    Ok(())
}

pub(super) fn read_block(mem: &GuestMemoryMmap, vcpu: usize) -> anyhow::Result<VcpuBlock> {
    let mut bytes = [0u8; core::mem::size_of::<VcpuBlock>()];
    mem.read_slice(
        &mut bytes,
        GuestAddress(Params::vcpu_block_gpa(PARAMS_GPA, vcpu)),
    )
    .context("reading a vCPU block")?;
    Ok(guest_tests::params::vcpu_block_from_bytes(&bytes))
}

/// Replays every `dirty` vCPU's writes against guest memory; failures go into `report`.
pub(super) fn verify_dirty(
    mem: &GuestMemoryMmap,
    params: &Params,
    report: &mut Report,
) -> anyhow::Result<()> {
    for vcpu in 0..params.nr_vcpus as usize {
        let block = read_block(mem, vcpu)?;
        let read = |gpa: u64| mem.read_obj::<u64>(GuestAddress(gpa)).unwrap_or(u64::MAX);
        match guest_tests::dirty::verify_dirty(
            params.seed,
            vcpu as u64,
            &block,
            params.writes_per_gen,
            read,
        ) {
            Ok(s) => info!(
                "vcpu{vcpu}: dirty replay of {} writes matches all {} pages ({} written)",
                s.writes, s.pages, s.written_pages
            ),
            Err(m) => report.fail(vcpu, format!("dirty replay: {m}"), Instant::now()),
        }
    }
    Ok(())
}
