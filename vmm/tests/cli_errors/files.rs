//! Bad `--kernel` and `--initrd` files: missing, not a regular file (directory, device, FIFO,
//! socket), too large for any guest or for this one, empty; each refused within a second.

use super::*;

#[test]
fn missing_kernel_file() {
    let out = run(&["--kernel", "/nonexistent/bzImage"]);
    let msg = expect_error(&out, &["/nonexistent/bzImage", "No such file", "--kernel"]);
    assert_eq!(
        msg.matches("No such file").count(),
        1,
        "the cause is not repeated: {msg}"
    );
}

/// `path` (not a regular file, `kind` in words) is refused fast as a kernel and as an initrd,
/// without being read or opened for long.
fn assert_not_regular_refused(path: &str, kind: &str) {
    // One directory per kind: these tests run in parallel, and tmpdir empties its directory.
    let d = tmpdir(&format!("kernel-for-initrd-{}", kind.replace(' ', "-")));
    let k = write(&d, "vmlinux", &elf());
    expect_refused_fast(
        &["--kernel", path],
        &[
            "cannot read kernel",
            path,
            kind,
            "not a regular file",
            "give --kernel",
        ],
    );
    expect_refused_fast(
        &["--kernel", &k, "--initrd", path, "--mem", "64M"],
        &[
            "cannot read initrd",
            path,
            kind,
            "not a regular file",
            "give --initrd",
        ],
    );
}

#[test]
fn directory_as_kernel_or_initrd() {
    let d = tmpdir("dir");
    assert_not_regular_refused(d.to_str().unwrap(), "a directory");
}

/// /dev/zero never ends: read whole, it would take all memory.
#[test]
fn character_device_as_kernel_or_initrd() {
    assert_not_regular_refused("/dev/zero", "a character device");
}

#[test]
fn block_device_as_kernel_or_initrd() {
    let found = std::fs::read_dir("/dev").unwrap().flatten().find(|e| {
        e.file_type()
            .is_ok_and(|t| std::os::unix::fs::FileTypeExt::is_block_device(&t))
    });
    let Some(dev) = found else {
        eprintln!("skipped: no block device in /dev here");
        return;
    };
    assert_not_regular_refused(dev.path().to_str().unwrap(), "a block device");
}

/// Opening a FIFO for reading waits for a writer; reading it waits for data.
#[test]
fn fifo_as_kernel_or_initrd() {
    let d = tmpdir("fifo");
    let fifo = d.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert_not_regular_refused(fifo.to_str().unwrap(), "a FIFO");
}

#[test]
fn socket_as_kernel_or_initrd() {
    let d = tmpdir("socket");
    let sock = d.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert_not_regular_refused(sock.to_str().unwrap(), "a socket");
}

