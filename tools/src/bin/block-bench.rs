//! block-bench: virtio-blk throughput and latency inside a guest against the same file on the
//! host, side by side, as a ratio.
//!
//! For each request size, the project's test kernel boots with the image as its virtio-blk
//! disk and runs the test initramfs's `disk bench` (sequential `O_DIRECT` writes of that size,
//! an fsync, then the reads back, timed on the guest's clock); right after, this process does
//! the same transfers on the same file (`pwrite`/`pread` of the same size and count, an fsync
//! after the writes: through the host's page cache as the VMM's own requests go, or both
//! `O_DIRECT` with `--direct`). Guest and host runs alternate, rep after rep, so a slow phase of
//! the host does not favour one side. The table gives the median MB/s and mean latency per
//! request of each, and guest/host ratios.
//!
//! ```text
//! cargo build --release -p vmm -p tools
//! target/release/block-bench --mib 4 --kib 4,64,1024 --reps 2
//! ```

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "virtio-blk in the test kernel against the same file on the host: sequential \
             O_DIRECT writes and reads per request size, MB/s and latency, guest/host ratios"
)]
struct Args {
    /// Our vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// The kernel [default: tools/build-test-kernel's, built or taken from its cache].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The initramfs with the `disk` program [default: tools/build-test-initramfs's].
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// MiB written and then read per pass.
    #[arg(long, default_value_t = 4)]
    mib: u64,
    /// Request sizes in KiB, comma-separated (each divides --mib; at most 1024).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    kib: Vec<u64>,
    /// Repetitions of each (size, side) pair.
    #[arg(long, short = 'n', default_value_t = 1)]
    reps: usize,
    /// `direct=on` for the VMM's disk and O_DIRECT on the host side (no host page cache on
    /// either side).
    #[arg(long)]
    direct: bool,
    /// The image file (made, then removed).
    #[arg(long, default_value = "target/block-bench.img")]
    image: PathBuf,
    /// Seconds a guest run may take.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// One pass's figures: MB/s and mean latency per request in µs.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    mbps: f64,
    mean_us: f64,
}

/// A write pass and a read pass.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    write: Pass,
    read: Pass,
}

/// Parses `DISKBENCH write|read M MiB K KiB S s R MB/s mean L us max X us`.
fn parse_line(line: &str) -> Option<(bool, Pass)> {
    let rest = line.trim().strip_prefix("DISKBENCH ")?;
    let w: Vec<&str> = rest.split_whitespace().collect();
    let write = match *w.first()? {
        "write" => true,
        "read" => false,
        _ => return None,
    };
    let at = |unit: &str| -> Option<f64> {
        let i = w.iter().position(|x| *x == unit)?;
        w.get(i.checked_sub(1)?)?.parse().ok()
    };
    let mean_at = w.iter().position(|x| *x == "mean")?;
    Some((
        write,
        Pass {
            mbps: at("MB/s")?,
            mean_us: w.get(mean_at + 1)?.parse().ok()?,
        },
    ))
}

/// Boots the guest on `image` and returns its `disk bench` figures.
fn guest_run(a: &Args, kernel: &Path, initrd: &Path, kib: u64) -> Result<Run> {
    let disk = format!(
        "path={}{}",
        a.image.display(),
        if a.direct { ",direct=on" } else { "" }
    );
    let cmdline = format!("console=ttyS0 run=disk,bench,/dev/vda,{},{kib}", a.mib);
    let mut child = Command::new(&a.vmm)
        .args(["--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--mem", "256M", "--cpus", "1", "--hugepages", "none"])
        .args(["--cmdline", &cmdline, "--disk", &disk])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", a.vmm.display()))?;
    let mut out = tools::ChildLines::new(&mut child);
    let limit = Instant::now() + Duration::from_secs(a.timeout);
    let mut run = Run::default();
    let mut seen = (false, false);
    while !(seen.0 && seen.1) {
        let Some(line) = out.next_until(limit) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "no figures from the guest within {} s (or it ended); its last lines:\n{}",
                a.timeout,
                out.tail()
            );
        };
        match parse_line(&line) {
            Some((true, pass)) => {
                run.write = pass;
                seen.0 = true;
            }
            Some((false, pass)) => {
                run.read = pass;
                seen.1 = true;
            }
            None if line.contains("DISKBENCH") => {
                let _ = child.kill();
                bail!("the guest's bench failed: {line}");
            }
            None => {}
        }
    }
    // It powers off after the program: wait for that, so runs do not overlap.
    tools::wait_for_poweroff(&mut child, Duration::from_secs(120));
    Ok(run)
}

