//! virtio-net (virtio 1.2 §5.1) on a tap device: one receive and one transmit queue served on
//! the device's own thread, with no offloads (no checksum, segmentation or merged receive
//! buffers are offered, so every frame is a plain Ethernet frame of at most the tap's MTU).
//!
//! The tap is opened by the VMM with `IFF_TAP | IFF_NO_PI` and no `IFF_VNET_HDR`: the tap carries
//! bare frames, and the device strips the 12-byte `virtio_net_hdr_v1` the driver puts in front
//! of each frame it sends and writes one of its own (all zero but `num_buffers = 1`) in front
//! of each frame it receives. So the header a guest writes never reaches the host kernel: no
//! offload request (checksum start, GSO type and size) of an untrusted guest is acted on.
//!
//! Whatever a chain holds, the device neither panics nor writes outside guest RAM: a transmit
//! chain with a device-writable buffer, a buffer outside RAM, one that loops, or a frame too
//! short or too long is dropped (and its chain returned); a receive chain too small for the
//! frame, or with a buffer the device may not write, is returned with length 0 and the frame
//! dropped. Networks lose frames; the guest's TCP sends again.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use log::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::thread::DeviceThread;
use super::{
    drain, read_config_bytes, used_ring_range, ActivateError, GuestWrites, Interrupt, VirtioDevice,
    INT_VRING, TYPE_NET,
};

/// Each queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// The header in front of every frame: `virtio_net_hdr_v1` (with `num_buffers`, as
/// `VIRTIO_F_VERSION_1` has it).
pub const HDR_LEN: usize = 12;
/// The shortest frame the tap takes: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// The longest frame moved either way (a tap's MTU is at most 65535; without segmentation
/// offloads no frame is longer than the MTU and its Ethernet header).
pub const MAX_FRAME: usize = 65_550;
/// Frames one call of [`Server::process_rx`] or [`Server::process_tx`] moves at most, so that
/// the thread looks for a stop between batches.
pub const MAX_BATCH: usize = 256;
/// The receive queue's index.
pub const RX: usize = 0;
/// The transmit queue's index.
pub const TX: usize = 1;

/// `VIRTIO_NET_F_MAC`: the device has an address for the driver (in its configuration).
const F_MAC: u32 = 5;

/// A MAC address (serialized as text: `52:54:00:12:34:56`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("mac={s}: write six hex bytes with colons, e.g. 52:54:00:12:34:56");
        let mut b = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut b {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if b[0] & 1 != 0 {
            return Err(format!(
                "mac={s} is a multicast address (the first byte is odd): give a unicast one, \
                 e.g. 52:54:00:12:34:56"
            ));
        }
        if b == [0; 6] {
            return Err(format!("mac={s}: the zero address is no station's"));
        }
        Ok(Mac(b))
    }
}

/// `--net tap=NAME[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap device's name, in the VMM's network namespace.
    pub tap: String,
    /// The guest's address; without one the guest's driver makes up a random one.
    pub mac: Option<Mac>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "write tap=NAME[,mac=52:54:00:12:34:56]";
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) => {
                    // IFNAMSIZ - 1 bytes, and what `ip link` accepts.
                    if v.is_empty()
                        || v.len() >= libc::IFNAMSIZ
                        || v.contains(['/', ':'])
                        || v.chars().any(char::is_whitespace)
                        || v == "."
                        || v == ".."
                    {
                        return Err(format!(
                            "tap={v}: an interface name has 1-15 characters, none of them '/', \
                             ':' or a space"
                        ));
                    }
                    tap = Some(v.to_string());
                }
                Some(("mac", v)) => mac = Some(v.parse::<Mac>()?),
                _ => return Err(format!("{part:?} is not a network option: {usage}")),
            }
        }
        let tap = tap.ok_or_else(|| format!("no tap=NAME: {usage}"))?;
        Ok(NetConfig { tap, mac })
    }
}

