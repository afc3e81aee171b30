//! The decoder of the emulation fallback: turns the bytes at RIP into an [`Insn`], for the few
//! instruction forms listed in `FORMS` and nothing else (64-bit mode only).

use std::fmt;

/// Longest x86 instruction (Intel SDM Vol. 2 §2.3.11).
pub const MAX_INSN_LEN: usize = 15;

/// Legacy prefixes (Intel SDM Vol. 2 §2.1.1).
const PREFIX_OPSIZE: u8 = 0x66;
const PREFIX_ADDRSIZE: u8 = 0x67;
const PREFIX_LOCK: u8 = 0xf0;
const PREFIX_REPNE: u8 = 0xf2;
const PREFIX_REP: u8 = 0xf3;
const PREFIX_ES: u8 = 0x26;
const PREFIX_CS: u8 = 0x2e;
const PREFIX_SS: u8 = 0x36;
const PREFIX_DS: u8 = 0x3e;
const PREFIX_FS: u8 = 0x64;
const PREFIX_GS: u8 = 0x65;

/// REX prefix 0100WRXB (Intel SDM Vol. 2 §2.2.1, Table 2-4).
const REX_MASK: u8 = 0xf0;
const REX_BASE: u8 = 0x40;
const REX_W: u8 = 1 << 3;
const REX_R: u8 = 1 << 2;
const REX_X: u8 = 1 << 1;
const REX_B: u8 = 1 << 0;

/// ModRM and SIB fields (Intel SDM Vol. 2 §2.1.5, Tables 2-2 and 2-3).
const MOD_REGISTER: u8 = 0b11;
/// `rm` (ModRM) value that means "a SIB byte follows".
const RM_SIB: u8 = 0b100;
/// `rm` value that, with mod 00, means RIP + disp32 in 64-bit mode (§2.2.1.6).
const RM_DISP32: u8 = 0b101;
/// SIB `index` value that means "no index" (unless REX.X extends it).
const SIB_NO_INDEX: u8 = 0b100;
/// SIB `base` value that, with mod 00, means "no base, disp32".
const SIB_NO_BASE: u8 = 0b101;

/// The kinds of instruction the fallback emulates; each has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `int3` (cc): #BP raised as a trap.
    Int3,
    /// `fwait` (9b): skipped.
    Fwait,
    /// `popcnt r, r/m` (f3 0f b8 /r).
    Popcnt,
    /// `clac` (0f 01 ca).
    Clac,
    /// `stac` (0f 01 cb).
    Stac,
    /// `cmpxchg16b m128` (REX.W 0f c7 /1), usually lock-prefixed.
    Cmpxchg16b,
    /// `ldmxcsr m32` (0f ae /2).
    Ldmxcsr,
    /// `stmxcsr m32` (0f ae /3).
    Stmxcsr,
}

impl Kind {
    /// Number of kinds.
    pub const COUNT: usize = 8;
    /// Every kind, in counter order.
    pub const ALL: [Kind; Kind::COUNT] = [
        Kind::Int3,
        Kind::Fwait,
        Kind::Popcnt,
        Kind::Clac,
        Kind::Stac,
        Kind::Cmpxchg16b,
        Kind::Ldmxcsr,
        Kind::Stmxcsr,
    ];

    /// The mnemonic, as used in logs and the stats JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Int3 => "int3",
            Kind::Fwait => "fwait",
            Kind::Popcnt => "popcnt",
            Kind::Clac => "clac",
            Kind::Stac => "stac",
            Kind::Cmpxchg16b => "cmpxchg16b",
            Kind::Ldmxcsr => "ldmxcsr",
            Kind::Stmxcsr => "stmxcsr",
        }
    }

    /// Position in [`Kind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A segment override prefix. In 64-bit mode only FS and GS add a base (Intel SDM Vol. 1
/// §3.4.2.1); the others are accepted and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// 0x26.
    Es,
    /// 0x2e.
    Cs,
    /// 0x36.
    Ss,
    /// 0x3e.
    Ds,
    /// 0x64.
    Fs,
    /// 0x65.
    Gs,
}

/// The base of a memory operand's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    /// No base register (SIB with base 101 and mod 00).
    None,
    /// A general register, 0..=15 (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15).
    Reg(u8),
    /// The address of the next instruction (RIP-relative, mod 00 rm 101).
    Rip,
}

