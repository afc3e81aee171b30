//! Host-side bzImage decompression on real data: every kernel compression produced by the real tools, bad headers, corrupt and random payloads, and Debian's cloud kernel when it has been fetched.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use vmm::boot::decompress::{bzimage_payload, decompress_bzimage, Compression, DecompressError};

/// Sectors of setup code in the synthetic images (the boot sector comes on top).
const SETUP_SECTS: u8 = 3;
/// Bytes of stand-in decompressor code in front of the payload.
const PAYLOAD_OFFSET: usize = 0x3c0;
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// The kernel's Makefile command line for each compression (`cat | tool`,
/// see `scripts/Makefile.lib` and `scripts/xz_wrap.sh`).
fn kernel_command(format: Compression) -> (&'static str, &'static [&'static str]) {
    match format {
        Compression::Gzip => ("gzip", &["-n", "-9", "-c"]),
        Compression::Bzip2 => ("bzip2", &["-9", "-c"]),
        Compression::Lzma => ("lzma", &["-9", "-c"]),
        Compression::Xz => (
            "xz",
            &["--check=crc32", "--x86", "--lzma2=dict=32MiB", "-c"],
        ),
        Compression::Lzo => ("lzop", &["-9", "-c"]),
        Compression::Lz4 => ("lz4", &["-l", "-9", "-c"]),
        Compression::Zstd => ("zstd", &["-22", "--ultra", "-c", "-q"]),
    }
}

/// Runs `tool args` with `input` on stdin and returns its stdout, or `None`
/// (with the reason printed) when the tool is not installed.
fn run_tool(tool: &str, args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
    let mut child = match Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipping: `{tool}` is not installed (Debian package for it needed)");
            return None;
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    };
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        output.status
    );
    Some(output.stdout)
}

/// Compresses `input` the way the kernel build does, size trailer included.
fn kernel_payload(format: Compression, input: &[u8]) -> Option<Vec<u8>> {
    let (tool, args) = kernel_command(format);
    let mut payload = run_tool(tool, args, input)?;
    // size_append: every format but gzip, whose member ends with its own ISIZE.
    if format != Compression::Gzip {
        payload.extend_from_slice(&(input.len() as u32).to_le_bytes());
    }
    Some(payload)
}