/// Why a tap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No interface has the name.
    #[error(
        "--net tap={0}: no network interface {0} in this network namespace; create it first \
         (as root: ip tuntap add dev {0} mode tap; ip link set {0} up)"
    )]
    NoSuchInterface(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("--net tap={tap}: cannot open /dev/net/tun: {source}{hint}")]
    Tun {
        /// The tap.
        tap: String,
        /// The error.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// `TUNSETIFF` refused the tap.
    #[error("--net tap={tap}: cannot attach to the tap: {source}{hint}")]
    Attach {
        /// The tap.
        tap: String,
        /// The error.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
}

/// Opens the tap `name` (which must exist) for frames without a packet-information or
/// virtio-net header, non-blocking.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    let c = CString::new(name).map_err(|_| NetError::NoSuchInterface(name.into()))?;
    // SAFETY: `c` is a NUL-terminated string that lives across the call.
    if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
        // Attaching would create a tap nobody configured: refused, so a typo shows.
        return Err(NetError::NoSuchInterface(name.into()));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|source| NetError::Tun {
            tap: name.into(),
            hint: match source.kind() {
                ErrorKind::NotFound => " (load the tun module: modprobe tun)",
                ErrorKind::PermissionDenied => " (run as a user who may open it, or as root)",
                _ => "",
            },
            source,
        })?;
    // SAFETY: `ifreq` is plain data (a name and a union of integers and addresses); zero is a
    // valid value of every field.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `ifr` is and which outlives the
    // call; the fd is the open /dev/net/tun.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc < 0 {
        let source = std::io::Error::last_os_error();
        return Err(NetError::Attach {
            tap: name.into(),
            hint: match source.raw_os_error() {
                Some(libc::EBUSY) => {
                    " (another process has it open: a tap without multi_queue has one reader)"
                }
                Some(libc::EINVAL) => {
                    " (it is not a tap: a tun, a multi_queue tap, or another kind of interface)"
                }
                Some(libc::EPERM) => {
                    " (this user may not use it: create it with `ip tuntap add dev NAME mode \
                     tap user USER`, or run as root)"
                }
                _ => "",
            },
            source,
        });
    }
    Ok(tun)
}

/// Frames and bytes moved and dropped, each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Their bytes (frames only, no header).
    pub rx_bytes: u64,
    /// Frames taken from the tap but not given to the guest (no room in the buffer, or a bad
    /// chain).
    pub rx_dropped: u64,
    /// Frames the guest sent that went to the tap.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames the guest sent that did not (a bad chain, a bad length, the tap refused it).
    pub tx_dropped: u64,
}

/// What one receive pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxPass {
    /// Frames given to the guest (or dropped on a bad chain).
    pub done: usize,
    /// The batch ended with frames perhaps still waiting.
    pub more: bool,
    /// A frame waits and the driver has no buffer for it: the thread stops reading the tap
    /// until the driver adds buffers (and notifies).
    pub starved: bool,
}

/// Moves frames between a tap (or any file that reads and writes whole frames, like a datagram
/// socket) and the device's queues.
pub struct Server {
    tap: File,
    /// A received frame after room for its header.
    rx: Vec<u8>,
    /// The frame's length when one was read and waits for a buffer (0: none).
    pending: usize,
    /// A transmitted chain, header included.
    tx: Vec<u8>,
    /// Reading the tap failed for good (it was deleted): it is not read again.
    tap_failed: bool,
    writes: GuestWrites,
    counters: Counters,
}

impl Server {
    /// A server of `tap` (non-blocking) that records the guest RAM it writes in `writes`.
    pub fn new(tap: File, writes: GuestWrites) -> Server {
        Server {
            tap,
            rx: vec![0; HDR_LEN + MAX_FRAME],
            pending: 0,
            tx: vec![0; HDR_LEN + MAX_FRAME],
            tap_failed: false,
            writes,
            counters: Counters::default(),
        }
    }

    /// What moved so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The tap's fd while it can be read (for the thread's poll).
    fn readable_fd(&self) -> Option<i32> {
        (!self.tap_failed).then(|| self.tap.as_raw_fd())
    }

