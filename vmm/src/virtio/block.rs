//! virtio-blk (virtio 1.2 §5.2) on a raw image file: read, write, flush and get-id, one
//! request queue served on the device's own thread.
//!
//! A request is a descriptor chain: a 16-byte header the driver wrote (type, sector), the data
//! buffers, and a last, device-writable byte for the status. Whatever the chain, the answer is
//! a status (or, with no place to put one, a used entry of length 0): a buffer outside guest
//! RAM, a chain that loops or never ends, a header too short, data in the wrong direction or
//! past the end of the disk each give `IOERR`, never a panic, and nothing is written outside
//! guest RAM (every guest access goes through `GuestMemory`, which checks it). Data moves
//! through a bounce buffer of at most [`CHUNK`] bytes, so a request's size never decides how
//! much host memory it takes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use log::{debug, warn};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions,
};
use vmm_sys_util::eventfd::EventFd;

use super::thread::DeviceThread;
use super::{
    drain, read_config_bytes, used_ring_range, writable_ranges, ActivateError, GuestWrites,
    Interrupt, VirtioDevice, TYPE_BLOCK,
};

/// Bytes per sector: the unit of `capacity` and of a request's `sector`.
pub const SECTOR: u64 = 512;
/// The request queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// The most data moved per read or write call.
pub const CHUNK: usize = 64 << 10;
/// Requests one call of [`Server::process_queue`] carries out at most before it returns, so that
/// the device thread looks for a stop between batches. (A driver can keep a ring busy for long:
/// the device's own used-ring writes may land on the available ring's index, so one
/// notification may offer thousands of requests.)
pub const MAX_BATCH: usize = 1024;
/// Length of the id `GET_ID` returns (virtio 1.2 §5.2.6).
pub const ID_BYTES: usize = 20;

/// Feature bits (virtio 1.2 §5.2.3).
const F_RO: u32 = 5;
const F_FLUSH: u32 = 9;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Status values.
pub const S_OK: u8 = 0;
/// The request failed.
pub const S_IOERR: u8 = 1;
/// The device does not know the request.
pub const S_UNSUPP: u8 = 2;

/// The header the driver writes first.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct Header {
    kind: u32,
    _reserved: u32,
    sector: u64,
}

// SAFETY: plain integers, no padding (4 + 4 + 8 bytes), any bit pattern is valid.
unsafe impl ByteValued for Header {}

/// `--disk path=FILE[,readonly=on][,direct=on]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image.
    pub path: PathBuf,
    /// The guest may only read it (`VIRTIO_BLK_F_RO`; writes fail).
    pub readonly: bool,
    /// Open it with `O_DIRECT` (no host page cache).
    pub direct: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = None;
        let mut readonly = false;
        let mut direct = false;
        let on_off = |k: &str, v: &str| match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(format!("{k}={v}: give {k}=on or {k}=off")),
        };
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                Some(("readonly", v)) => readonly = on_off("readonly", v)?,
                Some(("direct", v)) => direct = on_off("direct", v)?,
                _ => {
                    return Err(format!(
                        "{part:?} is not a disk option: write path=FILE[,readonly=on][,direct=on]"
                    ))
                }
            }
        }
        let path = path.ok_or("no path=FILE: write path=FILE[,readonly=on][,direct=on]")?;
        Ok(DiskConfig {
            path,
            readonly,
            direct,
        })
    }
}

/// Why a disk cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Opening it failed.
    #[error("--disk {path}: {source}{hint}")]
    Open {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// It is not a regular file or block device.
    #[error("--disk {0}: not a regular file or block device; give a raw disk image")]
    NotAFile(String),
    /// Its size is not whole sectors.
    #[error("--disk {path}: {size} bytes is not a whole number of 512-byte sectors; resize it (truncate -s)")]
    Size {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
    },
}

/// The backing file of a block device.
#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
    readonly: bool,
    direct: bool,
    id: [u8; ID_BYTES],
}

