//! The `vmm` binary: parses the command line, then boots a Linux kernel, runs a built-in test
//! guest, or receives either from a migration source, on one [`vmm::machine::Machine`].

use std::time::Instant;

use anyhow::Result;

use vmm::cli::{self, Cli};
use vmm::machine::spec::{self, MachineSpec, Payload};
use vmm::machine::{incoming, kernel, MigrationPlan};

fn main() {
    let started = Instant::now();
    let cli = match cli::parse_from(std::env::args_os()) {
        Ok(c) => c,
        Err((msg, 0)) => {
            print!("{msg}");
            std::process::exit(0);
        }
        Err((msg, code)) => {
            eprintln!("{msg}");
            std::process::exit(code);
        }
    };
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .format_timestamp_millis()
        .init();
    // Compiled before any thread exists; each thread installs its kind's filter itself.
    if let Err(e) = vmm::seccomp::configure(cli.seccomp) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    // Before any other thread exists: every thread then has SIGINT/SIGTERM blocked and they
    // stop the VM cleanly (exit code 130/143) instead of killing the process.
    if let Err(e) = vmm::machine::signals::start() {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
    let code = match run(&cli, started) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    };
    std::process::exit(code);
}

/// The error and its causes on one line, skipping a cause whose text the message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg.replace('\n', " ")
}

fn run(cli: &Cli, started: Instant) -> Result<i32> {
    let plan = MigrationPlan::from_args(&cli.machine)?;
    vmm::machine::check_output_paths(cli)?;
    if let Some(addr) = &plan.incoming {
        return run_incoming(cli, addr, plan.secret.as_deref());
    }
    if cli.guest_args.guest.is_some() {
        return vmm::guest::run_on(
            &cli.guest_args,
            &cli.machine,
            cli.mem,
            cli.cpus,
            cli.backing()?,
            None,
        );
    }
    kernel::run(cli, started)
}

/// `--incoming`: the VM (a kernel or a test guest, its memory size, vCPUs and backing) comes
/// from the source's header; flags given here must agree with it.
fn run_incoming(
    cli: &Cli,
    addr: &vmm::migrate::Address,
    secret: Option<&vmm::migrate::auth::Secret>,
) -> Result<i32> {
    if cli.guest_args.guest.is_some() {
        // What this destination was told must make sense before it listens.
        vmm::guest::check(&cli.guest_args, cli.mem, cli.cpus)?;
    }
    let pending = incoming::accept(addr, cli.machine.migrate_idle_limit(), secret)?;
    let spec = match MachineSpec::from_bytes(&pending.layout().spec)? {
        Some(s) => s,
        None => anyhow::bail!(
            "the migration source sent no machine spec: run the same vmm build on both sides"
        ),
    };
    let backing = spec::reconcile(cli, &spec)?;
    println!(
        "incoming: {} on {} vCPU(s), {} of RAM",
        spec.payload_name(),
        spec.cpus,
        vmm::memory::human(spec.mem)
    );
    match &spec.payload {
        Payload::Kernel => kernel::run_incoming(cli, &spec, backing, pending),
        Payload::Guest(g) => {
            let args = g.to_args(&cli.guest_args)?;
            vmm::guest::run_on(
                &args,
                &cli.machine,
                spec.mem,
                spec.cpus,
                backing,
                Some(pending),
            )
        }
    }
}
