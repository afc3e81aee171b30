//! Runs a built-in test guest (`vmm --guest NAME`): lays it out in guest RAM, starts every
//! vCPU in 64-bit mode on it, collects its port reports and prints the verdict.

pub mod layout;
pub mod port;
pub mod reclaim;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use guest_tests::params::{FLAG_EXPECT_RECLAIM, PAGE_SIZE};
use guest_tests::protocol::TEST_PORT_RANGE;
use guest_tests::report::VcpuState;
use guest_tests::{payload_of, GuestKind, Mode, Params, Report, VcpuBlock};
use log::info;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::api;
use crate::arch::x86_64::configure_vcpu;
use crate::arch::x86_64::long_mode::{self, LongModeConfig};
use crate::devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ, COM1_LAST};
use crate::devices::PioBus;
use crate::dirty::{DirtyMode, DirtyTracker, HostChangeRefused, HostChanges};
use crate::memory::{self, human, BackingKind, GuestRam};
use crate::migrate::postcopy::PostcopyTarget;
use crate::migrate::precopy::{self, DirtySource, MigrateConfig, MigrateError};
use crate::migrate::ram::RamPager;
use crate::migrate::state::VcpuCaps;
use crate::migrate::Address;
use crate::paging::{PageSource, Pager, PagerConfig, PagingStats};
use crate::vcpu::{ExitRequest, VcpuHooks, VmControl};
use crate::vm::Vm;

use layout::{CODE_GPA, CODE_MAX, GDT_GPA, PARAMS_GPA, PML4_GPA};
use port::{TestPort, EXIT_FAIL, EXIT_PASS};
use reclaim::{Reclaimer, Storm};

/// Generations `stress` runs when `--generations` is not given.
pub const DEFAULT_STRESS_GENERATIONS: u64 = 2;
/// Generations `dirty` runs when `--generations` is not given.
pub const DEFAULT_DIRTY_GENERATIONS: u64 = 8;
/// Default `dirty` writes per generation: this fraction (1/N) of the slice's pages.
pub const DEFAULT_DIRTY_WRITES_DIVISOR: u64 = 4;
/// Length of a `dirty` generation at the `--dirty-rate` pace when `--writes-per-gen` is not
/// given (the guest looks at its stop flag between generations).
pub const PACED_GENERATION_MS: u64 = 200;

/// Writes per vCPU in `PACED_GENERATION_MS` at `rate_mb_s` over `cpus` vCPUs.
fn paced_writes_per_gen(rate_mb_s: u64, cpus: u8) -> u64 {
    let bytes = u128::from(rate_mb_s) * u128::from(guest_tests::params::DIRTY_RATE_MB);
    let writes = bytes * u128::from(PACED_GENERATION_MS)
        / 1000
        / u128::from(PAGE_SIZE)
        / u128::from(cpus.max(1));
    u64::try_from(writes).unwrap_or(u64::MAX)
}

/// Writes the guest's TSC frequency and the `--dirty-rate` pace into the parameter block
/// in guest memory (after `load`: the frequency comes from a vCPU, KVM_GET_TSC_KHZ).
fn write_pacing(
    mem: &GuestMemoryMmap,
    fd: &kvm_ioctls::VcpuFd,
    rate_mb_s: u64,
    cpus: u8,
) -> anyhow::Result<()> {
    let tsc_khz = match fd.get_tsc_khz() {
        Ok(khz) => u64::from(khz),
        Err(e) if rate_mb_s == 0 => {
            log::debug!("KVM_GET_TSC_KHZ: {e}; the guest runs unpaced anyway");
            0
        }
        Err(e) => bail!(
            "--dirty-rate needs the guest's TSC frequency and KVM_GET_TSC_KHZ failed ({e}); \
             run without --dirty-rate"
        ),
    };
    let interval = guest_tests::params::write_interval_tsc(rate_mb_s, tsc_khz, u32::from(cpus));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&tsc_khz.to_le_bytes());
    bytes[8..].copy_from_slice(&interval.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(Params::pacing_gpa(PARAMS_GPA)))
        .context("writing the pacing fields of the parameter block")?;
    if rate_mb_s != 0 {
        info!(
            "dirty guest paced to {rate_mb_s} MB/s: TSC {tsc_khz} kHz, {interval} cycles \
             between writes per vCPU"
        );
    }
    Ok(())
}

/// U/S bit of a paging-structure entry: user-mode accesses allowed (Intel SDM Vol. 3A
/// §4.5, Tables 4-15 to 4-19, bit 2).
const PTE_USER: u64 = 1 << 2;
/// P bit of a paging-structure entry (same tables, bit 0).
const PTE_PRESENT: u64 = 1 << 0;
/// RFLAGS.IOPL = 3: `in`/`out` allowed at CPL 3 (Intel SDM Vol. 1 §3.4.3.3).
const RFLAGS_IOPL_3: u64 = 3 << 12;
/// Privilege level 3 in a segment's DPL and a selector's RPL (Intel SDM Vol. 3A §3.4.2, §5.5).
const PL_USER: u8 = 3;

/// Pause between two reclaims of a `--reclaim-storm`.
pub const STORM_INTERVAL: Duration = Duration::from_millis(100);

/// How `stress` walks its slice (`--mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Pages in ascending order.
    #[default]
    Sequential,
    /// Pages chosen by xorshift64.
    Random,
    /// All vCPUs on one 2 MiB page, even ones writing, odd ones reading.
    SharedHot,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Sequential => Mode::Sequential,
            ModeArg::Random => Mode::Random,
            ModeArg::SharedHot => Mode::SharedHot,
        }
    }
}