/// A bzImage whose setup header (protocol 2.15) points at `payload`.
fn bzimage_with(setup_sects: u8, payload: &[u8]) -> Vec<u8> {
    let sects = if setup_sects == 0 { 4 } else { setup_sects };
    let pm_start = (usize::from(sects) + 1) * 512;
    let mut image = vec![0u8; pm_start + PAYLOAD_OFFSET];
    image[0x1f1] = setup_sects;
    image[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x248..0x24c].copy_from_slice(&(PAYLOAD_OFFSET as u32).to_le_bytes());
    image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    // Stand-in for the decompressor's code.
    for (i, b) in image[pm_start..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    image.extend_from_slice(payload);
    // Something after the payload, as in a real image.
    image.extend_from_slice(&[0xcc; 64]);
    image
}

fn bzimage(payload: &[u8]) -> Vec<u8> {
    bzimage_with(SETUP_SECTS, payload)
}

/// A small real ELF executable.
fn small_elf() -> Vec<u8> {
    let elf = std::fs::read("/bin/true").expect("/bin/true is readable");
    assert!(elf.starts_with(ELF_MAGIC));
    elf
}

/// A real ELF of more than 9 MiB (this test executable, repeated if it is
/// smaller), so lz4 needs two 8 MiB legacy blocks and lzop dozens of blocks.
fn large_elf() -> Vec<u8> {
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(exe.starts_with(ELF_MAGIC));
    let mut elf = Vec::new();
    while elf.len() < 9 << 20 {
        elf.extend_from_slice(&exe);
    }
    elf
}

fn assert_round_trip(format: Compression, elf: &[u8], payload: &[u8]) {
    let image = bzimage(payload);
    let (found, vmlinux) = decompress_bzimage(&image)
        .unwrap_or_else(|e| panic!("{format}: {e}"))
        .unwrap_or_else(|| panic!("{format}: payload not recognised"));
    assert_eq!(found, format);
    assert_eq!(vmlinux.len(), elf.len(), "{format}: output length");
    assert!(
        vmlinux == elf,
        "{format}: output differs from the original ELF"
    );
}

fn round_trip(format: Compression, elf: &[u8]) {
    let Some(payload) = kernel_payload(format, elf) else {
        return;
    };
    assert!(
        payload.starts_with(format.magic()),
        "{format}: the tool's output does not start with the expected magic"
    );
    assert_round_trip(format, elf, &payload);
}

macro_rules! round_trip_tests {
    ($($name:ident: $format:expr,)*) => {$(
        #[test]
        fn $name() {
            round_trip($format, &small_elf());
        }
    )*};
}

round_trip_tests! {
    gzip_payload_decompresses_to_the_original_elf: Compression::Gzip,
    bzip2_payload_decompresses_to_the_original_elf: Compression::Bzip2,
    lzma_payload_decompresses_to_the_original_elf: Compression::Lzma,
    xz_payload_decompresses_to_the_original_elf: Compression::Xz,
    lzo_payload_decompresses_to_the_original_elf: Compression::Lzo,
    lz4_payload_decompresses_to_the_original_elf: Compression::Lz4,
    zstd_payload_decompresses_to_the_original_elf: Compression::Zstd,
}

#[test]
fn lz4_legacy_payload_with_several_8mib_blocks_decompresses() {
    round_trip(Compression::Lz4, &large_elf());
}

#[test]
fn lzo_payload_with_many_blocks_decompresses() {
    round_trip(Compression::Lzo, &large_elf());
}

#[test]
fn lzop_variants_decompress() {
    // Fast LZO1X-1 encoding, CRC-32 instead of Adler-32, and no checksums.
    let elf = small_elf();
    for args in [
        &["-1", "-c"][..],
        &["-9", "--crc32", "-c"][..],
        &["-9", "-F", "-c"][..],
        &["-5", "-c"][..],
    ] {
        let Some(mut payload) = run_tool("lzop", args, &elf) else {
            return;
        };
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_round_trip(Compression::Lzo, &elf, &payload);
    }
}

#[test]
fn setup_sects_zero_means_four() {
    let elf = small_elf();
    let Some(payload) = kernel_payload(Compression::Gzip, &elf) else {
        return;
    };
    let image = bzimage_with(0, &payload);
    assert_eq!(bzimage_payload(&image).unwrap(), &payload[..]);
    let (_, vmlinux) = decompress_bzimage(&image).unwrap().unwrap();
    assert!(vmlinux == elf);
}

#[test]
fn unknown_compression_is_none() {
    let mut payload = b"not a known compression magic".to_vec();
    payload.extend_from_slice(&100u32.to_le_bytes());
    assert!(decompress_bzimage(&bzimage(&payload)).unwrap().is_none());
    // An empty payload is unknown too: the in-guest path will judge it.
    assert!(decompress_bzimage(&bzimage(&[])).unwrap().is_none());
}

#[test]
fn truncated_payload_is_an_error_for_every_format() {
    let elf = small_elf();
    for format in Compression::ALL {
        let Some(payload) = kernel_payload(format, &elf) else {
            continue;
        };
        let stream = &payload[..payload.len() - 4];
        for keep in [stream.len() / 2, stream.len() - 1, format.magic().len() + 1] {
            let mut cut = stream[..keep].to_vec();
            cut.extend_from_slice(&(elf.len() as u32).to_le_bytes());
            match decompress_bzimage(&bzimage(&cut)) {
                Err(
                    DecompressError::Corrupt { format: f, .. }
                    | DecompressError::SizeMismatch { format: f, .. },
                ) => assert_eq!(f, format),
                other => panic!("{format} cut to {keep} bytes: expected an error, got {other:?}"),
            }
        }
    }
}

#[test]
fn flipped_byte_in_a_checksummed_payload_is_an_error() {
    // lzma and lz4 legacy carry no checksum; every other format must notice.
    let elf = small_elf();
    for format in [
        Compression::Gzip,
        Compression::Bzip2,
        Compression::Xz,
        Compression::Lzo,
        Compression::Zstd,
    ] {
        let Some(mut payload) = kernel_payload(format, &elf) else {
            continue;
        };
        let middle = payload.len() / 2;
        payload[middle] ^= 0x55;
        let result = decompress_bzimage(&bzimage(&payload));
        assert!(
            matches!(
                result,
                Err(DecompressError::Corrupt { .. } | DecompressError::SizeMismatch { .. })
            ),
            "{format}: expected an error, got {:?}",
            result.map(|r| r.map(|(f, v)| (f, v.len())))
        );
    }
}

#[test]
fn wrong_declared_size_is_an_error() {
    let elf = small_elf();
    for format in Compression::ALL {
        let Some(mut payload) = kernel_payload(format, &elf) else {
            continue;
        };
        let n = payload.len();
        for declared in [elf.len() - 1, elf.len() + 1, 0] {
            payload[n - 4..].copy_from_slice(&(declared as u32).to_le_bytes());
            let result = decompress_bzimage(&bzimage(&payload));
            assert!(
                matches!(
                    result,
                    Err(DecompressError::Corrupt { .. } | DecompressError::SizeMismatch { .. })
                ),
                "{format} declared {declared}: expected an error, got {:?}",
                result.map(|r| r.map(|(f, v)| (f, v.len())))
            );
        }
    }
}

#[test]
fn implausible_declared_size_is_an_error() {
    let mut payload = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0];
    payload.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decompress_bzimage(&bzimage(&payload)),
        Err(DecompressError::SizeImplausible { .. })
    ));
}

