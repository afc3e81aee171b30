//! boot-bench: time from process start to the kernel banner on the serial console, our `vmm` against QEMU, side by side.
//!
//! Both boot the same bzImage with the same memory size, vCPU count and
//! command line, in two memory configurations: 2 MiB hugetlbfs pages (QEMU:
//! `-mem-path` on a hugetlbfs mount) and transparent huge pages (QEMU's
//! default anonymous RAM, which it marks `MADV_HUGEPAGE`; `vmm --hugepages
//! thp`). Runs are interleaved (rep 1 of every config and tool, then rep
//! 2, ...) so that a slow phase of the host does not favour one side. Each
//! run ends as soon as the marker ("Linux version" by default) appears: the
//! process is killed then. The result is a table of medians and the
//! vmm/QEMU ratio, of the wall time and of the CPU time the process used
//! (all its threads, user + system, from `wait4`). On a host shared with
//! other work the wall time includes waiting for a CPU; the CPU time mostly
//! does not, so its ratio is the steadier figure.
//!
//! ```text
//! cargo build --release -p vmm -p tools
//! target/release/boot-bench --kernel target/kernel/.../vmlinuz-... --reps 3
//! ```

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where tools/fetch-kernel caches Debian's cloud kernel.
const DEFAULT_KERNEL: &str = "target/kernel/vmlinuz";

/// Size of a hugetlbfs page in the `2m` configuration.
const HUGE_PAGE_2M: u64 = 2 << 20;
const SYSFS_FREE_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
const SYSFS_THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
/// Where the benchmark mounts hugetlbfs for QEMU when no 2 MiB mount exists.
const DEFAULT_HUGETLBFS_MOUNT: &str = "/dev/hugepages";

#[derive(Parser, Debug)]
#[command(
    about = "Time to the kernel banner: our vmm against qemu-system-x86_64 -enable-kvm, \
             with 2 MiB huge pages and with THP, interleaved runs, one table"
)]
struct Args {
    /// The bzImage to boot [default: target/kernel/vmlinuz, where
    /// tools/fetch-kernel caches Debian's cloud kernel].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Our vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// The QEMU binary (Debian package qemu-system-x86).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Guest memory, with a K/M/G suffix.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Repetitions of each (configuration, tool) pair.
    #[arg(long, short = 'n', default_value_t = 3)]
    reps: usize,
    /// Kernel command line, the same for both.
    #[arg(long, default_value = "console=ttyS0 earlyprintk=serial")]
    cmdline: String,
    /// Memory configurations to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2m,thp")]
    configs: Vec<MemConfig>,
    /// Which VMMs to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "vmm,qemu")]
    tools: Vec<Tool>,
    /// Serial-console text that ends a run.
    #[arg(long, default_value = "Linux version")]
    marker: String,
    /// Seconds a run may take to print the marker before it is killed and
    /// counted as failed.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// hugetlbfs mount (2 MiB pages) for QEMU's -mem-path [default: an
    /// existing 2 MiB hugetlbfs mount, else one created at /dev/hugepages].
    #[arg(long)]
    hugetlbfs: Option<PathBuf>,
    /// Extra argument for vmm (repeatable), e.g. --vmm-arg=--no-fast-boot.
    #[arg(long = "vmm-arg", allow_hyphen_values = true)]
    vmm_args: Vec<String>,
    /// Directory to save each run's console output and stderr in.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MemConfig {
    /// 2 MiB hugetlbfs pages.
    #[value(name = "2m", alias = "2M")]
    Huge2M,
    /// Transparent huge pages.
    Thp,
}

impl fmt::Display for MemConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            MemConfig::Huge2M => "2M hugetlbfs",
            MemConfig::Thp => "THP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Tool {
    Vmm,
    Qemu,
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Tool::Vmm => "vmm",
            Tool::Qemu => "qemu",
        })
    }
}

/// Parses "512M", "1G", "1048576" into bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("`{s}` is not a size: use a number with an optional K, M or G suffix")
    })?;
    match n.checked_mul(1 << shift) {
        Some(0) | None => Err(format!("`{s}` is not a usable memory size")),
        Some(bytes) => Ok(bytes),
    }
}

