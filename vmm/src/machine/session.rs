//! A running machine's session: the control socket (stats, info, reclaim, pause, resume,
//! migrate, shutdown) and the main thread's wait for the VM's end, which also carries out
//! migrations, the same for a booted kernel and a test guest.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::reclaim::Reclaimer;
use super::Machine;
use crate::api::{self, ApiServer, ApiTarget};
use crate::devices::i8042::I8042;
use crate::dirty::DirtySource;
use crate::dirty::HostChangeRefused;
use crate::migrate::source::{self, MigrateConfig};
use crate::migrate::Address;
use crate::migrate::MigrateError;
use crate::pager::Pager;
use crate::vcpu::{ExitRequest, VmControl};

/// How often the main thread looks for a control-socket `migrate` request.
const MIGRATE_POLL: Duration = Duration::from_millis(100);

/// How long `shutdown` waits for the guest to power off after the power button before it
/// stops the VM itself.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Exit code of a VM stopped by `shutdown` (the guest powered off, or did not in time).
pub const EXIT_SHUTDOWN: i32 = 0;

/// How waiting for the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The VM stopped with this code.
    Exit(i32),
    /// The time limit passed.
    Timeout,
    /// The guest moved to a migration destination.
    Migrated,
    /// A postcopy migration failed after the destination's guest started: the guest is lost.
    Lost,
}

/// A control-socket migration request (address, postcopy after N rounds) and where its
/// answer goes.
type MigrateRequest = (Address, Option<u32>, Sender<Result<Value, String>>);

/// What a session is given besides the machine.
pub struct SessionConfig {
    /// `--api-socket`.
    pub api_socket: Option<PathBuf>,
    /// Precopy knobs (`--downtime-ms`, `--max-rounds`).
    pub migrate: MigrateConfig,
    /// `--migrate-json`.
    pub migrate_json: Option<PathBuf>,
    /// The machine spec a migration's header carries (JSON).
    pub spec: Vec<u8>,
    /// The i8042, when the payload has one (its state migrates).
    pub i8042: Option<Arc<I8042>>,
    /// Presses the guest's power button (ACPI), when the payload has one; without it
    /// `shutdown` stops the VM at once.
    pub power_button: Option<Box<dyn Fn() -> Result<(), String> + Send + Sync>>,
    /// Names the payload in `info` (`kernel`, `guest stress`, ...).
    pub payload: String,
}

/// A running machine with its control socket.
pub struct Session<'m> {
    machine: &'m Machine,
    control: Arc<Mutex<VmControl>>,
    dirty: DirtySource,
    cfg: MigrateConfig,
    json: Option<PathBuf>,
    spec: Vec<u8>,
    i8042: Option<Arc<I8042>>,
    migrate_rx: Option<Receiver<MigrateRequest>>,
    api: Option<ApiServer>,
}

