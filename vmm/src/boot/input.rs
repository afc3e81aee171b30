//! Reading a `--kernel` or `--initrd` file without trusting it: regular files only (a device,
//! FIFO, socket or directory is refused before it is opened, and again on the opened descriptor),
//! never blocking, and the size judged from `fstat` before a byte is read.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::memory::human;

/// The largest kernel file accepted: 1 GiB. A bzImage is tens of MiB and a vmlinux with full
/// debug information a few hundred; the decompressor accepts no larger vmlinux either
/// ([`super::decompress::MAX_VMLINUX_SIZE`]).
pub const MAX_KERNEL_FILE: u64 = 1 << 30;

/// Which input a file is, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// `--kernel`.
    Kernel,
    /// `--initrd`.
    Initrd,
}

impl Input {
    /// The flag that names the file.
    pub fn flag(self) -> &'static str {
        match self {
            Input::Kernel => "--kernel",
            Input::Initrd => "--initrd",
        }
    }

    /// What the flag wants.
    fn wants(self) -> &'static str {
        match self {
            Input::Kernel => "a bzImage or vmlinux file",
            Input::Initrd => "an initramfs (cpio archive) file",
        }
    }
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::Kernel => "kernel",
            Input::Initrd => "initrd",
        })
    }
}

/// Why a kernel or initrd file was not read; each message names the flag and what to give it.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file cannot be opened, examined or read.
    #[error("cannot read {what} {path}: {source}; check the {flag} path", flag = what.flag())]
    Read {
        /// Kernel or initrd.
        what: Input,
        /// Path given.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// A directory, device, FIFO or socket.
    #[error("cannot read {what} {path}: it is {kind}, not a regular file; give {flag} {wants}", flag = what.flag(), wants = what.wants())]
    NotRegular {
        /// Kernel or initrd.
        what: Input,
        /// Path given.
        path: PathBuf,
        /// "a directory", "a character device", ...
        kind: &'static str,
    },
    /// A kernel file larger than [`MAX_KERNEL_FILE`].
    #[error("kernel {path} is {size} bytes, more than the {max_h} accepted as a kernel file (a bzImage is tens of MiB, a vmlinux with debug information a few hundred): give --kernel a bzImage or a stripped vmlinux", max_h = human(MAX_KERNEL_FILE))]
    KernelTooLarge {
        /// Path given.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// An initrd of 0 bytes.
    #[error(
        "initrd {0} is empty: give --initrd an initramfs (cpio archive), or leave --initrd out"
    )]
    EmptyInitrd(PathBuf),
    /// The file's length changed between `fstat` and the end of reading it.
    #[error("{what} {path} changed while it was read ({stat} bytes by fstat, {read} read{more}): do not modify it while vmm starts, or give {flag} a copy", flag = what.flag(), more = if *read > *stat { " before it was cut off" } else { "" })]
    SizeChanged {
        /// Kernel or initrd.
        what: Input,
        /// Path given.
        path: PathBuf,
        /// Length `fstat` gave.
        stat: u64,
        /// Bytes read (one more than `stat` at most).
        read: u64,
    },
}

/// The kind of a file that is not a regular file, in words.
fn kind_of(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    Some(if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    })
}

/// An opened regular file and its length, nothing read yet.
#[derive(Debug)]
pub struct InputFile {
    what: Input,
    path: PathBuf,
    file: File,
    len: u64,
}

