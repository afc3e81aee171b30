//! The one composition root of a VM, the same for a booted kernel and a built-in test guest:
//! guest RAM, the KVM VM and its vCPUs, COM1, the stage-2 pager, dirty tracking, the reclaim
//! gate and what the control socket and a migration need from them.
//!
//! A payload (a kernel in [`kernel`], a test guest in `crate::guest`) builds a [`Machine`],
//! puts its code and data into guest RAM, sets up the boot vCPU, adds its own devices to the
//! port bus and starts the vCPUs through [`Machine::start`]. Everything else (demand paging,
//! reclaim, stats, pause/resume, migration) is the machine's, so every guest gets it the same
//! way.

pub mod console;
pub mod idle;
pub mod incoming;
pub mod kernel;
pub mod reclaim;
pub mod session;
pub mod signals;
pub mod spec;
pub mod vacant;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::configure_vcpu;
use crate::cli::MachineArgs;
use crate::devices::acpi::{PowerButton, GED_GSI};
use crate::devices::serial::{SerialDevice, COM1_IRQ};
use crate::devices::IoBus;
use crate::dirty::{DirtyMode, DirtySource, DirtyTracker, HostChanges};
use crate::exit::{ExitRequest, EXIT_HOST_FAILED};
use crate::hypervisor::{Vcpu, Vm, VmHandle, VmOps};
use crate::memory::{human, BackingKind, GuestRam, RamRegion};
use crate::migrate::auth::Secret;
use crate::migrate::ram::RamPager;
use crate::migrate::source::{self, MigrateConfig};
use crate::migrate::state::VcpuCaps;
use crate::migrate::Address;
use crate::pager::{Pager, PagerConfig};
use crate::vcpu::{EmulationHooks, VcpuHooks, VmControl};

use reclaim::{DropFn, Handshake, Reclaimer};

/// How often the guest profiler samples each vCPU's RIP.
const PROFILE_INTERVAL: Duration = Duration::from_millis(5);

/// What a [`Machine`] is made of; the payload-independent half of the command line.
pub struct MachineConfig {
    /// Guest RAM bytes.
    pub mem: u64,
    /// vCPUs.
    pub cpus: u8,
    /// Host backing of guest RAM.
    pub backing: BackingKind,
    /// Demand paging through userfaultfd and stage2 (`--no-demand-paging` turns it off).
    pub demand_paging: bool,
    /// Populate every host page before anything runs (`--prefault`).
    pub prefault: bool,
    /// How a migration of this VM finds dirty pages.
    pub dirty_mode: DirtyMode,
    /// Whether this VM may migrate (it has `--migrate-to` or a control socket): KVM dirty rings
    /// are set up with the VM, and stage2 write tracking with the pager.
    pub migrates: bool,
    /// Where COM1's output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Help a software KVM where it needs it (`--no-host-quirks` turns it off): on `kvm_pvm`
    /// the syscall relay runs.
    pub host_quirks: bool,
}

/// How a VM left the process that ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The process exit code the VM's end gives (README "Exit codes").
    pub code: i32,
    /// Whether it migrated out: it runs on at the destination.
    pub migrated: bool,
}

impl Ended {
    /// A VM that ended here with `code`.
    pub fn here(code: i32) -> Ended {
        Ended {
            code,
            migrated: false,
        }
    }
}

/// RAM, VM, COM1, pager and the migration gate of one VM.
pub struct Machine {
    ram: GuestRam,
    vm: Vm,
    regions: Vec<RamRegion>,
    caps: Arc<VcpuCaps>,
    exit: ExitRequest,
    ring: Option<Arc<DirtyTracker>>,
    pager: Option<Arc<Pager>>,
    serial: Arc<SerialDevice>,
    host_changes: Arc<HostChanges>,
    demand_paging: bool,
    dirty_mode: DirtyMode,
    migrates: bool,
    backing: BackingKind,
    created: Instant,
    /// Whether the vCPUs run the syscall relay (its MSR filter is on the VM).
    syscall_relay: bool,
    /// The guest RIP profile the vCPUs fill, when asked for ([`Machine::profile_guest`]).
    profile: Option<Arc<crate::vcpu::GuestProfile>>,
}

