//! The machine-readable figures of one source-side migration (`--migrate-json PATH`): what
//! the demo's plot and the benchmarks read. The field names are a contract with `tools/`.
//!
//! ```json
//! {"mode": "precopy", "dirty_mode": "kvm-bitmap", "total_ms": 812.4, "downtime_ms": 41.2,
//!  "bytes_sent": 563872614, "connection_bytes": [563872614], "ram_bytes": 536870912, "vcpus": 2,
//!  "rounds": [{"round": 0, "dirty_pages": 131072, "bytes": 537919488, "ms": 402.1,
//!              "rate_mb_s": 1337.7, "est_downtime_ms": 12.3}],
//!  "postcopy": null}
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dirty::DirtyMode;

/// `"precopy"` or `"postcopy"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Rounds until the downtime fits, then the last round with the guest paused.
    Precopy,
    /// Rounds, then the guest moves and the rest follows on demand and in the background.
    Postcopy,
}

/// One round as sent by the source. Round 0 is the full pass; in precopy the last round is
/// the one sent with the guest paused (its `est_downtime_ms` is 0).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundFigures {
    /// Round number, from 0.
    pub round: u32,
    /// Pages sent in the round (the full pass counts every page of RAM).
    pub dirty_pages: u64,
    /// Stream bytes of the round (page data, zero runs, framing).
    pub bytes: u64,
    /// Wall time of the round, milliseconds.
    pub ms: f64,
    /// `bytes` over `ms`, in MB (10^6 bytes) per second.
    pub rate_mb_s: f64,
    /// Pages dirty after the round times the page size, over this round's rate: the pause
    /// the next round would need if it were the last.
    pub est_downtime_ms: f64,
}

impl RoundFigures {
    /// Round `round`: `dirty_pages` pages in `bytes` of stream, sent in `took`. The downtime
    /// estimate is 0; a running round sets it.
    pub fn new(round: u32, dirty_pages: u64, bytes: u64, took: std::time::Duration) -> Self {
        let secs = took.as_secs_f64().max(1e-6);
        RoundFigures {
            round,
            dirty_pages,
            bytes,
            ms: secs * 1e3,
            rate_mb_s: bytes as f64 / secs / 1e6,
            est_downtime_ms: 0.0,
        }
    }
}

/// The postcopy phase, from the switch to the destination's "all pages received".
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyFigures {
    /// Pages the destination asked for because its guest touched them (served first).
    pub requested_pages: u64,
    /// Pages the source pushed in the background.
    pub pushed_pages: u64,
    /// Milliseconds from the switch to the destination's "all pages received".
    pub ms: f64,
}

/// Everything `--migrate-json` writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// Precopy or postcopy.
    pub mode: MigrationMode,
    /// `kvm-bitmap`, `kvm-ring` or `stage2-wp`.
    pub dirty_mode: String,
    /// Connect to the end (precopy: the destination's "guest running"; postcopy: its "all
    /// pages received"), milliseconds.
    pub total_ms: f64,
    /// Guest paused on the source to running on the destination, milliseconds.
    pub downtime_ms: f64,
    /// Bytes the source wrote to the stream.
    pub bytes_sent: u64,
    /// Of those, per connection (`--migrate-connections`): the main one first, then each
    /// lane's.
    #[serde(default)]
    pub connection_bytes: Vec<u64>,
    /// Per round, in order.
    pub rounds: Vec<RoundFigures>,
    /// The postcopy phase (null for precopy).
    pub postcopy: Option<PostcopyFigures>,
    /// Guest RAM bytes.
    pub ram_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// The `--dirty-mode` spelling of a mode.
pub fn dirty_mode_name(m: DirtyMode) -> &'static str {
    m.name()
}

impl MigrationSummary {
    /// The summary as a JSON value (the control socket's `migrate` answer carries it).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("the summary is plain data")
    }

    /// Writes the summary, pretty-printed, to `path`.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }
}

/// Milliseconds of a duration, as the JSON carries them.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field names and shapes are what tools/ parses: a rename here breaks the demo.
    #[test]
    fn field_names_are_the_contract() {
        let s = MigrationSummary {
            mode: MigrationMode::Postcopy,
            dirty_mode: dirty_mode_name(DirtyMode::Stage2Wp).into(),
            total_ms: 1.5,
            downtime_ms: 0.5,
            bytes_sent: 7,
            connection_bytes: vec![5, 2],
            rounds: vec![RoundFigures {
                round: 0,
                dirty_pages: 3,
                bytes: 7,
                ms: 1.0,
                rate_mb_s: 2.0,
                est_downtime_ms: 0.25,
            }],
            postcopy: Some(PostcopyFigures {
                requested_pages: 1,
                pushed_pages: 2,
                ms: 3.0,
            }),
            ram_bytes: 4096,
            vcpus: 2,
        };
        let v = s.to_json();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "bytes_sent",
                "connection_bytes",
                "dirty_mode",
                "downtime_ms",
                "mode",
                "postcopy",
                "ram_bytes",
                "rounds",
                "total_ms",
                "vcpus"
            ]
        );
        assert_eq!(v["mode"], "postcopy");
        assert_eq!(v["dirty_mode"], "stage2-wp");
        let mut round: Vec<&str> = v["rounds"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        round.sort_unstable();
        assert_eq!(
            round,
            [
                "bytes",
                "dirty_pages",
                "est_downtime_ms",
                "ms",
                "rate_mb_s",
                "round"
            ]
        );
        let mut pc: Vec<&str> = v["postcopy"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        pc.sort_unstable();
        assert_eq!(pc, ["ms", "pushed_pages", "requested_pages"]);
        let precopy = MigrationSummary {
            mode: MigrationMode::Precopy,
            postcopy: None,
            ..s
        };
        let v = precopy.to_json();
        assert_eq!(v["mode"], "precopy");
        assert!(v["postcopy"].is_null());
        let back: MigrationSummary = serde_json::from_value(v).unwrap();
        assert_eq!(back, precopy);
    }
}
