//! A kernel file read and validated as a bzImage or a vmlinux ELF, not yet loaded: its kind, the
//! guest memory it needs, and whether an initrd fits beside it.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{
    bzimage, decompress, elf, place_initrd, BootError, BZIMAGE_LOAD_GPA, ELF_INITRD_ADDR_MAX,
};
use crate::memory::MMIO_HOLE_START;

/// What kind of kernel the file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// A bzImage with its setup header facts.
    BzImage(bzimage::SetupInfo),
    /// A vmlinux ELF.
    Elf(elf::ElfInfo),
}

/// A kernel file read and validated, not yet loaded.
#[derive(Debug)]
pub struct KernelImage {
    pub(super) path: PathBuf,
    pub(super) bytes: Vec<u8>,
    pub(super) kind: KernelKind,
}

impl KernelImage {
    /// Reads and validates `path`.
    pub fn from_file(path: &Path) -> Result<KernelImage, BootError> {
        let read = || -> std::io::Result<Vec<u8>> {
            let mut file = std::fs::File::open(path)?;
            let len = file.metadata()?.len();
            // A kernel is tens of MiB: a buffer hinted to huge pages takes it without a page
            // fault per 4 KiB (see `advise_huge_pages`).
            let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            let spare = bytes.spare_capacity_mut();
            decompress::advise_huge_pages(spare.as_ptr().cast(), spare.len());
            file.read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        let bytes = read().map_err(|source| BootError::ReadKernel {
            path: path.into(),
            source,
        })?;
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
        Ok(KernelImage { path, bytes, kind })
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
                in_place.max(s.pref_address.max(BZIMAGE_LOAD_GPA) + u64::from(s.init_size))
            }
            KernelKind::Elf(e) => e.end,
        }
    }

    /// Checks, before any memory is mapped, that an initrd of `size` bytes fits beside the kernel.
    pub fn check_initrd_fits(&self, mem_bytes: u64, size: u64) -> Result<(), BootError> {
        let max = match self.kind {
            KernelKind::BzImage(s) => s.initrd_addr_max,
            KernelKind::Elf(_) => ELF_INITRD_ADDR_MAX,
        };
        place_initrd(max, mem_bytes, self.required_end(), size).map(|_| ())
    }

    /// Checks that the kernel fits in `mem_bytes` of RAM (laid out as `GuestRam` does).
    pub fn check_fits(&self, mem_bytes: u64) -> Result<(), BootError> {
        let have = mem_bytes.min(MMIO_HOLE_START);
        let need = self.required_end();
        if need > have {
            return Err(BootError::KernelTooBig { need, have });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