/// A memory operand: `segment:[base + index * scale + disp]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemOperand {
    /// Segment override, if any.
    pub segment: Option<Segment>,
    /// Base.
    pub base: Base,
    /// Index register (0..=15, never RSP) and scale (1, 2, 4, 8).
    pub index: Option<(u8, u8)>,
    /// Sign-extended displacement.
    pub disp: i32,
}

/// A register-or-memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// A general register, 0..=15.
    Reg(u8),
    /// Memory.
    Mem(MemOperand),
}

/// An integer operand size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpSize {
    /// 16 bits (operand-size prefix 66).
    Word,
    /// 32 bits (default).
    Dword,
    /// 64 bits (REX.W).
    Qword,
}

impl OpSize {
    /// Bytes.
    pub fn bytes(self) -> usize {
        match self {
            OpSize::Word => 2,
            OpSize::Dword => 4,
            OpSize::Qword => 8,
        }
    }
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    /// `int3`.
    Int3,
    /// `fwait`.
    Fwait,
    /// `popcnt dst, src`.
    Popcnt {
        /// Operand size.
        size: OpSize,
        /// Destination register, 0..=15.
        dst: u8,
        /// Source.
        src: Operand,
    },
    /// `clac`.
    Clac,
    /// `stac`.
    Stac,
    /// `[lock] cmpxchg16b m128`.
    Cmpxchg16b {
        /// The 16-byte memory operand.
        mem: MemOperand,
        /// Whether it carried a lock prefix (the emulation is atomic either way).
        lock: bool,
    },
    /// `ldmxcsr m32`.
    Ldmxcsr {
        /// The 4-byte memory operand.
        mem: MemOperand,
    },
    /// `stmxcsr m32`.
    Stmxcsr {
        /// The 4-byte memory operand.
        mem: MemOperand,
    },
}

impl Insn {
    /// Its counter.
    pub fn kind(&self) -> Kind {
        match self {
            Insn::Int3 => Kind::Int3,
            Insn::Fwait => Kind::Fwait,
            Insn::Popcnt { .. } => Kind::Popcnt,
            Insn::Clac => Kind::Clac,
            Insn::Stac => Kind::Stac,
            Insn::Cmpxchg16b { .. } => Kind::Cmpxchg16b,
            Insn::Ldmxcsr { .. } => Kind::Ldmxcsr,
            Insn::Stmxcsr { .. } => Kind::Stmxcsr,
        }
    }
}

/// An instruction and its length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The instruction.
    pub insn: Insn,
    /// Its length (RIP advances by this much).
    pub len: usize,
}

/// Why bytes were not decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside the instruction (more are needed).
    #[error("the {0} instruction bytes given end inside the instruction")]
    Truncated(usize),
    /// Not one of the forms the fallback handles.
    #[error("not an instruction the emulation fallback handles ({0})")]
    Unsupported(&'static str),
}

/// What follows a form's opcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModRmRule {
    /// Nothing: the opcode is the whole instruction.
    None,
    /// A ModRM byte with a register or memory operand (`/r`).
    RegOrMem,
    /// A ModRM byte with a memory operand and this `reg` field (`/digit`, mod != 11).
    MemDigit(u8),
}

/// Which prefixes a form accepts (bits of `Form::allows`).
const ALLOW_OPSIZE: u8 = 1 << 0;
const ALLOW_LOCK: u8 = 1 << 1;
const ALLOW_SEGMENT: u8 = 1 << 2;
const ALLOW_REX: u8 = 1 << 3;

/// One instruction form the fallback handles.
struct Form {
    kind: Kind,
    /// Opcode bytes after the prefixes (and REX).
    opcode: &'static [u8],
    modrm: ModRmRule,
    /// A mandatory prefix (F3 for popcnt), part of the opcode (Intel SDM Vol. 2 §2.1.2).
    mandatory: Option<u8>,
    /// Which optional prefixes it accepts: `ALLOW_*`.
    allows: u8,
    /// Whether REX.W is required (cmpxchg16b; without it the same opcode is cmpxchg8b).
    rex_w: bool,
}

