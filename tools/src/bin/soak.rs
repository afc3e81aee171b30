//! `soak`: a 4-vCPU `stress` guest on the stage-2 path (demand paging through stage2) under a
//! reclaim storm of 1 GiB ranges, moved back and forth between two `vmm` processes for a given
//! time, precopy and postcopy alternating, every page checked after each move.
//!
//! ```text
//! cargo build --release -p vmm -p tools
//! target/release/soak --seconds 600
//! ```
//!
//! Two processes live for the whole soak, both `vmm --stay` with a control socket: `vm-a`
//! starts the guest, `vm-b` starts with `--incoming`. Each move tells the empty one to
//! `receive` and the running one to `migrate` there, with `--migrate-verify`: the source takes
//! a CRC of every page with the guest paused and the destination compares its RAM with them
//! before its guest runs (postcopy: the pages still owed as they arrive). The source is then
//! empty until the next move brings the guest back. Then the guest must finish the
//! write-and-verify generation it was in at the move (it reads back every page of its slice,
//! written on either side) before the next move.
//!
//! Figures: *pages verified* counts the pages the destinations compared with the source's
//! digest; *lost dirty pages* the pages that differed before the guest ran (written on the
//! source and never sent again); *mismatches* the owed pages that arrived different after a
//! postcopy switch plus a guest that found a page wrong. One progress line a minute; for each
//! process its RSS, open files and threads, running the guest and empty, at its first and its
//! last move (a process whose empty figures grew fails the soak: it leaked); the last line:
//! `soak: N moves, N pages verified, N mismatches, N lost dirty pages`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

/// Moves a stress guest back and forth between vmm processes and checks every page each time.
#[derive(Parser, Debug)]
#[command(name = "soak", version, about)]
struct Cli {
    /// How long to keep moving the guest (the move under way when it runs out finishes).
    #[arg(long)]
    seconds: u64,
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    mem: String,
    /// vCPUs.
    #[arg(long, default_value_t = 4)]
    cpus: u8,
    /// Backing of guest RAM (vmm --hugepages).
    #[arg(long, default_value = "none")]
    hugepages: String,
    /// Dirty-tracking mode of the migrations (vmm --dirty-mode).
    #[arg(long, default_value = "kvm-bitmap")]
    dirty_mode: String,
    /// Connections per migration (vmm --migrate-connections).
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// The vmm binary (default: next to this program).
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// Directory for the vmm processes' logs and control sockets.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
    /// Dirty harvests outside the migrations, every this many ms (vmm --dirty-harvest-ms);
    /// 0 for none.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    harvest_ms: u64,
    /// Give up on one move (migration, checks, the guest's generation) after this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    move_timeout: u64,
}

/// What `stats` says of a VM's guest.
#[derive(Debug, Default)]
struct GuestNow {
    /// Each vCPU's generation.
    generations: Vec<u64>,
    /// Whether a vCPU failed (read back a wrong page).
    failed: bool,
    /// Periodic dirty harvests so far (`--dirty-harvest-ms`), and the pages they found.
    harvests: u64,
    harvested: u64,
}