impl Machine {
    /// Maps guest RAM (prefaulting it when asked), creates the VM with its irqchip, KVM's
    /// dirty rings when this VM may migrate with `kvm-ring`, and COM1 wired to IRQ 4. No
    /// vCPU exists yet and no pager runs: the payload loads first.
    pub fn new(cfg: MachineConfig) -> anyhow::Result<Machine> {
        if cfg.prefault && cfg.demand_paging {
            anyhow::bail!(
                "--prefault populates guest RAM up front, which demand paging would do page by \
                 page: add --no-demand-paging, or drop --prefault"
            );
        }
        if cfg.dirty_mode == DirtyMode::Stage2Wp && !cfg.demand_paging {
            anyhow::bail!(
                "--dirty-mode stage2-wp tracks writes through the demand pager, which \
                 --no-demand-paging turns off: drop --no-demand-paging, or use --dirty-mode \
                 kvm-bitmap or kvm-ring"
            );
        }
        let ram = GuestRam::new(cfg.mem, cfg.backing)?;
        if cfg.prefault {
            let t = Instant::now();
            ram.prefault()?;
            println!(
                "prefaulted {} of guest RAM in {:.2} s",
                human(cfg.mem),
                t.elapsed().as_secs_f64()
            );
        }
        let vm = Vm::new(&ram, cfg.cpus)?;
        let syscall_relay = cfg.host_quirks && crate::hypervisor::software_kvm().is_some();
        if syscall_relay {
            vm.filter_msr_writes(crate::arch::x86_64::msrs::MSR_LSTAR)
                .context("setting up the syscall relay (--no-host-quirks turns it off)")?;
        }
        let regions: Vec<RamRegion> = ram.regions().collect();
        let caps = Arc::new(VcpuCaps::probe(&vm).context("probing KVM for migration")?);
        let exit = ExitRequest::new().context("creating the exit event")?;
        // From here SIGINT/SIGTERM stop this VM through its exit request (see `signals`).
        signals::attach(&exit);
        // KVM's dirty rings can only be enabled before the vCPUs exist: a VM that may migrate
        // with --dirty-mode kvm-ring logs into them from the start.
        let ring = match cfg.dirty_mode {
            DirtyMode::KvmRing { .. } if cfg.migrates => Some(Arc::new(
                DirtyTracker::new_kvm(&vm, &regions, cfg.dirty_mode)
                    .context("--dirty-mode kvm-ring")?,
            )),
            _ => None,
        };
        let (serial, serial_irq) = SerialDevice::with_new_irq(cfg.serial_out)
            .context("cannot create the serial IRQ event fd")?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .context("KVM_IRQFD for the serial IRQ failed")?;
        Ok(Machine {
            ram,
            vm,
            regions,
            caps,
            exit,
            ring,
            pager: None,
            serial: Arc::new(serial),
            host_changes: Arc::new(HostChanges::new()),
            demand_paging: cfg.demand_paging,
            dirty_mode: cfg.dirty_mode,
            migrates: cfg.migrates,
            backing: cfg.backing,
            created: Instant::now(),
            syscall_relay,
            profile: None,
        })
    }

    /// Starts demand paging through userfaultfd and stage2 (when on): call it after the
    /// payload wrote its pages (those are present and never fault) and before any vCPU runs,
    /// or before an incoming migration places pages. A page the host cannot provide stops the
    /// VM with [`EXIT_HOST_FAILED`] and the reason, never a fault loop.
    pub fn start_pager(&mut self) -> anyhow::Result<Option<Arc<Pager>>> {
        if !self.demand_paging || self.pager.is_some() {
            return Ok(self.pager.clone());
        }
        let mut cfg = PagerConfig::for_vcpus(self.vm.cpus().into());
        cfg.write_tracking = self.dirty_mode == DirtyMode::Stage2Wp && self.migrates;
        let pager =
            Arc::new(Pager::start(&self.ram, cfg).context(
                "starting demand paging (use --no-demand-paging to let KVM populate RAM)",
            )?);
        let exit = self.exit.clone();
        pager.on_fatal(move |why| {
            exit.request(EXIT_HOST_FAILED, why);
        });
        self.pager = Some(pager.clone());
        Ok(Some(pager))
    }

