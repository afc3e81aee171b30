//! The `vmm` command line: flags, their defaults, and parsing of sizes, vCPU counts, huge-page
//! backings and serial targets into one-line errors that name the fix.

mod guest_args;

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::boot::DEFAULT_CMDLINE;
use crate::memory::{BackingKind, MemoryBackend, MemoryError};
use crate::migrate::source;

pub use guest_args::{GuestArgs, ModeArg};

/// Default guest RAM.
pub const DEFAULT_MEM: &str = "1G";
/// Smallest guest RAM the CLI accepts (one 2 MiB page); a kernel needs far more and says so.
pub const MIN_MEM: u64 = 2 << 20;
/// Default of `--shutdown-timeout`: seconds a guest gets to power off after the power button.
pub const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 30;
/// Default of `--idle-timeout`: seconds every vCPU may sit in HLT with interrupts on and
/// nothing to wake it before the VM is ended as idle.
pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 30;
/// `--migrate-timeout` when not given, seconds.
pub const DEFAULT_MIGRATE_TIMEOUT_S: u64 = 30;
/// `--api-timeout` when not given, seconds.
pub const DEFAULT_API_TIMEOUT_S: u64 = 30;
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

/// The exit codes as `vmm --help` lists them (README.md "Exit codes" explains each; a unit test
/// checks this text against the `EXIT_*` constants).
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
    0  the guest powered off, a test guest passed, or the VM migrated away
    1  an error before the guest started, a test guest failed, or the host failed it
    2  a vCPU failed
    3  the guest rebooted (ACPI reset register, i8042 reset, triple fault)
    4  `shutdown` stopped the VM without the guest powering off
    5  idle: every vCPU halted with interrupts off, or with interrupts on and nothing
       to wake it for --idle-timeout seconds
    6  --migrate-to failed and the VM then ended normally here
  130  stopped by SIGINT
  143  stopped by SIGTERM
  159  a thread made a system call its seccomp filter does not allow (--seccomp kill)";

/// Boot a Linux kernel (bzImage or vmlinux ELF) on huge-page-backed memory with KVM, or run a
/// built-in test guest.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about, long_about = None, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Kernel to boot: a bzImage (e.g. /boot/vmlinuz-*) or a vmlinux ELF. Required unless
    /// --guest, --incoming or --stay.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["guest", "incoming", "stay"]
    )]
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

    /// A virtio-blk disk for the kernel, on a raw image: path=FILE, and readonly=on (the
    /// guest may only read it) or direct=on (O_DIRECT, no host page cache). Give it again for
    /// more disks (at most 6); the first is the guest's /dev/vda. A migration's destination
    /// opens the same path (shared storage, or one host); given there too, it must agree.
    #[arg(long, value_name = "path=FILE[,readonly=on][,direct=on]")]
    pub disk: Vec<crate::virtio::block::DiskConfig>,

    /// A virtio-balloon device for the kernel, with statistics, deflate-on-OOM and free page
    /// reporting: `vmmctl balloon SIZE` asks the guest for SIZE of its memory, and the pages it
    /// gives (or reports free) are dropped on the host through stage2. Its state migrates;
    /// the pages it holds go as zero runs, without data.
    #[arg(long)]
    pub balloon: bool,

    /// A virtio-net device for the kernel on an existing tap device of this network namespace:
    /// tap=NAME (create it first: ip tuntap add dev NAME mode tap), and mac=MAC for the guest's
    /// address (without it the guest makes one up). Frames only, no offloads. Give it again for
    /// more interfaces (the first is the guest's eth0). A migration's destination opens a tap
    /// of the same name on its host; given there too, it must agree.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    pub net: Vec<crate::virtio::net::NetConfig>,

    /// Log level on stderr: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,

    /// Boot a bzImage through its in-guest decompressor instead of decompressing it on the host.
    #[arg(long)]
    pub no_fast_boot: bool,

    /// Sample the guest's RIP on every vCPU every 5 ms and write `samples rip` lines, most
    /// samples first, to PATH when the VM ends (look the RIPs up in the kernel's System.map:
    /// tools/guest-profile).
    #[arg(long, value_name = "PATH")]
    pub guest_profile: Option<PathBuf>,

    /// seccomp filters, one per kind of thread (vCPU, userfaultfd handler, migration sender
    /// and receiver, control socket, console, main), installed once each thread's set-up is
    /// done. kill: a system call outside a thread's list ends the process with exit code 159,
    /// naming the thread kind and the call; log: the call goes through and the kernel logs it
    /// (dmesg, type=1326); none: no filters.
    #[arg(long, value_name = "MODE", value_enum, default_value = "kill")]
    pub seccomp: crate::seccomp::SeccompMode,

    /// What every VM has: demand paging, the control socket, statistics, migration.
    #[command(flatten)]
    pub machine: MachineArgs,

    /// Built-in test guests.
    #[command(flatten)]
    pub guest_args: GuestArgs,

    /// The ids of the flags given on the command line (not defaulted), to refuse the ones that
    /// do not apply to the chosen mode.
    #[arg(skip)]
    pub given: Vec<String>,
}

