//! Inputs that the fuzz targets under `fuzz/` found to crash vmm, kept as files under
//! `tests/data/fuzz/` (named `<target>-<what>`, byte for byte what the fuzzer saved) and fed
//! through the calls that target makes: each must now be refused cleanly.

use std::path::Path;

use vmm::boot::{BootError, KernelImage};

/// A saved fuzz input.
fn input(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `kernel_image`, mode 1 (byte 0: a kernel, fast path): a bzImage whose `pref_address` is 2^64 - 1. Its end
/// saturates at 2^64 - 1, and the initrd fit check rounded that up to a page: an overflow
/// panic with overflow checks, and without them an end of 0 under which any initrd "fit".
#[test]
fn kernel_image_initrd_fit_overflow() {
    let data = input("kernel_image-initrd-fit-overflow");
    assert_eq!(data[0] % 4, 1, "kernel mode, fast path");
    let img = KernelImage::parse(Path::new("fuzz"), data[1..].to_vec()).unwrap();
    assert_eq!(img.required_end(), u64::MAX);
    for mem in [1 << 20, 64 << 20, 3 << 30, 1 << 40, u64::MAX] {
        let e = img.check_fits(mem).unwrap_err();
        assert!(matches!(e, BootError::KernelBeyondLowRam { .. }), "{e}");
        for size in [1, 1 << 20, 2 << 30, u64::MAX] {
            let e = img.check_initrd_fits(mem, size).unwrap_err();
            assert!(matches!(e, BootError::InitrdTooBig { .. }), "{e}");
            let _ = e.to_string();
        }
    }
}
