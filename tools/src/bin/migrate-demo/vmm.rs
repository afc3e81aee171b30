//! The two `vmm` processes of the demo: what the binary supports (read from its `--help`), and
//! a running `vmm` whose output is echoed with a prefix, kept, and logged.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Lines of a failed process shown in the error.
pub const LAST_LINES: usize = 15;

/// What the vmm binary supports, read from its `--help`.
#[derive(Debug, Clone, Copy)]
pub struct VmmFeatures {
    pub migrate_json: bool,
    pub postcopy: bool,
    pub dirty_mode: bool,
    pub dirty_rate: bool,
    /// Migration still needs `--no-demand-paging` on both sides (older vmm).
    pub migration_needs_no_demand_paging: bool,
    pub prefault: bool,
}

pub fn probe(vmm: &Path) -> Result<VmmFeatures> {
    let out = Command::new(vmm)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", vmm.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(VmmFeatures {
        migrate_json: help.contains("--migrate-json"),
        postcopy: help.contains("--postcopy-after"),
        dirty_mode: help.contains("--dirty-mode"),
        dirty_rate: help.contains("--dirty-rate"),
        migration_needs_no_demand_paging: help.contains("needs --no-demand-paging"),
        prefault: help.contains("--prefault"),
    })
}

/// A running vmm whose output is echoed with a prefix, kept, and logged.
pub struct Vmm {
    pub name: &'static str,
    pub child: Child,
    /// Every line (stdout and stderr) with the time it arrived.
    pub lines: Arc<Mutex<Vec<(Instant, String)>>>,
    pub rx: Receiver<String>,
}

impl Vmm {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: &Path, echo: bool) -> Result<Vmm> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {name} vmm"))?;
        let log = Arc::new(Mutex::new(
            File::create(log).with_context(|| format!("creating {}", log.display()))?,
        ));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("piped"));
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("piped"));
        for stream in [out, err] {
            let (lines, log, tx): (_, _, Sender<String>) = (lines.clone(), log.clone(), tx.clone());
            std::thread::spawn(move || {
                for l in BufReader::new(stream).lines().map_while(Result::ok) {
                    if echo {
                        println!("[{name}] {l}");
                    }
                    let _ = writeln!(log.lock().unwrap_or_else(|p| p.into_inner()), "{l}");
                    lines
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), l.clone()));
                    let _ = tx.send(l);
                }
            });
        }
        Ok(Vmm {
            name,
            child,
            lines,
            rx,
        })
    }

    /// "source" or "destination", for messages.
    pub fn role(&self) -> &'static str {
        if self.name == "dst" {
            "destination"
        } else {
            "source"
        }
    }

    pub fn last_lines(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let from = lines.len().saturating_sub(LAST_LINES);
        lines[from..]
            .iter()
            .map(|(_, l)| format!("  [{}] {l}", self.name))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn has_line(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.line_time(pred).is_some()
    }

    /// When the first line matching `pred` arrived.
    pub fn line_time(&self, pred: impl Fn(&str) -> bool) -> Option<Instant> {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, l)| pred(l))
            .map(|(t, _)| *t)
    }

    /// Waits for a line containing `needle`; fails with the last lines if the process ends
    /// first or `limit` passes.
    pub fn wait_line(&mut self, needle: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(l) if l.contains(needle) => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) if left.is_zero() => bail!(
                    "the {} vmm did not print {needle:?} within {limit:?}; its last lines:\n{}",
                    self.role(),
                    self.last_lines()
                ),
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(st) = self.child.try_wait()? {
                        // Let the readers drain what the process printed last.
                        std::thread::sleep(Duration::from_millis(100));
                        bail!(
                            "the {} vmm exited ({st}) before printing {needle:?}; its last lines:\n{}",
                            self.role(),
                            self.last_lines()
                        );
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait()?;
                    bail!(
                        "the {} vmm exited ({st}) before printing {needle:?}; its last lines:\n{}",
                        self.role(),
                        self.last_lines()
                    );
                }
            }
        }
    }

    /// Waits for the process to exit, killing it after `limit`. Returns its exit code
    /// (-1 for a signal), or None if it had to be killed.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                return Ok(Some(st.code().unwrap_or(-1)));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}
