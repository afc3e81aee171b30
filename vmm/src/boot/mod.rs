//! Loading a Linux kernel into guest RAM: bzImage (64-bit boot protocol, direct entry) or vmlinux
//! ELF, the fast path that decompresses a bzImage's payload on the host, initrd, command line, and
//! the zero page with the e820 map.

pub mod bzimage;
pub mod decompress;
pub mod elf;
mod image;
pub mod input;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::hypervisor::VcpuOps;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use log::{debug, info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::long_mode::{self, LongModeConfig};
use crate::arch::x86_64::ArchError;
use crate::memory::{human, GuestRam, MMIO_HOLE_START};
use decompress::Compression;
use image::HostPayload;
pub use image::{KernelImage, KernelKind};

/// The default kernel command line: console on COM1 (and the early console, so the first lines
/// show before the 8250 driver loads), reboot through the keyboard controller
/// (which ends the VM), reboot at once on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1";

/// Guest-physical layout of the boot structures (all below the EBDA at 0x9fc00).
pub const GDT_GPA: u64 = 0x500;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// Initial stack of the boot CPU (grows down from just below the page tables).
pub const BOOT_STACK_GPA: u64 = 0x8ff0;
/// The boot page tables: PML4, PDPT, then one page directory per GiB identity-mapped.
pub const PML4_GPA: u64 = 0x9000;
/// The identity map the boot CPU starts with: the first 4 GiB (kernel, zero page, command line,
/// initrd are all below the PCI hole).
pub const BOOT_IDENTITY_MAP: u64 = 4 << 30;
/// The kernel command line.
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// Where a bzImage's protected-mode code is loaded (the traditional `code32_start`).
pub const BZIMAGE_LOAD_GPA: u64 = 0x10_0000;

/// `type_of_loader` 0xff: "undefined" boot loader (boot.rst, "type_of_loader").
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `initrd_addr_max` for a vmlinux without a setup header: what 64-bit kernels declare.
const ELF_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;
/// Command-line limit for a vmlinux without a setup header (COMMAND_LINE_SIZE on x86).
const ELF_CMDLINE_SIZE: u32 = 2048;
/// `kernel_alignment` for a vmlinux header (CONFIG_PHYSICAL_ALIGN default, 16 MiB).
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Entries of the zero page's e820 table (E820_MAX_ENTRIES_ZEROPAGE).
const E820_MAX: usize = 128;
const PAGE: u64 = 0x1000;

/// Errors loading the kernel; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file is not a regular file of a sane size, or cannot be read.
    #[error(transparent)]
    Input(#[from] input::InputError),
    /// The kernel file is empty.
    #[error("kernel {0} is empty: give --kernel a bzImage or a vmlinux ELF")]
    Empty(PathBuf),
    /// The bzImage is shorter than its header says.
    #[error("kernel {path} is a truncated bzImage ({len} bytes, its header promises {need}): copy or build it again")]
    Truncated {
        /// Path.
        path: PathBuf,
        /// Actual length.
        len: usize,
        /// Expected length.
        need: usize,
    },
    /// Boot sector signature but no "HdrS".
    #[error("kernel {path} has a boot sector but the boot-protocol magic at 0x202 is {found:#010x}, not \"HdrS\" (0x53726448): it is not a Linux bzImage; give --kernel arch/x86/boot/bzImage")]
    BadMagic {
        /// Path.
        path: PathBuf,
        /// The word found.
        found: u32,
    },
    /// The boot protocol is too old.
    #[error("kernel {path} speaks boot protocol {}.{:02}; the 64-bit entry needs 2.12 or later (Linux 3.8+)", version >> 8, version & 0xff)]
    OldProtocol {
        /// Path.
        path: PathBuf,
        /// Version word.
        version: u16,
    },
    /// Not a 64-bit kernel.
    #[error(
        "kernel {0} has no 64-bit entry point (XLF_KERNEL_64 is clear): build an x86_64 kernel"
    )]
    Not64Bit(PathBuf),
    /// Setup-header sizes or offsets that disagree with the file.
    #[error("kernel {path} is not a usable bzImage: its setup header {problem}; the file is corrupt: copy or build it again")]
    Header {
        /// Path.
        path: PathBuf,
        /// Which fields disagree.
        problem: bzimage::HeaderProblem,
    },
    /// Neither bzImage nor ELF.
    #[error("kernel {path} is neither a bzImage nor an ELF file (it starts with {head}): give --kernel a bzImage (arch/x86/boot/bzImage, /boot/vmlinuz-*) or a vmlinux ELF")]
    UnknownFormat {
        /// Path.
        path: PathBuf,
        /// First bytes, hex.
        head: String,
    },
    /// An ELF that cannot be booted.
    #[error("kernel {path} is not a bootable x86-64 vmlinux: {why}; give --kernel an intact x86-64 vmlinux or bzImage")]
    BadElf {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A payload in a compression the host knows that does not decompress to a vmlinux.
    #[error("kernel {path}: {source}")]
    Payload {
        /// Path.
        path: PathBuf,
        /// What the decompressor found.
        source: decompress::DecompressError,
    },
    /// The kernel does not fit in RAM.
    #[error("the kernel needs guest RAM up to {need_h} but --mem gives {have_h} below the PCI hole: use --mem {min_h} or more", need_h = human_up(*need), have_h = human_up(*have), min_h = human_up(*need))]
    KernelTooBig {
        /// Bytes needed from 0.
        need: u64,
        /// Low RAM available.
        have: u64,
    },
    /// The kernel asks for memory beyond what any guest has below the PCI hole.
    #[error("kernel {path} needs guest RAM up to {need:#x}, beyond the 3 GiB below the PCI hole that a kernel must fit in whatever --mem is: its setup header (pref_address, init_size) or its ELF segments are corrupt; give --kernel another kernel")]
    KernelBeyondLowRam {
        /// Path.
        path: PathBuf,
        /// Guest-physical end it needs.
        need: u64,
    },
    /// The initrd is too large for any guest.
    #[error("initrd {path} is {size} bytes, more than any guest can hold beside this kernel whatever --mem is: an initrd must lie between the kernel's end ({kend:#x}) and {limit:#x} (the lower of the kernel's initrd_addr_max and the PCI hole at 3 GiB); give --initrd a smaller initramfs")]
    InitrdBeyondAnyGuest {
        /// Path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// End of the kernel, page aligned.
        kend: u64,
        /// Highest end an initrd may have.
        limit: u64,
    },
    /// The initrd does not fit.
    #[error("the initrd ({size_h}) does not fit between the kernel's end ({kend:#x}) and the highest address it may use ({limit:#x}): use --mem {min_h} or more", size_h = human_up(*size), min_h = human_up(kend.saturating_add(*size).saturating_add(PAGE)))]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// End of the kernel.
        kend: u64,
        /// Highest usable end.
        limit: u64,
    },
    /// Command line too long.
    #[error("the command line is {len} bytes; this kernel takes at most {max}: shorten --cmdline")]
    CmdlineTooLong {
        /// Length.
        len: usize,
        /// Kernel limit.
        max: usize,
    },
    /// The command line has a NUL byte.
    #[error("the command line contains a NUL byte: remove it from --cmdline")]
    CmdlineNul,
    /// linux-loader failed.
    #[error("loading kernel {path} failed: {source}")]
    Loader {
        /// Path.
        path: PathBuf,
        /// The loader error.
        source: linux_loader::loader::Error,
    },
    /// Writing a boot structure failed.
    #[error("cannot write {what} into guest memory at {gpa:#x}: {source}")]
    GuestWrite {
        /// What.
        what: &'static str,
        /// Where.
        gpa: u64,
        /// vm-memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// Setting up the boot vCPU failed.
    #[error(transparent)]
    Arch(#[from] ArchError),
}

/// Rounds up to a whole MiB and formats it for a `--mem` suggestion.
fn human_up(bytes: u64) -> String {
    human(bytes.div_ceil(1 << 20).saturating_mul(1 << 20))
}

/// How the kernel was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootPath {
    /// bzImage payload decompressed on the host; the vmlinux ELF entered directly.
    HostDecompressed(Compression),
    /// bzImage entered at `startup_64`; its own decompressor runs in the guest.
    InGuestDecompressor,
    /// A vmlinux ELF given on the command line.
    Elf,
}