#[test]
fn payload_that_is_not_elf_is_an_error() {
    let text = b"this is a text file, not an ELF kernel\n".repeat(100);
    let Some(payload) = kernel_payload(Compression::Gzip, &text) else {
        return;
    };
    assert!(matches!(
        decompress_bzimage(&bzimage(&payload)),
        Err(DecompressError::NotElf {
            format: Compression::Gzip,
            ..
        })
    ));
}

#[test]
fn malformed_setup_headers_are_errors() {
    let payload = {
        let mut p = vec![0x1f, 0x8b, 8, 0];
        p.extend_from_slice(&10u32.to_le_bytes());
        p
    };
    let good = bzimage(&payload);

    assert!(matches!(
        decompress_bzimage(&[]),
        Err(DecompressError::TooShort { len: 0, .. })
    ));
    assert!(matches!(
        decompress_bzimage(&good[..0x24f]),
        Err(DecompressError::TooShort { len: 0x24f, .. })
    ));

    let mut no_magic = good.clone();
    no_magic[0x202..0x206].copy_from_slice(b"HdrX");
    assert!(matches!(
        decompress_bzimage(&no_magic),
        Err(DecompressError::NoHeaderMagic)
    ));

    let mut old = good.clone();
    old[0x206..0x208].copy_from_slice(&0x0207u16.to_le_bytes());
    assert!(matches!(
        decompress_bzimage(&old),
        Err(DecompressError::ProtocolTooOld { major: 2, minor: 7 })
    ));

    let mut far_offset = good.clone();
    far_offset[0x248..0x24c].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decompress_bzimage(&far_offset),
        Err(DecompressError::PayloadOutOfBounds { .. })
    ));

    let mut long_length = good.clone();
    long_length[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decompress_bzimage(&long_length),
        Err(DecompressError::PayloadOutOfBounds { .. })
    ));

    let mut many_sects = good.clone();
    many_sects[0x1f1] = 255;
    assert!(matches!(
        decompress_bzimage(&many_sects),
        Err(DecompressError::PayloadOutOfBounds { .. })
    ));

    let mut short_length = good.clone();
    short_length[0x24c..0x250].copy_from_slice(&3u32.to_le_bytes());
    assert!(matches!(
        decompress_bzimage(&short_length),
        Err(DecompressError::PayloadTooShort { length: 3 })
    ));

    // The file cut inside the payload.
    let cut = &good[..good.len() - 64 - 2];
    assert!(matches!(
        decompress_bzimage(cut),
        Err(DecompressError::PayloadOutOfBounds { .. })
    ));
}

#[test]
fn error_messages_say_what_is_wrong() {
    let msg = decompress_bzimage(b"tiny").unwrap_err().to_string();
    assert!(
        msg.contains("too short") && msg.contains("bzImage"),
        "{msg}"
    );
    let mut image = bzimage(&[0x02, 0x21, 0x4c, 0x18, 0xff, 0xff, 0, 0, 1, 2, 0, 0, 0, 0]);
    let msg = decompress_bzimage(&image).unwrap_err().to_string();
    assert!(msg.contains("lz4") && msg.contains("corrupt"), "{msg}");
    image[0x202] = b'X';
    let msg = decompress_bzimage(&image).unwrap_err().to_string();
    assert!(msg.contains("HdrS"), "{msg}");
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_and_damaged_input_never_panics() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let elf = small_elf();
    let mut checked = 0;

    // Random headers and payloads behind every magic.
    for _ in 0..2000 {
        let mut image = vec![0u8; 0x250 + rng.below(4096)];
        image.iter_mut().for_each(|b| *b = rng.next() as u8);
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206] = 0x0f;
        image[0x207] = 2;
        image[0x1f1] = rng.below(3) as u8;
        let sects = match image[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let pm_start = (sects + 1) * 512;
        let room = image.len().saturating_sub(pm_start);
        let offset = rng.below(room + 1);
        let length = rng.below(room - offset + 1);
        image[0x248..0x24c].copy_from_slice(&(offset as u32).to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(length as u32).to_le_bytes());
        if length > 8 {
            let format = Compression::ALL[rng.below(7)];
            let magic = format.magic();
            let at = pm_start + offset;
            let n = magic.len().min(length);
            image[at..at + n].copy_from_slice(&magic[..n]);
            // Keep the declared size small so garbage decodes fast.
            let end = at + length;
            image[end - 4..end].copy_from_slice(&(rng.below(1 << 16) as u32).to_le_bytes());
        }
        let _ = decompress_bzimage(&image);
        checked += 1;
    }

    // Real payloads, cut anywhere and with bytes flipped.
    for format in Compression::ALL {
        let Some(payload) = kernel_payload(format, &elf) else {
            continue;
        };
        let image = bzimage(&payload);
        for _ in 0..150 {
            let cut = rng.below(image.len());
            let _ = decompress_bzimage(&image[..cut]);
            let mut damaged = image.clone();
            for _ in 0..1 + rng.below(4) {
                let at = image.len() - 64 - payload.len() + rng.below(payload.len());
                damaged[at] ^= 1 << rng.below(8);
            }
            if let Ok(Some((f, out))) = decompress_bzimage(&damaged) {
                // Formats without a checksum may decode damage silently; they
                // still keep to the declared size and the ELF magic.
                assert!(matches!(f, Compression::Lzma | Compression::Lz4) || out == elf);
                assert_eq!(out.len(), elf.len());
            }
            checked += 2;
        }
    }
    eprintln!("{checked} damaged or random images decoded without a panic");
}

