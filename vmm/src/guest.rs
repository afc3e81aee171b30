//! Runs a built-in test guest (`vmm --guest NAME`): lays it out in guest RAM, starts every
//! vCPU in 64-bit mode on it, collects its port reports and prints the verdict.

pub mod layout;
pub mod port;

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

use crate::arch::x86_64::long_mode::{self, LongModeConfig};
use crate::cli::MachineArgs;
use crate::devices::PioBus;
use crate::hypervisor::VcpuOps;
use crate::machine::reclaim::{Handshake, Storm};
use crate::machine::session::{exit_code_after, Session, SessionConfig, Waited};
use crate::machine::spec::{GuestSpec, MachineSpec, Payload};
use crate::machine::{stop_pager, Machine, MachineConfig, MigrationPlan};
use crate::memory::{self, human, BackingKind};
use crate::migrate::destination::Pending;
use crate::pager::PagingStats;
use crate::vcpu::is_stopped_from_outside;

use layout::{CODE_GPA, CODE_MAX, GDT_GPA, PARAMS_GPA, PML4_GPA};
use port::{TestPort, EXIT_FAIL, EXIT_PASS};

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
    fd: &dyn VcpuOps,
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
    /// Fail the guest if it has not finished after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub guest_timeout: Option<u64>,
    /// Set the guest's stop flag after this many seconds of running here (with
    /// --generations 0 the dirty guest then finishes, and is verified).
    #[arg(long, value_name = "SECONDS")]
    pub run_for: Option<u64>,
}

