//! `soak`: a 4-vCPU `stress` guest on the stage-2 path (demand paging through stage2) under a
//! reclaim storm of 1 GiB ranges, moved back and forth between `vmm` processes for a given
//! time, precopy and postcopy alternating, every page checked after each move.
//!
//! ```text
//! cargo build --release -p vmm -p tools
//! target/release/soak --seconds 600
//! ```
//!
//! Each move starts a destination (`vmm --incoming`, with the storm and its control socket)
//! and asks the running VM to migrate there over its control socket, with `--migrate-verify`:
//! the source takes a CRC of every page with the guest paused and the destination compares its
//! RAM with them before its guest runs (postcopy: the pages still owed as they arrive). Then
//! the guest must finish the write-and-verify generation it was in at the move (it reads back
//! every page of its slice, written on either side) before the next move. The source process
//! ends with each move; the destination becomes the next source.
//!
//! Figures: *pages verified* counts the pages the destinations compared with the source's
//! digest; *lost dirty pages* the pages that differed before the guest ran (written on the
//! source and never sent again); *mismatches* the owed pages that arrived different after a
//! postcopy switch plus a guest that found a page wrong. One progress line a minute; the RSS of
//! the running VM and of the waiting destination at the first and the last move; the last
//! line: `soak: N moves, N pages verified, N mismatches, N lost dirty pages`.

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

    /// Waits (at most `limit`) for the process to end; its log.
    fn wait_exit(&mut self, limit: Duration) -> String {
        let t = Instant::now();
        while t.elapsed() < limit && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.output()
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
    // The storm runs on every process that runs the guest, for as long as it runs.
    let storm = ["--reclaim-storm".to_string(), "1000000000".into()];
    // How every process migrates on (a destination with a control socket keeps them for its
    // own migration out).
    let mut migrate: Vec<String> = vec![
        "--dirty-mode".into(),
        cli.dirty_mode.clone(),
        "--migrate-verify".into(),
        "--migrate-connections".into(),
        cli.connections.to_string(),
    ];
    migrate.extend(storm.iter().cloned());
    if cli.harvest_ms > 0 {
        migrate.extend(["--dirty-harvest-ms".into(), cli.harvest_ms.to_string()]);
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
    guest.extend(migrate.iter().cloned());
    println!(
        "soak: {} s of moves of a {}-vCPU stress guest ({} RAM, --hugepages {}, {}, {} connection(s)) under a reclaim storm; logs in {}",
        cli.seconds, cli.cpus, cli.mem, cli.hugepages, cli.dirty_mode, cli.connections, cli.out.display()
    );
    let mut running = Vm::spawn(&vmm, &cli.out, "vm0".into(), &guest)?;
    running.wait_log("its guest started", limit, |o| {
        o.contains("guest stress on")
    })?;
    let t = Instant::now();
    while !running.sock.exists() {
        if t.elapsed() > limit {
            bail!("vm0 never opened its control socket");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest writes and verifies its slice once here before the first move.
    wait_generation(&running, &vec![0; cli.cpus as usize], limit, 0)?;
    let started = Instant::now();
    let mut next_progress = Duration::from_secs(60);
    let mut tot = Totals::default();
    let mut rss_first: Option<(u64, u64)> = None;
    let mut rss_last = (0, 0);
    let mut ok = true;
    while started.elapsed() < Duration::from_secs(cli.seconds) {
        let n = tot.moves + 1;
        let postcopy = n % 2 == 0;
        let port = free_port()?;
        let addr = format!("tcp:127.0.0.1:{port}");
        let mut dst_args = vec![
            "--incoming".to_string(),
            addr.clone(),
            "--migrate-timeout".into(),
            "30".into(),
        ];
        dst_args.extend(migrate.iter().cloned());
        let mut dst = Vm::spawn(&vmm, &cli.out, format!("vm{n}"), &dst_args)?;
        dst.wait_log("listening", limit, |o| {
            o.contains("waiting for the migration source")
        })?;
        let rss = (running.rss_kib(), dst.rss_kib());
        rss_first.get_or_insert(rss);
        rss_last = rss;
        // Its harvests are over once it migrates (a migration stops them).
        let now = running.guest()?;
        let gens_before = now.generations;
        let mut req = json!({"cmd": "migrate", "to": addr});
        if postcopy {
            req["postcopy_after"] = json!(1);
        }
        let answer = running.ask(&req, limit)?;
        if answer["ok"] != json!(true) {
            // The source runs on (its migration failed); what the destination said is why.
            let out = dst.wait_exit(limit);
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
            drop(dst);
            break;
        }
        // The source ends once the guest runs at the destination (postcopy: once every page
        // is there).
        let code = running.child.wait()?;
        if !code.success() {
            println!(
                "soak: move {n}: the source ended with {code}:\n{}",
                tail(&running.output())
            );
            ok = false;
        }
        let _ = std::fs::remove_file(&running.sock);
        let out = dst.wait_log("the verification", limit, |o| {
            o.contains("against the source's digest before the guest runs")
                && (!postcopy || o.contains("owed pages on arrival"))
        })?;
        tot.verified += number_after(&out, "verified ", "before the guest runs").unwrap_or(0);
        if postcopy {
            tot.verified += number_after(&out, "verified ", "owed pages on arrival").unwrap_or(0);
            tot.mismatches += number_after(&out, "digest: ", "owed pages on arrival").unwrap_or(0);
        }
        // The guest finishes the generation it was in at the move: it verifies every page of
        // its slice, written before the move or after.
        if !wait_generation(&dst, &gens_before, limit, n)? {
            tot.mismatches += 1;
            ok = false;
        }
        tot.harvests += now.harvests;
        tot.harvested += now.harvested;
        tot.moves += 1;
        if postcopy {
            tot.postcopy += 1;
        } else {
            tot.precopy += 1;
        }
        running = dst;
        if !ok {
            break;
        }
        if started.elapsed() >= next_progress {
            next_progress += Duration::from_secs(60);
            println!(
                "soak: {:>4} s: {} moves ({} precopy, {} postcopy), {} pages verified, {} mismatches, {} lost dirty pages; RSS of the running VM {}",
                started.elapsed().as_secs(), tot.moves, tot.precopy, tot.postcopy, tot.verified, tot.mismatches, tot.lost, mib(running.rss_kib())
            );
        }
    }
    let last = running.guest().unwrap_or_default();
    let (gens, failed) = (last.generations, last.failed);
    tot.harvests += last.harvests;
    tot.harvested += last.harvested;
    if failed {
        ok = false;
    }
    let _ = running.ask(&json!({"cmd": "shutdown"}), Duration::from_secs(10));
    drop(running);
    let (first_vm, first_dst) = rss_first.unwrap_or_default();
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
    println!(
        "soak: RSS of the running VM: {} at the first move, {} at the last",
        mib(first_vm),
        mib(rss_last.0)
    );
    println!(
        "soak: RSS of the waiting destination: {} at the first move, {} at the last",
        mib(first_dst),
        mib(rss_last.1)
    );
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
