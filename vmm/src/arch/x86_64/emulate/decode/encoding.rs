//! The x86 encoding the decoder reads: prefix, REX, ModRM and SIB bytes (Intel SDM Vol. 2 §2).

use super::insn::{Base, DecodeError, MemOperand, Operand, Segment};

/// Legacy prefixes (Intel SDM Vol. 2 §2.1.1).
pub(super) const PREFIX_OPSIZE: u8 = 0x66;
pub(super) const PREFIX_ADDRSIZE: u8 = 0x67;
pub(super) const PREFIX_LOCK: u8 = 0xf0;
pub(super) const PREFIX_REPNE: u8 = 0xf2;
pub(super) const PREFIX_REP: u8 = 0xf3;
pub(super) const PREFIX_ES: u8 = 0x26;
pub(super) const PREFIX_CS: u8 = 0x2e;
pub(super) const PREFIX_SS: u8 = 0x36;
pub(super) const PREFIX_DS: u8 = 0x3e;
pub(super) const PREFIX_FS: u8 = 0x64;
pub(super) const PREFIX_GS: u8 = 0x65;

/// REX prefix 0100WRXB (Intel SDM Vol. 2 §2.2.1, Table 2-4).
pub(super) const REX_MASK: u8 = 0xf0;
pub(super) const REX_BASE: u8 = 0x40;
pub(super) const REX_W: u8 = 1 << 3;
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

/// Prefixes seen before the opcode.
#[derive(Default)]
pub(super) struct Prefixes {
    pub(super) opsize: bool,
    pub(super) lock: bool,
    pub(super) rep: bool,
    pub(super) repne: bool,
    pub(super) segment: Option<Segment>,
    pub(super) rex: Option<u8>,
}

impl Prefixes {
    pub(super) fn rex_bit(&self, bit: u8) -> u8 {
        u8::from(self.rex.is_some_and(|r| r & bit != 0))
    }
}

/// A cursor over the instruction bytes that reports truncation.
pub(super) struct Cursor<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl Cursor<'_> {
    pub(super) fn peek(&self) -> Result<u8, DecodeError> {
        self.bytes
            .get(self.at)
            .copied()
            .ok_or(DecodeError::Truncated(self.bytes.len()))
    }

    pub(super) fn next(&mut self) -> Result<u8, DecodeError> {
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

/// Reads ModRM (and SIB and displacement): returns the `reg` field (REX.R applied) and the
/// `r/m` operand (Intel SDM Vol. 2 §2.1.5 and §2.2.1 for REX and RIP-relative addressing).
pub(super) fn modrm(c: &mut Cursor<'_>, p: &Prefixes) -> Result<(u8, Operand), DecodeError> {
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
