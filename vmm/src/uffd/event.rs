//! Decoding the kernel's userfaultfd messages into typed events.

use std::os::fd::RawFd;

use super::abi::*;
use super::error::UffdError;

/// A decoded userfaultfd message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted on a registered range.
    Pagefault {
        /// Faulting host virtual address (page aligned unless EXACT_ADDRESS was requested).
        addr: u64,
        /// A write access.
        write: bool,
        /// A write to a userfaultfd-write-protected page.
        wp: bool,
        /// A minor fault (page cache has the page).
        minor: bool,
        /// Thread id of the faulting thread (0 unless `UFFD_FEATURE_THREAD_ID` is enabled).
        tid: u32,
    },
    /// `[start, end)` was dropped (MADV_DONTNEED / MADV_REMOVE): pages there will fault again.
    Remove {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped (munmap); its registration is gone.
    Unmap {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// A registered range moved with mremap.
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length.
        len: u64,
    },
    /// The process forked; `ufd` is the child's userfaultfd.
    Fork {
        /// The new fd (owned by the receiver).
        ufd: RawFd,
    },
}

impl Event {
    /// Decodes one kernel message.
    pub fn from_msg(msg: &uffd_msg) -> Result<Event, UffdError> {
        let arg = msg.arg;
        Ok(match msg.event {
            UFFD_EVENT_PAGEFAULT => Event::Pagefault {
                addr: arg[1],
                write: arg[0] & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: arg[0] & UFFD_PAGEFAULT_FLAG_WP != 0,
                minor: arg[0] & UFFD_PAGEFAULT_FLAG_MINOR != 0,
                // `feat.ptid` is a __u32 at the start of the third word.
                tid: (arg[2] & u64::from(u32::MAX)) as u32,
            },
            UFFD_EVENT_REMOVE => Event::Remove {
                start: arg[0],
                end: arg[1],
            },
            UFFD_EVENT_UNMAP => Event::Unmap {
                start: arg[0],
                end: arg[1],
            },
            UFFD_EVENT_REMAP => Event::Remap {
                from: arg[0],
                to: arg[1],
                len: arg[2],
            },
            // The fork message's `ufd` is a __u32 at the start of the union.
            UFFD_EVENT_FORK => Event::Fork {
                ufd: (arg[0] & u64::from(u32::MAX)) as u32 as RawFd,
            },
            other => return Err(UffdError::UnknownEvent(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_messages() {
        let msg = uffd_msg {
            event: UFFD_EVENT_PAGEFAULT,
            arg: [
                UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP,
                0x7000,
                42,
            ],
            ..Default::default()
        };
        assert_eq!(
            Event::from_msg(&msg).unwrap(),
            Event::Pagefault {
                addr: 0x7000,
                write: true,
                wp: true,
                minor: false,
                tid: 42
            }
        );
        let msg = uffd_msg {
            event: UFFD_EVENT_REMOVE,
            arg: [0x1000, 0x3000, 0],
            ..Default::default()
        };
        assert_eq!(
            Event::from_msg(&msg).unwrap(),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        let msg = uffd_msg {
            event: 0x42,
            ..Default::default()
        };
        assert!(matches!(
            Event::from_msg(&msg),
            Err(UffdError::UnknownEvent(0x42))
        ));
    }
}
