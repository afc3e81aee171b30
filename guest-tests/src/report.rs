//! Aggregates the events of every vCPU of a test guest into per-vCPU results and a verdict.

use std::fmt;
use std::time::{Duration, Instant};

use crate::protocol::Event;

/// Where one vCPU stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// No event yet.
    NotStarted,
    /// Started, no final event yet.
    Running,
    /// Reported PASS.
    Passed,
    /// Reported FAIL, BadParams, or broke the protocol.
    Failed,
}

/// What one vCPU reported.
#[derive(Clone, Debug)]
pub struct VcpuResult {
    /// Current state.
    pub state: VcpuState,
    /// Host time of the START event.
    pub started: Option<Instant>,
    /// Host time of the final event.
    pub finished: Option<Instant>,
    /// Last generation reported by PROGRESS.
    pub generation: u64,
    /// Pages verified or touched (from PASS, else the last PROGRESS).
    pub pages: u64,
    /// Page writes (dirty).
    pub writes: u64,
    /// Running checksum.
    pub checksum: u64,
    /// Pages re-initialised after reclaims.
    pub reinit: u64,
    /// Guest TSC cycles reported by PASS.
    pub cycles: u64,
    /// Why it failed, in words.
    pub failure: Option<String>,
}

impl VcpuResult {
    fn new() -> VcpuResult {
        VcpuResult {
            state: VcpuState::NotStarted,
            started: None,
            finished: None,
            generation: 0,
            pages: 0,
            writes: 0,
            checksum: 0,
            reinit: 0,
            cycles: 0,
            failure: None,
        }
    }

    /// Host time from START to the final event (or to `now` while running).
    pub fn elapsed(&self, now: Instant) -> Option<Duration> {
        let start = self.started?;
        Some(
            self.finished
                .unwrap_or(now)
                .saturating_duration_since(start),
        )
    }

    fn fail(&mut self, now: Instant, why: String) {
        self.state = VcpuState::Failed;
        self.finished.get_or_insert(now);
        self.failure.get_or_insert(why);
    }
}

/// The results of all vCPUs of one run.
#[derive(Clone, Debug)]
pub struct Report {
    vcpus: Vec<VcpuResult>,
}

impl Report {
    /// A report for `nr_vcpus` vCPUs, none started.
    pub fn new(nr_vcpus: usize) -> Report {
        Report {
            vcpus: (0..nr_vcpus).map(|_| VcpuResult::new()).collect(),
        }
    }

    /// Records `event` from `vcpu` at host time `now`; returns true if it was the
    /// vCPU's final event (the vCPU will not report again).
    pub fn record(&mut self, vcpu: usize, event: Event, now: Instant) -> bool {
        let Some(r) = self.vcpus.get_mut(vcpu) else {
            return false;
        };
        if matches!(event, Event::Idle | Event::Sleep { .. }) {
            // A finished guest idles until it is stopped, a paced one sleeps between
            // writes; nothing to record.
            return false;
        }
        if matches!(r.state, VcpuState::Passed | VcpuState::Failed) {
            r.fail(now, format!("event after the final one: {event:?}"));
            return false;
        }
        match event {
            Event::Start { vcpu: id, .. } => {
                r.started = Some(now);
                r.state = VcpuState::Running;
                if id != vcpu as u64 {
                    r.fail(now, format!("started as vCPU {id}, runs as vCPU {vcpu}"));
                    return true;
                }
                false
            }
            Event::Progress {
                generation,
                pages,
                checksum,
                writes,
                ..
            } => {
                if r.state != VcpuState::Running {
                    r.fail(now, "progress before start".to_string());
                    return true;
                }
                r.generation = generation;
                r.pages = pages;
                r.checksum = checksum;
                r.writes = writes;
                false
            }
            Event::Pass {
                pages,
                checksum,
                reinit,
                cycles,
                writes,
            } => {
                if r.state != VcpuState::Running {
                    r.fail(now, "pass before start".to_string());
                    return true;
                }
                r.state = VcpuState::Passed;
                r.finished = Some(now);
                r.pages = pages;
                r.checksum = checksum;
                r.reinit = reinit;
                r.cycles = cycles;
                r.writes = writes;
                true
            }
            Event::Fail {
                gpa,
                expected,
                actual,
                generation,
            } => {
                r.generation = generation;
                r.fail(
                    now,
                    format!(
                        "gpa {gpa:#x} generation {generation}: expected {expected:#018x}, \
                         found {actual:#018x}"
                    ),
                );
                true
            }
            Event::BadParams { magic, kind } => {
                r.fail(
                    now,
                    format!("bad parameter block: magic {magic:#x}, kind {kind}"),
                );
                true
            }
            Event::Unknown { raw } => {
                r.fail(now, format!("unknown port write {raw:#x}"));
                true
            }
            Event::Idle | Event::Sleep { .. } => false,
        }
    }

    /// Marks `vcpu` failed for a reason found by the host (e.g. a KVM exit it could
    /// not handle).
    pub fn fail(&mut self, vcpu: usize, why: String, now: Instant) {
        if let Some(r) = self.vcpus.get_mut(vcpu) {
            r.fail(now, why);
        }
    }

    /// Marks every vCPU that has not passed or failed yet as failed for `why` (the run
    /// ended without its final report).
    pub fn fail_unfinished(&mut self, why: &str) {
        let now = Instant::now();
        for r in &mut self.vcpus {
            if !matches!(r.state, VcpuState::Passed | VcpuState::Failed) {
                r.fail(now, why.to_string());
            }
        }
    }