/// Options for `vmm --guest NAME` (flattened into the main command line).
#[derive(Args, Debug, Clone, Default)]
pub struct GuestArgs {
    /// Run a built-in test guest instead of a kernel: stress, touch or dirty.
    #[arg(long, value_name = "NAME")]
    pub guest: Option<String>,
    /// How the stress guest walks its slice.
    #[arg(long, value_enum, default_value_t = ModeArg::Sequential)]
    pub mode: ModeArg,
    /// Write/verify generations (stress, default 2) or write generations (dirty, default
    /// 8; 0 = until stopped).
    #[arg(long, value_name = "N")]
    pub generations: Option<u64>,
    /// Random page writes per generation of the dirty guest (default: a quarter of its
    /// slice's pages).
    #[arg(long, value_name = "N")]
    pub writes_per_gen: Option<u64>,
    /// Seed of the guests' pseudo-random page choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Pace the dirty guest's page writes to this many MB (10^6 bytes of 4 KiB pages
    /// written) per second over all vCPUs, timed with the guest's TSC; 0 = as fast as it
    /// can. Without --writes-per-gen a generation is then about 200 ms of writes (so give
    /// an --incoming destination the same --dirty-rate: its replay check needs that count).
    #[arg(long, value_name = "MB_PER_S", default_value_t = 0)]
    pub dirty_rate: u64,
    /// The VMM may drop guest ranges while the guest runs: a stress guest re-initialises a
    /// page it finds zeroed by a reclaim instead of failing.
    #[arg(long)]
    pub expect_reclaim: bool,
    /// Drop this many 1 GiB ranges of slice memory (round robin, one every 100 ms) while
    /// the guest runs; implies --expect-reclaim.
    #[arg(long, value_name = "COUNT")]
    pub reclaim_storm: Option<u64>,
    /// Let KVM populate guest RAM by itself instead of the userfaultfd + stage2 pager.
    #[arg(long)]
    pub no_demand_paging: bool,
    /// Populate all of guest RAM before the guest runs (an --incoming destination: before
    /// it listens), like QEMU's -mem-prealloc: no host page faults later, at the cost of the
    /// time (0.47-0.57 s for 4 GiB of 2 MiB pages here) and the memory up front. Needs
    /// --no-demand-paging (the pager populates RAM itself, page by page).
    #[arg(long)]
    pub prefault: bool,
    /// Fail the guest if it has not finished after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub guest_timeout: Option<u64>,
    /// Write the run's figures (per-vCPU results, timings, demand-paging and stage2
    /// counters) as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub stats_json: Option<PathBuf>,
    /// Serve the control socket (JSON lines: stats, reclaim, pause, resume) at this path
    /// while the guest runs.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Live-migrate the running guest to a `vmm --incoming` destination (tcp:HOST:PORT or
    /// unix:PATH): precopy rounds over --dirty-mode, then the last round with the guest
    /// paused (or postcopy, see --postcopy-after). The source exits 0 once the destination
    /// runs the guest (postcopy: once it has every page); if the migration fails before
    /// the guest was handed over (the pause of precopy, the switch of postcopy), the guest
    /// keeps running here.
    #[arg(long, value_name = "ADDR")]
    pub migrate_to: Option<String>,
    /// Receive a migrating guest at this address (tcp:HOST:PORT or unix:PATH) instead of
    /// loading one; give the same --guest, --mem, --cpus, --seed, --writes-per-gen as the
    /// source. Postcopy needs demand paging here (no --no-demand-paging).
    #[arg(long, value_name = "ADDR")]
    pub incoming: Option<String>,
    /// How the migration source finds the pages written between rounds: kvm-bitmap (KVM's
    /// dirty bitmap, the default), kvm-ring (KVM's per-vCPU dirty rings, created when the VM
    /// starts, so give it at start also for `vmmctl migrate`; KVM logs into them only from
    /// a migration's first round to its end, so a VM that never migrates runs at full speed)
    /// or stage2-wp (stage2's own write tracking through userfaultfd write-protect; needs
    /// demand paging). Source only.
    #[arg(long, value_name = "MODE")]
    pub dirty_mode: Option<String>,
    /// Switch to postcopy after N precopy rounds (1 = right after the full pass) and one
    /// discard round (the destination drops its stale copies while the guest still runs
    /// here): the guest
    /// runs on the destination at once, pages it touches that are still on the source come
    /// on demand, the rest is pushed in the background. Needs demand paging on the
    /// destination. Once the destination runs the guest there is no way back: if the
    /// connection drops before every page arrived, the destination stops with an error and
    /// exits 1 (the guest cannot continue without its memory) and so does the source.
    #[arg(long, value_name = "N")]
    pub postcopy_after: Option<u32>,
    /// Let the guest run this long before --migrate-to starts (so that it has written
    /// memory by then).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub migrate_delay_ms: u64,
    /// Write the source's migration figures (mode, dirty-tracking mode, total and downtime in
    /// ms, bytes, one entry per round, the postcopy phase) as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub migrate_json: Option<PathBuf>,
    /// Precopy stops iterating when the estimated downtime is at most this.
    #[arg(long, value_name = "MS", default_value_t = precopy::DEFAULT_DOWNTIME_MS)]
    pub downtime_ms: u64,
    /// Precopy stops iterating after this many rounds.
    #[arg(long, value_name = "N", default_value_t = precopy::DEFAULT_MAX_ROUNDS)]
    pub max_rounds: u32,
    /// Set the guest's stop flag after this many seconds of running here (with
    /// --generations 0 the dirty guest then finishes, and is verified).
    #[arg(long, value_name = "SECONDS")]
    pub run_for: Option<u64>,
}

/// Runs the named built-in guest on `--hugepages auto` backing.
pub fn run(args: &GuestArgs, mem_bytes: u64, cpus: u8) -> anyhow::Result<i32> {
    run_on(args, mem_bytes, cpus, BackingKind::Auto)
}

/// What the run needs, resolved from the options.
struct Plan {
    kind: GuestKind,
    mode: Mode,
    params: Box<Params>,
    /// `--dirty-rate` (MB/s, 0 = unpaced).
    dirty_rate: u64,
}

