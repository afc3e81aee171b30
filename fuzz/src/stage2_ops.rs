//! `stage2_ops`: bytes decoded into a sequence of stage2 operations (map, fault, invalidate,
//! split, collapse, dirty-log enable/disable, harvest), applied one by one to the engine and to
//! the reference model of [`crate::stage2_model`]; after every step the translation of every
//! touched address, the leaf counters, the table-page count and the harvested dirty pages must
//! agree. The same rules as `stage2/tests/proptest_model.rs`, driven by coverage instead.
//!
//! The first byte picks the format (EPT, ARM64, ARM64 with FEAT_BBM level 2); then each op
//! is an opcode byte and its operands.

use stage2::{
    Access, Arm64, Config, Ept, Fault, Format, NoopTlb, Outcome, PageSize, Perms, SplitPolicy,
    Stage2,
};

use crate::input::Bytes;
use crate::stage2_model::{grid, grid_addr, Host, Leaf, Model, ALT, BASE, GIB, MIB2};

/// Most ops one input runs.
pub const MAX_OPS: usize = 48;
/// Most 4 KiB leaves an eager dirty-logging split may leave (see `Op::Enable` in [`check`]).
pub const EAGER_LEAVES: u64 = 8192;

/// One operation on the engine.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// `map_range` (or `map_range_absent`) of one leaf.
    Map {
        /// Grid index.
        at: usize,
        /// 4K, 2M, 1G.
        size: u8,
        /// Output address ALT + gpa instead of the host's.
        alt: bool,
        /// R, RW, RX, RWX.
        perms: u8,
        /// `map_range_absent`.
        absent: bool,
    },
    /// A vCPU fault.
    Fault {
        /// Grid index.
        at: usize,
        /// Read, write, exec.
        access: u8,
    },
    /// An invalidation of `len_pages` pages.
    Invalidate {
        /// Grid index of the start.
        at: usize,
        /// Pages, 1 or more.
        len_pages: u32,
    },
    /// Split the page at a grid address down to 4K or 2M.
    Split {
        /// Grid index.
        at: usize,
        /// 4K or 2M.
        to: u8,
    },
    /// Collapse one 1 GiB region.
    Collapse {
        /// Region 0..4.
        region: u8,
    },
    /// Dirty logging on.
    Enable {
        /// Eager split.
        eager: bool,
    },
    /// Dirty logging off.
    Disable,
    /// Harvest one 1 GiB region.
    Harvest {
        /// Region 0..4.
        region: u8,
    },
}

