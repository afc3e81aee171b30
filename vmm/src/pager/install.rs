//! Asking stage2 about a fault whose host page is present, and carrying out its answer: the one place a stage2 [`Outcome`] is matched.
//!
//! Every caller (a filled fault, a fault-around page, a WP fault, a placed page) reads
//! stage2's invalidation sequence *before* it resolves the host page, and asks here after; a
//! `Retry` answer means an invalidation raced in between, and the caller finishes later (never
//! spinning: see [`super::events`]).

use log::{debug, error};
use stage2::{Access, Fault, Outcome, PageSize, Perms};

use super::events::Handler;
use super::stats::{add, inc};
use super::{Shared, SZ_4K};

/// Which counters an answer goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tally {
    /// A fault (or a placed page): the outcome counters (`installed`, `spurious`, ...).
    Fault,
    /// A fault-around page recorded on its own: counted in `fault_around` when installed, and
    /// nowhere else (it is not a fault).
    Around,
}

/// stage2's answer, sorted by what the caller does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// stage2 maps the page and allows the access: `installed` when this call put the leaf in
    /// (`Outcome::Installed`), false when it was there already (`Spurious`) or was widened in
    /// place (`Relaxed`).
    Mapped { installed: bool },
    /// An invalidation raced (or a break-before-make was in flight): finish later, if the host
    /// still has the page then.
    Retry,
    /// The access is not allowed, or the GPA is not RAM; logged here.
    Denied,
}

impl Shared {
    /// Asks stage2 about `fault`, whose host page is present; `seq` was read before the host
    /// page was resolved. Counts the answer as `tally` says.
    pub(super) fn ask_stage2(&self, fault: Fault, seq: u64, tally: Tally) -> Answer {
        let c = &self.counters;
        let outcome = self.s2.handle_fault(fault, &self.backing, seq);
        let answer = match outcome {
            Outcome::Installed { .. } => Answer::Mapped { installed: true },
            Outcome::Spurious | Outcome::Relaxed { .. } => Answer::Mapped { installed: false },
            Outcome::Retry => Answer::Retry,
            Outcome::Denied => {
                error!(
                    "stage2 denied a {:?} at gpa {:#x} (vCPU {}); the access is not allowed",
                    fault.access, fault.gpa, fault.vcpu
                );
                Answer::Denied
            }
        };
        match (tally, outcome) {
            (Tally::Fault, Outcome::Installed { .. }) => inc(&c.installed),
            (Tally::Fault, Outcome::Spurious) => inc(&c.spurious),
            (Tally::Fault, Outcome::Relaxed { .. }) => inc(&c.relaxed),
            (Tally::Fault, Outcome::Retry) => inc(&c.retry),
            (Tally::Fault, Outcome::Denied) => inc(&c.denied),
            (Tally::Around, Outcome::Installed { .. }) => inc(&c.fault_around),
            (Tally::Around, _) => {}
        }
        answer
    }
}

impl Handler {
    /// Records a fault whose host page is present (`filled` bytes from its block were filled
    /// by this handler, 0 if another one had filled it), records the fault-around pages of the
    /// fill, and wakes the vCPU. Returns false when an invalidation raced: the caller finishes
    /// it later, and the vCPU sleeps on until then.
    pub(super) fn install(
        &mut self,
        gpa: u64,
        access: Access,
        vcpu: usize,
        seq: u64,
        filled: u64,
    ) -> bool {
        let sh = self.sh.clone();
        let page_base = gpa & !(SZ_4K - 1);
        let around = sh.page == PageSize::Size4K && filled > SZ_4K;
        match sh.ask_stage2(Fault { gpa, access, vcpu }, seq, Tally::Fault) {
            Answer::Mapped { installed } => {
                if !installed && filled > 0 {
                    // A MISSING fault on a GPA that stage2 maps, and our fill succeeded: the host
                    // really had lost the page (a drop stage2 had not been told of yet: a REMOVE
                    // read by another handler and not yet bracketed), or the installer's fill was
                    // still in flight. The fill restored it, so stage2's entry maps the right
                    // memory again. Dropping the entry and handling the fault afresh, the other
                    // possible answer, would count two installs for one page when it was only a
                    // racing duplicate.
                    inc(&sh.counters.refills);
                }
                if around {
                    self.map_around(page_base + SZ_4K, filled - SZ_4K, vcpu);
                }
            }
            Answer::Retry => {
                // The fault-around pages of this fill are finished later too, page by page.
                if sh.page == PageSize::Size4K {
                    for off in (SZ_4K..filled).step_by(SZ_4K as usize) {
                        self.defer(page_base + off, Access::Write, vcpu, false, false);
                    }
                }
                return false;
            }
            Answer::Denied => {}
        }
        // The fill did not wake the vCPU: it resumes only once stage2 has recorded the page,
        // as a vCPU under KVM resumes only once its EPT entry is in.
        sh.wake_range(sh.block_of(gpa), filled.max(sh.page.bytes()));
        true
    }