/// Options of every VM, a kernel or a test guest (flattened into the main command line).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MachineArgs {
    /// Turn off what the VMM does for a software KVM (kvm_pvm) on its own: the syscall relay
    /// that completes guest user syscalls, and `noxsave` appended to a kernel command line.
    /// Without them a Linux guest on such a host stops at its first XSAVE instruction or at
    /// init's first system call. Nothing changes on hardware KVM.
    #[arg(long)]
    pub no_host_quirks: bool,
    /// Let KVM populate guest RAM by itself instead of the userfaultfd + stage2 pager.
    #[arg(long)]
    pub no_demand_paging: bool,
    /// Populate all of guest RAM before the guest runs (an --incoming destination: once the
    /// source's stream header has said how much, before any page arrives), like QEMU's
    /// -mem-prealloc: no host page faults later, at the cost of the
    /// time (0.47-0.57 s for 4 GiB of 2 MiB pages here) and the memory up front. Needs
    /// --no-demand-paging (the pager populates RAM itself, page by page).
    #[arg(long)]
    pub prefault: bool,
    /// Write the run's figures (demand-paging and stage2 counters; for a test guest also its
    /// per-vCPU results and timings) as JSON to this file when the VM ends.
    #[arg(long, value_name = "PATH")]
    pub stats_json: Option<PathBuf>,
    /// Serve the control socket (JSON lines: stats, info, reclaim, pause, resume, migrate,
    /// shutdown) at this path while the VM runs. The socket is mode 0600 and serves only the
    /// VMM's own user and root.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Disconnect a control-socket client that sends no complete request line for this long
    /// (it gets an error response first).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_API_TIMEOUT_S, value_parser = clap::value_parser!(u64).range(1..))]
    pub api_timeout: u64,
    /// Live-migrate the running guest to a `vmm --incoming` destination (tcp:HOST:PORT or
    /// unix:PATH): precopy rounds over --dirty-mode, then the last round with the guest
    /// paused (or postcopy, see --postcopy-after). The source exits 0 once the destination
    /// runs the guest (postcopy: once it has every page); if the migration fails before
    /// the guest was handed over (the pause of precopy, the switch of postcopy), the guest
    /// keeps running here, and its normal end then exits 6, not 0.
    #[arg(long, value_name = "ADDR")]
    pub migrate_to: Option<String>,
    /// Receive a migrating VM (a kernel or a test guest) at this address (tcp:HOST:PORT or
    /// unix:PATH) instead of loading one. Alone it takes memory size, vCPUs, backing and the
    /// guest from the stream; --guest, --mem, --cpus or --hugepages given here must agree with
    /// the source. Postcopy needs demand paging here (no --no-demand-paging).
    #[arg(long, value_name = "ADDR")]
    pub incoming: Option<String>,
    /// Keep the process after its VM migrates out: it goes on serving --api-socket with no VM,
    /// where `vmmctl receive --from ADDR` takes the next VM in (and `vmmctl shutdown` ends
    /// the process, exit 0). A failed incoming migration leaves it waiting again; a VM that
    /// ends here ends the process with its exit code. With neither --kernel, --guest nor
    /// --incoming it starts with no VM. Needs --api-socket; migrations out are asked for over
    /// it (not --migrate-to).
    #[arg(long)]
    pub stay: bool,
    /// How the migration source finds the pages written between rounds: kvm-bitmap (KVM's
    /// dirty bitmap, the default), kvm-ring (KVM's per-vCPU dirty rings, created when the VM
    /// starts, so give it at start also for `vmmctl migrate`; KVM logs into them only from
    /// a migration's first round to its end, so a VM that never migrates runs at full speed)
    /// or stage2-wp (stage2's own write tracking through userfaultfd write-protect; needs
    /// demand paging). Source only.
    #[arg(long, value_name = "MODE")]
    pub dirty_mode: Option<String>,
    /// Switch to postcopy after N precopy rounds (1 = right after the full pass) and one
    /// discard round (the destination drops its stale copies while the guest still runs
    /// here): the guest
    /// runs on the destination at once, pages it touches that are still on the source come
    /// on demand, the rest is pushed in the background. Needs demand paging on the
    /// destination. Once the destination runs the guest there is no way back: if the
    /// connection drops before every page arrived, the destination stops with an error and
    /// exits 1 (the guest cannot continue without its memory) and so does the source.
    #[arg(long, value_name = "N")]
    pub postcopy_after: Option<u32>,
    /// Let the guest run this long before --migrate-to starts (so that it has written
    /// memory by then).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub migrate_delay_ms: u64,
    /// Write the source's migration figures (mode, dirty-tracking mode, total and downtime in
    /// ms, bytes, one entry per round, the postcopy phase) as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub migrate_json: Option<PathBuf>,
    /// How long the control socket's `shutdown` waits, after pressing the ACPI power button,
    /// for a kernel guest to power off before it stops the VM itself (exit code 4). A test
    /// guest has no power button: `shutdown` stops it at once.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_S)]
    pub shutdown_timeout: u64,
    /// End the VM (exit code 5) once every vCPU has sat in HLT with interrupts on and nothing
    /// to wake it (no LAPIC timer or PIT counting, no interrupt pending, console input closed,
    /// no --api-socket) for this long; 0 never ends such a VM. Every vCPU in HLT with
    /// interrupts off ends the VM after about 2 s whatever this says: nothing can wake it.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_IDLE_TIMEOUT_S)]
    pub idle_timeout: u64,
    /// Fail a migration whose peer makes no progress for this long: a destination's source
    /// that connects and sends nothing or stops mid-stream, a source's destination that stops
    /// taking the stream or acknowledging rounds (the VM then runs on at the source); 0 waits
    /// for ever.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_MIGRATE_TIMEOUT_S)]
    pub migrate_timeout: u64,
    /// Authenticate the migration peer with the shared secret in FILE (a file only its owner
    /// can read, at least 16 bytes; e.g. `head -c 32 /dev/urandom | base64 > FILE; chmod 600
    /// FILE`): give the same file to both ends. Each end proves it holds the secret
    /// (HMAC-SHA256 over the other's random challenge) before any guest memory moves; a
    /// destination with a secret refuses a source without it or with another, and a source
    /// with one refuses such a destination (its VM runs on). The stream itself is not
    /// encrypted.
    #[arg(long, value_name = "FILE")]
    pub migrate_secret: Option<PathBuf>,
    /// Spread each precopy round over N connections to the destination (default 1), each
    /// carrying the pages of one address range from a thread of its own, so that a host with
    /// more cores and a faster link than one stream fills can use them (as QEMU's multifd).
    /// The destination learns N from the stream; with --migrate-secret every connection
    /// authenticates. The state and postcopy use the first connection only.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=crate::migrate::stream::MAX_CONNECTIONS as i64))]
    pub migrate_connections: Option<u32>,
    /// Have the destination check every page: with the guest paused, the source takes a
    /// CRC-32 of each 4 KiB page of guest RAM and sends them with the state; the destination
    /// compares its RAM with them before its guest runs (postcopy: the pages still owed as
    /// they arrive) and refuses a migration that lost a page. Costs a read of guest RAM on
    /// each side, in the downtime.
    #[arg(long)]
    pub migrate_verify: bool,
    /// Keep dirty logging on while no migration runs and harvest it every MS milliseconds (a
    /// stress of dirty tracking beside faults and reclaims, and a measure of its cost; `stats`
    /// shows the harvests and the pages they found). A migration stops it and takes its own.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub dirty_harvest_ms: Option<u64>,
    /// Precopy stops iterating when the estimated downtime is at most this.
    #[arg(long, value_name = "MS", default_value_t = source::DEFAULT_DOWNTIME_MS)]
    pub downtime_ms: u64,
    /// Precopy stops iterating after this many rounds.
    #[arg(long, value_name = "N", default_value_t = source::DEFAULT_MAX_ROUNDS)]
    pub max_rounds: u32,
}

