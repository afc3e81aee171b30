//! The destination of a migration, for every payload: listen, read the source's header (its
//! machine spec), receive RAM and state into a [`Machine`] built from it, restore the vCPUs
//! and devices, and take the postcopy phase's owed pages on demand.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::hypervisor::Vcpu;
use anyhow::Context;

use super::Machine;
use crate::exit::EXIT_HOST_FAILED;
use crate::memory::human;
use crate::migrate::auth::Secret;
use crate::migrate::destination::postcopy::{PostcopyTarget, TargetFigures};
use crate::migrate::destination::{self, Incoming, Pending};
use crate::migrate::ram::RamPager;
use crate::migrate::transport::Listener;
use crate::migrate::Address;
use crate::migrate::MigrateError;
use crate::pager::PageSource;

/// Listens at `addr`, says so on stdout (`waiting for the migration source at ADDR`: tests and
/// scripts wait for this line), and accepts one source's header; the source must make progress
/// at least every `idle` (`--migrate-timeout`) from its connection on.
pub fn accept(
    addr: &Address,
    idle: Option<std::time::Duration>,
    secret: Option<&Secret>,
) -> anyhow::Result<Pending> {
    accept_on(&listen(addr)?, idle, secret)
}

/// Listens at `addr` for a migration source.
pub fn listen(addr: &Address) -> anyhow::Result<Listener> {
    let listener = addr.listen()?;
    if let Address::Unix(path) = addr {
        // A signal while this waits ends the process before the listener's drop removes it.
        super::signals::remove_on_early_exit(path.clone());
    }
    Ok(listener)
}

/// [`accept`] on a listener made already (by [`listen`]).
pub fn accept_on(
    listener: &Listener,
    idle: Option<std::time::Duration>,
    secret: Option<&Secret>,
) -> anyhow::Result<Pending> {
    println!("waiting for the migration source at {}", listener.address());
    destination::accept(listener, idle, secret)
        .context("incoming migration failed; nothing runs here")
}

impl Machine {
    /// Receives a migrating VM's RAM and state into this machine (demand paging starts first:
    /// pages arrive through it), printing the figures.
    pub fn receive(&mut self, pending: Pending) -> anyhow::Result<Incoming> {
        let pager = self.start_pager()?;
        let t = Instant::now();
        let inc = destination::receive(
            pending,
            self.mem(),
            self.vm().cpus().into(),
            self.regions(),
            pager.as_deref().map(|p| p as &dyn RamPager),
        )
        .with_context(|| {
            if pager.is_none() {
                "incoming migration failed; nothing runs here (this destination runs with \
                 --no-demand-paging: a source with --postcopy-after refuses it, see its \
                 message)"
            } else {
                "incoming migration failed; nothing runs here"
            }
        })?;
        println!(
            "received {} rounds, {:.1} MB{} in {:.3} s ({} host pages placed through the pager){}",
            inc.received.rounds,
            inc.bytes as f64 / 1e6,
            match inc.connections {
                1 => String::new(),
                n => format!(" over {n} connections"),
            },
            t.elapsed().as_secs_f64(),
            inc.received.placed,
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
        if let Some(c) = &inc.verified {
            println!(
                "verified {} pages against the source's digest before the guest runs: none differ{}",
                c.verified,
                match &inc.postcopy {
                    Some(_) => " (the owed ones are checked as they arrive)",
                    None => "",
                }
            );
        }
        Ok(inc)
    }

    /// Restores the received VM state, vCPUs and COM1 into this machine's (not yet running)
    /// `vcpus`.
    pub fn restore(&self, inc: &Incoming, vcpus: &[Vcpu]) -> anyhow::Result<()> {
        destination::restore(inc, self.vm(), vcpus, self.caps(), Some(self.serial()))
            .context("restoring the migrated state")
    }

    /// Hands the guest over: tells the source the guest runs here, and after a postcopy
    /// switch starts taking the owed pages (on fault and pushed). Call it right before the
    /// vCPUs start.
    pub fn take_over(&self, mut inc: Incoming) -> anyhow::Result<Option<PostcopyRx>> {
        let Some(pc) = inc.postcopy.take() else {
            destination::acknowledge(inc.conn).context("telling the source the guest runs here")?;
            println!("migrated guest runs here");
            return Ok(None);
        };
        let pager = self
            .pager()
            .context("the source switched to postcopy, which needs demand paging here")?;
        let fail_exit = self.exit().clone();
        let target = Arc::new(PostcopyTarget::new(
            self.mem().clone(),
            pager.clone(),
            pc.owed,
            inc.conn,
            move |why: &str| {
                eprintln!("{why}");
                fail_exit.request(EXIT_HOST_FAILED, why);
            },
            pc.digest,
        ));
        pager.set_page_source(Some(target.clone() as Arc<dyn PageSource>));
        let rx_target = target.clone();
        let reader = pc.reader;
        let rx = std::thread::Builder::new()
            .name("postcopy-rx".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::MigrationReceiver);
                rx_target.receive(reader)
            })
            .context("starting the postcopy receiver")?;
        // The source never resumes its copy once told; the vCPUs start right after.
        target
            .guest_running()
            .context("telling the source the guest runs here")?;
        println!("migrated guest runs here; postcopy: pages still owed arrive on demand");
        Ok(Some(PostcopyRx { target, rx }))
    }
}

/// The postcopy phase of a destination: the owed pages still arriving.
pub struct PostcopyRx {
    target: Arc<PostcopyTarget>,
    rx: JoinHandle<Result<TargetFigures, MigrateError>>,
}

impl PostcopyRx {
    /// The owed-page state, for the reclaim gate (a reclaim of a page still owed is refused).
    pub fn target(&self) -> &Arc<PostcopyTarget> {
        &self.target
    }

    /// Waits for every owed page (or the reason it never came), prints the figures, and
    /// detaches the page source from `machine`'s pager. `Err` says why the guest's memory is
    /// incomplete.
    pub fn finish(self, machine: &Machine) -> Result<(), String> {
        let owed = self.target.owed();
        if owed > 0 {
            println!("postcopy: waiting for the {owed} host pages still owed");
        }
        let res = match self.rx.join() {
            Ok(Ok(f)) => {
                println!(
                    "postcopy: {} host pages received after the switch, {} faults served on demand, all pages present {:.3} s after the switch",
                    f.received,
                    f.faults,
                    f.all_present.as_secs_f64()
                );
                match f.differ {
                    0 => Ok(()),
                    n => Err(format!(
                        "{n} of the {} pages that arrived after the switch differ from the \
                         source's digest: the migration damaged guest memory",
                        f.verified
                    )),
                }
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the postcopy receiver panicked".into()),
        };
        if let Some(p) = machine.pager() {
            p.set_page_source(None);
        }
        res
    }
}
