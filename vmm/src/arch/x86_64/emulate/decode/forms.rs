//! The table of instruction forms the fallback handles, and how a form is chosen and checked.

use super::encoding::{Prefixes, PREFIX_REP, REX_W};
use super::insn::{DecodeError, Kind};

/// What follows a form's opcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ModRmRule {
    /// Nothing: the opcode is the whole instruction.
    None,
    /// A ModRM byte with a register or memory operand (`/r`).
    RegOrMem,
    /// A ModRM byte with a memory operand and this `reg` field (`/digit`, mod != 11).
    MemDigit(u8),
}

/// Which prefixes a form accepts (bits of `Form::allows`).
pub(super) const ALLOW_OPSIZE: u8 = 1 << 0;
pub(super) const ALLOW_LOCK: u8 = 1 << 1;
pub(super) const ALLOW_SEGMENT: u8 = 1 << 2;
pub(super) const ALLOW_REX: u8 = 1 << 3;

/// One instruction form the fallback handles.
pub(super) struct Form {
    pub(super) kind: Kind,
    /// Opcode bytes after the prefixes (and REX).
    pub(super) opcode: &'static [u8],
    pub(super) modrm: ModRmRule,
    /// A mandatory prefix (F3 for popcnt), part of the opcode (Intel SDM Vol. 2 §2.1.2).
    pub(super) mandatory: Option<u8>,
    /// Which optional prefixes it accepts: `ALLOW_*`.
    pub(super) allows: u8,
    /// Whether REX.W is required (cmpxchg16b; without it the same opcode is cmpxchg8b).
    pub(super) rex_w: bool,
}

/// The table of forms (opcodes from Intel SDM Vol. 2, the instruction pages).
pub(super) const FORMS: &[Form] = &[
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

/// Among the forms sharing `first`'s opcode, the one whose `/digit` (if any) matches the ModRM
/// byte after it. `None`: the ModRM byte is missing.
pub(super) fn select_form(
    first: &'static Form,
    rest: &[u8],
) -> Option<Result<&'static Form, DecodeError>> {
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

pub(super) fn check_prefixes(form: &Form, p: &Prefixes) -> Result<(), DecodeError> {
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
