//! Shared helpers of the tools binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The project's test kernel and initramfs: the last line of `tools/build-test-kernel`'s and
/// `tools/build-test-initramfs`'s output (built, or taken from their cache).
pub fn test_kernel() -> Result<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = |tool: &str| -> Result<PathBuf> {
        let out = Command::new(root.join("tools").join(tool))
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running tools/{tool}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(text.lines().last().unwrap_or_default().trim());
        if !out.status.success() || !path.exists() {
            bail!("tools/{tool} failed: run tools/setup-host as root first");
        }
        Ok(path)
    };
    Ok((built("build-test-kernel")?, built("build-test-initramfs")?))
}

/// `--kernel` and `--initrd` as given, the project's test kernel and initramfs
/// ([`test_kernel`]) for what was not (they are built only when one is missing).
pub fn kernel_or_test_kernel(
    kernel: &Option<PathBuf>,
    initrd: &Option<PathBuf>,
) -> Result<(PathBuf, PathBuf)> {
    match (kernel, initrd) {
        (Some(k), Some(i)) => Ok((k.clone(), i.clone())),
        (k, i) => {
            let (tk, ti) = test_kernel()?;
            Ok((k.clone().unwrap_or(tk), i.clone().unwrap_or(ti)))
        }
    }
}

/// The resident memory of process `pid` (VmRSS), in bytes; 0 once it is gone.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

/// A child's stdout line by line (read on a thread of its own), with its last lines kept for
/// an error message.
pub struct ChildLines {
    rx: std::sync::mpsc::Receiver<String>,
    tail: std::collections::VecDeque<String>,
}

impl ChildLines {
    /// How many last lines [`ChildLines::tail`] gives.
    const KEPT: usize = 20;

    /// Takes `child`'s piped stdout.
    pub fn new(child: &mut std::process::Child) -> ChildLines {
        use std::io::BufRead;
        let stdout = child.stdout.take().expect("the child's stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildLines {
            rx,
            tail: std::collections::VecDeque::new(),
        }
    }

    /// The next line, or `None` once `deadline` passed or the child closed its stdout.
    pub fn next_until(&mut self, deadline: std::time::Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = self.rx.recv_timeout(left).ok()?;
        if self.tail.len() == Self::KEPT {
            self.tail.pop_front();
        }
        self.tail.push_back(line.clone());
        Some(line)
    }

    /// The last lines seen, one per line.
    pub fn tail(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// The median of `v` (NaN when empty; the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Waits up to `limit` for a guest `child` to power off by itself (so that runs do not
/// overlap), then kills it if it has not.
pub fn wait_for_poweroff(child: &mut std::process::Child, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while matches!(child.try_wait(), Ok(None)) {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.wait();
}
