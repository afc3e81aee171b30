//! The parameter block the host writes into guest memory before the test guests run.
//!
//! One `#[repr(C)]` [`Params`] sits at a guest-physical address the VMM chooses; every
//! vCPU receives that address in `rsi` and its own id in `rdi`, and finds its slice and
//! mailbox in `Params::vcpus[id]`. The guest payloads read the fields through
//! `offset_of!` constants, so the layout here is the single definition of the format.

use core::mem::{offset_of, size_of};

/// Marks a valid parameter block ("GSTPARM1" read as little-endian bytes).
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"GSTPARM1");

/// Most vCPUs a parameter block describes (the VMM's `--cpus` is a `u8`).
pub const MAX_VCPUS: usize = 256;

/// Size of a guest page as the guests walk their slices (x86 4 KiB page).
pub const PAGE_SIZE: u64 = 4096;

/// Size of a 2 MiB large page (x86 PDE with PS=1): slices and the shared-hot page
/// are aligned to it so that a 2 MiB backing page belongs to exactly one slice.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// Flag: the VMM may drop guest ranges at any time; a page found zeroed after a
/// reclaim is re-initialised instead of failing (see [`Params::reclaim_seq`]).
pub const FLAG_EXPECT_RECLAIM: u32 = 1 << 0;

/// Which built-in guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GuestKind {
    /// Writes then verifies a pattern over its slice for N generations.
    Stress = 1,
    /// Writes one word per 4 KiB page once and reports the time it took.
    Touch = 2,
    /// Writes generation numbers into pseudo-random pages of its slice.
    Dirty = 3,
}

impl GuestKind {
    /// Every guest, in the order help texts list them.
    pub const ALL: [GuestKind; 3] = [GuestKind::Stress, GuestKind::Touch, GuestKind::Dirty];

    /// The name used on the command line and by [`crate::payload`].
    pub fn name(self) -> &'static str {
        match self {
            GuestKind::Stress => "stress",
            GuestKind::Touch => "touch",
            GuestKind::Dirty => "dirty",
        }
    }

    /// Looks a guest up by its command-line name.
    pub fn from_name(name: &str) -> Option<GuestKind> {
        GuestKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// How the `stress` guest walks its slice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Mode {
    /// Pages in ascending order.
    #[default]
    Sequential = 0,
    /// Pages chosen by xorshift64, as many steps as the slice has pages.
    Random = 1,
    /// All vCPUs on one 2 MiB page: even vCPUs write their share, odd vCPUs read all.
    SharedHot = 2,
}

impl Mode {
    /// Every mode, in the order help texts list them.
    pub const ALL: [Mode; 3] = [Mode::Sequential, Mode::Random, Mode::SharedHot];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sequential => "sequential",
            Mode::Random => "random",
            Mode::SharedHot => "shared-hot",
        }
    }

    /// Looks a mode up by its command-line name.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Number of 64-bit argument slots in a vCPU's mailbox.
pub const MAILBOX_ARGS: usize = 6;

/// One vCPU's part of the parameter block: its slice (host-written), the counters
/// the guest keeps while it runs, and the mailbox of the next port command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VcpuBlock {
    /// First guest-physical byte of this vCPU's slice (4 KiB aligned).
    pub slice_base: u64,
    /// Bytes in the slice (a multiple of 4 KiB).
    pub slice_len: u64,
    /// First page index this vCPU walks (guest-written; shared-hot writers).
    pub start: u64,
    /// Page index step (guest-written; shared-hot writers step by the writer count).
    pub step: u64,
    /// Generation in progress (stress) or last completed (dirty).
    pub generation: u64,
    /// Pages verified (stress), touched (touch).
    pub pages: u64,
    /// Page writes completed so far (dirty); the host replays exactly this many.
    pub writes: u64,
    /// Wrapping sum over verified patterns (stress) or over `gpa ^ generation` of each
    /// write (dirty).
    pub checksum: u64,
    /// Pages found zeroed by a reclaim and written again (expect-reclaim mode).
    pub reinit: u64,
    /// Time stamp counter when the guest started.
    pub tsc_start: u64,
    /// Arguments of the port command being issued (see [`crate::protocol`]).
    pub args: [u64; MAILBOX_ARGS],
}

