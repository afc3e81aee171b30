//! A booted Linux kernel as a machine's payload: the kernel and initrd loaded with their boot
//! tables (MP table, ACPI), the i8042, the console, and the machine's session (demand paging,
//! control socket, migration) around it; or the same kernel VM received from a migration.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use log::{debug, info};

use super::console::{self, FlushingStdout};
use super::incoming::PostcopyRx;
use super::session::{PowerButtonHooks, Session, SessionConfig, Waited};
use super::spec::{DeviceConfigs, DeviceSpec, MachineSpec, Payload};
use super::{Ended, Machine, MachineConfig, MigrationPlan};
use crate::arch::x86_64::{acpi, mptable};
use crate::boot::{self, BootSpec, KernelImage};
use crate::cli::{Cli, SerialTarget};
use crate::devices::acpi::{AcpiPm, ACPI_PM_PORTS};
use crate::devices::i8042::{I8042, I8042_COMMAND, I8042_DATA};
use crate::devices::IoBus;
use crate::exit::EXIT_OK;
use crate::hypervisor;
use crate::memory::{human, BackingKind};
use crate::migrate::destination::Pending;
use crate::virtio::balloon::{Balloon, BalloonHandle};
use crate::virtio::block::{Block, Disk};
use crate::virtio::net::{Net, NetError};
use crate::virtio::{mmio, GuestWrites, MmioTransport, TransportState};
use vmm_sys_util::eventfd::EventFd;

/// Logs (at debug level) how long after `main` started each start-up step ended, so the host's
/// share of the time to the guest's first instruction can be read from `--log-level debug`.
struct StartupClock(Instant);

impl StartupClock {
    fn mark(&self, step: &str) {
        debug!("start-up: {step} done at {:.1?}", self.0.elapsed());
    }
}

/// Refuses guest RAM larger than the host's physical memory (an overcommitted guest would be
/// killed by the OOM killer long after start-up).
pub fn check_host_memory(mem: u64) -> Result<()> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kb: Option<u64> = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    if let Some(kb) = total_kb {
        let total = kb * 1024;
        if mem > total {
            bail!(
                "--mem {} is more than this host's {} MiB of RAM: lower --mem",
                human(mem),
                total >> 20
            );
        }
    }
    Ok(())
}

/// What a kernel needs on a software KVM (`kvm_pvm`), which stops with an emulation failure
/// on instructions the VMM does not emulate: `xrstor` (the kernel must not use XSAVE) and the
/// SSE register instructions of SSSE3 code paths (Debian's kernel runs SSSE3 BLAKE2s for its
/// random pool: `movd xmm, r32`, `pxor`).
const NOXSAVE: &str = "noxsave";
const CLEARED_CPU_FEATURE: &str = "ssse3";

/// The command line the kernel gets: `cmdline` plus, on a software KVM, what it needs that
/// `cmdline` does not already have (`noxsave`; `ssse3` in `clearcpuid=`, added to the user's
/// own `clearcpuid=` list if there is one). Returns the line and what was added.
pub fn quirk_cmdline(cmdline: &str, software_kvm: bool) -> (String, Vec<String>) {
    if !software_kvm {
        return (cmdline.to_string(), Vec::new());
    }
    let mut words: Vec<String> = cmdline.split_whitespace().map(str::to_string).collect();
    let mut added = Vec::new();
    if !words.iter().any(|w| w == NOXSAVE) {
        words.push(NOXSAVE.to_string());
        added.push(NOXSAVE.to_string());
    }
    match words.iter_mut().find(|w| w.starts_with("clearcpuid=")) {
        Some(w) => {
            if !w["clearcpuid=".len()..]
                .split(',')
                .any(|f| f == CLEARED_CPU_FEATURE)
            {
                w.push(',');
                w.push_str(CLEARED_CPU_FEATURE);
                added.push(format!("clearcpuid=...,{CLEARED_CPU_FEATURE}"));
            }
        }
        None => {
            let w = format!("clearcpuid={CLEARED_CPU_FEATURE}");
            words.push(w.clone());
            added.push(w);
        }
    }
    (words.join(" "), added)
}

