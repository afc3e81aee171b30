//! dirty-bench: the time of one dirty-log pass (get + clear) of our KVM-bitmap tracker, side by
//! side with the kernel selftest `dirty_log_perf_test` run with the same vCPUs and bytes.
//!
//! Both sides do the same thing per iteration: every vCPU writes every page of its slice once
//! and leaves the guest, then the host reads the dirty bitmap (KVM_GET_DIRTY_LOG) and clears it
//! (KVM_CLEAR_DIRTY_LOG over the whole slot, manual protect, initially set). The selftest times
//! exactly those two ioctls per iteration; we time ours the same way and print a table with
//! the ratio (goal: at most 1.0x).
//!
//! Our guest runs in one or more modes (`--guest`): `cpl0-4k` is the selftest's own (kernel
//! mode, 4 KiB guest pages); `cpl3-2m` is how the built-in test guests run (user mode, 2 MiB
//! guest pages). On this host (software KVM, shadow paging, no EPT) the mode decides what
//! KVM_CLEAR_DIRTY_LOG costs: a kernel-mode guest's writes leave no sptes behind (KVM's
//! `pages_4k` stays 0, printed from debugfs when mounted), so the clear only clears bits; a
//! user-mode guest's writes go through one 4 KiB spte per page, which the clear write-protects.
//!
//! `dirty-bench [--vcpus 2] [--bytes-per-vcpu 256M] [--iterations 3] [--selftest-dir DIR]
//! [--guest cpl0-4k,cpl3-2m] [--clear-chunk PAGES]` (DIR defaults to the output of
//! `tools/build-selftests`; `--no-selftest` skips their side).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::{configure_vcpu, long_mode};
use vmm::dirty::{DirtyMode, DirtyTracker};
use vmm::hypervisor::Vm;
use vmm::hypervisor::{VcpuOps, VmExit};
use vmm::memory::{BackingKind, GuestRam};

const GDT_GPA: u64 = 0x500;
const PML4_GPA: u64 = 0x1000;
const CODE_GPA: u64 = 0x10_0000;
const PARAMS_GPA: u64 = 0x20_0000;
/// The vCPU slices start here; below is code, tables, stacks and parameters.
const AREA_GPA: u64 = 16 << 20;
/// x86 page-table entry bits (Intel SDM Vol. 3A §4.5, Tables 4-15..4-19): present, writable,
/// user, and PS (a PDE that maps a 2 MiB page).
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PDE_PAGE_SIZE: u64 = 1 << 7;
/// Physical-address bits of a page-table entry (bits 51:12).
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// 4 KiB guest page tables (`--guest ...-4k`) are placed from here up to `AREA_GPA`.
const PT_GPA: u64 = 4 << 20;
/// RFLAGS.IOPL = 3 (Intel SDM Vol. 1 §3.4.3.3).
const RFLAGS_IOPL_3: u64 = 3 << 12;
/// The guest's "pass done" port: like the selftest's GUEST_SYNC, the vCPU leaves KVM_RUN and
/// waits on the host for the next generation, so nothing runs in the guest during get + clear.
const SYNC_PORT: u16 = 0x510;
/// Parameter block: [0] area base, [8] slice bytes, [16] generation, [32 + 8 * id] done.
const P_GEN: u64 = 16;
const P_DONE: u64 = 32;
/// The generation that tells the vCPU threads to end.
const QUIT: u64 = u64::MAX;

// rdi = vCPU id, rsi = params. For each new generation: write one word in every page of the
// slice, store the generation in its done word, and exit through SYNC_PORT. Ring 3.
core::arch::global_asm!(
    ".pushsection .text.dirty_bench_guest, \"ax\"",
    ".global dirty_bench_guest_start",
    ".global dirty_bench_guest_end",
    "dirty_bench_guest_start:",
    "mov r10, [rsi + 8]",
    "mov rax, rdi",
    "imul rax, r10",
    "add rax, [rsi]",
    "mov r11, rax",
    "xor r9, r9",
    "2:",
    "mov rax, [rsi + {gen}]",
    "cmp rax, r9",
    "je 2b",
    "mov r9, rax",
    "mov rcx, r11",
    "lea rdx, [r11 + r10]",
    "3:",
    "mov [rcx], r9",
    "add rcx, 4096",
    "cmp rcx, rdx",
    "jb 3b",
    "mov [rsi + {done} + rdi * 8], r9",
    "mov dx, {port}",
    "out dx, al",
    "jmp 2b",
    "dirty_bench_guest_end:",
    ".popsection",
    gen = const P_GEN,
    done = const P_DONE,
    port = const SYNC_PORT,
);