    /// Creates every vCPU with its CPUID, MSRs and LAPIC set up (and its dirty ring attached),
    /// not yet running.
    pub fn create_vcpus(&self) -> anyhow::Result<Vec<Vcpu>> {
        let mut vcpus = Vec::with_capacity(self.vm.cpus().into());
        for id in 0..self.vm.cpus() {
            let fd = self.vm.create_vcpu(id)?;
            configure_vcpu(&self.vm, &fd, id)?;
            if let Some(t) = &self.ring {
                t.attach_vcpu(id.into(), &fd)
                    .with_context(|| format!("attaching the dirty ring of vCPU {id}"))?;
            }
            vcpus.push(fd);
        }
        Ok(vcpus)
    }

    /// Samples the guest's RIPs once the vCPUs start ([`crate::vcpu::GuestProfile`]); returns
    /// the profile they fill.
    pub fn profile_guest(&mut self) -> Arc<crate::vcpu::GuestProfile> {
        self.profile
            .get_or_insert_with(|| Arc::new(crate::vcpu::GuestProfile::new()))
            .clone()
    }

    /// The power button of a payload with ACPI: its press raises the Generic Event Device's
    /// interrupt ([`crate::devices::acpi::GED_GSI`]) through a KVM irqfd.
    pub fn power_button(&self) -> anyhow::Result<PowerButton> {
        let (button, irqfd) =
            PowerButton::new().context("cannot create the power button's event fd")?;
        self.vm
            .register_irqfd(&irqfd, GED_GSI)
            .context("KVM_IRQFD for the power button (GED) failed")?;
        Ok(button)
    }

    /// Whether the guest listens to the power button: a reader of the in-kernel IOAPIC's
    /// redirection entry of [`GED_GSI`], unmasked once the guest's GED driver requested the
    /// interrupt (Linux: `drivers/acpi/evged.c`). Works on its own handle of the VM, so it can
    /// be called from any thread while the VM runs.
    pub fn ged_listening(&self) -> anyhow::Result<GedListening> {
        let vm = self.vm.handle().context("a second handle on the VM")?;
        Ok(GedListening { vm })
    }

    /// Starts one thread per vCPU on `bus` (COM1 is added here).
    pub fn start(&self, vcpus: Vec<Vcpu>, mut bus: IoBus) -> anyhow::Result<Arc<Mutex<VmControl>>> {
        use crate::devices::serial::{COM1_BASE, COM1_LAST};
        bus.register(COM1_BASE..=COM1_LAST, self.serial.clone())?;
        let hooks = VcpuHooks {
            dirty_ring_full: self.ring.as_ref().map(|t| t.ring_full_hook()),
        };
        // Emulated stores (cmpxchg16b, stmxcsr) go through the host-change gate, so that a
        // running migration sends their pages again.
        let emulation = EmulationHooks {
            host_changes: Some(self.host_changes.clone()),
            syscall_relay: self.syscall_relay,
            profile: self.profile.clone(),
            ..EmulationHooks::default()
        };
        let mut ctl = VmControl::start_with_emulation(
            vcpus,
            Arc::new(bus),
            self.ram.memory().clone(),
            self.exit.clone(),
            hooks,
            emulation,
        )?;
        if self.profile.is_some() {
            ctl.start_profiler(PROFILE_INTERVAL)?;
        }
        Ok(Arc::new(Mutex::new(ctl)))
    }

