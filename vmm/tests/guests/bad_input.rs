//! `vmm --guest` refuses bad input with one clear line and exit code 1 (no KVM needed: the
//! checks run before any VM is made).

use crate::util::{vmm_plain, Run};

fn assert_error(run: &Run, needle: &str) {
    assert_eq!(run.code, 1, "stderr: {}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in stderr:\n{}", run.stderr));
    assert!(line.starts_with("error"), "{line}");
}

#[test]
fn unknown_guest_name_lists_the_valid_ones() {
    let run = vmm_plain(&["--guest", "linux", "--mem", "64M"]);
    assert_error(
        &run,
        "unknown guest 'linux': choose one of stress, touch, dirty",
    );
}

#[test]
fn too_little_memory_says_the_minimum() {
    let run = vmm_plain(&["--guest", "stress", "--mem", "8M", "--cpus", "4"]);
    assert_error(&run, "needs at least 12M");
    let run = vmm_plain(&[
        "--guest",
        "stress",
        "--mode",
        "shared-hot",
        "--mem",
        "4M",
        "--cpus",
        "4",
    ]);
    assert_error(&run, "needs at least 6M");
}

#[test]
fn mode_is_refused_for_guests_other_than_stress() {
    let run = vmm_plain(&["--guest", "touch", "--mode", "random", "--mem", "64M"]);
    assert_error(&run, "--mode random is for the stress guest");
}

#[test]
fn unknown_mode_lists_the_valid_ones() {
    let run = vmm_plain(&["--guest", "stress", "--mode", "hot", "--mem", "64M"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("sequential") && run.stderr.contains("shared-hot"),
        "{}",
        run.stderr
    );
}
