//! Shared by the kernel suites: the project's test kernel and initramfs
//! (`tools/build-test-kernel`, `tools/build-test-initramfs`), `vmm --kernel` processes with
//! their console in a file, and the control socket.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const VMM: &str = env!("CARGO_BIN_EXE_vmm");
/// One boot to /init takes 45-60 s here with the host idle; twice that when it is busy.
pub const BOOT_LIMIT: Duration = Duration::from_secs(400);
/// The small machine most kernel tests use: 256M on 4K pages, one vCPU.
pub const SMALL: &[&str] = &["--mem", "256M", "--cpus", "1", "--hugepages", "none"];

/// The test kernel and initramfs, or `None` with the reason printed.
pub fn test_kernel(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !crate::common::kvm_or_skip(test) {
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let build = |tool: &str| -> Option<PathBuf> {
        let out = Command::new(root.join("tools").join(tool))
            .stderr(Stdio::inherit())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(text.lines().last()?.trim());
        (out.status.success() && path.exists()).then_some(path)
    };
    match (build("build-test-kernel"), build("build-test-initramfs")) {
        (Some(k), Some(i)) => Some((k, i)),
        _ => {
            eprintln!(
                "{test}: skipped: tools/build-test-kernel or tools/build-test-initramfs \
                 failed (run tools/setup-host as root)"
            );
            None
        }
    }
}

/// A path in the temporary directory, unique to this process.
pub fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kernel-tests-{}-{name}", std::process::id()))
}

pub fn spawn(args: &[&str]) -> Child {
    Command::new(VMM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

/// A kernel VM's process with its console in a file.
pub struct KernelVm {
    pub child: Child,
    pub console: PathBuf,
}

impl KernelVm {
    /// Boots `kernel` with `initrd` and `cmdline` on the machine `machine` describes
    /// (`--mem`, `--cpus`, `--hugepages`, e.g. [`SMALL`]) plus `extra` flags.
    pub fn boot(
        kernel: &Path,
        initrd: &Path,
        name: &str,
        cmdline: &str,
        machine: &[&str],
        extra: &[&str],
    ) -> KernelVm {
        KernelVm::boot_with(kernel, Some(initrd), name, cmdline, machine, extra)
    }

    /// [`KernelVm::boot`] with the initrd optional.
    pub fn boot_with(
        kernel: &Path,
        initrd: Option<&Path>,
        name: &str,
        cmdline: &str,
        machine: &[&str],
        extra: &[&str],
    ) -> KernelVm {
        let console = tmp(&format!("{name}.console"));
        let serial = format!("file:{}", console.display());
        let mut args = vec![
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--serial",
            &serial,
        ];
        if let Some(i) = initrd {
            args.extend(["--initrd", i.to_str().unwrap()]);
        }
        args.extend_from_slice(machine);
        args.extend_from_slice(extra);
        KernelVm {
            child: spawn(&args),
            console,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Waits until the console has `needle` (or the VM ended, or the limit passed).
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.text().contains(needle) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.text().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Waits for the process to end by itself; (exit code, stderr, console).
    pub fn wait_end(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let t = Instant::now();
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code();
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let text = self.text();
        let _ = std::fs::remove_file(&self.console);
        (code, err, text)
    }

    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = self.text();
        let _ = std::fs::remove_file(&self.console);
        text
    }
}

/// A test that fails (panics) before it waited for its VM ends the VM here, so that it does
/// not go on loading the host under the tests that follow.
impl Drop for KernelVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `req` to the control socket and checks it succeeded.
pub fn request(sock: &Path, req: Value) -> Value {
    let v = vmm::api::request(sock, &req).expect("control socket answers");
    assert_eq!(v["ok"], true, "{req} -> {v}");
    v
}

pub fn wait_for_path(p: &Path) {
    let t = Instant::now();
    while !p.exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kernel's timestamp of a console line (`[   12.345678] ...`).
pub fn stamp(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (num, _) = rest.split_once(']')?;
    num.trim().parse().ok()
}
