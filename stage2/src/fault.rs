//! The racing-fault decision: install the largest allowed leaf, or report spurious, relax in place,
//! replace with break-before-make, retry, or deny (seed rules 1–4).

use crate::format::Format;
use crate::stats::C;
use crate::sync::{AtomicU64, Ordering};
use crate::table::Guard;
use crate::tlb::Tlb;
use crate::types::{level_bytes, Access, Fault, Outcome, PageSize, Perms, Resolved, GPA_LIMIT};
use crate::walk::Found;
use crate::{Backing, Stage2};

/// Times a fault re-reads an entry another thread changed under it before answering `Retry`.
const MAX_ATTEMPTS: usize = 4;

/// What the fault path knows once the backing is resolved.
struct Want {
    fault: Fault,
    need: Perms,
    /// Output address for `fault.gpa` itself.
    pa: u64,
    /// Largest size the backing and dirty logging allow.
    size: PageSize,
    /// The backing's permissions (never exceeded).
    allowed: Perms,
    logging: bool,
    seq: u64,
}

impl<F: Format, T: Tlb> Stage2<F, T> {
    /// Handle a stage-2 fault. `seq` is [`Stage2::invalidate_seq`] read *before* `backing` was
    /// consulted: if an invalidation ran since (or is running over this address) nothing is
    /// installed and the answer is `Retry`.
    pub fn handle_fault(&self, fault: Fault, backing: &impl Backing, seq: u64) -> Outcome {
        let _g = self.global_guard();
        let out = self.fault_inner(fault, backing, seq);
        self.stats.inc(match out {
            Outcome::Installed { size, .. } => {
                self.stats.installed(size);
                return out;
            }
            Outcome::Spurious => C::Spurious,
            Outcome::Relaxed { .. } => C::Relaxed,
            Outcome::Retry => C::Retry,
            Outcome::Denied => C::Denied,
        });
        out
    }

    fn fault_inner(&self, fault: Fault, backing: &impl Backing, seq: u64) -> Outcome {
        let gpa = fault.gpa;
        if gpa >= GPA_LIMIT {
            return Outcome::Denied;
        }
        let need = fault.access.perms();
        let Some(res) = backing.resolve(gpa) else {
            return Outcome::Denied;
        };
        // A permission the memory itself does not give is a genuine fault: report, never retry.
        // Every mapping is readable (EPT forbids write-only entries).
        if !res.perms.contains(need) || !res.perms.contains(Perms::R) {
            return Outcome::Denied;
        }
        // Cheap early answer when an invalidation already raced with the backing lookup.
        if self.invalidate_retry(seq, gpa, gpa + 1) {
            return Outcome::Retry;
        }
        let logging = self.dirty.enabled();
        let want = Want {
            fault,
            need,
            pa: resolved_pa(&res, gpa),
            size: fault_size(&res, gpa, logging),
            allowed: res.perms,
            logging,
            seq,
        };
        let g = self.reclaim.pin();
        for _ in 0..MAX_ATTEMPTS {
            let found = self.descend(gpa, want.size.level(), true, &g);
            if let Some(out) = self.decide(&want, found, &g) {
                return out;
            }
        }
        Outcome::Retry
    }

    /// Decide on the entry the descent stopped at. `None`: the entry changed under us, look again.
    fn decide(&self, w: &Want, f: Found<'_>, g: &Guard) -> Option<Outcome> {
        let Found { slot, old, level } = f;
        let gpa = w.fault.gpa;
        let lsize = level_bytes(level);
        let base = gpa & !(lsize - 1);
        if self.fmt.is_locked(old) {
            // Another thread is between break and make (or installing): take the fault again.
            return Some(Outcome::Retry);
        }
        if old == 0 {
            return self.install_leaf(w, slot, level, base);
        }
        debug_assert!(self.fmt.is_leaf(old, level));
        let have_pa = self.fmt.leaf_oa(old, level) + (gpa - base);
        if have_pa != w.pa {
            // The output address changed under a live mapping: break-before-make.
            return self.replace_leaf(w, slot, old, level, base);
        }
        let have = self.fmt.leaf_perms(old);
        if have.contains(w.need) {
            // Seed rule 3: the TLB held a stale or invalid entry. One local flush, done.
            self.flush_addr(Some(w.fault.vcpu), gpa & !0xfff);
            return Some(Outcome::Spurious);
        }
        if w.logging && w.fault.access == Access::Write && level < 3 {
            // Dirty logging records 4 KiB pages: split the block (lazy policy) and look again.
            if self.split_entry(slot, old, level, base, g).is_err() {
                return Some(Outcome::Retry);
            }
            return None;
        }
        self.relax(w, slot, old, level, base, have)
    }