extern "C" {
    static dirty_bench_guest_start: u8;
    static dirty_bench_guest_end: u8;
}

fn guest_code() -> &'static [u8] {
    // SAFETY: the two symbols delimit the guest's bytes in this binary's text section.
    unsafe {
        let s = std::ptr::addr_of!(dirty_bench_guest_start);
        let e = std::ptr::addr_of!(dirty_bench_guest_end);
        std::slice::from_raw_parts(s, e as usize - s as usize)
    }
}

#[derive(Parser, Debug)]
#[command(
    about = "Dirty-log pass (get + clear) of vmm's tracker vs the kernel's dirty_log_perf_test"
)]
struct Args {
    /// vCPUs (selftest -v).
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Bytes each vCPU dirties (selftest -b), with a K/M/G suffix.
    #[arg(long, default_value = "256M")]
    bytes_per_vcpu: String,
    /// Iterations (selftest -i).
    #[arg(long, default_value_t = 3)]
    iterations: u32,
    /// Directory holding dirty_log_perf_test (default: the output of tools/build-selftests).
    #[arg(long)]
    selftest_dir: Option<PathBuf>,
    /// Backing of our guest RAM: small (4 KiB pages) or thp.
    #[arg(long, default_value = "thp")]
    backing: String,
    /// Only measure our side.
    #[arg(long)]
    no_selftest: bool,
    /// Our guest configurations, comma-separated: cpl0-4k (like the selftest's guest: kernel
    /// mode, 4 KiB guest pages), cpl0-2m, cpl3-4k, cpl3-2m (the built-in test guests: user
    /// mode, 2 MiB guest pages).
    #[arg(long, default_value = "cpl0-4k,cpl3-2m")]
    guest: String,
    /// Pages per KVM_CLEAR_DIRTY_LOG call (a multiple of 64; default: the tracker's).
    #[arg(long)]
    clear_chunk: Option<u64>,
}

/// How our guest runs: privilege level and guest page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GuestMode {
    /// Current privilege level the guest code runs at (0 or 3).
    cpl: u8,
    /// The guest maps its RAM with 4 KiB pages (else 2 MiB pages).
    small_pages: bool,
}

impl std::str::FromStr for GuestMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<GuestMode> {
        let (cpl, small_pages) = match s {
            "cpl0-4k" => (0, true),
            "cpl0-2m" => (0, false),
            "cpl3-4k" => (3, true),
            "cpl3-2m" => (3, false),
            other => bail!("--guest {other:?}: use cpl0-4k, cpl0-2m, cpl3-4k or cpl3-2m"),
        };
        Ok(GuestMode { cpl, small_pages })
    }
}

impl std::fmt::Display for GuestMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = if self.small_pages { "4k" } else { "2m" };
        write!(f, "cpl{}-{size}", self.cpl)
    }
}

