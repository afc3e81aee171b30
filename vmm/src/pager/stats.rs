//! The pager's statistics: monotonic counters shared by the handlers, and their snapshot.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use stage2::PageSize;

use super::{Pager, Shared};

/// Counters of the pager (monotonic, shared by the handlers).
#[derive(Default, Debug)]
pub(super) struct Counters {
    pub(super) ev_missing: AtomicU64,
    pub(super) ev_wp: AtomicU64,
    pub(super) ev_minor: AtomicU64,
    pub(super) ev_remove: AtomicU64,
    pub(super) ev_unmap: AtomicU64,
    pub(super) ev_remap: AtomicU64,
    pub(super) ev_fork: AtomicU64,
    pub(super) populated_4k: AtomicU64,
    pub(super) populated_2m: AtomicU64,
    pub(super) populated_1g: AtomicU64,
    pub(super) installed: AtomicU64,
    pub(super) spurious: AtomicU64,
    pub(super) relaxed: AtomicU64,
    pub(super) retry: AtomicU64,
    pub(super) denied: AtomicU64,
    pub(super) fault_around: AtomicU64,
    pub(super) refills: AtomicU64,
    pub(super) eexist: AtomicU64,
    pub(super) eagain: AtomicU64,
    /// Faults the host refused to back (each one stopped the VM).
    pub(super) fatal: AtomicU64,
    pub(super) deferred: AtomicU64,
    pub(super) deferred_dropped: AtomicU64,
    pub(super) wp_cleared: AtomicU64,
    pub(super) wp_waited: AtomicU64,
    pub(super) continued: AtomicU64,
    pub(super) hole_punches: AtomicU64,
    pub(super) harvests: AtomicU64,
    pub(super) harvested_pages: AtomicU64,
    pub(super) reclaims: AtomicU64,
    pub(super) reclaimed_bytes: AtomicU64,
    pub(super) zapped: AtomicU64,
    pub(super) external_invalidations: AtomicU64,
    pub(super) own_removes: AtomicU64,
}

pub(super) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(super) fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A snapshot of the pager's statistics and stage2's.
#[derive(Clone, Debug)]
pub struct PagingStats {
    /// Guest RAM is a shared memfd (MISSING + MINOR faults) rather than private memory.
    pub shared_memory: bool,
    /// Bytes mapped from the shared memory file by UFFDIO_CONTINUE (MINOR faults).
    pub continued: u64,
    /// Reclaims done by punching a hole in the shared memory file.
    pub hole_punches: u64,
    /// stage2's own statistics (mapped bytes by page size, outcomes, invalidations, ...).
    pub stage2: stage2::Stats,
    /// userfaultfd events by kind: MISSING faults.
    pub events_missing: u64,
    /// WP faults.
    pub events_wp: u64,
    /// MINOR faults.
    pub events_minor: u64,
    /// REMOVE events.
    pub events_remove: u64,
    /// UNMAP events.
    pub events_unmap: u64,
    /// REMAP events.
    pub events_remap: u64,
    /// FORK events.
    pub events_fork: u64,
    /// Host bytes populated by this pager, in 4 KiB pages.
    pub populated_4k: u64,
    /// Host bytes populated in 2 MiB pages.
    pub populated_2m: u64,
    /// Host bytes populated in 1 GiB pages.
    pub populated_1g: u64,
    /// Fault outcomes as stage2 answered the handlers: installs.
    pub installed: u64,
    /// Spurious (already mapped).
    pub spurious: u64,
    /// Relaxed in place.
    pub relaxed: u64,
    /// Retry (an invalidation raced or a BBM was in flight).
    pub retry: u64,
    /// Denied.
    pub denied: u64,
    /// Extra 4 KiB pages filled and mapped by fault-around.
    pub fault_around_pages: u64,
    /// MISSING faults on GPAs stage2 mapped whose host page was really gone (refilled).
    pub refills: u64,
    /// EEXIST races (a fill found the page present).
    pub eexist: u64,
    /// EAGAIN races (a fill met a pending REMOVE, or stopped part way).
    pub eagain: u64,
    /// Faults the host refused to back (each stops the VM).
    pub fatal: u64,
    /// Faults deferred (fill or install retried later).
    pub deferred: u64,
    /// Deferred faults given up (host page gone, or too many attempts).
    pub deferred_dropped: u64,
    /// WP faults answered by clearing the host write protection.
    pub wp_cleared: u64,
    /// WP faults that found a dirty-log harvest running and were finished after it.
    pub wp_waited: u64,
    /// Dirty-log harvests ([`Pager::harvest_dirty`]).
    pub harvests: u64,
    /// 4 KiB pages reported dirty by those harvests.
    pub harvested_pages: u64,
    /// Reclaims done.
    pub reclaims: u64,
    /// Bytes reclaimed.
    pub reclaimed_bytes: u64,
    /// Stage2 leaves zapped by reclaims and external removes.
    pub zapped: u64,
    /// REMOVE/UNMAP events not caused by this VMM, bracketed by the handlers.
    pub external_invalidations: u64,
    /// REMOVE events caused by our own reclaims (already bracketed).
    pub own_removes: u64,
}

