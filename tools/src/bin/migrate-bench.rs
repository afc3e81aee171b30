//! `migrate-bench`: issue 5's migration benchmark in one invocation. Measures the loopback
//! bandwidth of a plain TCP socket copy, then migrates a `dirty` guest with `migrate-demo`
//! (precopy at an idle, a 1/8-bandwidth and a 1/4-bandwidth dirty rate, precopy of a paused
//! guest, which measures the stream alone, and postcopy unpaced, also on 4 KiB pages and THP)
//! and prints, per run, downtime, total time, bytes sent, the bound bytes / bandwidth, the
//! ratio total / bound and whether the issue's goals hold. The paused run is repeated over
//! 2 and 4 connections (`--connections`, vmm --migrate-connections); a second table gives
//! their stream rates side by side and a model of a bigger host (`--model-cores`,
//! `--model-link-gbit`): the one-connection rate, measured with a core at each end, times
//! the connections, capped by the link.
//!
//! ```text
//! cargo build --release -p vmm -p tools
//! target/release/migrate-bench            # 4 GiB, 4 vCPUs (what BENCHMARKS.md records)
//! target/release/migrate-bench --quick    # 1 GiB, 2 vCPUs, for development
//! target/release/migrate-bench --connections-only   # the connections table alone
//! ```
//!
//! Goals (issue 5): downtime <= 300 ms for precopy whenever the guest dirties at most a
//! quarter of the bandwidth, and for postcopy at any rate; total time <= 1.2 x the bound.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::Value;

/// Migration benchmark: loopback bandwidth, then precopy at three dirty rates and postcopy.
#[derive(Parser, Debug)]
#[command(name = "migrate-bench", version, about)]
struct Cli {
    /// 1 GiB and 2 vCPUs instead of 4 GiB and 4 (development runs).
    #[arg(long)]
    quick: bool,
    /// Guest RAM (overrides the size --quick or the default picks).
    #[arg(long)]
    mem: Option<String>,
    /// vCPUs (overrides --quick or the default).
    #[arg(long)]
    cpus: Option<u8>,
    /// Bytes each bandwidth repetition copies through the socket (M or G suffix).
    #[arg(long, default_value = "2G")]
    copy: String,
    /// Buffer of the socket copy, bytes (K or M suffix).
    #[arg(long, default_value = "1M")]
    buffer: String,
    /// Bandwidth repetitions (the best counts).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Dirty rate of the "idle" precopy run, MB/s (pacing needs a rate above 0; this is low
    /// enough to be idle next to any bandwidth).
    #[arg(long, default_value_t = 1)]
    idle_rate: u64,
    /// Seconds the guest writes before each migration.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Backing of guest RAM (vmm --hugepages); THP by default so that two 4 GiB guests do
    /// not take the shared 2 MiB hugetlb pool.
    #[arg(long, default_value = "thp")]
    hugepages: String,
    /// Postcopy runs on more backings, after the one on --hugepages: comma-separated vmm
    /// --hugepages kinds (4 KiB pages and THP by default, where the switch has the most
    /// stale pages to drop); `--postcopy-also ''` for none.
    #[arg(
        long,
        value_name = "KINDS",
        value_delimiter = ',',
        default_value = "none,thp"
    )]
    postcopy_also: Vec<String>,
    /// The migrate-demo binary (default: next to this program).
    #[arg(long, value_name = "PATH")]
    demo: Option<PathBuf>,
    /// The vmm binary (default: next to this program).
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// Directory for each run's summary, plot and logs.
    #[arg(long, default_value = "target/migrate-bench")]
    out: PathBuf,
    /// Connection counts of the stream-alone run (vmm --migrate-connections), side by side:
    /// the paused precopy runs once per count.
    #[arg(
        long,
        value_name = "N,...",
        value_delimiter = ',',
        default_value = "1,2,4"
    )]
    connections: Vec<u32>,
    /// Only the stream-alone runs over --connections (no dirty-rate or postcopy runs).
    #[arg(long)]
    connections_only: bool,
    /// Cores of the host the connections model is for.
    #[arg(long, default_value_t = 16)]
    model_cores: u32,
    /// Link of the host the connections model is for, Gbit/s.
    #[arg(long, default_value_t = 25.0)]
    model_link_gbit: f64,
}

/// The downtime goal of issue 5, milliseconds.
const DOWNTIME_GOAL_MS: f64 = 300.0;
/// The total-time goal of issue 5: at most this times the bytes-over-bandwidth bound.
const TOTAL_GOAL_RATIO: f64 = 1.2;
/// Decimal MB, as the vmm's progress lines and `--dirty-rate` count.
const MB: f64 = 1e6;

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("size {s:?}: a number with an optional K, M or G suffix"))?;
    n.checked_mul(mul)
        .with_context(|| format!("size {s:?} is too large"))
}

