//! Carrying out a decoded [`Insn`] against an [`EmulationContext`]: the vCPU's registers, its
//! address translation, guest memory, MXCSR and exception injection, behind a trait so the
//! semantics are tested without KVM.

use super::decode::{Base, Decoded, Insn, MemOperand, OpSize, Operand, Segment};

/// RFLAGS bits (Intel SDM Vol. 1 §3.4.3, Figure 3-8).
pub const RFLAGS_CF: u64 = 1 << 0;
/// Parity flag.
pub const RFLAGS_PF: u64 = 1 << 2;
/// Auxiliary-carry flag.
pub const RFLAGS_AF: u64 = 1 << 4;
/// Zero flag.
pub const RFLAGS_ZF: u64 = 1 << 6;
/// Sign flag.
pub const RFLAGS_SF: u64 = 1 << 7;
/// Overflow flag.
pub const RFLAGS_OF: u64 = 1 << 11;
/// Alignment-check / SMAP access flag (Intel SDM Vol. 3A §2.3, §4.6.1).
pub const RFLAGS_AC: u64 = 1 << 18;
/// The arithmetic flags POPCNT writes (Intel SDM Vol. 2B, POPCNT: "OF, SF, ZF, AF, CF, PF are all
/// cleared. ZF is set if SRC = 0").
const POPCNT_FLAGS: u64 = RFLAGS_OF | RFLAGS_SF | RFLAGS_ZF | RFLAGS_AF | RFLAGS_CF | RFLAGS_PF;

/// MXCSR bits that must be zero: 31:16 on every CPU with DAZ (Intel SDM Vol. 1 §10.2.3.1,
/// MXCSR_MASK 0xffff). Loading one raises #GP(0).
pub const MXCSR_RESERVED: u32 = 0xffff_0000;

/// Exception vectors (Intel SDM Vol. 3A §6.3.1, Table 6-1).
pub const VECTOR_BP: u8 = 3;
/// General protection.
pub const VECTOR_GP: u8 = 13;

/// An exception to deliver to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    /// Vector.
    pub vector: u8,
    /// Error code, for the vectors that push one.
    pub error_code: Option<u32>,
}

impl Exception {
    /// #BP (no error code).
    pub const BP: Exception = Exception {
        vector: VECTOR_BP,
        error_code: None,
    };
    /// #GP(0).
    pub const GP0: Exception = Exception {
        vector: VECTOR_GP,
        error_code: Some(0),
    };
}

/// Why an instruction could not be emulated; the vCPU is then reported as failed.
#[derive(Debug, thiserror::Error)]
pub enum EmulateError {
    /// The bytes are not one of the handled forms (or could not be read whole).
    #[error(transparent)]
    Decode(#[from] super::decode::DecodeError),
    /// The vCPU is not in a mode the fallback handles.
    #[error("the vCPU is {0}; the emulation fallback handles 64-bit kernel mode only")]
    Mode(&'static str),
    /// The guest page tables do not map an address the instruction uses.
    #[error("guest virtual address {gva:#x} is not mapped by the guest page tables")]
    NotMapped {
        /// The address.
        gva: u64,
    },
    /// The guest page tables map an address read-only that the instruction writes.
    #[error("guest virtual address {gva:#x} is mapped read-only")]
    ReadOnly {
        /// The address.
        gva: u64,
    },
    /// A guest-physical address is not in guest RAM.
    #[error("guest physical address {gpa:#x} ({len} bytes) is not guest RAM: {why}")]
    NotRam {
        /// The address.
        gpa: u64,
        /// Bytes accessed.
        len: usize,
        /// Details.
        why: String,
    },
    /// The guest is already receiving an event the injection would overwrite.
    #[error("cannot inject vector {0}: another exception or interrupt is already being injected")]
    EventPending(u8),
    /// A KVM call failed.
    #[error("KVM {what} failed: {why}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The error.
        why: String,
    },
    /// The host refused to change guest RAM (a migration is sending its last round).
    #[error("guest RAM may not change now: {0}")]
    Refused(String),
}

/// What the emulation needs from a vCPU. The real one works on a stopped KVM vCPU; tests use
/// a fake with a flat memory.
pub trait EmulationContext {
    /// General register `reg` (0..=15 = RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15).
    fn gpr(&self, reg: u8) -> u64;
    /// Writes general register `reg`.
    fn set_gpr(&mut self, reg: u8, val: u64);
    /// RIP (of the instruction being emulated until it is advanced).
    fn rip(&self) -> u64;
    /// Writes RIP.
    fn set_rip(&mut self, rip: u64);
    /// RFLAGS.
    fn rflags(&self) -> u64;
    /// Writes RFLAGS.
    fn set_rflags(&mut self, val: u64);
    /// The base of FS or GS (the only segments with a base in 64-bit mode).
    fn segment_base(&self, seg: Segment) -> u64;
    /// Translates a linear address through the guest page tables: the guest-physical address,
    /// or an error when it is unmapped (or read-only and `write` is asked).
    fn translate(&mut self, gva: u64, write: bool) -> Result<u64, EmulateError>;
    /// Reads guest-physical memory (inside one page).
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError>;
    /// Writes guest-physical memory (inside one page).
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), EmulateError>;
    /// An atomic 16-byte compare-and-exchange on 16-byte-aligned guest-physical memory: stores
    /// `new` if it holds `expected`; returns what it held before in either case.
    fn cmpxchg16(&mut self, gpa: u64, expected: u128, new: u128) -> Result<u128, EmulateError>;
    /// MXCSR.
    fn mxcsr(&mut self) -> Result<u32, EmulateError>;
    /// Writes MXCSR.
    fn set_mxcsr(&mut self, val: u32) -> Result<(), EmulateError>;
    /// Delivers `exc` to the guest when it runs next (RIP as left by the emulation).
    fn inject(&mut self, exc: Exception) -> Result<(), EmulateError>;
}