    /// Sends the frames the driver made available on `queue` (the transmit queue) to the tap,
    /// at most [`MAX_BATCH`]; returns them all to the driver. (done, more waiting).
    pub fn process_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        interrupt: &Interrupt,
    ) -> (usize, bool) {
        let out = drain(mem, queue, interrupt, "virtio-net", MAX_BATCH, |chain| {
            match self.transmit(mem, chain) {
                Ok(()) => {}
                Err(why) => {
                    self.counters.tx_dropped += 1;
                    debug!("virtio-net: frame not sent: {why}");
                }
            }
            0
        });
        self.writes.record(&[used_ring_range(queue)]);
        out
    }

    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), String> {
        let mut len = 0usize;
        // The chain, cut by the crate at the queue's size (a loop ends there).
        for d in chain {
            if d.is_write_only() {
                return Err("a device-writable buffer in a transmit chain".into());
            }
            let n = d.len() as usize;
            let Some(buf) = self.tx.get_mut(len..len + n) else {
                return Err(format!("a chain longer than {} bytes", HDR_LEN + MAX_FRAME));
            };
            mem.read_slice(buf, d.addr())
                .map_err(|e| format!("buffer at {:#x}: {e}", d.addr().0))?;
            len += n;
        }
        if len < HDR_LEN + MIN_FRAME {
            return Err(format!(
                "{len} bytes is less than a header and an Ethernet header"
            ));
        }
        // The driver's header is not looked at: no offload was offered, so it asks for none.
        let frame = &self.tx[HDR_LEN..len];
        // A tap (like a datagram socket) takes a frame whole or not at all.
        match (&self.tap).write(frame) {
            Ok(n) if n != frame.len() => Err(format!("the tap took {n} of {} bytes", frame.len())),
            Ok(_) => {
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += frame.len() as u64;
                Ok(())
            }
            Err(e) => Err(format!("the tap refused it: {e}")),
        }
    }

    /// Gives frames waiting on the tap to the driver, one per buffer of `queue` (the receive
    /// queue), at most [`MAX_BATCH`]; interrupts the driver if it wants to hear of them.
    pub fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        interrupt: &Interrupt,
    ) -> RxPass {
        let mut pass = RxPass::default();
        let mut written: Vec<(u64, u64)> = Vec::new();
        loop {
            if self.pending == 0 && !self.read_frame() {
                break;
            }
            if pass.done == MAX_BATCH {
                pass.more = true;
                break;
            }
            let chain = match queue.pop_descriptor_chain(mem) {
                Some(c) => Some(c),
                // No buffer: the driver is asked to notify when it adds some, and a buffer
                // added in between is seen by the second look.
                None => match queue.enable_notification(mem) {
                    Ok(true) => queue.pop_descriptor_chain(mem),
                    _ => None,
                },
            };
            let Some(chain) = chain else {
                pass.starved = true;
                break;
            };
            let head = chain.head_index();
            let used = match self.deliver(mem, chain, &mut written) {
                Ok(n) => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += (n - HDR_LEN) as u64;
                    n as u32
                }
                Err(why) => {
                    self.counters.rx_dropped += 1;
                    debug!("virtio-net: frame dropped: {why}");
                    0
                }
            };
            self.pending = 0;
            if let Err(e) = queue.add_used(mem, head, used) {
                warn!("virtio-net: cannot put buffer {head} in the used ring: {e:?}");
            }
            pass.done += 1;
        }
        written.push(used_ring_range(queue));
        self.writes.record(&written);
        if pass.done > 0 && queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = interrupt.raise(INT_VRING) {
                warn!("virtio-net: cannot raise the interrupt: {e}");
            }
        }
        pass
    }

    /// Reads the next frame from the tap into `rx`: false when none waits.
    fn read_frame(&mut self) -> bool {
        while !self.tap_failed {
            match (&self.tap).read(&mut self.rx[HDR_LEN..]) {
                Ok(n) if n >= MIN_FRAME => {
                    self.pending = HDR_LEN + n;
                    return true;
                }
                Ok(0) => {
                    // A datagram socket's peer closed (a tap never reads 0).
                    warn!("virtio-net: the tap was closed; no more frames are received");
                    self.tap_failed = true;
                }
                Ok(n) => {
                    self.counters.rx_dropped += 1;
                    debug!("virtio-net: a {n}-byte frame from the tap dropped (runt)");
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("virtio-net: reading the tap failed ({e}); no more frames are received");
                    self.tap_failed = true;
                }
            }
        }
        false
    }

    /// Writes the pending frame, behind its header, into the chain's buffers: the bytes
    /// written.
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        written: &mut Vec<(u64, u64)>,
    ) -> Result<usize, String> {
        let descs: Vec<_> = chain.collect();
        if descs.iter().any(|d| !d.is_write_only()) {
            return Err("a device-readable buffer in a receive chain".into());
        }
        let room: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
        if room < self.pending as u64 {
            return Err(format!(
                "a {}-byte frame and its header do not fit the driver's {room}-byte buffer",
                self.pending - HDR_LEN
            ));
        }
        // Checked before any byte moves: a frame never lands half in RAM.
        let mut left = self.pending;
        for d in &descs {
            let n = left.min(d.len() as usize);
            if n > 0 && !mem.check_range(d.addr(), n, Permissions::Write) {
                return Err(format!(
                    "buffer {:#x}+{n:#x} is not all guest RAM",
                    d.addr().0
                ));
            }
            left -= n;
        }
        // virtio_net_hdr_v1: no checksum or GSO information, one buffer.
        self.rx[..HDR_LEN].fill(0);
        self.rx[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut at = 0;
        for d in &descs {
            let n = (self.pending - at).min(d.len() as usize);
            if n == 0 {
                break;
            }
            mem.write_slice(&self.rx[at..at + n], d.addr())
                .map_err(|e| format!("buffer at {:#x}: {e}", d.addr().0))?;
            written.push((d.addr().0, n as u64));
            at += n;
        }
        Ok(self.pending)
    }
}

