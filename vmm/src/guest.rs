//! Runs a built-in test guest (`vmm --guest NAME`): placeholder until the guest runner lands.

use clap::Args;

/// Options for `vmm --guest NAME` (flattened into the main command line).
#[derive(Args, Debug, Clone, Default)]
pub struct GuestArgs {
    /// Run a built-in test guest instead of a kernel (stress, touch, dirty).
    #[arg(long, value_name = "NAME")]
    pub guest: Option<String>,
}

/// Runs the named built-in guest. Not built yet.
pub fn run(_args: &GuestArgs, _mem_bytes: u64, _cpus: u8) -> anyhow::Result<i32> {
    anyhow::bail!("built-in guests are not built yet")
}
