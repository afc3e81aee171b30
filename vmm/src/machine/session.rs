//! A running machine's session: the control socket (stats, info, reclaim, pause, resume,
//! migrate, shutdown) and the main thread's wait for the VM's end, which also carries out
//! migrations, the same for a booted kernel and a test guest.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::console;
use super::idle::IdleWatch;
use super::reclaim::Reclaimer;
use super::Machine;
use crate::api::{self, ApiServer, ApiTarget};
use crate::devices::i8042::I8042;
use crate::dirty::HostChangeRefused;
use crate::dirty::{DirtySource, DirtyTracker};
use crate::exit::{ExitRequest, EXIT_IDLE, EXIT_MIGRATE_FAILED, EXIT_OK, EXIT_SHUTDOWN_FORCED};
use crate::migrate::source::{self, MigrateConfig};
use crate::migrate::Address;
use crate::migrate::MigrateError;
use crate::pager::Pager;
use crate::vcpu::VmControl;
use crate::virtio::balloon::BalloonHandle;
use crate::virtio::MmioTransport;

/// How often the main thread looks for a control-socket `migrate` request.
const MIGRATE_POLL: Duration = Duration::from_millis(100);

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
    /// The guest's power button (ACPI), when the payload has one; without it `shutdown` stops
    /// the VM at once.
    pub power_button: Option<PowerButtonHooks>,
    /// How long `shutdown` waits for the guest to power off after the power button before it
    /// stops the VM itself (`--shutdown-timeout`).
    pub shutdown_timeout: Duration,
    /// Names the payload in `info` (`kernel`, `guest stress`, ...).
    pub payload: String,
    /// `--idle-timeout`: how long every vCPU may sit in HLT with interrupts on and nothing to
    /// wake it before the VM is ended as idle (`None`: never; see [`super::idle`]).
    pub idle_timeout: Option<Duration>,
    /// How long a control-socket client may go without a complete request line
    /// (`--api-timeout`).
    pub api_timeout: Duration,
    /// A test guest's report, which `stats` shows (`guest`: per vCPU its state, generation,
    /// pages verified, writes and pages re-initialised after reclaims).
    pub guest_report: Option<Arc<Mutex<guest_tests::Report>>>,
    /// `--dirty-harvest-ms`: dirty logging on while no migration runs, harvested this often.
    pub harvest_every: Option<Duration>,
    /// Why this VM cannot migrate, if it cannot (a `migrate` request gets it as the error).
    pub migration_blocker: Option<String>,
    /// The virtio-balloon's handle, when the VM has one (`balloon`, and `info` and `stats`
    /// show its figures).
    pub balloon: Option<BalloonHandle>,
    /// The virtio devices, in slot order (their state migrates).
    pub virtio: Vec<Arc<MmioTransport>>,
}

/// What the periodic harvests (`--dirty-harvest-ms`) did, for `stats`.
#[derive(Debug, Default)]
pub struct HarvestCounts {
    /// Harvests taken.
    pub harvests: AtomicU64,
    /// Dirty pages they returned.
    pub pages: AtomicU64,
}

/// `--dirty-harvest-ms`: a dirty tracker kept on while no migration runs and harvested every
/// `every` by the main thread (a stress of dirty logging beside faults and reclaims, and its
/// cost). A migration stops it first and takes its own; it starts again after a migration
/// that left the VM here.
struct Harvester {
    every: Duration,
    tracker: Option<Arc<DirtyTracker>>,
    next: Instant,
    counts: Arc<HarvestCounts>,
}

/// What the control socket does with a payload's power button.
pub struct PowerButtonHooks {
    /// Presses it.
    pub press: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
    /// Whether the guest listens to it (`None`: cannot tell); see
    /// [`super::GedListening::listening`].
    pub listening: Box<dyn Fn() -> Option<bool> + Send + Sync>,
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
    migrate_to_failed: std::cell::Cell<bool>,
    migration_blocker: Option<String>,
    virtio: Vec<Arc<MmioTransport>>,
    idle: std::cell::RefCell<IdleWatch>,
    harvester: std::cell::RefCell<Option<Harvester>>,
}

