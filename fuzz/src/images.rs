//! Small kernel images for the `kernel_image` target and its seeds: a vmlinux ELF with one
//! loadable segment, and a bzImage header around any payload (boot protocol 2.15, 64-bit).

/// ELF64 header bytes.
const EHDR: usize = 64;
/// Program header bytes.
const PHDR: usize = 56;

/// A minimal x86-64 `ET_EXEC` with one `PT_LOAD` of `code` at physical 16 MiB, 4 KiB in memory.
pub fn fake_elf(code: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; EHDR + PHDR];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little-endian
    b[6] = 1; // EV_CURRENT
    put16(&mut b, 16, 2); // ET_EXEC
    put16(&mut b, 18, 62); // EM_X86_64
    put32(&mut b, 20, 1);
    put64(&mut b, 24, 0x100_0000); // e_entry
    put64(&mut b, 32, EHDR as u64); // e_phoff
    put16(&mut b, 52, EHDR as u16);
    put16(&mut b, 54, PHDR as u16);
    put16(&mut b, 56, 1); // e_phnum
    let ph = EHDR;
    put32(&mut b, ph, 1); // PT_LOAD
    put32(&mut b, ph + 4, 5); // R+X
    put64(&mut b, ph + 8, (EHDR + PHDR) as u64);
    put64(&mut b, ph + 16, 0xffff_ffff_8100_0000); // p_vaddr
    put64(&mut b, ph + 24, 0x100_0000); // p_paddr
    put64(&mut b, ph + 32, code.len() as u64);
    put64(&mut b, ph + 40, (code.len() as u64).max(0x1000));
    put64(&mut b, ph + 48, 0x20_0000);
    b.extend_from_slice(code);
    b
}

/// A bzImage (one setup sector) whose protected-mode code is `payload`, located by
/// `payload_offset` 0 and `payload_length`, with `init_size` 32 MiB at `pref_address` 16 MiB.
pub fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
    const SECTOR: usize = 512;
    let mut b = vec![0u8; 2 * SECTOR];
    b[0x1f1] = 1; // setup_sects
    put32(&mut b, 0x1f4, payload.len().div_ceil(16) as u32); // syssize
    put16(&mut b, 0x1fe, 0xaa55); // boot_flag
    b[0x202..0x206].copy_from_slice(b"HdrS");
    put16(&mut b, 0x206, 0x020f); // version
    b[0x211] = 1; // loadflags: LOADED_HIGH
    put32(&mut b, 0x214, 0x10_0000); // code32_start
    put32(&mut b, 0x22c, 0x7fff_ffff); // initrd_addr_max
    put32(&mut b, 0x230, 0x20_0000); // kernel_alignment
    b[0x234] = 1; // relocatable_kernel
    put16(&mut b, 0x236, 1); // xloadflags: XLF_KERNEL_64
    put32(&mut b, 0x238, 2047); // cmdline_size
    put32(&mut b, 0x248, 0); // payload_offset
    put32(&mut b, 0x24c, payload.len() as u32); // payload_length
    put64(&mut b, 0x258, 0x100_0000); // pref_address
    put32(&mut b, 0x260, 0x200_0000); // init_size
    b.extend_from_slice(payload);
    b.resize(2 * SECTOR + payload.len().next_multiple_of(16), 0);
    b
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
