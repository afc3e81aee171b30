//! dp-bench: demand-paging populate rate of our `touch` guest (userfaultfd + stage2 pager) side
//! by side with the kernel selftest `demand_paging_test`, same vCPUs and bytes per vCPU.
//!
//! Configurations, each run with interleaved repetitions (ours, theirs, ours, theirs, ...):
//! 1. 4 KiB: `vmm --guest touch --hugepages none` vs `demand_paging_test -u MISSING`
//!    (goal: our pages/s at least 2.0x theirs);
//! 2. 2 MiB: `vmm --guest touch --hugepages 2M` vs `demand_paging_test -s anonymous_hugetlb`
//!    with no userfaultfd at all (goal: our populate time at most 1.1x theirs), and, for
//!    information, vs `-u MISSING -s anonymous_hugetlb`.
//!
//! Our time to populate is the guest's own: each vCPU of the touch guest reads the TSC around
//! its populate loop (one write per 4 KiB page) and reports the cycles through the test port;
//! the slowest vCPU's cycles, divided by the host TSC rate (calibrated here), is the populate
//! time, and the VMM's start-up and the guest's verify pass are left out. The selftest's time is
//! its "Total guest execution time" (host clock from the vCPU threads' start until all joined)
//! and its rate its "Overall demand paging rate"; both count 4 KiB guest pages.
//!
//! `dp-bench [--vcpus 2] [--per-vcpu 256M] [--reps 3] [--vmm PATH] [--selftests DIR]
//! [--runner auto|binary|lib]`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use vmm::memory::BackingKind;

/// Bytes of a guest page the touch guest and the selftest count (x86 4 KiB page).
const PAGE: u64 = 4096;
/// Size of a 2 MiB hugetlbfs page.
const HUGE_2M: u64 = 2 << 20;
/// The touch guest's low area (code, page tables, stacks) below the slices:
/// vmm/src/guest/layout.rs `LOW_RESERVED`.
const GUEST_LOW_AREA: u64 = 4 << 20;
/// Extra 2 MiB pages the selftest's VM may take beyond its test region (slack for the check).
const SELFTEST_SLACK_PAGES: u64 = 16;
/// Goal at 4 KiB: our pages/s over the selftest's userfaultfd pages/s.
const GOAL_4K_RATE: f64 = 2.0;
/// Goal at 2 MiB: our populate time over the selftest's time with no userfaultfd.
const GOAL_2M_TIME: f64 = 1.1;
/// First argument of the child mode that runs the touch guest through the vmm library.
const CHILD_ARG: &str = "__run-touch";

/// Who runs our side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Runner {
    /// The vmm binary; if it does not honour --hugepages, the library (and say so).
    Auto,
    /// Only the vmm binary (`--vmm`).
    Binary,
    /// This program re-executed as a child calling `vmm::guest::run_on` with the backing.
    Lib,
}

#[derive(Parser, Debug)]
#[command(
    about = "Demand paging: our touch guest (userfaultfd + stage2) vs the kernel's demand_paging_test"
)]
struct Args {
    /// vCPUs (selftest -v, vmm --cpus).
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Bytes each vCPU populates (selftest -b), a multiple of 2M, with a K/M/G suffix.
    #[arg(long, default_value = "256M", value_parser = vmm::cli::parse_size)]
    per_vcpu: u64,
    /// Repetitions of every side of every configuration (interleaved).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// The vmm binary (default: `vmm` beside this program, else target/release/vmm).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Directory holding demand_paging_test (default: the output of tools/build-selftests).
    #[arg(long)]
    selftests: Option<PathBuf>,
    /// Who runs our side (see --help of the values).
    #[arg(long, value_enum, default_value_t = Runner::Auto)]
    runner: Runner,
    /// Only the 4 KiB configuration.
    #[arg(long)]
    skip_2m: bool,
}

/// One measured run: time to populate and the rate in 4 KiB pages per second.
#[derive(Clone, Copy, Debug)]
struct Sample {
    secs: f64,
    pages_per_sec: f64,
}

