//! Property test: random sequences of map / fault (install, relax, spurious, BBM) / dirty enable
//! (write-protect) / invalidate / split / collapse / harvest, checked after every step against a plain
//! reference model of the leaves (base -> size, output address, permissions): the translation of
//! every touched address, the mapped-leaf counters, the table-page counter and the dirty pages.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use stage2::{
    Access, Arm64, Backing, Config, Ept, Fault, Format, NoopTlb, Outcome, PageSize, Perms,
    Resolved, SplitPolicy, Stage2,
};

const BASE: u64 = 1 << 40;
const ALT: u64 = 2 << 40;
const GIB: u64 = 1 << 30;
const MIB2: u64 = 1 << 21;

/// Guest addresses the test touches: 4 GiB regions x 4 blocks x 8 pages, all colliding.
fn grid() -> Vec<u64> {
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

fn grid_addr(i: usize) -> u64 {
    grid()[i % 128]
}

/// The host: output address BASE + gpa; region 0 backs 4 KiB, 1 and 3 back 2 MiB, 2 backs 1 GiB;
/// permissions per 2 MiB block: RW, R, RWX, RW.
struct Host;

impl Host {
    fn max(gpa: u64) -> PageSize {
        match gpa / GIB {
            0 => PageSize::Size4K,
            2 => PageSize::Size1G,
            _ => PageSize::Size2M,
        }
    }
    fn perms(gpa: u64) -> Perms {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leaf {
    size: u64,
    pa: u64,
    perms: Perms,
}

#[derive(Default)]
struct Model {
    leaves: BTreeMap<u64, Leaf>,
    dirty: BTreeSet<u64>,
    logging: bool,
}

impl Model {
    fn leaf_at(&self, gpa: u64) -> Option<(u64, Leaf)> {
        let (&b, &l) = self.leaves.range(..=gpa).next_back()?;
        (gpa < b + l.size).then_some((b, l))
    }

    fn translate(&self, gpa: u64) -> Option<(u64, Perms)> {
        self.leaf_at(gpa).map(|(b, l)| (l.pa + (gpa - b), l.perms))
    }

    /// Remove every leaf overlapping [start, end).
    fn zap(&mut self, start: u64, end: u64) -> Vec<(u64, Leaf)> {
        let mut gone = Vec::new();
        if let Some((b, l)) = self.leaf_at(start) {
            gone.push((b, l));
        }
        gone.extend(self.leaves.range(start..end).map(|(&b, &l)| (b, l)));
        for (b, _) in &gone {
            self.leaves.remove(b);
        }
        gone.dedup();
        gone
    }

    /// Split one leaf into its 512 children.
    fn split_once(&mut self, base: u64) {
        let Some(l) = self.leaves.remove(&base) else {
            return;
        };
        let child = l.size / 512;
        for i in 0..512 {
            self.leaves.insert(
                base + i * child,
                Leaf {
                    size: child,
                    pa: l.pa + i * child,
                    perms: l.perms,
                },
            );
        }
    }

    /// Split every leaf overlapping [start, end) down to `to` (children outside stay as they are).
    fn split_range(&mut self, start: u64, end: u64, to: u64) {
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
    fn split_path(&mut self, gpa: u64) {
        self.split_range(gpa, gpa + 1, 4096);
    }

    fn count(&self, size: u64) -> u64 {
        self.leaves.values().filter(|l| l.size == size).count() as u64
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        at: usize,
        size: u8,
        alt: bool,
        perms: u8,
        /// `map_range_absent` instead of `map_range`.
        absent: bool,
    },
    Fault {
        at: usize,
        access: u8,
    },
    Invalidate {
        at: usize,
        len_pages: u32,
    },
    Split {
        at: usize,
        to: u8,
    },
    Collapse {
        region: u8,
    },
    Enable {
        eager: bool,
    },
    Disable,
    Harvest {
        region: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..128usize, 0..3u8, any::<bool>(), 0..4u8, any::<bool>())
            .prop_map(|(at, size, alt, perms, absent)| Op::Map { at, size, alt, perms, absent }),
        8 => (0..128usize, 0..3u8).prop_map(|(at, access)| Op::Fault { at, access }),
        2 => (0..128usize, 1..1024u32).prop_map(|(at, len_pages)| Op::Invalidate { at, len_pages }),
        1 => (0..128usize, 0..2u8).prop_map(|(at, to)| Op::Split { at, to }),
        1 => (0..4u8).prop_map(|region| Op::Collapse { region }),
        1 => any::<bool>().prop_map(|eager| Op::Enable { eager }),
        1 => Just(Op::Disable),
        2 => (0..4u8).prop_map(|region| Op::Harvest { region }),
    ]
}

fn size_of(i: u8) -> PageSize {
    [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G][i as usize % 3]
}

fn run<F: Format>(fmt: F, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let s2 = Stage2::new(
        fmt,
        NoopTlb,
        Config {
            nr_vcpus: 1,
            dirty_limit: 4 * GIB,
            ..Config::default()
        },
    );
    let mut m = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Map {
                at,
                size,
                alt,
                perms,
                absent,
            } => {
                if m.logging {
                    continue;
                }
                let size = size_of(size);
                let gpa = grid_addr(at) & !(size.bytes() - 1);
                let frame = if alt { ALT } else { BASE } + gpa;
                let perms = [Perms::R, Perms::RW, Perms::RX, Perms::RWX][perms as usize];
                // One entry: either fully written or refused (nothing written). With
                // `absent`, a leaf of this size already here stays as it is and an empty
                // entry gets the new leaf; anything else in the way is a conflict either way.
                let here = m.leaves.get(&gpa).is_some_and(|l| l.size == size.bytes());
                let result = if absent {
                    s2.map_range_absent(gpa, size.bytes(), frame, perms, size)
                } else {
                    s2.map_range(gpa, size.bytes(), frame, perms, size)
                };
                match result {
                    Ok(n) => {
                        if absent && here {
                            prop_assert_eq!(n, 0, "step {}: a present leaf was written", step);
                            continue;
                        }
                        if absent {
                            prop_assert_eq!(n, 1, "step {}", step);
                        }
                        let old = m.zap(gpa, gpa + size.bytes());
                        if absent {
                            prop_assert!(old.is_empty(), "step {}: replaced {:?}", step, old);
                        }
                        for (b, l) in &old {
                            prop_assert_eq!(
                                (*b, l.size),
                                (gpa, size.bytes()),
                                "map replaced a different leaf"
                            );
                        }
                        m.leaves.insert(
                            gpa,
                            Leaf {
                                size: size.bytes(),
                                pa: frame,
                                perms,
                            },
                        );
                    }
                    Err(e) => {
                        prop_assert!(
                            matches!(e, stage2::Error::Conflict { .. }),
                            "step {}: {}",
                            step,
                            e
                        );
                    }
                }
            }
            Op::Fault { at, access } => {
                let gpa = grid_addr(at) + 0x123;
                let access = [Access::Read, Access::Write, Access::Exec][access as usize];
                let need = access.perms();
                let allowed = Host::perms(gpa);
                let want_pa = BASE + gpa;
                let before = m.leaf_at(gpa);
                let out = s2.handle_fault(
                    Fault {
                        gpa,
                        access,
                        vcpu: 0,
                    },
                    &Host,
                    s2.invalidate_seq(),
                );
                if !allowed.contains(need) {
                    prop_assert_eq!(out, Outcome::Denied);
                    continue;
                }
                match out {
                    Outcome::Installed { gpa: base, size } => {
                        prop_assert!(size <= Host::max(gpa));
                        if m.logging {
                            prop_assert_eq!(size, PageSize::Size4K);
                        }
                        let old = m.zap(base, base + size.bytes());
                        for (b, l) in &old {
                            // Only a break-before-make replacement of another output address.
                            prop_assert_eq!((*b, l.size), (base, size.bytes()));
                            prop_assert_ne!(l.pa + (gpa - b), want_pa);
                        }
                        let perms = need.union(Perms::R);
                        m.leaves.insert(
                            base,
                            Leaf {
                                size: size.bytes(),
                                pa: want_pa - (gpa - base),
                                perms,
                            },
                        );
                        if m.logging && perms.contains(Perms::W) {
                            m.dirty.insert(base);
                        }
                    }
                    Outcome::Spurious => {
                        let (b, l) = before.expect("spurious on an unmapped address");
                        prop_assert_eq!(l.pa + (gpa - b), want_pa);
                        prop_assert!(l.perms.contains(need));
                    }
                    Outcome::Relaxed { gpa: base, size } => {
                        let (_, l) = before.expect("relaxed an unmapped address");
                        prop_assert!(!l.perms.contains(need));
                        if m.logging && access == Access::Write {
                            m.split_path(gpa);
                            m.dirty.insert(gpa & !0xfff);
                        }
                        let (b, l) = m.leaf_at(gpa).unwrap();
                        prop_assert_eq!((b, l.size), (base, size.bytes()));
                        m.leaves.insert(
                            b,
                            Leaf {
                                perms: l.perms.union(need).union(Perms::R),
                                ..l
                            },
                        );
                    }
                    Outcome::Retry => {
                        // Only when a bigger leaf with another output address had to be broken.
                        let (b, l) = before.expect("retry on an unmapped address");
                        prop_assert_ne!(l.pa + (gpa - b), want_pa);
                        m.leaves.remove(&b);
                    }
                    Outcome::Denied => prop_assert!(false, "denied an allowed access"),
                }
            }
            Op::Invalidate { at, len_pages } => {
                let start = grid_addr(at);
                let end = start + len_pages as u64 * 4096;
                let n = s2.invalidate_range_start(start..end);
                s2.invalidate_range_end(start..end);
                let gone = m.zap(start, end);
                prop_assert_eq!(n, gone.len());
            }
            Op::Split { at, to } => {
                let to = size_of(to);
                let gpa = grid_addr(at);
                s2.split(gpa..gpa + 4096, to);
                m.split_range(gpa, gpa + 4096, to.bytes());
            }
            Op::Collapse { region } => {
                let start = region as u64 * GIB;
                s2.collapse(start..start + GIB);
                // Translation is checked below; take the new leaf structure from the engine.
                let bases: Vec<u64> = m
                    .leaves
                    .range(start..start + GIB)
                    .map(|(&b, _)| b)
                    .collect();
                for b in bases {
                    let Some(l) = m.leaves.get(&b).copied() else {
                        continue;
                    };
                    let t = s2.lookup(b).expect("collapse unmapped a page");
                    if t.size.bytes() > l.size {
                        // The merged leaves covered the block exactly, contiguously, equally.
                        let pa0 = t.pa - (b - t.base);
                        let merged = m.zap(t.base, t.base + t.size.bytes());
                        prop_assert_eq!(
                            merged.iter().map(|(_, l)| l.size).sum::<u64>(),
                            t.size.bytes()
                        );
                        for (mb, ml) in &merged {
                            prop_assert_eq!(ml.pa, pa0 + (mb - t.base));
                            prop_assert_eq!(ml.perms, t.perms);
                        }
                        m.leaves.insert(
                            t.base,
                            Leaf {
                                size: t.size.bytes(),
                                pa: pa0,
                                perms: l.perms,
                            },
                        );
                    }
                }
            }
            Op::Enable { eager } => {
                s2.dirty().enable(if eager {
                    SplitPolicy::Eager
                } else {
                    SplitPolicy::Lazy
                });
                m.logging = true;
                if eager {
                    m.split_range(0, 4 * GIB, 4096);
                }
                for l in m.leaves.values_mut() {
                    l.perms = l.perms.without(Perms::W);
                }
            }
            Op::Disable => {
                s2.dirty().disable();
                m.logging = false;
            }
            Op::Harvest { region } => {
                let start = region as u64 * GIB;
                let got: Vec<u64> = s2.dirty().harvest(start..start + GIB).iter().collect();
                let want: Vec<u64> = m.dirty.range(start..start + GIB).copied().collect();
                prop_assert_eq!(&got, &want, "step {}: harvested pages", step);
                for gpa in want {
                    m.dirty.remove(&gpa);
                    if let Some((b, l)) = m.leaf_at(gpa) {
                        m.leaves.insert(
                            b,
                            Leaf {
                                perms: l.perms.without(Perms::W),
                                ..l
                            },
                        );
                    }
                }
            }
        }
        for &g in &grid() {
            for off in [0, 0xfff] {
                let gpa = g + off;
                let have = s2.lookup(gpa).map(|t| (t.pa, t.perms));
                prop_assert_eq!(
                    have,
                    m.translate(gpa),
                    "step {}: translation of {:#x}",
                    step,
                    gpa
                );
            }
        }
        let st = s2.stats();
        prop_assert_eq!(
            (st.mapped_4k, st.mapped_2m, st.mapped_1g),
            (m.count(4096), m.count(MIB2), m.count(GIB)),
            "step {}: mapped-leaf counters",
            step
        );
        prop_assert_eq!(st.tables_live, s2.count_reachable_tables());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn ept_agrees_with_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(Ept, ops)?;
    }

    #[test]
    fn arm64_agrees_with_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(Arm64 { bbm_level2: false }, ops)?;
    }
}