/// What the emulation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The instruction completed; RIP is past it.
    Completed,
    /// The instruction raised this exception (a trap like #BP after advancing RIP, or a
    /// fault like #GP with RIP left on the instruction).
    Raised(Exception),
}

fn register_value(val: u64, size: OpSize) -> u64 {
    match size {
        OpSize::Word => val & 0xffff,
        OpSize::Dword => val & 0xffff_ffff,
        OpSize::Qword => val,
    }
}

/// Writes a `size` result into `reg` as the CPU does: 32-bit results zero the upper half,
/// 16-bit results keep bits 63:16 (Intel SDM Vol. 1 §3.4.1.1).
fn write_register(ctx: &mut impl EmulationContext, reg: u8, size: OpSize, val: u64) {
    let v = match size {
        OpSize::Word => (ctx.gpr(reg) & !0xffff) | (val & 0xffff),
        OpSize::Dword => val & 0xffff_ffff,
        OpSize::Qword => val,
    };
    ctx.set_gpr(reg, v);
}

/// The linear address of a memory operand of an instruction of `len` bytes at RIP.
pub fn effective_address(ctx: &impl EmulationContext, mem: &MemOperand, len: usize) -> u64 {
    let base = match mem.base {
        Base::None => 0,
        Base::Reg(r) => ctx.gpr(r),
        Base::Rip => ctx.rip().wrapping_add(len as u64),
    };
    let index = mem
        .index
        .map_or(0, |(r, scale)| ctx.gpr(r).wrapping_mul(u64::from(scale)));
    let seg = match mem.segment {
        Some(s @ (Segment::Fs | Segment::Gs)) => ctx.segment_base(s),
        _ => 0,
    };
    seg.wrapping_add(base)
        .wrapping_add(index)
        .wrapping_add(mem.disp as i64 as u64)
}

const PAGE_SIZE: u64 = 4096;

