//! The `vmm` binary: parses the command line, then boots a Linux kernel, runs a built-in test
//! guest, or receives either from a migration source, on one [`vmm::machine::Machine`].

use std::time::{Duration, Instant};

use anyhow::Result;

use vmm::cli::{self, Cli};
use vmm::machine::spec::{self, MachineSpec, Payload};
use vmm::machine::{incoming, kernel, vacant, Ended, MigrationPlan};

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
    if cli.machine.stay {
        // Its main thread creates one machine after another.
        vmm::seccomp::main_creates_machines();
    }
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
    let secret = plan.secret.as_deref();
    let first = if let Some(addr) = &plan.incoming {
        if cli.guest_args.guest.is_some() {
            // What this destination was told must make sense before it listens.
            vmm::guest::check(&cli.guest_args, cli.mem, cli.cpus)?;
        }
        let received = incoming::listen(addr).and_then(|l| {
            // A staying destination answers on its control socket while it waits.
            let vacancy = match &cli.machine.api_socket {
                Some(path) if cli.machine.stay => {
                    let v = vacant::Vacancy::open(
                        path,
                        Duration::from_secs(cli.machine.api_timeout),
                        &vacant::History {
                            vms: 0,
                            last: "no VM yet".into(),
                        },
                    )?;
                    v.receiving(&l.address());
                    Some(v)
                }
                _ => None,
            };
            receive(cli, l, secret, vacancy)
        });
        match received {
            Ok(ended) => Some(ended),
            Err(e) if cli.machine.stay => {
                eprintln!("error: {}", one_line(&e));
                None
            }
            Err(e) => return Err(e),
        }
    } else if cli.guest_args.guest.is_some() {
        Some(vmm::guest::run(
            &cli.guest_args,
            &cli.machine,
            cli.mem,
            cli.cpus,
            cli.backing()?,
            None,
        )?)
    } else if cli.kernel.is_some() || !cli.machine.stay {
        Some(kernel::run(cli, started)?)
    } else {
        None
    };
    if !cli.machine.stay {
        return Ok(first.map_or(1, |e| e.code));
    }
    stay(cli, first, secret)
}

/// `--stay`: after each VM that migrates out (or a failed incoming migration), serve the
/// control socket with no VM until `receive` brings the next one or `shutdown` ends the
/// process. A VM that ends here ends the process with its code.
fn stay(
    cli: &Cli,
    mut last: Option<Ended>,
    secret: Option<&vmm::migrate::auth::Secret>,
) -> Result<i32> {
    let Some(path) = cli.machine.api_socket.as_deref() else {
        anyhow::bail!("--stay needs --api-socket PATH");
    };
    let client_timeout = Duration::from_secs(cli.machine.api_timeout);
    let mut history = vacant::History::default();
    loop {
        match last {
            Some(e) if !e.migrated => return Ok(e.code),
            Some(_) => {
                history.vms += 1;
                history.last = format!("VM {} migrated out", history.vms);
            }
            None if history.last.is_empty() => history.last = "no VM yet".into(),
            None => {}
        }
        let vacancy = vacant::Vacancy::open(path, client_timeout, &history)?;
        let listener = match vacancy.wait()? {
            vacant::Next::Shutdown => {
                println!("shutdown asked with no VM here; the vmm ends");
                return Ok(vmm::exit::EXIT_OK);
            }
            vacant::Next::Receive(l) => l,
        };
        last = match receive(cli, listener, secret, Some(vacancy)) {
            Ok(ended) => Some(ended),
            Err(e) => {
                let msg = one_line(&e);
                eprintln!("error: {msg}");
                history.last = format!("a migration in failed: {msg}");
                None
            }
        };
    }
}

/// An incoming VM: the VM (a kernel or a test guest, its memory size, vCPUs and backing)
/// comes from the source's header; flags given here must agree with it. `vacant`, the control
/// socket of a `--stay` vmm with no VM, serves until the source is accepted.
fn receive(
    cli: &Cli,
    listener: vmm::migrate::Listener,
    secret: Option<&vmm::migrate::auth::Secret>,
    vacant: Option<vacant::Vacancy>,
) -> Result<Ended> {
    let pending = incoming::accept_on(&listener, cli.machine.migrate_idle_limit(), secret)?;
    // Nobody else may connect while the VM runs (a unix socket's file goes with it), and the
    // VM's own control socket takes the path over.
    drop(listener);
    drop(vacant);
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
            vmm::guest::run(
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
