//! virtio-balloon (virtio 1.2 §5.5): the host asks for memory back (`vmmctl balloon SIZE`
//! sets the target), the guest hands over pages (the inflate queue) and takes them back (the
//! deflate queue), reports pages it has free (free page reporting), and sends its memory
//! statistics (the stats queue).
//!
//! Every page the guest gives, by inflating or by reporting it free, is dropped on the host
//! through the machine's reclaim path ([`crate::machine::reclaim::Reclaimer`]): bracketed by
//! `stage2`'s range invalidation like any reclaim, so the host's RSS falls and the guest's
//! next touch of such a page is a fresh demand fault. Deflating needs nothing of the host:
//! `VIRTIO_BALLOON_F_MUST_TELL_HOST` is not offered, and a page given back faults in anew
//! when touched. `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` lets the guest deflate by itself when it
//! runs out of memory.
//!
//! A page is dropped only when the backing's whole page is given within one buffer: on 2 MiB
//! huge pages an inflate of scattered 4 KiB pages drops nothing (they stay the guest's gift,
//! counted as kept; pieces of one huge page given in different buffers are not put together).
//! Free page reports come in blocks of the guest's `page_reporting_order` (2 MiB on x86),
//! which suit huge pages.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use log::{debug, warn};
use serde_json::{json, Value};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::thread::DeviceThread;
use super::{
    drain, read_config_bytes, used_ring_range, ActivateError, GuestWrites, Interrupt, VirtioDevice,
    INT_CONFIG, INT_VRING, TYPE_BALLOON,
};

/// The balloon's page size (virtio 1.2 §5.5.6: PFNs are of 4096-byte pages).
pub const PAGE: u64 = 4096;
/// Each queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// `VIRTIO_BALLOON_F_STATS_VQ`.
pub const F_STATS_VQ: u32 = 1;
/// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// `VIRTIO_BALLOON_F_REPORTING`.
pub const F_REPORTING: u32 = 5;
/// Requests one call of [`Server::process`] serves at most on a queue (see
/// [`super::block::MAX_BATCH`]).
pub const MAX_BATCH: usize = 1024;
/// Bytes of one statistic: `le16 tag, le64 value`.
const STAT_BYTES: usize = 10;
/// The statistics' names by tag (virtio 1.2 §5.5.6.3, and Linux's additions after it).
const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
];

/// How the balloon gives pages back to the host: `(gpa, len)` whole backing pages; an error
/// says why this range stays (a postcopy page not yet here, a migration's gate).
pub type DropRange = dyn Fn(u64, u64) -> Result<(), String> + Send + Sync;

/// What the host and the guest agree on, and what the device did: shared by the device, its
/// thread and the control socket's [`BalloonHandle`].
#[derive(Default)]
struct Shared {
    /// The target the host set, in 4 KiB pages (config `num_pages`).
    target: AtomicU32,
    /// The guest's count of pages in the balloon (config `actual`, written by the driver).
    actual: AtomicU32,
    /// The interrupt of the active device, for configuration changes.
    interrupt: Mutex<Option<Arc<Interrupt>>>,
    /// The reclaim path; set once the machine has one (before the vCPUs run).
    drop_range: OnceLock<Arc<DropRange>>,
    /// The backing's page size: ranges are dropped in whole pages of it.
    backing_page: AtomicU64,
    /// Counters.
    inflated_pages: AtomicU64,
    deflated_pages: AtomicU64,
    reported_bytes: AtomicU64,
    dropped_bytes: AtomicU64,
    kept_bytes: AtomicU64,
    drop_errors: AtomicU64,
    /// The guest's last statistics, their generation and when they came.
    stats: Mutex<Stats>,
    stats_changed: Condvar,
    /// Signalled to have the device thread ask the guest for fresh statistics.
    refresh: OnceLock<Arc<EventFd>>,
}

#[derive(Default)]
struct Stats {
    generation: u64,
    at: Option<Instant>,
    values: Vec<(u16, u64)>,
}

