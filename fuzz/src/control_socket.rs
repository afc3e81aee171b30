//! `control_socket`: one control-socket request line through `vmm::api::handle_line` against a
//! target VM that does nothing, and the same bytes through `parse_size`.

use serde_json::{json, Value};
use vmm::api::{handle_line, parse_size, ApiTarget, MAX_REQUEST_BYTES};

/// A VM that answers every request and does nothing.
#[derive(Debug)]
pub struct NullVm;

impl ApiTarget for NullVm {
    fn stats(&self) -> Value {
        json!({"faults": 0})
    }
    fn reclaim(&self, gpa: u64, len: u64) -> Result<Value, String> {
        match gpa.checked_add(len) {
            Some(_) => Ok(json!({"gpa": gpa, "len": len})),
            None => Err("range wraps".into()),
        }
    }
    fn pause(&self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        Err("not paused".into())
    }
    fn migrate(&self, to: &str, postcopy_after: Option<u32>) -> Result<Value, String> {
        Ok(json!({"to": to, "postcopy_after": postcopy_after}))
    }
    fn info(&self) -> Value {
        json!({"state": "running"})
    }
}

/// Runs one input. The server reads at most [`MAX_REQUEST_BYTES`] of a line, so longer
/// inputs are cut there.
pub fn run(data: &[u8]) {
    let line = &data[..data.len().min(MAX_REQUEST_BYTES)];
    let v = handle_line(line, &NullVm);
    // Every answer is an object with a boolean "ok"; a refusal says why.
    let ok = v.get("ok").and_then(Value::as_bool);
    assert!(ok.is_some(), "response without \"ok\": {v}");
    if ok == Some(false) {
        assert!(
            v.get("error").and_then(Value::as_str).is_some(),
            "refusal without an error string: {v}"
        );
    }
    // The response goes back on one line.
    assert!(!v.to_string().contains('\n'), "multi-line response: {v}");

    if let Ok(s) = std::str::from_utf8(line) {
        if let Ok(n) = parse_size(s) {
            // Whatever was accepted reads back the same in plain decimal and in hex.
            assert_eq!(parse_size(&n.to_string()), Ok(n), "{s:?}");
            assert_eq!(parse_size(&format!("{n:#x}")), Ok(n), "{s:?}");
        }
    }
}
