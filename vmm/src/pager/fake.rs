//! A fake host for the pager's unit tests: [`HostPages`] over a table of resident and write-protected 4 KiB pages, with a log of every call.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::sync::Mutex;

use crate::uffd::{HostPages, UffdError};

/// The 4 KiB page.
pub(super) const P: u64 = 4096;

/// One call the pager made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Call {
    Copy { dst: u64, len: u64, wp: bool },
    Zero { dst: u64, len: u64 },
    Continue { dst: u64, len: u64, wp: bool },
    Wake { start: u64, len: u64 },
    Protect { start: u64, len: u64, protect: bool },
    Drop { start: u64, len: u64 },
    Punch { offset: u64, len: u64 },
}

#[derive(Default)]
struct Pages {
    resident: BTreeSet<u64>,
    protected: BTreeSet<u64>,
    calls: Vec<Call>,
    /// A REMOVE event is queued and unread: fills and protection changes fail with EAGAIN.
    remove_pending: bool,
    /// The next fill fails with this errno (not a race).
    fail_next_fill: Option<i32>,
}

/// Resident pages in a table; nothing is mapped or copied.
#[derive(Default)]
pub(super) struct FakeHost {
    pages: Mutex<Pages>,
    /// Run by `drop_pages` once the pages are gone, before it returns (what other threads do
    /// while a reclaim's madvise runs).
    during_drop: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl FakeHost {
    fn with<R>(&self, f: impl FnOnce(&mut Pages) -> R) -> R {
        f(&mut self.pages.lock().unwrap())
    }

    /// Every call so far, then forgets them.
    pub(super) fn take_calls(&self) -> Vec<Call> {
        self.with(|p| std::mem::take(&mut p.calls))
    }

    /// Takes the calls; the last one.
    pub(super) fn last_call(&self) -> Option<Call> {
        self.take_calls().pop()
    }

    /// Takes the calls; whether any woke a thread.
    pub(super) fn take_woken(&self) -> bool {
        self.take_calls()
            .iter()
            .any(|c| matches!(c, Call::Wake { .. }))
    }

    pub(super) fn is_resident(&self, hva: u64) -> bool {
        self.with(|p| p.resident.contains(&(hva & !(P - 1))))
    }

    pub(super) fn is_protected(&self, hva: u64) -> bool {
        self.with(|p| p.protected.contains(&(hva & !(P - 1))))
    }

    /// Makes `[hva, hva+len)` resident, as another thread's fill would.
    pub(super) fn populate(&self, hva: u64, len: u64) {
        self.with(|p| p.resident.extend((hva..hva + len).step_by(P as usize)));
    }

    pub(super) fn set_remove_pending(&self, pending: bool) {
        self.with(|p| p.remove_pending = pending);
    }

    pub(super) fn fail_next_fill(&self, errno: i32) {
        self.with(|p| p.fail_next_fill = Some(errno));
    }

    pub(super) fn on_drop(&self, f: impl FnOnce() + Send + 'static) {
        *self.during_drop.lock().unwrap() = Some(Box::new(f));
    }

    /// A fill as the kernel does it: EAGAIN with nothing done while a REMOVE is pending,
    /// EEXIST when the first page is resident, else up to the first resident page (EAGAIN
    /// with the bytes done when that is short of `len`).
    fn fill(
        &self,
        op: &'static str,
        dst: u64,
        len: u64,
        wp: bool,
        call: Call,
    ) -> Result<u64, UffdError> {
        self.with(|p| {
            p.calls.push(call);
            if let Some(errno) = p.fail_next_fill.take() {
                return Err(UffdError::Ioctl {
                    op,
                    start: dst,
                    len,
                    source: io::Error::from_raw_os_error(errno),
                });
            }
            if p.remove_pending {
                return Err(UffdError::Again { addr: dst, done: 0 });
            }
            let done = (dst..dst + len)
                .step_by(P as usize)
                .take_while(|a| !p.resident.contains(a))
                .count() as u64
                * P;
            if done == 0 {
                return Err(UffdError::Exists { addr: dst });
            }
            for a in (dst..dst + done).step_by(P as usize) {
                p.resident.insert(a);
                if wp {
                    p.protected.insert(a);
                }
            }
            if done < len {
                return Err(UffdError::Again { addr: dst, done });
            }
            Ok(len)
        })
    }
}

impl HostPages for FakeHost {
    fn copy_in(&self, dst: u64, src: &[u8], wp: bool) -> Result<u64, UffdError> {
        let len = src.len() as u64;
        self.fill("UFFDIO_COPY", dst, len, wp, Call::Copy { dst, len, wp })
    }

