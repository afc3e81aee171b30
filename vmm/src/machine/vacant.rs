//! A `vmm --stay` with no VM: between a VM that migrated out and the next one, the process
//! serves its control socket for `receive` (listen for the next VM's migration source) and
//! `shutdown` (end the process). The listening socket is made on the main thread: the control
//! socket's threads may not create sockets (seccomp, [`crate::seccomp`]).

use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::{self, ApiServer, ApiTarget};
use crate::migrate::transport::Listener;
use crate::migrate::Address;

/// How long a `receive` request waits for the main thread to listen.
const LISTEN_REPLY: Duration = Duration::from_secs(10);

/// What the process does next.
pub enum Next {
    /// Accept the next VM's source on this listener (`receive`).
    Receive(Listener),
    /// End the process (`shutdown`).
    Shutdown,
}

/// A request from the control socket to the main thread.
enum Request {
    Receive {
        from: Address,
        reply: Sender<Result<String, String>>,
    },
    Shutdown,
}

/// What the process has done so far, for `info` and `stats`.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// VMs that ran here (received or started) and left.
    pub vms: u64,
    /// What happened last: how the last VM left, or why a migration in failed.
    pub last: String,
}

/// The control socket of a process with no VM.
pub struct Vacancy {
    /// Kept until the next VM's own control socket replaces it (a client asking meanwhile
    /// hears "receiving").
    _server: ApiServer,
    requests: Receiver<Request>,
    target: Arc<Vacant>,
}

impl Vacancy {
    /// Serves the control socket at `path` with no VM.
    pub fn open(path: &Path, client_timeout: Duration, history: &History) -> anyhow::Result<Self> {
        let (tx, rx) = channel();
        let target = Arc::new(Vacant {
            requests: Mutex::new(tx),
            state: Mutex::new("empty".into()),
            history: history.clone(),
            since: Instant::now(),
        });
        let server = api::serve_with(path, target.clone(), client_timeout)?;
        // A signal now ends the process at once (no VM to stop); the socket goes with it.
        super::signals::detach();
        super::signals::remove_on_early_exit(path.to_path_buf());
        Ok(Vacancy {
            _server: server,
            requests: rx,
            target,
        })
    }

    /// Says (in `info`) that this process is receiving at `at`; `receive` is refused.
    pub fn receiving(&self, at: &Address) {
        *self.target.state.lock().unwrap_or_else(|p| p.into_inner()) = format!("{RECEIVING} {at}");
    }

    /// Waits until `receive` listens or `shutdown` asks the process to end.
    pub fn wait(&self) -> anyhow::Result<Next> {
        println!(
            "no VM here ({} so far); waiting for `receive` on the control socket {}",
            self.target.history.vms,
            self._server.path().display()
        );
        loop {
            let Ok(req) = self.requests.recv() else {
                anyhow::bail!("the control socket stopped while this vmm waited for a VM");
            };
            match req {
                Request::Shutdown => return Ok(Next::Shutdown),
                Request::Receive { from, reply } => match super::incoming::listen(&from) {
                    Ok(listener) => {
                        self.receiving(&listener.address());
                        let _ = reply.send(Ok(listener.address().to_string()));
                        return Ok(Next::Receive(listener));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("{e:#}")));
                    }
                },
            }
        }
    }
}

/// How `info` begins the state of a process that listens for a source.
const RECEIVING: &str = "receiving at";

/// The control socket's view of a process with no VM.
struct Vacant {
    requests: Mutex<Sender<Request>>,
    state: Mutex<String>,
    history: History,
    since: Instant,
}

impl Vacant {
    fn no_vm(&self, what: &str) -> String {
        format!(
            "no VM here to {what} ({}); `receive` takes the next one in",
            self.history.last
        )
    }
}