impl MachineArgs {
    /// `--migrate-timeout` as a limit (`None`: 0, wait for ever).
    pub fn migrate_idle_limit(&self) -> Option<std::time::Duration> {
        (self.migrate_timeout > 0).then(|| std::time::Duration::from_secs(self.migrate_timeout))
    }

    /// `--dirty-harvest-ms` as an interval.
    pub fn dirty_harvest_every(&self) -> Option<std::time::Duration> {
        self.dirty_harvest_ms.map(std::time::Duration::from_millis)
    }

    /// `--idle-timeout` as a limit (`None`: 0, never end a VM asleep with interrupts on).
    pub fn idle_limit(&self) -> Option<std::time::Duration> {
        (self.idle_timeout > 0).then(|| std::time::Duration::from_secs(self.idle_timeout))
    }
}

/// Flags only the built-in test guests have (clap ids).
pub const GUEST_FLAGS: &[&str] = &[
    "mode",
    "generations",
    "writes_per_gen",
    "seed",
    "dirty_rate",
    "expect_reclaim",
    "reclaim_storm",
    "guest_timeout",
    "run_for",
];
/// Flags only a booted kernel has (clap ids).
pub const KERNEL_FLAGS: &[&str] = &[
    "kernel",
    "disk",
    "balloon",
    "net",
    "initrd",
    "cmdline",
    "no_fast_boot",
    "guest_profile",
];