/// Debian's cloud kernel, if it has been fetched: `$VMM_TEST_KERNEL`, else
/// `target/kernel/vmlinuz` where `tools/fetch-kernel` caches it.
fn cached_kernel() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("VMM_TEST_KERNEL") {
        return Some(PathBuf::from(path));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kernel/vmlinuz");
    path.is_file().then_some(path)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn debian_cloud_kernel_decompresses_to_a_sane_vmlinux() {
    let Some(path) = cached_kernel() else {
        eprintln!(
            "skipping: no target/kernel/vmlinuz (run tools/fetch-kernel) and VMM_TEST_KERNEL unset"
        );
        return;
    };
    let image = std::fs::read(&path).unwrap();
    let started = std::time::Instant::now();
    let (format, vmlinux) = decompress_bzimage(&image)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .unwrap_or_else(|| panic!("{}: compression not recognised", path.display()));
    eprintln!(
        "{}: {format}, {} -> {} bytes in {:?} (test profile, not a benchmark)",
        path.display(),
        image.len(),
        vmlinux.len(),
        started.elapsed()
    );

    // ELF64, little-endian, x86-64 executable (System V ABI, ELF header).
    assert_eq!(&vmlinux[..4], ELF_MAGIC);
    assert_eq!(vmlinux[4], 2, "ELFCLASS64");
    assert_eq!(vmlinux[5], 1, "ELFDATA2LSB");
    assert_eq!(u16_at(&vmlinux, 16), 2, "ET_EXEC");
    assert_eq!(u16_at(&vmlinux, 18), 62, "EM_X86_64");
    let entry = u64_at(&vmlinux, 24);
    let phoff = u64_at(&vmlinux, 32) as usize;
    let phentsize = usize::from(u16_at(&vmlinux, 54));
    let phnum = usize::from(u16_at(&vmlinux, 56));
    assert_eq!(phentsize, 56);
    assert!(phnum > 0 && phoff + phnum * phentsize <= vmlinux.len());

    const PT_LOAD: u32 = 1;
    let mut loads = 0;
    let mut entry_loaded = false;
    for i in 0..phnum {
        let ph = &vmlinux[phoff + i * phentsize..][..phentsize];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        loads += 1;
        let (offset, paddr) = (u64_at(ph, 8), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        assert!(
            offset + filesz <= vmlinux.len() as u64,
            "segment {i} outside the file"
        );
        assert!(filesz <= memsz);
        assert!(paddr >= 1 << 20, "segment {i} below 1 MiB: {paddr:#x}");
        entry_loaded |= (paddr..paddr + memsz).contains(&entry);
    }
    assert!(loads >= 2, "{loads} PT_LOAD segments");
    assert!(
        entry_loaded,
        "entry {entry:#x} is in no PT_LOAD segment's physical range"
    );

    // The tool's own decompressor agrees, byte for byte.
    let payload = bzimage_payload(&image).unwrap();
    let (tool, flag) = match format {
        Compression::Gzip => ("gzip", "-dc"),
        Compression::Bzip2 => ("bzip2", "-dc"),
        Compression::Lzma => ("lzma", "-dc"),
        Compression::Xz => ("xz", "-dc"),
        Compression::Lzo => ("lzop", "-dc"),
        Compression::Lz4 => ("lz4", "-dc"),
        Compression::Zstd => ("zstd", "-dc"),
    };
    if let Some(reference) = run_tool(tool, &[flag], &payload[..payload.len() - 4]) {
        assert!(
            reference == vmlinux,
            "{tool} -d disagrees with decompress_bzimage"
        );
    }
}
