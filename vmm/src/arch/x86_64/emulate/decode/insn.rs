//! What the decoder produces: instructions, operands, their kinds and the decode error.

use std::fmt;

/// Longest x86 instruction (Intel SDM Vol. 2 §2.3.11).
pub const MAX_INSN_LEN: usize = 15;

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