/// A vmm process with its control socket and log.
struct Vm {
    name: String,
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Vm {
    fn spawn(vmm: &Path, out: &Path, name: String, args: &[String]) -> Result<Vm> {
        let sock = out.join(format!("{name}.sock"));
        let log = out.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&sock);
        let mut file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        writeln!(
            file,
            "soak: {} {} --api-socket {}",
            vmm.display(),
            args.join(" "),
            sock.display()
        )?;
        let child = Command::new(vmm)
            .args(args)
            .arg("--api-socket")
            .arg(&sock)
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", vmm.display()))?;
        Ok(Vm {
            name,
            child,
            sock,
            log,
        })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log from byte `from` on.
    fn output_since(&self, from: usize) -> String {
        let out = self.output();
        out.get(from..).unwrap_or_default().to_string()
    }

    /// The log's length now: [`Vm::output_since`] it gives what comes after.
    fn log_len(&self) -> usize {
        self.output().len()
    }

    /// What `info` says of the process's state (`running`, `empty`, `receiving at ...`).
    fn state(&self) -> Result<String> {
        let v = self.ask(&json!({"cmd": "info"}), Duration::from_secs(10))?;
        Ok(v["info"]["state"].as_str().unwrap_or_default().to_string())
    }

    /// Waits until `info` says `want` (the control socket may be between owners meanwhile).
    fn wait_state(&mut self, want: &str, limit: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            if let Ok(st) = self.state() {
                if st == want {
                    return Ok(());
                }
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("{} ended ({st}):\n{}", self.name, tail(&self.output()));
            }
            if t.elapsed() > limit {
                bail!(
                    "{} was not {want} within {} s:\n{}",
                    self.name,
                    limit.as_secs(),
                    tail(&self.output())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// RSS, open files and threads of the process, each the least of a few looks 50 ms apart
    /// (a control-socket connection thread may still be on its way out).
    fn sample(&self) -> Sample {
        let pid = self.child.id();
        let count = |dir: &str| {
            std::fs::read_dir(format!("/proc/{pid}/{dir}"))
                .map(|d| d.count() as u64)
                .unwrap_or(0)
        };
        let mut best: Option<Sample> = None;
        for _ in 0..3 {
            let now = Sample {
                rss_kib: self.rss_kib(),
                fds: count("fd"),
                threads: count("task"),
            };
            best = Some(match best {
                None => now,
                Some(b) => Sample {
                    rss_kib: b.rss_kib.min(now.rss_kib),
                    fds: b.fds.min(now.fds),
                    threads: b.threads.min(now.threads),
                },
            });
            std::thread::sleep(Duration::from_millis(50));
        }
        best.unwrap_or_default()
    }

    /// Waits until `pred` holds for the log, or the process ends, or `limit` passes.
    fn wait_log(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let t = Instant::now();
        loop {
            let out = self.output();
            if pred(&out) {
                return Ok(out);
            }
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "{} ended ({st}) before {what}; its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&out)
                );
            }
            if t.elapsed() > limit {
                bail!(
                    "{} did not get to {what} within {} s; its log {}:\n{}",
                    self.name,
                    limit.as_secs(),
                    self.log.display(),
                    tail(&out)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One request on the control socket.
    fn ask(&self, req: &Value, limit: Duration) -> Result<Value> {
        let mut s = UnixStream::connect(&self.sock)
            .with_context(|| format!("connecting to {}", self.sock.display()))?;
        s.set_read_timeout(Some(limit))?;
        writeln!(s, "{req}")?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .with_context(|| format!("{}: no answer to {req}", self.name))?;
        serde_json::from_str(&line).with_context(|| format!("{}: answer {line:?}", self.name))
    }

    /// The guest's state from one `stats` request.
    fn guest(&self) -> Result<GuestNow> {
        let v = self.ask(&json!({"cmd": "stats"}), Duration::from_secs(10))?;
        let g = &v["stats"]["guest"];
        let generations = g["vcpus"]
            .as_array()
            .context("stats without the guest's report")?
            .iter()
            .map(|c| c["generation"].as_u64().unwrap_or(0))
            .collect();
        let h = &v["stats"]["dirty_harvests"];
        Ok(GuestNow {
            generations,
            failed: g["failed"].as_bool().unwrap_or(false),
            harvests: h["harvests"].as_u64().unwrap_or(0),
            harvested: h["pages"].as_u64().unwrap_or(0),
        })
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }
}

/// A process's figures at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sample {
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

/// The first and the last [`Sample`] of a process in one state.
#[derive(Debug, Default, Clone, Copy)]
struct Span {
    first: Option<Sample>,
    last: Sample,
}

impl Span {
    fn add(&mut self, s: Sample) {
        self.first.get_or_insert(s);
        self.last = s;
    }

    fn describe(&self) -> String {
        let f = self.first.unwrap_or_default();
        let l = self.last;
        format!(
            "RSS {} -> {}, {} -> {} open files, {} -> {} threads",
            mib(f.rss_kib),
            mib(l.rss_kib),
            f.fds,
            l.fds,
            f.threads,
            l.threads
        )
    }

    /// Whether the last sample has more files or threads than the first.
    fn grew(&self) -> bool {
        self.first
            .is_some_and(|f| self.last.fds > f.fds || self.last.threads > f.threads)
    }
}

/// A vmm is never left behind: whatever ends the soak (an error too) stops it.
impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The first number after `prefix` on a line of `out` that contains `needle` too.
fn number_after(out: &str, prefix: &str, needle: &str) -> Option<u64> {
    out.lines()
        .filter(|l| l.contains(needle))
        .find_map(|l| l.split(prefix).nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Waits until every vCPU of `vm`'s guest is past generation `before[i]`; false when the
/// guest failed (a page it read back was wrong) meanwhile.
fn wait_generation(vm: &Vm, before: &[u64], limit: Duration, n: u64) -> Result<bool> {
    let t = Instant::now();
    loop {
        let GuestNow {
            generations: gens,
            failed,
            ..
        } = vm.guest()?;
        if failed {
            println!(
                "soak: move {n}: the guest found a page wrong:\n{}",
                tail(&vm.output())
            );
            return Ok(false);
        }
        if gens.len() == before.len() && gens.iter().zip(before).all(|(a, b)| a > b) {
            return Ok(true);
        }
        if t.elapsed() > limit {
            bail!(
                "move {n}: the guest did not finish a generation within {} s (at {gens:?}, \
                 from {before:?})",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[derive(Default)]
struct Totals {
    moves: u64,
    precopy: u64,
    postcopy: u64,
    verified: u64,
    mismatches: u64,
    lost: u64,
    harvests: u64,
    harvested: u64,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{} MiB", kib / 1024)
}

fn run() -> Result<bool> {
    let cli = Cli::parse();
    if cli.seconds == 0 {
        bail!("--seconds 0: give the time to soak for, e.g. --seconds 60");
    }
    let vmm = match &cli.vmm {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program has no directory")?
            .join("vmm"),
    };
    if !vmm.is_file() {
        bail!(
            "no vmm binary at {}: build it with `cargo build --release -p vmm -p tools`",
            vmm.display()
        );
    }
    std::fs::create_dir_all(&cli.out)?;
    let limit = Duration::from_secs(cli.move_timeout);
    // What both processes run with: they stay for the next VM; the storm runs wherever the
    // guest runs; how they migrate out.
    let mut common: Vec<String> = vec![
        "--stay".into(),
        "--reclaim-storm".into(),
        "1000000000".into(),
        "--dirty-mode".into(),
        cli.dirty_mode.clone(),
        "--migrate-verify".into(),
        "--migrate-connections".into(),
        cli.connections.to_string(),
        "--migrate-timeout".into(),
        "30".into(),
    ];
    if cli.harvest_ms > 0 {
        common.extend(["--dirty-harvest-ms".into(), cli.harvest_ms.to_string()]);
    }
    let mut guest: Vec<String> = [
        "--guest",
        "stress",
        "--mode",
        "sequential",
        "--generations",
        "16777215",
        "--mem",
        &cli.mem,
        "--cpus",
        &cli.cpus.to_string(),
        "--hugepages",
        &cli.hugepages,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    guest.extend(common.iter().cloned());
    println!(
        "soak: {} s of moves of a {}-vCPU stress guest ({} RAM, --hugepages {}, {}, {} connection(s)) under a reclaim storm between two vmm processes; logs in {}",
        cli.seconds, cli.cpus, cli.mem, cli.hugepages, cli.dirty_mode, cli.connections, cli.out.display()
    );
    let first_addr = format!("tcp:127.0.0.1:{}", free_port()?);
    let mut b_args = vec!["--incoming".to_string(), first_addr.clone()];
    b_args.extend(common.iter().cloned());
    let mut vms = [
        Vm::spawn(&vmm, &cli.out, "vm-a".into(), &guest)?,
        Vm::spawn(&vmm, &cli.out, "vm-b".into(), &b_args)?,
    ];
    vms[0].wait_state("running", limit)?;
    vms[1].wait_state(&format!("receiving at {first_addr}"), limit)?;
    // The guest writes and verifies its slice once here before the first move.
    wait_generation(&vms[0], &vec![0; cli.cpus as usize], limit, 0)?;
    let started = Instant::now();
    let mut next_progress = Duration::from_secs(60);
    let mut tot = Totals::default();
    // Per process: running the guest, and empty.
    let mut running_span = [Span::default(); 2];
    let mut empty_span = [Span::default(); 2];
    let mut src = 0;
    let mut ok = true;
    while started.elapsed() < Duration::from_secs(cli.seconds) {
        let n = tot.moves + 1;
        let dst = 1 - src;
        let postcopy = n % 2 == 0;
        let addr = if n == 1 {
            first_addr.clone()
        } else {
            let addr = format!("tcp:127.0.0.1:{}", free_port()?);
            let answer = vms[dst].ask(&json!({"cmd": "receive", "from": addr}), limit)?;
            if answer["ok"] != json!(true) {
                bail!(
                    "move {n}: {} refused to receive: {}",
                    vms[dst].name,
                    answer["error"]
                );
            }
            addr
        };
        let from = vms[dst].log_len();
        running_span[src].add(vms[src].sample());
        // Its harvests are over once it migrates (a migration stops them).
        let now = vms[src].guest()?;
        let gens_before = now.generations;
        let mut req = json!({"cmd": "migrate", "to": addr});
        if postcopy {
            req["postcopy_after"] = json!(1);
        }
        let answer = vms[src].ask(&req, limit)?;
        if answer["ok"] != json!(true) {
            // The source runs on (its migration failed); what the destination said is why.
            std::thread::sleep(Duration::from_secs(1));
            let out = vms[dst].output_since(from);
            if let Some(differ) = number_after(
                &out,
                "failed; nothing runs here: ",
                "differ from the source's digest",
            ) {
                tot.lost += differ;
                println!("soak: move {n}: {differ} pages lost: {}", answer["error"]);
            } else {
                println!("soak: move {n} failed: {}\n{}", answer["error"], tail(&out));
            }
            ok = false;
            break;
        }
        let out = vms[dst].wait_log("the verification", limit, |o| {
            let o = o.get(from..).unwrap_or_default();
            o.contains("against the source's digest before the guest runs")
                && (!postcopy || o.contains("owed pages on arrival"))
        })?;
        let out = out.get(from..).unwrap_or_default();
        tot.verified += number_after(out, "verified ", "before the guest runs").unwrap_or(0);
        if postcopy {
            tot.verified += number_after(out, "verified ", "owed pages on arrival").unwrap_or(0);
            tot.mismatches += number_after(out, "digest: ", "owed pages on arrival").unwrap_or(0);
        }
        // The source is empty again once it tore its machine down.
        vms[src].wait_state("empty", limit)?;
        vms[dst].wait_state("running", limit)?;
        // The guest finishes the generation it was in at the move: it verifies every page of
        // its slice, written before the move or after.
        if !wait_generation(&vms[dst], &gens_before, limit, n)? {
            tot.mismatches += 1;
            ok = false;
        }
        empty_span[src].add(vms[src].sample());
        tot.harvests += now.harvests;
        tot.harvested += now.harvested;
        tot.moves += 1;
        if postcopy {
            tot.postcopy += 1;
        } else {
            tot.precopy += 1;
        }
        src = dst;
        if !ok {
            break;
        }
        if started.elapsed() >= next_progress {
            next_progress += Duration::from_secs(60);
            println!(
                "soak: {:>4} s: {} moves ({} precopy, {} postcopy), {} pages verified, {} mismatches, {} lost dirty pages; RSS {} running, {} empty",
                started.elapsed().as_secs(), tot.moves, tot.precopy, tot.postcopy, tot.verified, tot.mismatches, tot.lost, mib(vms[src].rss_kib()), mib(vms[1 - src].rss_kib())
            );
        }
    }
    let last = vms[src].guest().unwrap_or_default();
    let (gens, failed) = (last.generations, last.failed);
    tot.harvests += last.harvests;
    tot.harvested += last.harvested;
    if failed {
        ok = false;
    }
    running_span[src].add(vms[src].sample());
    for vm in &vms {
        let _ = vm.ask(&json!({"cmd": "shutdown"}), Duration::from_secs(10));
    }
    println!(
        "soak: {:.0} s, the guest at generation {} on its last host",
        started.elapsed().as_secs_f64(),
        gens.iter().min().copied().unwrap_or(0)
    );
    if cli.harvest_ms > 0 {
        println!(
            "soak: {} dirty harvests every {} ms outside the migrations, {} dirty pages in them",
            tot.harvests, cli.harvest_ms, tot.harvested
        );
    }
    for (i, vm) in vms.iter().enumerate() {
        println!(
            "soak: {} (pid {}), first -> last move: running the guest: {}; empty: {}",
            vm.name,
            vm.child.id(),
            running_span[i].describe(),
            empty_span[i].describe()
        );
        if empty_span[i].grew() {
            println!(
                "soak: {} leaked: with no VM it held more open files or threads at its last \
                 move than at its first",
                vm.name
            );
            ok = false;
        }
    }
    drop(vms);
    println!(
        "soak: {} moves, {} pages verified, {} mismatches, {} lost dirty pages",
        tot.moves, tot.verified, tot.mismatches, tot.lost
    );
    Ok(ok && tot.mismatches == 0 && tot.lost == 0 && tot.moves > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_read_off_the_vmm_lines() {
        let out = "received 2 rounds\nverified 262144 pages against the source's digest before the guest runs: none differ\nverified 58 owed pages on arrival against the source's digest: 0 differ\n";
        assert_eq!(
            number_after(out, "verified ", "before the guest runs"),
            Some(262144)
        );
        assert_eq!(
            number_after(out, "verified ", "owed pages on arrival"),
            Some(58)
        );
        assert_eq!(
            number_after(out, "digest: ", "owed pages on arrival"),
            Some(0)
        );
        assert_eq!(number_after(out, "verified ", "no such line"), None);
    }
}