    /// Install a new leaf in the empty entry: lock it (prepare), check the invalidation state,
    /// then make it. A sweep that steals our marker makes us answer `Retry`.
    fn install_leaf(&self, w: &Want, slot: &AtomicU64, level: usize, base: u64) -> Option<Outcome> {
        let lsize = level_bytes(level);
        let size = PageSize::at_level(level)?;
        if !self.try_lock_empty(slot) {
            return None;
        }
        if self.invalidate_retry_after_write(w.seq, base, base + lsize) {
            self.unlock_empty(slot);
            return Some(Outcome::Retry);
        }
        let perms = install_perms(w.need, w.allowed);
        let new = self.fmt.leaf(w.pa & !(lsize - 1), level, perms);
        if !self.make(slot, new) {
            return Some(Outcome::Retry);
        }
        self.stats.mapped(level, 1, true);
        if w.logging && perms.contains(Perms::W) {
            // After publishing (see dirty.rs: a harvest clears the bit, then write-protects).
            self.mark_dirty(base, lsize, w.fault.vcpu);
        }
        Some(Outcome::Installed { gpa: base, size })
    }

    /// Widen permissions in place: one CAS, no break (seed rule 1). Never reduces.
    #[allow(clippy::too_many_arguments)]
    fn relax(
        &self,
        w: &Want,
        slot: &AtomicU64,
        old: u64,
        level: usize,
        base: u64,
        have: Perms,
    ) -> Option<Outcome> {
        let lsize = level_bytes(level);
        let size = PageSize::at_level(level)?;
        if self.invalidate_retry(w.seq, base, base + lsize) {
            return Some(Outcome::Retry);
        }
        let perms = have.union(w.need).union(Perms::R);
        let mut new = self.fmt.with_perms(old, perms);
        if perms.contains(Perms::W) {
            new = self.fmt.with_dirty_wp(new, false);
        }
        if slot
            .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return None;
        }
        if self.invalidate_retry_after_write(w.seq, base, base + lsize) {
            // Only possible if the entry was zapped and refaulted between our read and our CAS
            // (ABA): drop what we published.
            self.undo(slot, new, level, base);
            return Some(Outcome::Retry);
        }
        if w.logging && w.need.contains(Perms::W) {
            self.mark_dirty(base, lsize, w.fault.vcpu);
        }
        Some(Outcome::Relaxed { gpa: base, size })
    }

    /// The leaf maps another output address: break-before-make. Same level: replace it with the new
    /// leaf. A bigger block than the backing allows now: break it to empty and retry.
    fn replace_leaf(
        &self,
        w: &Want,
        slot: &AtomicU64,
        old: u64,
        level: usize,
        base: u64,
    ) -> Option<Outcome> {
        let lsize = level_bytes(level);
        if !self.try_break(slot, old, level, base) {
            return None;
        }
        if level < w.size.level() || self.invalidate_retry_after_write(w.seq, base, base + lsize) {
            self.unlock_empty(slot);
            return Some(Outcome::Retry);
        }
        let perms = install_perms(w.need, w.allowed);
        let new = self.fmt.leaf(w.pa & !(lsize - 1), level, perms);
        if !self.make(slot, new) {
            return Some(Outcome::Retry);
        }
        self.stats.mapped(level, 1, true);
        if w.logging && perms.contains(Perms::W) {
            self.mark_dirty(base, lsize, w.fault.vcpu);
        }
        Some(Outcome::Installed {
            gpa: base,
            size: PageSize::at_level(level)?,
        })
    }

    /// Drop a leaf we published after an invalidation raced with us: zap whatever leaf maps the
    /// same output address there now (another fault may have widened ours), then flush.
    pub(crate) fn undo(&self, slot: &AtomicU64, ours: u64, level: usize, base: u64) {
        let oa = self.fmt.leaf_oa(ours, level);
        let mut cur = slot.load(Ordering::SeqCst);
        while self.fmt.is_leaf(cur, level) && self.fmt.leaf_oa(cur, level) == oa {
            match slot.compare_exchange(cur, 0, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    self.stats.mapped(level, 1, false);
                    self.stats.inc(C::Undo);
                    self.flush_range(base, base + level_bytes(level));
                    break;
                }
                Err(now) => cur = now,
            }
        }
    }
}

