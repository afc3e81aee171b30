//! What a test guest run will do, resolved from its options and checked against the memory and
//! vCPUs: the guest kind, its slices and the parameter block it reads.

use anyhow::bail;
use guest_tests::params::{FLAG_EXPECT_RECLAIM, PAGE_SIZE};
use guest_tests::{GuestKind, Mode, Params};

use super::layout;
use crate::cli::GuestArgs;
use crate::memory::{self, human};

/// Generations `stress` runs when `--generations` is not given.
pub const DEFAULT_STRESS_GENERATIONS: u64 = 2;
/// Generations `dirty` runs when `--generations` is not given.
pub const DEFAULT_DIRTY_GENERATIONS: u64 = 8;
/// Default `dirty` writes per generation: this fraction (1/N) of the slice's pages.
pub const DEFAULT_DIRTY_WRITES_DIVISOR: u64 = 4;
/// Length of a `dirty` generation at the `--dirty-rate` pace when `--writes-per-gen` is not
/// given (the guest looks at its stop flag between generations).
pub const PACED_GENERATION_MS: u64 = 200;

/// Writes per vCPU in `PACED_GENERATION_MS` at `rate_mb_s` over `cpus` vCPUs.
fn paced_writes_per_gen(rate_mb_s: u64, cpus: u8) -> u64 {
    let bytes = u128::from(rate_mb_s) * u128::from(guest_tests::params::DIRTY_RATE_MB);
    let writes = bytes * u128::from(PACED_GENERATION_MS)
        / 1000
        / u128::from(PAGE_SIZE)
        / u128::from(cpus.max(1));
    u64::try_from(writes).unwrap_or(u64::MAX)
}

/// What the run needs, resolved from the options.
pub(super) struct Plan {
    pub(super) kind: GuestKind,
    pub(super) mode: Mode,
    pub(super) params: Box<Params>,
    /// `--dirty-rate` (MB/s, 0 = unpaced).
    pub(super) dirty_rate: u64,
}

/// Checks the guest options against `mem_bytes` and `cpus` without running anything (an
/// `--incoming` destination given `--guest` refuses bad options before it listens).
pub fn check(args: &GuestArgs, mem_bytes: u64, cpus: u8) -> anyhow::Result<()> {
    plan(args, mem_bytes, cpus).map(|_| ())
}

pub(super) fn plan(args: &GuestArgs, mem_bytes: u64, cpus: u8) -> anyhow::Result<Plan> {
    let name = args.guest.as_deref().unwrap_or_default();
    let Some(kind) = GuestKind::from_name(name) else {
        let valid: Vec<&str> = GuestKind::ALL.iter().map(|k| k.name()).collect();
        bail!(
            "unknown guest '{name}': choose one of {} (--guest NAME)",
            valid.join(", ")
        );
    };
    let mode: Mode = args.mode.into();
    if mode != Mode::Sequential && kind != GuestKind::Stress {
        bail!(
            "--mode {} is for the stress guest; {} walks its slice its own way: drop --mode",
            mode.name(),
            kind.name()
        );
    }
    let regions = memory::layout(mem_bytes);
    let slices = layout::plan_slices(kind, mode, cpus, &regions)?;
    let generations = match kind {
        GuestKind::Stress => args.generations.unwrap_or(DEFAULT_STRESS_GENERATIONS),
        GuestKind::Dirty => args.generations.unwrap_or(DEFAULT_DIRTY_GENERATIONS),
        GuestKind::Touch => 1,
    };
    if kind == GuestKind::Stress && !(1..1 << 24).contains(&generations) {
        bail!("--generations {generations}: the stress guest runs 1 to 16777215 generations");
    }
    let pages = slices[0].len / PAGE_SIZE;
    if args.dirty_rate != 0 && kind != GuestKind::Dirty {
        bail!(
            "--dirty-rate is for the dirty guest; {} does not pace its writes: drop --dirty-rate",
            kind.name()
        );
    }
    let default_writes = match args.dirty_rate {
        0 => pages / DEFAULT_DIRTY_WRITES_DIVISOR,
        rate => paced_writes_per_gen(rate, cpus).min(pages),
    };
    let writes_per_gen = args.writes_per_gen.unwrap_or(default_writes.max(1));
    if writes_per_gen == 0 {
        bail!("--writes-per-gen 0: give at least 1");
    }
    let mut params = Params::new(kind, mode, u32::from(cpus));
    params.generations = generations;
    params.seed = args.seed;
    params.writes_per_gen = writes_per_gen;
    if args.expect_reclaim || args.reclaim_storm.is_some() {
        params.flags |= FLAG_EXPECT_RECLAIM;
    }
    for (block, s) in params.vcpus.iter_mut().zip(&slices) {
        block.slice_base = s.base;
        block.slice_len = s.len;
    }
    Ok(Plan {
        kind,
        mode,
        params,
        dirty_rate: args.dirty_rate,
    })
}

