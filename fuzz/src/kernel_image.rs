//! `kernel_image`: bytes as a kernel (bzImage or vmlinux ELF: header checks, fit checks, the
//! host-side payload decompression, loading into a 64 MiB guest memory), as an initrd beside a
//! fixed kernel, or as a bare bzImage payload for the decompressors. No KVM.
//!
//! The first byte picks the mode (its value modulo 4):
//! 0 kernel without the fast path, 1 kernel with the payload decompressed on the host,
//! 2 initrd, 3 bare payload.

use std::path::Path;

use vmm::boot::{self, bzimage, decompress, elf, BootSpec, KernelImage};
use vmm::memory::{BackingKind, GuestRam};

use crate::images::fake_elf;

/// Guest RAM the images are loaded into: one mapping reused by every run (loading only writes).
const RAM_BYTES: u64 = 64 << 20;
/// Guest sizes the fit checks are asked about (arithmetic only).
const MEM_SIZES: [u64; 5] = [1 << 20, 64 << 20, 3 << 30, 1 << 40, u64::MAX];
/// Initrd sizes the fit checks are asked about.
const INITRD_SIZES: [u64; 4] = [1, 1 << 20, 2 << 30, u64::MAX];
/// The initrd loaded beside a fuzzed kernel.
const SMALL_INITRD: &[u8] = b"070701 an initramfs stand-in";
const PAGE: u64 = 4096;

thread_local! {
    static RAM: GuestRam = GuestRam::new(RAM_BYTES, BackingKind::Small)
        .expect("64 MiB of anonymous memory for the fuzz guest");
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = crate::capped(data).split_first() else {
        return;
    };
    match mode % 4 {
        0 => kernel(rest, false),
        1 => kernel(rest, true),
        2 => initrd(rest),
        _ => payload(rest),
    }
}

/// `r`'s value; an error is formatted first (its message does arithmetic on the header's
/// fields too).
fn shown<T, E: std::fmt::Display>(r: Result<T, E>) -> Option<T> {
    r.map_err(|e| e.to_string()).ok()
}

/// Checks a successful load against the RAM it went into.
fn check_loaded(ram: &GuestRam, l: &boot::LoadedKernel, initrd_len: Option<usize>) {
    assert!(l.kernel_end <= ram.size(), "kernel ends beyond RAM: {l:?}");
    match (l.initrd, initrd_len) {
        (Some((addr, size)), Some(n)) => {
            assert_eq!(size, n as u64);
            assert_eq!(addr % PAGE, 0, "{l:?}");
            assert!(addr >= l.kernel_end, "initrd over the kernel: {l:?}");
            assert!(addr + size <= ram.size(), "initrd beyond RAM: {l:?}");
        }
        (None, None) => {}
        other => panic!("initrd placement {other:?}"),
    }
}

fn kernel(bytes: &[u8], fast: bool) {
    // The format parsers alone, as the loader calls them.
    if elf::is_elf(bytes) {
        shown(elf::parse(bytes));
    }
    if bzimage::looks_like_bzimage(bytes) {
        shown(bzimage::parse(bytes));
        let _ = bzimage::setup_header_of(bytes);
        shown(decompress::bzimage_payload(bytes));
    }
    let Some(mut img) = shown(KernelImage::parse(Path::new("fuzz"), bytes.to_vec())) else {
        return;
    };
    let _ = img.kind();
    let _ = img.required_end();
    for mem in MEM_SIZES {
        shown(img.check_fits(mem));
        for size in INITRD_SIZES {
            shown(img.check_initrd_fits(mem, size));
        }
    }
    if fast && shown(img.decompress_on_host()).is_none() {
        return;
    }
    RAM.with(|ram| {
        let spec = BootSpec {
            kernel: &img,
            initrd: Some(SMALL_INITRD),
            cmdline: "console=ttyS0",
            acpi_rsdp: None,
        };
        if let Some(l) = shown(boot::load(ram, &spec)) {
            check_loaded(ram, &l, Some(SMALL_INITRD.len()));
        }
    });
}

fn initrd(bytes: &[u8]) {
    if bytes.is_empty() {
        // vmm refuses an empty initrd file before loading.
        return;
    }
    let img = KernelImage::parse(Path::new("vmlinux"), fake_elf(&[0x90; 16]))
        .expect("the fixed kernel parses");
    for mem in MEM_SIZES {
        shown(img.check_initrd_fits(mem, bytes.len() as u64));
    }
    RAM.with(|ram| {
        let spec = BootSpec {
            kernel: &img,
            initrd: Some(bytes),
            cmdline: "console=ttyS0 rdinit=/init",
            acpi_rsdp: Some(0xe_0000),
        };
        let fits = img
            .check_initrd_fits(ram.size(), bytes.len() as u64)
            .is_ok();
        match boot::load(ram, &spec) {
            Ok(l) => {
                assert!(fits, "loaded an initrd the fit check refused");
                check_loaded(ram, &l, Some(bytes.len()));
            }
            Err(e) => {
                let e = e.to_string();
                assert!(!fits, "an initrd that fits was refused: {e}");
            }
        }
    });
}

fn payload(bytes: &[u8]) {
    if let Some(Some((c, vmlinux))) = shown(decompress::decompress_payload(bytes)) {
        assert!(vmlinux.starts_with(b"\x7fELF"), "{c}: not an ELF");
        let _ = elf::parse(&vmlinux);
    }
}
