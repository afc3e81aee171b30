//! The emulation fallback on a real KVM vCPU: the instruction bytes from the emulation-failure
//! exit (or guest memory at RIP), an [`EmulationContext`] over a stopped `VcpuFd`, and
//! [`emulate_failed_insn`] that ties decode, execute, commit and counting together.

use crate::hypervisor::VcpuOps;
use kvm_bindings::{kvm_regs, kvm_sregs};
use log::{debug, info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::decode::{self, DecodeError, Decoded, Kind, Segment, MAX_INSN_LEN};
use super::exec::{self, Effect, EmulateError, EmulationContext, Exception};
use super::EmulationStats;
use crate::arch::x86_64::regs::EFER_LMA;
use crate::dirty::HostChanges;

/// `kvm_run.emulation_failure.flags` bit: `insn_size` and `insn_bytes` are valid
/// (include/uapi/linux/kvm.h, `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`).
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1 << 0;
/// Words of `kvm_run.internal.data` that hold flags, `insn_size` and the 15 bytes.
const EMULATION_FAILURE_WORDS: usize = 3;
/// MXCSR in the XSAVE image: bytes 27:24 of the legacy (FXSAVE) region (Intel SDM Vol. 1
/// §10.5.1, Table 10-2), as an index into `kvm_xsave.region` (u32 words).
pub const XSAVE_MXCSR_WORD: usize = 6;
/// XSTATE_BV, the first field of the XSAVE header at byte 512 (Intel SDM Vol. 1 §13.4.2), low
/// half, as an index into `kvm_xsave.region`.
pub const XSAVE_XSTATE_BV_WORD: usize = 128;
/// XSTATE_BV bits 0 (x87) and 1 (SSE, which carries MXCSR) (Intel SDM Vol. 1 §13.1).
pub const XSTATE_FP_SSE: u32 = 0b11;
/// Selector bits 1:0, the requested privilege level; CS's is the CPL (Intel SDM Vol. 3A §5.5).
const SELECTOR_RPL_MASK: u16 = 0b11;

/// The instruction bytes an emulation failure exit carries (`kvm_run.emulation_failure`:
/// `data[0]` flags, then `insn_size` and up to 15 bytes), if it carries them.
pub fn exit_insn_bytes(ndata: u32, data: &[u64]) -> Option<Vec<u8>> {
    if (ndata as usize) < EMULATION_FAILURE_WORDS
        || data.len() < EMULATION_FAILURE_WORDS
        || data[0] & EMULATION_FLAG_INSTRUCTION_BYTES == 0
    {
        return None;
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let size = (raw[0] as usize).min(MAX_INSN_LEN);
    (size > 0).then(|| raw[1..1 + size].to_vec())
}

/// An [`EmulationContext`] over a vCPU stopped after an exit. Register changes, MXCSR and the
/// exception are kept until [`commit`](Self::commit), so a failed emulation changes nothing.
pub struct KvmContext<'a> {
    fd: &'a dyn VcpuOps,
    mem: &'a GuestMemoryMmap,
    host_changes: Option<&'a HostChanges>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    regs_changed: bool,
    mxcsr: Option<u32>,
    exception: Option<Exception>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(crate::hypervisor::Error) -> EmulateError {
    move |e| EmulateError::Kvm {
        what,
        why: e.to_string(),
    }
}

impl<'a> KvmContext<'a> {
    /// Reads the vCPU's registers. Guest RAM writes (cmpxchg16b) go through `host_changes`, so
    /// a running migration sees them as dirty; without it they are not recorded.
    pub fn new(
        fd: &'a dyn VcpuOps,
        mem: &'a GuestMemoryMmap,
        host_changes: Option<&'a HostChanges>,
    ) -> Result<KvmContext<'a>, EmulateError> {
        Ok(KvmContext {
            regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            fd,
            mem,
            host_changes,
            regs_changed: false,
            mxcsr: None,
            exception: None,
        })
    }

    /// Refuses anything but 64-bit mode at CPL 0 (where this host's KVM interprets code).
    pub fn check_mode(&self) -> Result<(), EmulateError> {
        if self.sregs.efer & EFER_LMA == 0 || self.sregs.cs.l == 0 {
            return Err(EmulateError::Mode("not in 64-bit mode"));
        }
        if self.sregs.cs.selector & SELECTOR_RPL_MASK != 0 {
            return Err(EmulateError::Mode("in user mode (CPL > 0)"));
        }
        Ok(())
    }

    /// Up to 15 bytes at RIP from guest memory, stopping early at an unmapped page.
    pub fn fetch_at_rip(&mut self) -> Result<Vec<u8>, EmulateError> {
        let rip = self.regs.rip;
        let first = (4096 - (rip % 4096) as usize).min(MAX_INSN_LEN);
        let mut buf = vec![0u8; first];
        exec::read_virt(self, rip, &mut buf)?;
        if first < MAX_INSN_LEN {
            let mut more = vec![0u8; MAX_INSN_LEN - first];
            if exec::read_virt(self, rip.wrapping_add(first as u64), &mut more).is_ok() {
                buf.extend_from_slice(&more);
            }
        }
        Ok(buf)
    }

    /// Writes what the emulation changed back to the vCPU: registers, then MXCSR, then the
    /// exception (injected after the registers, so it is delivered at the new RIP).
    pub fn commit(self) -> Result<(), EmulateError> {
        if self.regs_changed {
            self.fd
                .set_regs(&self.regs)
                .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        if let Some(mxcsr) = self.mxcsr {
            // KVM_SET_FPU ignores MXCSR (KVM copies every FXSAVE field but that one; measured
            // here too), so it goes through the XSAVE image. The image KVM reports holds the
            // effective x87/SSE state even where XSTATE_BV says "initial", so marking both
            // present keeps them as they are.
            let mut xsave = self.fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
            xsave.region[XSAVE_MXCSR_WORD] = mxcsr;
            xsave.region[XSAVE_XSTATE_BV_WORD] |= XSTATE_FP_SSE;
            // SAFETY: `xsave` is a whole `kvm_xsave` (4096 bytes) read from this vCPU. KVM
            // copies the guest's uabi XSAVE size, 4096 bytes unless the VMM enabled dynamic
            // XSTATE features for guests (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM), which it
            // never does.
            unsafe { self.fd.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        if let Some(exc) = self.exception {
            let mut ev = self
                .fd
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
            if ev.exception.injected != 0 || ev.exception.pending != 0 || ev.interrupt.injected != 0
            {
                return Err(EmulateError::EventPending(exc.vector));
            }
            ev.exception.injected = 1;
            ev.exception.nr = exc.vector;
            ev.exception.has_error_code = u8::from(exc.error_code.is_some());
            ev.exception.error_code = exc.error_code.unwrap_or(0);
            ev.exception_has_payload = 0;
            ev.exception_payload = 0;
            self.fd
                .set_vcpu_events(&ev)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }

    fn reg_mut(&mut self, reg: u8) -> &mut u64 {
        let r = &mut self.regs;
        match reg & 15 {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            4 => &mut r.rsp,
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            14 => &mut r.r14,
            _ => &mut r.r15,
        }
    }
}

/// Atomically compares the 16 bytes at `ptr` with `expected` and stores `new` if equal;
/// returns the value found.
///
/// # Safety
///
/// `ptr` is 16-byte aligned and valid for reads and writes of 16 bytes for the call.
unsafe fn host_cmpxchg16b(ptr: *mut u8, expected: u128, new: u128) -> u128 {
    let mut lo = expected as u64;
    let mut hi = (expected >> 64) as u64;
    // SAFETY: the caller guarantees `ptr` is aligned and valid; the asm touches only those 16
    // bytes, RAX/RDX (outputs), RCX (input) and RBX, which it restores (LLVM reserves RBX, so
    // the new low half comes in another register and is swapped in and out).
    unsafe {
        std::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "mov rbx, {new_lo}",
            ptr = in(reg) ptr,
            new_lo = inout(reg) new as u64 => _,
            inout("rax") lo,
            inout("rdx") hi,
            in("rcx") (new >> 64) as u64,
            options(nostack),
        );
    }
    u128::from(hi) << 64 | u128::from(lo)
}

impl EmulationContext for KvmContext<'_> {
    fn gpr(&self, reg: u8) -> u64 {
        let r = &self.regs;
        match reg & 15 {
            0 => r.rax,
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            4 => r.rsp,
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            8 => r.r8,
            9 => r.r9,
            10 => r.r10,
            11 => r.r11,
            12 => r.r12,
            13 => r.r13,
            14 => r.r14,
            _ => r.r15,
        }
    }

    fn set_gpr(&mut self, reg: u8, val: u64) {
        *self.reg_mut(reg) = val;
        self.regs_changed = true;
    }

    fn rip(&self) -> u64 {
        self.regs.rip
    }

    fn set_rip(&mut self, rip: u64) {
        self.regs.rip = rip;
        self.regs_changed = true;
    }

    fn rflags(&self) -> u64 {
        self.regs.rflags
    }

    fn set_rflags(&mut self, val: u64) {
        self.regs.rflags = val;
        self.regs_changed = true;
    }

    fn segment_base(&self, seg: Segment) -> u64 {
        match seg {
            Segment::Fs => self.sregs.fs.base,
            Segment::Gs => self.sregs.gs.base,
            _ => 0,
        }
    }

    fn translate(&mut self, gva: u64, write: bool) -> Result<u64, EmulateError> {
        let t = self
            .fd
            .translate_gva(gva)
            .map_err(kvm_err("KVM_TRANSLATE"))?;
        if t.valid == 0 {
            return Err(EmulateError::NotMapped { gva });
        }
        if write && t.writeable == 0 {
            return Err(EmulateError::ReadOnly { gva });
        }
        Ok(t.physical_address)
    }

    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| EmulateError::NotRam {
                gpa,
                len: buf.len(),
                why: e.to_string(),
            })
    }

    fn cmpxchg16(&mut self, gpa: u64, expected: u128, new: u128) -> Result<u128, EmulateError> {
        let not_ram = |why: String| EmulateError::NotRam { gpa, len: 16, why };
        if !gpa.is_multiple_of(16) {
            return Err(not_ram("not 16-byte aligned".into()));
        }
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), 16)
            .map_err(|e| not_ram(e.to_string()))?;
        let guard = slice.ptr_guard_mut();
        let ptr = guard.as_ptr();
        // SAFETY: `ptr` maps the 16 guest bytes at `gpa` (get_slice checked they lie in one
        // region, mapped for the VM's life); `gpa`, and so the page-aligned mapping's address,
        // is 16-byte aligned. Other vCPUs touch it only with atomic instructions or plain
        // accesses the guest itself orders, as on hardware.
        let cas = || unsafe { host_cmpxchg16b(ptr, expected, new) };
        match self.host_changes {
            Some(h) => h
                .change(&[(gpa, 16)], cas)
                .map_err(|e| EmulateError::Refused(e.to_string())),
            None => Ok(cas()),
        }
    }

    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), EmulateError> {
        let mem = self.mem;
        let write = || {
            mem.write_slice(data, GuestAddress(gpa))
                .map_err(|e| EmulateError::NotRam {
                    gpa,
                    len: data.len(),
                    why: e.to_string(),
                })
        };
        match self.host_changes {
            Some(h) => h
                .change(&[(gpa, data.len() as u64)], write)
                .map_err(|e| EmulateError::Refused(e.to_string()))?,
            None => write(),
        }
    }

    fn mxcsr(&mut self) -> Result<u32, EmulateError> {
        match self.mxcsr {
            Some(v) => Ok(v),
            // KVM_GET_FPU reports MXCSR as 0 whatever it is: read the XSAVE image.
            None => Ok(self
                .fd
                .get_xsave()
                .map_err(kvm_err("KVM_GET_XSAVE"))?
                .region[XSAVE_MXCSR_WORD]),
        }
    }

    fn set_mxcsr(&mut self, val: u32) -> Result<(), EmulateError> {
        self.mxcsr = Some(val);
        Ok(())
    }

    fn inject(&mut self, exc: Exception) -> Result<(), EmulateError> {
        self.exception = Some(exc);
        Ok(())
    }
}