/// The table of forms (opcodes from Intel SDM Vol. 2, the instruction pages).
const FORMS: &[Form] = &[
    Form {
        kind: Kind::Int3,
        opcode: &[0xcc],
        modrm: ModRmRule::None,
        mandatory: None,
        allows: 0,
        rex_w: false,
    },
    Form {
        kind: Kind::Fwait,
        opcode: &[0x9b],
        modrm: ModRmRule::None,
        mandatory: None,
        allows: 0,
        rex_w: false,
    },
    Form {
        kind: Kind::Clac,
        opcode: &[0x0f, 0x01, 0xca],
        modrm: ModRmRule::None,
        mandatory: None,
        allows: 0,
        rex_w: false,
    },
    Form {
        kind: Kind::Stac,
        opcode: &[0x0f, 0x01, 0xcb],
        modrm: ModRmRule::None,
        mandatory: None,
        allows: 0,
        rex_w: false,
    },
    Form {
        kind: Kind::Popcnt,
        opcode: &[0x0f, 0xb8],
        modrm: ModRmRule::RegOrMem,
        mandatory: Some(PREFIX_REP),
        allows: ALLOW_OPSIZE | ALLOW_SEGMENT | ALLOW_REX,
        rex_w: false,
    },
    Form {
        kind: Kind::Cmpxchg16b,
        opcode: &[0x0f, 0xc7],
        modrm: ModRmRule::MemDigit(1),
        mandatory: None,
        allows: ALLOW_LOCK | ALLOW_SEGMENT | ALLOW_REX,
        rex_w: true,
    },
    Form {
        kind: Kind::Ldmxcsr,
        opcode: &[0x0f, 0xae],
        modrm: ModRmRule::MemDigit(2),
        mandatory: None,
        allows: ALLOW_SEGMENT | ALLOW_REX,
        rex_w: false,
    },
    Form {
        kind: Kind::Stmxcsr,
        opcode: &[0x0f, 0xae],
        modrm: ModRmRule::MemDigit(3),
        mandatory: None,
        allows: ALLOW_SEGMENT | ALLOW_REX,
        rex_w: false,
    },
];

/// Prefixes seen before the opcode.
#[derive(Default)]
struct Prefixes {
    opsize: bool,
    lock: bool,
    rep: bool,
    repne: bool,
    segment: Option<Segment>,
    rex: Option<u8>,
}

impl Prefixes {
    fn rex_bit(&self, bit: u8) -> u8 {
        u8::from(self.rex.is_some_and(|r| r & bit != 0))
    }
}

/// A cursor over the instruction bytes that reports truncation.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Result<u8, DecodeError> {
        self.bytes
            .get(self.at)
            .copied()
            .ok_or(DecodeError::Truncated(self.bytes.len()))
    }

    fn next(&mut self) -> Result<u8, DecodeError> {
        let b = self.peek()?;
        self.at += 1;
        Ok(b)
    }

    fn disp32(&mut self) -> Result<i32, DecodeError> {
        let mut b = [0u8; 4];
        for x in &mut b {
            *x = self.next()?;
        }
        Ok(i32::from_le_bytes(b))
    }
}

