//! decompress-bench: host-side bzImage payload decompression speed, per compression, on a real kernel.
//!
//! Takes a bzImage (Debian's cloud kernel by default), decompresses its own
//! payload, then recompresses the vmlinux with every compressor exactly as
//! the kernel's Makefile does (cached under `target/decompress-bench/`,
//! since `xz`/`lzma -9` and `zstd -22` take a minute each) and times
//! `decompress_payload` on each, with the command-line tool's own `-d` as
//! a reference (its CPU time, user + system). Wall times suffer when
//! other work shares the cores; the thread-CPU column does not. Build with
//! `--release`: this is the boot-time path.
//!
//! ```text
//! cargo build --release -p tools --bin decompress-bench
//! target/release/decompress-bench --kernel target/kernel/.../vmlinuz-... --reps 5
//! ```

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmm::boot::decompress::{decompress_bzimage, decompress_payload, Compression};

/// Where tools/fetch-kernel caches Debian's cloud kernel.
const DEFAULT_KERNEL: &str = "target/kernel/vmlinuz";

#[derive(Parser, Debug)]
#[command(about = "Per-compression decompression time of a real kernel's bzImage payload")]
struct Args {
    /// The bzImage [default: target/kernel/vmlinuz, from tools/fetch-kernel].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Timed repetitions per compression (the median and minimum are shown).
    #[arg(long, short = 'n', default_value_t = 5)]
    reps: usize,
    /// Where the recompressed payloads are cached.
    #[arg(long, default_value = "target/decompress-bench")]
    cache_dir: PathBuf,
    /// Skip timing the command-line tools' own decompression.
    #[arg(long)]
    no_reference: bool,
}

/// The kernel's compression command for each format (`scripts/Makefile.lib`,
/// `scripts/xz_wrap.sh`), reading stdin and writing stdout.
fn compress_command(format: Compression) -> (&'static str, &'static [&'static str]) {
    match format {
        Compression::Gzip => ("gzip", &["-n", "-9", "-c"]),
        Compression::Bzip2 => ("bzip2", &["-9", "-c"]),
        Compression::Lzma => ("lzma", &["-9", "-c"]),
        Compression::Xz => (
            "xz",
            &["--check=crc32", "--x86", "--lzma2=dict=32MiB", "-c"],
        ),
        Compression::Lzo => ("lzop", &["-9", "-c"]),
        Compression::Lz4 => ("lz4", &["-l", "-9", "-c"]),
        Compression::Zstd => ("zstd", &["-22", "--ultra", "-c", "-q"]),
    }
}

fn pipe(tool: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{tool}`: install its Debian package"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer.join().expect("writer thread")?;
    if !out.status.success() {
        bail!("`{tool} {}` failed: {}", args.join(" "), out.status);
    }
    Ok(out.stdout)
}

/// The payload (stream plus u32 LE size) for `format`, from the cache or
/// made now.
fn payload(format: Compression, vmlinux: &[u8], cache: &Path, key: &str) -> Result<Vec<u8>> {
    let path = cache.join(format!("{key}.{format}"));
    if let Ok(cached) = std::fs::read(&path) {
        return Ok(cached);
    }
    let (tool, args) = compress_command(format);
    eprintln!(
        "compressing with `{tool} {}` (cached in {}) ...",
        args.join(" "),
        path.display()
    );
    let mut payload = pipe(tool, args, vmlinux)?;
    payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
    std::fs::write(&path, &payload).with_context(|| format!("writing {}", path.display()))?;
    Ok(payload)
}

fn default_kernel() -> Result<PathBuf> {
    let path = PathBuf::from(DEFAULT_KERNEL);
    if !path.is_file() {
        bail!("no kernel at {DEFAULT_KERNEL}: run tools/fetch-kernel first, or pass --kernel PATH");
    }
    Ok(path)
}

/// CPU time consumed by the calling thread so far (`CLOCK_THREAD_CPUTIME_ID`):
/// unlike wall time, it does not grow when other processes share the cores.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
    // every Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// User plus system CPU time of all waited-for children (`RUSAGE_CHILDREN`).
fn children_cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_CHILDREN) failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.reps == 0 {
        bail!("--reps 0 times nothing: give at least 1");
    }
    let kernel = match args.kernel {
        Some(k) => k,
        None => default_kernel()?,
    };
    let image =
        std::fs::read(&kernel).with_context(|| format!("cannot read {}", kernel.display()))?;
    let Some((native, vmlinux)) = decompress_bzimage(&image)? else {
        bail!("{}: payload compression not recognised", kernel.display());
    };
    println!(
        "kernel {} ({} bytes, {native}); vmlinux + relocs {} bytes",
        kernel.display(),
        image.len(),
        vmlinux.len()
    );
    std::fs::create_dir_all(&args.cache_dir)
        .with_context(|| format!("creating {}", args.cache_dir.display()))?;
    let key = kernel
        .file_name()
        .map_or("kernel".into(), |n| n.to_string_lossy().into_owned());

    println!(
        "{:<6} {:>11} {:>7} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "format", "payload B", "ratio", "median ms", "min ms", "cpu ms", "MB/s cpu", "tool -d cpu"
    );
    for format in Compression::ALL {
        let payload = match payload(format, &vmlinux, &args.cache_dir, &key) {
            Ok(p) => p,
            Err(e) => {
                println!("{format:<6} skipped: {e:#}");
                continue;
            }
        };
        let mut times = Vec::with_capacity(args.reps);
        let mut cpu_times = Vec::with_capacity(args.reps);
        for _ in 0..args.reps {
            let cpu_started = thread_cpu_time();
            let started = Instant::now();
            let out = decompress_payload(&payload)?;
            let elapsed = started.elapsed();
            cpu_times.push(thread_cpu_time() - cpu_started);
            match out {
                Some((f, out)) if f == format && out == vmlinux => {}
                _ => bail!("{format}: decompress_payload did not give back the vmlinux"),
            }
            times.push(elapsed);
        }
        times.sort();
        cpu_times.sort();
        let median = times[times.len() / 2];
        let cpu_median = cpu_times[cpu_times.len() / 2];
        let reference = if args.no_reference {
            "-".to_string()
        } else {
            let (tool, _) = compress_command(format);
            let cpu_started = children_cpu_time();
            pipe(tool, &["-dc"], &payload[..payload.len() - 4])
                .map(|_| format!("{:.1}", ms(children_cpu_time() - cpu_started)))
                .unwrap_or_else(|e| format!("({e})"))
        };
        println!(
            "{:<6} {:>11} {:>7.3} {:>10.1} {:>10.1} {:>10.1} {:>10.0} {:>12}",
            format.to_string(),
            payload.len(),
            payload.len() as f64 / vmlinux.len() as f64,
            ms(median),
            ms(times[0]),
            ms(cpu_median),
            vmlinux.len() as f64 / cpu_median.as_secs_f64() / 1e6,
            reference
        );
    }
    Ok(())
}