    /// How a reclaim drops host memory on this machine's backing: through the pager (inside
    /// stage2's invalidation), by punching the memfd (shared RAM without a pager), or with
    /// `MADV_DONTNEED`.
    pub fn drop_fn(&self) -> Box<DropFn> {
        if let Some(pager) = &self.pager {
            let pager = pager.clone();
            return Box::new(move |gpa, len| Ok(pager.reclaim(gpa, len)?.to_json()));
        }
        if !self.ram.shared_regions().is_empty() {
            // MADV_DONTNEED would only unmap the file's pages, which the next access maps
            // again unchanged; punch them out of the memfd (file offset = gpa - region
            // start, as memory/mmap.rs lays the files out).
            let files: Vec<(u64, u64, Arc<std::fs::File>)> = self
                .ram
                .shared_regions()
                .iter()
                .map(|s| (s.region.gpa, s.region.len, s.file.clone()))
                .collect();
            return Box::new(move |gpa, len| {
                let (r, _, file) = files
                    .iter()
                    .find(|(r, l, _)| gpa >= *r && gpa + len <= r + l)
                    .context("range outside shared RAM")?;
                reclaim::punch_hole(file, gpa - r, len)
            });
        }
        let ram_map: Vec<(u64, u64, u64)> = self
            .regions
            .iter()
            .map(|r| (r.gpa, r.len, r.host_addr))
            .collect();
        Box::new(move |gpa, len| {
            let (r, _, host) = ram_map
                .iter()
                .find(|(r, l, _)| gpa >= *r && gpa + len <= r + l)
                .context("range outside RAM")?;
            reclaim::madvise_dontneed(host + (gpa - r), len)
        })
    }

    /// The reclaim gate of this machine: range checks, the migration gate, and the guest
    /// handshake when the payload has one.
    pub fn reclaimer(&self, handshake: Option<Handshake>) -> Reclaimer {
        Reclaimer::new(
            self.ram.memory().clone(),
            handshake,
            self.regions.iter().map(|r| (r.gpa, r.len)).collect(),
            self.ram.page_size(),
            self.drop_fn(),
            self.host_changes.clone(),
        )
    }

    /// Where a migration of this machine takes its dirty pages from.
    pub fn dirty_source(&self) -> DirtySource {
        match (&self.ring, &self.pager) {
            (Some(t), _) => DirtySource::KvmRing(t.clone()),
            (None, Some(p)) if self.dirty_mode == DirtyMode::Stage2Wp => {
                DirtySource::Stage2Wp(p.clone())
            }
            _ => DirtySource::KvmBitmap,
        }
    }

    /// What a migration of this machine needs, with its running vCPUs `control`.
    pub fn source<'a>(
        &'a self,
        control: &'a Mutex<VmControl>,
        dirty: &'a DirtySource,
    ) -> source::Source<'a> {
        source::Source {
            vm: &self.vm,
            regions: &self.regions,
            mem: self.ram.memory(),
            control,
            caps: self.caps.clone(),
            dirty,
            pager: self.pager.as_deref().map(|p| p as &dyn RamPager),
            serial: Some(&self.serial),
            i8042: None,
            spec: &[],
            host_changes: Some(&self.host_changes),
            virtio: &[],
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
    /// Guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }
    /// RAM regions (slot i = region i).
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }
    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }
    /// What a vCPU's migration state holds on this host.
    pub fn caps(&self) -> &Arc<VcpuCaps> {
        &self.caps
    }
    /// The VM-wide exit request.
    pub fn exit(&self) -> &ExitRequest {
        &self.exit
    }
    /// The pager, when demand paging runs.
    pub fn pager(&self) -> Option<&Arc<Pager>> {
        self.pager.as_ref()
    }
    /// Takes the pager out (to stop it before the host reads RAM for a verification).
    pub fn take_pager(&mut self) -> Option<Arc<Pager>> {
        self.pager.take()
    }
    /// COM1.
    pub fn serial(&self) -> &Arc<SerialDevice> {
        &self.serial
    }
    /// The gate of the host's changes of guest RAM, shared with migrations.
    pub fn host_changes(&self) -> &Arc<HostChanges> {
        &self.host_changes
    }
    /// Whether demand paging is on.
    pub fn demand_paging(&self) -> bool {
        self.demand_paging
    }
    /// The dirty-tracking mode a migration uses.
    pub fn dirty_mode(&self) -> DirtyMode {
        self.dirty_mode
    }
    /// The backing asked for (before `auto` is resolved; [`GuestRam::backing`] has the
    /// resolved one): what a migration destination is asked to build.
    pub fn backing(&self) -> BackingKind {
        self.backing
    }
    /// When the machine was created.
    pub fn created(&self) -> Instant {
        self.created
    }
}

