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

use std::sync::atomic::{AtomicU64, Ordering};

pub use decode::Kind;

/// How many instructions of each kind the fallback emulated, shared by every vCPU thread of a
/// VM (wrap it in an `Arc`).
#[derive(Debug, Default)]
pub struct EmulationStats {
    counts: [AtomicU64; Kind::COUNT],
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

    /// How many instructions were emulated in all.
    pub fn total(&self) -> u64 {
        Kind::ALL.iter().map(|k| self.count(*k)).sum()
    }

    /// `{"int3": n, "fwait": n, "popcnt": n, "clac": n, "stac": n, "cmpxchg16b": n,
    /// "ldmxcsr": n, "stmxcsr": n}`, every kind present.
    pub fn to_json(&self) -> serde_json::Value {
        let map = Kind::ALL
            .iter()
            .map(|k| {
                (
                    k.name().to_string(),
                    serde_json::Value::from(self.count(*k)),
                )
            })
            .collect::<serde_json::Map<_, _>>();
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
        assert_eq!(j.as_object().unwrap().len(), Kind::COUNT);
    }
}