/// Decodes the instruction at the start of `bytes` (64-bit mode). Extra bytes after it are
/// ignored; too few give [`DecodeError::Truncated`].
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_LEN)];
    let mut c = Cursor { bytes, at: 0 };
    let mut p = Prefixes::default();
    loop {
        let b = c.peek()?;
        let seg = match b {
            PREFIX_ES => Some(Segment::Es),
            PREFIX_CS => Some(Segment::Cs),
            PREFIX_SS => Some(Segment::Ss),
            PREFIX_DS => Some(Segment::Ds),
            PREFIX_FS => Some(Segment::Fs),
            PREFIX_GS => Some(Segment::Gs),
            _ => None,
        };
        match b {
            PREFIX_OPSIZE => p.opsize = true,
            PREFIX_LOCK => p.lock = true,
            PREFIX_REP => p.rep = true,
            PREFIX_REPNE => p.repne = true,
            PREFIX_ADDRSIZE => return Err(DecodeError::Unsupported("address-size prefix 67")),
            _ if seg.is_some() => p.segment = seg,
            _ => break,
        }
        c.at += 1;
    }
    if c.peek()? & REX_MASK == REX_BASE {
        p.rex = Some(c.next()?);
    }
    let rest = &bytes[c.at..];
    let form = match FORMS.iter().find(|f| rest.starts_with(f.opcode)) {
        Some(f) => select_form(f, rest).ok_or(DecodeError::Truncated(bytes.len()))??,
        None if rest.is_empty() || FORMS.iter().any(|f| f.opcode.starts_with(rest)) => {
            return Err(DecodeError::Truncated(bytes.len()))
        }
        None => return Err(DecodeError::Unsupported("unknown opcode")),
    };
    c.at += form.opcode.len();
    check_prefixes(form, &p)?;

    let insn = match form.modrm {
        ModRmRule::None => match form.kind {
            Kind::Int3 => Insn::Int3,
            Kind::Fwait => Insn::Fwait,
            Kind::Clac => Insn::Clac,
            _ => Insn::Stac,
        },
        ModRmRule::RegOrMem => {
            let (reg, src) = modrm(&mut c, &p)?;
            let size = if p.rex_bit(REX_W) == 1 {
                OpSize::Qword
            } else if p.opsize {
                OpSize::Word
            } else {
                OpSize::Dword
            };
            Insn::Popcnt {
                size,
                dst: reg,
                src,
            }
        }
        ModRmRule::MemDigit(digit) => {
            let (reg, op) = modrm(&mut c, &p)?;
            debug_assert_eq!(reg & 7, digit, "select_form chose by the digit");
            let mem = match op {
                Operand::Mem(m) => m,
                Operand::Reg(_) => {
                    return Err(DecodeError::Unsupported(
                        "register form of a memory-only opcode",
                    ))
                }
            };
            match form.kind {
                Kind::Cmpxchg16b => Insn::Cmpxchg16b { mem, lock: p.lock },
                Kind::Ldmxcsr => Insn::Ldmxcsr { mem },
                _ => Insn::Stmxcsr { mem },
            }
        }
    };
    Ok(Decoded { insn, len: c.at })
}

