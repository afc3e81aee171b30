//! The destination's side of a migration's connections: accepting the lanes a header
//! announces, and receiving their shares on threads of their own while the main connection
//! brings its share and the round's end.

use std::io::BufReader;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::migrate::auth::{self, Secret};
use crate::migrate::error::MigrateError;
use crate::migrate::ram::{open_pagemap, RamReceiver};
use crate::migrate::stream::{chunk_name, Chunk, Layout, Received, StreamError, StreamReader};
use crate::migrate::transport::{Connection, Listener};
use crate::seccomp::{self, ThreadKind};

/// An accepted lane.
pub struct LaneIn {
    index: u32,
    conn: Connection,
    reader: StreamReader<BufReader<Connection>>,
}

impl std::fmt::Debug for LaneIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneIn")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Accepts the `layout.connections - 1` lanes of the migration whose header was `layout`,
/// each authenticated with `secret` when given. A connection that is not one of them (no or
/// another secret, another migration's token, a lane index seen already) is refused with a
/// warning and the wait goes on; the wait fails once `idle` passes without every lane.
pub fn accept_lanes(
    listener: &Listener,
    layout: &Layout,
    idle: Option<Duration>,
    secret: Option<&Secret>,
    buffer: usize,
) -> Result<Vec<LaneIn>, MigrateError> {
    let want = layout.connections.saturating_sub(1) as usize;
    if want == 0 {
        return Ok(Vec::new());
    }
    // The lanes read residency from /proc/self/pagemap, which their filter may not open.
    open_pagemap().map_err(|source| StreamError::Io { offset: 0, source })?;
    let deadline = idle.map(|d| Instant::now() + d);
    let mut slots: Vec<Option<LaneIn>> = (0..want).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let Some(conn) = listener.accept_within(left)? else {
            let got = slots.iter().filter(|s| s.is_some()).count();
            return Err(MigrateError::Refused(format!(
                "the source announced {} connections but opened {got} of its {want} lanes \
                 within {} s (--migrate-timeout); the source VM runs on",
                layout.connections,
                idle.map_or(0, |d| d.as_secs())
            )));
        };
        match lane(conn, layout, idle, secret, buffer) {
            Ok(l) => {
                let slot = &mut slots[l.index as usize - 1];
                if slot.is_some() {
                    eprintln!(
                        "warning: refused a second connection calling itself lane {} of this \
                         migration",
                        l.index
                    );
                } else {
                    *slot = Some(l);
                }
            }
            Err(e) => eprintln!(
                "warning: refused a connection while waiting for the migration's lanes: {e}"
            ),
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Checks one connection as a lane of the migration of `layout`.
fn lane(
    mut conn: Connection,
    layout: &Layout,
    idle: Option<Duration>,
    secret: Option<&Secret>,
    buffer: usize,
) -> Result<LaneIn, MigrateError> {
    let io = |source| StreamError::Io { offset: 0, source };
    conn.set_idle_timeout(idle).map_err(io)?;
    if let Some(secret) = secret {
        auth::check_source(&mut conn, secret)?;
    }
    let input = conn.try_clone().map_err(io)?;
    let (reader, token, index) = StreamReader::open_lane(BufReader::with_capacity(buffer, input))?;
    if token != layout.lane_token {
        return Err(MigrateError::Refused(
            "it names another migration (its lane token differs)".into(),
        ));
    }
    if index == 0 || index >= layout.connections {
        return Err(MigrateError::Refused(format!(
            "it calls itself lane {index}, outside 1 to {}",
            layout.connections - 1
        )));
    }
    Ok(LaneIn {
        index,
        conn,
        reader,
    })
}

/// What the lanes received.
#[derive(Clone, Copy, Debug, Default)]
pub struct LaneFigures {
    /// Bytes read on them.
    pub bytes: u64,
    /// Host pages placed whole through the pager.
    pub placed: u64,
}

/// What a lane thread tells the main one: it ended a round (`Some`), or its stream
/// (`None`: the rounds after it use the main connection only), or failed.
type LaneEvent = (u32, Result<Option<u32>, MigrateError>);

/// Runs `main` (the main connection's receive into `ram`) while each of `lanes` is received
/// on a thread of its own into a [`RamReceiver::sibling`] of `ram`. `main` calls the barrier it
/// is given at each round's end: it returns once every lane has ended that round too (or
/// with the first lane's error), and lets the lanes go on to the next. On an error of
/// `main`, the lanes are shut down; once `main` has its result the lanes' threads are joined.
pub fn receive_with_lanes<T>(
    lanes: Vec<LaneIn>,
    ram: &mut RamReceiver<'_>,
    main: impl FnOnce(
        &mut RamReceiver<'_>,
        &mut dyn FnMut(u32) -> Result<(), MigrateError>,
    ) -> Result<T, MigrateError>,
) -> Result<(T, LaneFigures), MigrateError> {
    if lanes.is_empty() {
        return main(ram, &mut |_| Ok(())).map(|t| (t, LaneFigures::default()));
    }
    let n = lanes.len();
    let shut: Vec<Connection> = lanes
        .iter()
        .map(|l| l.conn.try_clone())
        .collect::<Result<_, _>>()
        .map_err(|source| StreamError::Io { offset: 0, source })?;
    std::thread::scope(|s| {
        let (done_tx, done_rx) = mpsc::channel::<LaneEvent>();
        let mut gos = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for l in lanes {
            let (go_tx, go_rx) = mpsc::channel::<()>();
            gos.push(go_tx);
            let sibling = ram.sibling();
            let done = done_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("migrate-lane-{}", l.index))
                .spawn_scoped(s, move || run_lane(l, sibling, done, go_rx));
            match t {
                Ok(t) => threads.push(t),
                Err(source) => {
                    for c in &shut {
                        let _ = c.shutdown_both();
                    }
                    drop(gos);
                    return Err(StreamError::Io { offset: 0, source }.into());
                }
            }
        }
        drop(done_tx);
        // Per lane: the last round it ended, or `Some(None)` once its stream ended.
        let mut ended: Vec<Option<Option<u32>>> = vec![None; n];
        let mut barrier = |round: u32| -> Result<(), MigrateError> {
            while ended
                .iter()
                .any(|e| !matches!(e, Some(None)) && *e != Some(Some(round)))
            {
                match done_rx.recv() {
                    Ok((index, Ok(r))) if r.is_none_or(|r| r == round) => {
                        ended[index as usize - 1] = Some(r)
                    }
                    Ok((index, Ok(r))) => {
                        let r = r.unwrap_or_default();
                        return Err(MigrateError::Lane {
                            index,
                            source: Box::new(MigrateError::Refused(format!(
                                "it ended round {r} where the main connection ended round {round}"
                            ))),
                        });
                    }
                    Ok((index, Err(e))) => {
                        return Err(MigrateError::Lane {
                            index,
                            source: Box::new(e),
                        })
                    }
                    Err(_) => {
                        return Err(MigrateError::Refused(format!(
                            "the migration's lanes closed before the end of round {round}"
                        )))
                    }
                }
            }
            // Each lane's writes of this round happen before its event, and the next round's
            // after this go: no two threads write one page without an order between them.
            for g in &gos {
                let _ = g.send(());
            }
            Ok(())
        };
        let res = main(ram, &mut barrier);
        drop(gos);
        if res.is_err() {
            for c in &shut {
                let _ = c.shutdown_both();
            }
        }
        let mut figures = LaneFigures::default();
        for t in threads {
            match t.join() {
                Ok(Ok(f)) => {
                    figures.bytes += f.bytes;
                    figures.placed += f.placed;
                }
                // Every round the destination applied had the lanes' shares: a lane that
                // fails after the last one loses nothing.
                Ok(Err((index, e))) if res.is_ok() => {
                    eprintln!("warning: migration lane {index} did not end cleanly: {e}")
                }
                Ok(Err(_)) => {}
                Err(_) if res.is_ok() => eprintln!("warning: a migration lane thread panicked"),
                Err(_) => {}
            }
        }
        res.map(|t| (t, figures))
    })
}

/// A lane's thread: applies its chunks into guest memory, tells the main thread when it ended
/// a round and waits for its go before reading on, until `END`.
fn run_lane(
    lane: LaneIn,
    mut ram: RamReceiver<'_>,
    done: mpsc::Sender<LaneEvent>,
    go: mpsc::Receiver<()>,
) -> Result<LaneFigures, (u32, MigrateError)> {
    seccomp::enter(ThreadKind::MigrationLane);
    let LaneIn {
        index, mut reader, ..
    } = lane;
    let fail = |e: MigrateError| {
        // The main thread may wait for this lane: tell it; the error itself is reported there.
        let _ = done.send((index, Err(MigrateError::Refused(e.to_string()))));
        Err((index, e))
    };
    loop {
        let (offset, number) = reader.position();
        let chunk = match reader.next_chunk_into(&mut ram) {
            Ok(Received::PagesInPlace { .. }) => continue,
            Ok(Received::Chunk(c)) => c,
            Err(e) => return fail(e.into()),
        };
        match ram.apply(&chunk) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => return fail(e.into()),
        }
        match chunk {
            Chunk::LaneEnd { round } => {
                if done.send((index, Ok(Some(round)))).is_err() || go.recv().is_err() {
                    // The main thread has stopped receiving.
                    return Err((index, MigrateError::Refused("the migration stopped".into())));
                }
            }
            Chunk::End => {
                let _ = done.send((index, Ok(None)));
                return Ok(LaneFigures {
                    bytes: reader.bytes_read(),
                    placed: ram.placed,
                });
            }
            other => {
                let found = chunk_name(&other);
                return fail(
                    StreamError::Unexpected {
                        chunk: number,
                        offset,
                        found,
                        expected: "pages, zero-pages, lane-end or end on a lane",
                    }
                    .into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::stream::{StreamWriter, LANE_TOKEN};
    use crate::migrate::transport::Address;
    use std::io::Write;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const TOKEN: [u8; LANE_TOKEN] = [7; LANE_TOKEN];

    /// A listener on a fresh unix socket path, and the layout of a migration over
    /// `connections` whose lanes send [`TOKEN`].
    fn setup(test: &str, connections: u32) -> (Address, Listener, Layout, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("vmm-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = Address::Unix(dir.join("mig.sock"));
        let listener = addr.listen().unwrap();
        let layout = Layout::new(1, [(0, 1 << 20)]).with_lanes(connections, TOKEN);
        (addr, listener, layout, dir)
    }

    fn open_lane(addr: &Address, token: &[u8; LANE_TOKEN], index: u32) -> StreamWriter<Connection> {
        StreamWriter::lane(addr.connect().unwrap(), token, index).unwrap()
    }

    /// Another migration's lane, a connection that is no lane at all and a second lane 1 are
    /// refused; the wait goes on and the real lanes join, in index order.
    #[test]
    fn strangers_are_refused_and_the_lanes_still_join() {
        let (addr, listener, layout, dir) = setup("strangers", 3);
        let idle = Some(Duration::from_secs(10));
        let got = std::thread::scope(|s| {
            let a = &addr;
            let sources = s.spawn(move || {
                let _other = open_lane(a, &[1; LANE_TOKEN], 1);
                let mut junk = a.connect().unwrap();
                junk.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                let one = open_lane(a, &TOKEN, 1);
                let again = open_lane(a, &TOKEN, 1);
                let two = open_lane(a, &TOKEN, 2);
                (one, again, two)
            });
            let got = accept_lanes(&listener, &layout, idle, None, 4096).unwrap();
            drop(sources.join().unwrap());
            got
        });
        let indices: Vec<u32> = got.iter().map(|l| l.index).collect();
        assert_eq!(indices, vec![1, 2]);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A source that opens fewer lanes than its header announced fails the wait after the
    /// timeout, naming how many came.
    #[test]
    fn missing_lanes_fail_after_the_timeout() {
        let (addr, listener, layout, dir) = setup("missing", 3);
        let _one = open_lane(&addr, &TOKEN, 1);
        let t0 = Instant::now();
        let e = accept_lanes(
            &listener,
            &layout,
            Some(Duration::from_millis(300)),
            None,
            4096,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("opened 1 of its 2 lanes"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A lane whose share is corrupted fails the round it belongs to, naming the lane; a lane
    /// that ends another round than the main connection does too.
    #[test]
    fn a_bad_lane_fails_the_round() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for (name, bad) in [("corrupt", true), ("round", false)] {
            let (addr, listener, layout, dir) = setup(name, 2);
            let mut w = open_lane(&addr, &TOKEN, 1);
            let lanes = accept_lanes(&listener, &layout, None, None, 4096).unwrap();
            if bad {
                // A page chunk whose checksum does not match.
                let mut raw = w.into_inner().unwrap();
                let mut frame = Vec::new();
                frame.extend_from_slice(&2u32.to_le_bytes());
                frame.extend_from_slice(&(8 + 4096u32).to_le_bytes());
                frame.extend_from_slice(&0u64.to_le_bytes());
                frame.extend_from_slice(&[1; 4096]);
                frame.extend_from_slice(&0u32.to_le_bytes());
                raw.write_all(&frame).unwrap();
                w = StreamWriter::headless(raw);
            } else {
                w.lane_end(5).unwrap();
            }
            let mut ram = RamReceiver::new(&mem, None).fresh();
            let e = receive_with_lanes(lanes, &mut ram, |_, round_done| round_done(0))
                .unwrap_err()
                .to_string();
            assert!(e.contains("migration lane 1"), "{e}");
            let want = if bad { "checksum" } else { "ended round 5" };
            assert!(e.contains(want), "{e}");
            drop(w);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
