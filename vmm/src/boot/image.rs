//! A kernel file read and validated as a bzImage or a vmlinux ELF, not yet loaded: its kind, the
//! guest memory it needs, whether an initrd fits beside it, and its payload decompressed on the host.

use std::path::{Path, PathBuf};
use std::time::Instant;

use log::{info, warn};

use super::decompress::{self, Compression};
use super::input::{self, Input, InputError, InputFile};
use super::{bzimage, elf, place_initrd, BootError, BZIMAGE_LOAD_GPA, ELF_INITRD_ADDR_MAX};
use crate::memory::{human, MMIO_HOLE_START};

/// What kind of kernel the file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// A bzImage with its setup header facts.
    BzImage(bzimage::SetupInfo),
    /// A vmlinux ELF.
    Elf(elf::ElfInfo),
}

/// What the host made of a bzImage's payload.
#[derive(Debug)]
pub(super) enum HostPayload {
    /// Not tried: a vmlinux, or `--no-fast-boot`.
    NotTried,
    /// Decompressed into a vmlinux ELF the loader enters directly.
    Vmlinux(Compression, Vec<u8>),
    /// A compression the host does not know, or a vmlinux the loader cannot enter: the
    /// in-guest decompressor runs.
    InGuest,
}

/// A kernel file read and validated, not yet loaded.
#[derive(Debug)]
pub struct KernelImage {
    pub(super) path: PathBuf,
    pub(super) bytes: Vec<u8>,
    pub(super) kind: KernelKind,
    pub(super) host: HostPayload,
}

impl KernelImage {
    /// Reads and validates `path`.
    pub fn from_file(path: &Path) -> Result<KernelImage, BootError> {
        let bytes = input::read_kernel(path)?;
        KernelImage::parse(path, bytes)
    }

    /// Validates kernel bytes (`path` is for messages).
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<KernelImage, BootError> {
        let path = path.to_path_buf();
        if bytes.is_empty() {
            return Err(BootError::Empty(path));
        }
        let kind = if elf::is_elf(&bytes) {
            let info = elf::parse(&bytes).map_err(|why| BootError::BadElf {
                path: path.clone(),
                why,
            })?;
            KernelKind::Elf(info)
        } else if bzimage::looks_like_bzimage(&bytes) {
            use bzimage::HeaderProblem as P;
            match bzimage::parse(&bytes) {
                Ok(info) => KernelKind::BzImage(info),
                Err(P::TooShort { len }) => {
                    return Err(BootError::Truncated {
                        path,
                        len,
                        need: bzimage::SETUP_HEADER_OFFSET + 0x77,
                    })
                }
                Err(P::Truncated { len, need }) => {
                    return Err(BootError::Truncated { path, len, need })
                }
                Err(P::BadMagic { found }) => return Err(BootError::BadMagic { path, found }),
                Err(P::OldProtocol { version }) => {
                    return Err(BootError::OldProtocol { path, version })
                }
                Err(P::Not64Bit) => return Err(BootError::Not64Bit(path)),
                Err(problem) => return Err(BootError::Header { path, problem }),
            }
        } else {
            let head = bytes
                .iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ");
            return Err(BootError::UnknownFormat { path, head });
        };
        Ok(KernelImage {
            path,
            bytes,
            kind,
            host: HostPayload::NotTried,
        })
    }