    fn zero_in(&self, dst: u64, len: u64) -> Result<u64, UffdError> {
        self.fill("UFFDIO_ZEROP", dst, len, false, Call::Zero { dst, len })
    }

    fn continue_in(&self, dst: u64, len: u64, wp: bool) -> Result<u64, UffdError> {
        self.fill(
            "UFFDIO_CONTINUE",
            dst,
            len,
            wp,
            Call::Continue { dst, len, wp },
        )
    }

    fn wake_waiters(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.with(|p| p.calls.push(Call::Wake { start, len }));
        Ok(())
    }

    fn set_write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        self.with(|p| {
            p.calls.push(Call::Protect {
                start,
                len,
                protect,
            });
            if p.remove_pending {
                return Err(UffdError::Again {
                    addr: start,
                    done: 0,
                });
            }
            for a in (start..start + len).step_by(P as usize) {
                if protect {
                    p.protected.insert(a);
                } else {
                    p.protected.remove(&a);
                }
            }
            Ok(())
        })
    }

    fn resident(&self, start: u64, pages: &mut [u8]) -> io::Result<()> {
        self.with(|p| {
            for (i, b) in pages.iter_mut().enumerate() {
                *b = p.resident.contains(&(start + i as u64 * P)) as u8;
            }
        });
        Ok(())
    }

    fn drop_pages(&self, start: u64, len: u64) -> io::Result<()> {
        self.with(|p| {
            p.calls.push(Call::Drop { start, len });
            for a in (start..start + len).step_by(P as usize) {
                p.resident.remove(&a);
                p.protected.remove(&a);
            }
        });
        if let Some(f) = self.during_drop.lock().unwrap().take() {
            f();
        }
        Ok(())
    }

    fn punch_hole(&self, _file: &File, offset: u64, len: u64) -> io::Result<()> {
        self.with(|p| p.calls.push(Call::Punch { offset, len }));
        Ok(())
    }
}

/// Host address of guest RAM in the rigs (never dereferenced).
pub(super) const HOST: u64 = 0x10_0000_0000;

/// The wake of the threads waiting on guest RAM `[gpa, gpa+len)` of a rig.
pub(super) fn wake(gpa: u64, len: u64) -> Call {
    Call::Wake {
        start: HOST + gpa,
        len,
    }
}

/// A pager's shared state over one fake RAM region at GPA 0, and one handler's decisions.
pub(super) struct Rig {
    pub(super) host: std::sync::Arc<FakeHost>,
    pub(super) handler: super::events::Handler,
}

impl Rig {
    /// 8 pages of 4 KiB, no write tracking, no fault-around.
    pub(super) fn small() -> Rig {
        Rig::new(8, stage2::PageSize::Size4K, false, 1)
    }

    /// `pages` host pages of `page` bytes; write tracking as `tracking`; fault-around of
    /// `around` 4 KiB pages.
    pub(super) fn new(pages: u64, page: stage2::PageSize, tracking: bool, around: usize) -> Rig {
        let host = std::sync::Arc::new(FakeHost::default());
        let region = crate::memory::RamRegion {
            gpa: 0,
            len: pages * page.bytes(),
            host_addr: HOST,
        };
        let cfg = super::PagerConfig {
            handlers: 1,
            write_tracking: tracking,
            fault_around_pages: around,
            vcpus: 1,
        };
        let sh = super::Shared::new(host.clone(), &[region], page, cfg, Vec::new()).unwrap();
        Rig {
            host,
            handler: super::events::Handler::new(std::sync::Arc::new(sh)),
        }
    }

    pub(super) fn sh(&self) -> &super::Shared {
        &self.handler.sh
    }

    /// A fault message from the guest at `gpa`, as a handler reads it.
    pub(super) fn fault(&mut self, gpa: u64, write: bool) {
        self.handler.on_event(crate::uffd::Event::Pagefault {
            addr: HOST + gpa,
            write,
            wp: false,
            minor: false,
            tid: 0,
        });
    }

    /// A write to a userfaultfd-write-protected page at `gpa`.
    pub(super) fn wp_fault(&mut self, gpa: u64) {
        self.handler.on_event(crate::uffd::Event::Pagefault {
            addr: HOST + gpa,
            write: true,
            wp: true,
            minor: false,
            tid: 0,
        });
    }

    /// Whether stage2 lets the guest do `access` at `gpa`.
    pub(super) fn maps(&self, gpa: u64, access: stage2::Access) -> bool {
        self.sh().s2.translate(gpa, access).is_ok()
    }

    pub(super) fn stats(&self) -> super::PagingStats {
        self.sh().stats()
    }
}
