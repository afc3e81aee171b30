//! What the caller plugs into every vCPU thread of a VM: the dirty-ring-full hook, the
//! emulation fallback's shared state, and the guest RIP profile.

use std::sync::{Arc, Mutex};

use crate::arch::x86_64::emulate::EmulationStats;
use crate::dirty::{DirtyRingFullHook, HostChanges};

/// Optional per-VM hooks of the vCPU run loop, given to [`VmControl::start_with_hooks`].
#[derive(Clone, Default)]
pub struct VcpuHooks {
    /// Called on `KVM_EXIT_DIRTY_RING_FULL`. Needed whenever KVM's dirty rings are enabled on
    /// the VM; without it such an exit stops the VM with a message saying so.
    pub dirty_ring_full: Option<DirtyRingFullHook>,
}

impl std::fmt::Debug for VcpuHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHooks")
            .field("dirty_ring_full", &self.dirty_ring_full.is_some())
            .finish()
    }
}

/// What the emulation fallback of every vCPU thread of a VM shares, given to
/// [`VmControl::start_with_emulation`]. Separate from [`VcpuHooks`] so that callers building
/// `VcpuHooks` with a struct literal keep compiling.
#[derive(Clone, Debug, Default)]
pub struct EmulationHooks {
    /// Per-kind counts of emulated instructions ([`VmControl::emulation_stats`]).
    pub stats: Arc<EmulationStats>,
    /// The gate for host writes to guest RAM: emulated stores (`cmpxchg16b`, `stmxcsr`) go
    /// through it, so a running migration marks their pages dirty. Without it they are not
    /// recorded.
    pub host_changes: Option<Arc<HostChanges>>,
    /// Complete guest user syscalls that KVM leaves at CPL 3 (the syscall relay, for a
    /// software KVM such as `kvm_pvm`; the VM must have its LSTAR writes filtered to
    /// userspace, [`crate::hypervisor::Vm::filter_msr_writes`] with `IA32_LSTAR`).
    pub syscall_relay: bool,
    /// Where each vCPU records its RIP when a profiler kick interrupts it
    /// ([`VmControl::start_profiler`]).
    pub profile: Option<Arc<GuestProfile>>,
}

/// A sampling profile of guest RIPs: a profiler thread kicks every vCPU out of KVM_RUN at a
/// fixed interval and each vCPU thread counts the RIP it was interrupted at. With a guest
/// kernel's `System.map` the counts say where boot time goes (`--guest-profile`).
#[derive(Debug, Default)]
pub struct GuestProfile {
    samples: Mutex<std::collections::HashMap<u64, u64>>,
}

impl GuestProfile {
    pub fn new() -> GuestProfile {
        GuestProfile::default()
    }

    /// Counts one sample at `rip`.
    pub fn record(&self, rip: u64) {
        *self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(rip)
            .or_insert(0) += 1;
    }

    /// (RIP, samples), most samples first.
    pub fn top(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(r, n)| (*r, *n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Writes `samples rip` lines (hex RIP), most samples first.
    pub fn write_to(&self, mut out: impl std::io::Write) -> std::io::Result<()> {
        for (rip, n) in self.top() {
            writeln!(out, "{n} {rip:#018x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_profile_lists_the_busiest_rips_first() {
        let p = GuestProfile::new();
        for rip in [0x10, 0x20, 0x20, 0x30, 0x30, 0x30] {
            p.record(rip);
        }
        assert_eq!(p.top(), vec![(0x30, 3), (0x20, 2), (0x10, 1)]);
        let mut out = Vec::new();
        p.write_to(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap().lines().next(),
            Some("3 0x0000000000000030")
        );
    }
}