/// Refuses more vCPUs than KVM allows.
fn check_cpus(cpus: u8) -> Result<()> {
    let max = hypervisor::max_vcpus()?;
    if u32::from(cpus) > max {
        return Err(hypervisor::VmError::TooManyCpus {
            asked: cpus.into(),
            max,
        }
        .into());
    }
    Ok(())
}

fn serial_out(target: &SerialTarget) -> Result<Box<dyn Write + Send>> {
    // The first VM of the process starts the file afresh; the next ones of a `--stay` vmm
    // (the same guest coming back, or another) carry on after it.
    static OPENED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    Ok(match target {
        SerialTarget::Stdio => Box::new(FlushingStdout),
        SerialTarget::File(p) => {
            let again = OPENED.swap(true, std::sync::atomic::Ordering::Relaxed);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(again)
                .truncate(!again)
                .open(p)
                .with_context(|| {
                    format!(
                        "cannot create serial output file {}: check --serial file:PATH",
                        p.display()
                    )
                })?;
            Box::new(LineWriter::new(file))
        }
    })
}

fn machine_config(cli: &Cli, backing: BackingKind, plan: &MigrationPlan) -> Result<MachineConfig> {
    Ok(MachineConfig {
        mem: cli.mem,
        cpus: cli.cpus,
        backing,
        demand_paging: !cli.machine.no_demand_paging,
        prefault: cli.machine.prefault,
        dirty_mode: plan.dirty_mode,
        migrates: plan.migrates,
        serial_out: serial_out(&cli.serial)?,
        host_quirks: !cli.machine.no_host_quirks,
    })
}

/// Boots `--kernel` on a new machine and runs it until it ends (or moves away). Returns the
/// process exit code.
pub fn run(cli: &Cli, started: Instant) -> Result<Ended> {
    let clock = StartupClock(started);
    let plan = MigrationPlan::from_args(&cli.machine)?;
    let Some(kernel_path) = cli.kernel.as_deref() else {
        bail!("no kernel given: pass --kernel PATH (a bzImage or vmlinux) or --guest NAME");
    };
    check_host_memory(cli.mem)?;
    let mut kernel = KernelImage::from_file(kernel_path)?;
    kernel.check_fits(cli.mem)?;
    clock.mark("kernel file read");
    let initrd = match cli.initrd.as_deref() {
        Some(path) => Some(kernel.read_initrd(path, cli.mem)?),
        None => None,
    };
    // Before any VM exists: a payload that does not decompress ends the run here.
    if !cli.no_fast_boot {
        kernel.decompress_on_host()?;
        clock.mark("kernel payload decompressed");
    }
    check_cpus(cli.cpus)?;
    // Before any VM exists: a disk or tap that cannot be used ends the run here.
    let configs = DeviceConfigs::of(cli);
    let opened = open_devices(&configs)?;
    // Paths made absolute now: the filters entered below refuse readlink.
    let device_spec = DeviceSpec::of(&configs);

    let mut machine = Machine::new(machine_config(cli, cli.backing()?, &plan)?)?;
    // Set-up is done: from here this thread only loads or receives the guest, starts the
    // other threads, runs the VM and tears it down (seccomp's `main` list).
    crate::seccomp::enter_main();
    clock.mark("machine created");
    let mem = machine.mem().clone();
    let software_kvm = hypervisor::software_kvm().filter(|_| !cli.machine.no_host_quirks);
    let (cmdline, appended) = quirk_cmdline(&cli.cmdline, software_kvm.is_some());
    let devices = build_devices(&machine, opened, &configs, device_spec)?;
    if !appended.is_empty() {
        info!(
            "this host's KVM is {} (software): appended `{}` to the kernel command line \
             (--no-host-quirks leaves it as given)",
            software_kvm.unwrap_or_default(),
            appended.join(" ")
        );
    }
    mptable::setup(&mem, cli.cpus)?;
    // The virtio devices are announced in the DSDT (see `acpi::VirtioMmio`).
    let announced: Vec<acpi::VirtioMmio> = devices
        .slots
        .iter()
        .map(|d| acpi::VirtioMmio {
            base: d.window.start as u32,
            len: mmio::WINDOW as u32,
            gsi: d.gsi,
        })
        .collect();
    let rsdp = acpi::setup(&mem, cli.cpus, &announced)?;
    let loaded = boot::load(
        machine.ram(),
        &BootSpec {
            kernel: &kernel,
            initrd: initrd.as_deref(),
            cmdline: &cmdline,
            acpi_rsdp: Some(rsdp),
        },
    )?;
    drop(kernel);
    drop(initrd);
    clock.mark("kernel loaded");
    // Demand paging from here: the kernel, its tables and the initrd are present and never
    // fault; every other first touch is a stage2 fault.
    machine.start_pager()?;
    let vcpus = machine.create_vcpus()?;
    boot::setup_boot_cpu(&mem, &vcpus[0], &loaded)?;
    info!(
        "starting {} vCPU(s), {} RAM on {}, {}{}",
        cli.cpus,
        human(machine.ram().size()),
        machine.ram().backing(),
        loaded.path,
        if machine.pager().is_some() {
            ", demand paging through stage2"
        } else {
            ", no demand paging"
        }
    );
    clock.mark("vCPUs configured");
    let i8042 = Arc::new(I8042::new(machine.exit().clone()));
    serve(cli, machine, vcpus, i8042, &plan, None, devices)
}