/// The virtio-net device. Its thread is started with it and waits for the driver to start the
/// device.
pub struct Net {
    mac: Option<Mac>,
    thread: DeviceThread<Work>,
}

/// What the device's thread serves: both queues, with the memory, their events and the
/// interrupt.
struct Work {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    events: Vec<Arc<EventFd>>,
    interrupt: Arc<Interrupt>,
}

/// What a migration checks on the destination: the same address.
#[derive(serde::Serialize, serde::Deserialize)]
struct NetState {
    mac: Option<Mac>,
}

impl Net {
    /// A device on `tap` (from [`open_tap`], or a datagram socket in tests), offering `mac`,
    /// with its thread; the guest RAM it writes is recorded in `writes`.
    pub fn new(tap: File, mac: Option<Mac>, writes: GuestWrites) -> std::io::Result<Net> {
        let mut server = Server::new(tap, writes);
        let thread = DeviceThread::spawn(
            "virtio-net",
            crate::seccomp::ThreadKind::Net,
            move |mut w: Work, stop: &EventFd| {
                let mut starved = false;
                loop {
                    let (_, tx_more) = server.process_tx(&w.mem, &mut w.queues[TX], &w.interrupt);
                    let mut rx_more = false;
                    if !starved {
                        let pass = server.process_rx(&w.mem, &mut w.queues[RX], &w.interrupt);
                        starved = pass.starved;
                        rx_more = pass.more;
                    }
                    let tap = server.readable_fd().filter(|_| !starved);
                    match wait(&w.events, tap, stop, tx_more || rx_more) {
                        Woken::Stop => break,
                        Woken::Work { rx_buffers } => starved &= !rx_buffers,
                    }
                }
                debug!("virtio-net: stopped; {:?}", server.counters());
                w
            },
        )?;
        Ok(Net { mac, thread })
    }
}

/// Why the thread woke.
enum Woken {
    Stop,
    /// Something to do; `rx_buffers`: the driver notified the receive queue.
    Work {
        rx_buffers: bool,
    },
}

