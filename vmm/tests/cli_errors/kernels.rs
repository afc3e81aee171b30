//! Bad kernel contents: not a kernel, bzImage setup headers that disagree with the file, vmlinux
//! ELFs that cannot be loaded, payloads that do not decompress; each refused within a second.

use vmm::boot::decompress::Compression;

use super::*;

const SECTOR: usize = 512;

/// A bzImage-shaped file: protocol 2.15, 64-bit, 1 setup sector, `syssize` paragraphs promised,
/// loaded high at 1 MiB, an 8-byte payload at the start of the code, `pref_address` 16 MiB and
/// `init_size` 32 MiB.
fn bzimage(syssize: u32, body: usize) -> Vec<u8> {
    let mut b = vec![0u8; 2 * SECTOR + body];
    b[0x1f1] = 1;
    b[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    b[0x260..0x264].copy_from_slice(&0x200_0000u32.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    set_u32(&mut b, 0x214, 0x10_0000); // code32_start
    set_u32(&mut b, PAYLOAD_LENGTH, 8);
    b
}

/// Setup-header fields the header tests change (boot.rst, "The Real-Mode Kernel Header").
const SETUP_SECTS: usize = 0x1f1;

const PAYLOAD_OFFSET: usize = 0x248;

const PAYLOAD_LENGTH: usize = 0x24c;

const PREF_ADDRESS: usize = 0x258;

const INIT_SIZE: usize = 0x260;

fn set_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// [`bzimage`] whose code is exactly `payload` (padded to a 16-byte paragraph).
fn bzimage_with_payload(payload: &[u8]) -> Vec<u8> {
    let mut b = bzimage(payload.len().div_ceil(16) as u32, 0);
    b.extend_from_slice(payload);
    b.resize(2 * SECTOR + payload.len().next_multiple_of(16), 0);
    set_u32(&mut b, PAYLOAD_LENGTH, payload.len() as u32);
    b
}

#[test]
fn truncated_bzimage() {
    let d = tmpdir("trunc");
    // The header promises 4096 paragraphs (64 KiB) of protected-mode code; 100 bytes follow.
    let k = write(&d, "bz", &bzimage(4096, 100));
    expect_error(&run(&["--kernel", &k]), &["truncated", "promises"]);
    let short = write(&d, "short", &bzimage(1, 0)[..0x210]);
    expect_error(&run(&["--kernel", &short]), &["truncated"]);
}

/// `setup_sects` says the kernel code starts beyond the end of the file.
#[test]
fn setup_sects_beyond_the_file() {
    let d = tmpdir("sects");
    let mut b = bzimage(1, 16);
    b[SETUP_SECTS] = 200;
    let k = write(&d, "bz", &b);
    expect_refused_fast(&["--kernel", &k], &["truncated", "promises 102928"]);
}

#[test]
fn payload_length_zero() {
    let d = tmpdir("nopayload");
    let mut b = bzimage(1, 16);
    set_u32(&mut b, PAYLOAD_LENGTH, 0);
    let k = write(&d, "bz", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &[
            "not a usable bzImage",
            "payload_length is 0",
            "copy or build it again",
        ],
    );
}

/// `payload_offset`/`payload_length` point past the code (and the file).
#[test]
fn payload_beyond_the_file() {
    let d = tmpdir("farpayload");
    let mut b = bzimage(1, 16);
    set_u32(&mut b, PAYLOAD_OFFSET, 0x10_0000);
    let k = write(&d, "bz", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &[
            "payload_offset 0x100000",
            "beyond the kernel code",
            "copy or build it again",
        ],
    );
    let mut b = bzimage(1, 16);
    set_u32(&mut b, PAYLOAD_LENGTH, u32::MAX);
    let k = write(&d, "bz2", &b);
    expect_refused_fast(&["--kernel", &k], &["payload_length 0xffffffff"]);
}

#[test]
fn init_size_smaller_than_the_code() {
    let d = tmpdir("initsize");
    let mut b = bzimage(1, 16);
    set_u32(&mut b, INIT_SIZE, 4);
    let k = write(&d, "bz", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &["init_size", "less than its own 0x10 bytes"],
    );
}

/// What the in-guest path's loader needs: a bzImage (not a zImage) whose code goes at 1 MiB or
/// above, with a 64-bit entry (protocol 2.12+, XLF_KERNEL_64).
#[test]
fn zimage_low_code32_start_or_no_64bit_entry() {
    let d = tmpdir("zimage");
    let mut b = bzimage(1, 16);
    b[0x211] = 0;
    let k = write(&d, "zimage", &b);
    expect_refused_fast(&["--kernel", &k], &["LOADED_HIGH clear", "zImage"]);
    let mut b = bzimage(1, 16);
    set_u32(&mut b, 0x214, 0x1_0000);
    let k = write(&d, "low", &b);
    expect_refused_fast(&["--kernel", &k], &["at 0x10000 (code32_start)"]);
    let mut b = bzimage(1, 16);
    b[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
    let k = write(&d, "old", &b);
    expect_refused_fast(&["--kernel", &k], &["boot protocol 2.06", "2.12 or later"]);
    let mut b = bzimage(1, 16);
    b[0x236] = 0;
    let k = write(&d, "32bit", &b);
    expect_refused_fast(&["--kernel", &k], &["XLF_KERNEL_64 is clear"]);
}

/// A `pref_address` no guest has RAM at: no --mem is suggested, since none would do.
#[test]
fn kernel_beyond_any_guest_ram() {
    let d = tmpdir("prefaddr");
    let mut b = bzimage(1, 16);
    b[PREF_ADDRESS..PREF_ADDRESS + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let k = write(&d, "bz", &b);
    let msg = expect_refused_fast(
        &["--kernel", &k, "--mem", "4G"],
        &[
            "beyond the 3 GiB below the PCI hole",
            "pref_address",
            "give --kernel",
        ],
    );
    assert!(!msg.contains("use --mem"), "{msg}");
}

/// A payload that opens with the magic of a compression the host knows but does not decompress
/// is an error before any VM exists, for every such compression (it used to boot through the
/// in-guest decompressor, which prints "Decoding failed -- System halted" and stops).
#[test]
fn known_compression_that_does_not_decompress() {
    let d = tmpdir("corrupt");
    for c in Compression::ALL {
        // The magic, 256 pseudo-random bytes, a 4 KiB size trailer.
        let mut payload = c.magic().to_vec();
        let mut x = 0x1234_5678u32;
        for _ in 0..256 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            payload.push((x >> 16) as u8);
        }
        payload.extend_from_slice(&4096u32.to_le_bytes());
        let k = write(&d, c.name(), &bzimage_with_payload(&payload));
        expect_refused_fast(
            &["--kernel", &k, "--mem", "64M"],
            &[
                &format!("kernel {k}: the bzImage's {c} payload is corrupt"),
                "fetch the kernel again",
            ],
        );
    }
}

/// A real gzip stream of a vmlinux, cut in the middle.
#[test]
fn truncated_gzip_payload() {
    use std::io::Write;
    let d = tmpdir("cutgzip");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut vmlinux = elf();
    vmlinux.resize(64 << 10, 0x90);
    gz.write_all(&vmlinux).unwrap();
    let payload = gz.finish().unwrap();
    let k = write(
        &d,
        "bz",
        &bzimage_with_payload(&payload[..payload.len() / 2]),
    );
    expect_refused_fast(
        &["--kernel", &k, "--mem", "64M"],
        &["gzip payload is corrupt", "fetch the kernel again"],
    );
}

/// A vmlinux whose program headers or segment lie beyond the file.
#[test]
fn elf_offsets_beyond_the_file() {
    let d = tmpdir("badelf");
    let mut b = elf();
    b[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes()); // e_phoff
    let k = write(&d, "phoff", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &[
            "not a bootable x86-64 vmlinux",
            "program headers run past the end",
            "give --kernel",
        ],
    );
    let mut b = elf();
    b[0x40 + 0x20..0x40 + 0x28].copy_from_slice(&(1u64 << 20).to_le_bytes()); // p_filesz
    let k = write(&d, "filesz", &b);
    expect_refused_fast(
        &["--kernel", &k],
        &["segment 0 ends at file offset", "beyond the file"],
    );
}

/// A gzip payload that decompresses, but not to an ELF file.
#[test]
fn payload_that_is_not_a_vmlinux() {
    use std::io::Write;
    let d = tmpdir("notelf");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&b"not a kernel\n".repeat(100)).unwrap();
    let k = write(&d, "bz", &bzimage_with_payload(&gz.finish().unwrap()));
    expect_refused_fast(
        &["--kernel", &k, "--mem", "64M"],
        &[
            "gzip payload decompressed to data that is not an ELF file",
            "build or fetch",
        ],
    );
}

#[test]
fn wrong_boot_protocol_magic() {
    let d = tmpdir("magic");
    let mut b = bzimage(1, 16);
    b[0x202..0x206].copy_from_slice(b"XXXX");
    let k = write(&d, "bz", &b);
    expect_error(&run(&["--kernel", &k]), &["HdrS", "not a Linux bzImage"]);
}

#[test]
fn neither_bzimage_nor_elf() {
    let d = tmpdir("text");
    let k = write(&d, "script", b"#!/bin/sh\necho hello\n");
    expect_error(
        &run(&["--kernel", &k]),
        &["neither a bzImage nor an ELF", "--kernel"],
    );
}

#[test]
fn kernel_does_not_fit_in_mem() {
    let d = tmpdir("fit");
    let k = write(&d, "bz", &bzimage(1, 16));
    // pref_address 16 MiB + init_size 32 MiB = 48 MiB needed.
    expect_error(
        &run(&["--kernel", &k, "--mem", "16M"]),
        &["--mem 48M or more"],
    );
}