impl std::fmt::Display for BootPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootPath::HostDecompressed(c) => write!(
                f,
                "fast path: {c:?} payload decompressed on the host, vmlinux entered directly"
            ),
            BootPath::InGuestDecompressor => {
                f.write_str("bzImage through the in-guest decompressor")
            }
            BootPath::Elf => f.write_str("vmlinux ELF entered directly"),
        }
    }
}

/// Where the kernel was put and how to start it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// First instruction of the boot CPU.
    pub entry: u64,
    /// The zero page.
    pub boot_params_gpa: u64,
    /// Which path.
    pub path: BootPath,
    /// End of the kernel image in guest memory.
    pub kernel_end: u64,
    /// Where the initrd went (gpa, size).
    pub initrd: Option<(u64, u64)>,
}

/// Where an initrd of `size` bytes goes: the highest page-aligned address below both the kernel's
/// `initrd_addr_max` and the end of low RAM, above the kernel's end.
pub fn place_initrd(
    initrd_addr_max: u32,
    mem_bytes: u64,
    kernel_end: u64,
    size: u64,
) -> Result<u64, BootError> {
    let limit = (u64::from(initrd_addr_max) + 1).min(mem_bytes.min(MMIO_HOLE_START));
    // A corrupt setup header can put the kernel's end within a page of 2^64 (`required_end`
    // saturates): nothing fits above it, and rounding it up must not overflow.
    let kend = kernel_end
        .checked_next_multiple_of(PAGE)
        .unwrap_or(u64::MAX);
    match limit.checked_sub(size).map(|a| a & !(PAGE - 1)) {
        Some(addr) if addr >= kend => Ok(addr),
        _ => Err(BootError::InitrdTooBig { size, kend, limit }),
    }
}