/// The command-line spelling of a clap id (`writes_per_gen` -> `--writes-per-gen`).
pub fn flag_name(id: &str) -> String {
    format!("--{}", id.replace('_', "-"))
}

impl Cli {
    /// Whether the flag with clap id `id` was given on the command line (not defaulted).
    pub fn was_given(&self, id: &str) -> bool {
        self.given.iter().any(|g| g == id)
    }

    /// Refuses a flag that does not apply to the chosen mode (a kernel, a test guest, or an
    /// `--incoming` destination), with what to do.
    pub fn check_mode(&self) -> Result<(), String> {
        let first = |ids: &[&str]| {
            ids.iter()
                .find(|id| self.was_given(id))
                .map(|id| flag_name(id))
        };
        let guest = self.guest_args.guest.is_some();
        if guest && self.kernel.is_some() {
            return Err(
                "--guest and --kernel together: run either a built-in test guest or a kernel"
                    .into(),
            );
        }
        if self.machine.incoming.is_some() {
            // --disk, --net and --balloon may be given: they must agree with the source's devices
            // (machine::spec::reconcile).
            let payload_flags: Vec<&str> = KERNEL_FLAGS
                .iter()
                .copied()
                .filter(|id| !matches!(*id, "disk" | "balloon" | "net"))
                .collect();
            if let Some(f) = first(&payload_flags) {
                return Err(format!(
                    "{f} with --incoming: the destination receives the kernel, its command line \
                     and its initrd with the VM's memory from the source; drop {f}"
                ));
            }
            return Ok(());
        }
        if guest {
            if self.was_given("shutdown_timeout") {
                return Err(
                    "--shutdown-timeout is for a kernel's ACPI power button; a built-in \
                     test guest has none and `shutdown` stops it at once: drop \
                     --shutdown-timeout"
                        .into(),
                );
            }
            if let Some(f) = first(KERNEL_FLAGS) {
                return Err(format!(
                    "{f} is for booting a kernel (--kernel); a built-in test guest (--guest) has \
                     none: drop {f}"
                ));
            }
        } else if let Some(f) = first(GUEST_FLAGS) {
            return Err(format!(
                "{f} is for the built-in test guests (--guest NAME); a kernel has no {f}: drop it"
            ));
        }
        Ok(())
    }