/// Guest-physical base of the virtio-mmio windows, one [`mmio::WINDOW`] each, in the hole
/// below 4 GiB (RAM above 3 GiB is placed above 4 GiB; the I/O APIC and local APICs are at
/// 0xfec00000 and up).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The I/O APIC pins of the virtio devices, in order: ISA lines nothing else here uses (COM1
/// has 4, the i8042's keyboard and mouse 1 and 12, the RTC's would be 8).
pub const VIRTIO_GSIS: [u32; 6] = [5, 6, 7, 9, 10, 11];

/// A kernel VM's disks and taps, opened.
struct Opened {
    disks: Vec<Disk>,
    taps: Vec<File>,
}

/// Refuses more virtio devices than interrupt lines, and opens the disks and taps (before any
/// VM exists: one that cannot be used ends the run early).
fn open_devices(configs: &DeviceConfigs) -> Result<Opened> {
    if configs.count() > VIRTIO_GSIS.len() {
        bail!(
            "{} disks, {} network devices{}: at most {} virtio devices fit this machine's \
             interrupt lines",
            configs.disks.len(),
            configs.nets.len(),
            if configs.balloon {
                " and a balloon"
            } else {
                ""
            },
            VIRTIO_GSIS.len()
        );
    }
    let disks = configs
        .disks
        .iter()
        .map(Disk::open)
        .collect::<Result<Vec<_>, _>>()?;
    let taps = configs
        .nets
        .iter()
        .map(|n| crate::virtio::net::open_tap(&n.tap))
        .collect::<Result<Vec<_>, NetError>>()?;
    Ok(Opened { disks, taps })
}

/// The virtio devices of `spec` in slot order: the disks, the network devices, then a balloon
/// when it has one, on what `opened` holds for `configs`. Their writes of guest RAM are
/// recorded through the machine's gate.
fn build_devices(
    machine: &Machine,
    opened: Opened,
    configs: &DeviceConfigs,
    spec: Vec<DeviceSpec>,
) -> Result<Devices> {
    let writes = || GuestWrites::new(machine.host_changes().clone());
    let mut mmio = Vec::new();
    for (i, disk) in opened.disks.into_iter().enumerate() {
        let sectors = disk.sectors();
        let block = Block::new(disk, writes()).context("starting the virtio-blk thread")?;
        let dev = virtio_device(machine, mmio.len(), Box::new(block))?;
        info!(
            "virtio-blk {}: {} ({} sectors) at {:#x}, IRQ {}",
            i,
            configs.disks[i].path.display(),
            sectors,
            dev.window.start,
            dev.gsi
        );
        mmio.push(dev);
    }
    for (i, tap) in opened.taps.into_iter().enumerate() {
        let cfg = &configs.nets[i];
        let net = Net::new(tap, cfg.mac, writes()).context("starting the virtio-net thread")?;
        let dev = virtio_device(machine, mmio.len(), Box::new(net))?;
        info!(
            "virtio-net {}: tap {}, {} at {:#x}, IRQ {}",
            i,
            cfg.tap,
            cfg.mac
                .map_or("the guest's own address".to_string(), |m| format!(
                    "address {m}"
                )),
            dev.window.start,
            dev.gsi
        );
        mmio.push(dev);
    }
    let handle = if configs.balloon {
        let (device, handle) =
            Balloon::new(writes()).context("starting the virtio-balloon thread")?;
        let dev = virtio_device(machine, mmio.len(), Box::new(device))?;
        info!(
            "virtio-balloon at {:#x}, IRQ {}: statistics, deflate-on-OOM, free page reporting",
            dev.window.start, dev.gsi
        );
        mmio.push(dev);
        Some(handle)
    } else {
        None
    };
    Ok(Devices {
        slots: mmio,
        balloon: handle,
        spec,
    })
}