/// Everything the loader needs.
#[derive(Debug)]
pub struct BootSpec<'a> {
    /// The validated kernel; a bzImage whose payload [`KernelImage::decompress_on_host`] turned
    /// into a vmlinux is entered directly, any other goes through its in-guest decompressor.
    pub kernel: &'a KernelImage,
    /// Initrd bytes.
    pub initrd: Option<&'a [u8]>,
    /// Command line.
    pub cmdline: &'a str,
    /// ACPI RSDP address to hand to the kernel, if tables were written.
    pub acpi_rsdp: Option<u64>,
}

fn guest_write(
    mem: &GuestMemoryMmap,
    what: &'static str,
    gpa: u64,
    data: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(|source| BootError::GuestWrite { what, gpa, source })
}

/// A setup header for a vmlinux that came without one.
fn synthetic_header() -> setup_header {
    setup_header {
        boot_flag: bzimage::BOOT_FLAG_MAGIC,
        header: bzimage::HDRS_MAGIC,
        kernel_alignment: ELF_KERNEL_ALIGNMENT,
        initrd_addr_max: ELF_INITRD_ADDR_MAX,
        cmdline_size: ELF_CMDLINE_SIZE - 1,
        ..Default::default()
    }
}

fn load_elf(mem: &GuestMemoryMmap, path: &Path, bytes: &[u8]) -> Result<(u64, u64), BootError> {
    let res = Elf::load(
        mem,
        None,
        &mut Cursor::new(bytes),
        Some(GuestAddress(BZIMAGE_LOAD_GPA)),
    )
    .map_err(|source| BootError::Loader {
        path: path.into(),
        source,
    })?;
    Ok((res.kernel_load.0, res.kernel_end))
}