impl<'m> Session<'m> {
    /// Serves the control socket (when asked) for `machine`, whose vCPUs `control` runs;
    /// reclaims go through `reclaimer`.
    pub fn new(
        machine: &'m Machine,
        control: Arc<Mutex<VmControl>>,
        reclaimer: Arc<Reclaimer>,
        cfg: SessionConfig,
    ) -> anyhow::Result<Session<'m>> {
        let (migrate_tx, migrate_rx) = channel::<MigrateRequest>();
        let api = match &cfg.api_socket {
            Some(path) => {
                let info = Info {
                    control: control.clone(),
                    mem: machine.ram().size(),
                    backing: machine.ram().backing().to_string(),
                    demand_paging: machine.pager().is_some(),
                    dirty_mode: crate::migrate::summary::dirty_mode_name(machine.dirty_mode())
                        .into(),
                    started: Instant::now(),
                    payload: cfg.payload.clone(),
                };
                Some(api::serve(
                    path,
                    Arc::new(MachineApi {
                        pager: machine.pager().cloned(),
                        reclaimer,
                        control: control.clone(),
                        host_changes: machine.host_changes().clone(),
                        exit: machine.exit().clone(),
                        migrate: Mutex::new(migrate_tx),
                        info,
                        power_button: cfg.power_button,
                    }),
                )?)
            }
            None => None,
        };
        Ok(Session {
            machine,
            dirty: machine.dirty_source(),
            control,
            cfg: cfg.migrate,
            json: cfg.migrate_json,
            spec: cfg.spec,
            i8042: cfg.i8042,
            migrate_rx: Some(migrate_rx),
            api,
        })
    }

    /// The running vCPUs.
    pub fn control(&self) -> &Arc<Mutex<VmControl>> {
        &self.control
    }

    /// Waits for the VM to stop, at most `limit`, carrying out `migrate` requests of the
    /// control socket meanwhile.
    pub fn wait(&self, limit: Option<Duration>) -> Waited {
        let deadline = limit.map(|l| Instant::now() + l);
        let exit = self.machine.exit();
        loop {
            let mut slice = MIGRATE_POLL;
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return Waited::Timeout;
                }
                slice = slice.min(d - now);
            }
            if let Some(code) = exit.wait_timeout(slice) {
                return Waited::Exit(code);
            }
            let Some(rx) = &self.migrate_rx else { continue };
            while let Ok((addr, postcopy_after, reply)) = rx.try_recv() {
                let (res, waited) = self.migrate(&addr, postcopy_after);
                let _ = reply.send(res);
                if let Some(w) = waited {
                    return w;
                }
            }
        }
    }

    /// `--migrate-to`: when `addr` is given, lets the VM run `delay` first, then migrates to
    /// `addr` (postcopy after `postcopy_after` rounds when given). `Timeout` when the VM still
    /// runs here afterwards (no migration asked, or it failed and the VM keeps running).
    pub fn migrate_to(
        &self,
        addr: Option<&Address>,
        delay: Duration,
        postcopy_after: Option<u32>,
    ) -> Waited {
        let Some(addr) = addr else {
            return Waited::Timeout;
        };
        if !delay.is_zero() {
            let waited = self.wait(Some(delay));
            if waited != Waited::Timeout {
                return waited;
            }
        }
        self.migrate(addr, postcopy_after)
            .1
            .unwrap_or(Waited::Timeout)
    }

    /// Migrates to `addr`, printing the outcome and writing `--migrate-json` when asked.
    /// Returns the answer for the control socket and, when the guest no longer runs here, how
    /// the wait ends: `Migrated`, or `Lost` when a postcopy failed after the destination took
    /// over. On any other failure the VM keeps running here.
    pub fn migrate(
        &self,
        addr: &Address,
        postcopy_after: Option<u32>,
    ) -> (Result<Value, String>, Option<Waited>) {
        let cfg = MigrateConfig {
            postcopy_after,
            ..self.cfg
        };
        let mut src = self.machine.source(&self.control, &self.dirty);
        src.spec = &self.spec;
        src.i8042 = self.i8042.as_deref();
        match source::send(&src, addr, cfg) {
            Ok(s) => {
                println!(
                    "migration to {addr} complete ({}, {}): total {:.3} s, downtime {:.1} ms, {} rounds, {:.1} MB sent, {} pages in the last round{}",
                    if s.postcopy.is_some() { "postcopy" } else { "precopy" },
                    s.dirty_mode,
                    s.total_ms / 1e3,
                    s.downtime_ms,
                    s.rounds.len(),
                    s.bytes_sent as f64 / 1e6,
                    s.rounds.last().map_or(0, |r| r.dirty_pages),
                    match &s.postcopy {
                        Some(p) => format!(
                            "; postcopy {:.3} s, {} pages on request, {} pushed",
                            p.ms / 1e3,
                            p.requested_pages,
                            p.pushed_pages
                        ),
                        None => String::new(),
                    }
                );
                if let Some(path) = &self.json {
                    if let Err(e) = s.write(path) {
                        eprintln!(
                            "cannot write --migrate-json {}: {e}; the migration itself succeeded",
                            path.display()
                        );
                    }
                }
                let mut v = s.to_json();
                v["to"] = Value::String(addr.to_string());
                (Ok(v), Some(Waited::Migrated))
            }
            Err(e @ MigrateError::PostcopyLost(_)) => {
                let msg = format!("migration to {addr} failed: {e}");
                eprintln!("{msg}");
                (Err(msg), Some(Waited::Lost))
            }
            Err(e) => {
                // A failed migration resumes the VM it paused, and leaves one that was paused
                // before as it was (see source::send): paused now means paused before.
                let paused = self
                    .control
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .all_paused();
                let msg = if paused {
                    format!(
                        "migration to {addr} failed: {e}; the VM stays here, paused as it was \
                         (vmmctl resume runs it again)"
                    )
                } else {
                    format!("migration to {addr} failed: {e}; the VM keeps running here")
                };
                eprintln!("{msg}");
                (Err(msg), None)
            }
        }
    }

    /// Stops serving the control socket and taking migration requests.
    pub fn close(&mut self) {
        self.migrate_rx = None;
        self.api = None;
    }

    /// Closes the session and stops every vCPU.
    pub fn stop(mut self) {
        self.close();
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop_all();
    }
}

