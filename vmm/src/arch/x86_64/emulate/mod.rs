//! The emulation fallback: instructions this host's software KVM (`kvm_pvm`) stops on with an
//! emulation failure in guest kernel mode (int3, fwait, popcnt, clac/stac, cmpxchg16b,
//! ldmxcsr, stmxcsr) are decoded and carried out by the VMM, then the guest runs on.
//!
//! [`decode`] turns bytes into an [`Insn`](decode::Insn), [`exec`] carries it out against an
//! [`EmulationContext`](exec::EmulationContext), [`kvm`] is that context for a real vCPU, and
//! [`EmulationStats`] counts each kind per VM. Only a `KVM_EXIT_INTERNAL_ERROR` with suberror 1
//! (emulation failure) reaches it, so hardware KVM never uses it.

pub mod decode;
pub mod exec;
pub mod kvm;
pub mod syscall_relay;

use std::sync::atomic::{AtomicU64, Ordering};

pub use decode::Kind;

/// How many instructions of each kind the fallback emulated, shared by every vCPU thread of a
/// VM (wrap it in an `Arc`).
#[derive(Debug, Default)]
pub struct EmulationStats {
    counts: [AtomicU64; Kind::COUNT],
    /// User `syscall`s the relay carried into the guest kernel ([`syscall_relay`]).
    relayed_syscalls: AtomicU64,
    /// Guest page faults whose handler the relay stepped over.
    stepped_faults: AtomicU64,
}

impl EmulationStats {
    /// All zero.
    pub fn new() -> EmulationStats {
        EmulationStats::default()
    }

    /// Counts one emulated `kind`; returns true if it was the VM's first of that kind (the
    /// caller logs it once).
    pub fn record(&self, kind: Kind) -> bool {
        self.counts[kind.index()].fetch_add(1, Ordering::Relaxed) == 0
    }

    /// How many of `kind` were emulated.
    pub fn count(&self, kind: Kind) -> u64 {
        self.counts[kind.index()].load(Ordering::Relaxed)
    }

    /// Counts one user syscall the relay completed; true if it was the VM's first.
    pub fn record_relayed_syscall(&self) -> bool {
        self.relayed_syscalls.fetch_add(1, Ordering::Relaxed) == 0
    }

    /// Counts one guest page fault the relay stepped over.
    pub fn record_stepped_fault(&self) {
        self.stepped_faults.fetch_add(1, Ordering::Relaxed);
    }

    /// User syscalls the relay completed.
    pub fn relayed_syscalls(&self) -> u64 {
        self.relayed_syscalls.load(Ordering::Relaxed)
    }

    /// Guest page faults the relay stepped over.
    pub fn stepped_faults(&self) -> u64 {
        self.stepped_faults.load(Ordering::Relaxed)
    }

    /// How many instructions were emulated in all.
    pub fn total(&self) -> u64 {
        Kind::ALL.iter().map(|k| self.count(*k)).sum()
    }

    /// `{"int3": n, "fwait": n, "popcnt": n, "clac": n, "stac": n, "cmpxchg16b": n,
    /// "ldmxcsr": n, "stmxcsr": n, "syscall": n, "pf_stepped": n}`, every kind present;
    /// `syscall` counts user syscalls the relay completed, `pf_stepped` the page faults it
    /// let through.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = Kind::ALL
            .iter()
            .map(|k| {
                (
                    k.name().to_string(),
                    serde_json::Value::from(self.count(*k)),
                )
            })
            .collect::<serde_json::Map<_, _>>();
        map.insert("syscall".into(), self.relayed_syscalls().into());
        map.insert("pf_stepped".into(), self.stepped_faults().into());
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stats_count_per_kind_and_report_the_first() {
        let s = Arc::new(EmulationStats::new());
        assert!(s.record(Kind::Int3));
        assert!(!s.record(Kind::Int3));
        let other = s.clone();
        std::thread::spawn(move || assert!(other.record(Kind::Popcnt)))
            .join()
            .unwrap();
        assert_eq!(s.count(Kind::Int3), 2);
        assert_eq!(s.count(Kind::Popcnt), 1);
        assert_eq!(s.count(Kind::Fwait), 0);
        assert_eq!(s.total(), 3);
        let j = s.to_json();
        assert_eq!(j["int3"], 2);
        assert_eq!(j["popcnt"], 1);
        assert_eq!(j["cmpxchg16b"], 0);
        assert_eq!(j.as_object().unwrap().len(), Kind::COUNT + 2);
        assert!(s.record_relayed_syscall());
        assert!(!s.record_relayed_syscall());
        s.record_stepped_fault();
        let j = s.to_json();
        assert_eq!(
            (j["syscall"].as_u64(), j["pf_stepped"].as_u64()),
            (Some(2), Some(1))
        );
        assert_eq!(s.total(), 3, "relay counters are not emulated instructions");
    }
}