/// The control socket's handle on the balloon: set the target, read the figures.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl BalloonHandle {
    /// Sets the balloon's target to `bytes` (rounded down to 4 KiB pages) and tells the
    /// driver (a configuration-change interrupt) when it is running.
    pub fn set_target(&self, bytes: u64) -> Result<Value, String> {
        let pages = u32::try_from(bytes / PAGE).map_err(|_| {
            format!(
                "a balloon of {bytes} bytes is more than virtio-balloon can count ({} pages of \
                 4 KiB)",
                u32::MAX
            )
        })?;
        self.0.target.store(pages, Ordering::SeqCst);
        let told = match self.0.interrupt.lock().unwrap().as_ref() {
            Some(irq) => {
                irq.raise(INT_CONFIG)
                    .map_err(|e| format!("cannot interrupt the guest: {e}"))?;
                true
            }
            None => false,
        };
        Ok(json!({
            "target_bytes": u64::from(pages) * PAGE,
            "driver_told": told,
        }))
    }

    /// Gives the balloon its way of dropping pages, and the backing's page size.
    pub fn set_drop_range(&self, drop_range: Arc<DropRange>, backing_page: u64) {
        self.0
            .backing_page
            .store(backing_page.max(PAGE), Ordering::SeqCst);
        let _ = self.0.drop_range.set(drop_range);
    }

    /// The balloon's figures; with `fresh`, first asks the guest for new statistics and waits
    /// up to that long for them.
    pub fn info(&self, fresh: Option<Duration>) -> Value {
        let sh = &self.0;
        if let (Some(wait), Some(ev)) = (fresh, sh.refresh.get()) {
            let before = sh.stats.lock().unwrap().generation;
            let _ = ev.write(1);
            let deadline = Instant::now() + wait;
            let mut st = sh.stats.lock().unwrap();
            while st.generation == before {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = sh.stats_changed.wait_timeout(st, left).unwrap().0;
            }
        }
        let st = sh.stats.lock().unwrap();
        let stats: serde_json::Map<String, Value> = st
            .values
            .iter()
            .map(|&(tag, v)| {
                let name = STAT_NAMES
                    .get(usize::from(tag))
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| format!("tag_{tag}"));
                (name, json!(v))
            })
            .collect();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "target_bytes": u64::from(sh.target.load(Ordering::SeqCst)) * PAGE,
            "actual_bytes": u64::from(sh.actual.load(Ordering::SeqCst)) * PAGE,
            "inflated_pages": n(&sh.inflated_pages),
            "deflated_pages": n(&sh.deflated_pages),
            "reported_bytes": n(&sh.reported_bytes),
            "dropped_bytes": n(&sh.dropped_bytes),
            "kept_bytes": n(&sh.kept_bytes),
            "drop_errors": n(&sh.drop_errors),
            "stats": stats,
            "stats_age_ms": st.at.map(|t| t.elapsed().as_millis() as u64),
        })
    }
}

/// Which queue is which, from the features the driver took (virtio 1.2 §5.5.2: the stats
/// queue exists only with `F_STATS_VQ`, the reporting queue only with `F_REPORTING`, and the
/// driver numbers the ones that exist in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueMap {
    /// The stats queue's index.
    pub stats: Option<usize>,
    /// The reporting queue's index.
    pub reporting: Option<usize>,
}

impl QueueMap {
    /// The map for `acked` features.
    pub fn new(acked: u64) -> QueueMap {
        let mut next = 2;
        let mut take = |bit: u32| {
            (acked & (1 << bit) != 0).then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(F_STATS_VQ);
        let reporting = take(F_REPORTING);
        QueueMap { stats, reporting }
    }
}

/// Index of the inflate queue.
pub const INFLATE: usize = 0;
/// Index of the deflate queue.
pub const DEFLATE: usize = 1;

/// The queues' work, without a thread: what the device thread runs on a notification.
pub struct Server {
    shared: Arc<Shared>,
    /// The stats buffer the driver posted and the device holds until it wants new figures.
    stats_held: Option<u16>,
    /// Where the used rings' writes are recorded (the device writes nothing else of RAM).
    writes: GuestWrites,
}

impl Server {
    fn new(shared: Arc<Shared>, writes: GuestWrites) -> Server {
        Server {
            shared,
            stats_held: None,
            writes,
        }
    }

    /// A server of the balloon `handle` drives, without the device's thread: for tests and
    /// the fuzz target, which run its queues themselves.
    pub fn of(handle: &BalloonHandle) -> Server {
        Server::new(handle.0.clone(), GuestWrites::default())
    }

