//! balloon-bench: how fast memory a guest frees comes back to the host through the
//! virtio-balloon's free page reporting (the VMM's RSS per second).
//!
//! The project's test kernel boots with `--balloon` on `--mem` RAM of which the kernel uses
//! `mem=` (Linux reports free pages only while its zone keeps a margin above the low
//! watermark; the RAM above `mem=` is never touched). The test initramfs's `memtest` writes
//! its own pages, touches `--free` MiB more and frees them, and holds (checking its own pages
//! every second). From its "freed" line this process samples the VMM's RSS every 50 ms: the
//! table gives the RSS at the free, the lowest after it, the MiB given back, the time to 90 %
//! of that, and the rate (MiB per second to 90 %). Reps run one after the other.
//!
//! ```text
//! cargo build --release -p vmm -p tools
//! target/release/balloon-bench --free 32 --reps 2
//! ```

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "Free page reporting through the virtio-balloon: the VMM's RSS given back per \
             second after the test kernel's memtest frees memory"
)]
struct Args {
    /// Our vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// MiB memtest keeps (and checks while it holds).
    #[arg(long, default_value_t = 16)]
    own: u64,
    /// MiB memtest touches and frees.
    #[arg(long, default_value_t = 32)]
    free: u64,
    /// Seconds it holds after the free (the sampling window).
    #[arg(long, default_value_t = 20)]
    hold: u64,
    /// `--mem` of the VM.
    #[arg(long, default_value = "384M")]
    mem: String,
    /// The kernel's `mem=`.
    #[arg(long, default_value = "256M")]
    kernel_mem: String,
    /// Repetitions.
    #[arg(long, short = 'n', default_value_t = 1)]
    reps: usize,
    /// Seconds a run may take in all.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// One run's figures.
#[derive(Clone, Copy, Debug)]
struct Run {
    at_free: u64,
    lowest: u64,
    to_90: Option<Duration>,
    /// The balloon's counters over the sampling: bytes the guest reported free, bytes dropped.
    reported: u64,
    dropped: u64,
}

/// One request on the VM's control socket; its answer.
fn request(sock: &std::path::Path, req: &str) -> Result<serde_json::Value> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
}

const MIB: f64 = (1 << 20) as f64;

fn run(a: &Args, kernel: &std::path::Path, initrd: &std::path::Path) -> Result<Run> {
    let cmdline = format!(
        "console=ttyS0 mem={} run=memtest,{},1,{},{}",
        a.kernel_mem, a.own, a.free, a.hold
    );
    let sock = std::env::temp_dir().join(format!("balloon-bench-{}.sock", std::process::id()));
    let mut child = Command::new(&a.vmm)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--mem",
            &a.mem,
            "--cpus",
            "1",
            "--hugepages",
            "none",
            "--balloon",
        ])
        .args(["--cmdline", &cmdline])
        .arg("--api-socket")
        .arg(&sock)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", a.vmm.display()))?;
    let pid = child.id();
    let mut out = tools::ChildLines::new(&mut child);
    let limit = Instant::now() + Duration::from_secs(a.timeout);
    loop {
        match out.next_until(limit) {
            Some(l) if l.contains("memtest: freed") => break,
            Some(l) if l.contains("memtest: FAIL") => {
                let _ = child.kill();
                bail!("the guest's memtest failed: {l}");
            }
            Some(_) => {}
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "memtest did not free its memory in time (or the VM ended); last lines:\n{}",
                    out.tail()
                );
            }
        }
    }
    let t0 = Instant::now();
    let at_free = tools::rss(pid);
    let counters = |v: &serde_json::Value| {
        let b = &v["balloon"];
        (
            b["reported_bytes"].as_u64().unwrap_or(0),
            b["dropped_bytes"].as_u64().unwrap_or(0),
        )
    };
    let before = request(&sock, r#"{"cmd":"balloon"}"#)
        .map(|v| counters(&v))
        .unwrap_or_default();
    let mut samples = vec![(Duration::ZERO, at_free)];
    while t0.elapsed() < Duration::from_secs(a.hold) {
        std::thread::sleep(Duration::from_millis(50));
        samples.push((t0.elapsed(), tools::rss(pid)));
    }
    let after = request(&sock, r#"{"cmd":"balloon"}"#)
        .map(|v| counters(&v))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    let lowest = samples.iter().map(|s| s.1).min().unwrap_or(at_free);
    let fall = at_free.saturating_sub(lowest);
    let to_90 = (fall > 0)
        .then(|| {
            samples
                .iter()
                .find(|s| at_free.saturating_sub(s.1) * 10 >= fall * 9)
                .map(|s| s.0)
        })
        .flatten();
    Ok(Run {
        at_free,
        lowest,
        to_90,
        reported: after.0.saturating_sub(before.0),
        dropped: after.1.saturating_sub(before.1),
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.reps == 0 || a.free == 0 || a.hold == 0 {
        bail!("--reps, --free and --hold must be at least 1");
    }
    if !a.vmm.exists() {
        bail!(
            "{} not found: cargo build --release -p vmm first (or give --vmm)",
            a.vmm.display()
        );
    }
    let (kernel, initrd) = tools::test_kernel()?;
    println!(
        "balloon-bench: --mem {} (mem={}), memtest keeps {} MiB and frees {} MiB, {} s sampled, {} rep(s)",
        a.mem, a.kernel_mem, a.own, a.free, a.hold, a.reps
    );
    println!();
    println!(
        "| rep | RSS at the free | lowest after | given back | to 90 % | MiB/s to 90 % | reported / dropped meanwhile |"
    );
    println!("|---|---|---|---|---|---|---|");
    for rep in 1..=a.reps {
        let r = run(&a, &kernel, &initrd)?;
        let back = r.at_free.saturating_sub(r.lowest) as f64 / MIB;
        let (t90, rate) = match r.to_90 {
            Some(t) if t > Duration::ZERO => (
                format!("{:.2} s", t.as_secs_f64()),
                format!("{:.1}", back * 0.9 / t.as_secs_f64()),
            ),
            Some(_) => ("< 50 ms".into(), "-".into()),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {rep} | {:.1} MiB | {:.1} MiB | {back:.1} MiB | {t90} | {rate} | {:.1} / {:.1} MiB |",
            r.at_free as f64 / MIB,
            r.lowest as f64 / MIB,
            r.reported as f64 / MIB,
            r.dropped as f64 / MIB
        );
    }
    Ok(())
}