/// The process exit code of a VM that ended with `code`: [`EXIT_MIGRATE_FAILED`] instead of
/// [`EXIT_OK`] when its `--migrate-to` failed (the VM ran on here), so a script never reads a
/// migration that did not happen as a success. Any other code stays.
pub fn exit_code_after(code: i32, migrate_to_failed: bool) -> i32 {
    if code == EXIT_OK && migrate_to_failed {
        eprintln!(
            "error: --migrate-to failed (see above) and the VM ran on here until it ended; exit \
             code {EXIT_MIGRATE_FAILED}"
        );
        EXIT_MIGRATE_FAILED
    } else {
        code
    }
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
        let serves_socket = cfg.api_socket.is_some();
        let idle = IdleWatch::new(
            cfg.idle_timeout,
            Box::new(move || {
                if serves_socket {
                    Some("the control socket")
                } else if console::input_open() {
                    Some("console input")
                } else {
                    None
                }
            }),
        );
        let harvest_counts = Arc::new(HarvestCounts::default());
        let api = match &cfg.api_socket {
            Some(path) => {
                let power_button = cfg.power_button.map(Arc::new);
                let info = Info {
                    control: control.clone(),
                    mem: machine.ram().size(),
                    backing: machine.ram().backing().to_string(),
                    demand_paging: machine.pager().is_some(),
                    dirty_mode: crate::migrate::summary::dirty_mode_name(machine.dirty_mode())
                        .into(),
                    started: Instant::now(),
                    payload: cfg.payload.clone(),
                    power_button: power_button.clone(),
                    balloon: cfg.balloon.clone(),
                };
                Some(api::serve_with(
                    path,
                    Arc::new(MachineApi {
                        pager: machine.pager().cloned(),
                        reclaimer,
                        control: control.clone(),
                        host_changes: machine.host_changes().clone(),
                        exit: machine.exit().clone(),
                        migrate: Mutex::new(migrate_tx),
                        info,
                        power_button,
                        shutdown_timeout: cfg.shutdown_timeout,
                        guest: cfg.guest_report.clone(),
                        harvests: cfg.harvest_every.map(|e| (e, harvest_counts.clone())),
                        balloon: cfg.balloon.clone(),
                    }),
                    cfg.api_timeout,
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
            migrate_to_failed: std::cell::Cell::new(false),
            migration_blocker: cfg.migration_blocker,
            virtio: cfg.virtio,
            idle: std::cell::RefCell::new(idle),
            harvester: std::cell::RefCell::new(cfg.harvest_every.map(|every| Harvester {
                every,
                tracker: None,
                next: Instant::now(),
                counts: harvest_counts,
            })),
        })
    }

    /// The running vCPUs.
    pub fn control(&self) -> &Arc<Mutex<VmControl>> {
        &self.control
    }

    /// Waits for the VM to stop, at most `limit`, carrying out `migrate` requests of the
    /// control socket meanwhile, and ending a VM that halted for good with [`EXIT_IDLE`]
    /// (see [`super::idle`]).
    pub fn wait(&self, limit: Option<Duration>) -> Waited {
        let deadline = limit.map(|l| Instant::now() + l);
        let exit = self.machine.exit();
        loop {
            let mut slice = MIGRATE_POLL;
            if let Some(h) = self.harvester.borrow().as_ref() {
                slice = slice.min(h.next.saturating_duration_since(Instant::now()));
            }
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
            if let Some(why) = self
                .idle
                .borrow_mut()
                .poll(&self.control, self.machine.vm())
            {
                exit.request(EXIT_IDLE, &why);
                continue;
            }
            self.harvest_if_due();
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
    /// runs here afterwards (no migration asked, or it failed and the VM keeps running: then
    /// [`migrate_to_failed`](Self::migrate_to_failed) says so).
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
        let (res, waited) = self.migrate(addr, postcopy_after);
        if res.is_err() && waited.is_none() {
            self.migrate_to_failed.set(true);
        }
        waited.unwrap_or(Waited::Timeout)
    }

    /// Whether `--migrate-to` failed and left the VM running here (see [`exit_code_after`]).
    pub fn migrate_to_failed(&self) -> bool {
        self.migrate_to_failed.get()
    }

    /// `--dirty-harvest-ms`: starts logging on the first call, then harvests whenever the
    /// interval has passed. A failure turns the harvests off with a warning; the VM runs on.
    fn harvest_if_due(&self) {
        let mut slot = self.harvester.borrow_mut();
        let Some(h) = slot.as_mut() else { return };
        let now = Instant::now();
        if now < h.next {
            return;
        }
        h.next = now + h.every;
        let res = match &h.tracker {
            Some(t) => t.harvest().map(|bm| {
                h.counts.harvests.fetch_add(1, Ordering::Relaxed);
                h.counts.pages.fetch_add(bm.count(), Ordering::Relaxed);
            }),
            None => self
                .dirty
                .tracker(self.machine.vm(), self.machine.regions())
                .and_then(|t| {
                    // What logged before this tracker is not a harvest of it.
                    t.harvest()?;
                    h.tracker = Some(t);
                    Ok(())
                }),
        };
        if let Err(e) = res {
            log::warn!("--dirty-harvest-ms: harvesting failed ({e}); periodic harvests stop");
            if let Some(t) = h.tracker.take() {
                let _ = t.stop();
            }
            *slot = None;
        }
    }

    /// Stops the periodic harvests' logging (a migration takes its own tracker); the next
    /// wait starts it again.
    fn pause_harvests(&self) {
        if let Some(h) = self.harvester.borrow_mut().as_mut() {
            if let Some(t) = h.tracker.take() {
                if let Err(e) = t.stop() {
                    log::warn!("--dirty-harvest-ms: stopping dirty logging: {e}");
                }
            }
        }
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
        if let Some(why) = &self.migration_blocker {
            eprintln!("error: migration to {addr} refused: {why}");
            return (Err(why.clone()), None);
        }
        let cfg = MigrateConfig {
            postcopy_after,
            ..self.cfg.clone()
        };
        self.pause_harvests();
        let mut src = self.machine.source(&self.control, &self.dirty);
        src.spec = &self.spec;
        src.i8042 = self.i8042.as_deref();
        src.virtio = &self.virtio;
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
    power_button: Option<Arc<PowerButtonHooks>>,
    balloon: Option<BalloonHandle>,
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
            "power_button": self.power_button.as_ref().map(|b| json!({
                "guest_listening": (b.listening)(),
            })),
            "balloon": self.balloon.as_ref().map(|b| b.info(None)),
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
    power_button: Option<Arc<PowerButtonHooks>>,
    shutdown_timeout: Duration,
    guest: Option<Arc<Mutex<guest_tests::Report>>>,
    harvests: Option<(Duration, Arc<HarvestCounts>)>,
    balloon: Option<BalloonHandle>,
}

/// How long `balloon` waits for the guest's fresh statistics.
const BALLOON_STATS_WAIT: Duration = Duration::from_secs(1);

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
        if let Some(r) = &self.guest {
            let r = r.lock().unwrap_or_else(|p| p.into_inner());
            let vcpus: Vec<Value> = r
                .vcpus()
                .iter()
                .map(|c| {
                    json!({
                        "state": format!("{:?}", c.state).to_lowercase(),
                        "generation": c.generation,
                        "pages": c.pages,
                        "writes": c.writes,
                        "reinit": c.reinit,
                        "failure": c.failure,
                    })
                })
                .collect();
            v["guest"] = json!({ "failed": r.any_failed(), "vcpus": vcpus });
        }
        if let Some((every, c)) = &self.harvests {
            v["dirty_harvests"] = json!({
                "every_ms": every.as_millis() as u64,
                "harvests": c.harvests.load(Ordering::Relaxed),
                "pages": c.pages.load(Ordering::Relaxed),
            });
        }
        v
    }
    fn reclaim(&self, gpa: u64, len: u64) -> Result<Value, String> {
        self.reclaimer.reclaim(gpa, len).map_err(|e| e.to_string())
    }
    fn balloon(&self, size: Option<u64>) -> Result<Value, String> {
        let Some(b) = &self.balloon else {
            return Err("this VM has no balloon: start it with --balloon".into());
        };
        if self.host_changes.migrated() {
            return Err(HostChangeRefused::Migrated.to_string());
        }
        let set = size.map(|bytes| b.set_target(bytes)).transpose()?;
        let mut v = b.info(Some(BALLOON_STATS_WAIT));
        if let Some(set) = set {
            v["driver_told"] = set["driver_told"].clone();
        }
        Ok(v)
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
        let stop_now = |why: &str| {
            self.exit.request(EXIT_SHUTDOWN_FORCED, why);
            Ok(json!({"how": "stopped", "exit_code": EXIT_SHUTDOWN_FORCED, "seconds": 0.0}))
        };
        let Some(button) = &self.power_button else {
            return stop_now("shutdown: this guest has no power button; stopped at once");
        };
        if self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .all_paused()
        {
            return stop_now(
                "shutdown: the VM is paused and cannot hear the power button; stopped",
            );
        }
        let listening = (button.listening)();
        (button.press)()?;
        log::info!(
            "shutdown: power button pressed ({}); the guest has {} s to power off",
            match listening {
                Some(true) => "the guest listens to it",
                Some(false) => "the guest has not set up its interrupt and may not hear it",
                None => "whether the guest listens is unknown",
            },
            self.shutdown_timeout.as_secs_f64()
        );
        match self.exit.wait_timeout(self.shutdown_timeout) {
            Some(code) => Ok(json!({
                "how": if code == EXIT_OK { "powered off" } else { "ended" },
                "exit_code": code,
                "guest_listening": listening,
                "seconds": started.elapsed().as_secs_f64(),
            })),
            None => {
                self.exit.request(
                    EXIT_SHUTDOWN_FORCED,
                    &format!(
                        "shutdown: the guest did not power off within {} s of the power \
                         button (--shutdown-timeout){}; stopped",
                        self.shutdown_timeout.as_secs_f64(),
                        if listening == Some(false) {
                            ", and had not unmasked its interrupt (no ACPI GED driver yet)"
                        } else {
                            ""
                        }
                    ),
                );
                Ok(json!({
                    "how": "stopped after timeout",
                    "exit_code": EXIT_SHUTDOWN_FORCED,
                    "guest_listening": listening,
                    "seconds": started.elapsed().as_secs_f64(),
                }))
            }
        }
    }
}
