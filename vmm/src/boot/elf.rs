//! Checking a vmlinux ELF before loading it: an x86-64 ELF64 executable whose loadable segments
//! are inside the file; reports where its image ends in guest-physical memory.

// ELF64 header and program header offsets (System V ABI, ELF-64 Object File Format 1.5).
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const OFF_E_TYPE: usize = 0x10;
const OFF_E_MACHINE: usize = 0x12;
const OFF_E_ENTRY: usize = 0x18;
const OFF_E_PHOFF: usize = 0x20;
const OFF_E_PHENTSIZE: usize = 0x36;
const OFF_E_PHNUM: usize = 0x38;
const ELF64_HEADER_SIZE: usize = 0x40;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PHDR_P_OFFSET: usize = 0x08;
const PHDR_P_PADDR: usize = 0x18;
const PHDR_P_FILESZ: usize = 0x20;
const PHDR_P_MEMSZ: usize = 0x28;
const PHDR_SIZE: usize = 0x38;

/// The ELF magic.
pub const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// What the loader needs to know about a vmlinux before loading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElfInfo {
    /// Entry point (physical for a vmlinux: `startup_64`).
    pub entry: u64,
    /// Lowest physical address of a loadable segment.
    pub start: u64,
    /// End of the highest loadable segment (p_paddr + p_memsz).
    pub end: u64,
}

/// True if the bytes start with the ELF magic.
pub fn is_elf(b: &[u8]) -> bool {
    b.len() >= 4 && &b[..4] == ELF_MAGIC
}

