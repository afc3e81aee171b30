//! The test I/O port protocol between the guests and the VMM, and its decoder.
//!
//! A guest first stores up to [`MAILBOX_ARGS`](crate::params::MAILBOX_ARGS) arguments
//! in its own mailbox (`VcpuBlock::args` of the parameter block), then writes one
//! dword to [`TEST_PORT`]: `PORT_MAGIC << 16 | command`. The VMM reads the mailbox
//! of the vCPU that exited and decodes both into an [`Event`]. The store order plus
//! the synchronous port exit mean the host always sees the finished mailbox.

use crate::params::MAILBOX_ARGS;

/// The I/O port a guest writes its commands to (one dword).
pub const TEST_PORT: u16 = 0xf4;
/// Ports reserved for the test device (0xf4..=0xf7); the others are unused for now.
pub const TEST_PORT_RANGE: core::ops::RangeInclusive<u16> = 0xf4..=0xf7;
/// Upper half of every command dword: rejects stray writes to the port.
pub const PORT_MAGIC: u32 = 0x6e57;

/// Command: the guest started. Args: vCPU id, tsc.
pub const CMD_START: u32 = 1;
/// Command: a generation finished. Args: generation, pages, checksum, tsc, writes.
pub const CMD_PROGRESS: u32 = 2;
/// Command: the guest passed. Args: pages, checksum, reinit, tsc cycles, writes.
pub const CMD_PASS: u32 = 3;
/// Command: verification failed. Args: gpa, expected, actual, generation.
pub const CMD_FAIL: u32 = 4;
/// Command: the parameter block is not for this guest. Args: magic found, kind found.
pub const CMD_BAD_PARAMS: u32 = 5;
/// Command: the guest has finished and idles (it repeats this write forever; the VMM
/// may sleep a little on each). No args.
pub const CMD_IDLE: u32 = 6;
/// Command: the guest has nothing to do for a while (a paced `dirty` vCPU whose next
/// write is not due yet; it asks for at least
/// [`PACE_SLEEP_MIN_US`](crate::params::PACE_SLEEP_MIN_US)).
/// Args: TSC cycles until it has work. The VMM holds the vCPU thread for at most that
/// long (converted with `Params::tsc_khz`) and at most
/// [`PACE_SLEEP_MAX_MS`](crate::params::PACE_SLEEP_MAX_MS); the guest then reads its TSC
/// again and sleeps or spins for what is left, so an early return is always correct.
pub const CMD_SLEEP: u32 = 7;

/// The dword a guest writes for `command`.
pub const fn command_word(command: u32) -> u32 {
    (PORT_MAGIC << 16) | command
}

/// One decoded message from a guest vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The vCPU entered its payload; `vcpu` is the id the guest got in `rdi`.
    Start {
        /// Id the guest believes it has (must match the vCPU that exited).
        vcpu: u64,
        /// Guest time stamp counter at start.
        tsc: u64,
    },
    /// A generation (stress, dirty) is complete.
    Progress {
        /// Generation just finished.
        generation: u64,
        /// Pages verified or touched so far.
        pages: u64,
        /// Running checksum.
        checksum: u64,
        /// Guest time stamp counter now.
        tsc: u64,
        /// Page writes so far (dirty).
        writes: u64,
    },
    /// The guest finished and every check held.
    Pass {
        /// Pages verified (stress) or touched (touch).
        pages: u64,
        /// Running checksum.
        checksum: u64,
        /// Pages re-initialised after a reclaim.
        reinit: u64,
        /// Time stamp counter cycles from start (touch: the populate loop only).
        cycles: u64,
        /// Page writes (dirty).
        writes: u64,
    },
    /// A word in guest memory did not hold what the guest wrote there.
    Fail {
        /// Guest-physical address of the wrong word.
        gpa: u64,
        /// Value the guest expected.
        expected: u64,
        /// Value it read.
        actual: u64,
        /// Generation being verified.
        generation: u64,
    },
    /// The guest did not find a parameter block meant for it.
    BadParams {
        /// Magic found at `rsi`.
        magic: u64,
        /// Guest kind found.
        kind: u64,
    },
    /// The guest has finished and waits to be stopped.
    Idle,
    /// The guest has no work for `cycles` TSC cycles and offers its vCPU thread.
    Sleep {
        /// TSC cycles until the guest's next piece of work is due.
        cycles: u64,
    },
    /// A dword that is not a command of this protocol.
    Unknown {
        /// The raw value written to the port.
        raw: u32,
    },
}

