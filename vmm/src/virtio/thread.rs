//! A virtio device's serving thread, the same for every device: told to serve a piece of work
//! (its queues and what serving them needs) until stopped, it gives the work back when it
//! stops; so a reset, a migration's pause and its resume are the same three moves everywhere.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use super::ActivateError;
use crate::seccomp::ThreadKind;

/// A device's thread and where its work is: with the thread (serving), held here (paused), or
/// nowhere (not active).
pub struct DeviceThread<W: Send + 'static> {
    /// `None` ends the thread.
    commands: Sender<Option<W>>,
    stop: Arc<EventFd>,
    /// The thread gives the work back when it stops serving.
    stopped: Receiver<W>,
    thread: Option<JoinHandle<()>>,
    name: &'static str,
    /// Started and not reset since.
    active: bool,
    /// Paused: the work as the thread left it.
    paused: Option<W>,
}

impl<W: Send + 'static> DeviceThread<W> {
    /// Starts thread `name` under the seccomp list of `kind` (by the main thread, before the
    /// vCPUs run: a vCPU thread, which activates devices, may not start threads under its
    /// filter). For each work it is given it runs `serve(work, stop)`, which serves until
    /// `stop` is signalled, finishes what it took, and returns the work.
    pub fn spawn(
        name: &'static str,
        kind: ThreadKind,
        mut serve: impl FnMut(W, &EventFd) -> W + Send + 'static,
    ) -> std::io::Result<DeviceThread<W>> {
        let (commands, rx) = channel::<Option<W>>();
        let (stopped_tx, stopped) = channel::<W>();
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let stop_rx = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                crate::seccomp::enter(kind);
                while let Ok(Some(work)) = rx.recv() {
                    let work = serve(work, &stop_rx);
                    let _ = stop_rx.read();
                    let _ = stopped_tx.send(work);
                }
            })?;
        Ok(DeviceThread {
            commands,
            stop,
            stopped,
            thread: Some(thread),
            name,
            active: false,
            paused: None,
        })
    }

    /// Has the thread serve `work` (the driver started the device).
    pub fn start(&mut self, work: W) -> Result<(), ActivateError> {
        self.send(work)?;
        self.active = true;
        Ok(())
    }

    fn send(&self, work: W) -> Result<(), ActivateError> {
        self.commands
            .send(Some(work))
            .map_err(|_| ActivateError::Thread(std::io::Error::other("the thread has ended")))
    }

    /// Stops the thread's serving (after the batch it is in) and takes the work back.
    fn take_back(&self) -> Option<W> {
        let _ = self.stop.write(1);
        self.stopped.recv().ok()
    }

    /// The device is reset: the work is dropped once the thread let go of it (the queues are
    /// the driver's again only then).
    pub fn reset(&mut self) {
        if std::mem::take(&mut self.active) && self.paused.take().is_none() {
            let _ = self.take_back();
        }
    }

    /// Pauses an active device: the work as the thread left it (every request it took
    /// done). `None` when not active, or when the thread has ended.
    pub fn pause(&mut self) -> Option<&W> {
        if !self.active {
            return None;
        }
        if self.paused.is_none() {
            self.paused = Some(self.take_back()?);
        }
        self.paused.as_ref()
    }

    /// The paused work, if paused.
    pub fn paused(&self) -> Option<&W> {
        self.paused.as_ref()
    }

    /// Serves the paused work again; the thread looks at its queues first, for what came
    /// meanwhile.
    pub fn resume(&mut self) {
        if let Some(work) = self.paused.take() {
            if let Err(e) = self.send(work) {
                warn!("{}: cannot serve the queues again: {e}", self.name);
            }
        }
    }
}

impl<W: Send + 'static> Drop for DeviceThread<W> {
    fn drop(&mut self) {
        self.reset();
        let _ = self.commands.send(None);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("{}: the device thread panicked", self.name);
            }
        }
    }
}