/// A kernel VM's virtio devices.
struct Devices {
    /// In slot order.
    slots: Vec<VirtioSlot>,
    /// The balloon's handle, when there is one.
    balloon: Option<BalloonHandle>,
    /// What a migration's machine spec says of them.
    spec: Vec<DeviceSpec>,
}

/// A virtio device on the machine.
struct VirtioSlot {
    window: std::ops::Range<u64>,
    gsi: u32,
    transport: Arc<MmioTransport>,
}

/// Puts `device` in virtio slot `index` of `machine`: its window, its interrupt (an irqfd)
/// and its queues' notifications (ioeventfds, so a notification costs no exit to the VMM).
fn virtio_device(
    machine: &Machine,
    index: usize,
    device: Box<dyn crate::virtio::VirtioDevice>,
) -> Result<VirtioSlot> {
    let gsi = VIRTIO_GSIS[index];
    let start = VIRTIO_MMIO_BASE + index as u64 * mmio::WINDOW;
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).context("creating a virtio interrupt event")?;
    machine
        .vm()
        .register_irqfd(&irqfd, gsi)
        .with_context(|| format!("KVM_IRQFD for the virtio device on IRQ {gsi}"))?;
    let transport = Arc::new(
        MmioTransport::new(device, machine.mem().clone(), irqfd)
            .context("creating a virtio device's queues")?,
    );
    for (q, event) in (0u32..).zip(transport.queue_events()) {
        if let Err(e) = machine
            .vm()
            .register_ioevent_mmio(event, start + mmio::QUEUE_NOTIFY, q)
        {
            // The transport signals the queue itself on the MMIO exit: slower, same result.
            log::warn!(
                "KVM_IOEVENTFD for virtio queue {q} at {start:#x} failed ({e}): its \
                 notifications take an exit to the VMM"
            );
        }
    }
    Ok(VirtioSlot {
        window: start..start + mmio::WINDOW,
        gsi,
        transport,
    })
}

/// Receives a kernel VM from `pending` (its spec already checked against the flags) and runs
/// it here.
pub fn run_incoming(
    cli: &Cli,
    spec: &MachineSpec,
    backing: BackingKind,
    pending: Pending,
) -> Result<Ended> {
    let plan = MigrationPlan::from_args(&cli.machine)?;
    check_host_memory(spec.mem)?;
    // The source's devices, in its slots; its disks are opened here, before any VM.
    let configs = DeviceSpec::split(&spec.devices);
    let opened = open_devices(&configs).context(
        "the migrating VM's devices cannot be opened here: a disk migrates by its path, which \
         must name the same image on this host (shared storage, or one host), and a network \
         device by its tap's name, which must name a free tap on this host",
    )?;
    let mut cfg = machine_config(cli, backing, &plan)?;
    cfg.mem = spec.mem;
    cfg.cpus = spec.cpus;
    let mut machine = Machine::new(cfg)?;
    // Set-up is done: from here this thread only loads or receives the guest, starts the
    // other threads, runs the VM and tears it down (seccomp's `main` list).
    crate::seccomp::enter_main();
    let devices = build_devices(&machine, opened, &configs, spec.devices.clone())?;
    let mut inc = machine.receive(pending)?;
    let vcpus = machine.create_vcpus()?;
    machine.restore(&inc, &vcpus)?;
    // Before the source is told the guest runs here: a device state that does not fit ends
    // the migration while the source can still run the guest.
    let states = std::mem::take(&mut inc.received.virtio);
    restore_devices(&devices.slots, &states)?;
    let i8042 = Arc::new(match inc.received.i8042.take() {
        Some(st) => I8042::from_state(machine.exit().clone(), st),
        None => I8042::new(machine.exit().clone()),
    });
    let postcopy = machine.take_over(inc)?;
    // Guest RAM can be read now (in postcopy, owed pages are fetched on demand): the devices
    // the driver had started take their queues up again.
    for (i, dev) in devices.slots.iter().enumerate() {
        dev.transport
            .start_restored()
            .map_err(|e| anyhow::anyhow!("virtio device {i}: {e}"))?;
    }
    serve(cli, machine, vcpus, i8042, &plan, postcopy, devices)
}