    /// Records fault-around pages `[gpa, gpa+len)` (filled by us) with one batched stage2 call
    /// that leaves alone any page another handler recorded meanwhile (a deferred fault on one
    /// of them may have been installed, read-only, since our fill); if a larger mapping is in
    /// the way, page by page.
    fn map_around(&mut self, gpa: u64, len: u64, vcpu: usize) {
        let sh = self.sh.clone();
        let Some(hva) = sh.backing.gpa_to_host(gpa) else {
            return;
        };
        match sh
            .s2
            .map_range_absent(gpa, len, hva, Perms::RWX, PageSize::Size4K)
        {
            Ok(n) => add(&sh.counters.fault_around, n as u64),
            Err(e) => {
                debug!("fault-around map_range {gpa:#x}+{len:#x}: {e}; page by page");
                for off in (0..len).step_by(SZ_4K as usize) {
                    let fault = Fault {
                        gpa: gpa + off,
                        access: Access::Write,
                        vcpu,
                    };
                    let seq = sh.s2.invalidate_seq();
                    if sh.ask_stage2(fault, seq, Tally::Around) == Answer::Retry {
                        self.defer(gpa + off, Access::Write, vcpu, false, false);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use stage2::{Access, PageSize};

    use crate::pager::fake::{wake, Call, Rig, HOST, P};

    #[test]
    fn fault_around_stops_at_the_end_of_the_ram_region() {
        // 8 pages of RAM, fault-around of 16: a fault at page 5 fills pages 5 to 7 only.
        // (Without write tracking every fill is recorded writable and so filled by COPY.)
        let mut rig = Rig::new(8, PageSize::Size4K, false, 16);
        rig.fault(5 * P, false);
        assert_eq!(
            rig.host.take_calls(),
            vec![
                Call::Copy {
                    dst: HOST + 5 * P,
                    len: 3 * P,
                    wp: false
                },
                wake(5 * P, 3 * P),
            ]
        );
        let st = rig.stats();
        assert_eq!((st.installed, st.fault_around_pages), (1, 2));
        for page in 5..8 {
            assert!(rig.maps(page * P, Access::Write), "page {page}");
        }
        assert!(!rig.maps(4 * P, Access::Read));
    }

    #[test]
    fn fault_around_records_only_the_pages_its_fill_put_in() {
        let mut rig = Rig::new(8, PageSize::Size4K, false, 16);
        // Page 7 is filled already (another handler, not yet in stage2): the run stops there.
        rig.host.populate(HOST + 7 * P, P);
        rig.fault(4 * P, false);
        let st = rig.stats();
        assert_eq!((st.eagain, st.installed, st.fault_around_pages), (1, 1, 2));
        assert_eq!(st.populated_4k, 3 * P);
        for page in 4..7 {
            assert!(rig.maps(page * P, Access::Write), "page {page}");
        }
        assert!(
            !rig.maps(7 * P, Access::Read),
            "left to the fault of the handler that filled it"
        );
    }

    #[test]
    fn an_install_that_meets_an_invalidation_is_deferred_with_its_fault_around_pages() {
        let mut rig = Rig::new(8, PageSize::Size4K, false, 4);
        let sh = rig.handler.sh.clone();
        let inv = sh.s2.invalidate(0..8 * P);
        rig.fault(P, true);
        let deferred: Vec<u64> = rig.handler.deferred.iter().map(|d| d.gpa).collect();
        assert_eq!(deferred, vec![2 * P, 3 * P, 4 * P, P]);
        assert!(rig.handler.deferred.iter().all(|d| !d.needs_fill));
        assert!(!rig.host.take_woken());
        drop(inv);
        rig.handler.run_deferred();
        assert!(rig.handler.deferred.is_empty());
        for page in 1..5 {
            assert!(rig.maps(page * P, Access::Write), "page {page}");
        }
        assert_eq!(rig.stats().retry, 1);
    }
}
