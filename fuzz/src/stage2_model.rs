//! The reference model of `stage2/tests/proptest_model.rs`, copied here for the `stage2_ops`
//! target: the leaves as a plain map (base -> size, output address, permissions) and the dirty
//! pages as a set. Keep the two in step when the engine's rules change.

use std::collections::{BTreeMap, BTreeSet};

use stage2::{Backing, PageSize, Perms, Resolved};

/// Output address of the host's memory: BASE + gpa.
pub const BASE: u64 = 1 << 40;
/// Another output address, for maps that conflict with the host's.
pub const ALT: u64 = 2 << 40;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// 2 MiB.
pub const MIB2: u64 = 1 << 21;

/// Guest addresses the ops touch: 4 GiB regions x 4 blocks x 8 pages, all colliding.
pub fn grid() -> Vec<u64> {
    let mut v = Vec::new();
    for r in 0..4u64 {
        for b in 0..4u64 {
            for p in 0..8u64 {
                v.push(r * GIB + b * MIB2 + p * 4096);
            }
        }
    }
    v
}

/// The grid address with index `i` (modulo 128).
pub fn grid_addr(i: usize) -> u64 {
    let (r, b, p) = ((i / 32) % 4, (i / 8) % 4, i % 8);
    r as u64 * GIB + b as u64 * MIB2 + p as u64 * 4096
}

/// The host: output address BASE + gpa; region 0 backs 4 KiB, 1 and 3 back 2 MiB, 2 backs
/// 1 GiB; permissions per 2 MiB block: RW, R, RWX, RW.
pub struct Host;

impl Host {
    /// Largest leaf the host backs at `gpa`.
    pub fn max(gpa: u64) -> PageSize {
        match gpa / GIB {
            0 => PageSize::Size4K,
            2 => PageSize::Size1G,
            _ => PageSize::Size2M,
        }
    }

    /// What the host allows at `gpa`.
    pub fn perms(gpa: u64) -> Perms {
        [Perms::RW, Perms::R, Perms::RWX, Perms::RW][((gpa / MIB2) % 4) as usize]
    }
}

impl Backing for Host {
    fn resolve(&self, gpa: u64) -> Option<Resolved> {
        let max = Host::max(gpa);
        Some(Resolved {
            frame: BASE + (gpa & !(max.bytes() - 1)),
            max_size: max,
            perms: Host::perms(gpa),
        })
    }
}

/// One leaf of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Bytes it maps.
    pub size: u64,
    /// Output address of its first byte.
    pub pa: u64,
    /// Its permissions.
    pub perms: Perms,
}

/// The model: leaves by base address, dirty 4 KiB pages, whether dirty logging is on.
///
/// Unlike the property test's model, this one keeps the number of leaves of each size as it
/// goes (an eager split of a 1 GiB leaf makes 262144 of them, and the target compares the
/// counts after every op), so leaves change only through [`Model::insert`] and
/// [`Model::remove`].
#[derive(Default, Debug)]
pub struct Model {
    leaves: BTreeMap<u64, Leaf>,
    /// Leaves of 4 KiB, 2 MiB and 1 GiB.
    counts: [u64; 3],
    /// Dirty pages not harvested yet.
    pub dirty: BTreeSet<u64>,
    /// Dirty logging on.
    pub logging: bool,
}

/// Index of a leaf size in [`Model::counts`].
fn size_index(size: u64) -> usize {
    match size {
        4096 => 0,
        MIB2 => 1,
        GIB => 2,
        other => panic!("a leaf of {other:#x} bytes"),
    }
}

impl Model {
    /// The leaves by base address.
    pub fn leaves(&self) -> &BTreeMap<u64, Leaf> {
        &self.leaves
    }

    /// Puts `leaf` at `base`, replacing the leaf based there if any.
    pub fn insert(&mut self, base: u64, leaf: Leaf) {
        self.counts[size_index(leaf.size)] += 1;
        if let Some(old) = self.leaves.insert(base, leaf) {
            self.counts[size_index(old.size)] -= 1;
        }
    }

    /// Removes the leaf based at `base`.
    pub fn remove(&mut self, base: u64) -> Option<Leaf> {
        let old = self.leaves.remove(&base)?;
        self.counts[size_index(old.size)] -= 1;
        Some(old)
    }

    /// Takes write permission from every leaf (dirty logging starts).
    pub fn write_protect_all(&mut self) {
        for l in self.leaves.values_mut() {
            l.perms = l.perms.without(Perms::W);
        }
    }

    /// The leaf covering `gpa`.
    pub fn leaf_at(&self, gpa: u64) -> Option<(u64, Leaf)> {
        let (&b, &l) = self.leaves.range(..=gpa).next_back()?;
        (gpa < b + l.size).then_some((b, l))
    }

    /// Output address and permissions of `gpa`.
    pub fn translate(&self, gpa: u64) -> Option<(u64, Perms)> {
        self.leaf_at(gpa).map(|(b, l)| (l.pa + (gpa - b), l.perms))
    }

    /// Removes every leaf overlapping [start, end).
    pub fn zap(&mut self, start: u64, end: u64) -> Vec<(u64, Leaf)> {
        let mut gone = Vec::new();
        if let Some((b, l)) = self.leaf_at(start) {
            gone.push((b, l));
        }
        gone.extend(self.leaves.range(start..end).map(|(&b, &l)| (b, l)));
        gone.dedup();
        for (b, _) in &gone {
            self.remove(*b);
        }
        gone
    }

    /// Splits one leaf into its 512 children.
    pub fn split_once(&mut self, base: u64) {
        let Some(l) = self.remove(base) else {
            return;
        };
        let child = l.size / 512;
        for i in 0..512 {
            self.insert(
                base + i * child,
                Leaf {
                    size: child,
                    pa: l.pa + i * child,
                    perms: l.perms,
                },
            );
        }
    }

    /// Splits every leaf overlapping [start, end) down to `to`.
    pub fn split_range(&mut self, start: u64, end: u64, to: u64) {
        loop {
            let mut todo: Vec<u64> = Vec::new();
            if let Some((b, l)) = self.leaf_at(start) {
                if l.size > to {
                    todo.push(b);
                }
            }
            todo.extend(
                self.leaves
                    .range(start..end)
                    .filter(|(_, l)| l.size > to)
                    .map(|(&b, _)| b),
            );
            todo.dedup();
            if todo.is_empty() {
                break;
            }
            for b in todo {
                self.split_once(b);
            }
        }
    }

    /// A lazy split on the path to `gpa` down to 4 KiB.
    pub fn split_path(&mut self, gpa: u64) {
        self.split_range(gpa, gpa + 1, 4096);
    }

    /// Leaves of `size` bytes.
    pub fn count(&self, size: u64) -> u64 {
        self.counts[size_index(size)]
    }
}