/// The parameter block at the gpa passed in `rsi`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Params {
    /// [`PARAMS_MAGIC`]; a guest that finds anything else reports `BadParams`.
    pub magic: u64,
    /// [`GuestKind`] as `u32`; the payload checks it is the guest it is.
    pub kind: u32,
    /// [`Mode`] as `u32`.
    pub mode: u32,
    /// vCPUs taking part.
    pub nr_vcpus: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Generations to run (stress, dirty); 0 makes `dirty` run until [`Params::stop`].
    pub generations: u64,
    /// Seed of every pseudo-random sequence (see [`rng_seed`]).
    pub seed: u64,
    /// Random page writes per generation (dirty).
    pub writes_per_gen: u64,
    /// Host-written reclaim sequence: incremented before and after every range the
    /// VMM drops, so it is odd while a drop is in progress. A stress guest accepts a
    /// zeroed page only if this moved (or was odd) since its generation started.
    pub reclaim_seq: u64,
    /// Host-written: non-zero asks a `dirty` guest to finish after its generation.
    pub stop: u64,
    /// The guest's time stamp counter frequency in kHz as KVM reports it (0 = unknown);
    /// a paced `dirty` guest bounds its catch-up burst with it.
    pub tsc_khz: u64,
    /// TSC cycles between two page writes of one `dirty` vCPU; 0 = write as fast as it
    /// can (see [`write_interval_tsc`]).
    pub write_interval_tsc: u64,
    /// One block per vCPU, indexed by vCPU id.
    pub vcpus: [VcpuBlock; MAX_VCPUS],
}

/// Byte offsets of the fields the payloads use (the guest-side view of the layout).
pub mod offsets {
    use super::*;

    /// `Params::magic`.
    pub const MAGIC: usize = offset_of!(Params, magic);
    /// `Params::kind`.
    pub const KIND: usize = offset_of!(Params, kind);
    /// `Params::mode`.
    pub const MODE: usize = offset_of!(Params, mode);
    /// `Params::nr_vcpus`.
    pub const NR_VCPUS: usize = offset_of!(Params, nr_vcpus);
    /// `Params::flags`.
    pub const FLAGS: usize = offset_of!(Params, flags);
    /// `Params::generations`.
    pub const GENERATIONS: usize = offset_of!(Params, generations);
    /// `Params::seed`.
    pub const SEED: usize = offset_of!(Params, seed);
    /// `Params::writes_per_gen`.
    pub const WRITES_PER_GEN: usize = offset_of!(Params, writes_per_gen);
    /// `Params::reclaim_seq`.
    pub const RECLAIM_SEQ: usize = offset_of!(Params, reclaim_seq);
    /// `Params::stop`.
    pub const STOP: usize = offset_of!(Params, stop);
    /// `Params::tsc_khz`.
    pub const TSC_KHZ: usize = offset_of!(Params, tsc_khz);
    /// `Params::write_interval_tsc`.
    pub const WRITE_INTERVAL_TSC: usize = offset_of!(Params, write_interval_tsc);
    /// `Params::vcpus`.
    pub const VCPUS: usize = offset_of!(Params, vcpus);
    /// log2 of `size_of::<VcpuBlock>()` (the payloads index the array with a shift).
    pub const VCPU_BLOCK_SHIFT: usize = 7;

    /// `VcpuBlock::slice_base`.
    pub const V_SLICE_BASE: usize = offset_of!(VcpuBlock, slice_base);
    /// `VcpuBlock::slice_len`.
    pub const V_SLICE_LEN: usize = offset_of!(VcpuBlock, slice_len);
    /// `VcpuBlock::start`.
    pub const V_START: usize = offset_of!(VcpuBlock, start);
    /// `VcpuBlock::step`.
    pub const V_STEP: usize = offset_of!(VcpuBlock, step);
    /// `VcpuBlock::generation`.
    pub const V_GENERATION: usize = offset_of!(VcpuBlock, generation);
    /// `VcpuBlock::pages`.
    pub const V_PAGES: usize = offset_of!(VcpuBlock, pages);
    /// `VcpuBlock::writes`.
    pub const V_WRITES: usize = offset_of!(VcpuBlock, writes);
    /// `VcpuBlock::checksum`.
    pub const V_CHECKSUM: usize = offset_of!(VcpuBlock, checksum);
    /// `VcpuBlock::reinit`.
    pub const V_REINIT: usize = offset_of!(VcpuBlock, reinit);
    /// `VcpuBlock::tsc_start`.
    pub const V_TSC_START: usize = offset_of!(VcpuBlock, tsc_start);
    /// `VcpuBlock::args`.
    pub const V_ARGS: usize = offset_of!(VcpuBlock, args);

