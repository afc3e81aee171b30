//! Virtio devices under the project's test kernel: a virtio-blk disk (`--disk`) written by one
//! boot, read back by the next, and checked on the host.

use crate::common::cores;
use crate::linux::marker_and_poweroff;
use crate::util::{test_kernel, tmp, KernelVm, BOOT_LIMIT, SMALL};

/// The pattern `disk write` puts at the start of the disk (tools/test-initramfs/disk.c): word
/// i is splitmix64's finaliser of `seed ^ i`, little-endian.
fn pattern(mib: u64, seed: u64) -> Vec<u8> {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..mib * (1 << 20) / 8)
        .flat_map(|i| mix(seed ^ i).to_le_bytes())
        .collect()
}

fn fnv(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The kernel found the disk, and `run` exited 0.
fn check_disk_boot(test: &str, text: &str) {
    assert!(
        text.contains("virtio_blk virtio0: [vda]"),
        "{test}: the kernel found the disk:\n{text}"
    );
    assert!(text.contains("RUN-EXIT 0"), "{test}:\n{text}");
}

/// The test kernel boots to /init (its marker), writes a pattern to its virtio-blk disk and
/// powers off (exit 0, through the sleep register; its memory through the stage-2 pager; on a
/// software KVM the emulation counters): the image holds the pattern on the host, and the next
/// boot, read-only, reads it back from the device.
#[test]
fn test_kernel_powers_off_after_writing_its_disk_and_the_next_boot_reads_it_back() {
    let test = "test_kernel_powers_off_after_writing_its_disk_and_the_next_boot_reads_it_back";
    let Some((k, i)) = test_kernel(test) else {
        return;
    };
    // One VM with one vCPU at a time: it shares the host's cores with another such test.
    let _g = cores(1);
    let img = tmp(&format!("{test}.img"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let want = pattern(4, 7);
    let sum = fnv(&want);

    let text = marker_and_poweroff(
        test,
        (&k, &i),
        SMALL,
        "run=disk,write,/dev/vda,4,7",
        &["--disk", &format!("path={}", img.display())],
    );
    check_disk_boot(test, &text);
    let line = format!("DISK write /dev/vda 4 MiB seed 7 sum {sum}");
    assert!(text.contains(&line), "{line}:\n{text}");
    // On the host: the pattern, and nothing past it.
    let file = std::fs::read(&img).unwrap();
    assert_eq!(file.len(), 16 << 20);
    assert!(
        file[..4 << 20] == want[..],
        "the image holds the guest's pattern"
    );
    assert!(file[4 << 20..].iter().all(|&b| b == 0));

    // The next boot reads it back from the device, read-only.
    let vm = KernelVm::boot(
        &k,
        &i,
        test,
        "console=ttyS0 run=disk,verify,/dev/vda,4,7",
        SMALL,
        &["--disk", &format!("path={},readonly=on", img.display())],
    );
    let (code, err, text) = vm.wait_end(BOOT_LIMIT);
    assert_eq!(code, Some(0), "the guest powered off:\n{text}\n{err}");
    check_disk_boot(test, &text);
    let line = format!("DISK verify /dev/vda 4 MiB seed 7 sum {sum} ok");
    assert!(text.contains(&line), "{line}:\n{text}");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        file,
        "a read-only boot changed the image"
    );
    let _ = std::fs::remove_file(&img);
}
