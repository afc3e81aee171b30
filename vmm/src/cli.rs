//! The `vmm` command line: flags, their defaults, and parsing of sizes, vCPU counts, huge-page
//! backings and serial targets into one-line errors that name the fix.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::boot::DEFAULT_CMDLINE;
use crate::guest::GuestArgs;
use crate::memory::{BackingKind, MemoryBackend, MemoryError};

/// Default guest RAM.
pub const DEFAULT_MEM: &str = "1G";
/// Smallest guest RAM the CLI accepts (one 2 MiB page); a kernel needs far more and says so.
pub const MIN_MEM: u64 = 2 << 20;
/// The MP table and xAPIC ids allow at most this many vCPUs.
pub const MAX_CPUS: u32 = 254;

/// `--hugepages` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Hugepages {
    /// 2 MiB hugetlbfs if the free pool covers the guest, else THP.
    Auto,
    /// 2 MiB hugetlbfs pages (pool: /proc/sys/vm/nr_hugepages).
    #[value(name = "2M", alias = "2m")]
    TwoM,
    /// 1 GiB hugetlbfs pages (pool: /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages).
    #[value(name = "1G", alias = "1g")]
    OneG,
    /// Transparent huge pages (MADV_HUGEPAGE).
    Thp,
    /// Plain 4 KiB pages.
    None,
}

impl From<Hugepages> for BackingKind {
    fn from(h: Hugepages) -> BackingKind {
        match h {
            Hugepages::Auto => BackingKind::Auto,
            Hugepages::TwoM => BackingKind::Hugetlb2M,
            Hugepages::OneG => BackingKind::Hugetlb1G,
            Hugepages::Thp => BackingKind::Thp,
            Hugepages::None => BackingKind::Small,
        }
    }
}

/// `--memory-backend` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum MemoryBackendArg {
    /// Private anonymous memory.
    #[default]
    Private,
    /// A shared memfd (hugetlbfs memfd with --hugepages 2M/1G), MAP_SHARED, with a second
    /// mapping for the VMM; demand paging resolves pages already in the file with UFFDIO_CONTINUE
    /// and reclaims by punching holes in it.
    Shared,
}

impl From<MemoryBackendArg> for MemoryBackend {
    fn from(m: MemoryBackendArg) -> MemoryBackend {
        match m {
            MemoryBackendArg::Private => MemoryBackend::Private,
            MemoryBackendArg::Shared => MemoryBackend::Shared,
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialTarget {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output to a file (created or truncated), no input.
    File(PathBuf),
}

/// Parses `stdio` or `file:PATH`.
pub fn parse_serial(s: &str) -> Result<SerialTarget, String> {
    match s {
        "stdio" => Ok(SerialTarget::Stdio),
        _ => match s.strip_prefix("file:") {
            Some("") => {
                Err("--serial file: needs a path, e.g. --serial file:/tmp/console.log".into())
            }
            Some(p) => Ok(SerialTarget::File(p.into())),
            None => Err(format!(
                "unknown serial target '{s}': use stdio or file:PATH"
            )),
        },
    }
}

/// Parses a size with an optional K, M, G or T suffix (binary units; "KiB"/"KB" accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size: give a number with an optional K, M or G suffix, e.g. 4G"
        ));
    }
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "unknown size suffix '{suffix}' in '{s}': use K, M or G (e.g. 512M, 4G)"
            ))
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses `--mem`: a size that is at least [`MIN_MEM`] and a multiple of 4 KiB.
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v == 0 {
        return Err("guest memory cannot be 0: give --mem a size such as 1G".into());
    }
    if v < MIN_MEM {
        return Err(format!(
            "{s} is below the minimum of 2M: give --mem a size such as 1G"
        ));
    }
    if v % 4096 != 0 {
        return Err(format!(
            "{s} is not a multiple of 4K: round --mem to whole pages, e.g. 1G"
        ));
    }
    Ok(v)
}

