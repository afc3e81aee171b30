//! The decoder of the emulation fallback: turns the bytes at RIP into an [`Insn`] (64-bit mode).
//!
//! It knows only the instruction forms listed in `forms::FORMS` and refuses everything else.

mod encoding;
mod forms;
mod insn;

pub use insn::{
    Base, DecodeError, Decoded, Insn, Kind, MemOperand, OpSize, Operand, Segment, MAX_INSN_LEN,
};

use encoding::{
    modrm, Cursor, Prefixes, PREFIX_ADDRSIZE, PREFIX_CS, PREFIX_DS, PREFIX_ES, PREFIX_FS,
    PREFIX_GS, PREFIX_LOCK, PREFIX_OPSIZE, PREFIX_REP, PREFIX_REPNE, PREFIX_SS, REX_BASE, REX_MASK,
    REX_W,
};
use forms::{check_prefixes, select_form, ModRmRule, FORMS};

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