impl Disk {
    /// Opens the image `cfg` names.
    pub fn open(cfg: &DiskConfig) -> Result<Disk, DiskError> {
        let name = cfg.path.display().to_string();
        let mut opts = OpenOptions::new();
        opts.read(true).write(!cfg.readonly);
        if cfg.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&cfg.path).map_err(|source| DiskError::Open {
            path: name.clone(),
            hint: match source.kind() {
                std::io::ErrorKind::NotFound => " (create it first, e.g. truncate -s 64M FILE)",
                std::io::ErrorKind::PermissionDenied if !cfg.readonly => {
                    " (add readonly=on for an image this user may only read)"
                }
                std::io::ErrorKind::InvalidInput if cfg.direct => {
                    " (its file system has no O_DIRECT: drop direct=on)"
                }
                _ => "",
            },
            source,
        })?;
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: name.clone(),
            source,
            hint: "",
        })?;
        use std::os::unix::fs::FileTypeExt;
        let size = if meta.file_type().is_block_device() {
            use std::io::Seek;
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(|source| DiskError::Open {
                    path: name.clone(),
                    source,
                    hint: "",
                })?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(DiskError::NotAFile(name));
        };
        if !size.is_multiple_of(SECTOR) {
            return Err(DiskError::Size { path: name, size });
        }
        let mut id = [0u8; ID_BYTES];
        // The image's file name, as much as fits (the guest's /sys/block/vda/serial).
        let base = cfg
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = base.len().min(ID_BYTES);
        id[..n].copy_from_slice(&base.as_bytes()[..n]);
        Ok(Disk {
            file,
            sectors: size / SECTOR,
            readonly: cfg.readonly,
            direct: cfg.direct,
            id,
        })
    }

    /// Its size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }
}

/// A page-aligned bounce buffer (`O_DIRECT` needs aligned memory).
#[repr(C, align(4096))]
struct Page([u8; 4096]);

struct Bounce(Vec<Page>);

impl Bounce {
    fn new() -> Bounce {
        Bounce((0..CHUNK / 4096).map(|_| Page([0; 4096])).collect())
    }

    fn bytes(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: the pages are contiguous in the Vec, `repr(C)` byte arrays with no padding,
        // and `len` is at most CHUNK (the callers cut to it), the Vec's total size.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len.min(CHUNK)) }
    }
}

/// Why a request failed (logged at debug level; the guest gets the status).
#[derive(Debug)]
enum Failed {
    /// Status `IOERR` with this reason.
    Io(String),
    /// Status `UNSUPP`.
    Unsupported(u32),
}

/// Serves requests on `disk`.
pub struct Server {
    disk: Disk,
    bounce: Bounce,
    writes: GuestWrites,
}

impl Server {
    /// A server of `disk`.
    pub fn new(disk: Disk) -> Server {
        Server::recording(disk, GuestWrites::default())
    }

    /// A server of `disk` that records the guest RAM it writes in `writes`.
    pub fn recording(disk: Disk, writes: GuestWrites) -> Server {
        Server {
            disk,
            bounce: Bounce::new(),
            writes,
        }
    }