/// Loads the kernel, initrd and command line into `ram` and writes the zero page.
pub fn load(ram: &GuestRam, spec: &BootSpec<'_>) -> Result<LoadedKernel, BootError> {
    let mem = ram.memory();
    let k = spec.kernel;
    k.check_fits(ram.size())?;
    let (mut hdr, entry, kernel_end, path) = match k.kind {
        KernelKind::Elf(_) => {
            let (entry, end) = load_elf(mem, &k.path, &k.bytes)?;
            (synthetic_header(), entry, end, BootPath::Elf)
        }
        KernelKind::BzImage(_) => {
            let hdr = bzimage::setup_header_of(&k.bytes);
            let reserve_end = k.required_end();
            match &k.host {
                HostPayload::Vmlinux(c, vmlinux) => {
                    let copy_started = Instant::now();
                    let (entry, end) = load_elf(mem, &k.path, vmlinux)?;
                    debug!(
                        "vmlinux segments copied into guest RAM in {:.2?}",
                        copy_started.elapsed()
                    );
                    (
                        hdr,
                        entry,
                        end.max(reserve_end),
                        BootPath::HostDecompressed(*c),
                    )
                }
                HostPayload::NotTried | HostPayload::InGuest => {
                    let res = BzImage::load(
                        mem,
                        Some(GuestAddress(BZIMAGE_LOAD_GPA)),
                        &mut Cursor::new(&k.bytes),
                        Some(GuestAddress(BZIMAGE_LOAD_GPA)),
                    )
                    .map_err(|source| BootError::Loader {
                        path: k.path.clone(),
                        source,
                    })?;
                    let mut hdr = res.setup_header.unwrap_or(hdr);
                    hdr.code32_start = BZIMAGE_LOAD_GPA as u32;
                    (
                        hdr,
                        res.kernel_load.0 + bzimage::STARTUP_64_OFFSET,
                        res.kernel_end.max(reserve_end),
                        BootPath::InGuestDecompressor,
                    )
                }
            }
        }
    };
    info!("boot path: {path}; entry {entry:#x}");

    // Command line.
    let max = if hdr.cmdline_size == 0 {
        ELF_CMDLINE_SIZE as usize - 1
    } else {
        hdr.cmdline_size as usize
    };
    if spec.cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: spec.cmdline.len(),
            max,
        });
    }
    if spec.cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut line = spec.cmdline.as_bytes().to_vec();
    line.push(0);
    guest_write(mem, "kernel command line", CMDLINE_GPA, &line)?;

    // Initrd: as high as the kernel allows, below the PCI hole, page aligned.
    let mut initrd = None;
    if let Some(data) = spec.initrd {
        let size = data.len() as u64;
        let addr = place_initrd(hdr.initrd_addr_max, ram.size(), kernel_end, size)?;
        guest_write(mem, "initrd", addr, data)?;
        initrd = Some((addr, size));
        info!("initrd: {} at {addr:#x}", human(size));
    }

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    hdr.cmdline_size = spec.cmdline.len() as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    if let Some(rsdp) = spec.acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let e820 = ram.e820_entries();
    for (i, e) in e820.iter().take(E820_MAX).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(E820_MAX) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_GPA))
        .map_err(|source| BootError::GuestWrite {
            what: "zero page",
            gpa: ZERO_PAGE_GPA,
            source,
        })?;
    Ok(LoadedKernel {
        entry,
        boot_params_gpa: ZERO_PAGE_GPA,
        path,
        kernel_end,
        initrd,
    })
}

/// Puts the boot CPU in 64-bit mode at the kernel entry with RSI = the zero page.
pub fn setup_boot_cpu(
    mem: &GuestMemoryMmap,
    vcpu: &dyn VcpuOps,
    loaded: &LoadedKernel,
) -> Result<(), BootError> {
    long_mode::setup(
        mem,
        vcpu,
        LongModeConfig {
            pml4_gpa: PML4_GPA,
            identity_map_bytes: BOOT_IDENTITY_MAP,
            gdt_gpa: GDT_GPA,
            entry: loaded.entry,
            rsp: BOOT_STACK_GPA,
            rsi: loaded.boot_params_gpa,
            rdi: 0,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::BackingKind;

    #[test]
    fn elf_load_writes_zero_page_cmdline_and_initrd() {
        let ram = GuestRam::new(64 << 20, BackingKind::Small).unwrap();
        let img = KernelImage::parse(Path::new("vmlinux"), elf::tests::fake_elf()).unwrap();
        let initrd = vec![0xabu8; 5000];
        let spec = BootSpec {
            kernel: &img,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0 x=1",
            acpi_rsdp: None,
        };
        let l = load(&ram, &spec).unwrap();
        assert_eq!(l.entry, 0x100_0000);
        assert_eq!(l.path, BootPath::Elf);
        let (ia, is) = l.initrd.unwrap();
        assert_eq!(is, 5000);
        assert_eq!(
            ia + 0x2000,
            64 << 20,
            "initrd page-aligned at the top of RAM"
        );
        let mem = ram.memory();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_GPA)).unwrap();
        let (ptr, img_addr, t, n) = (
            p.hdr.cmd_line_ptr,
            p.hdr.ramdisk_image,
            p.hdr.type_of_loader,
            p.e820_entries,
        );
        assert_eq!((ptr as u64, img_addr as u64, t), (CMDLINE_GPA, ia, 0xff));
        assert_eq!(n, 3);
        let mut line = [0u8; 18];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_GPA))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 x=1\0");
        let big = vec![0u8; 64 << 20];
        let spec = BootSpec {
            initrd: Some(&big),
            ..spec
        };
        assert!(matches!(
            load(&ram, &spec),
            Err(BootError::InitrdTooBig { .. })
        ));
    }
}