/// What `info` reports.
struct Info {
    control: Arc<Mutex<VmControl>>,
    mem: u64,
    backing: String,
    demand_paging: bool,
    dirty_mode: String,
    started: Instant,
    payload: String,
}

impl Info {
    fn to_json(&self) -> Value {
        let (vcpus, paused) = {
            let c = self.control.lock().unwrap_or_else(|p| p.into_inner());
            (c.len(), c.all_paused())
        };
        json!({
            "state": if paused { "paused" } else { "running" },
            "payload": self.payload,
            "vcpus": vcpus,
            "memory_bytes": self.mem,
            "backing": self.backing,
            "demand_paging": self.demand_paging,
            "dirty_mode": self.dirty_mode,
            "uptime_s": self.started.elapsed().as_secs_f64(),
        })
    }
}

/// The control socket's view of a machine.
struct MachineApi {
    pager: Option<Arc<Pager>>,
    reclaimer: Arc<Reclaimer>,
    control: Arc<Mutex<VmControl>>,
    host_changes: Arc<crate::dirty::HostChanges>,
    exit: ExitRequest,
    migrate: Mutex<Sender<MigrateRequest>>,
    info: Info,
    power_button: Option<Box<dyn Fn() -> Result<(), String> + Send + Sync>>,
}

impl ApiTarget for MachineApi {
    fn stats(&self) -> Value {
        let mut v = match &self.pager {
            Some(p) => p.stats().to_json(),
            None => json!({ "paging": null, "stage2": null }),
        };
        let emulation = self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .emulation_stats()
            .to_json();
        v["emulation"] = emulation;
        v
    }
    fn reclaim(&self, gpa: u64, len: u64) -> Result<Value, String> {
        self.reclaimer.reclaim(gpa, len).map_err(|e| e.to_string())
    }
    fn pause(&self) -> Result<(), String> {
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pause_all()
            .map_err(|e| e.to_string())
    }
    fn resume(&self) -> Result<(), String> {
        // A resume that waited for a migration's end must not run a guest that moved.
        let control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if self.host_changes.migrated() {
            return Err(HostChangeRefused::Migrated.to_string());
        }
        control.resume_all().map_err(|e| e.to_string())
    }
    fn migrate(&self, to: &str, postcopy_after: Option<u32>) -> Result<Value, String> {
        if postcopy_after == Some(0) {
            return Err(
                "\"postcopy_after\": 0: give at least 1 (round 0 is the full pass of RAM)".into(),
            );
        }
        let addr: Address = to.parse().map_err(|e| format!("\"to\": {e}"))?;
        let (tx, rx) = channel();
        self.migrate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((addr, postcopy_after, tx))
            .map_err(|_| "the VM is stopping; nothing to migrate".to_string())?;
        rx.recv()
            .map_err(|_| "the VM stopped before the migration started".to_string())?
    }
    fn info(&self) -> Value {
        self.info.to_json()
    }
    fn shutdown(&self) -> Result<Value, String> {
        if self.host_changes.migrated() {
            return Err(HostChangeRefused::Migrated.to_string());
        }
        let started = Instant::now();
        let Some(press) = &self.power_button else {
            self.exit.request(
                EXIT_SHUTDOWN,
                "shutdown requested (this guest has no power button)",
            );
            return Ok(json!({"how": "stopped", "seconds": 0.0}));
        };
        if self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .all_paused()
        {
            self.exit
                .request(EXIT_SHUTDOWN, "shutdown requested while the VM was paused");
            return Ok(json!({"how": "stopped", "seconds": 0.0}));
        }
        press()?;
        match self.exit.wait_timeout(SHUTDOWN_GRACE) {
            Some(code) => Ok(json!({
                "how": "powered off",
                "exit_code": code,
                "seconds": started.elapsed().as_secs_f64(),
            })),
            None => {
                self.exit.request(
                    EXIT_SHUTDOWN,
                    &format!(
                        "shutdown: the guest did not power off within {} s of the power \
                         button; stopped",
                        SHUTDOWN_GRACE.as_secs()
                    ),
                );
                Ok(json!({
                    "how": "stopped after timeout",
                    "seconds": started.elapsed().as_secs_f64(),
                }))
            }
        }
    }
}