impl Event {
    /// True for the events after which the vCPU stops (it halts forever).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::Pass { .. } | Event::Fail { .. } | Event::BadParams { .. }
        )
    }
}

/// Decodes a port write (`raw`, any width up to 4 bytes, little-endian) with the
/// writing vCPU's mailbox `args`.
pub fn decode(raw: u32, args: &[u64; MAILBOX_ARGS]) -> Event {
    if raw >> 16 != PORT_MAGIC {
        return Event::Unknown { raw };
    }
    match raw & 0xffff {
        CMD_START => Event::Start {
            vcpu: args[0],
            tsc: args[1],
        },
        CMD_PROGRESS => Event::Progress {
            generation: args[0],
            pages: args[1],
            checksum: args[2],
            tsc: args[3],
            writes: args[4],
        },
        CMD_PASS => Event::Pass {
            pages: args[0],
            checksum: args[1],
            reinit: args[2],
            cycles: args[3],
            writes: args[4],
        },
        CMD_FAIL => Event::Fail {
            gpa: args[0],
            expected: args[1],
            actual: args[2],
            generation: args[3],
        },
        CMD_BAD_PARAMS => Event::BadParams {
            magic: args[0],
            kind: args[1],
        },
        CMD_IDLE => Event::Idle,
        CMD_SLEEP => Event::Sleep { cycles: args[0] },
        _ => Event::Unknown { raw },
    }
}

/// Decodes the bytes of an `out` to [`TEST_PORT`] (1, 2 or 4 bytes).
pub fn decode_bytes(data: &[u8], args: &[u64; MAILBOX_ARGS]) -> Event {
    let mut raw = [0u8; 4];
    let n = data.len().min(4);
    raw[..n].copy_from_slice(&data[..n]);
    let raw = u32::from_le_bytes(raw);
    if data.len() != 4 {
        return Event::Unknown { raw };
    }
    decode(raw, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARGS: [u64; MAILBOX_ARGS] = [10, 20, 30, 40, 50, 60];

    #[test]
    fn decodes_every_command() {
        assert_eq!(
            decode(command_word(CMD_START), &ARGS),
            Event::Start { vcpu: 10, tsc: 20 }
        );
        assert_eq!(
            decode(command_word(CMD_PROGRESS), &ARGS),
            Event::Progress {
                generation: 10,
                pages: 20,
                checksum: 30,
                tsc: 40,
                writes: 50
            }
        );
        assert_eq!(
            decode(command_word(CMD_PASS), &ARGS),
            Event::Pass {
                pages: 10,
                checksum: 20,
                reinit: 30,
                cycles: 40,
                writes: 50
            }
        );
        assert_eq!(
            decode(command_word(CMD_FAIL), &ARGS),
            Event::Fail {
                gpa: 10,
                expected: 20,
                actual: 30,
                generation: 40
            }
        );
        assert_eq!(
            decode(command_word(CMD_BAD_PARAMS), &ARGS),
            Event::BadParams {
                magic: 10,
                kind: 20
            }
        );
        assert_eq!(decode(command_word(CMD_IDLE), &ARGS), Event::Idle);
        assert_eq!(
            decode(command_word(CMD_SLEEP), &ARGS),
            Event::Sleep { cycles: 10 }
        );
    }

    #[test]
    fn rejects_wrong_magic_and_unknown_commands() {
        assert_eq!(decode(CMD_PASS, &ARGS), Event::Unknown { raw: CMD_PASS });
        let w = command_word(0x99);
        assert_eq!(decode(w, &ARGS), Event::Unknown { raw: w });
    }

    #[test]
    fn only_dword_writes_are_commands() {
        let w = command_word(CMD_START).to_le_bytes();
        assert!(matches!(decode_bytes(&w, &ARGS), Event::Start { .. }));
        assert_eq!(
            decode_bytes(&w[..1], &ARGS),
            Event::Unknown {
                raw: u32::from(w[0])
            }
        );
    }

    #[test]
    fn final_events() {
        assert!(decode(command_word(CMD_PASS), &ARGS).is_final());
        assert!(decode(command_word(CMD_FAIL), &ARGS).is_final());
        assert!(!decode(command_word(CMD_PROGRESS), &ARGS).is_final());
        assert!(!decode(command_word(CMD_START), &ARGS).is_final());
        assert!(!decode(command_word(CMD_IDLE), &ARGS).is_final());
        assert!(!decode(command_word(CMD_SLEEP), &ARGS).is_final());
    }
}