/// Waits for a queue's event, the tap (when given) or `stop`; with `busy`, only looks.
fn wait(events: &[Arc<EventFd>], tap: Option<i32>, stop: &EventFd, busy: bool) -> Woken {
    let fd = |fd: i32| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [
        fd(events[RX].as_raw_fd()),
        fd(events[TX].as_raw_fd()),
        // A negative fd is skipped by poll.
        fd(tap.unwrap_or(-1)),
        fd(stop.as_raw_fd()),
    ];
    loop {
        // SAFETY: four valid pollfds on the stack for the call; their fds are open while the
        // EventFds and the tap live, which outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 4, if busy { 0 } else { -1 }) };
        if n >= 0 {
            break;
        }
        if std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
            return Woken::Stop;
        }
    }
    if fds[3].revents != 0 {
        return Woken::Stop;
    }
    for (i, e) in events.iter().take(2).enumerate() {
        if fds[i].revents != 0 {
            let _ = e.read();
        }
    }
    Woken::Work {
        rx_buffers: fds[RX].revents != 0,
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        if self.mac.is_some() {
            1 << F_MAC
        } else {
            0
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac at 0 (with F_MAC); the rest of the layout is for features not offered.
        let config = self.mac.map(|m| m.0).unwrap_or_default();
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!("virtio-net: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        events: Vec<Arc<EventFd>>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        if events.len() != 2 {
            return Err(ActivateError::BadQueue(events.len()));
        }
        self.thread.start(Work {
            mem,
            queues,
            events,
            interrupt,
        })
    }

    fn reset(&mut self) {
        self.thread.reset();
    }

    fn pause(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        self.thread
            .pause()
            .map(|w| w.queues.iter().map(|q| q.state()).collect())
    }

    fn resume(&mut self) {
        self.thread.resume();
    }

    fn save(&self) -> Vec<u8> {
        postcard::to_stdvec(&NetState { mac: self.mac }).expect("the address always encodes")
    }

    fn restore(&mut self, blob: &[u8]) -> Result<(), String> {
        let st: NetState = postcard::from_bytes(blob)
            .map_err(|e| format!("the source's virtio-net state does not decode: {e}"))?;
        if st.mac != self.mac {
            let show =
                |m: Option<Mac>| m.map_or("none (the guest's own)".into(), |m| m.to_string());
            return Err(format!(
                "the source's network device has the address {}, the one here {}: give the \
                 destination the same mac=",
                show(st.mac),
                show(self.mac)
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    /// Where the tests' buffers are (the mock queues' rings are below 1 MiB).
    const BUF: u64 = 0x10_0000;
    const RAM: u64 = 2 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn irq() -> Interrupt {
        Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    /// A server on one end of a datagram socket pair (which reads and writes whole frames, as a
    /// tap does); the other end is the "network".
    fn server() -> (Server, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (
            Server::new(File::from(OwnedFd::from(a)), GuestWrites::default()),
            b,
        )
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn recv(net: &UnixDatagram) -> Option<Vec<u8>> {
        let mut b = vec![0u8; HDR_LEN + MAX_FRAME];
        match net.recv(&mut b) {
            Ok(n) => Some(b[..n].to_vec()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }

    fn read(m: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        m.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    }

    #[test]
    fn sent_frames_reach_the_tap_without_the_drivers_header() {
        let m = mem();
        let (mut s, net) = server();
        let q = MockSplitQueue::new(&m, 16);
        // A header and a 60-byte frame in one buffer; a 1514-byte frame over three buffers, the
        // first of them the header and a part of the frame.
        let (f1, f2) = (frame(60, 1), frame(1514, 2));
        let mut hdr = vec![0xffu8; HDR_LEN]; // a header asking for offloads: ignored
        hdr[0] = 1;
        let mut one = hdr.clone();
        one.extend_from_slice(&f1);
        m.write_slice(&one, GuestAddress(BUF)).unwrap();
        let mut two = hdr.clone();
        two.extend_from_slice(&f2);
        m.write_slice(&two[..100], GuestAddress(BUF + 0x1000))
            .unwrap();
        m.write_slice(&two[100..1000], GuestAddress(BUF + 0x3000))
            .unwrap();
        m.write_slice(&two[1000..], GuestAddress(BUF + 0x5000))
            .unwrap();
        q.add_desc_chains(
            &[
                desc(BUF, one.len() as u32, 0, 0),
                desc(BUF + 0x1000, 100, NEXT, 2),
                desc(BUF + 0x3000, 900, NEXT, 3),
                desc(BUF + 0x5000, (two.len() - 1000) as u32, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let i = irq();
        assert_eq!(s.process_tx(&m, &mut queue, &i), (2, false));
        assert_eq!(recv(&net).as_deref(), Some(&f1[..]));
        assert_eq!(recv(&net).as_deref(), Some(&f2[..]));
        assert_eq!(recv(&net), None);
        assert_eq!(q.used().idx().load(), 2);
        assert_eq!(i.status(), crate::virtio::INT_VRING);
        let c = s.counters();
        assert_eq!((c.tx_frames, c.tx_bytes, c.tx_dropped), (2, 1574, 0));
    }

    #[test]
    fn bad_transmit_chains_are_dropped_and_returned() {
        let m = mem();
        let (mut s, net) = server();
        let q = MockSplitQueue::new(&m, 16);
        m.write_slice(&frame(4096, 3), GuestAddress(BUF)).unwrap();
        q.add_desc_chains(
            &[
                // A device-writable buffer.
                desc(BUF, 100, WRITE, 0),
                // Outside guest RAM, and running off its end.
                desc(1 << 30, 100, 0, 0),
                desc(RAM - 50, 100, 0, 0),
                // A runt: a header and 10 bytes.
                desc(BUF, (HDR_LEN + 10) as u32, 0, 0),
                // Longer than any frame: 5 x 16 KiB.
                desc(BUF, 16 << 10, NEXT, 5),
                desc(BUF, 16 << 10, NEXT, 6),
                desc(BUF, 16 << 10, NEXT, 7),
                desc(BUF, 16 << 10, NEXT, 8),
                desc(BUF, 16 << 10, 0, 0),
                // A loop: 9 -> 10 -> 9.
                desc(BUF, 100, NEXT, 10),
                desc(BUF, 100, NEXT, 9),
            ],
            0,
        )
        .unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let (done, _) = s.process_tx(&m, &mut queue, &irq());
        assert_eq!(done, 6, "every chain is returned");
        assert_eq!(q.used().idx().load(), 6);
        // The loop is cut at the queue's size (16 x 100 bytes) and goes as a frame: what the
        // driver wrote, harmless. Nothing else reached the network.
        let looped = recv(&net).expect("the looped chain, cut");
        assert_eq!(looped.len(), 16 * 100 - HDR_LEN);
        assert_eq!(recv(&net), None);
        assert_eq!(s.counters().tx_dropped, 5);
    }

    #[test]
    fn received_frames_land_behind_a_header_with_one_buffer() {
        let m = mem();
        let (mut s, net) = server();
        let q = MockSplitQueue::new(&m, 16);
        // One buffer of 1526 bytes, then one chain of a header buffer and a frame buffer.
        q.add_desc_chains(
            &[
                desc(BUF, 1526, WRITE, 0),
                desc(BUF + 0x1000, HDR_LEN as u32, WRITE | NEXT, 2),
                desc(BUF + 0x2000, 1514, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let (f1, f2) = (frame(100, 4), frame(1514, 5));
        net.send(&f1).unwrap();
        net.send(&f2).unwrap();
        m.write_slice(&[0xee; HDR_LEN], GuestAddress(BUF)).unwrap();
        let i = irq();
        let pass = s.process_rx(&m, &mut queue, &i);
        assert_eq!(
            pass,
            RxPass {
                done: 2,
                more: false,
                starved: false
            }
        );
        let mut hdr = [0u8; HDR_LEN];
        hdr[10] = 1;
        assert_eq!(read(&m, BUF, HDR_LEN), hdr);
        assert_eq!(read(&m, BUF + HDR_LEN as u64, 100), f1);
        assert_eq!(read(&m, BUF + 0x1000, HDR_LEN), hdr);
        assert_eq!(read(&m, BUF + 0x2000, 1514), f2);
        let used = |k: u16| q.used().ring().ref_at(k as usize).unwrap().load();
        assert_eq!((used(0).id(), used(0).len()), (0, 112));
        assert_eq!((used(1).id(), used(1).len()), (1, 1526));
        assert_eq!(i.status(), crate::virtio::INT_VRING);
        assert_eq!(s.counters().rx_bytes, 1614);
    }

    #[test]
    fn a_frame_waits_for_a_buffer_and_bad_buffers_drop_only_their_frame() {
        let m = mem();
        let (mut s, net) = server();
        let q = MockSplitQueue::new(&m, 16);
        let mut queue: Queue = q.create_queue().unwrap();
        let i = irq();
        let f = frame(200, 6);
        net.send(&f).unwrap();
        // No buffer: the frame is held, and the driver will be asked for a notification.
        let pass = s.process_rx(&m, &mut queue, &i);
        assert!(pass.starved && pass.done == 0, "{pass:?}");
        m.write_slice(&[0x5a; 4096], GuestAddress(BUF)).unwrap();
        let untouched = |m: &GuestMemoryMmap| read(m, BUF, 4096).iter().all(|&b| b == 0x5a);
        // Then three bad buffers and a good one: too small for the held frame, readable by
        // the device only, partly past the end of RAM. Each drops a frame: the held one and the
        // first two of three more sent; the good buffer takes the third.
        for k in 0..3 {
            net.send(&frame(300, k)).unwrap();
        }
        q.add_desc_chains(
            &[
                desc(BUF, 100, WRITE, 0),
                desc(BUF, 4096, 0, 0),
                desc(RAM - 100, 4096, WRITE, 0),
                desc(BUF + 0x2000, 4096, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let pass = s.process_rx(&m, &mut queue, &i);
        assert_eq!(pass.done, 4, "{pass:?}");
        assert!(!pass.starved, "no frame waits: {pass:?}");
        assert!(untouched(&m), "a dropped frame writes nothing");
        assert_eq!(
            read(&m, RAM - 100, 100),
            vec![0; 100],
            "nothing written at the end of RAM"
        );
        let used = |k: usize| q.used().ring().ref_at(k).unwrap().load().len();
        assert_eq!([used(0), used(1), used(2)], [0, 0, 0]);
        // The good buffer took the third frame sent after the first (seed 2).
        assert_eq!(used(3), (HDR_LEN + 300) as u32);
        assert_eq!(read(&m, BUF + 0x2000 + HDR_LEN as u64, 300), frame(300, 2));
        assert_eq!(s.counters().rx_dropped, 3);
        // A frame with no buffer waits again; a buffer added later takes it.
        net.send(&frame(300, 9)).unwrap();
        let pass = s.process_rx(&m, &mut queue, &i);
        assert!(pass.starved && pass.done == 0, "{pass:?}");
        q.add_desc_chains(&[desc(BUF + 0x4000, 4096, WRITE, 0)], 4)
            .unwrap();
        let pass = s.process_rx(&m, &mut queue, &i);
        assert_eq!(pass.done, 1, "{pass:?}");
        assert_eq!(used(4), (HDR_LEN + 300) as u32);
        assert_eq!(read(&m, BUF + 0x4000 + HDR_LEN as u64, 300), frame(300, 9));
        assert_eq!(s.counters().rx_frames, 2);
    }

    #[test]
    fn the_device_thread_moves_frames_both_ways_and_pauses_with_its_queues() {
        let m = mem();
        let (a, net) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mac: Mac = "52:54:00:12:34:56".parse().unwrap();
        let mut dev = Net::new(
            File::from(OwnedFd::from(a)),
            Some(mac),
            GuestWrites::default(),
        )
        .unwrap();
        assert_eq!(dev.features(), 1 << F_MAC);
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 0]);
        let mocks: Vec<_> = (0..2)
            .map(|k| MockSplitQueue::create(&m, GuestAddress(k * 0x1_0000), 16))
            .collect();
        let events: Vec<_> = (0..2)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
            .collect();
        mocks[RX]
            .add_desc_chains(&[desc(BUF, 2048, WRITE, 0)], 0)
            .unwrap();
        let queues: Vec<Queue> = mocks.iter().map(|q| q.create_queue().unwrap()).collect();
        dev.activate(m.clone(), 0, queues, events.clone(), Arc::new(irq()))
            .unwrap();
        let wait = |what: &str, done: &dyn Fn() -> bool| {
            let t = Instant::now();
            while !done() {
                assert!(t.elapsed() < Duration::from_secs(10), "{what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        // From the network to the guest, with no notification: the tap woke the thread.
        let f = frame(64, 7);
        net.send(&f).unwrap();
        wait("the frame received", &|| mocks[RX].used().idx().load() == 1);
        assert_eq!(read(&m, BUF + HDR_LEN as u64, 64), f);
        // From the guest to the network, notified.
        let mut out = vec![0u8; HDR_LEN];
        out.extend_from_slice(&frame(80, 8));
        m.write_slice(&out, GuestAddress(BUF + 0x1000)).unwrap();
        mocks[TX]
            .add_desc_chains(&[desc(BUF + 0x1000, out.len() as u32, 0, 0)], 0)
            .unwrap();
        events[TX].write(1).unwrap();
        net.set_nonblocking(false).unwrap();
        net.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 256];
        let n = net.recv(&mut b).unwrap();
        assert_eq!(&b[..n], &out[HDR_LEN..]);
        wait("the frame returned", &|| mocks[TX].used().idx().load() == 1);
        // Paused: both queues' positions, and nothing moves.
        let states = dev.pause().expect("active");
        assert_eq!(states.len(), 2);
        assert_eq!(
            (states[RX].next_avail, states[TX].next_avail),
            (1, 1),
            "{states:?}"
        );
        mocks[RX]
            .add_desc_chains(&[desc(BUF + 0x2000, 2048, WRITE, 0)], 1)
            .unwrap();
        net.send(&f).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            mocks[RX].used().idx().load(),
            1,
            "a paused device moved a frame"
        );
        // Resumed, it takes the frame that waited.
        dev.resume();
        wait("the frame after the resume", &|| {
            mocks[RX].used().idx().load() == 2
        });
        // The state names the address; another address is refused.
        let blob = dev.save();
        assert!(dev.restore(&blob).is_ok());
        let (c, _) = UnixDatagram::pair().unwrap();
        let mut other =
            Net::new(File::from(OwnedFd::from(c)), None, GuestWrites::default()).unwrap();
        let err = other.restore(&blob).unwrap_err();
        assert!(err.contains("52:54:00:12:34:56"), "{err}");
        dev.reset();
    }

    #[test]
    fn net_options_and_addresses_parse_or_say_what_to_write() {
        let c: NetConfig = "tap=vmtap0,mac=52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(c.tap, "vmtap0");
        assert_eq!(c.mac.unwrap().to_string(), "52:54:00:ab:cd:ef");
        assert_eq!("tap=t".parse::<NetConfig>().unwrap().mac, None);
        for (bad, says) in [
            ("mac=52:54:00:ab:cd:ef", "no tap=NAME"),
            ("tap=", "1-15 characters"),
            ("tap=a-name-longer-than-15", "1-15 characters"),
            ("tap=a/b", "1-15 characters"),
            ("tap=t,mac=52:54:00:ab:cd", "six hex bytes"),
            ("tap=t,mac=52:54:00:ab:cd:ef:01", "six hex bytes"),
            ("tap=t,mac=5:54:00:ab:cd:ef", "six hex bytes"),
            ("tap=t,mac=zz:54:00:ab:cd:ef", "six hex bytes"),
            ("tap=t,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=t,mac=00:00:00:00:00:00", "zero address"),
            ("tap=t,queues=2", "not a network option"),
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_missing_interface_or_one_that_is_no_tap_is_refused_with_what_to_do() {
        let e = open_tap("vmm-no-such0").unwrap_err();
        assert!(matches!(e, NetError::NoSuchInterface(_)), "{e}");
        assert!(
            e.to_string()
                .contains("ip tuntap add dev vmm-no-such0 mode tap"),
            "{e}"
        );
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped the loopback case: no /dev/net/tun here");
            return;
        }
        // The loopback interface exists in every network namespace and is no tap.
        match open_tap("lo") {
            Err(NetError::Attach { source, hint, .. }) => {
                assert!(
                    source.raw_os_error() == Some(libc::EINVAL) && hint.contains("not a tap")
                        || source.raw_os_error() == Some(libc::EPERM),
                    "{source}{hint}"
                );
            }
            Err(e) => panic!("lo: {e}"),
            Ok(_) => panic!("lo was taken for a tap"),
        }
    }
}