impl fmt::Display for PagingStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: [(&str, u64); 34] = [
            ("uffd events: missing", self.events_missing),
            ("uffd events: write-protect", self.events_wp),
            ("uffd events: minor", self.events_minor),
            ("uffd events: remove", self.events_remove),
            ("uffd events: unmap", self.events_unmap),
            ("uffd events: remap", self.events_remap),
            ("uffd events: fork", self.events_fork),
            ("populated bytes 4K", self.populated_4k),
            ("populated bytes 2M", self.populated_2m),
            ("populated bytes 1G", self.populated_1g),
            ("faults installed", self.installed),
            ("faults spurious", self.spurious),
            ("faults relaxed", self.relaxed),
            ("faults retry", self.retry),
            ("faults denied", self.denied),
            ("fault-around pages", self.fault_around_pages),
            ("refills (host lost page)", self.refills),
            ("races EEXIST", self.eexist),
            ("races EAGAIN", self.eagain),
            ("fills refused (fatal)", self.fatal),
            ("deferred faults", self.deferred),
            ("deferred faults dropped", self.deferred_dropped),
            ("WP cleared", self.wp_cleared),
            ("bytes mapped by CONTINUE", self.continued),
            ("reclaims by hole punch", self.hole_punches),
            ("WP waited for a harvest", self.wp_waited),
            ("dirty harvests", self.harvests),
            ("dirty pages harvested", self.harvested_pages),
            ("reclaims", self.reclaims),
            ("reclaimed bytes", self.reclaimed_bytes),
            ("zapped leaves", self.zapped),
            ("external invalidations", self.external_invalidations),
            ("own removes", self.own_removes),
            (
                "populated bytes total",
                self.populated_4k + self.populated_2m + self.populated_1g,
            ),
        ];
        writeln!(
            f,
            "demand paging on {}",
            if self.shared_memory {
                "shared memfd memory (MISSING + MINOR faults, UFFDIO_CONTINUE, hole-punch reclaim)"
            } else {
                "private memory"
            }
        )?;
        writeln!(f, "{:<28} {:>16}", "demand paging", "count")?;
        for (name, v) in rows {
            writeln!(f, "{name:<28} {v:>16}")?;
        }
        write!(f, "{}", self.stage2)
    }
}

impl PagingStats {
    /// The statistics as JSON (for the control socket): `{"paging": {...}, "stage2": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.stage2;
        serde_json::json!({
            "paging": {
                "memory": if self.shared_memory { "shared" } else { "private" },
                "continued_bytes": self.continued,
                "hole_punches": self.hole_punches,
                "events_missing": self.events_missing,
                "events_wp": self.events_wp,
                "events_minor": self.events_minor,
                "events_remove": self.events_remove,
                "events_unmap": self.events_unmap,
                "events_remap": self.events_remap,
                "events_fork": self.events_fork,
                "populated_bytes_4k": self.populated_4k,
                "populated_bytes_2m": self.populated_2m,
                "populated_bytes_1g": self.populated_1g,
                "installed": self.installed,
                "spurious": self.spurious,
                "relaxed": self.relaxed,
                "retry": self.retry,
                "denied": self.denied,
                "fault_around_pages": self.fault_around_pages,
                "refills": self.refills,
                "eexist": self.eexist,
                "eagain": self.eagain,
                "fatal": self.fatal,
                "deferred": self.deferred,
                "deferred_dropped": self.deferred_dropped,
                "wp_cleared": self.wp_cleared,
                "wp_waited": self.wp_waited,
                "harvests": self.harvests,
                "harvested_pages": self.harvested_pages,
                "reclaims": self.reclaims,
                "reclaimed_bytes": self.reclaimed_bytes,
                "zapped": self.zapped,
                "external_invalidations": self.external_invalidations,
                "own_removes": self.own_removes,
            },
            "stage2": {
                "installs_4k": s.installs_4k,
                "installs_2m": s.installs_2m,
                "installs_1g": s.installs_1g,
                "spurious": s.spurious,
                "relaxed": s.relaxed,
                "retries": s.retries,
                "denied": s.denied,
                "bbms": s.bbms,
                "splits": s.splits,
                "collapses": s.collapses,
                "zapped": s.zapped,
                "undone": s.undone,
                "invalidations": s.invalidations,
                "yields": s.yields,
                "tables_live": s.tables_live,
                "mapped_4k": s.mapped_4k,
                "mapped_2m": s.mapped_2m,
                "mapped_1g": s.mapped_1g,
                "mapped_bytes": s.mapped_bytes(),
                "dirty_marked": s.dirty_marked,
                "write_protected": s.write_protected,
            }
        })
    }
}