    /// `--hugepages` as the command line spells it.
    pub fn hugepages_name(&self) -> String {
        self.hugepages
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// `--memory-backend` as the command line spells it.
    pub fn memory_backend_name(&self) -> String {
        self.memory_backend
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

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
    use clap::{CommandFactory, FromArgMatches};
    let parsed = Cli::command()
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    match parsed {
        Ok((mut cli, m)) => {
            cli.given = m
                .ids()
                .filter(|id| {
                    m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
                })
                .map(|id| id.as_str().to_string())
                .collect();
            match cli.check_mode() {
                Ok(()) => Ok(cli),
                Err(e) => Err((format!("error: {e}"), 1)),
            }
        }
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
    fn a_flag_of_the_other_mode_is_refused_with_the_fix() {
        let e = parse(&["--guest", "stress", "--kernel", "/k"]).unwrap_err();
        assert!(e.0.contains("--guest and --kernel together"), "{}", e.0);
        let e = parse(&["--kernel", "/k", "--mode", "random"]).unwrap_err();
        assert!(
            e.0.contains("--mode is for the built-in test guests") && e.0.contains("drop it"),
            "{}",
            e.0
        );
        let e = parse(&["--kernel", "/k", "--writes-per-gen", "5"]).unwrap_err();
        assert!(e.0.starts_with("error: --writes-per-gen is for"), "{}", e.0);
        let e = parse(&["--guest", "touch", "--initrd", "/i"]).unwrap_err();
        assert!(e.0.contains("--initrd is for booting a kernel"), "{}", e.0);
        let e = parse(&["--incoming", "tcp:127.0.0.1:1", "--cmdline", "x"]).unwrap_err();
        assert!(e.0.contains("--cmdline with --incoming"), "{}", e.0);
        // Defaults are not "given": a kernel run keeps the guest flags' defaults silently.
        let c = parse(&["--kernel", "/k"]).unwrap();
        assert!(
            !c.was_given("seed") && !c.was_given("mode"),
            "{:?}",
            c.given
        );
        assert!(c.was_given("kernel"));
        // A destination alone, and one told the guest's own options, both parse.
        parse(&["--incoming", "tcp:127.0.0.1:1"]).unwrap();
        parse(&[
            "--incoming",
            "tcp:127.0.0.1:1",
            "--guest",
            "dirty",
            "--seed",
            "3",
        ])
        .unwrap();
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
    fn help_lists_every_exit_code_with_its_constant_value() {
        use crate::exit::*;
        let (help, _) = parse(&["--help"]).unwrap_err();
        assert!(help.contains("Exit codes:"), "{help}");
        for (code, words) in [
            (EXIT_OK, "powered off"),
            (EXIT_HOST_FAILED, "an error before"),
            (EXIT_VCPU_FAILED, "a vCPU failed"),
            (EXIT_REBOOT, "rebooted"),
            (EXIT_SHUTDOWN_FORCED, "`shutdown` stopped"),
            (EXIT_IDLE, "halted with interrupts off"),
            (EXIT_MIGRATE_FAILED, "--migrate-to failed"),
            (EXIT_SIGINT, "SIGINT"),
            (EXIT_SIGTERM, "SIGTERM"),
            (EXIT_SECCOMP, "its seccomp filter does not allow"),
        ] {
            let line = help
                .lines()
                .find(|l| l.contains(words))
                .unwrap_or_else(|| panic!("no line for {words:?}:\n{help}"));
            assert_eq!(
                line.split_whitespace().next(),
                Some(code.to_string().as_str()),
                "{line}"
            );
        }
    }

    #[test]
    fn guest_makes_kernel_optional() {
        let c = parse(&["--guest", "stress", "--mem", "1G"]).unwrap();
        assert_eq!(c.guest_args.guest.as_deref(), Some("stress"));
        assert!(c.kernel.is_none());
    }
}