impl GuestArgs {
    /// `--mode` as the command line spells it.
    pub fn mode_name(&self) -> String {
        self.mode
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// What a migration destination needs to run and verify this guest.
    pub fn spec(&self) -> GuestSpec {
        GuestSpec {
            name: self.guest.clone().unwrap_or_default(),
            mode: self.mode_name(),
            generations: self.generations,
            writes_per_gen: self.writes_per_gen,
            seed: self.seed,
            dirty_rate: self.dirty_rate,
            expect_reclaim: self.expect_reclaim || self.reclaim_storm.is_some(),
        }
    }

    /// The guest a migration source described, with this destination's own options
    /// (`--guest-timeout`, `--run-for`) kept.
    pub fn from_spec(&self, g: &GuestSpec) -> anyhow::Result<GuestArgs> {
        let mode = ModeArg::from_str(&g.mode, true).map_err(|_| {
            anyhow::anyhow!(
                "the source's guest mode {:?} is unknown here: run the same vmm build on both sides",
                g.mode
            )
        })?;
        Ok(GuestArgs {
            guest: Some(g.name.clone()),
            mode,
            generations: g.generations,
            writes_per_gen: g.writes_per_gen,
            seed: g.seed,
            dirty_rate: g.dirty_rate,
            expect_reclaim: g.expect_reclaim,
            reclaim_storm: None,
            guest_timeout: self.guest_timeout,
            run_for: self.run_for,
        })
    }
}

/// What the run needs, resolved from the options.
struct Plan {
    kind: GuestKind,
    mode: Mode,
    params: Box<Params>,
    /// `--dirty-rate` (MB/s, 0 = unpaced).
    dirty_rate: u64,
}

/// Checks the guest options against `mem_bytes` and `cpus` without running anything (an
/// `--incoming` destination given `--guest` refuses bad options before it listens).
pub fn check(args: &GuestArgs, mem_bytes: u64, cpus: u8) -> anyhow::Result<()> {
    plan(args, mem_bytes, cpus).map(|_| ())
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
fn enter_ring3(fd: &dyn VcpuOps, id: u8) -> anyhow::Result<()> {
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

/// Runs the named built-in guest on `mem_bytes` of RAM with `backing`, on `cpus` vCPUs, on a
/// [`Machine`] with the options of `m`; with `incoming`, receives the guest from that source
/// instead of loading it. Returns the process exit code: 0 when every vCPU passed, 1 when one
/// failed or the time ran out, the VM's own code when it ended otherwise (README "Exit codes").
pub fn run_on(
    args: &GuestArgs,
    m: &MachineArgs,
    mem_bytes: u64,
    cpus: u8,
    backing: BackingKind,
    incoming: Option<Pending>,
) -> anyhow::Result<i32> {
    let plan = plan(args, mem_bytes, cpus)?;
    let mig = MigrationPlan::from_args(m)?;
    let mut machine = Machine::new(MachineConfig {
        mem: mem_bytes,
        cpus,
        backing,
        demand_paging: !m.no_demand_paging,
        prefault: m.prefault,
        dirty_mode: mig.dirty_mode,
        migrates: mig.migrates,
        // COM1: the test guests do not print, but its state migrates like any device's.
        serial_out: Box::new(std::io::stdout()),
        host_quirks: !m.no_host_quirks,
    })?;
    let mem = machine.mem().clone();
    let end_gpa = machine.ram().end_gpa();

    // Destination: demand paging first (pages arrive through it), then the rest of the stream.
    let received = match incoming {
        Some(pending) => Some(machine.receive(pending)?),
        None => None,
    };
    let entry = match &received {
        Some(_) => 0,
        None => load(&mem, &plan)?,
    };
    let vcpus = machine.create_vcpus()?;
    if received.is_none() {
        for (id, fd) in (0u8..).zip(&vcpus) {
            long_mode::setup(
                &mem,
                fd,
                LongModeConfig {
                    pml4_gpa: PML4_GPA,
                    identity_map_bytes: end_gpa,
                    gdt_gpa: GDT_GPA,
                    entry,
                    rsp: layout::stack_top(id),
                    rsi: PARAMS_GPA,
                    rdi: id.into(),
                },
            )?;
            enter_ring3(fd, id)?;
        }
        if plan.kind == GuestKind::Dirty {
            // A migrated guest brought its pace along in its parameter block.
            write_pacing(&mem, &vcpus[0], plan.dirty_rate, cpus)?;
        }
        make_tables_user(&mem, end_gpa)?;
        // Demand paging through userfaultfd + stage2: registered after the host wrote the
        // code, tables and parameter block (those pages are present and never fault), before
        // any vCPU runs, so every first touch of slice memory is a userfaultfd fault.
        machine.start_pager()?;
    }
    let postcopy = match received {
        Some(inc) => {
            machine.restore(&inc, &vcpus)?;
            Some(inc)
        }
        None => None,
    };

    // Postcopy destination: the owed pages come from the source, on fault and pushed. Before
    // the host reads guest memory below: an owed page it touched first would be filled with
    // zeroes, and the source's copy then refused as already present.
    let migrated = postcopy.is_some();
    let postcopy_rx = match postcopy {
        Some(inc) => machine.take_over(inc)?,
        None => None,
    };
    let report = Arc::new(Mutex::new(Report::new(cpus.into())));
    if migrated {
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
            machine.exit().clone(),
        )),
    )?;

    println!(
        "guest {} on {cpus} vCPU(s), {} of RAM on {}, {}{}{}",
        plan.kind.name(),
        human(mem_bytes),
        machine.ram().backing(),
        describe(&plan),
        if plan.params.flags & FLAG_EXPECT_RECLAIM != 0 {
            ", expecting reclaims"
        } else {
            ""
        },
        if machine.pager().is_some() {
            ", demand paging through stage2"
        } else {
            ", no demand paging"
        }
    );

    // Reclaims change guest RAM behind the dirty tracker: a migration marks them through the
    // machine's gate (and refuses them during its last round).
    let mut reclaimer = machine.reclaimer(Some(Handshake {
        seq_gpa: Params::reclaim_seq_gpa(PARAMS_GPA),
        reserved_below: layout::LOW_RESERVED,
    }));
    if let Some(pc) = &postcopy_rx {
        let target = pc.target().clone();
        reclaimer = reclaimer.refuse_owed(Box::new(move |gpa, len| target.owes_any(gpa, len)));
    }
    let reclaimer = Arc::new(reclaimer);

    let started = Instant::now();
    let control = machine.start(vcpus, bus)?;
    let spec = MachineSpec::new(
        mem_bytes,
        cpus,
        machine.backing(),
        Payload::Guest(args.spec()),
    );
    let mut session = Session::new(
        &machine,
        control,
        reclaimer.clone(),
        SessionConfig {
            api_socket: m.api_socket.clone(),
            migrate: MigrationPlan::config(m),
            migrate_json: m.migrate_json.clone(),
            spec: spec.to_bytes(),
            i8042: None,
            power_button: None,
            shutdown_timeout: Duration::ZERO,
            idle_timeout: m.idle_limit(),
            payload: format!("guest {}", plan.kind.name()),
        },
    )?;
    let mut storm = match args.reclaim_storm {
        Some(count) => Some(Storm::start(
            reclaimer.clone(),
            layout::reclaim_ranges(
                &machine
                    .regions()
                    .iter()
                    .map(|r| (r.gpa, r.len))
                    .collect::<Vec<_>>(),
                machine.ram().page_size(),
            ),
            count,
            STORM_INTERVAL,
        )?),
        None => None,
    };

    let mut waited = session.migrate_to(
        mig.migrate_to.as_ref(),
        Duration::from_millis(m.migrate_delay_ms),
        m.postcopy_after,
    );
    if let (Some(secs), Waited::Timeout) = (args.run_for, &waited) {
        waited = session.wait(Some(Duration::from_secs(secs)));
        if let Waited::Timeout = waited {
            info!("--run-for {secs} s over: setting the guest's stop flag");
            mem.write_obj(1u64, GuestAddress(Params::stop_gpa(PARAMS_GPA)))
                .context("writing the guest's stop flag")?;
        }
    }
    if let Waited::Timeout = waited {
        waited = session.wait(args.guest_timeout.map(Duration::from_secs));
    }
    let migrate_to_failed = session.migrate_to_failed();
    session.close();
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
            if let Some(s) = storm.as_mut() {
                s.stop();
            }
            session.stop();
            return Ok(match waited {
                Waited::Migrated => EXIT_PASS,
                _ => EXIT_FAIL,
            });
        }
    };
    let elapsed = started.elapsed();
    let storm_reclaims = storm.as_mut().map(|s| s.stop()).unwrap_or(0);
    session.stop();

    let mut report = report.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Postcopy destination: the guest may have finished before every page arrived; the
    // replay below reads them all, so wait for the rest (or the reason it never came).
    let postcopy_failed = postcopy_rx.and_then(|pc| pc.finish(&machine).err());
    if let Some(why) = &postcopy_failed {
        report.fail_unfinished(&format!(
            "postcopy failed ({why}): the guest's memory is incomplete"
        ));
    }
    // PASS and FAIL are the test port's verdicts (or the time limit's); any other code is how
    // the VM itself ended (a signal, `shutdown`, a vCPU failure, ...) and is the exit code.
    let vm_ended = !matches!(code, EXIT_PASS | EXIT_FAIL);
    if is_stopped_from_outside(code) {
        report.fail_unfinished(&format!(
            "the VM was stopped from outside (exit code {code}) before this vCPU finished"
        ));
    } else if code != EXIT_PASS && !report.any_failed() {
        // A vCPU fault (its thread logged the registers and bytes) or the host stopped the VM.
        report.fail_unfinished(&format!(
            "VM stopped with code {code} before this vCPU finished"
        ));
    }
    let paging_stats = machine.pager().map(|p| p.stats());
    // Stop demand paging before the host reads slice memory for the dirty replay: the
    // kernel then fills untouched pages itself and stage2's figures stay the guest's.
    drop(storm);
    drop(reclaimer);
    if let Some(pager) = machine.take_pager() {
        stop_pager(pager);
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
    if let Some(path) = &m.stats_json {
        write_stats_json(path, &plan, &report, elapsed, paging_stats.as_ref())?;
    }
    drop(machine);
    if let Some(why) = postcopy_failed {
        eprintln!("error: postcopy failed: {why}; the guest's memory here is incomplete");
        return Ok(EXIT_FAIL);
    }
    Ok(if vm_ended {
        code
    } else if report.passed() {
        exit_code_after(EXIT_PASS, migrate_to_failed)
    } else {
        EXIT_FAIL
    })
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