/// Restores each device's state from the source's (`virtio-mmio-N` chunks), refusing a
/// device without one, or one more than this machine has.
fn restore_devices(
    virtio: &[VirtioSlot],
    states: &std::collections::BTreeMap<u32, Vec<u8>>,
) -> Result<()> {
    if let Some((&slot, _)) = states.iter().find(|(&i, _)| i as usize >= virtio.len()) {
        bail!(
            "the source sent the state of virtio device {slot}, but its machine spec names {} \
             devices: run the same vmm build on both sides",
            virtio.len()
        );
    }
    for (i, dev) in virtio.iter().enumerate() {
        let Some(blob) = states.get(&(i as u32)) else {
            bail!("the source sent no state for virtio device {i}: run the same vmm build on both sides");
        };
        let st =
            TransportState::decode(blob).map_err(|e| anyhow::anyhow!("virtio device {i}: {e}"))?;
        dev.transport
            .restore(&st)
            .map_err(|e| anyhow::anyhow!("virtio device {i}: {e}"))?;
    }
    Ok(())
}

/// Runs a loaded (or received) kernel VM: i8042 on the port bus, the console thread, the
/// session, `--migrate-to`, and `--stats-json` at the end.
#[allow(clippy::too_many_arguments)]
fn serve(
    cli: &Cli,
    mut machine: Machine,
    vcpus: Vec<crate::hypervisor::Vcpu>,
    i8042: Arc<I8042>,
    plan: &MigrationPlan,
    postcopy: Option<PostcopyRx>,
    devices: Devices,
) -> Result<Ended> {
    let Devices {
        slots,
        balloon,
        spec: device_spec,
    } = devices;
    let mut bus = IoBus::new();
    let mut transports = Vec::with_capacity(slots.len());
    for dev in slots {
        transports.push(dev.transport.clone());
        bus.register_mmio(dev.window, dev.transport)?;
    }
    bus.register(I8042_DATA..=I8042_DATA, i8042.clone())?;
    bus.register(I8042_COMMAND..=I8042_COMMAND, i8042.clone())?;
    // Power-off (S5) and reset through the FADT's registers; the power button through the GED.
    bus.register(ACPI_PM_PORTS, Arc::new(AcpiPm::new(machine.exit().clone())))?;
    let button = machine.power_button()?;
    let ged = machine.ged_listening()?;
    let mut reclaimer = machine.reclaimer(None);
    if let Some(pc) = &postcopy {
        let target = pc.target().clone();
        reclaimer = reclaimer.refuse_owed(Box::new(move |gpa, len| target.owes_any(gpa, len)));
    }
    let reclaimer = Arc::new(reclaimer);
    // The balloon gives pages back through the same gate as the control socket's `reclaim`:
    // stage2 brackets the drop, a running migration hears of it.
    if let Some(b) = &balloon {
        let r = reclaimer.clone();
        b.set_drop_range(
            Arc::new(move |gpa, len| r.reclaim(gpa, len).map(|_| ()).map_err(|e| e.to_string())),
            machine.ram().page_size(),
        );
    }
    let started = Instant::now();
    let profile = cli.guest_profile.as_ref().map(|_| machine.profile_guest());
    let control = machine.start(vcpus, bus)?;
    let console = console::spawn(
        machine.exit(),
        matches!(cli.serial, SerialTarget::Stdio).then(|| machine.serial().clone()),
    )?;
    let mut session = Session::new(
        &machine,
        control,
        reclaimer,
        SessionConfig {
            api_socket: cli.machine.api_socket.clone(),
            migrate: plan.config(&cli.machine),
            migrate_json: cli.machine.migrate_json.clone(),
            spec: MachineSpec::new(
                machine.ram().size(),
                machine.vm().cpus(),
                machine.backing(),
                Payload::Kernel,
            )
            .with_devices(device_spec)
            .to_bytes(),
            i8042: Some(i8042),
            power_button: Some(PowerButtonHooks {
                press: Box::new(move || {
                    button
                        .press()
                        .map_err(|e| format!("cannot press the power button: {e}"))
                }),
                listening: Box::new(move || ged.listening()),
            }),
            shutdown_timeout: Duration::from_secs(cli.machine.shutdown_timeout),
            idle_timeout: cli.machine.idle_limit(),
            api_timeout: Duration::from_secs(cli.machine.api_timeout),
            payload: "kernel".into(),
            guest_report: None,
            harvest_every: cli.machine.dirty_harvest_every(),
            migration_blocker: None,
            balloon,
            virtio: transports,
        },
    )?;
    let mut waited = session.migrate_to(
        plan.migrate_to.as_ref(),
        Duration::from_millis(cli.machine.migrate_delay_ms),
        cli.machine.postcopy_after,
    );
    if waited == Waited::Timeout {
        waited = session.wait(None);
    }
    let code = match waited {
        Waited::Exit(code) => code,
        Waited::Migrated => {
            machine.exit().request(EXIT_OK, "the VM migrated");
            EXIT_OK
        }
        Waited::Lost | Waited::Timeout => {
            machine.exit().request(
                crate::exit::EXIT_HOST_FAILED,
                "the VM was lost in a postcopy migration",
            );
            crate::exit::EXIT_HOST_FAILED
        }
    };
    let code = super::session::exit_code_after(code, session.migrate_to_failed());
    session.close();
    let elapsed = started.elapsed();
    let emulation = session
        .control()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .emulation_stats()
        .clone();
    session.stop();
    let _ = console.join();
    let _ = std::io::stdout().flush();
    let mut code = code;
    if let Some(pc) = postcopy {
        if let Err(why) = pc.finish(&machine) {
            eprintln!("error: postcopy failed: {why}; the guest's memory here is incomplete");
            code = crate::exit::EXIT_HOST_FAILED;
        }
    }
    let paging = machine.pager().map(|p| p.stats());
    if let Some(stats) = &paging {
        info!("{stats}");
    }
    if emulation.total() > 0 {
        info!("emulated instructions: {}", emulation.to_json());
    }
    if let Some(path) = &cli.machine.stats_json {
        let doc = serde_json::json!({
            "payload": "kernel",
            "exit_code": code,
            "seconds": elapsed.as_secs_f64(),
            "migrated": waited == Waited::Migrated,
            "demand_paging": paging.as_ref().map(|p| p.to_json()),
            "emulation": emulation.to_json(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing --stats-json {}", path.display()))?;
    }
    if let (Some(path), Some(profile)) = (&cli.guest_profile, &profile) {
        let file = File::create(path)
            .with_context(|| format!("writing --guest-profile {}", path.display()))?;
        profile
            .write_to(std::io::BufWriter::new(file))
            .with_context(|| format!("writing --guest-profile {}", path.display()))?;
        info!("guest RIP profile written to {}", path.display());
    }
    if let Some(p) = machine.take_pager() {
        super::stop_pager(p);
    }
    let migrated = waited == Waited::Migrated;
    if migrated {
        info!("the VM migrated out");
    } else {
        info!("VM ended with exit code {code}");
    }
    Ok(Ended { code, migrated })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_software_kvm_gets_noxsave_and_ssse3_cleared_once() {
        assert_eq!(
            quirk_cmdline("console=ttyS0", true),
            (
                "console=ttyS0 noxsave clearcpuid=ssse3".to_string(),
                vec!["noxsave".to_string(), "clearcpuid=ssse3".to_string()]
            )
        );
        assert_eq!(
            quirk_cmdline("noxsave clearcpuid=ssse3 console=ttyS0", true),
            ("noxsave clearcpuid=ssse3 console=ttyS0".to_string(), vec![])
        );
        // The user's own list is extended, not given a second clearcpuid= the kernel ignores.
        assert_eq!(
            quirk_cmdline("clearcpuid=cx16 noxsave", true).0,
            "clearcpuid=cx16,ssse3 noxsave"
        );
        assert_eq!(quirk_cmdline("", true).0, "noxsave clearcpuid=ssse3");
        assert_eq!(
            quirk_cmdline("console=ttyS0", false),
            ("console=ttyS0".to_string(), vec![])
        );
    }
}
