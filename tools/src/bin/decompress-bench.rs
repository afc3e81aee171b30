//! decompress-bench: host-side bzImage payload decompression speed, per compression, on a real kernel.
//!
//! Takes a bzImage (Debian's cloud kernel by default), decompresses its own
//! payload, then recompresses the vmlinux with every compressor exactly as
//! the kernel's Makefile does (cached under `target/decompress-bench/`,
//! since `xz`/`lzma -9` and `zstd -22` take a minute each) and times
//! `decompress_payload` on each, with the command-line tool's own `-d` as
//! a reference. Build with `--release`: this is the boot-time path.
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

#[derive(Parser, Debug)]
#[command(about = "Per-compression decompression time of a real kernel's bzImage payload")]
struct Args {
    /// The bzImage [default: the newest vmlinuz* under target/kernel/].
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
    eprintln!("compressing with `{tool} {}` (cached in {}) ...", args.join(" "), path.display());
    let mut payload = pipe(tool, args, vmlinux)?;
    payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
    std::fs::write(&path, &payload).with_context(|| format!("writing {}", path.display()))?;
    Ok(payload)
}

fn default_kernel() -> Result<PathBuf> {
    let mut stack = vec![PathBuf::from("target/kernel")];
    let mut found = Vec::new();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry.file_name().to_string_lossy().starts_with("vmlinuz") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
        .pop()
        .context("no vmlinuz* under target/kernel/: run tools/fetch-kernel, or pass --kernel PATH")
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
        "{:<6} {:>11} {:>7} {:>10} {:>10} {:>10} {:>12}",
        "format", "payload B", "ratio", "median ms", "min ms", "MB/s out", "tool -d ms"
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
        for _ in 0..args.reps {
            let started = Instant::now();
            let out = decompress_payload(&payload)?;
            let elapsed = started.elapsed();
            match out {
                Some((f, out)) if f == format && out == vmlinux => {}
                _ => bail!("{format}: decompress_payload did not give back the vmlinux"),
            }
            times.push(elapsed);
        }
        times.sort();
        let median = times[times.len() / 2];
        let reference = if args.no_reference {
            "-".to_string()
        } else {
            let (tool, _) = compress_command(format);
            let started = Instant::now();
            pipe(tool, &["-dc"], &payload[..payload.len() - 4])
                .map(|_| format!("{:.1}", ms(started.elapsed())))
                .unwrap_or_else(|e| format!("({e})"))
        };
        println!(
            "{:<6} {:>11} {:>7.3} {:>10.1} {:>10.1} {:>10.0} {:>12}",
            format.to_string(),
            payload.len(),
            payload.len() as f64 / vmlinux.len() as f64,
            ms(median),
            ms(times[0]),
            vmlinux.len() as f64 / median.as_secs_f64() / 1e6,
            reference
        );
    }
    Ok(())
}
