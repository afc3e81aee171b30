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

/// The resident memory of process `pid` (VmRSS), in bytes; 0 once it is gone.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}
