//! `vmmctl`: the command-line client of the VMM's control socket (`vmm --api-socket PATH`).
//!
//! ```text
//! vmmctl --socket /run/vmm.sock stats
//! vmmctl --socket /run/vmm.sock reclaim 1G 512M     # GPA and length: decimal, 0x hex, K/M/G/T
//! vmmctl --socket /run/vmm.sock pause | resume
//! vmmctl --socket /run/vmm.sock info               # state, vCPUs, memory, backing, uptime
//! vmmctl --socket /run/vmm.sock shutdown           # ACPI power button, hard stop on timeout
//! vmmctl --socket /run/vmm.sock migrate --to tcp:127.0.0.1:4444   # precopy live migration
//! vmmctl --socket /run/vmm.sock migrate --to tcp:127.0.0.1:4444 --postcopy-after 2
//! vmmctl --socket /run/vmm.sock receive --from tcp:0.0.0.0:4444   # a `vmm --stay` with no VM
//! vmmctl --socket /run/vmm.sock balloon 512M       # ask the guest for 512M back (vmm --balloon)
//! vmmctl --socket /run/vmm.sock balloon            # the balloon's figures and guest statistics
//! ```
//!
//! Prints the response (stats pretty-printed); exits 1 with the VMM's error text when the
//! response says `"ok": false`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Client of the VMM control socket.
#[derive(Parser, Debug)]
#[command(name = "vmmctl", version, about)]
struct Cli {
    /// Path of the VMM's control socket (`vmm --api-socket PATH`).
    #[arg(long, short, value_name = "PATH")]
    socket: PathBuf,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the VMM's statistics (stage2, demand paging, emulated instructions).
    Stats,
    /// Print what the VM is: state, vCPUs, memory, backing, uptime, dirty mode, payload.
    Info,
    /// Ask the guest to power off (ACPI power button); the VMM stops it after a timeout if
    /// it does not.
    Shutdown,
    /// Drop the host memory behind guest range [GPA, GPA+LEN); the guest sees zeroes there.
    Reclaim {
        /// Guest-physical start: 4096, 0x40000000, 1G.
        #[arg(value_parser = parse_size)]
        gpa: u64,
        /// Length: 2M, 1G, 0x200000.
        #[arg(value_parser = parse_size)]
        len: u64,
    },
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// Live-migrate the VM to a `vmm --incoming ADDR` destination; returns once the guest
    /// runs there (raise --timeout for large guests).
    Migrate {
        /// The destination: tcp:HOST:PORT or unix:PATH.
        #[arg(long, value_name = "ADDR")]
        to: String,
        /// Switch to postcopy after N rounds (1 = right after the full pass); the
        /// destination needs demand paging. The dirty-tracking mode is the VM's --dirty-mode.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        postcopy_after: Option<u32>,
    },
    /// Make a `vmm --stay` whose VM has left listen for the next VM's migration source;
    /// returns once it listens (then `vmmctl migrate --to` the same address on the source).
    Receive {
        /// Where to listen: tcp:HOST:PORT or unix:PATH.
        #[arg(long, value_name = "ADDR")]
        from: String,
    },
    /// Set the balloon's size (how much of its memory the guest gives back to the host;
    /// `vmm --balloon`), then print its figures and the guest's memory statistics. Without
    /// SIZE, only print them.
    Balloon {
        /// The balloon's size: 0 (give everything back to the guest), 512M, 1G.
        #[arg(value_parser = parse_size)]
        size: Option<u64>,
    },
}

/// Parses a size or address: decimal or `0x` hex, with an optional K/M/G/T (binary) suffix.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a size: write 4096, 0x1000, 512M or 1G");
    let (num, shift) = match t.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&t[..t.len() - 1], 10),
        Some(b'M') => (&t[..t.len() - 1], 20),
        Some(b'G') => (&t[..t.len() - 1], 30),
        Some(b'T') => (&t[..t.len() - 1], 40),
        Some(_) => (t, 0),
        None => return Err(bad()),
    };
    let v = match num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).map_err(|_| bad())?,
        None => num.parse::<u64>().map_err(|_| bad())?,
    };
    v.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} does not fit in 64 bits"))
}

fn request_of(cmd: &Cmd) -> Value {
    match cmd {
        Cmd::Stats => json!({"cmd": "stats"}),
        Cmd::Info => json!({"cmd": "info"}),
        Cmd::Shutdown => json!({"cmd": "shutdown"}),
        Cmd::Reclaim { gpa, len } => json!({"cmd": "reclaim", "gpa": gpa, "len": len}),
        Cmd::Pause => json!({"cmd": "pause"}),
        Cmd::Resume => json!({"cmd": "resume"}),
        Cmd::Migrate {
            to,
            postcopy_after: None,
        } => json!({"cmd": "migrate", "to": to}),
        Cmd::Migrate {
            to,
            postcopy_after: Some(n),
        } => json!({"cmd": "migrate", "to": to, "postcopy_after": n}),
        Cmd::Receive { from } => json!({"cmd": "receive", "from": from}),
        Cmd::Balloon { size: None } => json!({"cmd": "balloon"}),
        Cmd::Balloon { size: Some(n) } => json!({"cmd": "balloon", "size": n}),
    }
}