fn plan(args: &GuestArgs, mem_bytes: u64, cpus: u8) -> anyhow::Result<Plan> {
    let name = args.guest.as_deref().unwrap_or_default();
    let Some(kind) = GuestKind::from_name(name) else {
        let valid: Vec<&str> = GuestKind::ALL.iter().map(|k| k.name()).collect();
        bail!(
            "unknown guest '{name}': choose one of {} (--guest NAME)",
            valid.join(", ")
        );
    };
    let mode: Mode = args.mode.into();
    if mode != Mode::Sequential && kind != GuestKind::Stress {
        bail!(
            "--mode {} is for the stress guest; {} walks its slice its own way: drop --mode",
            mode.name(),
            kind.name()
        );
    }
    let regions = memory::layout(mem_bytes);
    let slices = layout::plan_slices(kind, mode, cpus, &regions)?;
    let generations = match kind {
        GuestKind::Stress => args.generations.unwrap_or(DEFAULT_STRESS_GENERATIONS),
        GuestKind::Dirty => args.generations.unwrap_or(DEFAULT_DIRTY_GENERATIONS),
        GuestKind::Touch => 1,
    };
    if kind == GuestKind::Stress && !(1..1 << 24).contains(&generations) {
        bail!("--generations {generations}: the stress guest runs 1 to 16777215 generations");
    }
    let pages = slices[0].len / PAGE_SIZE;
    if args.dirty_rate != 0 && kind != GuestKind::Dirty {
        bail!(
            "--dirty-rate is for the dirty guest; {} does not pace its writes: drop --dirty-rate",
            kind.name()
        );
    }
    let default_writes = match args.dirty_rate {
        0 => pages / DEFAULT_DIRTY_WRITES_DIVISOR,
        rate => paced_writes_per_gen(rate, cpus).min(pages),
    };
    let writes_per_gen = args.writes_per_gen.unwrap_or(default_writes.max(1));
    if writes_per_gen == 0 {
        bail!("--writes-per-gen 0: give at least 1");
    }
    let mut params = Params::new(kind, mode, u32::from(cpus));
    params.generations = generations;
    params.seed = args.seed;
    params.writes_per_gen = writes_per_gen;
    if args.expect_reclaim || args.reclaim_storm.is_some() {
        params.flags |= FLAG_EXPECT_RECLAIM;
    }
    for (block, s) in params.vcpus.iter_mut().zip(&slices) {
        block.slice_base = s.base;
        block.slice_len = s.len;
    }
    Ok(Plan {
        kind,
        mode,
        params,
        dirty_rate: args.dirty_rate,
    })
}

fn load(mem: &GuestMemoryMmap, plan: &Plan) -> anyhow::Result<u64> {
    let payload = payload_of(plan.kind);
    if payload.code.len() as u64 > CODE_MAX {
        bail!(
            "the {} payload is {} bytes, more than the {CODE_MAX} reserved for it",
            plan.kind.name(),
            payload.code.len()
        );
    }
    mem.write_slice(payload.code, GuestAddress(CODE_GPA))
        .context("writing the guest code")?;
    mem.write_slice(plan.params.as_bytes(), GuestAddress(PARAMS_GPA))
        .context("writing the parameter block")?;
    Ok(CODE_GPA + payload.entry_offset as u64)
}

/// Sets the U/S bit in every present entry of the identity page tables that
/// `long_mode::setup` wrote for `identity_bytes` at `PML4_GPA`, so ring 3 may use them.
fn make_tables_user(mem: &GuestMemoryMmap, identity_bytes: u64) -> anyhow::Result<()> {
    let len = long_mode::page_table_bytes(identity_bytes) as usize;
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(PML4_GPA))
        .context("reading the identity page tables")?;
    for entry in bytes.chunks_exact_mut(8) {
        let mut e = u64::from_le_bytes(entry.try_into().unwrap());
        if e & PTE_PRESENT != 0 {
            e |= PTE_USER;
            entry.copy_from_slice(&e.to_le_bytes());
        }
    }
    mem.write_slice(&bytes, GuestAddress(PML4_GPA))
        .context("writing the identity page tables")?;
    Ok(())
}

/// Moves a vCPU that `long_mode::setup` put at CPL 0 to CPL 3 with IOPL 3.
///
/// This machine's software KVM interprets guest ring-0 code (about 1 µs per
/// instruction) but runs ring-3 code natively, so the test guests, which need no
/// privileged instruction, run in ring 3; IOPL 3 lets them use the test port. The
/// segment caches are set directly (KVM_SET_SREGS); the guests never reload a segment.
fn enter_ring3(fd: &kvm_ioctls::VcpuFd, id: u8) -> anyhow::Result<()> {
    let mut sregs = fd
        .get_sregs()
        .with_context(|| format!("vCPU {id}: KVM_GET_SREGS"))?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ss,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        seg.dpl = PL_USER;
        seg.selector |= u16::from(PL_USER);
    }
    fd.set_sregs(&sregs)
        .with_context(|| format!("vCPU {id}: KVM_SET_SREGS"))?;
    let mut regs = fd
        .get_regs()
        .with_context(|| format!("vCPU {id}: KVM_GET_REGS"))?;
    regs.rflags |= RFLAGS_IOPL_3;
    fd.set_regs(&regs)
        .with_context(|| format!("vCPU {id}: KVM_SET_REGS"))?;
    Ok(())
}

fn read_block(mem: &GuestMemoryMmap, vcpu: usize) -> anyhow::Result<VcpuBlock> {
    let mut bytes = [0u8; core::mem::size_of::<VcpuBlock>()];
    mem.read_slice(
        &mut bytes,
        GuestAddress(Params::vcpu_block_gpa(PARAMS_GPA, vcpu)),
    )
    .context("reading a vCPU block")?;
    Ok(guest_tests::params::vcpu_block_from_bytes(&bytes))
}