/// A side of a configuration and its samples.
struct Side {
    label: String,
    samples: Vec<Sample>,
    failures: Vec<String>,
}

impl Side {
    fn new(label: impl Into<String>) -> Self {
        Side {
            label: label.into(),
            samples: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn median(&self) -> Option<Sample> {
        let mut v = self.samples.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            let secs = (v[n / 2 - 1].secs + v[n / 2].secs) / 2.0;
            let pages_per_sec = (v[n / 2 - 1].pages_per_sec + v[n / 2].pages_per_sec) / 2.0;
            Sample {
                secs,
                pages_per_sec,
            }
        })
    }

    fn best(&self) -> Option<Sample> {
        self.samples
            .iter()
            .copied()
            .min_by(|a, b| a.secs.total_cmp(&b.secs))
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(CHILD_ARG) {
        std::process::exit(match child_run_touch(&argv[2..]) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        });
    }
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Child mode: `__run-touch BACKING MEM CPUS STATS_JSON [--no-demand-paging]` runs the touch guest through the vmm
/// library on exactly that backing (what `vmm --hugepages` should do).
fn child_run_touch(a: &[String]) -> Result<i32> {
    let (a, nodp) = match a {
        [rest @ .., last] if last == "--no-demand-paging" => (rest, true),
        _ => (a, false),
    };
    let [backing, mem, cpus, json] = a else {
        bail!("{CHILD_ARG} takes BACKING MEM CPUS STATS_JSON [--no-demand-paging]");
    };
    let backing = match backing.as_str() {
        "none" => BackingKind::Small,
        "2M" => BackingKind::Hugetlb2M,
        other => bail!("{CHILD_ARG}: unknown backing {other}"),
    };
    let args = vmm::cli::GuestArgs {
        guest: Some("touch".into()),
        seed: 1,
        guest_timeout: Some(600),
        ..Default::default()
    };
    let machine = vmm::cli::MachineArgs {
        stats_json: Some(json.into()),
        no_demand_paging: nodp,
        ..Default::default()
    };
    vmm::guest::run_on(&args, &machine, mem.parse()?, cpus.parse()?, backing, None)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tools/ has a parent")
        .to_path_buf()
}

fn find_vmm(given: Option<PathBuf>) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match given {
        Some(p) => vec![p],
        None => {
            let mut v = Vec::new();
            if let Some(dir) = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf))
            {
                v.push(dir.join("vmm"));
            }
            v.push(workspace_root().join("target/release/vmm"));
            v
        }
    };
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the vmm binary is missing (looked at {}): build it with `cargo build --release -p vmm` (with the same CARGO_TARGET_DIR as this program) or pass --vmm PATH",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn find_selftest(given: Option<PathBuf>) -> Result<PathBuf> {
    let script = workspace_root().join("tools/build-selftests");
    let dir = match given {
        Some(d) => d,
        None => {
            let out = Command::new(&script).output().with_context(|| {
                format!(
                    "cannot run {}: is the repository complete?",
                    script.display()
                )
            })?;
            if !out.status.success() {
                bail!(
                    "{} failed: {}; build the selftests with `{}` (as root, after apt-get update) or pass --selftests DIR",
                    script.display(),
                    String::from_utf8_lossy(&out.stderr).trim(),
                    script.display()
                );
            }
            PathBuf::from(
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .lines()
                    .last()
                    .unwrap_or(""),
            )
        }
    };
    let bin = dir.join("demand_paging_test");
    if !bin.is_file() {
        bail!(
            "{} is missing: build the selftests with `{}` or pass --selftests DIR",
            bin.display(),
            script.display()
        );
    }
    Ok(bin)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Free 2 MiB pages not promised to a mapping already (HugePages_Free - HugePages_Rsvd), when the
/// default huge page size is 2 MiB.
fn free_2m_pages() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let field = |name: &str| -> Option<u64> {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    if field("Hugepagesize:") != Some(HUGE_2M >> 10) {
        bail!("the default huge page size is not 2 MiB; the 2M configuration needs it");
    }
    Ok(field("HugePages_Free:")
        .unwrap_or(0)
        .saturating_sub(field("HugePages_Rsvd:").unwrap_or(0)))
}

