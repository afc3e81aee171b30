//! `migrate-demo`: the live-migration demo of issue 5 in one command. A `dirty` guest writes
//! continuously in one `vmm`, moves to a second `vmm` over loopback TCP, and the destination
//! verifies every page and prints PASS; the demo writes a JSON summary and an SVG plot of
//! dirty pages and bytes sent per round.
//!
//! ```text
//! cargo build --release -p vmm -p tools
//! target/release/migrate-demo                      # 4 GiB, 4 vCPUs, precopy over KVM's bitmap
//! target/release/migrate-demo --mode postcopy --dirty-rate 200 --out /tmp/demo
//! ```
//!
//! Files in `--out`: `summary.json` (result, times, bytes, rounds), `rounds.svg`,
//! `migration.json` (the source's `--migrate-json`), `source.log`, `destination.log`.
//! Exits 0 only when the destination printed PASS.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

mod plot;
mod vmm;

use plot::{plot, rounds_of, MB, PAGE_BYTES};
use vmm::{probe, Vmm, VmmFeatures};

/// The migration demo: a writing `dirty` guest moves between two vmm processes and is
/// verified page by page on arrival.
#[derive(Parser, Debug, Clone)]
#[command(name = "migrate-demo", version, about)]
struct Cli {
    /// Guest RAM (K, M or G suffix), the same on both sides.
    #[arg(long, default_value = "4G")]
    mem: String,
    /// vCPUs of the guest, the same on both sides.
    #[arg(long, default_value_t = 4)]
    cpus: u8,
    /// precopy: rounds until the downtime fits, then the last round paused; postcopy: the
    /// guest moves after --postcopy-after rounds and pulls the rest on demand.
    #[arg(long, value_enum, default_value_t = ModeArg::Precopy)]
    mode: ModeArg,
    /// Rounds before the switch to postcopy (1 = right after the full pass).
    #[arg(long, value_name = "N", default_value_t = 1)]
    postcopy_after: u32,
    /// How the source finds the pages written between rounds.
    #[arg(long, value_enum, default_value_t = DirtyModeArg::KvmBitmap)]
    dirty_mode: DirtyModeArg,
    /// The guest's dirty rate in MB/s over all vCPUs (0 = as fast as it writes).
    #[arg(long, value_name = "MB_PER_S", default_value_t = 0)]
    dirty_rate: u64,
    /// Seconds the guest writes on the source before the migration starts.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    warmup: f64,
    /// Seconds the guest keeps writing on the destination before it is stopped and verified.
    #[arg(long, value_name = "SECONDS", default_value_t = 2)]
    run_after: u64,
    /// Precopy's downtime goal (vmm --downtime-ms).
    #[arg(long, value_name = "MS", default_value_t = 300)]
    downtime_ms: u64,
    /// Backing of guest RAM on both sides (vmm --hugepages: auto, 2M, 1G, thp, none); the
    /// vmm's default when not given.
    #[arg(long, value_name = "KIND")]
    hugepages: Option<String>,
    /// Loopback TCP port of the destination (default: a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Directory for the summary, plot, migration figures and both logs.
    #[arg(long, value_name = "DIR", default_value = "target/migrate-demo")]
    out: PathBuf,
    /// The vmm binary (default: `vmm` next to this program, i.e. target/release/vmm).
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// Give up (and stop both vmm processes) after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    timeout: u64,
    /// Do not echo the two vmm processes' output (it still goes to the logs).
    #[arg(long)]
    quiet: bool,
    /// Pause the source's guest after the warm-up, before the migration starts: the
    /// migration then measures the stream alone, with no vCPU competing for the host's
    /// cores and nothing dirtied between rounds.
    #[arg(long)]
    pause_first: bool,
    /// Let a destination without demand paging (precopy) fault its RAM in as pages arrive,
    /// instead of populating it (vmm --prefault) before it listens.
    #[arg(long)]
    no_prefault: bool,
    /// Connections the migration spreads its precopy rounds over (vmm
    /// --migrate-connections).
    #[arg(long, value_name = "N", default_value_t = 1)]
    connections: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Precopy,
    Postcopy,
}

