//! The nested-batch check is part of the library as the VMM links it (release, no `cfg(test)`):
//! this file is compiled against the non-test library, so it sees what a release VMM gets.

#![cfg(not(loom))]

use stage2::{Config, Ept, NoopTlb, PageSize, Perms, Stage2};

fn engine() -> Stage2<Ept, NoopTlb> {
    Stage2::new(Ept, NoopTlb, Config::default())
}

#[test]
#[should_panic(expected = "opened inside another batch")]
fn nested_batch_panics_in_the_library_as_linked() {
    let s2 = engine();
    let mut outer = s2.batch();
    outer
        .map(0, 0x1000, 0x10_0000, Perms::RW, PageSize::Size4K)
        .unwrap();
    // What seed 004's set_ptes did: an install path opens its own batch inside the caller's.
    let _ = s2.map_range(0x1000, 0x1000, 0x10_1000, Perms::RW, PageSize::Size4K);
}

#[test]
fn batches_after_a_closed_one_and_on_other_threads_are_fine() {
    let s2 = engine();
    let b = s2.batch();
    // Another thread's batch is not nested in this one.
    std::thread::scope(|s| {
        s.spawn(|| {
            s2.map_range(0x20_0000, 0x1000, 0x20_0000, Perms::R, PageSize::Size4K)
                .unwrap()
        });
    });
    drop(b);
    assert_eq!(
        s2.map_range(0, 0x2000, 0x10_0000, Perms::RW, PageSize::Size4K),
        Ok(2)
    );
}
