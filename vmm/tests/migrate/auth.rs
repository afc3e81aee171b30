//! `--migrate-secret`: two real `vmm` processes with the same secret migrate and the
//! destination's guest passes; a source without the secret, or with another, is refused by
//! the destination before any guest memory is written there (it never reports a round), and
//! the source's guest runs on and passes; a source with a secret refuses a destination
//! without one. The same between two network namespaces. Secret files that are not private or
//! too short are refused at start.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Child;

use crate::common::{kvm_or_skip, serial};
use crate::hosts::TwoHosts;
use crate::util::{
    assert_guest_passed, assert_source_passed_after_failed_migration, finish, lines, listening,
    listening_at, run_to_end, vmm, vmm_on_host,
};

/// A secret file of `content`, mode 0600, unique to this process and `name`.
pub(crate) fn secret(name: &str, content: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-secret-{}-{name}", std::process::id()));
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

pub(crate) const KEY_A: &str = "correct horse battery staple\n";
const KEY_B: &str = "a different secret of the same size\n";

/// A migration whose ends have `src_key` and `dst_key` (`None`: no --migrate-secret), over
/// loopback or between `hosts`. Returns (source, destination) as [`finish`] gives them.
#[allow(clippy::type_complexity)]
fn migrate_with(
    test: &str,
    src_key: Option<&str>,
    dst_key: Option<&str>,
    hosts: Option<&TwoHosts>,
) -> ((i32, String, String), (i32, String, String)) {
    let src_file = src_key.map(|k| secret(&format!("{test}-src"), k));
    let dst_file = dst_key.map(|k| secret(&format!("{test}-dst"), k));
    let mut dst_extra = vec!["--run-for", "0"];
    if let Some(f) = &dst_file {
        dst_extra.extend(["--migrate-secret", f.to_str().unwrap()]);
    }
    let dst = match hosts {
        Some(h) => listening_at(
            h.dst_addr(),
            |a| vmm_on_host(Some(&h.dst), "none", a),
            &dst_extra,
        ),
        None => listening(vmm, &dst_extra),
    };
    let mut src_args = vec![
        "--migrate-to",
        dst.addr.as_str(),
        "--migrate-delay-ms",
        "200",
    ];
    // A refused migration leaves the source's guest running: it stops after 2 s and passes.
    let refused = src_key != dst_key;
    if refused {
        src_args.extend(["--run-for", "2"]);
    }
    if let Some(f) = &src_file {
        src_args.extend(["--migrate-secret", f.to_str().unwrap()]);
    }
    let mut src: Child = vmm_on_host(hosts.map(|h| h.src.as_str()), "none", &src_args);
    let src_rx = lines(&mut src);
    let s = finish(src, src_rx);
    let d = dst.finish();
    for f in src_file.iter().chain(dst_file.iter()) {
        let _ = std::fs::remove_file(f);
    }
    (s, d)
}

/// The destination refused its source before any guest memory was written: exit 1, the
/// reason on stderr, and no round received.
fn refused_before_any_page(d: &(i32, String, String), why: &str) {
    let (code, out, err) = d;
    assert_eq!(*code, 1, "destination: {out}\n{err}");
    assert!(err.contains(why), "wanted {why:?} in: {err}");
    assert!(
        err.contains("nothing runs here"),
        "the destination says no VM runs: {err}"
    );
    assert!(
        !err.contains("incoming round") && !out.contains("received"),
        "the destination received guest memory: {out}\n{err}"
    );
}

#[test]
fn the_same_secret_on_both_ends_migrates_and_the_guest_passes() {
    if !kvm_or_skip("the_same_secret_on_both_ends_migrates_and_the_guest_passes") {
        return;
    }
    let _g = serial();
    let (s, d) = migrate_with("same", Some(KEY_A), Some(KEY_A), None);
    assert_eq!(s.0, 0, "source: {}\n{}", s.1, s.2);
    assert!(s.1.contains("complete"), "{}", s.1);
    assert_guest_passed("destination", &d);
}

/// The same, between two hosts: the secret travels nowhere, the proofs cross the link.
#[test]
fn the_same_secret_migrates_between_hosts() {
    let test = "the_same_secret_migrates_between_hosts";
    if !kvm_or_skip(test) {
        return;
    }
    let _g = serial();
    let Some(hosts) = TwoHosts::new(test) else {
        return;
    };
    let (s, d) = migrate_with("hosts", Some(KEY_A), Some(KEY_A), Some(&hosts));
    assert_eq!(s.0, 0, "source: {}\n{}", s.1, s.2);
    assert_guest_passed("destination", &d);
}

/// A wrong secret between two hosts: refused on the destination's host, the source's guest
/// runs on.
#[test]
fn another_secret_is_refused_between_hosts() {
    let test = "another_secret_is_refused_between_hosts";
    if !kvm_or_skip(test) {
        return;
    }
    let _g = serial();
    let Some(hosts) = TwoHosts::new(test) else {
        return;
    };
    let (s, d) = migrate_with("hosts-other", Some(KEY_B), Some(KEY_A), Some(&hosts));
    refused_before_any_page(&d, "instead of proving the migration secret");
    assert_source_passed_after_failed_migration("the source's guest", &s);
}

#[test]
fn a_source_without_the_secret_is_refused_and_runs_on() {
    if !kvm_or_skip("a_source_without_the_secret_is_refused_and_runs_on") {
        return;
    }
    let _g = serial();
    let (s, d) = migrate_with("none", None, Some(KEY_A), None);
    refused_before_any_page(&d, "did not authenticate");
    assert_source_passed_after_failed_migration("the source's guest", &s);
}

#[test]
fn a_source_with_another_secret_is_refused_and_runs_on() {
    if !kvm_or_skip("a_source_with_another_secret_is_refused_and_runs_on") {
        return;
    }
    let _g = serial();
    let (s, d) = migrate_with("other", Some(KEY_B), Some(KEY_A), None);
    refused_before_any_page(&d, "instead of proving the migration secret");
    assert!(
        s.2.contains("did not prove the migration secret"),
        "the source says why: {}",
        s.2
    );
    assert_source_passed_after_failed_migration("the source's guest", &s);
}

#[test]
fn a_source_with_a_secret_refuses_a_destination_without_one() {
    if !kvm_or_skip("a_source_with_a_secret_refuses_a_destination_without_one") {
        return;
    }
    let _g = serial();
    let (s, d) = migrate_with("dst-none", Some(KEY_A), None, None);
    refused_before_any_page(&d, "start this destination with the same --migrate-secret");
    assert!(
        s.2.contains("closed the connection instead of proving"),
        "the source says why: {}",
        s.2
    );
    assert_source_passed_after_failed_migration("the source's guest", &s);
}

#[test]
fn unfit_secret_files_are_refused_at_start() {
    let open = secret("open", KEY_A);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let short = secret("short", "tooshort\n");
    for (file, why) in [(&open, "chmod 600"), (&short, "at least 16")] {
        let (code, out, err) = run_to_end(vmm(&[
            "--incoming",
            "tcp:127.0.0.1:1",
            "--migrate-secret",
            file.to_str().unwrap(),
        ]));
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(
            err.contains("--migrate-secret") && err.contains(why),
            "{err}"
        );
        assert!(!out.contains("waiting for"), "it listened anyway: {out}");
    }
    let _ = std::fs::remove_file(open);
    let _ = std::fs::remove_file(short);
}