impl ApiTarget for Vacant {
    fn stats(&self) -> Value {
        json!({"vm": null, "vms": self.history.vms})
    }
    fn reclaim(&self, _gpa: u64, _len: u64) -> Result<Value, String> {
        Err(self.no_vm("reclaim from"))
    }
    fn pause(&self) -> Result<(), String> {
        Err(self.no_vm("pause"))
    }
    fn resume(&self) -> Result<(), String> {
        Err(self.no_vm("resume"))
    }
    fn migrate(&self, to: &str, _postcopy_after: Option<u32>) -> Result<Value, String> {
        Err(self.no_vm(&format!("migrate to {to}")))
    }
    fn info(&self) -> Value {
        json!({
            "state": *self.state.lock().unwrap_or_else(|p| p.into_inner()),
            "payload": null,
            "vms": self.history.vms,
            "last": self.history.last,
            "empty_s": self.since.elapsed().as_secs_f64(),
        })
    }
    fn shutdown(&self) -> Result<Value, String> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Request::Shutdown)
            .map_err(|_| "this vmm is already receiving a VM or ending".to_string())?;
        Ok(json!({"how": "no VM; the vmm process ends", "exit_code": crate::exit::EXIT_OK}))
    }
    fn receive(&self, from: &str) -> Result<Value, String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if state.starts_with(RECEIVING) {
            return Err(format!("this vmm is already {state}"));
        }
        let from: Address = from
            .parse()
            .map_err(|e| format!("receive from {from}: {e}"))?;
        let (reply, answer) = channel();
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Request::Receive { from, reply })
            .map_err(|_| "this vmm is already receiving a VM or ending".to_string())?;
        match answer.recv_timeout(LISTEN_REPLY) {
            Ok(Ok(at)) => Ok(json!({"listening": at})),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("this vmm is already receiving a VM or ending".into()),
        }
    }
}

/// Receives `Next` requests without a control socket: for tests of the protocol.
#[cfg(test)]
fn requests_for_test() -> (Arc<Vacant>, Receiver<Request>) {
    let (tx, rx) = channel();
    (
        Arc::new(Vacant {
            requests: Mutex::new(tx),
            state: Mutex::new("empty".into()),
            history: History {
                vms: 1,
                last: "VM 1 migrated out".into(),
            },
            since: Instant::now(),
        }),
        rx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_no_vm_the_vm_commands_are_refused_with_what_to_do() {
        let (v, _rx) = requests_for_test();
        for line in [
            r#"{"cmd":"pause"}"#,
            r#"{"cmd":"resume"}"#,
            r#"{"cmd":"reclaim","gpa":0,"len":4096}"#,
            r#"{"cmd":"migrate","to":"unix:/tmp/x"}"#,
        ] {
            let r = api::handle_line(line.as_bytes(), v.as_ref());
            assert_eq!(r["ok"], false, "{line}");
            let e = r["error"].as_str().unwrap();
            assert!(e.contains("no VM here") && e.contains("receive"), "{e}");
        }
        let r = api::handle_line(br#"{"cmd":"info"}"#, v.as_ref());
        assert_eq!(r["info"]["state"], "empty");
        assert_eq!(r["info"]["vms"], 1);
    }

    #[test]
    fn receive_needs_an_address_and_is_answered_by_the_main_thread() {
        let (v, rx) = requests_for_test();
        let r = api::handle_line(br#"{"cmd":"receive"}"#, v.as_ref());
        assert!(r["error"].as_str().unwrap().contains("needs \"from\""));
        let r = api::handle_line(br#"{"cmd":"receive","from":"udp:1"}"#, v.as_ref());
        assert_eq!(r["ok"], false);
        assert!(
            rx.try_recv().is_err(),
            "a bad address reached the main thread"
        );
        // The main thread's answer is the reply.
        let main = std::thread::spawn(move || match rx.recv().unwrap() {
            Request::Receive { from, reply } => {
                reply.send(Ok(from.to_string())).unwrap();
            }
            Request::Shutdown => panic!("shutdown instead of receive"),
        });
        let r = api::handle_line(
            br#"{"cmd":"receive","from":"tcp:127.0.0.1:4444"}"#,
            v.as_ref(),
        );
        main.join().unwrap();
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["receive"]["listening"], "tcp:127.0.0.1:4444");
    }

    #[test]
    fn once_the_main_thread_stopped_listening_for_requests_they_are_refused() {
        let (v, rx) = requests_for_test();
        drop(rx);
        let r = api::handle_line(br#"{"cmd":"shutdown"}"#, v.as_ref());
        assert!(r["error"].as_str().unwrap().contains("already receiving"));
    }
}