/// Parses `--cpus`: 1..=[`MAX_CPUS`] (KVM's own limit is checked when the VM is created).
pub fn parse_cpus(s: &str) -> Result<u8, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of vCPUs: use e.g. --cpus 2"))?;
    if n == 0 {
        return Err("a VM needs at least one vCPU: use --cpus 1 or more".into());
    }
    if n > u64::from(MAX_CPUS) {
        return Err(format!(
            "{n} vCPUs is above the maximum of {MAX_CPUS}: use --cpus 1..={MAX_CPUS}"
        ));
    }
    Ok(n as u8)
}

/// Boot a Linux kernel (bzImage or vmlinux ELF) on huge-page-backed memory with KVM, or run a
/// built-in test guest.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about, long_about = None)]
pub struct Cli {
    /// Kernel to boot: a bzImage (e.g. /boot/vmlinuz-*) or a vmlinux ELF. Required unless --guest.
    #[arg(long, value_name = "PATH", required_unless_present = "guest")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk, placed at the top of RAM below the kernel's limit.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest RAM with a K, M or G suffix; RAM above 3G is placed above 4 GiB.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MEM, value_parser = parse_mem)]
    pub mem: u64,

    /// Number of vCPUs (1..=254, and at most KVM's limit).
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    pub cpus: u8,

    /// Backing of guest RAM: auto = 2M if the free pool covers the guest, else THP; none = 4K pages.
    #[arg(long, value_name = "KIND", value_enum, default_value = "auto")]
    pub hugepages: Hugepages,

    /// Guest RAM memory: private = anonymous memory; shared = a memfd mapped MAP_SHARED (with
    /// --hugepages 2M/1G a hugetlbfs memfd; auto = 2M if the free pool covers the guest, else 4K;
    /// thp is private only), which demand paging maps with UFFDIO_CONTINUE when the file has the
    /// page and reclaims by punching holes.
    #[arg(long, value_name = "KIND", value_enum, default_value = "private")]
    pub memory_backend: MemoryBackendArg,

    /// Serial console (COM1): stdio, or file:PATH for output to a file.
    #[arg(long, value_name = "TARGET", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialTarget,

    /// Log level on stderr: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,

    /// Boot a bzImage through its in-guest decompressor instead of decompressing it on the host.
    #[arg(long)]
    pub no_fast_boot: bool,

    /// Built-in test guests.
    #[command(flatten)]
    pub guest_args: GuestArgs,
}

impl Cli {
    /// The guest RAM backing that --hugepages and --memory-backend ask for together.
    pub fn backing(&self) -> Result<BackingKind, MemoryError> {
        BackingKind::from(self.hugepages).on_backend(self.memory_backend.into())
    }
}