    /// Per-vCPU results, indexed by vCPU id.
    pub fn vcpus(&self) -> &[VcpuResult] {
        &self.vcpus
    }

    /// True when every vCPU has passed or failed.
    pub fn all_finished(&self) -> bool {
        self.vcpus
            .iter()
            .all(|r| matches!(r.state, VcpuState::Passed | VcpuState::Failed))
    }

    /// True when any vCPU failed.
    pub fn any_failed(&self) -> bool {
        self.vcpus.iter().any(|r| r.state == VcpuState::Failed)
    }

    /// The verdict: every vCPU passed.
    pub fn passed(&self) -> bool {
        !self.vcpus.is_empty() && self.vcpus.iter().all(|r| r.state == VcpuState::Passed)
    }

    /// Total pages verified or touched by all vCPUs.
    pub fn total_pages(&self) -> u64 {
        self.vcpus.iter().map(|r| r.pages).sum()
    }

    /// Total pages re-initialised after reclaims.
    pub fn total_reinit(&self) -> u64 {
        self.vcpus.iter().map(|r| r.reinit).sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = Instant::now();
        writeln!(
            f,
            "{:>5} {:>7} {:>5} {:>10} {:>10} {:>8} {:>10}  checksum",
            "vcpu", "result", "gen", "pages", "writes", "reinit", "time"
        )?;
        for (i, r) in self.vcpus.iter().enumerate() {
            let state = match r.state {
                VcpuState::NotStarted => "idle",
                VcpuState::Running => "running",
                VcpuState::Passed => "PASS",
                VcpuState::Failed => "FAIL",
            };
            let time = r
                .elapsed(now)
                .map(|d| format!("{:.3}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".to_string());
            writeln!(
                f,
                "{i:>5} {state:>7} {:>5} {:>10} {:>10} {:>8} {time:>10}  {:#018x}",
                r.generation, r.pages, r.writes, r.reinit, r.checksum
            )?;
            if let Some(why) = &r.failure {
                writeln!(f, "      vcpu {i} failed: {why}")?;
            }
        }
        write!(f, "{}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass() -> Event {
        Event::Pass {
            pages: 10,
            checksum: 1,
            reinit: 0,
            cycles: 5,
            writes: 0,
        }
    }

    #[test]
    fn passes_when_every_vcpu_passes() {
        let now = Instant::now();
        let mut r = Report::new(2);
        assert!(!r.passed());
        for v in 0..2 {
            assert!(!r.record(
                v,
                Event::Start {
                    vcpu: v as u64,
                    tsc: 0
                },
                now
            ));
            assert!(r.record(v, pass(), now));
        }
        assert!(r.all_finished());
        assert!(r.passed());
        assert_eq!(r.total_pages(), 20);
        assert!(r.to_string().ends_with("PASS"));
    }

    #[test]
    fn one_failure_fails_the_run_and_names_the_address() {
        let now = Instant::now();
        let mut r = Report::new(2);
        r.record(0, Event::Start { vcpu: 0, tsc: 0 }, now);
        r.record(1, Event::Start { vcpu: 1, tsc: 0 }, now);
        r.record(0, pass(), now);
        let fail = Event::Fail {
            gpa: 0x40_1000,
            expected: 7,
            actual: 0,
            generation: 2,
        };
        assert!(r.record(1, fail, now));
        assert!(r.all_finished());
        assert!(!r.passed());
        let text = r.to_string();
        assert!(text.contains("gpa 0x401000"), "{text}");
        assert!(text.ends_with("FAIL"));
    }

    #[test]
    fn protocol_violations_fail() {
        let now = Instant::now();
        let mut r = Report::new(3);
        // Wrong id.
        assert!(r.record(0, Event::Start { vcpu: 2, tsc: 0 }, now));
        // Pass without start.
        assert!(r.record(1, pass(), now));
        // Unknown write.
        r.record(2, Event::Start { vcpu: 2, tsc: 0 }, now);
        assert!(r.record(2, Event::Unknown { raw: 1 }, now));
        assert!(r.vcpus().iter().all(|v| v.state == VcpuState::Failed));
        // An event after the final one is itself a failure, not a resurrection.
        let mut r = Report::new(1);
        r.record(0, Event::Start { vcpu: 0, tsc: 0 }, now);
        r.record(0, pass(), now);
        // Idling after the final event is what a finished guest does.
        assert!(!r.record(0, Event::Idle, now));
        assert!(!r.record(0, Event::Sleep { cycles: 5 }, now));
        assert!(r.passed());
        r.record(0, Event::Start { vcpu: 0, tsc: 0 }, now);
        assert!(!r.passed());
    }

    #[test]
    fn unfinished_vcpus_do_not_pass() {
        let now = Instant::now();
        let mut r = Report::new(2);
        r.record(0, Event::Start { vcpu: 0, tsc: 0 }, now);
        r.record(0, pass(), now);
        r.record(1, Event::Start { vcpu: 1, tsc: 0 }, now);
        assert!(!r.all_finished());
        assert!(!r.passed());
        assert!(!r.any_failed());
        r.fail(1, "KVM internal error".into(), now);
        assert!(r.any_failed());
        let mut r = Report::new(3);
        r.record(0, Event::Start { vcpu: 0, tsc: 0 }, now);
        r.record(0, pass(), now);
        r.record(1, Event::Start { vcpu: 1, tsc: 0 }, now);
        r.fail_unfinished("timed out");
        assert_eq!(r.vcpus()[0].state, VcpuState::Passed);
        assert_eq!(r.vcpus()[1].failure.as_deref(), Some("timed out"));
        assert_eq!(r.vcpus()[2].state, VcpuState::Failed);
    }
}