fn mem_arg(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

/// One timed boot.
enum Outcome {
    /// The marker appeared this long after spawn; the process had used this
    /// much CPU time when it was reaped (unknown if `wait4` failed).
    Banner(Duration, Option<Duration>),
    /// The run did not reach the marker.
    Failed(String),
}

/// What the console reader reports.
enum Event {
    Marker(Instant),
    Eof,
}

struct Bench {
    args: Args,
    kernel: PathBuf,
    hugetlbfs: Option<PathBuf>,
}

impl Bench {
    fn command(&self, tool: Tool, config: MemConfig) -> Command {
        match tool {
            Tool::Vmm => {
                let mut cmd = Command::new(&self.args.vmm);
                cmd.arg("--kernel")
                    .arg(&self.kernel)
                    .args(["--mem", &mem_arg(self.args.mem)])
                    .args(["--cpus", &self.args.cpus.to_string()])
                    .args([
                        "--hugepages",
                        match config {
                            MemConfig::Huge2M => "2M",
                            MemConfig::Thp => "thp",
                        },
                    ])
                    .args(["--cmdline", &self.args.cmdline])
                    .args(["--serial", "stdio"])
                    .args(&self.args.vmm_args);
                cmd
            }
            Tool::Qemu => {
                let mut cmd = Command::new(&self.args.qemu);
                // `-nographic` would claim stdio for the monitor as well;
                // the serial port alone goes to stdout.
                cmd.args(["-enable-kvm", "-cpu", "host", "-no-reboot"])
                    .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
                    .args(["-m", &format!("{}M", self.args.mem >> 20)])
                    .args(["-smp", &self.args.cpus.to_string()])
                    .arg("-kernel")
                    .arg(&self.kernel)
                    .args(["-append", &self.args.cmdline]);
                if config == MemConfig::Huge2M {
                    let mount = self
                        .hugetlbfs
                        .as_ref()
                        .expect("mount found before the runs");
                    cmd.arg("-mem-path").arg(mount);
                }
                cmd
            }
        }
    }

    fn run(&self, tool: Tool, config: MemConfig, rep: usize) -> Outcome {
        if config == MemConfig::Huge2M {
            let needed = self.args.mem.div_ceil(HUGE_PAGE_2M);
            match free_huge_pages() {
                Some(free) if free >= needed => {}
                free => {
                    return Outcome::Failed(format!(
                        "{needed} free 2 MiB huge pages needed, {} free: raise /proc/sys/vm/nr_hugepages",
                        free.map_or("unknown".into(), |f| f.to_string())
                    ))
                }
            }
        }
        let mut cmd = self.command(tool, config);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => return Outcome::Failed(format!("cannot start {:?}: {e}", cmd.get_program())),
        };
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let marker = self.args.marker.clone().into_bytes();
        let console = std::thread::spawn(move || watch_console(stdout, &marker, &tx));
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let errors = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            text
        });

        let outcome = match rx.recv_timeout(Duration::from_secs(self.args.timeout)) {
            Ok(Event::Marker(at)) => Outcome::Banner(at - started, None),
            Ok(Event::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                Outcome::Failed(format!("exited ({status}) before printing the marker"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Outcome::Failed(format!(
                "no marker within {} s (raise --timeout, or check the console log)",
                self.args.timeout
            )),
        };
        let cpu = stop(&mut child);
        let console = console.join().unwrap_or_default();
        let errors = errors.join().unwrap_or_default();
        if let Some(dir) = &self.args.log_dir {
            let stem = format!("{}-{}-{}", tool, config_slug(config), rep + 1);
            let _ = std::fs::write(dir.join(format!("{stem}.console")), &console);
            let _ = std::fs::write(dir.join(format!("{stem}.stderr")), &errors);
        }
        match outcome {
            Outcome::Failed(why) => {
                let tail = last_line(&errors).or_else(|| last_line(&console));
                Outcome::Failed(match tail {
                    Some(line) => format!("{why}; last output: {line}"),
                    None => why,
                })
            }
            Outcome::Banner(wall, _) => Outcome::Banner(wall, cpu),
        }
    }
}

fn config_slug(config: MemConfig) -> &'static str {
    match config {
        MemConfig::Huge2M => "2m",
        MemConfig::Thp => "thp",
    }
}