fn send(socket: &Path, req: &Value, timeout: Duration) -> Result<Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to {}: is the VMM running with --api-socket {}?",
            socket.display(),
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .context("sending the request")?;
    let mut resp = String::new();
    BufReader::new(s)
        .read_line(&mut resp)
        .context("reading the answer (raise --timeout for long reclaims)")?;
    if resp.is_empty() {
        bail!("the VMM closed the connection without answering");
    }
    serde_json::from_str(&resp).with_context(|| format!("the VMM's answer is not JSON: {resp:?}"))
}

fn run(cli: &Cli) -> Result<bool> {
    let resp = send(
        &cli.socket,
        &request_of(&cli.cmd),
        Duration::from_secs(cli.timeout),
    )?;
    if resp["ok"] != true {
        let msg = resp["error"].as_str().unwrap_or("no error text");
        eprintln!("vmmctl: the VMM refused: {msg}");
        return Ok(false);
    }
    match &cli.cmd {
        Cmd::Stats => println!("{}", serde_json::to_string_pretty(&resp["stats"])?),
        Cmd::Info => println!("{}", serde_json::to_string_pretty(&resp["info"])?),
        Cmd::Shutdown => println!("{}", serde_json::to_string_pretty(&resp["shutdown"])?),
        Cmd::Reclaim { .. } => println!("{}", serde_json::to_string_pretty(&resp["reclaim"])?),
        Cmd::Pause => println!("paused"),
        Cmd::Resume => println!("resumed"),
        Cmd::Migrate { .. } => println!("{}", serde_json::to_string_pretty(&resp["migrate"])?),
        Cmd::Receive { .. } => println!("{}", serde_json::to_string_pretty(&resp["receive"])?),
        Cmd::Balloon { .. } => println!("{}", serde_json::to_string_pretty(&resp["balloon"])?),
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vmmctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0x40000000"), Ok(1 << 30));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn command_line_builds_the_request() {
        let cli =
            Cli::try_parse_from(["vmmctl", "--socket", "/x", "reclaim", "0x200000", "2M"]).unwrap();
        assert_eq!(
            request_of(&cli.cmd),
            json!({"cmd":"reclaim","gpa":0x200000,"len":2<<20})
        );
        assert!(Cli::try_parse_from(["vmmctl", "--socket", "/x", "reclaim", "1G"]).is_err());
        assert!(Cli::try_parse_from(["vmmctl", "--socket", "/x", "reclaim", "x", "1G"]).is_err());
        let cli = Cli::try_parse_from([
            "vmmctl",
            "--socket",
            "/x",
            "migrate",
            "--to",
            "tcp:127.0.0.1:4444",
        ])
        .unwrap();
        assert_eq!(
            request_of(&cli.cmd),
            json!({"cmd":"migrate","to":"tcp:127.0.0.1:4444"})
        );
        assert!(Cli::try_parse_from(["vmmctl", "--socket", "/x", "migrate"]).is_err());
        let cli = Cli::try_parse_from([
            "vmmctl",
            "--socket",
            "/x",
            "migrate",
            "--to",
            "unix:/tmp/m",
            "--postcopy-after",
            "2",
        ])
        .unwrap();
        assert_eq!(
            request_of(&cli.cmd),
            json!({"cmd":"migrate","to":"unix:/tmp/m","postcopy_after":2})
        );
        let zero = ["vmmctl", "--socket", "/x", "migrate", "--to", "unix:/m"];
        assert!(Cli::try_parse_from(zero.iter().chain(&["--postcopy-after", "0"])).is_err());
        assert!(
            Cli::try_parse_from(["vmmctl", "stats"]).is_err(),
            "--socket is required"
        );
    }

    #[test]
    fn talks_json_lines_and_reports_refusals() {
        let path = std::env::temp_dir().join(format!("vmmctl-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                r#"{"ok":true}"#,
                r#"{"ok":false,"error":"reclaim range 0x1001+0x1000 is not aligned"}"#,
            ] {
                let (s, _) = l.accept().unwrap();
                let mut line = String::new();
                BufReader::new(s.try_clone().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                let req: Value = serde_json::from_str(&line).unwrap();
                assert!(req["cmd"].is_string());
                (&s).write_all(format!("{answer}\n").as_bytes()).unwrap();
            }
        });
        let cli = Cli::try_parse_from(["vmmctl", "-s", path.to_str().unwrap(), "pause"]).unwrap();
        assert!(run(&cli).unwrap());
        let cli = Cli::try_parse_from([
            "vmmctl",
            "-s",
            path.to_str().unwrap(),
            "reclaim",
            "0x1001",
            "4K",
        ])
        .unwrap();
        assert!(!run(&cli).unwrap(), "a refusal is a failure");
        server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = run(&cli).unwrap_err().to_string();
        assert!(err.contains("is the VMM running"), "{err}");
    }
}