/// Decodes the next op (weights as in the property test: faults most often).
pub fn decode(b: &mut Bytes<'_>) -> Op {
    let at = |b: &mut Bytes<'_>| usize::from(b.u8() % 128);
    match b.u8() % 19 {
        0..=2 => {
            let at = at(b);
            let x = b.u8();
            Op::Map {
                at,
                size: x % 3,
                alt: x & 0x04 != 0,
                perms: (x >> 3) % 4,
                absent: x & 0x20 != 0,
            }
        }
        3..=10 => Op::Fault {
            at: at(b),
            access: b.u8() % 3,
        },
        11..=12 => Op::Invalidate {
            at: at(b),
            len_pages: u32::from(b.u16() % 1023) + 1,
        },
        13 => Op::Split {
            at: at(b),
            to: b.u8() % 2,
        },
        14 => Op::Collapse { region: b.u8() % 4 },
        15 => Op::Enable {
            eager: b.u8() & 1 != 0,
        },
        16 => Op::Disable,
        _ => Op::Harvest { region: b.u8() % 4 },
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(crate::capped(data));
    let format = b.u8() % 3;
    let mut ops = Vec::new();
    while !b.is_empty() && ops.len() < MAX_OPS {
        ops.push(decode(&mut b));
    }
    match format {
        0 => check(Ept, &ops),
        1 => check(Arm64 { bbm_level2: false }, &ops),
        _ => check(Arm64 { bbm_level2: true }, &ops),
    }
}

fn size_of(i: u8) -> PageSize {
    [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G][i as usize % 3]
}

/// Applies `ops` to a new engine of format `fmt` and to the model; panics where they disagree.
pub fn check<F: Format>(fmt: F, ops: &[Op]) {
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
    for (step, &op) in ops.iter().enumerate() {
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
                let here = m.leaves().get(&gpa).is_some_and(|l| l.size == size.bytes());
                let result = if absent {
                    s2.map_range_absent(gpa, size.bytes(), frame, perms, size)
                } else {
                    s2.map_range(gpa, size.bytes(), frame, perms, size)
                };
                match result {
                    Ok(n) => {
                        if absent && here {
                            assert_eq!(n, 0, "step {step}: a present leaf was written");
                            continue;
                        }
                        if absent {
                            assert_eq!(n, 1, "step {step}");
                        }
                        let old = m.zap(gpa, gpa + size.bytes());
                        if absent {
                            assert!(old.is_empty(), "step {step}: replaced {old:?}");
                        }
                        for (b, l) in &old {
                            assert_eq!(
                                (*b, l.size),
                                (gpa, size.bytes()),
                                "step {step}: map replaced a different leaf"
                            );
                        }
                        m.insert(
                            gpa,
                            Leaf {
                                size: size.bytes(),
                                pa: frame,
                                perms,
                            },
                        );
                    }
                    Err(e) => assert!(
                        matches!(e, stage2::Error::Conflict { .. }),
                        "step {step}: {e}"
                    ),
                }
            }
            Op::Fault { at, access } => fault(&s2, &mut m, step, at, access),
            Op::Invalidate { at, len_pages } => {
                let start = grid_addr(at);
                let end = start + u64::from(len_pages) * 4096;
                let n = s2.invalidate_range_start(start..end);
                s2.invalidate_range_end(start..end);
                let gone = m.zap(start, end);
                assert_eq!(n, gone.len(), "step {step}: leaves invalidated");
            }
            Op::Split { at, to } => {
                let to = size_of(to);
                let gpa = grid_addr(at);
                s2.split(gpa..gpa + 4096, to);
                m.split_range(gpa, gpa + 4096, to.bytes());
            }
            Op::Collapse { region } => collapse(&s2, &mut m, region),
            Op::Enable { eager } => {
                // An eager split of a 1 GiB leaf (or of the 511 2 MiB leaves left by a lazy
                // split of one) makes 262144 leaves in the engine and the model: most of a
                // second per run under AFL's instrumentation. Above EAGER_LEAVES leaves after
                // the split, lazy splitting instead; the property test covers the big eager
                // splits.
                let after = m.count(4096) + 512 * m.count(MIB2) + 512 * 512 * m.count(GIB);
                let eager = eager && after <= EAGER_LEAVES;
                s2.dirty().enable(if eager {
                    SplitPolicy::Eager
                } else {
                    SplitPolicy::Lazy
                });
                m.logging = true;
                if eager {
                    m.split_range(0, 4 * GIB, 4096);
                }
                m.write_protect_all();
            }
            Op::Disable => {
                s2.dirty().disable();
                m.logging = false;
            }
            Op::Harvest { region } => {
                let start = u64::from(region) * GIB;
                let got: Vec<u64> = s2.dirty().harvest(start..start + GIB).iter().collect();
                let want: Vec<u64> = m.dirty.range(start..start + GIB).copied().collect();
                assert_eq!(got, want, "step {step}: harvested pages");
                for gpa in want {
                    m.dirty.remove(&gpa);
                    if let Some((b, l)) = m.leaf_at(gpa) {
                        m.insert(
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
                assert_eq!(
                    have,
                    m.translate(gpa),
                    "step {step} ({op:?}): translation of {gpa:#x}"
                );
            }
        }
        let st = s2.stats();
        assert_eq!(
            (st.mapped_4k, st.mapped_2m, st.mapped_1g),
            (m.count(4096), m.count(MIB2), m.count(GIB)),
            "step {step} ({op:?}): mapped-leaf counters"
        );
        assert_eq!(
            st.tables_live,
            s2.count_reachable_tables(),
            "step {step} ({op:?}): live table pages"
        );
    }
}

fn fault<F: Format>(s2: &Stage2<F, NoopTlb>, m: &mut Model, step: usize, at: usize, access: u8) {
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
        assert_eq!(out, Outcome::Denied, "step {step}");
        return;
    }
    match out {
        Outcome::Installed { gpa: base, size } => {
            assert!(size <= Host::max(gpa), "step {step}");
            if m.logging {
                assert_eq!(size, PageSize::Size4K, "step {step}");
            }
            let old = m.zap(base, base + size.bytes());
            for (b, l) in &old {
                // Only a break-before-make replacement of another output address.
                assert_eq!((*b, l.size), (base, size.bytes()), "step {step}");
                assert_ne!(l.pa + (gpa - b), want_pa, "step {step}");
            }
            let perms = need.union(Perms::R);
            m.insert(
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
            assert_eq!(l.pa + (gpa - b), want_pa, "step {step}");
            assert!(l.perms.contains(need), "step {step}");
        }
        Outcome::Relaxed { gpa: base, size } => {
            let (_, l) = before.expect("relaxed an unmapped address");
            assert!(!l.perms.contains(need), "step {step}");
            if m.logging && access == Access::Write {
                m.split_path(gpa);
                m.dirty.insert(gpa & !0xfff);
            }
            let (b, l) = m.leaf_at(gpa).unwrap();
            assert_eq!((b, l.size), (base, size.bytes()), "step {step}");
            m.insert(
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
            assert_ne!(l.pa + (gpa - b), want_pa, "step {step}");
            m.remove(b);
        }
        Outcome::Denied => panic!("step {step}: denied an allowed access"),
    }
}

fn collapse<F: Format>(s2: &Stage2<F, NoopTlb>, m: &mut Model, region: u8) {
    let start = u64::from(region) * GIB;
    s2.collapse(start..start + GIB);
    // Translation is checked by the caller; take the new leaf structure from the engine.
    let bases: Vec<u64> = m
        .leaves()
        .range(start..start + GIB)
        .map(|(&b, _)| b)
        .collect();
    for b in bases {
        let Some(l) = m.leaves().get(&b).copied() else {
            continue;
        };
        let t = s2.lookup(b).expect("collapse unmapped a page");
        if t.size.bytes() > l.size {
            // The merged leaves covered the block exactly, contiguously, equally.
            let pa0 = t.pa - (b - t.base);
            let merged = m.zap(t.base, t.base + t.size.bytes());
            assert_eq!(
                merged.iter().map(|(_, l)| l.size).sum::<u64>(),
                t.size.bytes()
            );
            for (mb, ml) in &merged {
                assert_eq!(ml.pa, pa0 + (mb - t.base));
                assert_eq!(ml.perms, t.perms);
            }
            m.insert(
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