/// Replays every `dirty` vCPU's writes against guest memory; failures go into `report`.
fn verify_dirty(mem: &GuestMemoryMmap, params: &Params, report: &mut Report) -> anyhow::Result<()> {
    for vcpu in 0..params.nr_vcpus as usize {
        let block = read_block(mem, vcpu)?;
        let read = |gpa: u64| mem.read_obj::<u64>(GuestAddress(gpa)).unwrap_or(u64::MAX);
        match guest_tests::dirty::verify_dirty(
            params.seed,
            vcpu as u64,
            &block,
            params.writes_per_gen,
            read,
        ) {
            Ok(s) => info!(
                "vcpu{vcpu}: dirty replay of {} writes matches all {} pages ({} written)",
                s.writes, s.pages, s.written_pages
            ),
            Err(m) => report.fail(vcpu, format!("dirty replay: {m}"), Instant::now()),
        }
    }
    Ok(())
}

/// The migration flags, checked against each other: every misuse is refused with the fix.
struct MigrationPlan {
    migrate_to: Option<Address>,
    incoming: Option<Address>,
    /// The dirty-tracking mode a migration of this VM uses (`--dirty-mode`).
    dirty_mode: DirtyMode,
}

fn plan_migration(args: &GuestArgs) -> anyhow::Result<MigrationPlan> {
    let parse_addr = |flag: &str, a: &Option<String>| -> anyhow::Result<Option<Address>> {
        a.as_deref()
            .map(|s| s.parse::<Address>().with_context(|| format!("{flag} {s}")))
            .transpose()
    };
    let migrate_to = parse_addr("--migrate-to", &args.migrate_to)?;
    let incoming = parse_addr("--incoming", &args.incoming)?;
    if migrate_to.is_some() && incoming.is_some() {
        bail!("--migrate-to and --incoming together: a VM is either the source or the destination");
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
    ];
    if incoming.is_some() {
        if let Some((flag, _)) = source_flags.iter().find(|(_, given)| *given) {
            bail!(
                "{flag} is a migration source option: the source chooses how to migrate and \
                 the --incoming destination follows; give {flag} to the vmm with --migrate-to \
                 and drop it here"
            );
        }
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
    Ok(MigrationPlan {
        migrate_to,
        incoming,
        dirty_mode,
    })
}

/// Runs the named built-in guest on `mem_bytes` of RAM with `backing`, on `cpus` vCPUs.
/// Returns the process exit code: 0 when every vCPU passed, 1 otherwise.
pub fn run_on(
    args: &GuestArgs,
    mem_bytes: u64,
    cpus: u8,
    backing: BackingKind,
) -> anyhow::Result<i32> {
    let plan = plan(args, mem_bytes, cpus)?;
    let mig = plan_migration(args)?;
    let migrates = mig.migrate_to.is_some() || args.api_socket.is_some();
    if args.prefault && !args.no_demand_paging {
        bail!(
            "--prefault populates guest RAM up front, which demand paging would do page by \
             page: add --no-demand-paging, or drop --prefault"
        );
    }
    let ram = GuestRam::new(mem_bytes, backing)?;
    if args.prefault {
        let t = Instant::now();
        ram.prefault()?;
        println!(
            "prefaulted {} of guest RAM in {:.2} s",
            human(mem_bytes),
            t.elapsed().as_secs_f64()
        );
    }
    let vm = Vm::new(&ram, cpus)?;
    let mem = ram.memory().clone();
    let ram_regions: Vec<memory::RamRegion> = ram.regions().collect();
    let caps = Arc::new(VcpuCaps::probe(vm.kvm()).context("probing KVM for migration")?);
    let exit = ExitRequest::new().context("creating the exit event")?;
    // KVM's dirty rings can only be enabled before the vCPUs exist: a VM that may migrate
    // with --dirty-mode kvm-ring logs into them from the start.
    let ring = match mig.dirty_mode {
        DirtyMode::KvmRing { .. } if migrates => Some(Arc::new(
            DirtyTracker::new_kvm(vm.fd(), &ram_regions, mig.dirty_mode)
                .context("--dirty-mode kvm-ring")?,
        )),
        _ => None,
    };
    let start_pager = || -> anyhow::Result<Option<Arc<Pager>>> {
        if args.no_demand_paging {
            return Ok(None);
        }
        let mut cfg = PagerConfig::for_vcpus(cpus.into());
        cfg.write_tracking = mig.dirty_mode == DirtyMode::Stage2Wp && migrates;
        Ok(Some(Arc::new(Pager::start(&ram, cfg).context(
            "starting demand paging (use --no-demand-paging to let KVM populate RAM)",
        )?)))
    };
    // COM1: the test guests do not print, but its state migrates like any device's.
    let (serial, serial_irq) = SerialDevice::with_new_irq(Box::new(std::io::stdout()))
        .context("cannot create the serial IRQ event fd")?;
    let serial = Arc::new(serial);
    vm.fd()
        .register_irqfd(&serial_irq, COM1_IRQ)
        .context("KVM_IRQFD for the serial IRQ failed")?;

    // Destination: demand paging first (pages arrive through it), then listen, so the source
    // can connect as soon as we print the address.
    let mut pager = None;
    let received = match &mig.incoming {
        Some(addr) => {
            pager = start_pager()?;
            let listener = addr.listen()?;
            println!("waiting for the migration source at {}", listener.address());
            let t = Instant::now();
            let inc = precopy::receive(
                &listener,
                &mem,
                cpus.into(),
                &ram_regions,
                pager.as_deref().map(|p| p as &dyn RamPager),
            )
            .with_context(|| {
                if args.no_demand_paging {
                    "incoming migration failed; nothing runs here (this destination runs with \
                     --no-demand-paging: a source with --postcopy-after refuses it, see its \
                     message)"
                } else {
                    "incoming migration failed; nothing runs here"
                }
            })?;
            println!(
                "received {} rounds, {:.1} MB in {:.3} s ({} host pages placed through the pager){}",
                inc.rounds,
                inc.bytes as f64 / 1e6,
                t.elapsed().as_secs_f64(),
                inc.placed,
                match &inc.postcopy {
                    Some(pc) => format!(
                        "; postcopy: {} host pages of {} still on the source; stale copies \
                         dropped: {} runs in {:.1} ms before the source paused, {} runs in \
                         {:.1} ms at the switch",
                        pc.owed.len(),
                        human(pc.owed.host_page()),
                        pc.switch.early_drop_calls,
                        pc.switch.early_drop_time.as_secs_f64() * 1e3,
                        pc.switch.drop_calls,
                        pc.switch.drop_time.as_secs_f64() * 1e3
                    ),
                    None => String::new(),
                }
            );
            Some(inc)
        }
        None => None,
    };
    let entry = match &received {
        Some(_) => 0,
        None => load(&mem, &plan)?,
    };

    let mut vcpus = Vec::with_capacity(cpus.into());
    for id in 0..cpus {
        let fd = vm.create_vcpu(id)?;
        configure_vcpu(&vm, &fd, id)?;
        if let Some(t) = &ring {
            t.attach_vcpu(id.into(), &fd)
                .with_context(|| format!("attaching the dirty ring of vCPU {id}"))?;
        }
        if received.is_some() {
            vcpus.push(fd);
            continue;
        }
        long_mode::setup(
            &mem,
            &fd,
            LongModeConfig {
                pml4_gpa: PML4_GPA,
                identity_map_bytes: ram.end_gpa(),
                gdt_gpa: GDT_GPA,
                entry,
                rsp: layout::stack_top(id),
                rsi: PARAMS_GPA,
                rdi: id.into(),
            },
        )?;
        enter_ring3(&fd, id)?;
        vcpus.push(fd);
    }
    if received.is_none() && plan.kind == GuestKind::Dirty {
        // A migrated guest brought its pace along in its parameter block.
        write_pacing(&mem, &vcpus[0], plan.dirty_rate, cpus)?;
    }
    let mut postcopy_in = None;
    let ack = match received {
        Some(mut inc) => {
            precopy::restore(&inc, vm.fd(), &vcpus, &caps, Some(&serial))
                .context("restoring the migrated state")?;
            postcopy_in = inc.postcopy.take();
            Some(inc.conn)
        }
        None => {
            make_tables_user(&mem, ram.end_gpa())?;
            None
        }
    };

    // Demand paging through userfaultfd + stage2: registered after the host wrote the code,
    // tables and parameter block (those pages are present and never fault), before any
    // vCPU runs, so every first touch of slice memory is a userfaultfd fault.
    if mig.incoming.is_none() {
        pager = start_pager()?;
    }
    if let Some(pager) = &pager {
        // A page the host cannot provide ends the run with the reason, never a fault loop.
        let exit = exit.clone();
        pager.on_fatal(move |why| {
            exit.request(EXIT_FAIL, why);
        });
    }
    // Postcopy destination: the owed pages come from the source, on fault and pushed.
    let mut postcopy_rx = None;
    let mut ack = ack;
    if let (Some(pc), Some(pager)) = (postcopy_in, &pager) {
        let conn = ack.take().expect("a migrated VM has its connection");
        let fail_exit = exit.clone();
        let target = Arc::new(PostcopyTarget::new(
            mem.clone(),
            pager.clone(),
            pc.owed,
            conn,
            move |why: &str| {
                eprintln!("{why}");
                fail_exit.request(EXIT_FAIL, why);
            },
        ));
        pager.set_page_source(Some(target.clone() as Arc<dyn PageSource>));
        let rx_target = target.clone();
        let reader = pc.reader;
        let rx = std::thread::Builder::new()
            .name("postcopy-rx".into())
            .spawn(move || rx_target.receive(reader))
            .context("starting the postcopy receiver")?;
        // The source never resumes its copy once told; the vCPUs start right after.
        target
            .guest_running()
            .context("telling the source the guest runs here")?;
        println!("migrated guest runs here; postcopy: pages still owed arrive on demand");
        postcopy_rx = Some((target, rx));
    }

    let regions: Vec<(u64, u64)> = ram.regions().map(|r| (r.gpa, r.len)).collect();
    let drop_range: Box<reclaim::DropFn> = match &pager {
        Some(pager) => {
            let pager = pager.clone();
            Box::new(move |gpa, len| Ok(pager.reclaim(gpa, len)?.to_json()))
        }
        // Shared memory: MADV_DONTNEED would only unmap the file's pages, which the next
        // access maps again unchanged; punch them out of the memfd (file offset = gpa -
        // region start, as memory.rs lays the files out).
        None if !ram.shared_regions().is_empty() => {
            let files: Vec<(u64, u64, Arc<std::fs::File>)> = ram
                .shared_regions()
                .iter()
                .map(|s| (s.region.gpa, s.region.len, s.file.clone()))
                .collect();
            Box::new(move |gpa, len| {
                let (r, _, file) = files
                    .iter()
                    .find(|(r, l, _)| gpa >= *r && gpa + len <= r + l)
                    .context("range outside shared RAM")?;
                reclaim::punch_hole(file, gpa - r, len)
            })
        }
        None => {
            let ram_map: Vec<(u64, u64, u64)> =
                ram.regions().map(|r| (r.gpa, r.len, r.host_addr)).collect();
            Box::new(move |gpa, len| {
                let (r, _, host) = ram_map
                    .iter()
                    .find(|(r, l, _)| gpa >= *r && gpa + len <= r + l)
                    .context("range outside RAM")?;
                reclaim::madvise_dontneed(host + (gpa - r), len)
            })
        }
    };
    // Reclaims change guest RAM behind the dirty tracker: a migration marks them through
    // this gate (and refuses them during its last round).
    let host_changes = Arc::new(HostChanges::new());
    let mut reclaimer = Reclaimer::new(
        mem.clone(),
        Params::reclaim_seq_gpa(PARAMS_GPA),
        regions.clone(),
        ram.page_size(),
        drop_range,
        host_changes.clone(),
    );
    if let Some((target, _)) = &postcopy_rx {
        let target: Arc<PostcopyTarget> = target.clone();
        reclaimer = reclaimer.refuse_owed(Box::new(move |gpa, len| target.owes_any(gpa, len)));
    }
    let reclaimer = Arc::new(reclaimer);

    let report = Arc::new(Mutex::new(Report::new(cpus.into())));
    if mig.incoming.is_some() {
        // The guest announced its start on the source; this report continues from there.
        let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
        for vcpu in 0..usize::from(cpus) {
            let tsc = read_block(&mem, vcpu)?.tsc_start;
            let start = guest_tests::protocol::Event::Start {
                vcpu: vcpu as u64,
                tsc,
            };
            r.record(vcpu, start, Instant::now());
        }
    }
    let mut bus = PioBus::new();
    bus.register(
        TEST_PORT_RANGE,
        Arc::new(TestPort::new(
            mem.clone(),
            PARAMS_GPA,
            report.clone(),
            exit.clone(),
        )),
    )?;
    bus.register(COM1_BASE..=COM1_LAST, serial.clone())?;

    println!(
        "guest {} on {cpus} vCPU(s), {} of RAM on {}, {}{}{}",
        plan.kind.name(),
        human(mem_bytes),
        ram.backing(),
        describe(&plan),
        if plan.params.flags & FLAG_EXPECT_RECLAIM != 0 {
            ", expecting reclaims"
        } else {
            ""
        },
        if pager.is_some() {
            ", demand paging through stage2"
        } else {
            ", no demand paging"
        }
    );

    let started = Instant::now();
    let hooks = VcpuHooks {
        dirty_ring_full: ring.as_ref().map(|t| t.ring_full_hook()),
    };
    let control = Arc::new(Mutex::new(VmControl::start_with_hooks(
        vcpus,
        Arc::new(bus),
        mem.clone(),
        exit.clone(),
        hooks,
    )?));
    let (migrate_tx, migrate_rx) = std::sync::mpsc::channel::<MigrateRequest>();
    let api = match &args.api_socket {
        Some(path) => Some(api::serve(
            path,
            Arc::new(GuestApi {
                fns: api_target(
                    pager.clone(),
                    reclaimer.clone(),
                    control.clone(),
                    host_changes.clone(),
                ),
                migrate: Mutex::new(migrate_tx),
            }),
        )?),
        None => None,
    };
    let mut storm = match args.reclaim_storm {
        Some(count) => Some(Storm::start(
            reclaimer.clone(),
            layout::reclaim_ranges(&regions, ram.page_size()),
            count,
            STORM_INTERVAL,
        )?),
        None => None,
    };

    if let Some(conn) = ack {
        precopy::acknowledge(conn).context("telling the source the guest runs here")?;
        println!("migrated guest runs here");
    }
    let dirty = match (&ring, &pager) {
        (Some(t), _) => DirtySource::KvmRing(t.clone()),
        (None, Some(p)) if mig.dirty_mode == DirtyMode::Stage2Wp => {
            DirtySource::Stage2Wp(p.clone())
        }
        _ => DirtySource::KvmBitmap,
    };
    let src = precopy::Source {
        vm: vm.fd(),
        regions: &ram_regions,
        mem: &mem,
        control: &control,
        caps: caps.clone(),
        dirty: &dirty,
        pager: pager.as_deref().map(|p| p as &dyn RamPager),
        serial: Some(&serial),
        host_changes: Some(&host_changes),
    };
    let cfg = MigrateConfig {
        downtime: Duration::from_millis(args.downtime_ms),
        max_rounds: args.max_rounds.max(1),
        postcopy_after: None,
    };
    let json = args.migrate_json.as_deref();
    // Waits for the VM to stop, at most `limit`, carrying out `migrate` requests of the
    // control socket meanwhile.
    let wait = |limit: Option<Duration>| -> Waited {
        let deadline = limit.map(|l| Instant::now() + l);
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
            while let Ok((addr, postcopy_after, reply)) = migrate_rx.try_recv() {
                let cfg = MigrateConfig {
                    postcopy_after,
                    ..cfg
                };
                let (res, waited) = migrate_now(&src, &addr, cfg, json);
                let _ = reply.send(res);
                if let Some(w) = waited {
                    return w;
                }
            }
        }
    };
    let mut waited = Waited::Timeout;
    if let Some(addr) = &mig.migrate_to {
        if args.migrate_delay_ms > 0 {
            waited = wait(Some(Duration::from_millis(args.migrate_delay_ms)));
        }
        if let Waited::Timeout = waited {
            let cfg = MigrateConfig {
                postcopy_after: args.postcopy_after,
                ..cfg
            };
            if let (_, Some(w)) = migrate_now(&src, addr, cfg, json) {
                waited = w;
            }
        }
    }
    if let (Some(secs), Waited::Timeout) = (args.run_for, &waited) {
        waited = wait(Some(Duration::from_secs(secs)));
        if let Waited::Timeout = waited {
            info!("--run-for {secs} s over: setting the guest's stop flag");
            mem.write_obj(1u64, GuestAddress(Params::stop_gpa(PARAMS_GPA)))
                .context("writing the guest's stop flag")?;
        }
    }
    if let Waited::Timeout = waited {
        waited = wait(args.guest_timeout.map(Duration::from_secs));
    }
    drop(migrate_rx);
    let code = match waited {
        Waited::Exit(code) => code,
        Waited::Timeout => {
            let secs = args.guest_timeout.unwrap_or_default();
            let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
            r.fail_unfinished(&format!("not finished after {secs} s (--guest-timeout)"));
            EXIT_FAIL
        }
        Waited::Migrated | Waited::Lost => {
            // The guest runs on the destination now (or nowhere); this copy is stale.
            drop(api);
            if let Some(s) = storm.as_mut() {
                s.stop();
            }
            control.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
            return Ok(match waited {
                Waited::Migrated => EXIT_PASS,
                _ => EXIT_FAIL,
            });
        }
    };
    let elapsed = started.elapsed();
    let storm_reclaims = storm.as_mut().map(|s| s.stop()).unwrap_or(0);
    drop(api);
    control.lock().unwrap_or_else(|p| p.into_inner()).stop_all();

    let mut report = report.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Postcopy destination: the guest may have finished before every page arrived; the
    // replay below reads them all, so wait for the rest (or the reason it never came).
    let mut postcopy_failed = None;
    if let Some((target, rx)) = postcopy_rx {
        let owed = target.owed();
        if owed > 0 {
            println!("postcopy: waiting for the {owed} host pages still owed");
        }
        match rx.join() {
            Ok(Ok(f)) => println!(
                "postcopy: {} host pages received after the switch, {} faults served on demand, all pages present {:.3} s after the switch",
                f.received,
                f.faults,
                f.all_present.as_secs_f64()
            ),
            Ok(Err(e)) => postcopy_failed = Some(e.to_string()),
            Err(_) => postcopy_failed = Some("the postcopy receiver panicked".into()),
        }
        if let Some(p) = &pager {
            p.set_page_source(None);
        }
    }
    if let Some(why) = &postcopy_failed {
        report.fail_unfinished(&format!(
            "postcopy failed ({why}): the guest's memory is incomplete"
        ));
    }
    if code != EXIT_PASS && !report.any_failed() {
        // A vCPU fault stopped the VM (its thread logged the registers and bytes).
        report.fail_unfinished(&format!(
            "VM stopped with code {code} before this vCPU finished"
        ));
    }
    let paging_stats = pager.as_ref().map(|p| p.stats());
    // Stop demand paging before the host reads slice memory for the dirty replay: the
    // kernel then fills untouched pages itself and stage2's figures stay the guest's.
    drop(reclaimer);
    drop(src);
    drop(dirty);
    if let Some(pager) = pager {
        match Arc::try_unwrap(pager) {
            Ok(p) => p.stop(),
            Err(_) => log::warn!("the pager is still shared at exit; it stops when dropped"),
        }
    }
    if plan.kind == GuestKind::Dirty && report.passed() && postcopy_failed.is_none() {
        verify_dirty(&mem, &plan.params, &mut report)?;
    }

    println!("{report}");
    if let Some(stats) = &paging_stats {
        println!("{stats}");
    }
    println!(
        "time {:.3} s; {} pages verified/touched; reclaims {} ({}), {storm_reclaims} by the storm; pages re-initialised by the guest {}",
        elapsed.as_secs_f64(),
        report.total_pages(),
        paging_stats.as_ref().map_or(0, |s| s.reclaims),
        human_bytes(paging_stats.as_ref().map_or(0, |s| s.reclaimed_bytes)),
        report.total_reinit()
    );
    if let Some(path) = &args.stats_json {
        write_stats_json(path, &plan, &report, elapsed, paging_stats.as_ref())?;
    }
    drop(control);
    drop(ring);
    drop(vm);
    drop(ram);
    if let Some(why) = postcopy_failed {
        eprintln!("error: postcopy failed: {why}; the guest's memory here is incomplete");
        return Ok(EXIT_FAIL);
    }
    Ok(if report.passed() {
        EXIT_PASS
    } else {
        EXIT_FAIL
    })
}

