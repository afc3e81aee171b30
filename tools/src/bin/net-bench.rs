//! net-bench: TCP throughput through virtio-net inside a guest against the same exchange between
//! two sockets of the host, side by side, as a ratio.
//!
//! It makes a network namespace of its own with a tap in it (removed at the end; needs root and
//! iproute2). For each rep, the project's test kernel boots in that namespace with `--net` on
//! the tap and runs the test initramfs's `net` program against a peer of this process on the
//! host side of the tap: the guest sends `--kib` KiB of a pattern, the peer checks it and sends
//! as much back, and the guest prints how long each way took on its clock. Right after, two
//! threads of this process do the same exchange over the loopback interface, timed the same way.
//! Guest and host runs alternate, rep after rep. The table gives the median MB/s each way and
//! the guest/host ratios.
//!
//! ```text
//! cargo build --release -p vmm -p tools
//! target/release/net-bench --kib 1024 --reps 2
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "virtio-net in the test kernel against the host's loopback: a TCP exchange each \
             way over a tap, MB/s, guest/host ratios (needs root)"
)]
struct Args {
    /// Our vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// The kernel [default: tools/build-test-kernel's, built or taken from its cache].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The initramfs with the `net` program [default: tools/build-test-initramfs's].
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// KiB sent each way per exchange (at most 1048576).
    #[arg(long, default_value_t = 1024)]
    kib: u64,
    /// Repetitions of each side.
    #[arg(long, short = 'n', default_value_t = 1)]
    reps: usize,
    /// Seconds a guest run may take.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

const SEED: u64 = 7;
const HOST_IP: &str = "10.211.0.1";
const GUEST_IP: &str = "10.211.0.2";

/// MB/s each way: (guest or host sending, the other sending).
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    out: f64,
    back: f64,
}

/// Byte `k` of the `net` program's pattern of `seed` (tools/test-initramfs/net.c).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..len.div_ceil(8) as u64)
        .flat_map(|i| mix(seed ^ i).to_le_bytes())
        .take(len)
        .collect()
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("ip {} (install iproute2)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace with a tap in it, removed on drop.
struct Net {
    ns: String,
    tap: String,
}

impl Net {
    fn new() -> Result<Net> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("net-bench makes a network namespace and a tap: run it as root");
        }
        let n = Net {
            ns: format!("vmmnb-{}", std::process::id()),
            tap: "nbtap0".into(),
        };
        ip(&["netns", "add", &n.ns])?;
        ip(&["-n", &n.ns, "tuntap", "add", "dev", &n.tap, "mode", "tap"])?;
        ip(&[
            "-n",
            &n.ns,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            &n.tap,
        ])?;
        ip(&["-n", &n.ns, "link", "set", &n.tap, "up"])?;
        ip(&["-n", &n.ns, "link", "set", "lo", "up"])?;
        Ok(n)
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) -> Result<()> {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.ns))?;
        // SAFETY: setns on an open namespace fd; it changes only this thread's namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Serves one exchange on `l` before `limit`: reads the round number and the data until the
/// other side shuts its side, checks it, sends `reply`. Whether the data was `want`.
fn serve(l: &TcpListener, limit: Instant, want: &[u8], reply: &[u8]) -> Result<bool> {
    l.set_nonblocking(true)?;
    let mut conn = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > limit {
                    bail!("no connection in time");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut got = Vec::with_capacity(want.len() + 8);
    conn.read_to_end(&mut got)?;
    conn.write_all(reply)?;
    Ok(got.len() == want.len() + 8 && got[8..] == *want)
}

/// Parses the guest's `NET sent B sum S in T s` or `NET received B sum S in T s ok` line:
/// (sent, MB/s).
fn parse_line(line: &str, bytes: u64) -> Option<(bool, f64)> {
    let rest = line.trim().strip_prefix("NET ")?;
    let w: Vec<&str> = rest.split_whitespace().collect();
    let sent = match *w.first()? {
        "sent" => true,
        "received" => false,
        _ => return None,
    };
    if w.get(1)?.parse::<u64>().ok()? != bytes {
        return None;
    }
    if !sent && w.last() != Some(&"ok") {
        return None;
    }
    let at = w.iter().position(|x| *x == "in")?;
    let secs: f64 = w.get(at + 1)?.parse().ok()?;
    Some((sent, bytes as f64 / secs / 1e6))
}

/// Boots the guest in the namespace and returns its exchange's figures.
fn guest_run(a: &Args, net: &Net, kernel: &Path, initrd: &Path) -> Result<Run> {
    let bytes = (a.kib << 10) as usize;
    let want = pattern(bytes, SEED);
    let reply = pattern(bytes, SEED + 1);
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Run> {
            net.enter()?;
            let l = TcpListener::bind((HOST_IP, 0))?;
            let port = l.local_addr()?.port();
            let cmdline =
                format!("console=ttyS0 run=net,{GUEST_IP},24,{HOST_IP},{port},{bytes},{SEED}");
            let mut child = Command::new(&a.vmm)
                .arg("--kernel")
                .arg(kernel)
                .arg("--initrd")
                .arg(initrd)
                .args(["--mem", "256M", "--cpus", "1", "--hugepages", "none"])
                .args(["--cmdline", &cmdline, "--net", &format!("tap={}", net.tap)])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", a.vmm.display()))?;
            let limit = Instant::now() + Duration::from_secs(a.timeout);
            let mut out = tools::ChildLines::new(&mut child);
            let whole = serve(&l, limit, &want, &reply);
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
                match parse_line(&line, bytes as u64) {
                    Some((true, mbps)) => {
                        run.out = mbps;
                        seen.0 = true;
                    }
                    Some((false, mbps)) => {
                        run.back = mbps;
                        seen.1 = true;
                    }
                    None if line.contains("NET") && line.contains("FAIL") => {
                        let _ = child.kill();
                        bail!("the guest's exchange failed: {line}");
                    }
                    None => {}
                }
            }
            if !whole? {
                let _ = child.kill();
                bail!("the guest's data was not its pattern");
            }
            tools::wait_for_poweroff(&mut child, Duration::from_secs(120));
            Ok(run)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the guest run's thread panicked"))?
    })
}

