//! `virtio_net`: a split virtqueue laid out by the input in a small guest memory (as in
//! [`crate::virtio_blk`]), served as the network device's receive or transmit queue by its
//! server (`vmm::virtio::net::Server`, what the device thread runs), with a datagram socket
//! pair standing in for the tap.
//!
//! Input: byte 0 holds flags (bit 0: the receive queue, else the transmit queue; bit 1:
//! `VIRTIO_F_EVENT_IDX`); bytes 1-2 the queue size; the rest is guest memory from address 0,
//! with the rings at the fixed addresses of `virtio_blk`. For the receive queue the "network"
//! first sends [`RX_FRAMES`] (a runt among them). A finding is a panic, a frame on the network
//! shorter or longer than a frame can be, a frame given to the guest that differs from the one
//! sent, or a batch past its bound.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use vm_memory::{Bytes, GuestAddress};
use vmm::virtio::net::{Counters, Server, HDR_LEN, MAX_BATCH, MAX_FRAME, MIN_FRAME};
use vmm::virtio::Interrupt;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio_blk::{fixed_queue, DESC_TABLE, USED_RING};

/// Flag bits of byte 0: the receive queue.
pub const F_RX: u8 = 1;
/// `VIRTIO_F_EVENT_IDX`.
pub const F_EVENT_IDX: u8 = 2;
/// The frames the network sends before a receive pass (lengths; a runt first).
pub const RX_FRAMES: [usize; 4] = [10, 60, 1514, 9000];

/// Frame `k` of [`RX_FRAMES`]: its bytes.
pub fn rx_frame(k: usize) -> Vec<u8> {
    (0..RX_FRAMES[k])
        .map(|i| (i as u8).wrapping_mul(13) ^ (k as u8))
        .collect()
}

/// The target's body.
pub fn run(data: &[u8]) {
    let _ = serve(data);
}

/// Runs `data` as [`run`] does: the frames that reached the network and the server's
/// counters, or `None` for an input too short or a queue the transport would refuse.
pub fn serve(data: &[u8]) -> Option<(Vec<Vec<u8>>, Counters)> {
    let (flags, image, mem, mut queue) =
        fixed_queue(crate::capped(data), |f| f & F_EVENT_IDX != 0)?;
    let (tap, net) = UnixDatagram::pair().expect("a socket pair");
    tap.set_nonblocking(true).expect("non-blocking");
    net.set_nonblocking(true).expect("non-blocking");
    let mut server = Server::new(File::from(OwnedFd::from(tap)), Default::default());
    let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    if flags & F_RX != 0 {
        for k in 0..RX_FRAMES.len() {
            net.send(&rx_frame(k)).expect("the network sends");
        }
        // The used ring says which buffer got which frame: check each against the frame.
        let before = used_idx(&mem);
        let pass = server.process_rx(&mem, &mut queue, &irq);
        assert!(pass.done <= MAX_BATCH, "{} frames in one pass", pass.done);
        let c = server.counters();
        assert!(
            c.rx_frames + c.rx_dropped <= RX_FRAMES.len() as u64,
            "more frames than were sent: {c:?}"
        );
        check_received(&mem, image, before, pass.done);
    } else {
        let (done, more) = server.process_tx(&mem, &mut queue, &irq);
        assert!(done <= MAX_BATCH, "{done} frames in one batch");
        assert!(!more || done == MAX_BATCH, "a batch of {done} ended early");
    }
    let mut frames = Vec::new();
    let mut buf = vec![0u8; HDR_LEN + MAX_FRAME + 1];
    while let Ok(n) = net.recv(&mut buf) {
        assert!(
            (MIN_FRAME..=MAX_FRAME).contains(&n),
            "a {n}-byte frame reached the network"
        );
        frames.push(buf[..n].to_vec());
    }
    Some((frames, server.counters()))
}

fn used_idx(mem: &vm_memory::GuestMemoryMmap) -> u16 {
    mem.read_obj::<u16>(GuestAddress(USED_RING + 2))
        .expect("the used ring is in RAM")
}

/// The last buffer returned with a length holds a header (one buffer, no offloads) and a
/// frame the network sent, whole. (Only the last: the guest may point several buffers at the
/// same bytes, and a later frame overwrites an earlier one.) Checked when its chain is one
/// descriptor clear of the rings (which the device writes after the frame), as the input
/// wrote it.
fn check_received(mem: &vm_memory::GuestMemoryMmap, input: &[u8], before: u16, done: usize) {
    let rings_end = USED_RING + 6 + 8 * 256;
    for k in (0..done as u16).rev() {
        let slot = USED_RING + 4 + 8 * u64::from(before.wrapping_add(k) % 256);
        let id: u32 = mem
            .read_obj(GuestAddress(slot))
            .expect("the used ring is in RAM");
        let len: u32 = mem
            .read_obj(GuestAddress(slot + 4))
            .expect("the used ring is in RAM");
        if len == 0 {
            continue;
        }
        let d = DESC_TABLE + 16 * u64::from(id % 256);
        // An earlier frame may have landed on the descriptor: then it says nothing.
        let mut now = [0u8; 16];
        mem.read_slice(&mut now, GuestAddress(d))
            .expect("the table is in RAM");
        let was: Vec<u8> = (d..d + 16)
            .map(|i| input.get(i as usize).copied().unwrap_or(0))
            .collect();
        if now[..] != was[..] {
            return;
        }
        let addr: u64 = mem.read_obj(GuestAddress(d)).unwrap_or(0);
        let dlen: u32 = mem.read_obj(GuestAddress(d + 8)).unwrap_or(0);
        let dflags: u16 = mem.read_obj(GuestAddress(d + 12)).unwrap_or(0);
        if dflags & 1 != 0 || dlen < len || addr < rings_end {
            return;
        }
        let mut got = vec![0u8; len as usize];
        mem.read_slice(&mut got, GuestAddress(addr))
            .expect("a returned buffer is in RAM");
        assert!(len as usize > HDR_LEN, "a returned frame of {len} bytes");
        assert_eq!(&got[..10], &[0; 10], "the header asks for no offload");
        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "one buffer");
        let frame = &got[HDR_LEN..];
        assert!(
            (1..RX_FRAMES.len()).any(|f| rx_frame(f) == frame),
            "buffer {id} holds no frame the network sent"
        );
        return;
    }
}