/// How waiting for the guest ended.
enum Waited {
    /// The VM stopped with this code.
    Exit(i32),
    /// The time limit passed.
    Timeout,
    /// The guest moved to a migration destination.
    Migrated,
    /// A postcopy migration failed after the destination's guest started: the guest is lost.
    Lost,
}

/// How often the main thread looks for a control-socket `migrate` request.
const MIGRATE_POLL: Duration = Duration::from_millis(100);

/// A control-socket migration request (address, postcopy after N rounds) and where its
/// answer goes.
type MigrateRequest = (
    Address,
    Option<u32>,
    std::sync::mpsc::Sender<Result<serde_json::Value, String>>,
);

/// Migrates to `addr`, printing the outcome and writing `--migrate-json` when asked. Returns
/// the answer for the control socket and, when the guest no longer runs here, how the wait
/// ends: `Migrated`, or `Lost` when a postcopy failed after the destination took over. On any
/// other failure the VM keeps running here.
fn migrate_now(
    src: &precopy::Source<'_>,
    addr: &Address,
    cfg: MigrateConfig,
    json: Option<&std::path::Path>,
) -> (Result<serde_json::Value, String>, Option<Waited>) {
    match precopy::send(src, addr, cfg) {
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
            if let Some(path) = json {
                if let Err(e) = s.write(path) {
                    eprintln!(
                        "cannot write --migrate-json {}: {e}; the migration itself succeeded",
                        path.display()
                    );
                }
            }
            let mut v = s.to_json();
            v["to"] = serde_json::Value::String(addr.to_string());
            (Ok(v), Some(Waited::Migrated))
        }
        Err(e @ MigrateError::PostcopyLost(_)) => {
            let msg = format!("migration to {addr} failed: {e}");
            eprintln!("{msg}");
            (Err(msg), Some(Waited::Lost))
        }
        Err(e) => {
            // A failed migration resumes the VM it paused, and leaves one that was paused
            // before as it was (see precopy::send): paused now means paused before.
            let paused = src
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

/// The guest runner's control-socket target: the shared commands plus `migrate`.
struct GuestApi {
    fns: api::ApiFns,
    migrate: Mutex<std::sync::mpsc::Sender<MigrateRequest>>,
}

impl api::ApiTarget for GuestApi {
    fn stats(&self) -> serde_json::Value {
        self.fns.stats()
    }
    fn reclaim(&self, gpa: u64, len: u64) -> Result<serde_json::Value, String> {
        self.fns.reclaim(gpa, len)
    }
    fn pause(&self) -> Result<(), String> {
        self.fns.pause()
    }
    fn resume(&self) -> Result<(), String> {
        self.fns.resume()
    }
    fn migrate(&self, to: &str, postcopy_after: Option<u32>) -> Result<serde_json::Value, String> {
        if postcopy_after == Some(0) {
            return Err(
                "\"postcopy_after\": 0: give at least 1 (round 0 is the full pass of RAM)".into(),
            );
        }
        let addr: Address = to.parse().map_err(|e| format!("\"to\": {e}"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.migrate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((addr, postcopy_after, tx))
            .map_err(|_| "the VM is stopping; nothing to migrate".to_string())?;
        rx.recv()
            .map_err(|_| "the VM stopped before the migration started".to_string())?
    }
}

fn describe(plan: &Plan) -> String {
    let slice = human(plan.params.vcpus[0].slice_len);
    match plan.kind {
        GuestKind::Stress => format!(
            "mode {}, {} generation(s), slice {slice} per vCPU",
            plan.mode.name(),
            plan.params.generations,
        ),
        GuestKind::Touch => format!("slice {slice} per vCPU"),
        GuestKind::Dirty => format!(
            "{} generation(s) of {} writes, slice {slice} per vCPU{}",
            plan.params.generations,
            plan.params.writes_per_gen,
            match plan.dirty_rate {
                0 => String::new(),
                r => format!(", paced to {r} MB/s"),
            }
        ),
    }
}

/// The control socket's view of a guest run: stage2/pager statistics, reclaims with the
/// guest handshake, pause and resume of every vCPU.
fn api_target(
    pager: Option<Arc<Pager>>,
    reclaimer: Arc<Reclaimer>,
    control: Arc<Mutex<VmControl>>,
    host_changes: Arc<HostChanges>,
) -> api::ApiFns {
    let resume_control = control.clone();
    api::ApiFns {
        stats: Box::new(move || match &pager {
            Some(p) => p.stats().to_json(),
            None => serde_json::json!({ "paging": null, "stage2": null }),
        }),
        reclaim: Box::new(move |gpa, len| reclaimer.reclaim(gpa, len).map_err(|e| e.to_string())),
        pause: Box::new(move || {
            control
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pause_all()
                .map_err(|e| e.to_string())
        }),
        resume: Box::new(move || {
            // A resume that waited for a migration's end must not run a guest that moved.
            let control = resume_control.lock().unwrap_or_else(|p| p.into_inner());
            if host_changes.migrated() {
                return Err(HostChangeRefused::Migrated.to_string());
            }
            control.resume_all().map_err(|e| e.to_string())
        }),
    }
}

fn human_bytes(b: u64) -> String {
    if b == 0 {
        "0 bytes".into()
    } else {
        human(b)
    }
}

fn write_stats_json(
    path: &std::path::Path,
    plan: &Plan,
    report: &Report,
    elapsed: Duration,
    paging: Option<&PagingStats>,
) -> anyhow::Result<()> {
    let vcpus: Vec<serde_json::Value> = report
        .vcpus()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            serde_json::json!({
                "vcpu": i,
                "passed": r.state == VcpuState::Passed,
                "generation": r.generation,
                "pages": r.pages,
                "writes": r.writes,
                "reinit": r.reinit,
                "cycles": r.cycles,
                "seconds": r.started.zip(r.finished).map(|(s, f)| (f - s).as_secs_f64()),
                "failure": r.failure,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "guest": plan.kind.name(),
        "mode": plan.mode.name(),
        "passed": report.passed(),
        "seconds": elapsed.as_secs_f64(),
        "slice_bytes": plan.params.vcpus[0].slice_len,
        "slice_bases": plan.params.vcpus[..plan.params.nr_vcpus as usize]
            .iter()
            .map(|v| v.slice_base)
            .collect::<Vec<_>>(),
        "vcpus": vcpus,
        "demand_paging": paging.map(|p| p.to_json()),
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing --stats-json {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(guest: &str) -> GuestArgs {
        GuestArgs {
            guest: Some(guest.into()),
            seed: 1,
            ..GuestArgs::default()
        }
    }

    #[test]
    fn unknown_guest_lists_the_valid_ones() {
        let e = plan(&args("linux"), 1 << 30, 1).err().unwrap().to_string();
        assert_eq!(
            e,
            "unknown guest 'linux': choose one of stress, touch, dirty (--guest NAME)"
        );
    }

    #[test]
    fn too_little_memory_says_the_minimum() {
        let e = plan(&args("stress"), 8 << 20, 4).err().unwrap().to_string();
        assert!(e.contains("at least 12M"), "{e}");
    }

    #[test]
    fn plan_fills_the_parameter_block() {
        let mut a = args("dirty");
        a.reclaim_storm = Some(3);
        let p = plan(&a, 64 << 20, 2).unwrap();
        assert_eq!(p.kind, GuestKind::Dirty);
        assert_eq!(p.params.generations, DEFAULT_DIRTY_GENERATIONS);
        assert_eq!(p.params.flags & FLAG_EXPECT_RECLAIM, FLAG_EXPECT_RECLAIM);
        assert_eq!(p.params.vcpus[0].slice_len, 30 << 20);
        assert_eq!(p.params.writes_per_gen, (30 << 20) / PAGE_SIZE / 4);
        assert_eq!(p.params.vcpus[1].slice_base, (4 << 20) + (30 << 20));
        assert_eq!(p.params.vcpus[2].slice_len, 0);
    }

    #[test]
    fn dirty_rate_sets_a_short_generation_and_is_only_for_dirty() {
        let mut a = args("dirty");
        a.dirty_rate = 40;
        let p = plan(&a, 64 << 20, 2).unwrap();
        // 40 MB/s over 2 vCPUs for 200 ms: 4e6 bytes per vCPU, 976 pages.
        assert_eq!(p.params.writes_per_gen, 976);
        a.writes_per_gen = Some(5);
        assert_eq!(plan(&a, 64 << 20, 2).unwrap().params.writes_per_gen, 5);
        let mut s = args("stress");
        s.dirty_rate = 40;
        let e = plan(&s, 64 << 20, 1).err().unwrap().to_string();
        assert!(e.contains("--dirty-rate is for the dirty guest"), "{e}");
    }

    #[test]
    fn mode_is_only_for_stress() {
        let mut a = args("touch");
        a.mode = ModeArg::Random;
        let e = plan(&a, 64 << 20, 1).err().unwrap().to_string();
        assert!(e.contains("for the stress guest"), "{e}");
    }
}