/// The same transfers on the host: `count` requests of `kib` KiB, written (then an fsync)
/// and read back, on `image`.
fn host_run(a: &Args, kib: u64) -> Result<Run> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if a.direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let f = opts
        .open(&a.image)
        .with_context(|| format!("opening {}", a.image.display()))?;
    let bytes = (kib << 10) as usize;
    let count = a.mib * 1024 / kib;
    // An O_DIRECT buffer must be aligned: take an aligned slice of a larger one.
    let mut raw = vec![0x5au8; bytes + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[off..off + bytes];
    let pass = |write: bool, buf: &mut [u8]| -> Result<Pass> {
        let t = Instant::now();
        for i in 0..count {
            let at = i * bytes as u64;
            if write {
                f.write_all_at(buf, at)?;
            } else {
                f.read_exact_at(buf, at)?;
            }
        }
        if write {
            f.sync_data()?;
        }
        let s = t.elapsed().as_secs_f64();
        Ok(Pass {
            mbps: (a.mib << 20) as f64 / s / 1e6,
            mean_us: s / count as f64 * 1e6,
        })
    };
    let write = pass(true, buf)?;
    let read = pass(false, buf)?;
    Ok(Run { write, read })
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.mib == 0 || a.reps == 0 {
        bail!("--mib and --reps must be at least 1");
    }
    for &k in &a.kib {
        if k == 0 || k > 1024 || (a.mib * 1024) % k != 0 {
            bail!(
                "--kib {k}: a request size must divide --mib {} MiB and be 1 to 1024 KiB",
                a.mib
            );
        }
    }
    if !a.vmm.exists() {
        bail!(
            "{} not found: cargo build --release -p vmm first (or give --vmm)",
            a.vmm.display()
        );
    }
    let (kernel, initrd) = tools::kernel_or_test_kernel(&a.kernel, &a.initrd)?;
    {
        let f = std::fs::File::create(&a.image)
            .with_context(|| format!("creating {}", a.image.display()))?;
        f.set_len((a.mib + 1) << 20)?;
    }
    println!(
        "block-bench: {} MiB per pass, request sizes {:?} KiB, {} rep(s), {}",
        a.mib,
        a.kib,
        a.reps,
        if a.direct {
            "O_DIRECT on both sides (direct=on)"
        } else {
            "host page cache on both sides"
        }
    );
    let mut rows = Vec::new();
    for &kib in &a.kib {
        let (mut guest, mut host) = (Vec::new(), Vec::new());
        for rep in 1..=a.reps {
            let t = Instant::now();
            let g = guest_run(&a, &kernel, &initrd, kib)?;
            println!(
                "  {kib} KiB rep {rep}: guest write {:.2} MB/s read {:.2} MB/s ({:.0} s with the boot)",
                g.write.mbps,
                g.read.mbps,
                t.elapsed().as_secs_f64()
            );
            let h = host_run(&a, kib)?;
            println!(
                "  {kib} KiB rep {rep}: host  write {:.2} MB/s read {:.2} MB/s",
                h.write.mbps, h.read.mbps
            );
            guest.push(g);
            host.push(h);
        }
        rows.push((kib, guest, host));
    }
    let _ = std::fs::remove_file(&a.image);
    println!();
    println!(
        "| request | direction | guest MB/s | host MB/s | guest/host | guest mean latency | host mean latency | guest/host |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (kib, guest, host) in &rows {
        for (dir, pick) in [
            ("write", (|r: &Run| r.write) as fn(&Run) -> Pass),
            ("read", |r: &Run| r.read),
        ] {
            let gm = tools::median(guest.iter().map(|r| pick(r).mbps).collect());
            let hm = tools::median(host.iter().map(|r| pick(r).mbps).collect());
            let gl = tools::median(guest.iter().map(|r| pick(r).mean_us).collect());
            let hl = tools::median(host.iter().map(|r| pick(r).mean_us).collect());
            println!(
                "| {kib} KiB | {dir} | {gm:.2} | {hm:.1} | {:.4} | {gl:.0} µs | {hl:.1} µs | {:.0}x |",
                gm / hm,
                gl / hl
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_programs_lines_parse() {
        let (w, p) = parse_line(
            "DISKBENCH write 4 MiB 64 KiB 5.120 s 0.819 MB/s mean 80000 us max 120000 us",
        )
        .unwrap();
        assert!(w);
        assert!((p.mbps - 0.819).abs() < 1e-9);
        assert!((p.mean_us - 80000.0).abs() < 1e-9);
        let (w, _) =
            parse_line("DISKBENCH read 4 MiB 64 KiB 1 s 4 MB/s mean 1 us max 2 us").unwrap();
        assert!(!w);
        assert!(parse_line("DISKBENCH write /dev/vda: cannot open").is_none());
        assert!(parse_line("MARKER x").is_none());
    }
}