/// Emulates the instruction a vCPU stopped on with an emulation failure: decodes the bytes the
/// exit carries (`exit_bytes`) or, if it carries none or too few, those at RIP in guest memory;
/// carries it out; writes the result back; counts and (once per kind) logs it.
pub fn emulate_failed_insn(
    vcpu: usize,
    fd: &dyn VcpuOps,
    mem: &GuestMemoryMmap,
    host_changes: Option<&HostChanges>,
    exit_bytes: Option<&[u8]>,
    stats: &EmulationStats,
) -> Result<(Kind, Effect), EmulateError> {
    let mut ctx = KvmContext::new(fd, mem, host_changes)?;
    ctx.check_mode()?;
    let decoded: Decoded = match exit_bytes.map(decode::decode) {
        Some(Ok(d)) => d,
        Some(Err(DecodeError::Unsupported(why))) => {
            return Err(DecodeError::Unsupported(why).into())
        }
        Some(Err(DecodeError::Truncated(_))) | None => decode::decode(&ctx.fetch_at_rip()?)?,
    };
    let rip = ctx.rip();
    let effect = exec::execute(&decoded, &mut ctx)?;
    ctx.commit()?;
    let kind = decoded.insn.kind();
    if stats.record(kind) {
        info!(
            "vcpu{vcpu}: KVM cannot emulate {kind} here; the VMM emulates it (first at RIP \
             {rip:#x}, {effect:?})"
        );
    } else {
        debug!("vcpu{vcpu}: emulated {kind} at RIP {rip:#x} ({effect:?})");
    }
    Ok((kind, effect))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(flags: u64, size: u8, bytes: &[u8]) -> [u64; 3] {
        let mut raw = [0u8; 16];
        raw[0] = size;
        raw[1..1 + bytes.len()].copy_from_slice(bytes);
        [
            flags,
            u64::from_le_bytes(raw[..8].try_into().unwrap()),
            u64::from_le_bytes(raw[8..].try_into().unwrap()),
        ]
    }

    #[test]
    fn exit_bytes_are_read_when_flagged() {
        let d = words(1, 5, &[0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
        assert_eq!(
            exit_insn_bytes(3, &d),
            Some(vec![0xf0, 0x48, 0x0f, 0xc7, 0x0f])
        );
        let all: Vec<u8> = (1..=15).collect();
        assert_eq!(exit_insn_bytes(5, &words(1, 15, &all)), Some(all));
    }

    #[test]
    fn exit_bytes_absent_without_flag_or_data() {
        let d = words(0, 1, &[0xcc]);
        assert_eq!(exit_insn_bytes(3, &d), None, "flag clear");
        assert_eq!(
            exit_insn_bytes(2, &words(1, 1, &[0xcc])),
            None,
            "ndata too small"
        );
        assert_eq!(exit_insn_bytes(3, &words(1, 0, &[])), None, "no bytes");
    }

    #[test]
    fn host_cmpxchg16b_swaps_only_on_match() {
        #[repr(align(16))]
        struct Cell([u8; 16]);
        let mut cell = Cell(7u128.to_le_bytes());
        let p = cell.0.as_mut_ptr();
        // SAFETY: `cell` is 16-byte aligned and lives for both calls.
        let found = unsafe { host_cmpxchg16b(p, 7, 1 << 100 | 9) };
        assert_eq!(found, 7);
        assert_eq!(u128::from_le_bytes(cell.0), 1 << 100 | 9);
        // SAFETY: as above.
        let found = unsafe { host_cmpxchg16b(p, 7, 3) };
        assert_eq!(found, 1 << 100 | 9, "no swap, current value returned");
        assert_eq!(u128::from_le_bytes(cell.0), 1 << 100 | 9);
    }
}
