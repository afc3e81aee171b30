//! Two test hosts on this machine: a pair of network namespaces of the test's own, joined by
//! a veth pair with addresses of their own, made by the test and removed when it ends. The
//! destination runs in one and the source in the other (`ip netns exec`), so a migration
//! crosses a real network link instead of loopback (`util::vmm_on_host` starts a `vmm` on a
//! host). Needs root and iproute2 (`tools/setup-host` installs it); elsewhere the tests that
//! use it skip with the reason.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The port the destination listens on (each namespace has its own ports).
pub const PORT: u16 = 4444;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces joined by a veth pair.
pub struct TwoHosts {
    /// The source's namespace.
    pub src: String,
    /// The destination's namespace.
    pub dst: String,
    /// The destination's address on the link.
    pub dst_ip: String,
}

/// Runs `ip` with `args`: its error output when it fails.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TwoHosts {
    /// Makes the two hosts, or `None` with the reason printed (not root, no iproute2).
    pub fn new(test: &str) -> Option<TwoHosts> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("{test}: skipped: network namespaces need root (CI runs as root)");
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        // 10.X.Y.0/24, distinct per process and test: the source is .1, the destination .2.
        let net = format!("10.{}.{}", 100 + n % 100, pid % 250);
        let hosts = TwoHosts {
            src: format!("vmmt-{tag}-src"),
            dst: format!("vmmt-{tag}-dst"),
            dst_ip: format!("{net}.2"),
        };
        let src_ip = format!("{net}.1");
        let (vs, vd) = (format!("vs{tag}"), format!("vd{tag}"));
        let made = (|| {
            ip(&["netns", "add", &hosts.src])?;
            ip(&["netns", "add", &hosts.dst])?;
            ip(&[
                "link", "add", &vs, "netns", &hosts.src, "type", "veth", "peer", "name", &vd,
                "netns", &hosts.dst,
            ])?;
            ip(&[
                "-n",
                &hosts.src,
                "addr",
                "add",
                &format!("{src_ip}/24"),
                "dev",
                &vs,
            ])?;
            ip(&[
                "-n",
                &hosts.dst,
                "addr",
                "add",
                &format!("{}/24", hosts.dst_ip),
                "dev",
                &vd,
            ])?;
            for (ns, dev) in [(&hosts.src, &vs), (&hosts.dst, &vd)] {
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            Ok::<(), String>(())
        })();
        match made {
            Ok(()) => Some(hosts),
            Err(e) if e.contains("No such file") => {
                eprintln!("{test}: skipped: no `ip` command (install iproute2: tools/setup-host)");
                None
            }
            // Root with iproute2 that still cannot make namespaces is a failure, not a skip.
            Err(e) => panic!("{test}: cannot make the test hosts: {e}"),
        }
    }

    /// The destination's `--incoming` (and the source's `--migrate-to`) address.
    pub fn dst_addr(&self) -> String {
        format!("tcp:{}:{PORT}", self.dst_ip)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Removing a namespace removes its end of the veth pair, and with it the other end.
        let _ = ip(&["netns", "del", &self.src]);
        let _ = ip(&["netns", "del", &self.dst]);
    }
}