impl ModeArg {
    fn name(self) -> &'static str {
        match self {
            ModeArg::Precopy => "precopy",
            ModeArg::Postcopy => "postcopy",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DirtyModeArg {
    KvmBitmap,
    KvmRing,
    Stage2Wp,
}

impl DirtyModeArg {
    fn name(self) -> &'static str {
        match self {
            DirtyModeArg::KvmBitmap => "kvm-bitmap",
            DirtyModeArg::KvmRing => "kvm-ring",
            DirtyModeArg::Stage2Wp => "stage2-wp",
        }
    }
}

/// The line a `vmm --incoming` prints once it listens.
const LISTENING: &str = "waiting for the migration source";
/// The line a `vmm --guest` prints once its vCPUs are set up.
const GUEST_STARTED: &str = "guest dirty on";
/// The line a `vmm --run-for` logs when it sets the guest's stop flag.
const STOP_FLAG_SET: &str = "setting the guest's stop flag";
/// How long a vmm may take to reach a line it prints at start (allocating a large guest
/// and, on the destination, binding the port).
const START_LIMIT: Duration = Duration::from_secs(120);

/// The vmm binary: `--vmm`, else `vmm` next to this program.
fn vmm_path(cli: &Cli) -> Result<PathBuf> {
    let path = match &cli.vmm {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating this program")?
            .parent()
            .context("this program has no directory")?
            .join("vmm"),
    };
    if !path.is_file() {
        bail!(
            "no vmm binary at {}: build it with `cargo build --release -p vmm` (or give --vmm PATH)",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port, or `--port` if it is free.
fn pick_port(port: Option<u16>) -> Result<u16> {
    match port {
        Some(p) => match TcpListener::bind(("127.0.0.1", p)) {
            Ok(_) => Ok(p),
            Err(e) => bail!(
                "port {p} on 127.0.0.1 is busy ({e}): give another with --port, or leave --port \
                 out to use a free one"
            ),
        },
        None => Ok(TcpListener::bind("127.0.0.1:0")
            .context("finding a free loopback port")?
            .local_addr()?
            .port()),
    }
}

/// One JSON-lines request on the vmm control socket, waiting up to `limit` for the answer.
fn api_request(sock: &Path, req: &Value, limit: Duration) -> Result<Value> {
    let mut s = UnixStream::connect(sock).with_context(|| {
        format!(
            "connecting to the source's control socket {}",
            sock.display()
        )
    })?;
    s.set_read_timeout(Some(limit))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .context("waiting for the source's answer to migrate")?;
    serde_json::from_str(&line).with_context(|| format!("the source answered {line:?}"))
}

/// Options both vmm processes get.
fn guest_args(cli: &Cli, feat: &VmmFeatures) -> Vec<String> {
    let mut a: Vec<String> = [
        "--guest",
        "dirty",
        "--mem",
        &cli.mem,
        "--cpus",
        &cli.cpus.to_string(),
        "--generations",
        "0",
        "--log-level",
        "info",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(h) = &cli.hugepages {
        a.extend(["--hugepages".into(), h.clone()]);
    }
    if feat.dirty_rate {
        a.extend(["--dirty-rate".into(), cli.dirty_rate.to_string()]);
    }
    a
}

fn check_features(cli: &Cli, vmm: &Path, feat: &VmmFeatures) -> Result<()> {
    let rebuild = format!(
        "rebuild it (`cargo build --release -p vmm`) or give a newer one with --vmm ({})",
        vmm.display()
    );
    if !feat.migrate_json {
        bail!("this vmm has no --migrate-json, which the demo reads its figures from: {rebuild}");
    }
    if cli.mode == ModeArg::Postcopy && !feat.postcopy {
        bail!("this vmm has no postcopy (--postcopy-after): {rebuild}, or use --mode precopy");
    }
    if cli.dirty_mode != DirtyModeArg::KvmBitmap && !feat.dirty_mode {
        bail!("this vmm has no --dirty-mode: {rebuild}, or use --dirty-mode kvm-bitmap");
    }
    if cli.dirty_rate != 0 && !feat.dirty_rate {
        bail!("this vmm has no --dirty-rate: {rebuild}, or drop --dirty-rate");
    }
    Ok(())
}

/// Everything the demo learnt from one run.
struct Outcome {
    passed: bool,
    reason: Option<String>,
    figures: Option<Value>,
    dst_code: Option<i32>,
    src_code: Option<i32>,
    wall: Duration,
    /// Page writes the guest made in all (from the destination's `--stats-json`).
    guest_writes: Option<u64>,
    /// Source guest start to the destination's stop flag: the time those writes took.
    guest_secs: f64,
}

fn run(cli: &Cli) -> Result<Outcome> {
    let vmm = vmm_path(cli)?;
    let feat = probe(&vmm)?;
    check_features(cli, &vmm, &feat)?;
    let migration_json = cli.out.join("migration.json");
    let _ = std::fs::remove_file(&migration_json);
    let dst_stats = cli.out.join("destination-stats.json");
    let _ = std::fs::remove_file(&dst_stats);
    let port = pick_port(cli.port)?;
    let addr = format!("tcp:127.0.0.1:{port}");
    let sock = std::env::temp_dir().join(format!("migrate-demo-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let limit = Duration::from_secs(cli.timeout);
    let started = Instant::now();
    let common = guest_args(cli, &feat);
    let old = feat.migration_needs_no_demand_paging;
    // Demand paging where the migration needs it (the postcopy destination pulls missing
    // pages through it; stage2-wp tracks writes through it), else KVM populates RAM itself.
    let src_dp = !old && cli.dirty_mode == DirtyModeArg::Stage2Wp;
    let dst_dp = !old && cli.mode == ModeArg::Postcopy;

    let prefault = !dst_dp && feat.prefault && !cli.no_prefault;
    let mut dst = start_destination(
        cli, &vmm, &common, &addr, port, &dst_stats, dst_dp, prefault,
    )?;
    let (mut src, guest_started) =
        start_source(cli, &vmm, &common, &sock, &migration_json, &feat, src_dp)?;
    println!(
        "migrate-demo: the guest writes on the source for {:.1} s, then migrates ({}, {}) to {addr}",
        cli.warmup,
        cli.mode.name(),
        cli.dirty_mode.name()
    );
    std::thread::sleep(Duration::from_secs_f64(cli.warmup.max(0.0)));
    if let Some(st) = src.child.try_wait()? {
        bail!(
            "the source vmm exited ({st}) during the warm-up; its last lines:\n{}",
            src.last_lines()
        );
    }
    if cli.pause_first {
        let v = api_request(&sock, &json!({"cmd": "pause"}), limit)
            .context("pausing the source's guest (--pause-first)")?;
        if v["ok"] != true {
            bail!(
                "the source refused to pause its guest (--pause-first): {}",
                v["error"].as_str().unwrap_or("no reason given")
            );
        }
        println!("migrate-demo: the source's guest is paused (--pause-first)");
    }
    let mut req = json!({"cmd": "migrate", "to": addr});
    if cli.mode == ModeArg::Postcopy {
        req["postcopy_after"] = json!(cli.postcopy_after);
    }
    let answer = api_request(&sock, &req, limit);
    let mut reason = None;
    let mut figures = None;
    match &answer {
        Ok(v) if v["ok"] == true => figures = Some(v["migrate"].clone()),
        Ok(v) => {
            reason = Some(format!(
                "the source refused or failed the migration: {}",
                v["error"].as_str().unwrap_or("no reason given")
            ))
        }
        Err(e) => reason = Some(format!("asking the source to migrate: {e:#}")),
    }
    // The destination runs --run-after seconds, stops the guest and verifies every page.
    let left = limit.saturating_sub(started.elapsed());
    let dst_code = dst.wait_exit(left)?;
    // The guest writes until the destination sets its stop flag (and one generation more);
    // the replay check after that is not writing time.
    let guest_stopped = dst
        .line_time(|l| l.contains(STOP_FLAG_SET))
        .unwrap_or_else(Instant::now);
    let guest_secs = (guest_stopped - guest_started).as_secs_f64();
    let src_code = src.wait_exit(Duration::from_secs(30))?;
    // The file the source wrote is the reference; the control socket's answer carries the
    // same figures if the file is missing.
    if let Ok(text) = std::fs::read_to_string(&migration_json) {
        figures = Some(serde_json::from_str(&text).context("parsing the source's --migrate-json")?);
    }
    let passed = dst_code == Some(0) && dst.has_line(|l| l.trim() == "PASS");
    if let (Some(r), false) = (&mut reason, passed) {
        r.push_str(&format!(
            "\nthe destination's last lines:\n{}",
            dst.last_lines()
        ));
    }
    if !passed && reason.is_none() {
        reason = Some(match dst_code {
            None => format!(
                "the destination did not finish within --timeout {} s; its last lines:\n{}",
                cli.timeout,
                dst.last_lines()
            ),
            Some(c) => format!(
                "the destination exited {c} without PASS; its last lines:\n{}",
                dst.last_lines()
            ),
        });
    }
    let _ = std::fs::remove_file(&sock);
    Ok(Outcome {
        passed,
        reason,
        figures,
        dst_code,
        src_code,
        wall: started.elapsed(),
        guest_writes: guest_writes(&dst_stats),
        guest_secs,
    })
}

/// Starts `vmm --incoming` and waits until it listens.
#[allow(clippy::too_many_arguments)]
fn start_destination(
    cli: &Cli,
    vmm: &Path,
    common: &[String],
    addr: &str,
    port: u16,
    stats: &Path,
    demand_paging: bool,
    prefault: bool,
) -> Result<Vmm> {
    let mut dst_cmd = Command::new(vmm);
    dst_cmd
        .args(common)
        .args(["--incoming", addr, "--run-for", &cli.run_after.to_string()])
        .arg("--stats-json")
        .arg(stats);
    if !demand_paging {
        dst_cmd.arg("--no-demand-paging");
    }
    if prefault {
        // Like a production destination started ahead of the migration with its memory
        // preallocated (QEMU -mem-prealloc): the page faults are paid before it listens.
        dst_cmd.arg("--prefault");
    }
    println!(
        "migrate-demo: destination: {} {}",
        vmm.display(),
        args_of(&dst_cmd)
    );
    let mut dst = Vmm::spawn(
        "dst",
        &mut dst_cmd,
        &cli.out.join("destination.log"),
        !cli.quiet,
    )?;
    if let Err(e) = dst.wait_line(LISTENING, START_LIMIT) {
        if dst.has_line(|l| l.contains("in use")) {
            bail!("port {port} on 127.0.0.1 is busy: give another with --port ({e})");
        }
        return Err(e);
    }
    Ok(dst)
}

/// Starts the source with its control socket and `--migrate-json`; returns it and when its
/// guest started.
fn start_source(
    cli: &Cli,
    vmm: &Path,
    common: &[String],
    sock: &Path,
    migration_json: &Path,
    feat: &VmmFeatures,
    demand_paging: bool,
) -> Result<(Vmm, Instant)> {
    let mut src_cmd = Command::new(vmm);
    src_cmd.args(common).args([
        "--api-socket",
        &sock.to_string_lossy(),
        "--migrate-json",
        &migration_json.to_string_lossy(),
        "--downtime-ms",
        &cli.downtime_ms.to_string(),
    ]);
    if feat.dirty_mode {
        src_cmd.args(["--dirty-mode", cli.dirty_mode.name()]);
    }
    if !demand_paging {
        src_cmd.arg("--no-demand-paging");
    }
    if cli.connections > 1 {
        src_cmd.args(["--migrate-connections", &cli.connections.to_string()]);
    }
    println!(
        "migrate-demo: source: {} {}",
        vmm.display(),
        args_of(&src_cmd)
    );
    let mut src = Vmm::spawn("src", &mut src_cmd, &cli.out.join("source.log"), !cli.quiet)?;
    src.wait_line(GUEST_STARTED, START_LIMIT)
        .context("the source did not start its guest")?;
    let guest_started = Instant::now();
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > START_LIMIT {
            bail!(
                "the source never opened its control socket {}",
                sock.display()
            );
        }
        if let Some(st) = src.child.try_wait()? {
            bail!(
                "the source vmm exited ({st}) during start-up; its last lines:\n{}",
                src.last_lines()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((src, guest_started))
}

/// All vCPUs' page writes in a `vmm --stats-json` file (counted from the guest's start on
/// the source: the counters migrate with guest memory).
fn guest_writes(stats: &Path) -> Option<u64> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(stats).ok()?).ok()?;
    v["vcpus"]
        .as_array()?
        .iter()
        .map(|c| c["writes"].as_u64())
        .sum()
}

fn args_of(cmd: &Command) -> String {
    cmd.get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The summary document (`summary.json`).
fn summary(cli: &Cli, out: &Outcome) -> Value {
    let f = out.figures.clone().unwrap_or(Value::Null);
    let rounds = rounds_of(&f);
    json!({
        "result": if out.passed { "PASS" } else { "FAIL" },
        "reason": out.reason,
        "mode": f["mode"].as_str().unwrap_or(cli.mode.name()),
        "dirty_mode": f["dirty_mode"].as_str().unwrap_or(cli.dirty_mode.name()),
        "dirty_rate_mb_s": cli.dirty_rate,
        "mem": cli.mem,
        "ram_bytes": f["ram_bytes"],
        "vcpus": cli.cpus,
        "warmup_s": cli.warmup,
        "total_ms": f["total_ms"],
        "downtime_ms": f["downtime_ms"],
        "bytes_sent": f["bytes_sent"],
        "connections": cli.connections,
        "connection_bytes": f["connection_bytes"],
        "rounds": rounds.len(),
        "per_round": rounds.iter().map(|r| json!({
            "round": r.round, "dirty_pages": r.dirty_pages, "bytes": r.bytes, "ms": r.ms,
        })).collect::<Vec<_>>(),
        "postcopy": f["postcopy"],
        "destination_exit": out.dst_code,
        "source_exit": out.src_code,
        "guest_writes": out.guest_writes,
        // Average over warm-up, migration and --run-after: the downtime (no writes) is in
        // the time, and the writes of the generation under way at the stop flag are counted.
        "guest_write_rate_mb_s": out.guest_writes.map(|w| w as f64 * PAGE_BYTES / MB / out.guest_secs.max(1e-9)),
        "demo_wall_s": out.wall.as_secs_f64(),
        "files": {
            "plot": "rounds.svg",
            "migration_json": "migration.json",
            "source_log": "source.log",
            "destination_log": "destination.log",
            "destination_stats": "destination-stats.json",
        },
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = std::fs::create_dir_all(&cli.out) {
        eprintln!(
            "migrate-demo: error: creating --out {}: {e}",
            cli.out.display()
        );
        return ExitCode::FAILURE;
    }
    // Nothing of an earlier run in --out may pass for this one's.
    for f in ["summary.json", "rounds.svg"] {
        let _ = std::fs::remove_file(cli.out.join(f));
    }
    let started = Instant::now();
    let out = match run(&cli) {
        Ok(o) => o,
        Err(e) => {
            // Still write a summary that says FAIL and why (migrate-bench reads it).
            let out = Outcome {
                passed: false,
                reason: Some(format!("{e:#}")),
                figures: None,
                dst_code: None,
                src_code: None,
                wall: started.elapsed(),
                guest_writes: None,
                guest_secs: 0.0,
            };
            let text = serde_json::to_string_pretty(&summary(&cli, &out)).expect("plain JSON");
            let _ = std::fs::write(cli.out.join("summary.json"), text + "\n");
            eprintln!("migrate-demo: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let doc = summary(&cli, &out);
    let rounds = out.figures.as_ref().map(rounds_of).unwrap_or_default();
    let summary_path = cli.out.join("summary.json");
    let plot_path = cli.out.join("rounds.svg");
    let title = format!(
        "{} over {}, {} / {} vCPUs{}: downtime {:.0} ms, total {:.2} s",
        doc["mode"].as_str().unwrap_or("?"),
        doc["dirty_mode"].as_str().unwrap_or("?"),
        cli.mem,
        cli.cpus,
        match cli.dirty_rate {
            0 => String::new(),
            r => format!(" at {r} MB/s"),
        },
        doc["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        doc["total_ms"].as_f64().unwrap_or(f64::NAN) / 1e3,
    );
    let mut ok = out.passed;
    let text = serde_json::to_string_pretty(&doc).expect("plain JSON") + "\n";
    if let Err(e) = std::fs::write(&summary_path, text) {
        eprintln!(
            "migrate-demo: error: writing {}: {e}",
            summary_path.display()
        );
        ok = false;
    }
    if rounds.is_empty() {
        eprintln!("migrate-demo: no per-round figures, so no plot");
    } else if let Err(e) = plot(&plot_path, &title, &rounds) {
        eprintln!("migrate-demo: error: {e:#}");
        ok = false;
    }
    println!("migrate-demo: {title}");
    println!(
        "migrate-demo: {} rounds, {:.1} MB sent; summary {}, plot {}",
        rounds.len(),
        doc["bytes_sent"].as_f64().unwrap_or(0.0) / MB,
        summary_path.display(),
        plot_path.display()
    );
    match &out.reason {
        None if ok => {
            println!("migrate-demo: PASS: the destination verified every page");
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
        Some(r) => {
            eprintln!("migrate-demo: FAIL: {r}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_port_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        let e = pick_port(Some(p)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("port {p}")) && e.contains("busy"),
            "{e}"
        );
    }
}