    /// Serves the inflate (`deflate == false`) or deflate queue: every buffer is an array of
    /// le32 page numbers. Returns the buffers done and whether more wait.
    pub fn process_pfns(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        interrupt: &Interrupt,
        deflate: bool,
    ) -> (usize, bool) {
        let writes = self.writes.clone();
        let out = drain(
            mem,
            queue,
            interrupt,
            "virtio-balloon",
            MAX_BATCH,
            |chain| {
                let mut pfns = Vec::new();
                for d in chain {
                    if d.is_write_only() {
                        continue;
                    }
                    let n = (d.len() / 4) as usize;
                    let mut raw = vec![0u8; n * 4];
                    if mem.read_slice(&mut raw, d.addr()).is_err() {
                        debug!("virtio-balloon: a PFN buffer outside guest RAM");
                        continue;
                    }
                    pfns.extend(
                        raw.chunks_exact(4)
                            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
                    );
                }
                let sh = &self.shared;
                if deflate {
                    sh.deflated_pages
                        .fetch_add(pfns.len() as u64, Ordering::Relaxed);
                } else {
                    sh.inflated_pages
                        .fetch_add(pfns.len() as u64, Ordering::Relaxed);
                    pfns.sort_unstable();
                    pfns.dedup();
                    for (start, pages) in runs(&pfns) {
                        self.give(start * PAGE, pages * PAGE);
                    }
                }
                0
            },
        );
        // Also when nothing was done: the used ring's flags changed with the notifications.
        writes.record(&[used_ring_range(queue)]);
        out
    }

    /// Serves the reporting queue: each descriptor is a free range of guest RAM, dropped and
    /// handed back.
    pub fn process_reports(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        interrupt: &Interrupt,
    ) -> (usize, bool) {
        let out = drain(
            mem,
            queue,
            interrupt,
            "virtio-balloon",
            MAX_BATCH,
            |chain| {
                for d in chain {
                    let len = u64::from(d.len());
                    self.shared.reported_bytes.fetch_add(len, Ordering::Relaxed);
                    self.give(d.addr().0, len);
                }
                0
            },
        );
        self.writes.record(&[used_ring_range(queue)]);
        out
    }

    /// Serves the stats queue: reads the statistics of the buffer the driver posted and holds
    /// the buffer (virtio 1.2 §5.5.6.3: the device returns it when it wants new figures).
    pub fn process_stats(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) {
        let _ = queue.disable_notification(mem);
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut values = Vec::new();
            for d in chain {
                if d.is_write_only() {
                    continue;
                }
                let mut raw = vec![0u8; (d.len() as usize).min(64 * STAT_BYTES)];
                if mem.read_slice(&mut raw, d.addr()).is_err() {
                    debug!("virtio-balloon: a stats buffer outside guest RAM");
                    continue;
                }
                values.extend(raw.chunks_exact(STAT_BYTES).map(|c| {
                    let tag = u16::from_le_bytes([c[0], c[1]]);
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&c[2..10]);
                    (tag, u64::from_le_bytes(v))
                }));
            }
            {
                let mut st = self.shared.stats.lock().unwrap();
                st.generation += 1;
                st.at = Some(Instant::now());
                st.values = values;
            }
            self.shared.stats_changed.notify_all();
            // A second buffer before the first went back: the driver does not do that; give
            // the older one back at once.
            if let Some(old) = self.stats_held.replace(head) {
                let _ = queue.add_used(mem, old, 0);
            }
        }
        let _ = queue.enable_notification(mem);
        self.writes.record(&[used_ring_range(queue)]);
    }

    /// Returns the held stats buffer so that the driver sends fresh figures.
    pub fn request_stats(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        interrupt: &Interrupt,
    ) -> bool {
        let Some(head) = self.stats_held.take() else {
            return false;
        };
        if let Err(e) = queue.add_used(mem, head, 0) {
            warn!("virtio-balloon: cannot return the stats buffer: {e:?}");
            return false;
        }
        self.writes.record(&[used_ring_range(queue)]);
        if queue.needs_notification(mem).unwrap_or(true) {
            let _ = interrupt.raise(INT_VRING);
        }
        true
    }

    /// Drops the whole backing pages inside `[gpa, gpa + len)`; the rest is kept.
    fn give(&self, gpa: u64, len: u64) {
        let sh = &self.shared;
        let page = sh.backing_page.load(Ordering::SeqCst).max(PAGE);
        let Some(end) = gpa.checked_add(len) else {
            return;
        };
        // A range at the top of the address space has no whole page above its start.
        let lo = gpa.checked_next_multiple_of(page).unwrap_or(u64::MAX);
        let hi = end - end % page;
        let whole = hi.saturating_sub(lo);
        sh.kept_bytes.fetch_add(len - whole, Ordering::Relaxed);
        if whole == 0 {
            return;
        }
        let Some(drop_range) = sh.drop_range.get() else {
            sh.kept_bytes.fetch_add(whole, Ordering::Relaxed);
            return;
        };
        match drop_range(lo, whole) {
            Ok(()) => {
                sh.dropped_bytes.fetch_add(whole, Ordering::Relaxed);
            }
            Err(why) => {
                debug!("virtio-balloon: {lo:#x}+{whole:#x} stays: {why}");
                sh.drop_errors.fetch_add(1, Ordering::Relaxed);
                sh.kept_bytes.fetch_add(whole, Ordering::Relaxed);
            }
        }
    }
}