/// Rewrites the identity map's 2 MiB PDEs into page tables of 4 KiB pages (at `PT_GPA`), all
/// user-accessible when `user`.
fn split_guest_tables(mem: &GuestMemoryMmap, mem_bytes: u64, user: bool) -> Result<()> {
    let u = if user { PTE_USER } else { 0 };
    let pds = mem_bytes.div_ceil(1 << 30);
    let mut next_pt = PT_GPA;
    for g in 0..pds {
        // long_mode: PML4, then the PDPT, then one page directory per GiB.
        let pd = PML4_GPA + (2 + g) * 4096;
        for i in 0..512u64 {
            let pde_gpa = pd + i * 8;
            let pde: u64 = mem.read_obj(GuestAddress(pde_gpa))?;
            if pde & PTE_PRESENT == 0 || pde & PDE_PAGE_SIZE == 0 {
                continue;
            }
            if next_pt + 4096 > AREA_GPA {
                bail!("4 KiB guest page tables do not fit below {AREA_GPA:#x}: use less memory");
            }
            let base = pde & PTE_ADDR_MASK;
            let pt: Vec<u8> = (0..512u64)
                .flat_map(|j| ((base + j * 4096) | PTE_PRESENT | PTE_WRITABLE | u).to_le_bytes())
                .collect();
            mem.write_slice(&pt, GuestAddress(next_pt))?;
            mem.write_obj(
                next_pt | PTE_PRESENT | PTE_WRITABLE | u,
                GuestAddress(pde_gpa),
            )?;
            next_pt += 4096;
        }
    }
    Ok(())
}

fn parse_size(s: &str) -> Result<u64> {
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("--bytes-per-vcpu {s:?}: give a size such as 256M"))?;
    if n == 0 || !(n * mul).is_multiple_of(4096) {
        bail!("--bytes-per-vcpu {s:?}: give a non-zero multiple of 4K");
    }
    Ok(n * mul)
}

/// Per-iteration (dirty memory, get, clear) in seconds.
type Figures = Vec<(f64, f64, f64)>;

/// KVM's per-VM statistics in debugfs (`/sys/kernel/debug/kvm/PID-FD/`) printed next to the
/// timings: how many 4 KiB / 2 MiB sptes map guest memory, which is what KVM_CLEAR_DIRTY_LOG
/// must write-protect. (The per-vCPU counters are not readable there on this host.)
const KVM_STATS: [&str; 2] = ["pages_4k", "pages_2m"];