fn rd<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// Validates an x86-64 ELF kernel; the error says what is wrong.
pub fn parse(b: &[u8]) -> Result<ElfInfo, String> {
    if b.len() < ELF64_HEADER_SIZE {
        return Err(format!(
            "it is {} bytes long, shorter than an ELF64 header (truncated?)",
            b.len()
        ));
    }
    if b[EI_CLASS] != ELFCLASS64 || b[EI_DATA] != ELFDATA2LSB {
        return Err("it is not a little-endian ELF64 file (a 32-bit kernel?)".into());
    }
    let e_type = u16::from_le_bytes(rd(b, OFF_E_TYPE).expect("in header"));
    let machine = u16::from_le_bytes(rd(b, OFF_E_MACHINE).expect("in header"));
    if machine != EM_X86_64 {
        return Err(format!(
            "its machine is {machine}, not x86-64 ({EM_X86_64})"
        ));
    }
    if e_type != ET_EXEC {
        return Err(format!(
            "it is ELF type {e_type}, not an executable (a module or object file?)"
        ));
    }
    let entry = u64::from_le_bytes(rd(b, OFF_E_ENTRY).expect("in header"));
    let phoff = u64::from_le_bytes(rd(b, OFF_E_PHOFF).expect("in header"));
    let phentsize = u16::from_le_bytes(rd(b, OFF_E_PHENTSIZE).expect("in header")) as usize;
    let phnum = u16::from_le_bytes(rd(b, OFF_E_PHNUM).expect("in header")) as usize;
    if phentsize < PHDR_SIZE {
        return Err(format!("its program header size {phentsize} is too small"));
    }
    let (mut start, mut end) = (u64::MAX, 0u64);
    for i in 0..phnum {
        // At most 65535 * 65535 past phoff; a phoff beyond the file is caught by the read.
        let ph = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i * phentsize))
            .unwrap_or(usize::MAX);
        let Some(p_type) = rd::<4>(b, ph).map(u32::from_le_bytes) else {
            return Err("its program headers run past the end of the file (truncated?)".into());
        };
        if p_type != PT_LOAD {
            continue;
        }
        let field = |off| {
            rd::<8>(b, ph.saturating_add(off))
                .map(u64::from_le_bytes)
                .ok_or("truncated program header")
        };
        let offset = field(PHDR_P_OFFSET)?;
        let paddr = field(PHDR_P_PADDR)?;
        let filesz = field(PHDR_P_FILESZ)?;
        let memsz = field(PHDR_P_MEMSZ)?;
        if offset
            .checked_add(filesz)
            .is_none_or(|e| e > b.len() as u64)
        {
            return Err(format!(
                "segment {i} ends at file offset {:#x} beyond the file's {} bytes (truncated?)",
                offset.saturating_add(filesz),
                b.len()
            ));
        }
        start = start.min(paddr);
        end = end.max(
            paddr
                .checked_add(memsz)
                .ok_or("segment address overflows")?,
        );
    }
    if end == 0 {
        return Err("it has no loadable segment".into());
    }
    Ok(ElfInfo { entry, start, end })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal x86-64 executable with one PT_LOAD segment of 16 file bytes, 0x1000 in memory,
    /// at physical 0x100_0000.
    pub(crate) fn fake_elf() -> Vec<u8> {
        let mut b = vec![0u8; ELF64_HEADER_SIZE + PHDR_SIZE + 16];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[EI_CLASS] = ELFCLASS64;
        b[EI_DATA] = ELFDATA2LSB;
        b[OFF_E_TYPE..OFF_E_TYPE + 2].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[OFF_E_MACHINE..OFF_E_MACHINE + 2].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[OFF_E_ENTRY..OFF_E_ENTRY + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[OFF_E_PHOFF..OFF_E_PHOFF + 8].copy_from_slice(&(ELF64_HEADER_SIZE as u64).to_le_bytes());
        b[OFF_E_PHENTSIZE..OFF_E_PHENTSIZE + 2].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[OFF_E_PHNUM..OFF_E_PHNUM + 2].copy_from_slice(&1u16.to_le_bytes());
        let ph = ELF64_HEADER_SIZE;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        let put = |b: &mut Vec<u8>, off: usize, v: u64| {
            b[ph + off..ph + off + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(
            &mut b,
            PHDR_P_OFFSET,
            (ELF64_HEADER_SIZE + PHDR_SIZE) as u64,
        );
        put(&mut b, 0x10, 0x100_0000); // p_vaddr
        put(&mut b, PHDR_P_PADDR, 0x100_0000);
        put(&mut b, PHDR_P_FILESZ, 16);
        put(&mut b, PHDR_P_MEMSZ, 0x1000);
        b
    }

    #[test]
    fn parses_and_rejects() {
        let b = fake_elf();
        assert!(is_elf(&b));
        assert_eq!(
            parse(&b).unwrap(),
            ElfInfo {
                entry: 0x100_0000,
                start: 0x100_0000,
                end: 0x100_1000
            }
        );
        assert!(parse(&b[..b.len() - 1]).unwrap_err().contains("truncated"));
        assert!(parse(&b[..0x20]).unwrap_err().contains("shorter"));
        let mut m = b.clone();
        m[OFF_E_MACHINE] = 3;
        assert!(parse(&m).unwrap_err().contains("not x86-64"));
        let mut c = b;
        c[EI_CLASS] = 1;
        assert!(parse(&c).unwrap_err().contains("ELF64"));
    }

    /// Offsets near the top of the address space are refused, not wrapped (no panic in a debug
    /// build either).
    #[test]
    fn offsets_that_overflow_are_refused() {
        let b = fake_elf();
        let mut far = b.clone();
        far[OFF_E_PHOFF..OFF_E_PHOFF + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&far).unwrap_err().contains("past the end"));
        let mut near = b.clone();
        near[OFF_E_PHOFF..OFF_E_PHOFF + 8].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
        near[OFF_E_PHNUM..OFF_E_PHNUM + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(parse(&near).unwrap_err().contains("past the end"));
        let mut seg = b;
        let ph = ELF64_HEADER_SIZE;
        seg[ph + PHDR_P_OFFSET..ph + PHDR_P_OFFSET + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&seg).unwrap_err().contains("beyond the file"));
    }
}
