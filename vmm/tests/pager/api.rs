//! The control socket wired to a real pager (real userfaultfd and memory, a thread as the vCPU):
//! stats show the touches, a reclaim drops memory, bad ranges get the pager's error text and
//! paging goes on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;
use stage2::PageSize;
use vmm::api::{request, serve, ApiFns};
use vmm::memory::RamRegion;
use vmm::pager::{Pager, PagerConfig};

const PAGE: u64 = 4096;

#[test]
fn socket_drives_a_real_pager() {
    let len: u64 = 64 << 20;
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let base = p as u64;
    let region = RamRegion {
        gpa: 0,
        len,
        host_addr: base,
    };
    let cfg = PagerConfig {
        fault_around_pages: 1,
        ..PagerConfig::for_vcpus(1)
    };
    let pager = Arc::new(Pager::start_with_regions(&[region], PageSize::Size4K, cfg).unwrap());
    let paused = Arc::new(AtomicU64::new(0));
    let (p1, p2, p3, p4) = (pager.clone(), pager.clone(), paused.clone(), paused.clone());
    let target = ApiFns {
        stats: Box::new(move || p1.stats().to_json()),
        reclaim: Box::new(move |gpa, len| {
            p2.reclaim(gpa, len)
                .map(|r| r.to_json())
                .map_err(|e| e.to_string())
        }),
        pause: Box::new(move || {
            p3.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }),
        resume: Box::new(move || {
            p4.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }),
    };
    let path = std::env::temp_dir().join(format!("vmm-api-pager-{}.sock", std::process::id()));
    let server = serve(&path, Arc::new(target)).unwrap();

    let write = |gpa: u64, v: u64| {
        // SAFETY: inside the live mapping.
        unsafe { std::ptr::write_volatile((base + gpa) as *mut u64, v) }
    };
    let read = |gpa: u64| -> u64 {
        // SAFETY: inside the live mapping.
        unsafe { std::ptr::read_volatile((base + gpa) as *const u64) }
    };
    // A thread stands in for the vCPU (the faulting thread must not be the handler).
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..10 {
                write(i * PAGE, 100 + i);
            }
        });
    });
    let st = request(&path, &json!({"cmd": "stats"})).unwrap();
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["stats"]["stage2"]["installs_4k"], 10, "{st}");
    assert_eq!(st["stats"]["paging"]["events_missing"], 10);

    // Bad ranges: the pager's own error text comes back; nothing is dropped.
    for (gpa, len, want) in [
        (json!("64M"), json!("4K"), "not inside guest RAM"),
        (json!("0x800"), json!(4096), "not aligned"),
        (json!(0), json!(0), "is empty"),
    ] {
        let r = request(&path, &json!({"cmd": "reclaim", "gpa": gpa, "len": len})).unwrap();
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().unwrap().contains(want), "{r}");
    }
    assert_eq!(read(3 * PAGE), 103, "nothing was dropped");

    // A good reclaim of the first 2 MiB: zaps the ten pages; the next touch reads zero.
    let r = request(&path, &json!({"cmd": "reclaim", "gpa": 0, "len": "2M"})).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["reclaim"]["zapped"], 10);
    let v = std::thread::scope(|s| s.spawn(|| read(3 * PAGE)).join().unwrap());
    assert_eq!(v, 0, "fresh zero page after the reclaim");
    let st = request(&path, &json!({"cmd": "stats"})).unwrap();
    assert_eq!(st["stats"]["paging"]["reclaims"], 1);
    assert_eq!(st["stats"]["stage2"]["installs_4k"], 11);

    assert_eq!(
        request(&path, &json!({"cmd": "pause"})).unwrap(),
        json!({"ok": true})
    );
    assert_eq!(paused.load(Ordering::SeqCst), 1);
    drop(server);
    Arc::try_unwrap(pager).unwrap().stop();
    // SAFETY: the pager is stopped; unmap our mapping.
    unsafe { libc::munmap(p, len as usize) };
}