/// Copies `total` bytes through a loopback TCP connection in `buf`-sized writes; returns
/// bytes per second, from the first write to the reader's last byte.
fn socket_copy(total: u64, buf: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback socket")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Instant)> {
        let (mut s, _) = listener.accept()?;
        let mut b = vec![0u8; buf];
        let mut got = 0u64;
        loop {
            match s.read(&mut b)? {
                0 => return Ok((got, Instant::now())),
                n => got += n as u64,
            }
        }
    });
    let mut s = TcpStream::connect(addr).context("connecting over loopback")?;
    let data = vec![0x5au8; buf];
    let t0 = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(buf as u64) as usize;
        s.write_all(&data[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let (got, end) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the socket reader panicked"))??;
    if got != total {
        bail!("the loopback copy lost bytes: sent {total}, received {got}");
    }
    Ok(total as f64 / (end - t0).as_secs_f64())
}

fn sibling(name: &str, given: &Option<PathBuf>) -> Result<PathBuf> {
    let p = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program has no directory")?
            .join(name),
    };
    if !p.is_file() {
        bail!(
            "no {name} binary at {}: build it with `cargo build --release -p vmm -p tools`",
            p.display()
        );
    }
    Ok(p)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// One migration to run.
struct Case {
    name: String,
    mode: &'static str,
    rate_mb_s: u64,
    /// What the rate is, for the table.
    rate_label: String,
    /// The downtime goal applies (precopy at <= 1/4 bandwidth; postcopy always).
    downtime_goal: bool,
    /// Pause the guest before migrating (migrate-demo --pause-first).
    paused: bool,
    /// Backing of guest RAM when not the one of --hugepages.
    backing: Option<String>,
    /// Connections of the migration (migrate-demo --connections).
    connections: u32,
}

/// What one migration gave.
struct Result1 {
    case: Case,
    passed: bool,
    summary: Option<Value>,
    note: String,
}

fn run_case(cli: &Cli, demo: &Path, vmm: &Path, mem: &str, cpus: u8, c: Case) -> Result1 {
    let out = cli.out.join(&c.name);
    let mut cmd = Command::new(demo);
    cmd.args([
        "--mem",
        mem,
        "--cpus",
        &cpus.to_string(),
        "--mode",
        c.mode,
        "--dirty-rate",
        &c.rate_mb_s.to_string(),
        "--warmup",
        &cli.warmup.to_string(),
        "--run-after",
        "1",
        "--hugepages",
        c.backing.as_deref().unwrap_or(&cli.hugepages),
        "--quiet",
        "--out",
    ])
    .arg(&out)
    .arg("--vmm")
    .arg(vmm)
    .args(c.paused.then_some("--pause-first"))
    .args(["--connections", &c.connections.to_string()])
    .stdout(Stdio::inherit())
    .stderr(Stdio::inherit());
    println!("\n== {} ({}, {})", c.name, c.mode, c.rate_label);
    let status = cmd.status();
    let summary = std::fs::read_to_string(out.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let (passed, note) = match status {
        Ok(st) if st.success() => (true, String::new()),
        Ok(st) => (false, format!("migrate-demo {st}")),
        Err(e) => (false, format!("running migrate-demo: {e}")),
    };
    Result1 {
        case: c,
        passed,
        summary,
        note,
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("migrate-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    let cli = Cli::parse();
    let (mem, cpus) = match cli.quick {
        true => ("1G".to_string(), 2u8),
        false => ("4G".to_string(), 4u8),
    };
    let mem = cli.mem.clone().unwrap_or(mem);
    let cpus = cli.cpus.unwrap_or(cpus);
    let demo = sibling("migrate-demo", &cli.demo)?;
    let vmm = sibling("vmm", &cli.vmm)?;
    let copy = parse_size(&cli.copy)?;
    let buf = parse_size(&cli.buffer)? as usize;
    if buf == 0 || copy == 0 {
        bail!("--copy and --buffer must be above 0");
    }
    let load_before = load_average();
    println!("migrate-bench: load average {load_before} (1, 5, 15 min) at start");
    println!(
        "loopback bandwidth: {} through a {} buffer, best of {}",
        cli.copy, cli.buffer, cli.reps
    );
    let mut best = 0.0f64;
    for i in 0..cli.reps.max(1) {
        let bw = socket_copy(copy, buf)?;
        println!("  copy {}: {:.0} MB/s", i + 1, bw / MB);
        best = best.max(bw);
    }
    let bw_mb = best / MB;
    println!("  best: {bw_mb:.0} MB/s");

    let help = Command::new(&vmm).arg("--help").output()?;
    let has_postcopy = String::from_utf8_lossy(&help.stdout).contains("--postcopy-after");
    let eighth = (bw_mb / 8.0).round() as u64;
    let quarter = (bw_mb / 4.0).round() as u64;
    let mut cases = vec![
        Case {
            name: "precopy-idle".into(),
            mode: "precopy",
            rate_mb_s: cli.idle_rate,
            rate_label: format!("idle: {} MB/s", cli.idle_rate),
            downtime_goal: true,
            paused: false,
            backing: None,
            connections: 1,
        },
        Case {
            name: "precopy-eighth".into(),
            mode: "precopy",
            rate_mb_s: eighth,
            rate_label: format!("1/8 bandwidth: {eighth} MB/s"),
            downtime_goal: true,
            paused: false,
            backing: None,
            connections: 1,
        },
        Case {
            name: "precopy-quarter".into(),
            mode: "precopy",
            rate_mb_s: quarter,
            rate_label: format!("1/4 bandwidth: {quarter} MB/s"),
            downtime_goal: true,
            paused: false,
            backing: None,
            connections: 1,
        },
        // The stream alone: the guest writes unpaced through the warm-up (most of RAM is
        // data), then is paused, so the migration has both cores and one round.
        Case {
            name: "precopy-paused".into(),
            mode: "precopy",
            rate_mb_s: 0,
            rate_label: "paused (guest wrote unpaced before)".into(),
            downtime_goal: false,
            paused: true,
            backing: None,
            connections: 1,
        },
    ];
    if cli.connections_only {
        cases.retain(|c| c.paused);
    }
    // The stream alone over more connections, right after the one-connection run.
    for &n in cli.connections.iter().filter(|&&n| n > 1) {
        cases.push(Case {
            name: format!("precopy-paused-c{n}"),
            mode: "precopy",
            rate_mb_s: 0,
            rate_label: format!("paused, {n} connections"),
            downtime_goal: false,
            paused: true,
            backing: None,
            connections: n,
        });
    }
    let mut skipped = Vec::new();
    if has_postcopy && !cli.connections_only {
        cases.push(Case {
            name: "postcopy-unlimited".into(),
            mode: "postcopy",
            rate_mb_s: 0,
            rate_label: "unlimited".into(),
            downtime_goal: true,
            paused: false,
            backing: None,
            connections: 1,
        });
        for kind in cli
            .postcopy_also
            .iter()
            .filter(|k| !k.is_empty() && **k != cli.hugepages)
        {
            cases.push(Case {
                name: format!("postcopy-unlimited-{kind}"),
                mode: "postcopy",
                rate_mb_s: 0,
                rate_label: format!("unlimited, --hugepages {kind}"),
                downtime_goal: true,
                paused: false,
                backing: Some(kind.clone()),
                connections: 1,
            });
        }
    } else if !has_postcopy {
        skipped.push(format!(
            "postcopy skipped: {} has no --postcopy-after yet",
            vmm.display()
        ));
    }
    let results: Vec<Result1> = cases
        .into_iter()
        .map(|c| run_case(&cli, &demo, &vmm, &mem, cpus, c))
        .collect();
    let load_after = load_average();

    let mut all_ok = true;
    let mut table = vec![
        format!(
            "`migrate-bench{}` — {mem} / {cpus} vCPUs, --hugepages {}, loopback {bw_mb:.0} MB/s \
             ({} copy, {} buffer, best of {}); load average {load_before} at start, \
             {load_after} at end",
            if cli.quick { " --quick" } else { "" },
            cli.hugepages,
            cli.copy,
            cli.buffer,
            cli.reps
        ),
        String::new(),
        "| run | dirty rate | guest wrote | rounds | downtime | total | bytes sent | bound | total/bound | goals |".into(),
        "|---|---|---|---|---|---|---|---|---|---|".into(),
    ];
    for r in &results {
        let Some(s) = r.summary.as_ref().filter(|s| s["total_ms"].is_number()) else {
            all_ok = false;
            table.push(format!(
                "| {} | {} | | | | | | | | FAILED: {} |",
                r.case.name, r.case.rate_label, r.note
            ));
            continue;
        };
        let down = s["downtime_ms"].as_f64().unwrap_or(f64::NAN);
        let total = s["total_ms"].as_f64().unwrap_or(f64::NAN) / 1e3;
        let bytes = s["bytes_sent"].as_f64().unwrap_or(f64::NAN);
        let bound = bytes / best;
        let ratio = total / bound;
        let down_ok = !r.case.downtime_goal || down <= DOWNTIME_GOAL_MS;
        let total_ok = ratio <= TOTAL_GOAL_RATIO;
        let mut goals = vec![
            format!("downtime {}", if down_ok { "ok" } else { "MISSED" }),
            format!("total {}", if total_ok { "ok" } else { "MISSED" }),
        ];
        if !r.passed {
            goals.push(format!("FAIL: {}", r.note));
        }
        all_ok &= r.passed;
        table.push(format!(
            "| {} | {} | {} | {} | {down:.0} ms | {total:.2} s | {:.0} MB | {bound:.2} s | {ratio:.2} | {} |",
            r.case.name,
            r.case.rate_label,
            s["guest_write_rate_mb_s"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0} MB/s")),
            s["rounds"],
            bytes / MB,
            goals.join(", ")
        ));
    }
    table.extend(connections_table(&cli, &results, best));
    for s in &skipped {
        table.push(String::new());
        table.push(s.clone());
    }
    let text = table.join("\n") + "\n";
    println!("\n{text}");
    std::fs::create_dir_all(&cli.out)?;
    let md = cli.out.join("bench.md");
    std::fs::write(&md, &text).with_context(|| format!("writing {}", md.display()))?;
    println!("(also in {})", md.display());
    Ok(all_ok)
}

/// Stream rate of a run: bytes sent over its total time, MB/s.
fn stream_rate(s: &Value) -> Option<f64> {
    let ms = s["total_ms"].as_f64()?;
    Some(s["bytes_sent"].as_f64()? / (ms / 1e3) / MB)
}

/// What `n` connections give on a host of `cores` cores and a `link_mb_s` link, when one
/// connection moves `per_core` MB/s with a core at each end: one core per connection at each
/// end, the link the cap.
fn model_rate(per_core: f64, n: u32, cores: u32, link_mb_s: f64) -> f64 {
    (per_core * n.min(cores) as f64).min(link_mb_s)
}

/// The stream-alone runs by connection count (ratio to one connection, side by side in this
/// run), and the model of a bigger host built from the one-connection rate.
fn connections_table(cli: &Cli, results: &[Result1], loopback: f64) -> Vec<String> {
    // A run whose guest had not written most of its RAM by the pause sends zero runs only:
    // no measure of the stream.
    let paused: Vec<(u32, f64)> = results
        .iter()
        .filter(|r| r.case.paused && r.passed)
        .filter_map(|r| {
            let s = r.summary.as_ref()?;
            let full = s["bytes_sent"].as_f64()? >= s["ram_bytes"].as_f64()? / 2.0;
            Some((r.case.connections, stream_rate(s).filter(|_| full)?))
        })
        .collect();
    let Some(&(_, one)) = paused.iter().find(|(n, _)| *n == 1) else {
        return Vec::new();
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut t = vec![
        String::new(),
        format!(
            "Stream alone (guest paused) by connection count, on this host ({cores} cores, \
             both ends on it; loopback {:.0} MB/s):",
            loopback / MB
        ),
        String::new(),
        "| connections | stream rate | vs 1 connection |".into(),
        "|---|---|---|".into(),
    ];
    for &(n, rate) in &paused {
        t.push(format!("| {n} | {rate:.0} MB/s | {:.2} |", rate / one));
    }
    let link = cli.model_link_gbit * 1e9 / 8.0 / MB;
    t.push(String::new());
    t.push(format!(
        "Model for a host pair of {} cores and a {} Gbit/s ({link:.0} MB/s) link: one \
         connection moves {one:.0} MB/s with a core at each end (measured above: here the \
         sender and receiver threads of one connection have a core each), N connections N \
         times that, capped by the link:",
        cli.model_cores, cli.model_link_gbit
    ));
    t.push(String::new());
    t.push("| connections | expected rate | 4 GiB full pass |".into());
    t.push("|---|---|---|".into());
    let mut n = 1;
    while n <= cli.model_cores {
        let r = model_rate(one, n, cli.model_cores, link);
        t.push(format!(
            "| {n} | {r:.0} MB/s{} | {:.2} s |",
            if r >= link { " (link)" } else { "" },
            (4u64 << 30) as f64 / (r * MB)
        ));
        n *= 2;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn the_model_scales_by_connection_until_the_link() {
        assert_eq!(model_rate(1000.0, 1, 16, 3125.0), 1000.0);
        assert_eq!(model_rate(1000.0, 2, 16, 3125.0), 2000.0);
        assert_eq!(model_rate(1000.0, 4, 16, 3125.0), 3125.0);
        assert_eq!(model_rate(100.0, 32, 16, 3125.0), 1600.0);
    }

    #[test]
    fn socket_copy_moves_every_byte() {
        let bw = socket_copy(8 << 20, 64 << 10).unwrap();
        assert!(bw > 0.0);
    }
}