/// Output address of `gpa` in the backing.
#[inline]
fn resolved_pa(res: &Resolved, gpa: u64) -> u64 {
    res.frame + (gpa & (res.max_size.bytes() - 1))
}

/// Largest leaf the backing allows at `gpa`: no bigger than `max_size`, output address aligned like
/// the guest address, 4 KiB while dirty logging is on.
#[inline]
fn fault_size(res: &Resolved, gpa: u64, logging: bool) -> PageSize {
    if logging {
        return PageSize::Size4K;
    }
    let pa = resolved_pa(res, gpa);
    let mut size = res.max_size;
    while let Some(smaller) = size.smaller() {
        let mask = size.bytes() - 1;
        if pa & mask == gpa & mask {
            break;
        }
        size = smaller;
    }
    size
}

/// Permissions a fault installs: what it needs plus read (every mapping is readable: EPT forbids
/// write-only entries), within what the backing allows. Never more than asked: a later write is
/// still a fault (which dirty logging and the seed-001 rule rely on).
#[inline]
fn install_perms(need: Perms, allowed: Perms) -> Perms {
    need.union(Perms::R).intersect(allowed)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::testutil::{engine, returns_within, Ram};
    use crate::{Arm64, Ept, NoopTlb, SoftTlb, TlbAccess, TranslateError};

    fn fault(gpa: u64, access: Access) -> Fault {
        Fault {
            gpa,
            access,
            vcpu: 0,
        }
    }

    fn seed001_read_then_write<F: Format>(f: F) {
        let s2 = engine(f, NoopTlb);
        let ram = Ram::new(PageSize::Size2M, Perms::RW);
        let gpa = 0x4030_1000;
        let r = s2.handle_fault(fault(gpa, Access::Read), &ram, s2.invalidate_seq());
        assert_eq!(
            r,
            Outcome::Installed {
                gpa: 0x4020_0000,
                size: PageSize::Size2M
            }
        );
        assert_eq!(s2.translate(gpa, Access::Read).unwrap().perms, Perms::R);
        let w = s2.handle_fault(fault(gpa, Access::Write), &ram, s2.invalidate_seq());
        assert_eq!(
            w,
            Outcome::Relaxed {
                gpa: 0x4020_0000,
                size: PageSize::Size2M
            }
        );
        let t = s2.translate(gpa, Access::Write).unwrap();
        assert_eq!(t.perms, Perms::RW);
        assert_eq!(t.pa, (1 << 40) + gpa);
        assert_eq!(
            s2.stats().bbms,
            0,
            "a permission relax never breaks the entry"
        );
    }

    #[test]
    fn seed001_read_then_write_relaxes_in_place_ept() {
        seed001_read_then_write(Ept);
    }

    #[test]
    fn seed001_read_then_write_relaxes_in_place_arm64() {
        seed001_read_then_write(Arm64 { bbm_level2: false });
    }

    #[test]
    fn seed001_write_then_read_is_spurious_and_keeps_rw() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size4K, Perms::RW);
        let w = s2.handle_fault(fault(0x5000, Access::Write), &ram, s2.invalidate_seq());
        assert!(matches!(w, Outcome::Installed { gpa: 0x5000, .. }));
        let r = s2.handle_fault(fault(0x5000, Access::Read), &ram, s2.invalidate_seq());
        assert_eq!(r, Outcome::Spurious);
        assert_eq!(s2.translate(0x5000, Access::Read).unwrap().perms, Perms::RW);
        assert_eq!(s2.stats().bbms, 0);
    }

    #[test]
    fn write_to_read_only_backing_is_denied_once() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size4K, Perms::R);
        let w = s2.handle_fault(fault(0x5000, Access::Write), &ram, s2.invalidate_seq());
        assert_eq!(w, Outcome::Denied);
        let st = s2.stats();
        assert_eq!((st.denied, st.retries), (1, 0));
        assert!(matches!(
            s2.translate(0x5000, Access::Read),
            Err(TranslateError::NotMapped { .. })
        ));
        // Exec on memory without X, and MMIO (no backing), are denied too.
        assert_eq!(
            s2.handle_fault(fault(0x5000, Access::Exec), &ram, s2.invalidate_seq()),
            Outcome::Denied
        );
        assert_eq!(
            s2.handle_fault(fault(1 << 35, Access::Read), &ram, s2.invalidate_seq()),
            Outcome::Denied
        );
    }

    #[test]
    fn read_then_write_on_read_only_memory_is_denied_not_relaxed() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size4K, Perms::R);
        s2.handle_fault(fault(0x5000, Access::Read), &ram, s2.invalidate_seq());
        assert_eq!(
            s2.handle_fault(fault(0x5000, Access::Write), &ram, s2.invalidate_seq()),
            Outcome::Denied
        );
        assert_eq!(s2.translate(0x5000, Access::Read).unwrap().perms, Perms::R);
    }

    #[test]
    fn bbm_marker_means_retry() {
        let s2 = Arc::new(engine(Ept, NoopTlb));
        let ram = Ram::new(PageSize::Size4K, Perms::RW);
        s2.handle_fault(fault(0x5000, Access::Read), &ram, s2.invalidate_seq());
        let g = s2.reclaim.pin();
        let f = s2.descend(0x5000, 3, false, &g);
        assert!(s2.try_break(f.slot, f.old, f.level, 0x5000));
        for access in [Access::Read, Access::Write] {
            // On another thread, with a deadline: a fault that waited for our make would never
            // return, and this test would hang instead of failing.
            let out = returns_within(Duration::from_secs(10), {
                let s2 = s2.clone();
                move || {
                    let ram = Ram::new(PageSize::Size4K, Perms::RW);
                    s2.handle_fault(fault(0x5000, access), &ram, s2.invalidate_seq())
                }
            });
            let Some(out) = out else {
                // Let the waiting fault finish before failing.
                assert!(s2.make(f.slot, f.old));
                panic!("a {access:?} fault on a break-before-make marker did not return in 10 s: it waits for the owner's make instead of answering Retry");
            };
            assert_eq!(out, Outcome::Retry, "{access:?} fault on the marker");
        }
        assert!(
            s2.translate(0x5000, Access::Read).is_err(),
            "the marker is not present"
        );
        assert!(s2.make(f.slot, f.old));
        assert_eq!(
            s2.handle_fault(fault(0x5000, Access::Read), &ram, s2.invalidate_seq()),
            Outcome::Spurious
        );
    }

    #[test]
    fn seq_moved_means_retry_and_nothing_installed() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size2M, Perms::RW);
        let seq = s2.invalidate_seq();
        // Some invalidation (anywhere) runs between the seq read and the fault.
        drop(s2.invalidate(0x1_0000_0000..0x1_0020_0000));
        assert_eq!(
            s2.handle_fault(fault(0x20_0000, Access::Read), &ram, seq),
            Outcome::Retry
        );
        assert!(s2.translate(0x20_0000, Access::Read).is_err());
        assert_eq!(s2.stats().mapped_bytes(), 0);
        assert!(matches!(
            s2.handle_fault(fault(0x20_0000, Access::Read), &ram, s2.invalidate_seq()),
            Outcome::Installed { .. }
        ));
    }

    #[test]
    fn in_progress_invalidation_covering_gpa_means_retry() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size4K, Perms::RW);
        let inv = s2.invalidate(0x10_0000..0x20_0000);
        let seq = s2.invalidate_seq();
        assert_eq!(
            s2.handle_fault(fault(0x10_8000, Access::Read), &ram, seq),
            Outcome::Retry
        );
        assert!(s2.translate(0x10_8000, Access::Read).is_err());
        // Outside the range: installs.
        assert!(matches!(
            s2.handle_fault(fault(0x30_0000, Access::Read), &ram, seq),
            Outcome::Installed { .. }
        ));
        drop(inv);
        assert_eq!(
            s2.handle_fault(fault(0x10_8000, Access::Read), &ram, seq),
            Outcome::Retry,
            "the sequence moved at end"
        );
        assert!(matches!(
            s2.handle_fault(fault(0x10_8000, Access::Read), &ram, s2.invalidate_seq()),
            Outcome::Installed { .. }
        ));
    }

    #[test]
    fn largest_block_the_backing_allows() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size1G, Perms::RWX);
        assert_eq!(
            s2.handle_fault(fault(0x4123_4567, Access::Exec), &ram, s2.invalidate_seq()),
            Outcome::Installed {
                gpa: 0x4000_0000,
                size: PageSize::Size1G
            }
        );
        assert_eq!(
            s2.translate(0x4123_4567, Access::Exec).unwrap().perms,
            Perms::RX
        );
        // A 1 GiB backing whose output address is only 2 MiB aligned gets 2 MiB blocks.
        let odd = Ram {
            base: (1 << 40) + 0x20_0000,
            ..Ram::new(PageSize::Size1G, Perms::RW)
        };
        assert_eq!(
            s2.handle_fault(fault(0x8000_1000, Access::Read), &odd, s2.invalidate_seq()),
            Outcome::Installed {
                gpa: 0x8000_0000,
                size: PageSize::Size2M
            }
        );
        let st = s2.stats();
        assert_eq!(
            (st.installs_1g, st.installs_2m, st.mapped_1g, st.mapped_2m),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn smaller_mappings_already_there_are_extended_not_replaced() {
        let s2 = engine(Ept, NoopTlb);
        let small = Ram::new(PageSize::Size4K, Perms::RW);
        let big = Ram::new(PageSize::Size2M, Perms::RW);
        s2.handle_fault(fault(0x1000, Access::Read), &small, s2.invalidate_seq());
        // The 2 MiB slot holds a table now: the next fault maps a 4 KiB page inside it.
        assert_eq!(
            s2.handle_fault(fault(0x3000, Access::Read), &big, s2.invalidate_seq()),
            Outcome::Installed {
                gpa: 0x3000,
                size: PageSize::Size4K
            }
        );
        assert_eq!(s2.stats().bbms, 0);
    }

    #[test]
    fn output_address_change_uses_break_before_make() {
        let tlb = Arc::new(SoftTlb::new(1));
        let s2 = engine(Ept, tlb.clone());
        let a = Ram::new(PageSize::Size4K, Perms::RW);
        let b = Ram {
            base: 2 << 40,
            ..Ram::new(PageSize::Size4K, Perms::RW)
        };
        s2.handle_fault(fault(0x7000, Access::Read), &a, s2.invalidate_seq());
        assert_eq!(
            s2.handle_fault(fault(0x7000, Access::Read), &b, s2.invalidate_seq()),
            Outcome::Installed {
                gpa: 0x7000,
                size: PageSize::Size4K
            }
        );
        assert_eq!(
            s2.translate(0x7000, Access::Read).unwrap().pa,
            (2 << 40) + 0x7000
        );
        let st = s2.stats();
        assert_eq!((st.bbms, st.mapped_4k), (1, 1));
        assert_eq!(tlb.flushes().range, 1, "break flushed the old translation");
    }

    #[test]
    fn spurious_fault_from_cached_invalid_entry_flushes_once_locally() {
        let tlb = Arc::new(SoftTlb::new(2));
        let s2 = engine(Ept, tlb.clone());
        let ram = Ram::new(PageSize::Size4K, Perms::RW);
        let gpa = 0x9000;
        // vCPU 0 walks before the mapping exists and caches the invalid entry.
        assert_eq!(
            tlb.access(&s2, 0, gpa, Access::Read),
            TlbAccess::Fault { from_cache: false }
        );
        // vCPU 1 faults and installs (no flush on install).
        let f1 = Fault {
            gpa,
            access: Access::Read,
            vcpu: 1,
        };
        assert!(matches!(
            s2.handle_fault(f1, &ram, s2.invalidate_seq()),
            Outcome::Installed { .. }
        ));
        assert_eq!(tlb.flushes(), crate::FlushCounts::default());
        // vCPU 0 still hits its cached invalid entry: a spurious fault.
        assert_eq!(
            tlb.access(&s2, 0, gpa, Access::Read),
            TlbAccess::Fault { from_cache: true }
        );
        assert_eq!(
            s2.handle_fault(fault(gpa, Access::Read), &ram, s2.invalidate_seq()),
            Outcome::Spurious
        );
        let fl = tlb.flushes();
        assert_eq!(
            (fl.local_addr, fl.global_addr, fl.range, fl.all),
            (1, 0, 0, 0)
        );
        assert_eq!(
            tlb.access(&s2, 0, gpa, Access::Read),
            TlbAccess::Ok((1 << 40) + gpa)
        );
        assert_eq!(s2.stats().spurious, 1);
    }

    #[test]
    fn intermediate_tables_are_counted() {
        let s2 = engine(Ept, NoopTlb);
        let ram = Ram::new(PageSize::Size4K, Perms::RW);
        assert_eq!(s2.live_table_pages(), 1);
        s2.handle_fault(fault(0x1000, Access::Read), &ram, s2.invalidate_seq());
        assert_eq!(s2.live_table_pages(), 4);
        assert_eq!(s2.count_reachable_tables(), 4);
        assert_eq!(s2.stats().table_bytes(), 4 * 4096);
    }
}