/// A kernel file over 1 GiB is refused from its size, before a byte is read.
#[test]
fn kernel_larger_than_any_kernel() {
    let d = tmpdir("hugekernel");
    let k = d.join("vmlinuz");
    std::fs::File::create(&k)
        .unwrap()
        .set_len((1 << 30) + 1)
        .unwrap();
    expect_refused_fast(
        &["--kernel", k.to_str().unwrap()],
        &[
            "1073741825 bytes",
            "more than the 1G accepted",
            "give --kernel",
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// An initrd that no --mem could place (it must end below 2 GiB for this kernel) is refused
/// from its size, before a byte is read.
#[test]
fn initrd_larger_than_any_guest() {
    let d = tmpdir("hugeinitrd");
    let k = write(&d, "vmlinux", &elf());
    let initrd = d.join("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    expect_refused_fast(
        &[
            "--kernel",
            &k,
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem",
            "4G",
        ],
        &[
            "more than any guest can hold",
            "whatever --mem is",
            "0x80000000",
            "give --initrd a smaller initramfs",
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn empty_initrd() {
    let d = tmpdir("emptyinitrd");
    let k = write(&d, "vmlinux", &elf());
    let initrd = write(&d, "initrd", b"");
    expect_refused_fast(
        &["--kernel", &k, "--initrd", &initrd, "--mem", "64M"],
        &["initrd", "is empty", "--initrd"],
    );
}

#[test]
fn empty_kernel() {
    let d = tmpdir("empty");
    let k = write(&d, "empty", b"");
    expect_error(&run(&["--kernel", &k]), &["is empty", "bzImage"]);
}

#[test]
fn initrd_does_not_fit_in_mem() {
    let d = tmpdir("initrd");
    let k = write(&d, "vmlinux", &elf());
    let initrd = d.join("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    expect_refused_fast(
        &[
            "--kernel",
            &k,
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem",
            "32M",
        ],
        &["initrd", "does not fit", "--mem"],
    );
}

#[test]
fn missing_initrd() {
    let d = tmpdir("noinitrd");
    let k = write(&d, "vmlinux", &elf());
    expect_error(
        &run(&["--kernel", &k, "--initrd", "/nonexistent/initrd"]),
        &["cannot read initrd", "--initrd"],
    );
}

/// `--disk`: an image that cannot be a disk is refused within a second, before any VM exists,
/// with the fix; so are bad options and a disk where no kernel could use it.
#[test]
fn unusable_disks_are_refused_fast_with_the_fix() {
    let dir = tmpdir("disks");
    let kernel = write(&dir, "vmlinux", &elf());
    let odd = write(&dir, "odd.img", &[0u8; 1000]);
    let missing = dir.join("missing.img");
    let missing = format!("path={}", missing.display());
    for (disk, fragments) in [
        (missing.as_str(), &["missing.img", "truncate -s"][..]),
        (
            "path=/dev/null",
            &["not a regular file or block device"][..],
        ),
        (
            &format!("path={odd}") as &str,
            &["1000 bytes is not a whole number of 512-byte sectors"][..],
        ),
        ("path=/x.img,cache=none", &["not a disk option"][..]),
        ("readonly=on", &["no path=FILE"][..]),
    ] {
        expect_refused_fast(&["--kernel", &kernel, "--disk", disk], fragments);
    }
    let img = write(&dir, "ok.img", &[0u8; 4096]);
    let disk = format!("path={img}");
    expect_refused_fast(
        &["--guest", "stress", "--disk", &disk],
        &["--disk is for booting a kernel"],
    );
    let seven: Vec<&str> = std::iter::repeat_n(["--disk", disk.as_str()], 7)
        .flatten()
        .collect();
    let mut args = vec!["--kernel", kernel.as_str()];
    args.extend(seven);
    expect_refused_fast(&args, &["7 disks", "at most 6"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--net`: a tap that does not exist, an interface that is no tap, and options that do not
/// parse are refused before any VM exists, with what to do; so is `--net` for a test guest.
#[test]
fn unusable_taps_are_refused_fast_with_the_fix() {
    let dir = tmpdir("taps");
    let kernel = write(&dir, "vmlinux", &elf());
    let mut cases: Vec<(&str, &[&str])> = vec![
        (
            "tap=vmm-nosuch0",
            &[
                "no network interface vmm-nosuch0",
                "ip tuntap add dev vmm-nosuch0 mode tap",
            ],
        ),
        ("tap=a-name-longer-than-15", &["1-15 characters"]),
        ("mac=52:54:00:00:00:01", &["no tap=NAME"]),
        ("tap=t0,mac=01:00:5e:00:00:01", &["multicast"]),
        ("tap=t0,mac=52:54", &["six hex bytes"]),
        ("tap=t0,vhost=on", &["not a network option"]),
    ];
    // The loopback interface is in every namespace and is no tap (as root; another user may
    // not open /dev/net/tun at all, which is refused too).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && std::path::Path::new("/dev/net/tun").exists() {
        cases.push((
            "tap=lo",
            &["--net tap=lo: cannot attach to the tap", "it is not a tap"],
        ));
    }
    for (net, fragments) in cases {
        expect_refused_fast(&["--kernel", &kernel, "--net", net], fragments);
    }
    expect_refused_fast(
        &["--guest", "stress", "--net", "tap=t0"],
        &["--net is for booting a kernel"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