impl InputFile {
    /// Opens `path` as `what`: refuses anything but a regular file, before opening it (a FIFO's
    /// open would wait for a writer, a device's open can have effects) and again on the opened
    /// descriptor (the path may have been replaced in between). The open itself is
    /// non-blocking and takes no controlling terminal.
    pub fn open(what: Input, path: &Path) -> Result<InputFile, InputError> {
        let read_err = |source| InputError::Read {
            what,
            path: path.into(),
            source,
        };
        let not_regular = |kind| InputError::NotRegular {
            what,
            path: path.into(),
            kind,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if let Some(kind) = kind_of(&meta) {
            return Err(not_regular(kind));
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if let Some(kind) = kind_of(&meta) {
            return Err(not_regular(kind));
        }
        Ok(InputFile {
            what,
            path: path.into(),
            file,
            len: meta.len(),
        })
    }

    /// The file's length by `fstat`.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if `fstat` says the file has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads the whole file: exactly the length `fstat` gave, or an error if it has more or
    /// fewer bytes by now.
    pub fn read_all(self) -> Result<Vec<u8>, InputError> {
        let InputFile {
            what,
            path,
            file,
            len,
        } = self;
        // A kernel is tens of MiB: a buffer hinted to huge pages takes it without a page fault
        // per 4 KiB (see `advise_huge_pages`).
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        let spare = bytes.spare_capacity_mut();
        super::decompress::advise_huge_pages(spare.as_ptr().cast(), spare.len());
        // One byte beyond the length shows a file that grew; no more is ever read.
        file.take(len.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|source| InputError::Read {
                what,
                path: path.clone(),
                source,
            })?;
        let read = bytes.len() as u64;
        if read != len {
            return Err(InputError::SizeChanged {
                what,
                path,
                stat: len,
                read,
            });
        }
        Ok(bytes)
    }
}

/// Reads a kernel file: a regular file of at most [`MAX_KERNEL_FILE`] bytes.
pub fn read_kernel(path: &Path) -> Result<Vec<u8>, InputError> {
    let f = InputFile::open(Input::Kernel, path)?;
    if f.len() > MAX_KERNEL_FILE {
        return Err(InputError::KernelTooLarge {
            path: path.into(),
            size: f.len(),
        });
    }
    f.read_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-input-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn reads_a_regular_file_exactly() {
        let p = tmp("regular");
        std::fs::write(&p, b"0123456789").unwrap();
        let f = InputFile::open(Input::Initrd, &p).unwrap();
        assert_eq!(f.len(), 10);
        assert_eq!(f.read_all().unwrap(), b"0123456789");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn refuses_non_regular_files_without_blocking() {
        let fifo = tmp("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = Instant::now();
        for (path, kind) in [
            (Path::new("/dev/zero"), "a character device"),
            (Path::new("/"), "a directory"),
            (fifo.as_path(), "a FIFO"),
        ] {
            let e = InputFile::open(Input::Kernel, path).unwrap_err();
            assert!(
                matches!(&e, InputError::NotRegular { kind: k, .. } if *k == kind),
                "{}: {e}",
                path.display()
            );
            assert!(e.to_string().contains("give --kernel"), "{e}");
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        std::fs::remove_file(&fifo).unwrap();
    }

    #[test]
    fn a_file_that_changes_size_is_refused() {
        let p = tmp("grows");
        std::fs::write(&p, b"abc").unwrap();
        let f = InputFile::open(Input::Initrd, &p).unwrap();
        std::fs::write(&p, b"abcdef").unwrap();
        let e = f.read_all().unwrap_err();
        assert!(
            matches!(
                e,
                InputError::SizeChanged {
                    stat: 3,
                    read: 4,
                    ..
                }
            ),
            "{e}"
        );
        let f = InputFile::open(Input::Initrd, &p).unwrap();
        std::fs::write(&p, b"a").unwrap();
        let e = f.read_all().unwrap_err();
        assert!(
            matches!(
                e,
                InputError::SizeChanged {
                    stat: 6,
                    read: 1,
                    ..
                }
            ),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn an_oversized_kernel_is_refused_before_reading() {
        let p = tmp("huge");
        File::create(&p)
            .unwrap()
            .set_len(MAX_KERNEL_FILE + 1)
            .unwrap();
        let started = Instant::now();
        let e = read_kernel(&p).unwrap_err();
        assert!(matches!(e, InputError::KernelTooLarge { .. }), "{e}");
        assert!(e.to_string().contains("1G"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));
        std::fs::remove_file(&p).unwrap();
    }
}