/// Among the forms sharing `first`'s opcode, the one whose `/digit` (if any) matches the ModRM
/// byte after it. `None`: the ModRM byte is missing.
fn select_form(first: &'static Form, rest: &[u8]) -> Option<Result<&'static Form, DecodeError>> {
    if !matches!(first.modrm, ModRmRule::MemDigit(_)) {
        return Some(Ok(first));
    }
    let reg = (rest.get(first.opcode.len())? >> 3) & 7;
    Some(
        FORMS
            .iter()
            .find(|f| f.opcode == first.opcode && f.modrm == ModRmRule::MemDigit(reg))
            .ok_or(DecodeError::Unsupported("other ModRM.reg digit")),
    )
}

fn check_prefixes(form: &Form, p: &Prefixes) -> Result<(), DecodeError> {
    let allowed = |bit: u8| form.allows & bit != 0;
    if p.repne {
        return Err(DecodeError::Unsupported("repne prefix f2"));
    }
    if p.rep != (form.mandatory == Some(PREFIX_REP)) {
        return Err(DecodeError::Unsupported(
            "rep prefix f3 where the form needs the other",
        ));
    }
    if p.opsize && !allowed(ALLOW_OPSIZE) {
        return Err(DecodeError::Unsupported("operand-size prefix 66"));
    }
    if p.lock && !allowed(ALLOW_LOCK) {
        return Err(DecodeError::Unsupported(
            "lock prefix on an instruction that takes none",
        ));
    }
    if p.segment.is_some() && !allowed(ALLOW_SEGMENT) {
        return Err(DecodeError::Unsupported("segment override"));
    }
    if p.rex.is_some() && !allowed(ALLOW_REX) {
        return Err(DecodeError::Unsupported("REX prefix"));
    }
    if form.rex_w && p.rex_bit(REX_W) == 0 {
        return Err(DecodeError::Unsupported("cmpxchg8b (no REX.W)"));
    }
    Ok(())
}

/// Reads ModRM (and SIB and displacement): returns the `reg` field (REX.R applied) and the
/// `r/m` operand (Intel SDM Vol. 2 §2.1.5 and §2.2.1 for REX and RIP-relative addressing).
fn modrm(c: &mut Cursor<'_>, p: &Prefixes) -> Result<(u8, Operand), DecodeError> {
    let m = c.next()?;
    let md = m >> 6;
    let reg = ((m >> 3) & 7) | (p.rex_bit(REX_R) << 3);
    let rm = m & 7;
    if md == MOD_REGISTER {
        return Ok((reg, Operand::Reg(rm | (p.rex_bit(REX_B) << 3))));
    }
    let mut mem = MemOperand {
        segment: p.segment,
        base: Base::Reg(rm | (p.rex_bit(REX_B) << 3)),
        index: None,
        disp: 0,
    };
    let mut disp32 = md == 0b10;
    if rm == RM_SIB {
        let sib = c.next()?;
        let scale = 1u8 << (sib >> 6);
        let index = ((sib >> 3) & 7) | (p.rex_bit(REX_X) << 3);
        if index != SIB_NO_INDEX {
            mem.index = Some((index, scale));
        }
        let base = sib & 7;
        if base == SIB_NO_BASE && md == 0 {
            mem.base = Base::None;
            disp32 = true;
        } else {
            mem.base = Base::Reg(base | (p.rex_bit(REX_B) << 3));
        }
    } else if rm == RM_DISP32 && md == 0 {
        mem.base = Base::Rip;
        disp32 = true;
    }
    if md == 0b01 {
        mem.disp = i32::from(c.next()? as i8);
    } else if disp32 {
        mem.disp = c.disp32()?;
    }
    Ok((reg, Operand::Mem(mem)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(bytes: &[u8]) -> Decoded {
        decode(bytes).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"))
    }

    fn mem(base: Base, index: Option<(u8, u8)>, disp: i32) -> MemOperand {
        MemOperand {
            segment: None,
            base,
            index,
            disp,
        }
    }

    #[test]
    fn one_byte_and_fixed_forms() {
        assert_eq!(
            ok(&[0xcc, 0x90]),
            Decoded {
                insn: Insn::Int3,
                len: 1
            }
        );
        assert_eq!(
            ok(&[0x9b]),
            Decoded {
                insn: Insn::Fwait,
                len: 1
            }
        );
        assert_eq!(
            ok(&[0x0f, 0x01, 0xca]),
            Decoded {
                insn: Insn::Clac,
                len: 3
            }
        );
        assert_eq!(
            ok(&[0x0f, 0x01, 0xcb, 0xcc]),
            Decoded {
                insn: Insn::Stac,
                len: 3
            }
        );
    }

    #[test]
    fn popcnt_register_forms_and_sizes() {
        // popcnt eax, ecx
        let d = ok(&[0xf3, 0x0f, 0xb8, 0xc1]);
        assert_eq!(d.len, 4);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Dword,
                dst: 0,
                src: Operand::Reg(1)
            }
        );
        // popcnt r9, r15 (REX.WRB)
        let d = ok(&[0xf3, 0x4d, 0x0f, 0xb8, 0xcf]);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Qword,
                dst: 9,
                src: Operand::Reg(15)
            }
        );
        // popcnt dx, bx; 66 before or after f3
        for bytes in [
            [0x66, 0xf3, 0x0f, 0xb8, 0xd3],
            [0xf3, 0x66, 0x0f, 0xb8, 0xd3],
        ] {
            let d = ok(&bytes);
            assert_eq!(d.len, 5);
            assert_eq!(
                d.insn,
                Insn::Popcnt {
                    size: OpSize::Word,
                    dst: 2,
                    src: Operand::Reg(3)
                }
            );
        }
        // REX.W wins over 66.
        let d = ok(&[0x66, 0xf3, 0x48, 0x0f, 0xb8, 0xc0]);
        assert!(matches!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Qword,
                ..
            }
        ));
    }

    #[test]
    fn popcnt_memory_addressing_modes() {
        // popcnt rax, [rdi]
        let d = ok(&[0xf3, 0x48, 0x0f, 0xb8, 0x07]);
        assert_eq!(d.len, 5);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Qword,
                dst: 0,
                src: Operand::Mem(mem(Base::Reg(7), None, 0))
            }
        );
        // popcnt ecx, [rbp - 8] (mod 01, disp8 sign-extended)
        let d = ok(&[0xf3, 0x0f, 0xb8, 0x4d, 0xf8]);
        assert_eq!(d.len, 5);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Dword,
                dst: 1,
                src: Operand::Mem(mem(Base::Reg(5), None, -8))
            }
        );
        // popcnt edx, [r13 + 0x12345678] (mod 10, REX.B)
        let d = ok(&[0xf3, 0x41, 0x0f, 0xb8, 0x95, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!(d.len, 9);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Dword,
                dst: 2,
                src: Operand::Mem(mem(Base::Reg(13), None, 0x1234_5678))
            }
        );
        // popcnt rax, [rip + 0x10]
        let d = ok(&[0xf3, 0x48, 0x0f, 0xb8, 0x05, 0x10, 0, 0, 0]);
        assert_eq!(d.len, 9);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Qword,
                dst: 0,
                src: Operand::Mem(mem(Base::Rip, None, 0x10))
            }
        );
        // popcnt eax, [rbx + rsi*8 + 4] (SIB, disp8)
        let d = ok(&[0xf3, 0x0f, 0xb8, 0x44, 0xf3, 0x04]);
        assert_eq!(d.len, 6);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Dword,
                dst: 0,
                src: Operand::Mem(mem(Base::Reg(3), Some((6, 8)), 4))
            }
        );
        // popcnt eax, [rsp] (SIB with no index)
        let d = ok(&[0xf3, 0x0f, 0xb8, 0x04, 0x24]);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Dword,
                dst: 0,
                src: Operand::Mem(mem(Base::Reg(4), None, 0))
            }
        );
        // popcnt eax, [r12 + r12*2] (REX.XB: index 100 extended is r12, a real index)
        let d = ok(&[0xf3, 0x43, 0x0f, 0xb8, 0x04, 0x64]);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Dword,
                dst: 0,
                src: Operand::Mem(mem(Base::Reg(12), Some((12, 2)), 0))
            }
        );
        // popcnt eax, [rcx*4 + 0x1000] (SIB, no base, disp32)
        let d = ok(&[0xf3, 0x0f, 0xb8, 0x04, 0x8d, 0x00, 0x10, 0, 0]);
        assert_eq!(d.len, 9);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Dword,
                dst: 0,
                src: Operand::Mem(mem(Base::None, Some((1, 4)), 0x1000))
            }
        );
        // mod 00 rm 101 with REX.B is still RIP-relative, not r13.
        let d = ok(&[0xf3, 0x41, 0x0f, 0xb8, 0x05, 0, 0, 0, 0]);
        assert!(matches!(
            d.insn,
            Insn::Popcnt {
                src: Operand::Mem(MemOperand {
                    base: Base::Rip,
                    ..
                }),
                ..
            }
        ));
        // [r13] needs mod 01 with disp8 0.
        let d = ok(&[0xf3, 0x41, 0x0f, 0xb8, 0x45, 0x00]);
        assert_eq!(
            d.insn,
            Insn::Popcnt {
                size: OpSize::Dword,
                dst: 0,
                src: Operand::Mem(mem(Base::Reg(13), None, 0))
            }
        );
    }

    #[test]
    fn segment_overrides_are_kept() {
        // popcnt rax, gs:[rdi]
        let d = ok(&[0x65, 0xf3, 0x48, 0x0f, 0xb8, 0x07]);
        assert!(matches!(
            d.insn,
            Insn::Popcnt {
                src: Operand::Mem(MemOperand {
                    segment: Some(Segment::Gs),
                    ..
                }),
                ..
            }
        ));
        // gs: cmpxchg16b [rsi] (the kernel's per-CPU form, no lock)
        let d = ok(&[0x65, 0x48, 0x0f, 0xc7, 0x0e]);
        assert_eq!(d.len, 5);
        assert_eq!(
            d.insn,
            Insn::Cmpxchg16b {
                mem: MemOperand {
                    segment: Some(Segment::Gs),
                    ..mem(Base::Reg(6), None, 0)
                },
                lock: false
            }
        );
    }

    #[test]
    fn cmpxchg16b_forms() {
        // lock cmpxchg16b [rdi]
        let d = ok(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
        assert_eq!(d.len, 5);
        assert_eq!(
            d.insn,
            Insn::Cmpxchg16b {
                mem: mem(Base::Reg(7), None, 0),
                lock: true
            }
        );
        // lock cmpxchg16b [r8 + 0x10]
        let d = ok(&[0xf0, 0x49, 0x0f, 0xc7, 0x48, 0x10]);
        assert_eq!(d.len, 6);
        assert_eq!(
            d.insn,
            Insn::Cmpxchg16b {
                mem: mem(Base::Reg(8), None, 0x10),
                lock: true
            }
        );
        // without REX.W it is cmpxchg8b
        assert!(matches!(
            decode(&[0xf0, 0x0f, 0xc7, 0x0f]),
            Err(DecodeError::Unsupported(_))
        ));
        // register operand (rdrand-like encodings) and other /digit (rdrand is /6)
        assert!(matches!(
            decode(&[0x48, 0x0f, 0xc7, 0xc9]),
            Err(DecodeError::Unsupported(_))
        ));
        assert!(matches!(
            decode(&[0x48, 0x0f, 0xc7, 0x37]),
            Err(DecodeError::Unsupported(_))
        ));
    }

    #[test]
    fn ldmxcsr_forms() {
        // ldmxcsr [rsp + 4]
        let d = ok(&[0x0f, 0xae, 0x54, 0x24, 0x04]);
        assert_eq!(d.len, 5);
        assert_eq!(
            d.insn,
            Insn::Ldmxcsr {
                mem: mem(Base::Reg(4), None, 4)
            }
        );
        // ldmxcsr [r9]
        let d = ok(&[0x41, 0x0f, 0xae, 0x11]);
        assert_eq!(
            d.insn,
            Insn::Ldmxcsr {
                mem: mem(Base::Reg(9), None, 0)
            }
        );
        // stmxcsr [rcx] (/3)
        assert_eq!(
            ok(&[0x0f, 0xae, 0x19]).insn,
            Insn::Stmxcsr {
                mem: mem(Base::Reg(1), None, 0)
            }
        );
        // xsave [rax] (/4), lfence (register form), wrfsbase (f3 0f ae /2 mod 11) are not it
        assert!(matches!(
            decode(&[0x0f, 0xae, 0x20]),
            Err(DecodeError::Unsupported(_))
        ));
        assert!(matches!(
            decode(&[0x0f, 0xae, 0xe8]),
            Err(DecodeError::Unsupported(_))
        ));
        assert!(matches!(
            decode(&[0xf3, 0x0f, 0xae, 0xd0]),
            Err(DecodeError::Unsupported(_))
        ));
    }

    #[test]
    fn unknown_bytes_and_bad_prefixes_are_refused() {
        for bytes in [
            &[0x0f, 0x0b][..],               // ud2
            &[0x90],                         // nop
            &[0x0f, 0x01, 0xcc],             // not clac/stac
            &[0x0f, 0xb8, 0xc1],             // jmpe (no f3)
            &[0xf2, 0x0f, 0xb8, 0xc1],       // f2 instead of f3
            &[0xf2, 0xf3, 0x0f, 0xb8, 0xc1], // both
            &[0x67, 0xf3, 0x0f, 0xb8, 0x07], // 32-bit addressing
            &[0xf0, 0xcc],                   // lock int3
            &[0xf3, 0xcc],                   // rep int3
            &[0x48, 0x9b],                   // REX fwait
            &[0x65, 0x0f, 0x01, 0xca],       // segment clac
            &[0x66, 0x0f, 0xae, 0x10],       // 66 ldmxcsr
            &[0xf0, 0xf3, 0x0f, 0xb8, 0xc1], // lock popcnt
            &[0x48, 0xf3, 0x0f, 0xb8, 0xc1], // REX not last: f3 is then the opcode
        ] {
            assert!(
                matches!(decode(bytes), Err(DecodeError::Unsupported(_))),
                "{bytes:02x?}: {:?}",
                decode(bytes)
            );
        }
    }

    #[test]
    fn truncated_input_is_reported() {
        for bytes in [
            &[][..],
            &[0xf3],
            &[0xf3, 0x48],
            &[0x0f],
            &[0x0f, 0x01],
            &[0xf3, 0x0f, 0xb8],
            &[0xf3, 0x0f, 0xb8, 0x04],             // SIB missing
            &[0xf3, 0x0f, 0xb8, 0x45],             // disp8 missing
            &[0xf3, 0x0f, 0xb8, 0x05, 0x00, 0x00], // disp32 cut
            &[0xf0, 0x48, 0x0f, 0xc7],
            &[0x0f, 0xae], // ldmxcsr or stmxcsr: the ModRM digit decides
        ] {
            assert_eq!(
                decode(bytes),
                Err(DecodeError::Truncated(bytes.len())),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn more_than_fifteen_bytes_of_prefixes_is_not_an_instruction() {
        let mut bytes = [0x66u8; 20];
        bytes[19] = 0xcc;
        assert!(decode(&bytes).is_err());
    }
}