/// One line on what the run does, for the log.
pub(super) fn describe(plan: &Plan) -> String {
    let slice = human(plan.params.vcpus[0].slice_len);
    match plan.kind {
        GuestKind::Stress => format!(
            "mode {}, {} generation(s), slice {slice} per vCPU",
            plan.mode.name(),
            plan.params.generations,
        ),
        GuestKind::Touch => format!("slice {slice} per vCPU"),
        GuestKind::Dirty => format!(
            "{} generation(s) of {} writes, slice {slice} per vCPU{}",
            plan.params.generations,
            plan.params.writes_per_gen,
            match plan.dirty_rate {
                0 => String::new(),
                r => format!(", paced to {r} MB/s"),
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ModeArg;

    fn args(guest: &str) -> GuestArgs {
        GuestArgs {
            guest: Some(guest.into()),
            seed: 1,
            ..GuestArgs::default()
        }
    }

    #[test]
    fn unknown_guest_lists_the_valid_ones() {
        let e = plan(&args("linux"), 1 << 30, 1).err().unwrap().to_string();
        assert_eq!(
            e,
            "unknown guest 'linux': choose one of stress, touch, dirty (--guest NAME)"
        );
    }

    #[test]
    fn too_little_memory_says_the_minimum() {
        let e = plan(&args("stress"), 8 << 20, 4).err().unwrap().to_string();
        assert!(e.contains("at least 12M"), "{e}");
    }

    #[test]
    fn plan_fills_the_parameter_block() {
        let mut a = args("dirty");
        a.reclaim_storm = Some(3);
        let p = plan(&a, 64 << 20, 2).unwrap();
        assert_eq!(p.kind, GuestKind::Dirty);
        assert_eq!(p.params.generations, DEFAULT_DIRTY_GENERATIONS);
        assert_eq!(p.params.flags & FLAG_EXPECT_RECLAIM, FLAG_EXPECT_RECLAIM);
        assert_eq!(p.params.vcpus[0].slice_len, 30 << 20);
        assert_eq!(p.params.writes_per_gen, (30 << 20) / PAGE_SIZE / 4);
        assert_eq!(p.params.vcpus[1].slice_base, (4 << 20) + (30 << 20));
        assert_eq!(p.params.vcpus[2].slice_len, 0);
    }

    #[test]
    fn dirty_rate_sets_a_short_generation_and_is_only_for_dirty() {
        let mut a = args("dirty");
        a.dirty_rate = 40;
        let p = plan(&a, 64 << 20, 2).unwrap();
        // 40 MB/s over 2 vCPUs for 200 ms: 4e6 bytes per vCPU, 976 pages.
        assert_eq!(p.params.writes_per_gen, 976);
        a.writes_per_gen = Some(5);
        assert_eq!(plan(&a, 64 << 20, 2).unwrap().params.writes_per_gen, 5);
        let mut s = args("stress");
        s.dirty_rate = 40;
        let e = plan(&s, 64 << 20, 1).err().unwrap().to_string();
        assert!(e.contains("--dirty-rate is for the dirty guest"), "{e}");
    }

    #[test]
    fn mode_is_only_for_stress() {
        let mut a = args("touch");
        a.mode = ModeArg::Random;
        let e = plan(&a, 64 << 20, 1).err().unwrap().to_string();
        assert!(e.contains("for the stress guest"), "{e}");
    }
}