impl Shared {
    /// Counts `bytes` of host memory populated by a fill, by page size.
    pub(super) fn count_populated(&self, bytes: u64) {
        let c = &self.counters;
        match self.page {
            PageSize::Size4K => add(&c.populated_4k, bytes),
            PageSize::Size2M => add(&c.populated_2m, bytes),
            PageSize::Size1G => add(&c.populated_1g, bytes),
        }
    }

    /// A snapshot of the statistics.
    pub(super) fn stats(&self) -> PagingStats {
        let c = &self.counters;
        PagingStats {
            shared_memory: !self.files.is_empty(),
            continued: get(&c.continued),
            hole_punches: get(&c.hole_punches),
            stage2: self.s2.stats(),
            events_missing: get(&c.ev_missing),
            events_wp: get(&c.ev_wp),
            events_minor: get(&c.ev_minor),
            events_remove: get(&c.ev_remove),
            events_unmap: get(&c.ev_unmap),
            events_remap: get(&c.ev_remap),
            events_fork: get(&c.ev_fork),
            populated_4k: get(&c.populated_4k),
            populated_2m: get(&c.populated_2m),
            populated_1g: get(&c.populated_1g),
            installed: get(&c.installed),
            spurious: get(&c.spurious),
            relaxed: get(&c.relaxed),
            retry: get(&c.retry),
            denied: get(&c.denied),
            fault_around_pages: get(&c.fault_around),
            refills: get(&c.refills),
            eexist: get(&c.eexist),
            eagain: get(&c.eagain),
            fatal: get(&c.fatal),
            deferred: get(&c.deferred),
            deferred_dropped: get(&c.deferred_dropped),
            wp_cleared: get(&c.wp_cleared),
            wp_waited: get(&c.wp_waited),
            harvests: get(&c.harvests),
            harvested_pages: get(&c.harvested_pages),
            reclaims: get(&c.reclaims),
            reclaimed_bytes: get(&c.reclaimed_bytes),
            zapped: get(&c.zapped),
            external_invalidations: get(&c.external_invalidations),
            own_removes: get(&c.own_removes),
        }
    }
}

impl Pager {
    /// A snapshot of the statistics.
    pub fn stats(&self) -> PagingStats {
        self.shared.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j_memory(st: &PagingStats) -> String {
        st.to_json()["paging"]["memory"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn stats_table_and_json_carry_every_counter() {
        let st = PagingStats {
            shared_memory: true,
            continued: 5,
            hole_punches: 0,
            stage2: stage2::Stats::default(),
            events_missing: 11,
            events_wp: 0,
            events_minor: 0,
            events_remove: 0,
            events_unmap: 0,
            events_remap: 0,
            events_fork: 0,
            populated_4k: 0,
            populated_2m: 3 << 21,
            populated_1g: 0,
            installed: 3,
            spurious: 8,
            relaxed: 0,
            retry: 0,
            denied: 0,
            fault_around_pages: 0,
            refills: 0,
            eexist: 0,
            eagain: 0,
            fatal: 0,
            deferred: 0,
            deferred_dropped: 0,
            wp_cleared: 0,
            wp_waited: 0,
            harvests: 0,
            harvested_pages: 0,
            reclaims: 0,
            reclaimed_bytes: 0,
            zapped: 0,
            external_invalidations: 0,
            own_removes: 0,
        };
        let table = st.to_string();
        assert!(table.contains("uffd events: missing"), "{table}");
        assert!(table.contains("shared memfd memory"), "{table}");
        assert_eq!(j_memory(&st), "shared");
        assert!(table
            .lines()
            .any(|l| l.starts_with("faults spurious") && l.ends_with(" 8")));
        let j = st.to_json();
        assert_eq!(j["paging"]["populated_bytes_2m"], 3 << 21);
        assert_eq!(j["paging"]["spurious"], 8);
        assert_eq!(j["stage2"]["installs_2m"], 0);
    }
}
