//! The options of `vmm --guest NAME`, the built-in test guests (flattened into the main command
//! line).

use clap::{Args, ValueEnum};
use guest_tests::Mode;

/// How `stress` walks its slice (`--mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Pages in ascending order.
    #[default]
    Sequential,
    /// Pages chosen by xorshift64.
    Random,
    /// All vCPUs on one 2 MiB page, even ones writing, odd ones reading.
    SharedHot,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Sequential => Mode::Sequential,
            ModeArg::Random => Mode::Random,
            ModeArg::SharedHot => Mode::SharedHot,
        }
    }
}

/// Options for `vmm --guest NAME` (flattened into the main command line).
#[derive(Args, Debug, Clone, Default)]
pub struct GuestArgs {
    /// Run a built-in test guest instead of a kernel: stress, touch or dirty.
    #[arg(long, value_name = "NAME")]
    pub guest: Option<String>,
    /// How the stress guest walks its slice.
    #[arg(long, value_enum, default_value_t = ModeArg::Sequential)]
    pub mode: ModeArg,
    /// Write/verify generations (stress, default 2) or write generations (dirty, default
    /// 8; 0 = until stopped).
    #[arg(long, value_name = "N")]
    pub generations: Option<u64>,
    /// Random page writes per generation of the dirty guest (default: a quarter of its
    /// slice's pages).
    #[arg(long, value_name = "N")]
    pub writes_per_gen: Option<u64>,
    /// Seed of the guests' pseudo-random page choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Pace the dirty guest's page writes to this many MB (10^6 bytes of 4 KiB pages
    /// written) per second over all vCPUs, timed with the guest's TSC; 0 = as fast as it
    /// can. Without --writes-per-gen a generation is then about 200 ms of writes (so give
    /// an --incoming destination the same --dirty-rate: its replay check needs that count).
    #[arg(long, value_name = "MB_PER_S", default_value_t = 0)]
    pub dirty_rate: u64,
    /// The VMM may drop guest ranges while the guest runs: a stress guest re-initialises a
    /// page it finds zeroed by a reclaim instead of failing.
    #[arg(long)]
    pub expect_reclaim: bool,
    /// Drop this many 1 GiB ranges of slice memory (round robin, one every 100 ms) while
    /// the guest runs; implies --expect-reclaim.
    #[arg(long, value_name = "COUNT")]
    pub reclaim_storm: Option<u64>,
    /// Fail the guest if it has not finished after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub guest_timeout: Option<u64>,
    /// Set the guest's stop flag after this many seconds of running here (with
    /// --generations 0 the dirty guest then finishes, and is verified).
    #[arg(long, value_name = "SECONDS")]
    pub run_for: Option<u64>,
}

impl GuestArgs {
    /// `--mode` as the command line spells it.
    pub fn mode_name(&self) -> String {
        self.mode
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}
