//! The system calls each thread kind may make, read off `strace -f` of every kind of run (test
//! guests and kernels, the control socket, precopy and postcopy migrations in every dirty
//! mode) and of the suite under `--seccomp log`.
//!
//! `ioctl` is allowed by request type only: KVM's (0xAE) on the threads that drive the VM,
//! userfaultfd's (0xAA) on the threads that place or drop pages, and a few terminal requests
//! by number (never `TIOCSTI`). `tgkill` may only signal this process's own threads, `prctl`
//! may only name a thread or set no-new-privs, `pidfd_open` only opens this process, and `seccomp` may only add a filter (a thread
//! spawned under its parent's filter installs its own on top).

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

/// What every thread does: memory, locks, its own start and end, time, logging to stderr.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
];

/// Starting threads (std's thread spawn: clone3, or clone when that is refused).
const SPAWN: &[i64] = &[libc::SYS_clone3, libc::SYS_clone];

/// Sockets once they exist: the control socket's connections, a migration's stream.
const SOCKET_IO: &[i64] = &[
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_fcntl,
];

/// Dropping guest pages: MADV_DONTNEED (in BASE), hole punching, the residency check.
/// A batch of runs goes in one process_madvise on a pidfd of this process (`uffd::host_pages`).
const DROP_PAGES: &[i64] = &[
    libc::SYS_fallocate,
    libc::SYS_mincore,
    libc::SYS_pidfd_open,
    libc::SYS_process_madvise,
];

/// What only the main thread does after set-up: create vCPUs and the pager, listen on the
/// control socket, connect to a migration destination, write the output files, tear down.
const MAIN: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_eventfd2,
    libc::SYS_userfaultfd,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_rt_sigaction,
    libc::SYS_sched_setaffinity,
];

/// What receiving the next VM takes beyond [`MAIN`]: the port a listener got
/// (`getsockname`), guest RAM (a memfd, or a hugetlbfs file and its file system's page size);
/// opening /dev/kvm is `openat`, in `MAIN`.
const CREATE_MACHINE: &[i64] = &[
    libc::SYS_getsockname,
    libc::SYS_memfd_create,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
];

/// A postcopy receiver lowers its priority below the vCPUs' faults.
const PRIORITY: &[i64] = &[libc::SYS_getpriority, libc::SYS_setpriority];

/// ioctl request types (bits 8..16 of the request).
const KVMIO: u64 = 0xAE;
const UFFDIO: u64 = 0xAA;

/// Terminal requests a thread may make: read the terminal's mode and size, set its mode (the
/// console's raw mode), non-blocking and close-on-exec.
const TTY_READ: &[u64] = &[libc::TCGETS, libc::TIOCGWINSZ, libc::FIONBIO, libc::FIOCLEX];
const TTY_SET: &[u64] = &[libc::TCSETS, libc::TCSETSW, libc::TCSETSF];

/// Which ioctls a kind may make.
struct Ioctls {
    types: &'static [u64],
    numbers: &'static [&'static [u64]],
}

/// The system call numbers `kind` may make (ioctl, tgkill, prctl and seccomp only with the
/// arguments the module's doc names).
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    let mut v: Vec<i64> = BASE.to_vec();
    let extra: &[&[i64]] = match kind {
        ThreadKind::Main => &[SPAWN, SOCKET_IO, DROP_PAGES, MAIN],
        ThreadKind::Host => &[SPAWN, SOCKET_IO, DROP_PAGES, MAIN, CREATE_MACHINE],
        ThreadKind::Vcpu => &[],
        ThreadKind::Pager => &[
            DROP_PAGES,
            SOCKET_IO,
            &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait],
        ],
        ThreadKind::MigrationReceiver => &[SOCKET_IO, DROP_PAGES, PRIORITY],
        ThreadKind::MigrationSender => &[SOCKET_IO],
        // Residency of guest RAM: mincore, or pread of /proc/self/pagemap (opened by main).
        ThreadKind::MigrationLane => &[SOCKET_IO, DROP_PAGES, &[libc::SYS_pread64]],
        ThreadKind::Api => &[SPAWN, SOCKET_IO, DROP_PAGES, &[libc::SYS_accept4]],
        ThreadKind::Console => &[&[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_fcntl,
        ]],
        ThreadKind::Signals => &[&[libc::SYS_unlink, libc::SYS_unlinkat]],
        ThreadKind::Reclaim => &[DROP_PAGES],
        ThreadKind::Profiler => &[],
        // Its disk image (positioned I/O, flush), its queue's and stop events; guest pages it
        // touches first are a userfaultfd fault another thread serves.
        ThreadKind::Block => &[&[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ]],
        // Drops the pages the guest gives through the reclaim path (as the reclaim storm's
        // thread does) and waits on its queues' events.
        ThreadKind::Balloon => &[DROP_PAGES, &[libc::SYS_poll, libc::SYS_ppoll]],
        // Frames on its tap (read and write, in BASE) and its queues', tap's and stop events.
        ThreadKind::Net => &[&[libc::SYS_poll, libc::SYS_ppoll]],
    };
    for list in extra {
        v.extend_from_slice(list);
    }
    v.extend([
        libc::SYS_ioctl,
        libc::SYS_tgkill,
        libc::SYS_prctl,
        libc::SYS_seccomp,
    ]);
    v.sort_unstable();
    v.dedup();
    if ioctls(kind).types.is_empty() && ioctls(kind).numbers.is_empty() {
        v.retain(|&n| n != libc::SYS_ioctl);
    }
    v
}