    /// Takes the available requests of `queue`, at most [`MAX_BATCH`], carries them out, and
    /// puts them in the used ring; raises `interrupt` when the driver wants to hear of it.
    /// Returns the requests done and whether the batch ended with requests still waiting (the
    /// caller serves them after looking for a stop).
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        interrupt: &Interrupt,
    ) -> (usize, bool) {
        // What this batch writes of guest RAM: the requests' writable buffers (read data,
        // status, ID) and the used ring (also when nothing was done: its flags changed with
        // the notifications), recorded for a running migration.
        let mut written: Vec<(u64, u64)> = Vec::new();
        let out = drain(mem, queue, interrupt, "virtio-blk", MAX_BATCH, |chain| {
            written.extend(writable_ranges(&chain));
            self.execute(mem, chain)
        });
        written.push(used_ring_range(queue));
        self.writes.record(&written);
        out
    }

    /// Carries out one request; the bytes written into the chain's device-writable buffers
    /// (data and status), for the used ring.
    pub fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        // The chain, cut by the crate at the queue's size (a loop ends there) and at 4 GiB.
        let descs: Vec<_> = chain.collect();
        let Some(last) = descs.last() else {
            debug!("virtio-blk: a request with no descriptor");
            return 0;
        };
        let status_at = if last.is_write_only() && last.len() >= 1 {
            Some(last.addr())
        } else {
            None
        };
        let (status, written) = match self.request(mem, &descs, status_at.is_some()) {
            Ok(written) => (S_OK, written),
            Err(Failed::Unsupported(kind)) => {
                debug!("virtio-blk: request type {kind} is not supported");
                (S_UNSUPP, 0)
            }
            Err(Failed::Io(why)) => {
                debug!("virtio-blk: request failed: {why}");
                (S_IOERR, 0)
            }
        };
        match status_at {
            Some(at) if mem.write_obj(status, at).is_ok() => written + 1,
            _ => {
                debug!("virtio-blk: a request with no status byte in guest RAM");
                0
            }
        }
    }

    fn request(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: &[virtio_queue::desc::split::Descriptor],
        has_status: bool,
    ) -> Result<u32, Failed> {
        if !has_status {
            return Err(Failed::Io(
                "the last descriptor is no writable status byte".into(),
            ));
        }
        let head = &descs[0];
        if head.is_write_only() || (head.len() as usize) < std::mem::size_of::<Header>() {
            return Err(Failed::Io(
                "the first descriptor is no readable 16-byte header".into(),
            ));
        }
        let hdr: Header = mem
            .read_obj(head.addr())
            .map_err(|e| Failed::Io(format!("header at {:#x}: {e}", head.addr().0)))?;
        let data = &descs[1..descs.len() - 1];
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        match hdr.kind {
            T_IN | T_OUT => {
                let write = hdr.kind == T_OUT;
                if write && self.disk.readonly {
                    return Err(Failed::Io("a write to a read-only disk".into()));
                }
                if data.iter().any(|d| d.is_write_only() == write) {
                    return Err(Failed::Io("a data buffer in the wrong direction".into()));
                }
                if !total.is_multiple_of(SECTOR) {
                    return Err(Failed::Io(format!("{total} bytes is not whole sectors")));
                }
                let end = hdr
                    .sector
                    .checked_mul(SECTOR)
                    .and_then(|o| o.checked_add(total));
                if end.is_none_or(|e| e > self.disk.sectors * SECTOR) {
                    return Err(Failed::Io(format!(
                        "sectors {}+{} past the end of the disk ({} sectors)",
                        hdr.sector,
                        total / SECTOR,
                        self.disk.sectors
                    )));
                }
                let mut offset = hdr.sector * SECTOR;
                for d in data {
                    self.transfer(mem, d.addr(), d.len() as u64, offset, write)?;
                    offset += u64::from(d.len());
                }
                Ok(if write { 0 } else { total as u32 })
            }
            T_FLUSH => {
                if !self.disk.readonly {
                    self.disk
                        .file
                        .sync_data()
                        .map_err(|e| Failed::Io(format!("flush: {e}")))?;
                }
                Ok(0)
            }
            T_GET_ID => {
                let Some(d) = data.first().filter(|d| d.is_write_only()) else {
                    return Err(Failed::Io("get-id without a writable buffer".into()));
                };
                let n = (d.len() as usize).min(ID_BYTES);
                mem.write_slice(&self.disk.id[..n], d.addr())
                    .map_err(|e| Failed::Io(format!("get-id buffer: {e}")))?;
                Ok(n as u32)
            }
            other => Err(Failed::Unsupported(other)),
        }
    }

    /// Moves `len` bytes between guest RAM at `gpa` and the disk at `offset`, a chunk at a time.
    fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        gpa: GuestAddress,
        len: u64,
        offset: u64,
        write: bool,
    ) -> Result<(), Failed> {
        // Checked up front for the whole buffer: nothing moves for a buffer that would only
        // fail half way.
        // The device reads guest RAM for a write to the disk, and writes it for a read.
        let access = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        if len > 0 && !mem.check_range(gpa, len as usize, access) {
            return Err(Failed::Io(format!(
                "buffer {:#x}+{len:#x} is not all guest RAM",
                gpa.0
            )));
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let at = gpa
                .checked_add(done)
                .ok_or_else(|| Failed::Io("a buffer past the end of the address space".into()))?;
            let buf = self.bounce.bytes(n);
            if write {
                mem.read_slice(buf, at)
                    .map_err(|e| Failed::Io(format!("data at {:#x}: {e}", at.0)))?;
                self.disk
                    .file
                    .write_all_at(buf, offset + done)
                    .map_err(|e| Failed::Io(format!("writing the disk: {e}")))?;
            } else {
                self.disk
                    .file
                    .read_exact_at(buf, offset + done)
                    .map_err(|e| Failed::Io(format!("reading the disk: {e}")))?;
                mem.write_slice(buf, at)
                    .map_err(|e| Failed::Io(format!("data at {:#x}: {e}", at.0)))?;
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// The virtio-blk device. Its thread is started with it and waits for the driver to start
/// the device.
pub struct Block {
    sectors: u64,
    readonly: bool,
    thread: DeviceThread<Work>,
}

/// What the device's thread serves: the request queue, with the memory, the queue's event and
/// the interrupt.
struct Work {
    mem: GuestMemoryMmap,
    queue: Queue,
    event: Arc<EventFd>,
    interrupt: Arc<Interrupt>,
}

/// What a migration checks of the disk on the destination: the same size and mode.
#[derive(serde::Serialize, serde::Deserialize)]
struct BlockState {
    sectors: u64,
    readonly: bool,
}

impl Block {
    /// A device for `disk`, with its thread; the guest RAM it writes is recorded in `writes`.
    pub fn new(disk: Disk, writes: GuestWrites) -> std::io::Result<Block> {
        let (sectors, readonly, direct) = (disk.sectors, disk.readonly, disk.direct);
        let mut server = Server::recording(disk, writes);
        let thread = DeviceThread::spawn(
            "virtio-blk",
            crate::seccomp::ThreadKind::Block,
            move |mut w: Work, stop: &EventFd| {
                debug!("virtio-blk: serving {sectors} sectors (O_DIRECT {direct})");
                // Requests the driver queued before it notified are served at once. A batch
                // that ends with requests waiting signals the event again, so the next one
                // starts after a look at `stop`.
                let serve = |server: &mut Server, w: &mut Work| {
                    if server.process_queue(&w.mem, &mut w.queue, &w.interrupt).1 {
                        let _ = w.event.write(1);
                    }
                };
                serve(&mut server, &mut w);
                while wait(&w.event, stop) {
                    serve(&mut server, &mut w);
                }
                // Every request taken is done; its writes go to the file's storage before
                // the queue is given back (a migration's destination opens the file next).
                if !server.disk.readonly {
                    if let Err(e) = server.disk.file.sync_data() {
                        warn!("virtio-blk: flushing the disk on stop: {e}");
                    }
                }
                w
            },
        )?;
        Ok(Block {
            sectors,
            readonly,
            thread,
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << F_FLUSH;
        if self.readonly {
            f |= 1 << F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (le64) at 0; the rest of the layout is for features not offered.
        let config = self.sectors.to_le_bytes();
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!("virtio-blk: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        mut queues: Vec<Queue>,
        events: Vec<Arc<EventFd>>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queue = queues.pop().ok_or(ActivateError::BadQueue(0))?;
        let event = events.first().cloned().ok_or(ActivateError::BadQueue(0))?;
        self.thread.start(Work {
            mem,
            queue,
            event,
            interrupt,
        })
    }

    fn reset(&mut self) {
        self.thread.reset();
    }

    fn pause(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        self.thread.pause().map(|w| vec![w.queue.state()])
    }

    fn resume(&mut self) {
        self.thread.resume();
    }

    fn save(&self) -> Vec<u8> {
        postcard::to_stdvec(&BlockState {
            sectors: self.sectors,
            readonly: self.readonly,
        })
        .expect("the disk's state always encodes")
    }

    fn restore(&mut self, blob: &[u8]) -> Result<(), String> {
        let st: BlockState = postcard::from_bytes(blob)
            .map_err(|e| format!("the source's virtio-blk state does not decode: {e}"))?;
        if st.sectors != self.sectors || st.readonly != self.readonly {
            return Err(format!(
                "the source's disk has {} sectors{}, the one here {} sectors{}: give the \
                 destination the same image",
                st.sectors,
                if st.readonly { ", read-only" } else { "" },
                self.sectors,
                if self.readonly { ", read-only" } else { "" },
            ));
        }
        Ok(())
    }
}

/// Waits for `event` (true, with it consumed) or `stop` (false).
fn wait(event: &EventFd, stop: &EventFd) -> bool {
    use std::os::fd::AsRawFd;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds on the stack for the call; both fds are open while the
        // EventFds live, which outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            let _ = event.read();
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::INT_VRING;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    /// Where the tests' buffers are (the mock queue's rings are below 1 MiB).
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x10_1000;
    const STATUS: u64 = 0x11_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn image(tag: &str, sectors: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vblk-{tag}-{}.img", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(sectors * SECTOR).unwrap();
        p
    }

    fn server(path: &std::path::Path, readonly: bool) -> Server {
        Server::new(
            Disk::open(&DiskConfig {
                path: path.into(),
                readonly,
                direct: false,
            })
            .unwrap(),
        )
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(
            Header {
                kind,
                _reserved: 0,
                sector,
            },
            GuestAddress(HDR),
        )
        .unwrap();
    }

    /// Runs the chain `descs` (NEXT flags set by the mock) through `s`: (used length, status).
    fn run(s: &mut Server, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u32, u8) {
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let q = MockSplitQueue::new(mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let used = s.execute(mem, chain);
        (used, mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    #[test]
    fn a_write_then_a_read_round_trips_through_the_file() {
        let (m, img) = (mem(), image("rw", 64));
        let mut s = server(&img, false);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        m.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        header(&m, T_OUT, 2);
        let (used, st) = run(
            &mut s,
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 4096, 0),
                desc(DATA + 4096, 4096, 0),
                desc(STATUS, 1, WRITE),
            ],
        );
        assert_eq!((used, st), (1, S_OK));
        let file = std::fs::read(&img).unwrap();
        assert_eq!(&file[1024..1024 + 8192], &pattern[..]);
        assert!(file[..1024].iter().all(|&b| b == 0));
        // Read it back elsewhere.
        let back = DATA + 0x4000;
        header(&m, T_IN, 2);
        let (used, st) = run(
            &mut s,
            &m,
            &[
                desc(HDR, 16, 0),
                desc(back, 8192, WRITE),
                desc(STATUS, 1, WRITE),
            ],
        );
        assert_eq!((used, st), (8193, S_OK));
        let mut got = vec![0u8; 8192];
        m.read_slice(&mut got, GuestAddress(back)).unwrap();
        assert_eq!(got, pattern);
        // Flush and get-id.
        header(&m, T_FLUSH, 0);
        assert_eq!(
            run(&mut s, &m, &[desc(HDR, 16, 0), desc(STATUS, 1, WRITE)]),
            (1, S_OK)
        );
        header(&m, T_GET_ID, 0);
        let (used, st) = run(
            &mut s,
            &m,
            &[
                desc(HDR, 16, 0),
                desc(back, 20, WRITE),
                desc(STATUS, 1, WRITE),
            ],
        );
        assert_eq!((used, st), (21, S_OK));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(back)).unwrap();
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            &id[..name.len().min(20)],
            &name.as_bytes()[..name.len().min(20)]
        );
        let _ = std::fs::remove_file(img);
    }

    #[test]
    fn bad_requests_get_an_error_status_and_touch_nothing() {
        let (m, img) = (mem(), image("bad", 16));
        let mut s = server(&img, false);
        let untouched = |m: &GuestMemoryMmap| {
            let mut b = vec![0u8; 4096];
            m.read_slice(&mut b, GuestAddress(DATA)).unwrap();
            b.iter().all(|&x| x == 0x5a)
        };
        m.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
        let read = |sector| {
            header(&m, T_IN, sector);
            [
                desc(HDR, 16, 0),
                desc(DATA, 4096, WRITE),
                desc(STATUS, 1, WRITE),
            ]
        };
        // Past the end of the disk (16 sectors), and a sector number that overflows.
        for sector in [9, u64::MAX / 2] {
            let chain = read(sector);
            assert_eq!(run(&mut s, &m, &chain), (1, S_IOERR), "sector {sector}");
            assert!(untouched(&m));
        }
        // A data buffer outside guest RAM, and one that runs off its end.
        header(&m, T_IN, 0);
        for (addr, len) in [(0x4000_0000u64, 4096u32), ((2 << 20) - 512, 4096)] {
            let chain = [
                desc(HDR, 16, 0),
                desc(addr, len, WRITE),
                desc(STATUS, 1, WRITE),
            ];
            assert_eq!(run(&mut s, &m, &chain), (1, S_IOERR), "{addr:#x}+{len:#x}");
        }
        // 4 GiB - 512 of buffer: refused before any host memory is taken for it.
        let chain = [
            desc(HDR, 16, 0),
            desc(DATA, u32::MAX - 511, WRITE),
            desc(STATUS, 1, WRITE),
        ];
        assert_eq!(run(&mut s, &m, &chain), (1, S_IOERR));
        // Data in the wrong direction, a partial sector, a short header, a header the device
        // may write, an unknown request.
        let chains: [(&[RawDescriptor], u32, u8); 5] = [
            (
                &[
                    desc(HDR, 16, 0),
                    desc(DATA, 4096, 0),
                    desc(STATUS, 1, WRITE),
                ],
                T_IN,
                S_IOERR,
            ),
            (
                &[
                    desc(HDR, 16, 0),
                    desc(DATA, 100, WRITE),
                    desc(STATUS, 1, WRITE),
                ],
                T_IN,
                S_IOERR,
            ),
            (
                &[
                    desc(HDR, 8, 0),
                    desc(DATA, 512, WRITE),
                    desc(STATUS, 1, WRITE),
                ],
                T_IN,
                S_IOERR,
            ),
            (
                &[
                    desc(HDR, 16, WRITE),
                    desc(DATA, 512, WRITE),
                    desc(STATUS, 1, WRITE),
                ],
                T_IN,
                S_IOERR,
            ),
            (&[desc(HDR, 16, 0), desc(STATUS, 1, WRITE)], 99, S_UNSUPP),
        ];
        for (i, (chain, kind, want)) in chains.iter().enumerate() {
            header(&m, *kind, 0);
            assert_eq!(run(&mut s, &m, chain), (1, *want), "chain {i}");
            assert!(untouched(&m), "chain {i}");
        }
        // No writable status byte at the end: nothing to answer with but a used length of 0.
        header(&m, T_IN, 0);
        let (used, st) = run(
            &mut s,
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, WRITE), desc(STATUS, 1, 0)],
        );
        assert_eq!((used, st), (0, 0xee));
        // A status byte outside guest RAM.
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(HDR, 16, 0), desc(0x4000_0000, 1, WRITE)])
            .unwrap();
        assert_eq!(s.execute(&m, chain), 0);
        assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
        let _ = std::fs::remove_file(img);
    }

    #[test]
    fn a_chain_that_loops_ends_and_fails() {
        let (m, img) = (mem(), image("loop", 16));
        let mut s = server(&img, false);
        header(&m, T_OUT, 0);
        let q = MockSplitQueue::new(&m, 16);
        // 0 -> 1 -> 0 -> ...: the crate stops it at the queue's size.
        let looped = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, NEXT | WRITE, 0)),
        ];
        q.add_desc_chains(&looped, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        let used = s.execute(&m, chain);
        assert!(used <= 1);
        assert_ne!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
        let _ = std::fs::remove_file(img);
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_says_so_in_its_features() {
        let (m, img) = (mem(), image("ro", 16));
        std::fs::write(&img, vec![7u8; 16 * 512]).unwrap();
        let mut s = server(&img, true);
        m.write_slice(&[1u8; 512], GuestAddress(DATA)).unwrap();
        header(&m, T_OUT, 0);
        let chain = [desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, WRITE)];
        assert_eq!(run(&mut s, &m, &chain), (1, S_IOERR));
        assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 7));
        let dev = Block::new(
            Disk::open(&DiskConfig {
                path: img.clone(),
                readonly: true,
                direct: false,
            })
            .unwrap(),
            GuestWrites::default(),
        )
        .unwrap();
        assert_ne!(dev.features() & (1 << F_RO), 0);
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
        let mut past = [0xffu8; 4];
        dev.read_config(6, &mut past);
        assert_eq!(past, [0, 0, 0, 0]);
        let _ = std::fs::remove_file(img);
    }

    #[test]
    fn a_queue_is_drained_into_the_used_ring_and_the_driver_interrupted() {
        let (m, img) = (mem(), image("queue", 16));
        let mut s = server(&img, false);
        header(&m, T_IN, 0);
        let q = MockSplitQueue::new(&m, 16);
        let chain = |data: u64| {
            [
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, NEXT, 0)),
                RawDescriptor::from(SplitDescriptor::new(data, 512, NEXT | WRITE, 0)),
                RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)),
            ]
        };
        let mut descs = chain(DATA).to_vec();
        descs.extend(chain(DATA + 512));
        // Each descriptor's `next` must name the following one inside its chain.
        for (i, d) in descs.iter_mut().enumerate() {
            let sd = SplitDescriptor::from(*d);
            *d = RawDescriptor::from(SplitDescriptor::new(
                sd.addr().0,
                sd.len(),
                sd.flags(),
                i as u16 + 1,
            ));
        }
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        assert_eq!(s.process_queue(&m, &mut queue, &irq), (2, false));
        assert_eq!(q.used().idx().load(), 2);
        let e = q.used().ring().ref_at(1).unwrap().load();
        assert_eq!((e.id(), e.len()), (3, 513));
        assert_eq!(irq.status(), INT_VRING);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        // Nothing new: nothing done, no interrupt.
        assert_eq!(s.process_queue(&m, &mut queue, &irq), (0, false));
        assert!(irq.irqfd().read().is_err());
        let _ = std::fs::remove_file(img);
    }

    /// An available index more than a ring ahead of the device: the queue refuses to pop, and
    /// the server gives up on the ring instead of looking at it again for ever (the fuzzer's
    /// first hang).
    #[test]
    fn an_available_index_past_the_ring_is_given_up_not_spun_on() {
        let (m, img) = (mem(), image("badidx", 16));
        let mut s = server(&img, false);
        let q = MockSplitQueue::new(&m, 16);
        let mut queue: Queue = q.create_queue().unwrap();
        q.avail().idx().store(100);
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        assert_eq!(s.process_queue(&m, &mut queue, &irq), (0, false));
        assert_eq!(q.used().idx().load(), 0);
        assert!(irq.irqfd().read().is_err(), "an interrupt for nothing");
        let _ = std::fs::remove_file(img);
    }

    #[test]
    fn the_device_thread_serves_a_notified_queue_until_reset_and_again_after() {
        let (m, img) = (mem(), image("thread", 16));
        std::fs::write(&img, vec![0x42u8; 16 * 512]).unwrap();
        let disk = Disk::open(&DiskConfig {
            path: img.clone(),
            readonly: false,
            direct: false,
        })
        .unwrap();
        let mut dev = Block::new(disk, GuestWrites::default()).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        header(&m, T_IN, 3);
        let read = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, NEXT | WRITE, 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)),
        ];
        q.add_desc_chains(&read, 0).unwrap();
        let event = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let wait_used = |n: u16| {
            let t = std::time::Instant::now();
            while q.used().idx().load() < n {
                assert!(
                    t.elapsed().as_secs() < 10,
                    "the thread did not serve request {n}"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        // A request queued before the start is served at the start.
        dev.activate(
            m.clone(),
            0,
            vec![q.create_queue().unwrap()],
            vec![event.clone()],
            irq.clone(),
        )
        .unwrap();
        wait_used(1);
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0x42; 512]);
        assert_eq!(irq.status(), INT_VRING);
        // The next, when notified.
        q.add_desc_chains(&read, 3).unwrap();
        event.write(1).unwrap();
        wait_used(2);
        dev.reset();
        // Reset: the thread let go of the queue; a notification now goes unserved.
        q.add_desc_chains(&read, 6).unwrap();
        event.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(q.used().idx().load(), 2);
        // Started again (the driver set the queue up anew; here: where it was).
        let mut again: Queue = q.create_queue().unwrap();
        again.set_next_avail(2);
        again.set_next_used(2);
        dev.activate(m.clone(), 0, vec![again], vec![event.clone()], irq.clone())
            .unwrap();
        wait_used(3);
        drop(dev);
        let _ = std::fs::remove_file(img);
    }

    #[test]
    fn disk_options_parse_and_bad_images_are_refused_with_the_fix() {
        assert_eq!(
            "path=/x.img,readonly=on".parse::<DiskConfig>(),
            Ok(DiskConfig {
                path: "/x.img".into(),
                readonly: true,
                direct: false
            })
        );
        assert!("path=/x,direct=on".parse::<DiskConfig>().unwrap().direct);
        for (bad, needle) in [
            ("readonly=on", "no path=FILE"),
            ("path=/x,readonly=yes", "readonly=on or readonly=off"),
            ("path=/x,cache=none", "not a disk option"),
            ("/x.img", "not a disk option"),
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let cfg = |p: &str| DiskConfig {
            path: p.into(),
            readonly: false,
            direct: false,
        };
        let e = Disk::open(&cfg("/nonexistent/disk.img"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncate -s"), "{e}");
        let e = Disk::open(&cfg("/dev/null")).unwrap_err().to_string();
        assert!(e.contains("not a regular file or block device"), "{e}");
        let odd = image("odd", 1);
        std::fs::write(&odd, [0u8; 700]).unwrap();
        let e = Disk::open(&cfg(odd.to_str().unwrap()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("700 bytes is not a whole number"), "{e}");
        let _ = std::fs::remove_file(odd);
    }
}