/// Reads `buf.len()` bytes at linear address `gva`, translating each page it touches.
pub fn read_virt(
    ctx: &mut impl EmulationContext,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), EmulateError> {
    let mut done = 0;
    while done < buf.len() {
        let at = gva.wrapping_add(done as u64);
        let in_page = (PAGE_SIZE - (at % PAGE_SIZE)) as usize;
        let n = in_page.min(buf.len() - done);
        let gpa = ctx.translate(at, false)?;
        ctx.read_phys(gpa, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// Writes `data` at linear address `gva`; every page it touches is translated (and must be
/// writable) before anything is written.
pub fn write_virt(
    ctx: &mut impl EmulationContext,
    gva: u64,
    data: &[u8],
) -> Result<(), EmulateError> {
    let mut pieces = Vec::with_capacity(2);
    let mut done = 0;
    while done < data.len() {
        let at = gva.wrapping_add(done as u64);
        let n = ((PAGE_SIZE - (at % PAGE_SIZE)) as usize).min(data.len() - done);
        pieces.push((ctx.translate(at, true)?, done, n));
        done += n;
    }
    for (gpa, from, n) in pieces {
        ctx.write_phys(gpa, &data[from..from + n])?;
    }
    Ok(())
}

fn read_u64(
    ctx: &mut impl EmulationContext,
    mem: &MemOperand,
    len: usize,
    bytes: usize,
) -> Result<u64, EmulateError> {
    let gva = effective_address(ctx, mem, len);
    let mut b = [0u8; 8];
    read_virt(ctx, gva, &mut b[..bytes])?;
    Ok(u64::from_le_bytes(b))
}

/// Carries out `d` on `ctx`. On error nothing architectural has changed (the caller reports
/// the vCPU as failed).
pub fn execute(d: &Decoded, ctx: &mut impl EmulationContext) -> Result<Effect, EmulateError> {
    let next = ctx.rip().wrapping_add(d.len as u64);
    match d.insn {
        Insn::Int3 => {
            // A trap: the handler's return address is the next instruction (Intel SDM Vol. 3A
            // §6.5, INT3 in Vol. 2A).
            ctx.set_rip(next);
            ctx.inject(Exception::BP)?;
            return Ok(Effect::Raised(Exception::BP));
        }
        Insn::Fwait => {
            // This host raises no pending x87 exception here that the guest would expect.
        }
        Insn::Clac => ctx.set_rflags(ctx.rflags() & !RFLAGS_AC),
        Insn::Stac => ctx.set_rflags(ctx.rflags() | RFLAGS_AC),
        Insn::Popcnt { size, dst, src } => {
            let val = match src {
                Operand::Reg(r) => register_value(ctx.gpr(r), size),
                Operand::Mem(m) => read_u64(ctx, &m, d.len, size.bytes())?,
            };
            let mut flags = ctx.rflags() & !POPCNT_FLAGS;
            if val == 0 {
                flags |= RFLAGS_ZF;
            }
            write_register(ctx, dst, size, u64::from(val.count_ones()));
            ctx.set_rflags(flags);
        }
        Insn::Cmpxchg16b { mem, .. } => {
            let gva = effective_address(ctx, &mem, d.len);
            if !gva.is_multiple_of(16) {
                // "If the destination operand is not aligned on a 16-byte boundary, #GP(0)."
                ctx.inject(Exception::GP0)?;
                return Ok(Effect::Raised(Exception::GP0));
            }
            let gpa = ctx.translate(gva, true)?;
            let pair = |lo: u8, hi: u8| u128::from(ctx.gpr(hi)) << 64 | u128::from(ctx.gpr(lo));
            let (expected, new) = (pair(0, 2), pair(3, 1));
            let found = ctx.cmpxchg16(gpa, expected, new)?;
            let mut flags = ctx.rflags();
            if found == expected {
                flags |= RFLAGS_ZF;
            } else {
                flags &= !RFLAGS_ZF;
                ctx.set_gpr(0, found as u64);
                ctx.set_gpr(2, (found >> 64) as u64);
            }
            ctx.set_rflags(flags);
        }
        Insn::Ldmxcsr { mem } => {
            let val = read_u64(ctx, &mem, d.len, 4)? as u32;
            if val & MXCSR_RESERVED != 0 {
                ctx.inject(Exception::GP0)?;
                return Ok(Effect::Raised(Exception::GP0));
            }
            ctx.set_mxcsr(val)?;
        }
        Insn::Stmxcsr { mem } => {
            let gva = effective_address(ctx, &mem, d.len);
            let val = ctx.mxcsr()?;
            write_virt(ctx, gva, &val.to_le_bytes())?;
        }
    }
    ctx.set_rip(next);
    Ok(Effect::Completed)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::decode::decode;
    use super::*;

    /// A vCPU with flat memory: linear addresses below `mem.len()` map to the same physical
    /// address, except pages listed as unmapped or read-only.
    pub(crate) struct Fake {
        pub regs: [u64; 16],
        pub rip: u64,
        pub rflags: u64,
        pub fs_base: u64,
        pub gs_base: u64,
        pub mem: Vec<u8>,
        pub read_only_page: Option<u64>,
        pub mxcsr: u32,
        pub injected: Vec<Exception>,
    }

    impl Fake {
        pub(crate) fn new() -> Fake {
            Fake {
                regs: [0; 16],
                rip: 0x1000,
                rflags: 0x2,
                fs_base: 0,
                gs_base: 0,
                mem: vec![0; 0x10000],
                read_only_page: None,
                mxcsr: 0x1f80,
                injected: Vec::new(),
            }
        }

        fn run(&mut self, bytes: &[u8]) -> Result<Effect, EmulateError> {
            let d = decode(bytes)?;
            execute(&d, self)
        }
    }

    impl EmulationContext for Fake {
        fn gpr(&self, reg: u8) -> u64 {
            self.regs[reg as usize]
        }
        fn set_gpr(&mut self, reg: u8, val: u64) {
            self.regs[reg as usize] = val;
        }
        fn rip(&self) -> u64 {
            self.rip
        }
        fn set_rip(&mut self, rip: u64) {
            self.rip = rip;
        }
        fn rflags(&self) -> u64 {
            self.rflags
        }
        fn set_rflags(&mut self, val: u64) {
            self.rflags = val;
        }
        fn segment_base(&self, seg: Segment) -> u64 {
            match seg {
                Segment::Fs => self.fs_base,
                Segment::Gs => self.gs_base,
                _ => 0,
            }
        }
        fn translate(&mut self, gva: u64, write: bool) -> Result<u64, EmulateError> {
            if gva >= self.mem.len() as u64 {
                return Err(EmulateError::NotMapped { gva });
            }
            if write && self.read_only_page == Some(gva & !(PAGE_SIZE - 1)) {
                return Err(EmulateError::ReadOnly { gva });
            }
            Ok(gva)
        }
        fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
            let at = gpa as usize;
            buf.copy_from_slice(&self.mem[at..at + buf.len()]);
            Ok(())
        }
        fn cmpxchg16(&mut self, gpa: u64, expected: u128, new: u128) -> Result<u128, EmulateError> {
            assert!(gpa.is_multiple_of(16), "aligned");
            let at = gpa as usize;
            let cur = u128::from_le_bytes(self.mem[at..at + 16].try_into().unwrap());
            if cur == expected {
                self.mem[at..at + 16].copy_from_slice(&new.to_le_bytes());
            }
            Ok(cur)
        }
        fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), EmulateError> {
            let at = gpa as usize;
            self.mem[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn mxcsr(&mut self) -> Result<u32, EmulateError> {
            Ok(self.mxcsr)
        }
        fn set_mxcsr(&mut self, val: u32) -> Result<(), EmulateError> {
            self.mxcsr = val;
            Ok(())
        }
        fn inject(&mut self, exc: Exception) -> Result<(), EmulateError> {
            self.injected.push(exc);
            Ok(())
        }
    }

    #[test]
    fn int3_advances_rip_then_raises_bp() {
        let mut f = Fake::new();
        assert_eq!(f.run(&[0xcc]).unwrap(), Effect::Raised(Exception::BP));
        assert_eq!(f.rip, 0x1001, "the handler returns after the int3");
        assert_eq!(f.injected, vec![Exception::BP]);
    }

    #[test]
    fn fwait_is_skipped() {
        let mut f = Fake::new();
        f.regs[0] = 5;
        assert_eq!(f.run(&[0x9b]).unwrap(), Effect::Completed);
        assert_eq!((f.rip, f.regs[0], f.rflags), (0x1001, 5, 0x2));
    }

    #[test]
    fn clac_and_stac_change_only_ac() {
        let mut f = Fake::new();
        f.rflags = 0x2 | RFLAGS_ZF;
        f.run(&[0x0f, 0x01, 0xcb]).unwrap();
        assert_eq!(f.rflags, 0x2 | RFLAGS_ZF | RFLAGS_AC);
        assert_eq!(f.rip, 0x1003);
        f.run(&[0x0f, 0x01, 0xca]).unwrap();
        assert_eq!(f.rflags, 0x2 | RFLAGS_ZF);
        assert_eq!(f.rip, 0x1006);
    }

    #[test]
    fn popcnt_counts_bits_per_operand_size_and_sets_flags() {
        let mut f = Fake::new();
        f.rflags = 0x2 | RFLAGS_CF | RFLAGS_OF | RFLAGS_SF | RFLAGS_AF | RFLAGS_PF | RFLAGS_AC;
        f.regs[1] = 0xffff_0000_0000_0f0f; // rcx
        f.regs[0] = 0xdead_beef_dead_beef; // rax
                                           // popcnt eax, ecx: 8 bits, upper half of rax zeroed
        f.run(&[0xf3, 0x0f, 0xb8, 0xc1]).unwrap();
        assert_eq!(f.regs[0], 8);
        assert_eq!(
            f.rflags,
            0x2 | RFLAGS_AC,
            "arithmetic flags cleared, others kept"
        );
        // popcnt rax, rcx: 24 bits
        f.run(&[0xf3, 0x48, 0x0f, 0xb8, 0xc1]).unwrap();
        assert_eq!(f.regs[0], 24);
        // popcnt dx, cx: 8 bits, rdx bits 63:16 kept
        f.regs[2] = 0x1234_5678_9abc_def0;
        f.run(&[0x66, 0xf3, 0x0f, 0xb8, 0xd1]).unwrap();
        assert_eq!(f.regs[2], 0x1234_5678_9abc_0008);
        // popcnt r10, r11 = 0: ZF
        f.regs[11] = 0;
        f.regs[10] = 77;
        f.run(&[0xf3, 0x4d, 0x0f, 0xb8, 0xd3]).unwrap();
        assert_eq!(f.regs[10], 0);
        assert_eq!(f.rflags & RFLAGS_ZF, RFLAGS_ZF);
        // popcnt ecx, ecx where only bits above 31 are set: source 0, ZF
        f.regs[1] = 0xffff_ffff_0000_0000;
        f.run(&[0xf3, 0x0f, 0xb8, 0xc9]).unwrap();
        assert_eq!(f.regs[1], 0);
        assert_eq!(f.rflags & RFLAGS_ZF, RFLAGS_ZF);
        assert_eq!(f.rip, 0x1000 + 4 + 5 + 5 + 5 + 4);
    }

    #[test]
    fn popcnt_reads_memory_operands() {
        let mut f = Fake::new();
        f.mem[0x2000..0x2008].copy_from_slice(&0x0101_0101_0101_0101u64.to_le_bytes());
        // popcnt rax, [rdi]
        f.regs[7] = 0x2000;
        f.run(&[0xf3, 0x48, 0x0f, 0xb8, 0x07]).unwrap();
        assert_eq!(f.regs[0], 8);
        // popcnt eax, [rip + 0xff8]: next rip 0x1008 + 0xff8 = 0x2000, 4 bytes
        f.rip = 0x1000;
        f.run(&[0xf3, 0x0f, 0xb8, 0x05, 0xf8, 0x0f, 0, 0]).unwrap();
        assert_eq!(f.regs[0], 4);
        // popcnt ax, [rbx + rsi*2 - 2] = [0x2000]: 2 bytes
        f.regs[3] = 0x1002;
        f.regs[6] = 0x800;
        f.run(&[0x66, 0xf3, 0x0f, 0xb8, 0x44, 0x73, 0xfe]).unwrap();
        assert_eq!(f.regs[0], 2);
        // popcnt rax, gs:[0x10] with gs base 0x1ff0
        f.gs_base = 0x1ff0;
        f.run(&[0x65, 0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25, 0x10, 0, 0, 0])
            .unwrap();
        assert_eq!(f.regs[0], 8);
        // an operand across a page boundary reads both pages
        f.mem[0x2ffc..0x3004].copy_from_slice(&u64::MAX.to_le_bytes());
        f.regs[7] = 0x2ffc;
        f.run(&[0xf3, 0x48, 0x0f, 0xb8, 0x07]).unwrap();
        assert_eq!(f.regs[0], 64);
    }

    #[test]
    fn unmapped_operand_changes_nothing() {
        let mut f = Fake::new();
        f.regs[7] = 0x10_0000;
        let before = f.regs;
        assert!(matches!(
            f.run(&[0xf3, 0x48, 0x0f, 0xb8, 0x07]),
            Err(EmulateError::NotMapped { gva: 0x10_0000 })
        ));
        assert_eq!((f.regs, f.rip), (before, 0x1000));
    }

    fn set_pair(f: &mut Fake, lo: usize, hi: usize, v: u128) {
        f.regs[lo] = v as u64;
        f.regs[hi] = (v >> 64) as u64;
    }

    #[test]
    fn cmpxchg16b_swaps_when_equal() {
        let mut f = Fake::new();
        let old = 0x1111_2222_3333_4444_5555_6666_7777_8888u128;
        let new = 0xaaaa_bbbb_cccc_dddd_eeee_ffff_0000_1111u128;
        f.mem[0x3010..0x3020].copy_from_slice(&old.to_le_bytes());
        set_pair(&mut f, 0, 2, old); // rdx:rax
        set_pair(&mut f, 3, 1, new); // rcx:rbx
        f.regs[7] = 0x3000;
        // lock cmpxchg16b [rdi + 0x10]
        assert_eq!(
            f.run(&[0xf0, 0x48, 0x0f, 0xc7, 0x4f, 0x10]).unwrap(),
            Effect::Completed
        );
        assert_eq!(
            u128::from_le_bytes(f.mem[0x3010..0x3020].try_into().unwrap()),
            new
        );
        assert_eq!(f.rflags & RFLAGS_ZF, RFLAGS_ZF);
        assert_eq!((f.regs[0], f.regs[2]), (old as u64, (old >> 64) as u64));
        assert_eq!(f.rip, 0x1006);
    }

    #[test]
    fn cmpxchg16b_loads_rdx_rax_when_different() {
        let mut f = Fake::new();
        let cur = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        f.mem[0x3000..0x3010].copy_from_slice(&cur.to_le_bytes());
        set_pair(&mut f, 0, 2, 5);
        set_pair(&mut f, 3, 1, 6);
        f.rflags = 0x2 | RFLAGS_ZF | RFLAGS_CF;
        f.regs[7] = 0x3000;
        f.run(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f]).unwrap();
        assert_eq!(
            u128::from_le_bytes(f.mem[0x3000..0x3010].try_into().unwrap()),
            cur
        );
        assert_eq!(f.rflags, 0x2 | RFLAGS_CF, "ZF cleared, other flags kept");
        assert_eq!((f.regs[0], f.regs[2]), (cur as u64, (cur >> 64) as u64));
        assert_eq!((f.regs[3], f.regs[1]), (6, 0), "rcx:rbx untouched");
    }

    #[test]
    fn cmpxchg16b_misaligned_raises_gp_without_advancing() {
        let mut f = Fake::new();
        f.regs[7] = 0x3008;
        assert_eq!(
            f.run(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f]).unwrap(),
            Effect::Raised(Exception::GP0)
        );
        assert_eq!(f.rip, 0x1000);
        assert_eq!(f.injected, vec![Exception::GP0]);
    }

    #[test]
    fn cmpxchg16b_on_a_read_only_page_is_refused() {
        let mut f = Fake::new();
        f.regs[7] = 0x3000;
        f.read_only_page = Some(0x3000);
        assert!(matches!(
            f.run(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f]),
            Err(EmulateError::ReadOnly { .. })
        ));
        assert_eq!(f.rip, 0x1000);
    }

    #[test]
    fn stmxcsr_stores_mxcsr_across_a_page_boundary() {
        let mut f = Fake::new();
        f.mxcsr = 0x1234_9fc0;
        f.regs[1] = 0x4ffe;
        // stmxcsr [rcx]
        assert_eq!(f.run(&[0x0f, 0xae, 0x19]).unwrap(), Effect::Completed);
        assert_eq!(f.mem[0x4ffe..0x5002], 0x1234_9fc0u32.to_le_bytes());
        assert_eq!(f.rip, 0x1003);
        // a read-only second page: nothing is written
        f.read_only_page = Some(0x6000);
        f.regs[1] = 0x5ffe;
        assert!(matches!(
            f.run(&[0x0f, 0xae, 0x19]),
            Err(EmulateError::ReadOnly { gva: 0x6000 })
        ));
        assert_eq!(f.mem[0x5ffe..0x6002], [0; 4]);
        assert_eq!(f.rip, 0x1003);
    }

    #[test]
    fn ldmxcsr_loads_and_checks_reserved_bits() {
        let mut f = Fake::new();
        f.mem[0x4000..0x4004].copy_from_slice(&0x9fc0u32.to_le_bytes());
        f.regs[4] = 0x4000;
        // ldmxcsr [rsp]
        assert_eq!(f.run(&[0x0f, 0xae, 0x14, 0x24]).unwrap(), Effect::Completed);
        assert_eq!(f.mxcsr, 0x9fc0);
        assert_eq!(f.rip, 0x1004);
        f.mem[0x4000..0x4004].copy_from_slice(&0x1_1f80u32.to_le_bytes());
        assert_eq!(
            f.run(&[0x0f, 0xae, 0x14, 0x24]).unwrap(),
            Effect::Raised(Exception::GP0)
        );
        assert_eq!(f.mxcsr, 0x9fc0, "unchanged");
        assert_eq!(f.rip, 0x1004, "a fault: RIP stays on the instruction");
    }
}