/// Reads whether the guest unmasked the GED's IOAPIC input ([`Machine::ged_listening`]).
pub struct GedListening {
    vm: VmHandle,
}

/// Redirection entry bit 16: interrupt mask (82093AA I/O APIC datasheet §3.2.4).
const IOAPIC_REDIR_MASKED: u64 = 1 << 16;

impl GedListening {
    /// `Some(true)` when the guest unmasked the GED's pin, `Some(false)` while it is masked (the
    /// guest has no GED driver yet, e.g. early in a boot, and would not hear the button),
    /// `None` when KVM cannot tell.
    pub fn listening(&self) -> Option<bool> {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        self.vm.get_irqchip(&mut chip).ok()?;
        // SAFETY: chip_id is KVM_IRQCHIP_IOAPIC, so `ioapic` is the union member KVM filled;
        // `bits` covers the whole 8-byte redirection entry.
        let entry = unsafe { chip.chip.ioapic.redirtbl.get(GED_GSI as usize)?.bits };
        Some(entry & IOAPIC_REDIR_MASKED == 0)
    }
}

/// The migration flags of a VM, checked against each other: every misuse is refused with
/// the fix.
#[derive(Debug, Clone)]
pub struct MigrationPlan {
    /// `--migrate-to`.
    pub migrate_to: Option<Address>,
    /// `--incoming`.
    pub incoming: Option<Address>,
    /// The dirty-tracking mode a migration of this VM uses (`--dirty-mode`).
    pub dirty_mode: DirtyMode,
    /// Whether this VM may migrate (a `--migrate-to` or a control socket).
    pub migrates: bool,
    /// `--migrate-secret`, read and checked.
    pub secret: Option<Arc<Secret>>,
}

impl MigrationPlan {
    /// Checks the migration flags of `args`.
    pub fn from_args(args: &MachineArgs) -> anyhow::Result<MigrationPlan> {
        let parse_addr = |flag: &str, a: &Option<String>| -> anyhow::Result<Option<Address>> {
            a.as_deref()
                .map(|s| s.parse::<Address>().with_context(|| format!("{flag} {s}")))
                .transpose()
        };
        let migrate_to = parse_addr("--migrate-to", &args.migrate_to)?;
        let incoming = parse_addr("--incoming", &args.incoming)?;
        if args.stay && args.api_socket.is_none() {
            bail!(
                "--stay keeps the process for the next VM, which it takes in when told over \
                 its control socket: add --api-socket PATH"
            );
        }
        if args.stay && migrate_to.is_some() {
            bail!(
                "--stay with --migrate-to: a staying vmm migrates its VMs when told over its \
                 control socket (vmmctl migrate --to ADDR), every one of them; drop --migrate-to"
            );
        }
        if migrate_to.is_some() && incoming.is_some() {
            bail!(
                "--migrate-to and --incoming together: a VM is either the source or the \
                 destination"
            );
        }
        let dirty_mode = match &args.dirty_mode {
            Some(m) => m
                .parse::<DirtyMode>()
                .map_err(|e| anyhow::anyhow!("--dirty-mode {m}: {e}"))?,
            None => DirtyMode::KvmBitmap,
        };
        if args.migrate_delay_ms > 0 && migrate_to.is_none() {
            bail!(
                "--migrate-delay-ms is for --migrate-to (it delays that migration); add \
                 --migrate-to ADDR or drop it"
            );
        }
        let source_flags = [
            ("--dirty-mode", args.dirty_mode.is_some()),
            ("--postcopy-after", args.postcopy_after.is_some()),
            ("--migrate-json", args.migrate_json.is_some()),
            ("--migrate-connections", args.migrate_connections.is_some()),
            ("--migrate-verify", args.migrate_verify),
        ];
        if incoming.is_some() && args.api_socket.is_none() {
            if let Some((flag, _)) = source_flags.iter().find(|(_, given)| *given) {
                bail!(
                    "{flag} is a migration source option: the source chooses how to migrate \
                     and the --incoming destination follows; give {flag} to the vmm with \
                     --migrate-to (or to a destination with --api-socket, for when it \
                     migrates on with vmmctl migrate) and drop it here"
                );
            }
        } else if incoming.is_some() {
            // A destination with a control socket may migrate on: its source options are for
            // that migration.
        } else if migrate_to.is_none() && args.api_socket.is_none() {
            if let Some((flag, _)) = source_flags.iter().find(|(_, given)| *given) {
                bail!(
                    "{flag} without --migrate-to or --api-socket: this VM never migrates; add \
                     --migrate-to ADDR (or --api-socket PATH and use vmmctl migrate)"
                );
            }
        }
        if args.postcopy_after.is_some() && migrate_to.is_none() {
            bail!(
                "--postcopy-after is for --migrate-to; over the control socket ask with \
                 `vmmctl migrate --to ADDR --postcopy-after N`"
            );
        }
        if args.postcopy_after == Some(0) {
            bail!("--postcopy-after 0: give at least 1 (round 0 is the full pass of RAM)");
        }
        if dirty_mode == DirtyMode::Stage2Wp && args.no_demand_paging {
            bail!(
                "--dirty-mode stage2-wp tracks writes through the demand pager, which \
                 --no-demand-paging turns off: drop --no-demand-paging, or use --dirty-mode \
                 kvm-bitmap or kvm-ring"
            );
        }
        let migrates = migrate_to.is_some() || args.api_socket.is_some();
        let secret = match &args.migrate_secret {
            Some(_) if !migrates && incoming.is_none() => bail!(
                "--migrate-secret without --migrate-to, --incoming or --api-socket: this VM \
                 never migrates; drop it"
            ),
            Some(path) => Some(Arc::new(Secret::from_file(path)?)),
            None => None,
        };
        Ok(MigrationPlan {
            migrate_to,
            incoming,
            dirty_mode,
            migrates,
            secret,
        })
    }