/// The same exchange between two threads over loopback.
fn host_run(a: &Args) -> Result<Run> {
    let bytes = (a.kib << 10) as usize;
    let want = pattern(bytes, SEED);
    let reply = pattern(bytes, SEED + 1);
    let l = TcpListener::bind(("127.0.0.1", 0))?;
    let addr = l.local_addr()?;
    std::thread::scope(|s| {
        let peer = s.spawn(|| serve(&l, Instant::now() + Duration::from_secs(60), &want, &reply));
        let mut c = TcpStream::connect(addr)?;
        let t = Instant::now();
        c.write_all(&0u64.to_le_bytes())?;
        c.write_all(&want)?;
        let out = t.elapsed().as_secs_f64();
        c.shutdown(Shutdown::Write)?;
        let t = Instant::now();
        let mut back = Vec::with_capacity(bytes);
        c.read_to_end(&mut back)?;
        let back_s = t.elapsed().as_secs_f64();
        if !peer
            .join()
            .map_err(|_| anyhow::anyhow!("the peer panicked"))??
            || back != reply
        {
            bail!("the host's exchange lost data");
        }
        Ok(Run {
            out: bytes as f64 / out / 1e6,
            back: bytes as f64 / back_s / 1e6,
        })
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.kib == 0 || a.kib > 1 << 20 || a.reps == 0 {
        bail!("--kib must be 1 to 1048576 and --reps at least 1");
    }
    if !a.vmm.exists() {
        bail!(
            "{} not found: cargo build --release -p vmm first (or give --vmm)",
            a.vmm.display()
        );
    }
    let (kernel, initrd) = tools::kernel_or_test_kernel(&a.kernel, &a.initrd)?;
    let net = Net::new()?;
    println!(
        "net-bench: {} KiB each way per exchange, {} rep(s); guest over a tap in namespace {}, \
         host over loopback",
        a.kib, a.reps, net.ns
    );
    let (mut guest, mut host) = (Vec::new(), Vec::new());
    for rep in 1..=a.reps {
        let t = Instant::now();
        let g = guest_run(&a, &net, &kernel, &initrd)?;
        println!(
            "  rep {rep}: guest sends {:.3} MB/s, receives {:.3} MB/s ({:.0} s with the boot)",
            g.out,
            g.back,
            t.elapsed().as_secs_f64()
        );
        let h = host_run(&a)?;
        println!(
            "  rep {rep}: host  sends {:.1} MB/s, receives {:.1} MB/s",
            h.out, h.back
        );
        guest.push(g);
        host.push(h);
    }
    println!();
    println!("| direction | guest MB/s | host MB/s | guest/host |");
    println!("|---|---|---|---|");
    for (dir, pick) in [
        ("sending", (|r: &Run| r.out) as fn(&Run) -> f64),
        ("receiving", |r: &Run| r.back),
    ] {
        let g = tools::median(guest.iter().map(pick).collect());
        let h = tools::median(host.iter().map(pick).collect());
        println!("| {dir} | {g:.3} | {h:.1} | {:.5} |", g / h);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_programs_lines_parse() {
        let (sent, mbps) =
            parse_line("NET sent 1048576 sum be35ad2fa552a2d0 in 2.000 s", 1 << 20).unwrap();
        assert!(sent);
        assert!((mbps - 0.524288).abs() < 1e-9);
        let (sent, _) = parse_line(
            "NET received 1048576 sum eb520387aaed685c in 1.000 s ok",
            1 << 20,
        )
        .unwrap();
        assert!(!sent);
        assert!(parse_line("NET received 1048576 sum 0 in 1.000 s FAIL", 1 << 20).is_none());
        assert!(parse_line("NET sent 5 sum 0 in 1.000 s", 1 << 20).is_none());
        assert!(parse_line("NET eth0 mac 52:54:00:12:34:56", 1 << 20).is_none());
    }

    /// The pattern's first word is the guest's (mix(seed ^ 0)), cut at any length.
    #[test]
    fn the_pattern_is_the_guests_and_cuts_anywhere() {
        let p = pattern(13, 31);
        assert_eq!(p.len(), 13);
        assert_eq!(p[..8], pattern(8, 31)[..]);
        assert_ne!(pattern(8, 31), pattern(8, 32));
    }
}
