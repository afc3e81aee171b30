//! TLB invalidation: the `Tlb` trait the engine calls, `NoopTlb`, and `SoftTlb`, a per-vCPU software
//! TLB model that caches stale and invalid translations until flushed.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::format::Format;
use crate::types::{Access, Perms};
use crate::Stage2;

/// What the engine asks of the host's TLBs after it changes entries.
pub trait Tlb: Send + Sync {
    /// Flush one guest-physical address: on one vCPU (`Some`, a local flush after a spurious fault)
    /// or on all (`None`).
    fn flush_addr(&self, vcpu: Option<usize>, gpa: u64);
    /// Flush a guest-physical range on every vCPU.
    fn flush_range(&self, range: Range<u64>);
    /// Flush everything on every vCPU.
    fn flush_all(&self);
}

impl<T: Tlb + ?Sized> Tlb for Arc<T> {
    fn flush_addr(&self, vcpu: Option<usize>, gpa: u64) {
        (**self).flush_addr(vcpu, gpa)
    }
    fn flush_range(&self, range: Range<u64>) {
        (**self).flush_range(range)
    }
    fn flush_all(&self) {
        (**self).flush_all()
    }
}

impl<T: Tlb + ?Sized> Tlb for &T {
    fn flush_addr(&self, vcpu: Option<usize>, gpa: u64) {
        (**self).flush_addr(vcpu, gpa)
    }
    fn flush_range(&self, range: Range<u64>) {
        (**self).flush_range(range)
    }
    fn flush_all(&self) {
        (**self).flush_all()
    }
}

/// A TLB managed elsewhere (the VMM: KVM owns the real one): flushes do nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopTlb;

impl Tlb for NoopTlb {
    fn flush_addr(&self, _vcpu: Option<usize>, _gpa: u64) {}
    fn flush_range(&self, _range: Range<u64>) {}
    fn flush_all(&self) {}
}

/// One cached 4 KiB translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cached {
    /// The walk found nothing: cached anyway, as RISC-V (and speculative walkers) allow.
    Invalid,
    /// A translation to `pa` (page base) with `perms`.
    Valid { pa: u64, perms: Perms },
}

/// Flush counts seen by a [`SoftTlb`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushCounts {
    /// `flush_addr(Some(vcpu), _)` calls.
    pub local_addr: u64,
    /// `flush_addr(None, _)` calls.
    pub global_addr: u64,
    /// `flush_range` calls.
    pub range: u64,
    /// `flush_all` calls.
    pub all: u64,
}

/// A software TLB model: per-vCPU caches of 4 KiB translations, filled by walking the engine's
/// tables, kept (stale or invalid) until a flush removes them.
#[derive(Debug)]
pub struct SoftTlb {
    vcpus: Vec<Mutex<HashMap<u64, Cached>>>,
    local_addr: AtomicU64,
    global_addr: AtomicU64,
    range: AtomicU64,
    all: AtomicU64,
}

/// What a vCPU's access through the [`SoftTlb`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbAccess {
    /// The access completed at this output address.
    Ok(u64),
    /// The vCPU takes a stage-2 fault (hand it to `handle_fault`); `from_cache` tells whether a
    /// cached entry (possibly stale or invalid) caused it rather than a fresh walk.
    Fault {
        /// Whether the cached entry, not a walk, decided.
        from_cache: bool,
    },
}

impl SoftTlb {
    /// A model for `nr_vcpus` vCPUs.
    pub fn new(nr_vcpus: usize) -> Self {
        SoftTlb {
            vcpus: (0..nr_vcpus).map(|_| Mutex::new(HashMap::new())).collect(),
            local_addr: AtomicU64::new(0),
            global_addr: AtomicU64::new(0),
            range: AtomicU64::new(0),
            all: AtomicU64::new(0),
        }
    }

    fn cache(&self, vcpu: usize) -> std::sync::MutexGuard<'_, HashMap<u64, Cached>> {
        match self.vcpus[vcpu].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// vCPU `vcpu` accesses `gpa`: hit in its cache, or walk `s2` like the hardware and cache the
    /// result (valid or not).
    pub fn access<F: Format, T: Tlb>(
        &self,
        s2: &Stage2<F, T>,
        vcpu: usize,
        gpa: u64,
        access: Access,
    ) -> TlbAccess {
        let page = gpa & !0xfff;
        let off = gpa & 0xfff;
        let mut cache = self.cache(vcpu);
        let (entry, from_cache) = match cache.get(&page) {
            Some(c) => (*c, true),
            None => {
                let c = match s2.lookup(gpa) {
                    Some(t) => Cached::Valid {
                        pa: t.pa & !0xfff,
                        perms: t.perms,
                    },
                    None => Cached::Invalid,
                };
                cache.insert(page, c);
                (c, false)
            }
        };
        match entry {
            Cached::Valid { pa, perms } if perms.contains(access.perms()) => {
                TlbAccess::Ok(pa + off)
            }
            _ => TlbAccess::Fault { from_cache },
        }
    }

    /// Whether vCPU `vcpu` holds an entry for `gpa`'s page.
    pub fn is_cached(&self, vcpu: usize, gpa: u64) -> bool {
        self.cache(vcpu).contains_key(&(gpa & !0xfff))
    }

    /// Flushes seen so far.
    pub fn flushes(&self) -> FlushCounts {
        FlushCounts {
            local_addr: self.local_addr.load(Ordering::Relaxed),
            global_addr: self.global_addr.load(Ordering::Relaxed),
            range: self.range.load(Ordering::Relaxed),
            all: self.all.load(Ordering::Relaxed),
        }
    }
}

impl Tlb for SoftTlb {
    fn flush_addr(&self, vcpu: Option<usize>, gpa: u64) {
        let page = gpa & !0xfff;
        match vcpu {
            Some(v) if v < self.vcpus.len() => {
                self.local_addr.fetch_add(1, Ordering::Relaxed);
                self.cache(v).remove(&page);
            }
            _ => {
                self.global_addr.fetch_add(1, Ordering::Relaxed);
                for v in 0..self.vcpus.len() {
                    self.cache(v).remove(&page);
                }
            }
        }
    }

    fn flush_range(&self, range: Range<u64>) {
        self.range.fetch_add(1, Ordering::Relaxed);
        for v in 0..self.vcpus.len() {
            self.cache(v)
                .retain(|&p, _| p + 0x1000 <= range.start || p >= range.end);
        }
    }

    fn flush_all(&self) {
        self.all.fetch_add(1, Ordering::Relaxed);
        for v in 0..self.vcpus.len() {
            self.cache(v).clear();
        }
    }
}
