//! Runs a built-in test guest (`vmm --guest NAME`): lays it out in guest RAM, starts every
//! vCPU in 64-bit mode on it, collects its port reports and prints the verdict.

pub mod layout;
mod load;
mod plan;
pub mod port;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use guest_tests::params::FLAG_EXPECT_RECLAIM;
use guest_tests::protocol::TEST_PORT_RANGE;
use guest_tests::report::VcpuState;
use guest_tests::{GuestKind, Params, Report};
use log::info;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::long_mode::{self, LongModeConfig};
use crate::cli::{GuestArgs, MachineArgs};
use crate::devices::IoBus;
use crate::exit::is_stopped_from_outside;
use crate::machine::reclaim::{Handshake, Storm};
use crate::machine::session::{exit_code_after, Session, SessionConfig, Waited};
use crate::machine::spec::{GuestSpec, MachineSpec, Payload};
use crate::machine::{stop_pager, Ended, Machine, MachineConfig, MigrationPlan};
use crate::memory::{human, BackingKind};
use crate::migrate::destination::Pending;
use crate::pager::PagingStats;

use layout::{GDT_GPA, PARAMS_GPA, PML4_GPA};
use port::{TestPort, EXIT_FAIL, EXIT_PASS};

use load::{enter_ring3, load, make_tables_user, read_block, verify_dirty, write_pacing};
use plan::{describe, plan, Plan};

pub use plan::{
    check, DEFAULT_DIRTY_GENERATIONS, DEFAULT_DIRTY_WRITES_DIVISOR, DEFAULT_STRESS_GENERATIONS,
    PACED_GENERATION_MS,
};

/// Pause between two reclaims of a `--reclaim-storm`.
pub const STORM_INTERVAL: Duration = Duration::from_millis(100);

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
    run(args, m, mem_bytes, cpus, backing, incoming).map(|e| e.code)
}

/// [`run_on`], saying also whether the guest migrated out.
pub fn run(
    args: &GuestArgs,
    m: &MachineArgs,
    mem_bytes: u64,
    cpus: u8,
    backing: BackingKind,
    incoming: Option<Pending>,
) -> anyhow::Result<Ended> {
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
    // Set-up is done: from here this thread only loads or receives the guest, starts the
    // other threads, runs the VM and tears it down (seccomp's `main` list).
    crate::seccomp::enter_main();
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
    let mut bus = IoBus::new();
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
        Payload::Guest(GuestSpec::of(args)),
    );
    let mut session = Session::new(
        &machine,
        control,
        reclaimer.clone(),
        SessionConfig {
            api_socket: m.api_socket.clone(),
            migrate: mig.config(m),
            migrate_json: m.migrate_json.clone(),
            spec: spec.to_bytes(),
            i8042: None,
            power_button: None,
            shutdown_timeout: Duration::ZERO,
            idle_timeout: m.idle_limit(),
            api_timeout: Duration::from_secs(m.api_timeout),
            payload: format!("guest {}", plan.kind.name()),
            guest_report: Some(report.clone()),
            harvest_every: m.dirty_harvest_every(),
            migration_blocker: None,
            balloon: None,
            virtio: Vec::new(),
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
            // A guest that came in by postcopy had every page before it could leave; this
            // joins its receiver and detaches it from the pager (which it holds, as the pager
            // holds it), so that the machine is freed: a `--stay` vmm takes the next one in.
            if let Some(why) = postcopy_rx.and_then(|pc| pc.finish(&machine).err()) {
                eprintln!("error: postcopy into this VM had failed: {why}");
            }
            drop(storm);
            drop(reclaimer);
            if let Some(pager) = machine.take_pager() {
                stop_pager(pager);
            }
            return Ok(match waited {
                Waited::Migrated => Ended {
                    code: EXIT_PASS,
                    migrated: true,
                },
                _ => Ended::here(EXIT_FAIL),
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
        return Ok(Ended::here(EXIT_FAIL));
    }
    Ok(Ended::here(if vm_ended {
        code
    } else if report.passed() {
        exit_code_after(EXIT_PASS, migrate_to_failed)
    } else {
        EXIT_FAIL
    }))
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
