//! `virtio_balloon`: a split virtqueue laid out by the input in a small guest memory (as in
//! [`crate::virtio_blk`]), served as one of the balloon's queues by its server
//! (`vmm::virtio::balloon::Server`, what the device thread runs on a notification).
//!
//! Input: byte 0 holds flags (bits 0-1: the queue, 0 inflate, 1 deflate, 2 statistics, 3 free
//! page reports; bit 3: `VIRTIO_F_EVENT_IDX`; bit 4: the backing has 2 MiB pages instead of
//! 4 KiB); bytes 1-2 the queue size; the rest is guest memory from address 0,
//! with the rings at the fixed addresses of `virtio_blk`. The guest names pages by number and
//! ranges by address, so any number reaches the drop path: a finding is a panic, or a drop that
//! is empty, not whole backing pages, or past 2^64.

use std::sync::{Arc, Mutex};

use vmm::virtio::balloon::{Balloon, BalloonHandle, Server};
use vmm::virtio::Interrupt;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio_blk::fixed_queue;

/// Flag bits of byte 0.
pub const Q_MASK: u8 = 3;
/// The backing has 2 MiB pages.
pub const F_HUGE: u8 = 16;
/// `VIRTIO_F_EVENT_IDX`.
pub const F_EVENT_IDX: u8 = 8;

/// The drops the balloon's server asked for.
type DropLog = Arc<Mutex<Vec<(u64, u64)>>>;

thread_local! {
    /// One balloon per fuzzing process (its device thread idles): the handle, the drops its
    /// server asked for, and the backing page size they were asked on.
    static BALLOON: (Balloon, BalloonHandle, DropLog) = {
        let (dev, handle) = Balloon::new(Default::default()).expect("a balloon");
        (dev, handle, Arc::new(Mutex::new(Vec::new())))
    };
}

/// The target's body.
pub fn run(data: &[u8]) {
    let _ = serve(data);
}

/// Runs `data` as [`run`] does: the drops the server asked for and the balloon's figures, or
/// `None` for an input too short or a queue the transport would refuse.
pub fn serve(data: &[u8]) -> Option<(Vec<(u64, u64)>, serde_json::Value)> {
    let (flags, _, mem, mut queue) = fixed_queue(crate::capped(data), |f| f & F_EVENT_IDX != 0)?;
    let page: u64 = if flags & F_HUGE != 0 { 2 << 20 } else { 4096 };
    Some(BALLOON.with(|(_dev, handle, log)| {
        log.lock().unwrap().clear();
        let l = log.clone();
        handle.set_drop_range(
            Arc::new(move |gpa, len| {
                l.lock().unwrap().push((gpa, len));
                Ok(())
            }),
            page,
        );
        let mut server = Server::of(handle);
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        match flags & Q_MASK {
            0 | 1 => {
                server.process_pfns(&mem, &mut queue, &irq, flags & Q_MASK == 1);
            }
            2 => {
                server.process_stats(&mem, &mut queue);
                server.request_stats(&mem, &mut queue, &irq);
            }
            _ => {
                server.process_reports(&mem, &mut queue, &irq);
            }
        }
        let info = handle.info(None);
        // The drop function is kept from the first run (it logs into the same list every
        // time); the page size is this run's.
        for &(gpa, len) in log.lock().unwrap().iter() {
            assert!(len > 0, "an empty drop at {gpa:#x}");
            assert!(
                gpa.checked_add(len).is_some(),
                "a drop past 2^64: {gpa:#x}+{len:#x}"
            );
            assert_eq!(gpa % page, 0, "a drop not aligned to {page:#x}: {gpa:#x}");
            assert_eq!(
                len % page,
                0,
                "a drop not whole pages of {page:#x}: {len:#x}"
            );
        }
        (log.lock().unwrap().clone(), info)
    }))
}