    const _: () = assert!(size_of::<VcpuBlock>() == 1 << VCPU_BLOCK_SHIFT);
}

/// Multiplier that spreads vCPU ids over the seed (2^64 / golden ratio).
pub const SEED_VCPU_MUL: u64 = 0x9e37_79b9_7f4a_7c15;
/// Multiplier that spreads generations over the seed (an odd 64-bit constant).
pub const SEED_GEN_MUL: u64 = 0xd1b5_4a32_d192_ed03;

/// The xorshift64 state a guest starts from for `vcpu` in `generation`; the payloads
/// compute exactly this (`| 1` keeps the state non-zero, which xorshift needs).
pub fn rng_seed(seed: u64, vcpu: u64, generation: u64) -> u64 {
    (seed
        ^ vcpu.wrapping_add(1).wrapping_mul(SEED_VCPU_MUL)
        ^ generation.wrapping_mul(SEED_GEN_MUL))
        | 1
}

/// One step of xorshift64 (shifts 13, 7, 17), as the payloads do it.
pub fn xorshift64(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Maps a random value onto `0..pages` the way the payloads do (`mul`, high half).
pub fn scale(random: u64, pages: u64) -> u64 {
    ((u128::from(random) * u128::from(pages)) >> 64) as u64
}

/// The word a `stress` guest writes at offset 0 of page `index` of `vcpu`'s slice in
/// `generation` (offset 8 holds the page's gpa, offset 4088 the complement).
pub fn stress_pattern(index: u64, vcpu: u64, generation: u64) -> u64 {
    (generation << 40) | ((vcpu & 0xff) << 32) | (index & 0xffff_ffff)
}

/// Bytes one `dirty` page write counts for in a dirty rate: the whole 4 KiB page it
/// makes dirty.
pub const DIRTY_BYTES_PER_WRITE: u64 = PAGE_SIZE;

/// Bytes in the MB of `--dirty-rate MB_PER_S` (decimal, as the migration progress lines).
pub const DIRTY_RATE_MB: u64 = 1_000_000;

/// Longest backlog a paced `dirty` vCPU makes up for, in milliseconds: after a longer
/// stall (descheduled thread, migration downtime) it drops the rest of its backlog
/// instead of writing in a burst above its rate.
pub const PACE_MAX_LAG_MS: u64 = 100;

/// Shortest sleep, in microseconds, a paced `dirty` vCPU asks of the host
/// ([`CMD_SLEEP`](crate::protocol::CMD_SLEEP)): a shorter wait is rounded up to it and
/// the writes that fall due meanwhile go in a burst. Well above the cost of a port exit
/// plus a host timer wake-up (tens of µs), so that pacing costs little host CPU at any
/// rate (the guest spun through short waits before, and at hundreds of MB/s its vCPUs
/// took the host's cores from the migration they were being measured against).
pub const PACE_SLEEP_MIN_US: u64 = 1000;

/// Longest time, in milliseconds, the VMM holds a vCPU thread on one
/// [`CMD_SLEEP`](crate::protocol::CMD_SLEEP): a pause or stop of the VM waits at most this
/// long for the vCPU (the guest asks again if its wait is longer). Below
/// [`PACE_MAX_LAG_MS`] so that a sleep never costs the guest backlog it would drop.
pub const PACE_SLEEP_MAX_MS: u64 = 10;

const _: () = assert!(PACE_SLEEP_MAX_MS < PACE_MAX_LAG_MS);
const _: () = assert!(PACE_SLEEP_MIN_US < PACE_SLEEP_MAX_MS * 1000);

/// How long the host sleeps for a guest's [`CMD_SLEEP`](crate::protocol::CMD_SLEEP) of
/// `cycles` TSC cycles on a TSC of `tsc_khz` kHz: the wait itself, capped at
/// [`PACE_SLEEP_MAX_MS`]; zero when the frequency is unknown (0), so the guest falls back
/// to spinning rather than being held for a guessed time.
pub fn pace_sleep(cycles: u64, tsc_khz: u64) -> core::time::Duration {
    if tsc_khz == 0 {
        return core::time::Duration::ZERO;
    }
    // cycles / (kHz * 1000) seconds, in µs: cycles * 1000 / kHz.
    let us = u128::from(cycles) * 1000 / u128::from(tsc_khz);
    let cap = u128::from(PACE_SLEEP_MAX_MS) * 1000;
    core::time::Duration::from_micros(us.min(cap) as u64)
}

/// TSC cycles between two page writes of one vCPU so that `nr_vcpus` vCPUs together
/// dirty `rate_mb_s` MB (10^6 bytes) per second, on a TSC of `tsc_khz` kHz.
///
/// Returns 0 (unpaced) for a rate of 0; at least 1 for any other rate, so that a rate
/// above what the guest can reach means "as fast as it can" rather than "unpaced".
pub fn write_interval_tsc(rate_mb_s: u64, tsc_khz: u64, nr_vcpus: u32) -> u64 {
    if rate_mb_s == 0 {
        return 0;
    }
    // cycles/s * bytes/write * vCPUs / (bytes/s)
    let num = u128::from(tsc_khz) * 1000 * u128::from(DIRTY_BYTES_PER_WRITE) * u128::from(nr_vcpus);
    let den = u128::from(rate_mb_s) * u128::from(DIRTY_RATE_MB);
    u64::try_from(num / den).unwrap_or(u64::MAX).max(1)
}

/// The dirty rate in MB/s of `writes` page writes made in `seconds`.
pub fn dirty_rate_mb_s(writes: u64, seconds: f64) -> f64 {
    (writes * DIRTY_BYTES_PER_WRITE) as f64 / DIRTY_RATE_MB as f64 / seconds.max(1e-9)
}

impl Params {
    /// A zeroed block with the magic and the given guest, mode and vCPU count.
    pub fn new(kind: GuestKind, mode: Mode, nr_vcpus: u32) -> Box<Params> {
        Box::new(Params {
            magic: PARAMS_MAGIC,
            kind: kind as u32,
            mode: mode as u32,
            nr_vcpus,
            flags: 0,
            generations: 0,
            seed: 0,
            writes_per_gen: 0,
            reclaim_seq: 0,
            stop: 0,
            tsc_khz: 0,
            write_interval_tsc: 0,
            vcpus: [VcpuBlock::default(); MAX_VCPUS],
        })
    }

    /// Bytes of the block up to and including the last used vCPU block (what the host
    /// copies into guest memory).
    pub fn used_len(&self) -> usize {
        offsets::VCPUS + self.nr_vcpus as usize * size_of::<VcpuBlock>()
    }

    /// The block as bytes, truncated to [`Params::used_len`].
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Params` is `repr(C)` made only of integers (no padding: every field
        // is naturally aligned and the sizes add up, checked by the layout test), so
        // all its bytes are initialised; `used_len` never exceeds its size.
        let all = unsafe {
            core::slice::from_raw_parts((self as *const Params).cast::<u8>(), size_of::<Params>())
        };
        &all[..self.used_len()]
    }

    /// Guest-physical address of `VcpuBlock::args` of `vcpu` when the block is at `params_gpa`.
    pub fn args_gpa(params_gpa: u64, vcpu: usize) -> u64 {
        params_gpa + (offsets::VCPUS + vcpu * size_of::<VcpuBlock>() + offsets::V_ARGS) as u64
    }

    /// Guest-physical address of the `VcpuBlock` of `vcpu` when the block is at `params_gpa`.
    pub fn vcpu_block_gpa(params_gpa: u64, vcpu: usize) -> u64 {
        params_gpa + (offsets::VCPUS + vcpu * size_of::<VcpuBlock>()) as u64
    }

    /// Guest-physical address of `Params::reclaim_seq` when the block is at `params_gpa`.
    pub fn reclaim_seq_gpa(params_gpa: u64) -> u64 {
        params_gpa + offsets::RECLAIM_SEQ as u64
    }

    /// Guest-physical address of `Params::tsc_khz` (followed by
    /// `Params::write_interval_tsc`) when the block is at `params_gpa`.
    pub fn pacing_gpa(params_gpa: u64) -> u64 {
        params_gpa + offsets::TSC_KHZ as u64
    }

    /// Guest-physical address of `Params::stop` when the block is at `params_gpa`.
    pub fn stop_gpa(params_gpa: u64) -> u64 {
        params_gpa + offsets::STOP as u64
    }
}

/// Reads a `VcpuBlock` back from its bytes in guest memory.
pub fn vcpu_block_from_bytes(bytes: &[u8; size_of::<VcpuBlock>()]) -> VcpuBlock {
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
    VcpuBlock {
        slice_base: word(0),
        slice_len: word(1),
        start: word(2),
        step: word(3),
        generation: word(4),
        pages: word(5),
        writes: word(6),
        checksum: word(7),
        reinit: word(8),
        tsc_start: word(9),
        args: core::array::from_fn(|i| word(10 + i)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_no_padding_and_fixed_offsets() {
        assert_eq!(size_of::<VcpuBlock>(), 16 * 8);
        assert_eq!(offsets::VCPUS, 80);
        assert_eq!(offsets::TSC_KHZ, 64);
        assert_eq!(offsets::WRITE_INTERVAL_TSC, 72);
        assert_eq!(size_of::<Params>(), 80 + MAX_VCPUS * 128);
        assert_eq!(offsets::RECLAIM_SEQ, 48);
        assert_eq!(offsets::V_ARGS, 80);
    }

    #[test]
    fn names_round_trip() {
        for k in GuestKind::ALL {
            assert_eq!(GuestKind::from_name(k.name()), Some(k));
        }
        for m in Mode::ALL {
            assert_eq!(Mode::from_name(m.name()), Some(m));
        }
        assert_eq!(GuestKind::from_name("linux"), None);
        assert_eq!(Mode::from_name("hot"), None);
    }

    #[test]
    fn bytes_cover_used_vcpus_only() {
        let mut p = Params::new(GuestKind::Dirty, Mode::Random, 2);
        p.vcpus[1].slice_base = 0x4000_0000;
        let b = p.as_bytes();
        assert_eq!(b.len(), 80 + 2 * 128);
        assert_eq!(&b[..8], b"GSTPARM1");
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 3);
        let block: &[u8; 128] = b[80 + 128..].try_into().unwrap();
        assert_eq!(vcpu_block_from_bytes(block).slice_base, 0x4000_0000);
    }

    #[test]
    fn rng_seed_is_odd_and_distinct_per_vcpu_and_generation() {
        let a = rng_seed(7, 0, 1);
        assert_eq!(a & 1, 1);
        assert_ne!(a, rng_seed(7, 1, 1));
        assert_ne!(a, rng_seed(7, 0, 2));
        assert_eq!(rng_seed(0, u64::MAX, 0) & 1, 1);
    }

    #[test]
    fn xorshift_and_scale_stay_in_range() {
        let mut s = rng_seed(42, 3, 0);
        for _ in 0..10_000 {
            let r = xorshift64(&mut s);
            assert_ne!(r, 0);
            assert!(scale(r, 1000) < 1000);
        }
        assert_eq!(scale(u64::MAX, 1), 0);
    }

    #[test]
    fn write_interval_paces_all_vcpus_to_the_rate() {
        // 2 GHz TSC, 4 vCPUs, 100 MB/s: 100e6 / 4096 = 24414 writes/s in all, 6103.5 per
        // vCPU, so 2e9 / 6103.5 = 327680 cycles apart.
        assert_eq!(write_interval_tsc(100, 2_000_000, 4), 327_680);
        assert_eq!(write_interval_tsc(0, 2_000_000, 4), 0);
        // A rate no guest reaches still paces (interval 1), it never means unpaced.
        assert_eq!(write_interval_tsc(u64::MAX, 2_000_000, 1), 1);
        // Round trip: the interval gives back the rate within rounding.
        let i = write_interval_tsc(37, 2_893_204, 3);
        let writes_per_s = 3.0 * 2_893_204_000.0 / i as f64;
        let rate = dirty_rate_mb_s(writes_per_s as u64, 1.0);
        assert!((rate - 37.0).abs() < 0.01, "{rate}");
    }

    #[test]
    fn pace_sleep_converts_cycles_and_caps() {
        // 2 GHz: 2_000_000 cycles are 1 ms.
        assert_eq!(
            pace_sleep(2_000_000, 2_000_000),
            core::time::Duration::from_millis(1)
        );
        assert_eq!(
            pace_sleep(400_000, 2_000_000),
            core::time::Duration::from_micros(200)
        );
        // A wait longer than the cap is served in several sleeps.
        assert_eq!(
            pace_sleep(u64::MAX, 2_000_000),
            core::time::Duration::from_millis(PACE_SLEEP_MAX_MS)
        );
        // Unknown frequency: no sleep (the guest spins instead).
        assert_eq!(pace_sleep(1 << 40, 0), core::time::Duration::ZERO);
    }

    #[test]
    fn stress_pattern_encodes_fields() {
        let p = stress_pattern(0x1234, 3, 5);
        assert_eq!(p & 0xffff_ffff, 0x1234);
        assert_eq!((p >> 32) & 0xff, 3);
        assert_eq!(p >> 40, 5);
    }
}
