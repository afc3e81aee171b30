//! Joining the stress tests' threads so that a failing test fails, with its message, in bounded
//! time: a thread that panicked is reported by name once every other thread was told to stop, and a
//! thread still running at the deadline is reported instead of waited for forever.

use std::any::Any;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The message of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// Wait for every thread of `workers` until `deadline`, then call `stop` (tell the helper threads
/// to finish) in every case, then join `helpers` (which must finish within `grace` of `stop`).
/// Returns the workers' results in order; panics, naming the thread and quoting its message, if a
/// thread panicked or is still running.
pub fn join_all<R, H>(
    workers: Vec<(String, JoinHandle<R>)>,
    deadline: Instant,
    stop: impl FnOnce(),
    helpers: Vec<(String, JoinHandle<H>)>,
    grace: Duration,
) -> Vec<R> {
    wait(&workers, deadline);
    stop();
    wait(&helpers, Instant::now() + grace);
    let mut failures = Vec::new();
    let mut results = Vec::new();
    for (name, h) in workers {
        if !h.is_finished() {
            failures.push(format!("{name} is still running at the deadline (a hang)"));
            continue;
        }
        match h.join() {
            Ok(r) => results.push(r),
            Err(p) => failures.push(format!("{name} panicked: {}", panic_message(&*p))),
        }
    }
    for (name, h) in helpers {
        if !h.is_finished() {
            failures.push(format!("{name} did not stop within {grace:?} (a hang)"));
            continue;
        }
        if let Err(p) = h.join() {
            failures.push(format!("{name} panicked: {}", panic_message(&*p)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
    results
}

/// Sleep until every thread of `handles` finished or `until` passed.
fn wait<T>(handles: &[(String, JoinHandle<T>)], until: Instant) {
    while Instant::now() < until && handles.iter().any(|(_, h)| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(5));
    }
}