    /// Decompresses a bzImage's payload on the host (the fast boot path); nothing for a vmlinux.
    ///
    /// A payload in a compression the host knows must decompress to what its size trailer says:
    /// one that does not is an error here, before any VM exists (the in-guest decompressor would
    /// only print "Decoding failed -- System halted"). A compression the host does not know is
    /// left to the in-guest decompressor, with a warning naming its first bytes.
    pub fn decompress_on_host(&mut self) -> Result<(), BootError> {
        if !matches!(self.kind, KernelKind::BzImage(_)) {
            return Ok(());
        }
        let path = self.path.display();
        let started = Instant::now();
        self.host = match decompress::decompress_bzimage(&self.bytes) {
            Ok(Some((c, vmlinux))) => {
                info!(
                    "decompressed the {c} payload on the host in {:.2?} ({})",
                    started.elapsed(),
                    human(vmlinux.len() as u64)
                );
                match elf::parse(&vmlinux) {
                    Ok(_) => HostPayload::Vmlinux(c, vmlinux),
                    Err(why) => {
                        warn!(
                            "kernel {path}: its {c} payload decompressed to a vmlinux this \
                             loader cannot enter ({why}); booting it through the in-guest \
                             decompressor"
                        );
                        HostPayload::InGuest
                    }
                }
            }
            Ok(None) => {
                let payload = decompress::bzimage_payload(&self.bytes).unwrap_or_default();
                warn!(
                    "kernel {path}: its bzImage payload is in a format the host does not \
                     decompress (it starts with {:02x?}; the host knows {}): booting it through \
                     the in-guest decompressor, which is slower",
                    &payload[..payload.len().min(8)],
                    Compression::ALL.map(Compression::name).join(", ")
                );
                HostPayload::InGuest
            }
            Err(source) => {
                return Err(BootError::Payload {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        Ok(())
    }

    /// The kind of kernel.
    pub fn kind(&self) -> KernelKind {
        self.kind
    }

    /// Guest-physical end of the memory the kernel needs (it must be RAM below the PCI hole).
    pub fn required_end(&self) -> u64 {
        match self.kind {
            KernelKind::BzImage(s) => {
                let in_place = BZIMAGE_LOAD_GPA + (self.bytes.len() - s.setup_bytes) as u64;
                // Saturating: a corrupt pref_address must not wrap to a small end.
                in_place.max(
                    s.pref_address
                        .max(BZIMAGE_LOAD_GPA)
                        .saturating_add(u64::from(s.init_size)),
                )
            }
            KernelKind::Elf(e) => e.end,
        }
    }

    /// The kernel's `initrd_addr_max` (a vmlinux has none: what 64-bit kernels declare).
    fn initrd_addr_max(&self) -> u32 {
        match self.kind {
            KernelKind::BzImage(s) => s.initrd_addr_max,
            KernelKind::Elf(_) => ELF_INITRD_ADDR_MAX,
        }
    }

    /// Checks, before any memory is mapped, that an initrd of `size` bytes fits beside the kernel.
    pub fn check_initrd_fits(&self, mem_bytes: u64, size: u64) -> Result<(), BootError> {
        place_initrd(self.initrd_addr_max(), mem_bytes, self.required_end(), size).map(|_| ())
    }

    /// Reads the initrd at `path` for a guest of `mem_bytes`: a regular, non-empty file that fits
    /// beside this kernel, judged by its `fstat` size before a byte of it is read.
    pub fn read_initrd(&self, path: &Path, mem_bytes: u64) -> Result<Vec<u8>, BootError> {
        let file = InputFile::open(Input::Initrd, path)?;
        if file.is_empty() {
            return Err(InputError::EmptyInitrd(path.into()).into());
        }
        let size = file.len();
        // The largest guest has all of low RAM: if the initrd does not fit there, no --mem helps.
        if let Err(BootError::InitrdTooBig { kend, limit, .. }) =
            place_initrd(self.initrd_addr_max(), u64::MAX, self.required_end(), size)
        {
            return Err(BootError::InitrdBeyondAnyGuest {
                path: path.into(),
                size,
                kend,
                limit,
            });
        }
        self.check_initrd_fits(mem_bytes, size)?;
        Ok(file.read_all()?)
    }

    /// Checks that the kernel fits in `mem_bytes` of RAM (laid out as `GuestRam` does).
    pub fn check_fits(&self, mem_bytes: u64) -> Result<(), BootError> {
        let have = mem_bytes.min(MMIO_HOLE_START);
        let need = self.required_end();
        if need > MMIO_HOLE_START {
            return Err(BootError::KernelBeyondLowRam {
                path: self.path.clone(),
                need,
            });
        }
        if need > have {
            return Err(BootError::KernelTooBig { need, have });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::{load, BootPath, BootSpec, LoadedKernel};
    use crate::memory::{BackingKind, GuestRam};

    #[test]
    fn format_detection_errors() {
        let p = Path::new("k");
        assert!(matches!(
            KernelImage::parse(p, vec![]),
            Err(BootError::Empty(_))
        ));
        assert!(matches!(
            KernelImage::parse(p, b"#!/bin/sh\necho".to_vec()),
            Err(BootError::UnknownFormat { .. })
        ));
        let bz = bzimage::tests::fake_bzimage();
        assert!(matches!(
            KernelImage::parse(p, bz[..bz.len() - 4].to_vec()),
            Err(BootError::Truncated { .. })
        ));
        let mut bad = bz.clone();
        bad[0x202] = 0;
        let e = KernelImage::parse(p, bad).unwrap_err();
        assert!(matches!(e, BootError::BadMagic { .. }), "{e}");
        assert!(matches!(
            KernelImage::parse(p, bz).unwrap().kind(),
            KernelKind::BzImage(_)
        ));
    }

    #[test]
    fn fit_checks_name_the_needed_size() {
        let img = KernelImage::parse(Path::new("k"), bzimage::tests::fake_bzimage()).unwrap();
        assert_eq!(img.required_end(), 0x300_0000);
        img.check_fits(64 << 20).unwrap();
        let e = img.check_fits(32 << 20).unwrap_err();
        assert!(e.to_string().contains("--mem 48M"), "{e}");
    }

    /// A setup header whose `pref_address` + `init_size` passes 2^64 (found by the
    /// `kernel_image` fuzz target): the end saturates, and the initrd check refuses the
    /// initrd instead of overflowing while it rounds that end up to a page.
    #[test]
    fn an_initrd_beside_a_kernel_ending_at_2_64_is_refused() {
        let mut bz = bzimage::tests::fake_bzimage();
        bz[0x258..0x260].copy_from_slice(&u64::MAX.to_le_bytes());
        let img = KernelImage::parse(Path::new("k"), bz).unwrap();
        assert_eq!(img.required_end(), u64::MAX);
        assert!(matches!(
            img.check_fits(64 << 20),
            Err(BootError::KernelBeyondLowRam { .. })
        ));
        for (mem, size) in [(64 << 20, 1), (u64::MAX, 1 << 20), (1 << 40, u64::MAX)] {
            let e = img.check_initrd_fits(mem, size).unwrap_err();
            assert!(matches!(e, BootError::InitrdTooBig { .. }), "{e}");
            assert!(e.to_string().contains("use --mem"), "{e}");
        }
    }

    fn bz_with(payload: &[u8]) -> KernelImage {
        KernelImage::parse(Path::new("bz"), bzimage::tests::fake_bzimage_with(payload)).unwrap()
    }

    fn load_into_64m(img: &KernelImage) -> LoadedKernel {
        let ram = GuestRam::new(64 << 20, BackingKind::Small).unwrap();
        let spec = BootSpec {
            kernel: img,
            initrd: None,
            cmdline: "console=ttyS0",
            acpi_rsdp: None,
        };
        load(&ram, &spec).unwrap()
    }

    /// A compression's magic, 256 pseudo-random bytes and a 4 KiB size trailer.
    fn garbage_payload(c: Compression) -> Vec<u8> {
        let mut p = c.magic().to_vec();
        let mut x = 0x1234_5678u32;
        for _ in 0..256 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            p.push((x >> 16) as u8);
        }
        p.extend_from_slice(&4096u32.to_le_bytes());
        p
    }

    #[test]
    fn a_known_compression_that_does_not_decompress_is_an_error() {
        for c in Compression::ALL {
            let mut img = bz_with(&garbage_payload(c));
            let e = img.decompress_on_host().unwrap_err();
            assert!(
                matches!(&e, BootError::Payload { source, .. } if source.to_string().contains(c.name())),
                "{c}: {e}"
            );
        }
    }

    #[test]
    fn an_unknown_compression_boots_through_the_in_guest_decompressor() {
        let mut img = bz_with(b"\x01\x02\x03\x04 no compression the host knows");
        img.decompress_on_host().unwrap();
        assert!(matches!(img.host, HostPayload::InGuest));
        let l = load_into_64m(&img);
        assert_eq!(l.path, BootPath::InGuestDecompressor);
        assert_eq!(l.entry, BZIMAGE_LOAD_GPA + bzimage::STARTUP_64_OFFSET);
    }

    #[test]
    fn a_gzip_payload_is_entered_as_its_vmlinux_and_a_cut_one_is_an_error() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&elf::tests::fake_elf()).unwrap();
        let payload = gz.finish().unwrap();
        let mut img = bz_with(&payload);
        img.decompress_on_host().unwrap();
        assert!(matches!(
            img.host,
            HostPayload::Vmlinux(Compression::Gzip, _)
        ));
        let l = load_into_64m(&img);
        assert_eq!(l.path, BootPath::HostDecompressed(Compression::Gzip));
        assert_eq!(l.entry, 0x100_0000);
        let mut cut = bz_with(&payload[..payload.len() / 2]);
        let e = cut.decompress_on_host().unwrap_err();
        assert!(matches!(e, BootError::Payload { .. }), "{e}");
    }
}