/// The host TSC rate in Hz (the guest's rdtsc runs at it: KVM offsets but does not scale it
/// here). The smallest-window pair of rdtsc/clock reads over ~200 ms bounds the error from
/// preemption on a loaded host.
fn tsc_hz() -> f64 {
    fn pair() -> (u64, Instant, u64) {
        // SAFETY: rdtsc has no memory effects; x86-64 always has it.
        let a = unsafe { core::arch::x86_64::_rdtsc() };
        let t = Instant::now();
        // SAFETY: as above.
        let b = unsafe { core::arch::x86_64::_rdtsc() };
        (a, t, b)
    }
    fn tight() -> (u64, Instant) {
        let mut best = (u64::MAX, 0, Instant::now());
        for _ in 0..200 {
            let (a, t, b) = pair();
            if b - a < best.0 {
                best = (b - a, a + (b - a) / 2, t);
            }
        }
        (best.1, best.2)
    }
    let (c0, t0) = tight();
    std::thread::sleep(Duration::from_millis(200));
    let (c1, t1) = tight();
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

/// How our side is run for one configuration.
enum OurCmd {
    Binary(PathBuf),
    Lib(PathBuf),
}

struct OurRun {
    sample: Sample,
    backing: String,
    /// The pager's counters of the run (demand_paging.paging).
    paging: serde_json::Value,
    host_secs: f64,
}

fn run_ours(
    cmd: &OurCmd,
    hp: &str,
    nodp: bool,
    mem: u64,
    cpus: u8,
    per_vcpu: u64,
    hz: f64,
) -> Result<OurRun> {
    let nodp_flag: &[&str] = if nodp { &["--no-demand-paging"] } else { &[] };
    let json = std::env::temp_dir().join(format!("dp-bench-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&json);
    let out: Output = match cmd {
        OurCmd::Binary(vmm) => Command::new(vmm)
            .args([
                "--guest",
                "touch",
                "--log-level",
                "warn",
                "--guest-timeout",
                "600",
            ])
            .args(["--mem", &mem.to_string(), "--cpus", &cpus.to_string()])
            .args(["--hugepages", hp])
            .args(nodp_flag)
            .arg("--stats-json")
            .arg(&json)
            .output()
            .with_context(|| format!("running {}", vmm.display()))?,
        OurCmd::Lib(me) => Command::new(me)
            .args([CHILD_ARG, hp, &mem.to_string(), &cpus.to_string()])
            .arg(&json)
            .args(nodp_flag)
            .env("RUST_LOG", "warn")
            .output()
            .with_context(|| format!("running {} {CHILD_ARG}", me.display()))?,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "our touch guest failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout
                .lines()
                .filter(|l| l.contains("FAIL") || l.contains("error"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    // "guest touch on 2 vCPU(s), 516M of RAM on 4K pages, slice ..."
    let backing = stdout
        .lines()
        .find_map(|l| l.strip_prefix("guest touch on "))
        .and_then(|l| l.split(" of RAM on ").nth(1))
        .and_then(|l| l.split(", ").next())
        .unwrap_or("unknown")
        .to_string();
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?,
    )
    .context("parsing the --stats-json output")?;
    let _ = std::fs::remove_file(&json);
    let slice = doc["slice_bytes"].as_u64().unwrap_or(0);
    if slice != per_vcpu {
        bail!("the touch guest got {slice} bytes per vCPU, not {per_vcpu}: the guest layout changed (low area no longer {GUEST_LOW_AREA} bytes?)");
    }
    let vcpus = doc["vcpus"]
        .as_array()
        .context("stats JSON without vcpus")?;
    let mut max_cycles = 0u64;
    let mut pages = 0u64;
    let mut host_secs: f64 = 0.0;
    for v in vcpus {
        max_cycles = max_cycles.max(v["cycles"].as_u64().context("a vCPU without cycles")?);
        pages += v["pages"].as_u64().unwrap_or(0);
        host_secs = host_secs.max(v["seconds"].as_f64().unwrap_or(0.0));
    }
    let secs = max_cycles as f64 / hz;
    Ok(OurRun {
        sample: Sample {
            secs,
            pages_per_sec: pages as f64 / secs,
        },
        backing,
        paging: doc["demand_paging"]["paging"].clone(),
        host_secs,
    })
}

fn run_selftest(bin: &Path, extra: &[&str], cpus: u8, per_vcpu: u64) -> Result<Sample> {
    let out = Command::new(bin)
        .args(extra)
        .args([
            "-v",
            &cpus.to_string(),
            "-b",
            &format!("{}M", per_vcpu >> 20),
        ])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "demand_paging_test {} failed ({}): {}",
            extra.join(" "),
            out.status,
            text.lines().rev().take(4).collect::<Vec<_>>().join(" | ")
        );
    }
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| {
                v.trim()
                    .trim_end_matches("pgs/sec")
                    .trim_end_matches('s')
                    .trim()
                    .to_string()
            })
            .and_then(|v| v.parse().ok())
    };
    let secs = field("Total guest execution time:")
        .context("no 'Total guest execution time' line in demand_paging_test's output")?;
    let pages_per_sec = field("Overall demand paging rate:")
        .context("no 'Overall demand paging rate' line in demand_paging_test's output")?;
    Ok(Sample {
        secs,
        pages_per_sec,
    })
}

fn fmt_sample(s: Option<Sample>) -> (String, String) {
    match s {
        Some(s) => (format!("{:.0}", s.pages_per_sec), format!("{:.3}s", s.secs)),
        None => ("-".into(), "-".into()),
    }
}

/// Picks our runner for a backing: the vmm binary if it honours `--hugepages`, else the library.
fn pick_runner(
    args: &Args,
    vmm: &Result<PathBuf>,
    hp: &str,
    want: &str,
    mem: u64,
    hz: f64,
) -> Result<OurCmd> {
    let me = std::env::current_exe().context("locating this program")?;
    if args.runner == Runner::Lib {
        return Ok(OurCmd::Lib(me));
    }
    let vmm = match vmm {
        Ok(p) => p.clone(),
        Err(e) => bail!("{e:#}"),
    };
    let probe = run_ours(
        &OurCmd::Binary(vmm.clone()),
        hp,
        false,
        mem,
        args.vcpus,
        args.per_vcpu,
        hz,
    )?;
    if probe.backing == want {
        println!(
            "  our side: {} --hugepages {hp} (warm-up run gave {})",
            vmm.display(),
            probe.backing
        );
        return Ok(OurCmd::Binary(vmm));
    }
    let msg = format!(
        "NOTE: `vmm --guest touch --hugepages {hp}` ran on '{}', not '{want}': the vmm binary does not pass --hugepages to the guest runner (main.rs calls guest::run, Auto backing)",
        probe.backing
    );
    if args.runner == Runner::Binary {
        bail!("{msg}; rerun with --runner lib");
    }
    println!("  {msg};\n  our side therefore runs vmm::guest::run_on(.., {want}) from the vmm library in a child of this program (same guest, pager and defaults)");
    Ok(OurCmd::Lib(me))
}

fn run(args: Args) -> Result<()> {
    if args.vcpus == 0 {
        bail!("--vcpus 0: give at least 1");
    }
    if args.per_vcpu == 0 || !args.per_vcpu.is_multiple_of(HUGE_2M) {
        bail!("--per-vcpu must be a non-zero multiple of 2M (the touch guest's slices are whole 2 MiB pages)");
    }
    if args.reps == 0 {
        bail!("--reps 0: give at least 1");
    }
    let vmm = find_vmm(args.vmm.clone());
    if args.runner == Runner::Binary {
        if let Err(e) = &vmm {
            bail!("{e:#}");
        }
    }
    let selftest = find_selftest(args.selftests.clone())?;
    let mem = GUEST_LOW_AREA + u64::from(args.vcpus) * args.per_vcpu;
    let pages = u64::from(args.vcpus) * args.per_vcpu / PAGE;
    let hz = tsc_hz();
    let load_start = loadavg();
    println!(
        "dp-bench: {} vCPU(s) x {} MiB ({} pages of 4 KiB), {} rep(s), guest RAM {} MiB ({} MiB low area + slices)",
        args.vcpus,
        args.per_vcpu >> 20,
        pages,
        args.reps,
        mem >> 20,
        GUEST_LOW_AREA >> 20
    );
    println!("selftest: {}", selftest.display());
    println!("host TSC {:.1} MHz (our populate time = slowest vCPU's guest rdtsc cycles of its populate loop / TSC rate; selftest = its 'Total guest execution time')", hz / 1e6);
    println!("load average at start: {load_start} (on a loaded host the figures are noisy: compare medians of interleaved runs)");

    struct Config {
        name: &'static str,
        hp: &'static str,
        want: &'static str,
        theirs: Vec<(&'static str, Vec<&'static str>)>,
    }
    let mut configs = vec![Config {
        name: "4K",
        hp: "none",
        want: "4K pages",
        theirs: vec![("selftest -u MISSING", vec!["-u", "MISSING"])],
    }];
    if !args.skip_2m {
        configs.push(Config {
            name: "2M",
            hp: "2M",
            want: "2M hugetlbfs",
            theirs: vec![
                ("selftest hugetlb, no uffd", vec!["-s", "anonymous_hugetlb"]),
                (
                    "selftest hugetlb -u MISSING",
                    vec!["-u", "MISSING", "-s", "anonymous_hugetlb"],
                ),
            ],
        });
    }

    let mut table: Vec<(String, Side, Vec<Side>)> = Vec::new();
    for c in &configs {
        println!(
            "\n[{}] ours: touch --hugepages {}; theirs: {}",
            c.name,
            c.hp,
            c.theirs
                .iter()
                .map(|t| t.1.join(" "))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        if c.hp == "2M" {
            let need = (mem / HUGE_2M)
                .max(args.per_vcpu * u64::from(args.vcpus) / HUGE_2M + SELFTEST_SLACK_PAGES);
            match free_2m_pages() {
                Ok(free) if free >= need => {
                    println!("  2 MiB pool: {free} free pages, {need} needed")
                }
                Ok(free) => {
                    println!("  SKIPPED: only {free} free 2 MiB pages (HugePages_Free - HugePages_Rsvd), {need} needed; as root: echo N > /proc/sys/vm/nr_hugepages, or retry when other users of the pool are done");
                    continue;
                }
                Err(e) => {
                    println!("  SKIPPED: {e:#}");
                    continue;
                }
            }
        }
        let cmd = match pick_runner(&args, &vmm, c.hp, c.want, mem, hz) {
            Ok(cmd) => cmd,
            Err(e) => {
                println!("  SKIPPED: our side cannot run: {e:#}");
                continue;
            }
        };
        let mut ours = Side::new(match &cmd {
            OurCmd::Binary(_) => "ours (vmm binary)",
            OurCmd::Lib(_) => "ours (vmm lib run_on)",
        });
        let mut nodp = Side::new("ours --no-demand-paging (KVM alone)");
        let mut theirs: Vec<Side> = c.theirs.iter().map(|t| Side::new(t.0)).collect();
        for rep in 1..=args.reps {
            match run_ours(&cmd, c.hp, true, mem, args.vcpus, args.per_vcpu, hz) {
                Ok(r) if r.backing != c.want => nodp
                    .failures
                    .push(format!("rep {rep}: ran on {}", r.backing)),
                Ok(r) => {
                    println!("  rep {rep} ours-nodp: {:>8.3}s {:>9.0} pages/s (no userfaultfd: KVM populates by itself)", r.sample.secs, r.sample.pages_per_sec);
                    nodp.samples.push(r.sample);
                }
                Err(e) => {
                    println!("  rep {rep} ours-nodp: FAILED {e:#}");
                    nodp.failures.push(format!("rep {rep}: {e:#}"));
                }
            }
            match run_ours(&cmd, c.hp, false, mem, args.vcpus, args.per_vcpu, hz) {
                Ok(r) if r.backing != c.want => ours
                    .failures
                    .push(format!("rep {rep}: ran on {}", r.backing)),
                Ok(r) => {
                    let p = &r.paging;
                    println!(
                        "  rep {rep} ours:   {:>8.3}s {:>9.0} pages/s (host START..PASS incl. verify {:.3}s; uffd events {} installed {} fault-around pages {} eexist {} eagain {})",
                        r.sample.secs, r.sample.pages_per_sec, r.host_secs,
                        p["events_missing"], p["installed"], p["fault_around_pages"], p["eexist"], p["eagain"]
                    );
                    ours.samples.push(r.sample);
                }
                Err(e) => {
                    println!("  rep {rep} ours:   FAILED {e:#}");
                    ours.failures.push(format!("rep {rep}: {e:#}"));
                }
            }
            for (side, (_, extra)) in theirs.iter_mut().zip(&c.theirs) {
                match run_selftest(&selftest, extra, args.vcpus, args.per_vcpu) {
                    Ok(s) => {
                        println!(
                            "  rep {rep} theirs: {:>8.3}s {:>9.0} pages/s ({})",
                            s.secs, s.pages_per_sec, side.label
                        );
                        side.samples.push(s);
                    }
                    Err(e) => {
                        println!("  rep {rep} theirs: FAILED {e:#}");
                        side.failures.push(format!("rep {rep}: {e:#}"));
                    }
                }
            }
        }
        theirs.push(nodp);
        table.push((c.name.to_string(), ours, theirs));
    }

    if table.iter().any(|t| t.0 == "2M") {
        println!(
            "\nnote on 2M: the touch guest maps its RAM with 2 MiB guest pages, the selftest's guest (memstress) with 4 KiB \
             guest pages; on a shadow-paging KVM (this machine: no EPT) that is {} vs {} KVM faults for the same bytes, so \
             the cross-tool 2M ratio mostly measures the guest page size. The like-for-like cost of userfaultfd + stage2 is \
             'ours' vs 'ours --no-demand-paging' (same guest, same backing).",
            u64::from(args.vcpus) * args.per_vcpu / HUGE_2M,
            pages
        );
    }
    println!(
        "\nload average at end: {} (start: {load_start}); figures under load are noisy",
        loadavg()
    );
    println!(
        "\n{:<6} {:<36} {:>12} {:>12} {:>12} {:>12}  ratio ours/theirs (median) vs goal",
        "config", "tool", "med pages/s", "med time", "best pg/s", "best time",
    );
    for (name, ours, theirs) in &table {
        let row = |s: &Side, ratio: String| {
            let (mr, mt) = fmt_sample(s.median());
            let (br, bt) = fmt_sample(s.best());
            let fails = if s.failures.is_empty() {
                String::new()
            } else {
                format!(" [{} failed]", s.failures.len())
            };
            println!(
                "{name:<6} {:<36} {mr:>12} {mt:>12} {br:>12} {bt:>12}  {ratio}{fails}",
                s.label
            );
        };
        row(ours, String::new());
        for t in theirs {
            let ratio = match (ours.median(), t.median()) {
                (Some(o), Some(th)) => {
                    if t.label.starts_with("ours") {
                        format!("time {:.2}x: userfaultfd + stage2 pager over KVM alone, same guest (information)", o.secs / th.secs)
                    } else if name == "4K" {
                        let r = o.pages_per_sec / th.pages_per_sec;
                        format!(
                            "rate {r:.2}x (goal >= {GOAL_4K_RATE:.1}x: {})",
                            if r >= GOAL_4K_RATE { "MET" } else { "NOT MET" }
                        )
                    } else if t.label.contains("no uffd") {
                        let r = o.secs / th.secs;
                        format!(
                            "time {r:.2}x (goal <= {GOAL_2M_TIME:.1}x: {})",
                            if r <= GOAL_2M_TIME { "MET" } else { "NOT MET" }
                        )
                    } else {
                        format!(
                            "time {:.2}x, rate {:.2}x (information)",
                            o.secs / th.secs,
                            o.pages_per_sec / th.pages_per_sec
                        )
                    }
                }
                _ => "-".into(),
            };
            row(t, ratio);
        }
    }
    Ok(())
}