    /// The precopy knobs of `args`, with this plan's secret.
    pub fn config(&self, args: &MachineArgs) -> MigrateConfig {
        MigrateConfig {
            downtime: Duration::from_millis(args.downtime_ms),
            max_rounds: args.max_rounds.max(1),
            postcopy_after: None,
            idle_timeout: args.migrate_idle_limit(),
            secret: self.secret.clone(),
            connections: args.migrate_connections.unwrap_or(1),
            verify: args.migrate_verify,
        }
    }
}

/// Refuses an output file that cannot be written (its directory is missing or read-only, or it
/// is a directory), naming the flag as given (`given`, e.g. `--stats-json /x/s.json`), so that
/// a run does not fail at its end after the guest ran. Creates nothing: a file this creates to
/// find out is removed again.
pub fn check_output_path(given: &str, path: &std::path::Path) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!("{given}: is a directory; give the path of a file to write");
    }
    let existed = path.exists();
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(_) => {
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        }
        Err(e) => bail!(
            "{given}: cannot write this file ({e}): create its directory or choose a writable \
             path"
        ),
    }
}

/// Checks every output path of the command line (`--stats-json`, `--migrate-json`,
/// `--serial file:`) before anything starts.
pub fn check_output_paths(cli: &crate::cli::Cli) -> anyhow::Result<()> {
    if let Some(p) = &cli.machine.stats_json {
        check_output_path(&format!("--stats-json {}", p.display()), p)?;
    }
    if let Some(p) = &cli.machine.migrate_json {
        check_output_path(&format!("--migrate-json {}", p.display()), p)?;
    }
    if let crate::cli::SerialTarget::File(p) = &cli.serial {
        check_output_path(&format!("--serial file:{}", p.display()), p)?;
    }
    Ok(())
}

/// Stops a pager taken out of a machine once nothing else shares it.
pub fn stop_pager(pager: Arc<Pager>) {
    match Arc::try_unwrap(pager) {
        Ok(p) => p.stop(),
        Err(_) => log::warn!("the pager is still shared at exit; it stops when dropped"),
    }
}