/// Reads the console until EOF, reporting the moment `marker` first
/// appears; returns everything read.
fn watch_console(mut out: impl Read, marker: &[u8], tx: &mpsc::Sender<Event>) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let mut found = false;
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = Instant::now();
        // Search only the new bytes plus enough old ones to catch a marker
        // split across reads.
        let from = seen.len().saturating_sub(marker.len());
        seen.extend_from_slice(&buf[..n]);
        if !found && seen[from..].windows(marker.len()).any(|w| w == marker) {
            found = true;
            let _ = tx.send(Event::Marker(now));
        }
    }
    if !found {
        let _ = tx.send(Event::Eof);
    }
    seen
}

/// Kills and reaps `child`; returns the CPU time (user + system, all
/// threads) it used.
fn stop(child: &mut Child) -> Option<Duration> {
    // SIGKILL: the benchmark only needed the banner. QEMU unlinks its
    // hugetlbfs file at start-up, so nothing is left behind.
    let _ = child.kill();
    let pid = libc::pid_t::try_from(child.id()).ok()?;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child (not yet reaped: `Child::wait` is never
    // called on it) and writes only into the two locals.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if reaped != pid {
        return None;
    }
    let secs = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

fn last_line(text: &[u8]) -> Option<String> {
    String::from_utf8_lossy(text)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(|l| l.chars().take(200).collect())
}

/// Whether `program` names an existing file, directly or through `$PATH`.
fn on_path(program: &Path) -> bool {
    if program.components().count() > 1 {
        return program.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn free_huge_pages() -> Option<u64> {
    std::fs::read_to_string(SYSFS_FREE_2M)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A hugetlbfs mount with 2 MiB pages: the one given, one already mounted,
/// or a new one at /dev/hugepages.
fn hugetlbfs_mount(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [_, dir, "hugetlbfs", options, ..] = fields[..] {
            // Without a pagesize option the mount uses the default huge page
            // size, 2 MiB on x86-64 unless the kernel was booted otherwise.
            let two_meg = options.split(',').all(|o| !o.starts_with("pagesize="))
                || options
                    .split(',')
                    .any(|o| o == "pagesize=2M" || o == "pagesize=2048k");
            if two_meg {
                return Ok(PathBuf::from(dir));
            }
        }
    }
    let dir = Path::new(DEFAULT_HUGETLBFS_MOUNT);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let status = Command::new("mount")
        .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
        .arg(dir)
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!(
            "mounting hugetlbfs at {} failed ({status}): run as root, or mount one and pass --hugetlbfs",
            dir.display()
        );
    }
    eprintln!(
        "boot-bench: mounted hugetlbfs (2 MiB pages) at {}",
        dir.display()
    );
    Ok(dir.to_path_buf())
}

fn default_kernel() -> Result<PathBuf> {
    let path = PathBuf::from(DEFAULT_KERNEL);
    if !path.is_file() {
        bail!("no kernel at {DEFAULT_KERNEL}: run tools/fetch-kernel first, or pass --kernel PATH");
    }
    Ok(path)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn shell_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.reps == 0 {
        bail!("--reps 0 runs nothing: give at least 1");
    }
    let kernel = match &args.kernel {
        Some(k) => k.clone(),
        None => default_kernel()?,
    };
    std::fs::metadata(&kernel).with_context(|| {
        format!(
            "cannot read the kernel {}: pass --kernel PATH",
            kernel.display()
        )
    })?;
    if args.tools.contains(&Tool::Vmm) && !args.vmm.exists() {
        bail!(
            "no vmm binary at {}: build it with `cargo build --release -p vmm`, pass --vmm PATH, \
             or run QEMU alone with --tools qemu",
            args.vmm.display()
        );
    }
    if args.tools.contains(&Tool::Qemu) && !on_path(&args.qemu) {
        bail!(
            "no QEMU at {}: install Debian's qemu-system-x86 (apt-get install qemu-system-x86), \
             pass --qemu PATH, or run vmm alone with --tools vmm",
            args.qemu.display()
        );
    }
    let hugetlbfs = if args.configs.contains(&MemConfig::Huge2M) && args.tools.contains(&Tool::Qemu)
    {
        Some(hugetlbfs_mount(args.hugetlbfs.as_deref())?)
    } else {
        None
    };
    if let Some(dir) = &args.log_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let bench = Bench {
        kernel,
        hugetlbfs,
        args,
    };
    let args = &bench.args;

    println!("kernel:  {}", bench.kernel.display());
    println!(
        "guest:   {} RAM, {} vCPUs, cmdline '{}'; marker '{}'",
        mem_arg(args.mem),
        args.cpus,
        args.cmdline,
        args.marker
    );
    if let Ok(thp) = std::fs::read_to_string(SYSFS_THP_ENABLED) {
        println!("host THP: {}", thp.trim());
    }
    for &config in &args.configs {
        for &tool in &args.tools {
            println!(
                "{config:>12} {tool:>4}: {}",
                shell_line(&bench.command(tool, config))
            );
        }
    }
    println!();

    let mut times: Vec<Vec<Vec<f64>>> =
        vec![vec![Vec::new(); args.tools.len()]; args.configs.len()];
    let mut cpu_times = times.clone();
    let mut failures = Vec::new();
    for rep in 0..args.reps {
        for (ci, &config) in args.configs.iter().enumerate() {
            for (ti, &tool) in args.tools.iter().enumerate() {
                match bench.run(tool, config, rep) {
                    Outcome::Banner(t, cpu) => {
                        let cpu_text =
                            cpu.map_or("unknown".into(), |c| format!("{:.2} s", c.as_secs_f64()));
                        eprintln!(
                            "rep {}/{} {config} {tool}: {:.2} s (CPU time {cpu_text})",
                            rep + 1,
                            args.reps,
                            t.as_secs_f64()
                        );
                        times[ci][ti].push(t.as_secs_f64());
                        if let Some(c) = cpu {
                            cpu_times[ci][ti].push(c.as_secs_f64());
                        }
                    }
                    Outcome::Failed(why) => {
                        eprintln!(
                            "rep {}/{} {config} {tool}: FAILED: {why}",
                            rep + 1,
                            args.reps
                        );
                        failures.push(format!("{config} {tool} rep {}: {why}", rep + 1));
                    }
                }
            }
        }
    }

    println!(
        "{:<14} {:<5} {:>5} {:>10} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "config",
        "tool",
        "runs",
        "median s",
        "min s",
        "max s",
        "vmm/qemu",
        "median CPU",
        "CPU ratio"
    );
    let medians = |samples: &[f64]| -> Option<(f64, f64, f64)> {
        let mut t = samples.to_vec();
        t.sort_by(f64::total_cmp);
        (!t.is_empty()).then(|| (median(&t), t[0], t[t.len() - 1]))
    };
    let qemu_index = args.tools.iter().position(|&t| t == Tool::Qemu);
    for (ci, &config) in args.configs.iter().enumerate() {
        let qemu = qemu_index.map(|qi| (medians(&times[ci][qi]), medians(&cpu_times[ci][qi])));
        for (ti, &tool) in args.tools.iter().enumerate() {
            let runs = format!("{}/{}", times[ci][ti].len(), args.reps);
            let Some((m, lo, hi)) = medians(&times[ci][ti]) else {
                println!(
                    "{:<14} {:<5} {:>5} {:>10}",
                    config.to_string(),
                    tool.to_string(),
                    runs,
                    "failed"
                );
                continue;
            };
            let cpu = medians(&cpu_times[ci][ti]).map(|(c, _, _)| c);
            let ratio = |ours: Option<f64>, theirs: Option<f64>| match (tool, ours, theirs) {
                (Tool::Vmm, Some(a), Some(b)) => format!("{:.3}", a / b),
                _ => "-".into(),
            };
            let (qemu_wall, qemu_cpu) = match qemu {
                Some((w, c)) => (w.map(|w| w.0), c.map(|c| c.0)),
                None => (None, None),
            };
            println!(
                "{:<14} {:<5} {:>5} {:>10.2} {:>8.2} {:>8.2} {:>10} {:>10} {:>10}",
                config.to_string(),
                tool.to_string(),
                runs,
                m,
                lo,
                hi,
                ratio(Some(m), qemu_wall),
                cpu.map_or("-".into(), |c| format!("{c:.2}")),
                ratio(cpu, qemu_cpu)
            );
        }
    }
    if !failures.is_empty() {
        println!("\nfailed runs:");
        for f in &failures {
            println!("  {f}");
        }
    }
    Ok(())
}