/// Runs of consecutive numbers in sorted, deduplicated `pfns`: `(first, count)`.
fn runs(pfns: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pfns {
        match out.last_mut() {
            Some((start, n)) if *start + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// What the device's thread serves: the queues, with the memory, the queues' events, the
/// interrupt and the queue numbering, and the stats buffer the device holds.
struct Work {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    events: Vec<Arc<EventFd>>,
    interrupt: Arc<Interrupt>,
    map: QueueMap,
    stats_held: Option<u16>,
}

/// What a migration carries of the balloon besides its queues: the target the host set, the
/// guest's count, and the stats buffer the device holds (the driver sends no statistics
/// again until it is returned).
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct BalloonState {
    target: u32,
    actual: u32,
    stats_held: Option<u16>,
}

/// The virtio-balloon device, with its thread (started with it, as the block device's is).
pub struct Balloon {
    shared: Arc<Shared>,
    thread: DeviceThread<Work>,
    /// A migrated stats buffer the next activation holds.
    restored_stats: Option<u16>,
}

impl Balloon {
    /// A balloon with its thread, and the handle the control socket drives it with; the
    /// guest RAM it writes (its used rings) is recorded in `writes`.
    pub fn new(writes: GuestWrites) -> std::io::Result<(Balloon, BalloonHandle)> {
        let shared = Arc::new(Shared::default());
        shared.backing_page.store(PAGE, Ordering::SeqCst);
        let refresh = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let _ = shared.refresh.set(refresh.clone());
        let mut server = Server::new(shared.clone(), writes);
        let thread = DeviceThread::spawn(
            "virtio-balloon",
            crate::seccomp::ThreadKind::Balloon,
            move |mut w: Work, stop: &EventFd| {
                server.stats_held = w.stats_held;
                serve(
                    &mut server,
                    &w.mem,
                    &mut w.queues,
                    &w.events,
                    &w.interrupt,
                    w.map,
                    &refresh,
                    stop,
                );
                w.stats_held = server.stats_held.take();
                w
            },
        )?;
        let handle = BalloonHandle(shared.clone());
        Ok((
            Balloon {
                shared,
                thread,
                restored_stats: None,
            },
            handle,
        ))
    }
}

/// The device thread's loop over one activation: every queue's event, the refresh event and
/// `stop`.
#[allow(clippy::too_many_arguments)]
fn serve(
    server: &mut Server,
    mem: &GuestMemoryMmap,
    queues: &mut [Queue],
    events: &[Arc<EventFd>],
    interrupt: &Interrupt,
    map: QueueMap,
    refresh: &EventFd,
    stop: &EventFd,
) {
    use std::os::fd::AsRawFd;
    // Queue indices served: inflate, deflate, then the optional ones.
    let mut served = vec![INFLATE, DEFLATE];
    served.extend(map.stats);
    served.extend(map.reporting);
    served.retain(|&q| q < queues.len() && q < events.len());
    // Whatever the driver queued before it notified.
    let mut pending: Vec<usize> = served.clone();
    loop {
        for q in std::mem::take(&mut pending) {
            let more = if q == INFLATE || q == DEFLATE {
                server
                    .process_pfns(mem, &mut queues[q], interrupt, q == DEFLATE)
                    .1
            } else if Some(q) == map.reporting {
                server.process_reports(mem, &mut queues[q], interrupt).1
            } else {
                server.process_stats(mem, &mut queues[q]);
                false
            };
            if more {
                let _ = events[q].write(1);
            }
        }
        let mut fds: Vec<libc::pollfd> = served
            .iter()
            .map(|&q| events[q].as_raw_fd())
            .chain([refresh.as_raw_fd(), stop.as_raw_fd()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfds for the call's duration; every fd in it
        // belongs to an EventFd that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let (queue_fds, rest) = fds.split_at(served.len());
        if rest[1].revents != 0 {
            return;
        }
        if rest[0].revents != 0 {
            let _ = refresh.read();
            if let Some(s) = map.stats.filter(|&s| s < queues.len()) {
                server.request_stats(mem, &mut queues[s], interrupt);
            }
        }
        for (i, fd) in queue_fds.iter().enumerate() {
            if fd.revents != 0 {
                let _ = events[served[i]].read();
                pending.push(served[i]);
            }
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // inflate, deflate, stats, reporting (no free-page-hint queue: not offered).
        &[QUEUE_SIZE; 4]
    }

    fn features(&self) -> u64 {
        (1 << F_STATS_VQ) | (1 << F_DEFLATE_ON_OOM) | (1 << F_REPORTING)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages (le32), actual (le32), free_page_hint_cmd_id and poison_val (unused).
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(&self.shared.target.load(Ordering::SeqCst).to_le_bytes());
        config[4..8].copy_from_slice(&self.shared.actual.load(Ordering::SeqCst).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write, as a whole le32.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.shared.actual.store(v, Ordering::SeqCst);
        } else {
            debug!("virtio-balloon: config write at {offset:#x} ignored");
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        events: Vec<Arc<EventFd>>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        *self.shared.interrupt.lock().unwrap() = Some(interrupt.clone());
        self.thread.start(Work {
            mem,
            queues,
            events,
            interrupt,
            map: QueueMap::new(acked_features),
            stats_held: self.restored_stats.take(),
        })
    }

    fn reset(&mut self) {
        *self.shared.interrupt.lock().unwrap() = None;
        // A reset gives every buffer back to the driver, the held stats one too.
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
        postcard::to_stdvec(&BalloonState {
            target: self.shared.target.load(Ordering::SeqCst),
            actual: self.shared.actual.load(Ordering::SeqCst),
            stats_held: self.thread.paused().and_then(|w| w.stats_held),
        })
        .expect("the balloon's state always encodes")
    }

    fn restore(&mut self, blob: &[u8]) -> Result<(), String> {
        let st: BalloonState = postcard::from_bytes(blob)
            .map_err(|e| format!("the source's virtio-balloon state does not decode: {e}"))?;
        self.shared.target.store(st.target, Ordering::SeqCst);
        self.shared.actual.store(st.actual, Ordering::SeqCst);
        self.restored_stats = st.stats_held;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    /// Where the tests' buffers are (the mock queues' rings are below 64 KiB each).
    const BUF: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn irq() -> Interrupt {
        Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    /// A server whose drops are logged, on a backing of `page` bytes; `refuse` makes every
    /// drop fail.
    /// The drops a test's balloon asked for.
    type DropLog = Arc<Mutex<Vec<(u64, u64)>>>;

    fn server(page: u64, refuse: bool) -> (Server, BalloonHandle, DropLog) {
        let (dev, handle) = Balloon::new(GuestWrites::default()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        handle.set_drop_range(
            Arc::new(move |gpa, len| {
                if refuse {
                    return Err("refused by the test".into());
                }
                l.lock().unwrap().push((gpa, len));
                Ok(())
            }),
            page,
        );
        let s = Server::new(dev.shared.clone(), GuestWrites::default());
        (s, handle, log)
    }

    fn pfn_buffer(m: &GuestMemoryMmap, at: u64, pfns: &[u32]) -> RawDescriptor {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        m.write_slice(&bytes, GuestAddress(at)).unwrap();
        RawDescriptor::from(SplitDescriptor::new(at, bytes.len() as u32, 0, 0))
    }

    #[test]
    fn queues_are_numbered_by_the_features_the_driver_took() {
        let all = (1 << F_STATS_VQ) | (1 << F_REPORTING) | (1 << F_DEFLATE_ON_OOM);
        assert_eq!(
            QueueMap::new(all),
            QueueMap {
                stats: Some(2),
                reporting: Some(3)
            }
        );
        assert_eq!(
            QueueMap::new(1 << F_REPORTING),
            QueueMap {
                stats: None,
                reporting: Some(2)
            }
        );
        assert_eq!(
            QueueMap::new(1 << F_STATS_VQ),
            QueueMap {
                stats: Some(2),
                reporting: None
            }
        );
        assert_eq!(
            QueueMap::new(1 << F_DEFLATE_ON_OOM),
            QueueMap {
                stats: None,
                reporting: None
            }
        );
    }

    #[test]
    fn inflated_pages_are_dropped_in_runs_and_deflated_ones_only_counted() {
        let m = mem();
        let (mut s, handle, log) = server(PAGE, false);
        let q = MockSplitQueue::new(&m, 16);
        // Out of order, a duplicate, two runs: 0x100-0x103 and 0x200.
        let d = pfn_buffer(&m, BUF, &[0x102, 0x100, 0x200, 0x101, 0x103, 0x100]);
        q.add_desc_chains(&[d], 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let irq = irq();
        assert_eq!(s.process_pfns(&m, &mut queue, &irq, false), (1, false));
        assert_eq!(
            *log.lock().unwrap(),
            vec![(0x100 * PAGE, 4 * PAGE), (0x200 * PAGE, PAGE)]
        );
        assert_eq!(q.used().idx().load(), 1);
        assert_eq!(irq.status(), INT_VRING);
        let info = handle.info(None);
        assert_eq!(info["inflated_pages"], 6);
        assert_eq!(info["dropped_bytes"], 5 * PAGE);
        assert_eq!(info["kept_bytes"], 0);

        let dq = MockSplitQueue::create(&m, GuestAddress(0x8_0000), 16);
        let d = pfn_buffer(&m, BUF + 0x1000, &[0x100, 0x101]);
        dq.add_desc_chains(&[d], 0).unwrap();
        let mut dqueue: Queue = dq.create_queue().unwrap();
        assert_eq!(s.process_pfns(&m, &mut dqueue, &irq, true), (1, false));
        assert_eq!(log.lock().unwrap().len(), 2, "a deflate dropped something");
        assert_eq!(handle.info(None)["deflated_pages"], 2);
    }

    #[test]
    fn on_huge_pages_only_whole_pages_are_dropped() {
        let m = mem();
        let huge = 2 << 20;
        let (mut s, handle, log) = server(huge, false);
        let q = MockSplitQueue::new(&m, 16);
        // 0x3ff..0x600 (4 KiB pages): [0x3ff000, 0x600000) holds one whole 2 MiB page.
        let pfns: Vec<u32> = (0x3ff..0x600).collect();
        let d = pfn_buffer(&m, BUF, &pfns);
        q.add_desc_chains(&[d], 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        s.process_pfns(&m, &mut queue, &irq(), false);
        assert_eq!(*log.lock().unwrap(), vec![(0x40_0000, huge)]);
        let info = handle.info(None);
        assert_eq!(info["dropped_bytes"], huge);
        assert_eq!(info["kept_bytes"], (0x201 * PAGE) - huge);
    }

    #[test]
    fn reported_free_ranges_are_dropped_and_handed_back() {
        let m = mem();
        let (mut s, handle, log) = server(2 << 20, false);
        let q = MockSplitQueue::new(&m, 16);
        let chain = [
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 2 << 20, NEXT | WRITE, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x80_0000, 4 << 20, WRITE, 0)),
        ];
        q.add_desc_chains(&chain, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        assert_eq!(s.process_reports(&m, &mut queue, &irq()), (1, false));
        assert_eq!(
            *log.lock().unwrap(),
            vec![(0x20_0000, 2 << 20), (0x80_0000, 4 << 20)]
        );
        assert_eq!(q.used().idx().load(), 1);
        let info = handle.info(None);
        assert_eq!(info["reported_bytes"], 6 << 20);
        assert_eq!(info["dropped_bytes"], 6 << 20);
    }

    #[test]
    fn a_refused_drop_keeps_the_pages_and_is_counted() {
        let m = mem();
        let (mut s, handle, _) = server(PAGE, true);
        let q = MockSplitQueue::new(&m, 16);
        let d = pfn_buffer(&m, BUF, &[7, 8]);
        q.add_desc_chains(&[d], 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        assert_eq!(s.process_pfns(&m, &mut queue, &irq(), false), (1, false));
        let info = handle.info(None);
        assert_eq!(info["drop_errors"], 1);
        assert_eq!(info["kept_bytes"], 2 * PAGE);
        assert_eq!(info["dropped_bytes"], 0);
    }

    #[test]
    fn statistics_are_read_and_their_buffer_held_until_the_device_wants_more() {
        let m = mem();
        let (mut s, handle, _) = server(PAGE, false);
        let q = MockSplitQueue::new(&m, 16);
        let mut raw = Vec::new();
        for (tag, v) in [(4u16, 100u64 << 20), (5, 256 << 20), (99, 7)] {
            raw.extend_from_slice(&tag.to_le_bytes());
            raw.extend_from_slice(&v.to_le_bytes());
        }
        m.write_slice(&raw, GuestAddress(BUF)).unwrap();
        let d = RawDescriptor::from(SplitDescriptor::new(BUF, raw.len() as u32, 0, 0));
        q.add_desc_chains(&[d], 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        s.process_stats(&m, &mut queue);
        let info = handle.info(None);
        assert_eq!(info["stats"]["free_memory"], 100u64 << 20);
        assert_eq!(info["stats"]["total_memory"], 256u64 << 20);
        assert_eq!(info["stats"]["tag_99"], 7);
        // Held: not in the used ring until asked for.
        assert_eq!(q.used().idx().load(), 0);
        let irq = irq();
        assert!(s.request_stats(&m, &mut queue, &irq));
        assert_eq!(q.used().idx().load(), 1);
        assert_eq!(irq.status(), INT_VRING);
        // Nothing held any more.
        assert!(!s.request_stats(&m, &mut queue, &irq));
    }

    #[test]
    fn the_target_is_in_the_config_space_and_the_driver_is_told_of_it() {
        let (mut dev, handle) = Balloon::new(GuestWrites::default()).unwrap();
        // Before the driver started the device: set, nobody to tell.
        let v = handle.set_target(64 << 20).unwrap();
        assert_eq!(v["driver_told"], false);
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg[0..4].try_into().unwrap()), 16384);
        // The driver writes `actual`.
        dev.write_config(4, &100u32.to_le_bytes());
        dev.read_config(4, &mut cfg[..4]);
        assert_eq!(u32::from_le_bytes(cfg[0..4].try_into().unwrap()), 100);
        assert_eq!(handle.info(None)["actual_bytes"], 100 * PAGE);
        // Active: a configuration-change interrupt.
        let m = mem();
        let irq = Arc::new(irq());
        let queues: Vec<Queue> = (0..4)
            .map(|i| {
                MockSplitQueue::create(&m, GuestAddress(i * 0x1_0000), 16)
                    .create_queue()
                    .unwrap()
            })
            .collect();
        let events: Vec<_> = (0..4)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
            .collect();
        dev.activate(m, dev.features(), queues, events, irq.clone())
            .unwrap();
        let v = handle.set_target(1 << 30).unwrap();
        assert_eq!(v["driver_told"], true);
        assert_eq!(irq.status() & INT_CONFIG, INT_CONFIG);
        assert!(handle.set_target(1 << 45).is_err(), "past u32 pages");
        dev.reset();
        assert_eq!(handle.set_target(0).unwrap()["driver_told"], false);
    }

    #[test]
    fn the_device_thread_serves_inflate_and_reporting_and_refreshes_statistics() {
        let m = mem();
        let (mut dev, handle) = Balloon::new(GuestWrites::default()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        handle.set_drop_range(
            Arc::new(move |gpa, len| {
                l.lock().unwrap().push((gpa, len));
                Ok(())
            }),
            PAGE,
        );
        let mocks: Vec<_> = (0..4)
            .map(|i| MockSplitQueue::create(&m, GuestAddress(i * 0x1_0000), 16))
            .collect();
        let events: Vec<_> = (0..4)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
            .collect();
        // A stats buffer posted before the start.
        let mut raw = Vec::new();
        raw.extend_from_slice(&4u16.to_le_bytes());
        raw.extend_from_slice(&(1u64 << 20).to_le_bytes());
        m.write_slice(&raw, GuestAddress(BUF + 0x2000)).unwrap();
        mocks[2]
            .add_desc_chains(
                &[RawDescriptor::from(SplitDescriptor::new(
                    BUF + 0x2000,
                    10,
                    0,
                    0,
                ))],
                0,
            )
            .unwrap();
        let queues: Vec<Queue> = mocks.iter().map(|q| q.create_queue().unwrap()).collect();
        let irq = Arc::new(irq());
        dev.activate(m.clone(), dev.features(), queues, events.clone(), irq)
            .unwrap();
        let wait = |what: &str, done: &dyn Fn() -> bool| {
            let t = Instant::now();
            while !done() {
                assert!(t.elapsed() < Duration::from_secs(10), "{what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait("the first statistics", &|| {
            handle.info(None)["stats"]["free_memory"] == 1u64 << 20
        });
        // Inflate, notified.
        let d = pfn_buffer(&m, BUF, &[0x300, 0x301]);
        mocks[INFLATE].add_desc_chains(&[d], 0).unwrap();
        events[INFLATE].write(1).unwrap();
        wait("the inflate", &|| mocks[INFLATE].used().idx().load() == 1);
        // A report, notified.
        let r = RawDescriptor::from(SplitDescriptor::new(0x40_0000, 1 << 20, WRITE, 0));
        mocks[3].add_desc_chains(&[r], 0).unwrap();
        events[3].write(1).unwrap();
        wait("the report", &|| mocks[3].used().idx().load() == 1);
        assert_eq!(
            *log.lock().unwrap(),
            vec![(0x300 * PAGE, 2 * PAGE), (0x40_0000, 1 << 20)]
        );
        // Fresh statistics: the held buffer goes back to the driver (which would refill it).
        let before = mocks[2].used().idx().load();
        let _ = handle.info(Some(Duration::from_millis(100)));
        wait("the stats buffer's return", &|| {
            mocks[2].used().idx().load() == before + 1
        });
        dev.reset();
        drop(dev);
    }

    /// A migration: the source's balloon pauses (its thread stops, the queues and the held
    /// stats buffer come back), its state (target, the guest's count, the held buffer) is
    /// restored into another balloon, which serves the same queues from where they were and
    /// returns the held buffer when fresh statistics are asked for. The source's resumes too.
    #[test]
    fn a_paused_balloon_carries_its_target_count_and_held_stats_buffer_to_another() {
        let m = mem();
        let (mut src, src_handle) = Balloon::new(GuestWrites::default()).unwrap();
        src_handle.set_target(64 << 20).unwrap();
        src.write_config(4, &1234u32.to_le_bytes());
        let mocks: Vec<_> = (0..4)
            .map(|i| MockSplitQueue::create(&m, GuestAddress(i * 0x1_0000), 16))
            .collect();
        let events: Vec<_> = (0..4)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
            .collect();
        let stats = RawDescriptor::from(SplitDescriptor::new(BUF + 0x2000, 10, 0, 0));
        mocks[2].add_desc_chains(&[stats], 0).unwrap();
        let queues: Vec<Queue> = mocks.iter().map(|q| q.create_queue().unwrap()).collect();
        assert!(src.pause().is_none(), "not active: nothing to pause");
        src.activate(
            m.clone(),
            src.features(),
            queues,
            events.clone(),
            Arc::new(irq()),
        )
        .unwrap();
        let wait = |what: &str, done: &dyn Fn() -> bool| {
            let t = Instant::now();
            while !done() {
                assert!(t.elapsed() < Duration::from_secs(10), "{what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait("the first statistics", &|| {
            src_handle.info(None)["stats_age_ms"].is_u64()
        });
        let queues = src.pause().expect("an active balloon pauses");
        assert_eq!(queues.len(), 4);
        assert_eq!(queues[2].next_avail, 1, "the stats buffer was taken");
        assert_eq!(mocks[2].used().idx().load(), 0, "and is held, not returned");
        // Paused: an inflate waits.
        mocks[INFLATE]
            .add_desc_chains(&[pfn_buffer(&m, BUF, &[0x300])], 0)
            .unwrap();
        events[INFLATE].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            mocks[INFLATE].used().idx().load(),
            0,
            "a paused balloon serves nothing"
        );
        let blob = src.save();

        let (mut dst, dst_handle) = Balloon::new(GuestWrites::default()).unwrap();
        assert!(
            dst.restore(&[0xff, 0xff, 0xff]).is_err(),
            "garbage is refused"
        );
        dst.restore(&blob).unwrap();
        let info = dst_handle.info(None);
        assert_eq!(info["target_bytes"], 64u64 << 20, "{info}");
        assert_eq!(info["actual_bytes"], 1234u64 * PAGE, "{info}");
        let mut config = [0u8; 8];
        dst.read_config(0, &mut config);
        assert_eq!(config[..4], ((64u32 << 20) / 4096).to_le_bytes());
        let queues: Vec<Queue> = queues
            .into_iter()
            .map(|q| Queue::try_from(q).unwrap())
            .collect();
        dst.activate(
            m.clone(),
            dst.features(),
            queues,
            events.clone(),
            Arc::new(irq()),
        )
        .unwrap();
        // The inflate queued during the pause is served once notified here.
        events[INFLATE].write(1).unwrap();
        wait("the inflate on the destination", &|| {
            mocks[INFLATE].used().idx().load() == 1
        });
        // The held stats buffer goes back when the destination wants fresh figures.
        let _ = dst_handle.info(Some(Duration::from_millis(100)));
        wait("the held stats buffer's return", &|| {
            mocks[2].used().idx().load() == 1
        });
        dst.reset();
        drop(dst);
        // The source's resume serves again (a failed migration): it still holds nothing new.
        src.resume();
        assert!(src.pause().is_some(), "resumed, it pauses again");
        src.reset();
    }
}