/// The [`KVM_STATS`] of the VM `vm_fd` of process `pid`, or `None` without debugfs.
fn kvm_stats(pid: u32, vm_fd: i32) -> Option<Vec<u64>> {
    let dir = PathBuf::from(format!("/sys/kernel/debug/kvm/{pid}-{vm_fd}"));
    KVM_STATS
        .iter()
        .map(|name| {
            std::fs::read_to_string(dir.join(name))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// `name=value` pairs.
fn show_stats(stats: &Option<Vec<u64>>) -> String {
    match stats {
        Some(v) => KVM_STATS
            .iter()
            .zip(v)
            .map(|(name, v)| format!("{name}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        None => "no KVM stats (mount debugfs on /sys/kernel/debug to see them)".into(),
    }
}

/// Our side's settings.
struct OurRun {
    vcpus: u8,
    per_vcpu: u64,
    iterations: u32,
    backing: BackingKind,
    guest: GuestMode,
    clear_chunk: Option<u64>,
}

fn ours(run: &OurRun) -> Result<(Figures, u64)> {
    let OurRun {
        vcpus,
        per_vcpu,
        iterations,
        backing,
        guest,
        clear_chunk,
    } = *run;
    let mem_bytes = AREA_GPA + per_vcpu * u64::from(vcpus);
    let ram = GuestRam::new(mem_bytes, backing)?;
    let mem: &GuestMemoryMmap = ram.memory();
    mem.write_slice(guest_code(), GuestAddress(CODE_GPA))?;
    mem.write_obj(AREA_GPA, GuestAddress(PARAMS_GPA))?;
    mem.write_obj(per_vcpu, GuestAddress(PARAMS_GPA + 8))?;
    let vm = Vm::new(&ram, vcpus)?;
    let mut fds = Vec::new();
    for id in 0..vcpus {
        let fd = vm.create_vcpu(id)?;
        configure_vcpu(&vm, &fd, id)?;
        long_mode::setup(
            mem,
            &fd,
            long_mode::LongModeConfig {
                pml4_gpa: PML4_GPA,
                identity_map_bytes: mem_bytes,
                gdt_gpa: GDT_GPA,
                entry: CODE_GPA,
                rsp: 0x8_0000 - u64::from(id) * 0x1000,
                rsi: PARAMS_GPA,
                rdi: u64::from(id),
            },
        )?;
        if guest.cpl == 0 {
            fds.push(fd);
            continue;
        }
        // Ring 3, where this machine's KVM runs guest code natively.
        let mut sregs = fd.get_sregs()?;
        for seg in [
            &mut sregs.cs,
            &mut sregs.ss,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            seg.dpl = 3;
            seg.selector |= 3;
        }
        fd.set_sregs(&sregs)?;
        let mut regs = fd.get_regs()?;
        regs.rflags |= RFLAGS_IOPL_3;
        fd.set_regs(&regs)?;
        fds.push(fd);
    }
    if guest.cpl == 3 {
        let len = long_mode::page_table_bytes(mem_bytes) as usize;
        let mut tables = vec![0u8; len];
        mem.read_slice(&mut tables, GuestAddress(PML4_GPA))?;
        for e in tables.chunks_exact_mut(8) {
            let v = u64::from_le_bytes(e.try_into().unwrap());
            if v & PTE_PRESENT != 0 {
                e.copy_from_slice(&(v | PTE_USER).to_le_bytes());
            }
        }
        mem.write_slice(&tables, GuestAddress(PML4_GPA))?;
    }
    if guest.small_pages {
        split_guest_tables(mem, mem_bytes, guest.cpl == 3)?;
    }

    // The generation the host released; vCPU threads wait for it outside KVM_RUN.
    let released = Arc::new((Mutex::new(0u64), Condvar::new()));
    let mut threads = Vec::new();
    for (i, mut fd) in fds.into_iter().enumerate() {
        let released = released.clone();
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut seen = 0;
            loop {
                match fd.run() {
                    Ok(VmExit::IoOut(SYNC_PORT, _)) => {
                        seen += 1;
                        let (lock, cv) = &*released;
                        let mut g = lock.lock().unwrap();
                        while *g <= seen {
                            g = cv.wait(g).unwrap();
                        }
                        if *g == QUIT {
                            return Ok(());
                        }
                    }
                    Ok(VmExit::Interrupted) => {}
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                    other => bail!("vCPU {i}: unexpected exit {other:?}"),
                }
            }
        }));
    }
    let pass = |gen: u64| -> Result<Duration> {
        let t0 = Instant::now();
        mem.write_obj(gen, GuestAddress(PARAMS_GPA + P_GEN))?;
        {
            let (lock, cv) = &*released;
            *lock.lock().unwrap() = gen;
            cv.notify_all();
        }
        for id in 0..u64::from(vcpus) {
            while mem.read_obj::<u64>(GuestAddress(PARAMS_GPA + P_DONE + 8 * id))? != gen {
                if t0.elapsed() > Duration::from_secs(600) {
                    bail!("vCPU {id} did not finish generation {gen} in 10 minutes");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(t0.elapsed())
    };
    let populate = pass(1)?;
    println!("ours ({guest}): populate {:.3} s", populate.as_secs_f64());
    let regions: Vec<_> = ram.regions().collect();
    let t0 = Instant::now();
    let tracker = DirtyTracker::new_kvm(&vm, &regions, DirtyMode::KvmBitmap)?;
    if let Some(c) = clear_chunk {
        tracker.set_clear_chunk_pages(c);
    }
    println!(
        "ours: enabling dirty logging {:.6} s",
        t0.elapsed().as_secs_f64()
    );
    let stats = || kvm_stats(std::process::id(), vm.as_raw_fd());
    let mut figures = Vec::new();
    for it in 1..=u64::from(iterations) {
        let d = pass(it + 1)?;
        let s1 = stats();
        let bm = tracker.harvest()?;
        let s2 = stats();
        println!(
            "ours ({guest}): iteration {it}: sptes before the harvest: {}; after: {}",
            show_stats(&s1),
            show_stats(&s2)
        );
        let st = tracker.last_stats();
        let pages = bm.count();
        println!(
            "ours ({guest}): iteration {it}: dirty memory {:.3} s, get {:.6} s, clear {:.6} s, {pages} dirty pages, {} clear ioctls ({:.1} ns per dirty page)",
            d.as_secs_f64(),
            st.get_ns as f64 / 1e9,
            st.clear_ns as f64 / 1e9,
            st.ops,
            st.clear_ns as f64 / pages.max(1) as f64,
        );
        figures.push((
            d.as_secs_f64(),
            st.get_ns as f64 / 1e9,
            st.clear_ns as f64 / 1e9,
        ));
    }
    {
        let (lock, cv) = &*released;
        *lock.lock().unwrap() = QUIT;
        cv.notify_all();
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a vCPU thread panicked"))??;
    }
    Ok((figures, mem_bytes))
}

fn selftest_dir(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = arg {
        return Ok(d);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("tools/build-selftests"))
        .current_dir(&root)
        .output()
        .context("running tools/build-selftests (give --selftest-dir or --no-selftest)")?;
    if !out.status.success() {
        bail!(
            "tools/build-selftests failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = PathBuf::from(dir.lines().last().unwrap_or_default());
    Ok(if dir.is_absolute() {
        dir
    } else {
        root.join(dir)
    })
}

/// Parses "Iteration N dirty memory time: X.XXXs", "... get dirty log time: ..." and "... clear
/// dirty log time: ...".
fn parse_selftest(out: &str) -> Figures {
    let secs = |line: &str| -> Option<f64> {
        line.rsplit(':')
            .next()?
            .trim()
            .trim_end_matches('s')
            .parse()
            .ok()
    };
    let mut dirty = Vec::new();
    let mut gets = Vec::new();
    let mut clears = Vec::new();
    for line in out.lines().filter(|l| l.starts_with("Iteration")) {
        if line.contains("dirty memory time") {
            dirty.extend(secs(line));
        } else if line.contains("get dirty log time") {
            gets.extend(secs(line));
        } else if line.contains("clear dirty log time") {
            clears.extend(secs(line));
        }
    }
    dirty
        .into_iter()
        .zip(gets)
        .zip(clears)
        .map(|((d, g), c)| (d, g, c))
        .collect()
}

fn theirs(dir: &std::path::Path, vcpus: u8, bytes: &str, iterations: u32) -> Result<Figures> {
    let bin = dir.join("dirty_log_perf_test");
    let cmd = format!("{} -v {vcpus} -b {bytes} -i {iterations}", bin.display());
    println!("theirs: {cmd}");
    let child = Command::new(&bin)
        .args([
            "-v",
            &vcpus.to_string(),
            "-b",
            bytes,
            "-i",
            &iterations.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    // While it runs, watch its VM's KVM stats (the highest page counts seen).
    let pid = child.id();
    let watcher = std::thread::spawn(move || {
        let mut max: Option<Vec<u64>> = None;
        let mut last: Option<Vec<u64>> = None;
        let mut vm_dir_fd = None;
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if vm_dir_fd.is_none() {
                vm_dir_fd = std::fs::read_dir("/sys/kernel/debug/kvm")
                    .ok()
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().into_string().ok()?;
                        let (p, fd) = name.split_once('-')?;
                        (p.parse::<u32>().ok()? == pid).then(|| fd.parse::<i32>().ok())?
                    })
                    .next();
            }
            if let Some(fd) = vm_dir_fd {
                if let Some(now) = kvm_stats(pid, fd) {
                    max = Some(match max {
                        Some(m) => m.iter().zip(&now).map(|(a, b)| *a.max(b)).collect(),
                        None => now.clone(),
                    });
                    last = Some(now);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (max, last)
    });
    let out = child.wait_with_output()?;
    let (max, last) = watcher.join().unwrap_or((None, None));
    if let (Some(max), Some(last)) = (max, last) {
        println!(
            "theirs: sptes, highest seen during the run: {}; last seen: {}",
            show_stats(&Some(max)),
            show_stats(&Some(last))
        );
    }
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let f = parse_selftest(&text);
    if !out.status.success() || f.is_empty() {
        bail!("{cmd} failed or printed no timings:\n{text}");
    }
    Ok(f)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let per_vcpu = parse_size(&args.bytes_per_vcpu)?;
    let dirty_bytes = per_vcpu * u64::from(args.vcpus);
    let backing = match args.backing.as_str() {
        "small" => BackingKind::Small,
        "thp" => BackingKind::Thp,
        other => bail!("--backing {other:?}: use small or thp"),
    };
    let guests = args
        .guest
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<GuestMode>>>()?;
    if let Some(c) = args.clear_chunk {
        if c == 0 || c % 64 != 0 {
            bail!("--clear-chunk {c}: give a non-zero multiple of 64 pages (KVM's alignment)");
        }
    }
    let mut ours_runs = Vec::new();
    for &guest in &guests {
        let run = OurRun {
            vcpus: args.vcpus,
            per_vcpu,
            iterations: args.iterations,
            backing,
            guest,
            clear_chunk: args.clear_chunk,
        };
        ours_runs.push((guest, ours(&run)?));
    }
    let theirs = if args.no_selftest {
        None
    } else {
        let dir = selftest_dir(args.selftest_dir.clone())?;
        Some(theirs(
            &dir,
            args.vcpus,
            &args.bytes_per_vcpu,
            args.iterations,
        )?)
    };
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    let slot_bytes = ours_runs.first().map_or(0, |(_, (_, b))| *b);
    println!();
    println!(
        "dirty-log pass, {} vCPUs x {}, {} iterations; per GiB of memslot (ours: {:.3} GiB slot incl. {} MiB of code/tables; theirs: {:.3} GiB; theirs: cpl0-4k guest)",
        args.vcpus,
        args.bytes_per_vcpu,
        args.iterations,
        gib(slot_bytes),
        AREA_GPA >> 20,
        gib(dirty_bytes)
    );
    println!(
        "{:<8} {:<10} {:>12} {:>12} {:>12} {:>13} {:>8}",
        "guest", "step", "ours (us)", "ours us/GiB", "theirs (us)", "theirs us/GiB", "ratio"
    );
    type Pick = fn(&(f64, f64, f64)) -> f64;
    let steps: [(&str, Pick); 4] = [
        ("dirty mem", |f| f.0),
        ("get", |f| f.1),
        ("clear", |f| f.2),
        ("get+clear", |f| f.1 + f.2),
    ];
    for (guest, (ours, slot_bytes)) in &ours_runs {
        for (name, pick) in steps {
            let o = median(ours.iter().map(pick).collect()) * 1e6;
            let o_g = o / gib(*slot_bytes);
            match &theirs {
                Some(t) => {
                    let t = median(t.iter().map(pick).collect()) * 1e6;
                    let t_g = t / gib(dirty_bytes);
                    println!(
                        "{:<8} {name:<10} {o:>12.1} {o_g:>12.1} {t:>12.1} {t_g:>13.1} {:>7.2}x",
                        guest.to_string(),
                        o_g / t_g
                    );
                }
                None => println!(
                    "{:<8} {name:<10} {o:>12.1} {o_g:>12.1} {:>12} {:>13} {:>8}",
                    guest.to_string(),
                    "-",
                    "-",
                    "-"
                ),
            }
        }
    }
    println!("(medians over the iterations; ratio = ours per GiB / theirs per GiB, goal for get+clear <= 1.00x)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_selftest_lines() {
        let out = "Iteration 1 dirty memory time: 10.3s\nIteration 1 get dirty log time: 0.000010363s\nIteration 1 clear dirty log time: 0.000275107s\nIteration 2 dirty memory time: 9.1s\nIteration 2 get dirty log time: 0.000009299s\nIteration 2 clear dirty log time: 0.000256566s\n";
        let f = parse_selftest(out);
        assert_eq!(
            f,
            vec![
                (10.3, 0.000010363, 0.000275107),
                (9.1, 0.000009299, 0.000256566)
            ]
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert!(parse_size("0").is_err());
        assert!(parse_size("12x").is_err());
    }
}