fn ioctls(kind: ThreadKind) -> Ioctls {
    match kind {
        ThreadKind::Main | ThreadKind::Host => Ioctls {
            types: &[KVMIO, UFFDIO],
            numbers: &[TTY_READ],
        },
        ThreadKind::Vcpu => Ioctls {
            types: &[KVMIO],
            numbers: &[],
        },
        ThreadKind::Pager
        | ThreadKind::MigrationReceiver
        | ThreadKind::MigrationLane
        | ThreadKind::Reclaim
        | ThreadKind::Balloon => Ioctls {
            types: &[UFFDIO],
            numbers: &[],
        },
        ThreadKind::Api => Ioctls {
            types: &[KVMIO, UFFDIO],
            numbers: &[TTY_READ],
        },
        ThreadKind::Console => Ioctls {
            types: &[],
            numbers: &[TTY_READ, TTY_SET],
        },
        ThreadKind::MigrationSender
        | ThreadKind::Signals
        | ThreadKind::Profiler
        | ThreadKind::Block
        | ThreadKind::Net => Ioctls {
            types: &[],
            numbers: &[],
        },
    }
}

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

fn one(c: SeccompCondition) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![c])
}

/// The rules of `kind`'s filter: an empty rule list allows the call whatever its arguments.
pub(super) fn rules(
    kind: ThreadKind,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(kind).into_iter().map(|n| (n, Vec::new())).collect();
    let io = ioctls(kind);
    if let Some(r) = map.get_mut(&libc::SYS_ioctl) {
        for &t in io.types {
            r.push(one(cond(1, SeccompCmpOp::MaskedEq(0xff00), t << 8)?)?);
        }
        for list in io.numbers {
            for &n in *list {
                r.push(one(cond(1, SeccompCmpOp::Eq, n)?)?);
            }
        }
    }
    // SAFETY: getpid has no arguments and cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    map.insert(
        libc::SYS_tgkill,
        vec![one(cond(0, SeccompCmpOp::Eq, pid)?)?],
    );
    if let Some(r) = map.get_mut(&libc::SYS_pidfd_open) {
        r.push(one(cond(0, SeccompCmpOp::Eq, pid)?)?);
    }
    map.insert(
        libc::SYS_prctl,
        vec![
            one(cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?)?,
            one(cond(0, SeccompCmpOp::Eq, libc::PR_SET_NO_NEW_PRIVS as u64)?)?,
            one(cond(0, SeccompCmpOp::Eq, libc::PR_GET_SECCOMP as u64)?)?,
        ],
    );
    map.insert(
        libc::SYS_seccomp,
        vec![one(cond(
            0,
            SeccompCmpOp::Eq,
            libc::SECCOMP_SET_MODE_FILTER as u64,
        )?)?],
    );
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_thread_may_exec_fork_or_trace() {
        for kind in ThreadKind::ALL {
            let a = allowed(kind);
            for n in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_process_vm_writev,
                libc::SYS_mount,
                libc::SYS_kexec_load,
                libc::SYS_bpf,
            ] {
                assert!(!a.contains(&n), "{kind:?} allows {n}");
            }
        }
    }

    #[test]
    fn only_main_opens_files_or_makes_sockets() {
        for kind in ThreadKind::ALL {
            let a = allowed(kind);
            let opens = a.contains(&libc::SYS_openat) || a.contains(&libc::SYS_socket);
            let main = matches!(kind, ThreadKind::Main | ThreadKind::Host);
            assert_eq!(opens, main, "{kind:?}");
        }
    }

    #[test]
    fn vcpu_threads_have_kvm_ioctls_only() {
        let io = ioctls(ThreadKind::Vcpu);
        assert_eq!(io.types, &[KVMIO]);
        assert!(io.numbers.is_empty());
        assert!(!allowed(ThreadKind::Vcpu).contains(&libc::SYS_clone3));
    }
}
