//! Test helpers: a simple backing and engine constructors (unit tests only).

use crate::{Backing, Config, Format, PageSize, Perms, Resolved, Stage2, Tlb};

/// RAM below `limit`, output address `base + gpa`, blocks up to `max`, permissions `perms`.
pub(crate) struct Ram {
    pub(crate) base: u64,
    pub(crate) limit: u64,
    pub(crate) max: PageSize,
    pub(crate) perms: Perms,
}

impl Ram {
    pub(crate) fn new(max: PageSize, perms: Perms) -> Self {
        Ram {
            base: 1 << 40,
            limit: 1 << 34,
            max,
            perms,
        }
    }
}

impl Backing for Ram {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        (gpa < self.limit).then(|| Resolved {
            frame: self.base + (gpa & !(self.max.bytes() - 1)),
            max_size: self.max,
            perms: self.perms,
        })
    }
}

pub(crate) fn cfg() -> Config {
    Config {
        nr_vcpus: 4,
        ..Config::default()
    }
}

pub(crate) fn engine<F: Format, T: Tlb>(f: F, t: T) -> Stage2<F, T> {
    Stage2::new(f, t, cfg())
}
