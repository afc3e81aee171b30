//! Nothing waits for ever on a migration peer (`--migrate-timeout`): a destination drops a
//! source that connects and sends nothing or stops mid-stream, and a source whose destination
//! stops taking the stream fails the migration and keeps its guest, which runs on and passes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{kvm_or_skip, serial};
use crate::util::{assert_source_passed_after_failed_migration, finish, lines, listening, vmm};

/// A destination given `--migrate-timeout 1` whose source connects and sends nothing, then
/// one whose source sends the first bytes of a stream and stops: each ends with exit code 1
/// and a message naming the timeout, within a few seconds, with nothing run.
#[test]
fn a_source_that_connects_and_stalls_is_dropped_after_the_timeout() {
    if !kvm_or_skip("a_source_that_connects_and_stalls_is_dropped_after_the_timeout") {
        return;
    }
    let _g = serial();
    for sent in [&b""[..], &vmm::migrate::stream::MAGIC[..5]] {
        let dst = listening(vmm, &["--migrate-timeout", "1"]);
        let mut src = TcpStream::connect(dst.host_port()).unwrap();
        src.write_all(sent).unwrap();
        let t = Instant::now();
        let (code, out, err) = dst.finish();
        let took = t.elapsed();
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(
            err.contains("sent nothing for 1 s (--migrate-timeout)")
                && err.contains("nothing runs here"),
            "{err}"
        );
        assert!(took < Duration::from_secs(10), "ended after {took:?}");
        drop(src);
    }
}

/// Between a source and its destination, a proxy forwards the first 3 MB of the stream and
/// then stops forwarding while it holds both connections open (a peer that hangs, not one that
/// closes). The destination ends after its `--migrate-timeout 2` with exit code 1; the source's
/// writes stall, it fails the migration after its own 2 s, and its guest runs on and passes
/// (exit code 6, `EXIT_MIGRATE_FAILED`).
#[test]
fn a_stalled_stream_fails_both_ends_and_the_source_runs_on() {
    if !kvm_or_skip("a_stalled_stream_fails_both_ends_and_the_source_runs_on") {
        return;
    }
    let _g = serial();
    let dst = listening(vmm, &["--migrate-timeout", "2"]);
    let dst_addr = dst.host_port().to_owned();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let src_addr = format!("tcp:{}", proxy.local_addr().unwrap());
    let release = Arc::new(AtomicBool::new(false));
    let hold = release.clone();
    let forwarder = std::thread::spawn(move || {
        let (mut from, _) = proxy.accept().unwrap();
        let mut to = TcpStream::connect(&dst_addr).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut left = 3usize << 20;
        while left > 0 {
            let n = match from.read(&mut buf[..left.min(64 << 10)]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            left -= n;
        }
        // Hang: read and forward nothing more, close nothing, until the test is over.
        while !hold.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop((from, to));
    });
    // The guest writes for a second first, so that the full pass is far more than 3 MB.
    let mut src = vmm(&[
        "--migrate-to",
        &src_addr,
        "--migrate-delay-ms",
        "1000",
        "--migrate-timeout",
        "2",
        "--run-for",
        "6",
    ]);
    let src_rx = lines(&mut src);
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 1, "{dout}\n{derr}");
    assert!(
        derr.contains("sent nothing for 2 s (--migrate-timeout)"),
        "{derr}"
    );
    let source = finish(src, src_rx);
    release.store(true, Ordering::SeqCst);
    forwarder.join().unwrap();
    let err = &source.2;
    assert!(
        err.contains("for 2 s (--migrate-timeout)") && err.contains("keeps running here"),
        "{err}"
    );
    assert_source_passed_after_failed_migration("the source's guest", &source);
}