/// Parses `args`; `Err` carries what to print and the exit code (0 for --help/--version, else 1
/// with a one-line `error: ...`).
pub fn parse_from<I, T>(args: I) -> Result<Cli, (String, i32)>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(cli),
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                Err((e.render().to_string(), 0))
            }
            _ => {
                // Clap's message can span lines (a list of missing flags, a usage block): keep the
                // sentence, one line, and point at --help.
                let rendered = e.render().to_string();
                let sentence: Vec<&str> = rendered
                    .lines()
                    .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                    .map(str::trim)
                    .collect();
                Err((format!("{} (see vmm --help)", sentence.join(" ")), 1))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, (String, i32)> {
        parse_from(std::iter::once("vmm").chain(args.iter().copied()))
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("4X")
            .unwrap_err()
            .contains("unknown size suffix 'X'"));
        assert!(parse_size("G").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999G")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_mem("0").unwrap_err().contains("cannot be 0"));
        assert!(parse_mem("1K").unwrap_err().contains("minimum"));
        assert!(parse_mem("4097K").unwrap_err().contains("multiple of 4K"));
    }

    #[test]
    fn defaults_and_flags() {
        let c = parse(&["--kernel", "k"]).unwrap();
        assert_eq!(c.mem, 1 << 30);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.hugepages, Hugepages::Auto);
        assert_eq!(c.serial, SerialTarget::Stdio);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(!c.no_fast_boot);
        let c = parse(&[
            "--kernel",
            "k",
            "--mem",
            "4G",
            "--cpus",
            "4",
            "--hugepages",
            "2M",
            "--serial",
            "file:/tmp/x",
            "--no-fast-boot",
            "--log-level",
            "debug",
        ])
        .unwrap();
        assert_eq!((c.mem, c.cpus, c.hugepages), (4 << 30, 4, Hugepages::TwoM));
        assert_eq!(c.serial, SerialTarget::File("/tmp/x".into()));
        assert!(c.no_fast_boot);
        assert_eq!(
            BackingKind::from(
                parse(&["--kernel", "k", "--hugepages", "none"])
                    .unwrap()
                    .hugepages
            ),
            BackingKind::Small
        );
    }

    #[test]
    fn memory_backend_chooses_the_shared_twin_of_the_page_size() {
        let backing = |args: &[&str]| {
            let mut a = vec!["--guest", "stress"];
            a.extend_from_slice(args);
            parse(&a).unwrap().backing()
        };
        assert_eq!(backing(&[]).unwrap(), BackingKind::Auto);
        assert_eq!(
            backing(&["--memory-backend", "private", "--hugepages", "2M"]).unwrap(),
            BackingKind::Hugetlb2M
        );
        for (h, want) in [
            ("auto", BackingKind::SharedAuto),
            ("none", BackingKind::Shared4K),
            ("2M", BackingKind::Shared2M),
            ("1G", BackingKind::Shared1G),
        ] {
            assert_eq!(
                backing(&["--memory-backend", "shared", "--hugepages", h]).unwrap(),
                want
            );
        }
        let e = backing(&["--memory-backend", "shared", "--hugepages", "thp"]).unwrap_err();
        assert!(e.to_string().contains("private memory only"), "{e}");
        let (msg, code) = parse(&["--guest", "stress", "--memory-backend", "anon"]).unwrap_err();
        assert_eq!(code, 1);
        assert!(msg.contains("private") && msg.contains("shared"), "{msg}");
    }

    #[test]
    fn errors_are_one_line_with_exit_code_1() {
        for args in [
            &["--mem", "4X", "--kernel", "k"][..],
            &["--cpus", "0", "--kernel", "k"],
            &["--cpus", "1000", "--kernel", "k"],
            &[],
            &["--kernel", "k", "--serial", "tcp:1"],
            &["--kernel", "k", "--hugepages", "3M"],
        ] {
            let (msg, code) = parse(args).unwrap_err();
            assert_eq!(code, 1, "{args:?}");
            assert!(msg.starts_with("error: "), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        let (msg, _) = parse(&["--cpus", "0", "--kernel", "k"]).unwrap_err();
        assert!(msg.contains("at least one vCPU"), "{msg}");
        let (msg, _) = parse(&[]).unwrap_err();
        assert!(msg.contains("--kernel"), "{msg}");
        let (help, code) = parse(&["--help"]).unwrap_err();
        assert_eq!(code, 0);
        for flag in [
            "--kernel",
            "--initrd",
            "--cmdline",
            "--mem",
            "--cpus",
            "--hugepages",
            "--serial",
            "--log-level",
            "--no-fast-boot",
            "--guest",
        ] {
            assert!(help.contains(flag), "help documents {flag}");
        }
        assert!(help.contains("[default: 1G]"));
    }

    #[test]
    fn guest_makes_kernel_optional() {
        let c = parse(&["--guest", "stress", "--mem", "1G"]).unwrap();
        assert_eq!(c.guest_args.guest.as_deref(), Some("stress"));
        assert!(c.kernel.is_none());
    }
}
