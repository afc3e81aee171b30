//! dirty-bench: the time of one dirty-log pass (get + clear) of our KVM-bitmap tracker, side by
//! side with the kernel selftest `dirty_log_perf_test` run with the same vCPUs and bytes.
//!
//! Both sides do the same thing per iteration: every vCPU writes every page of its slice once,
//! then the host reads the dirty bitmap (KVM_GET_DIRTY_LOG) and clears it (KVM_CLEAR_DIRTY_LOG,
//! manual protect, initially set). The selftest prints its get and clear times per iteration;
//! we time ours the same way and print a table with the ratio (goal: at most 1.0x).
//!
//! `dirty-bench [--vcpus 2] [--bytes-per-vcpu 256M] [--iterations 3] [--selftest-dir DIR]`
//! (DIR defaults to the output of `tools/build-selftests`; `--no-selftest` skips their side).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::{configure_vcpu, long_mode};
use vmm::dirty::{DirtyMode, DirtyTracker};
use vmm::memory::{BackingKind, GuestRam};
use vmm::vm::Vm;

const GDT_GPA: u64 = 0x500;
const PML4_GPA: u64 = 0x1000;
const CODE_GPA: u64 = 0x10_0000;
const PARAMS_GPA: u64 = 0x20_0000;
/// The vCPU slices start here; below is code, tables, stacks and parameters.
const AREA_GPA: u64 = 16 << 20;
/// x86 page-table entry bits (Intel SDM Vol. 3A §4.5, Table 4-19): present, user.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_USER: u64 = 1 << 2;
/// RFLAGS.IOPL = 3 (Intel SDM Vol. 1 §3.4.3.3).
const RFLAGS_IOPL_3: u64 = 3 << 12;
/// The guest's "pass done" port: like the selftest's GUEST_SYNC, the vCPU leaves KVM_RUN and
/// waits on the host for the next generation, so nothing runs in the guest during get + clear.
const SYNC_PORT: u16 = 0x510;
/// Parameter block: [0] area base, [8] slice bytes, [16] generation, [32 + 8 * id] done.
const P_GEN: u64 = 16;
const P_DONE: u64 = 32;

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

/// Per-iteration (get, clear) in seconds.
type Figures = Vec<(f64, f64)>;

fn ours(vcpus: u8, per_vcpu: u64, iterations: u32, backing: BackingKind) -> Result<(Figures, u64)> {
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

    // The generation the host released; vCPU threads wait for it outside KVM_RUN.
    let released = Arc::new((Mutex::new(0u64), Condvar::new()));
    let mut threads = Vec::new();
    for (i, mut fd) in fds.into_iter().enumerate() {
        let released = released.clone();
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut seen = 0;
            loop {
                match fd.run() {
                    Ok(VcpuExit::IoOut(SYNC_PORT, _)) => {
                        seen += 1;
                        let (lock, cv) = &*released;
                        let mut g = lock.lock().unwrap();
                        while *g <= seen {
                            g = cv.wait(g).unwrap();
                        }
                    }
                    Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {}
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
    println!("ours: populate {:.3} s", populate.as_secs_f64());
    let regions: Vec<_> = ram.regions().collect();
    let t0 = Instant::now();
    let tracker = DirtyTracker::new_kvm(vm.fd(), &regions, DirtyMode::KvmBitmap)?;
    println!(
        "ours: enabling dirty logging {:.6} s",
        t0.elapsed().as_secs_f64()
    );
    let mut figures = Vec::new();
    for it in 1..=u64::from(iterations) {
        let d = pass(it + 1)?;
        let bm = tracker.harvest()?;
        let st = tracker.last_stats();
        println!(
            "ours: iteration {it}: dirty memory {:.3} s, get {:.6} s, clear {:.6} s, {} dirty pages, {} clear ioctls",
            d.as_secs_f64(),
            st.get_ns as f64 / 1e9,
            st.clear_ns as f64 / 1e9,
            bm.count(),
            st.ops
        );
        figures.push((st.get_ns as f64 / 1e9, st.clear_ns as f64 / 1e9));
    }
    // The vCPU threads wait for a generation that never comes; the process exit ends them.
    drop(threads);
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

/// Parses "Iteration N get dirty log time: X.XXXs" and "... clear dirty log time: ...".
fn parse_selftest(out: &str) -> Figures {
    let secs = |line: &str| -> Option<f64> {
        line.rsplit(':')
            .next()?
            .trim()
            .trim_end_matches('s')
            .parse()
            .ok()
    };
    let mut gets = Vec::new();
    let mut clears = Vec::new();
    for line in out.lines() {
        if line.starts_with("Iteration") && line.contains("get dirty log time") {
            gets.extend(secs(line));
        } else if line.starts_with("Iteration") && line.contains("clear dirty log time") {
            clears.extend(secs(line));
        }
    }
    gets.into_iter().zip(clears).collect()
}

fn theirs(dir: &std::path::Path, vcpus: u8, bytes: &str, iterations: u32) -> Result<Figures> {
    let bin = dir.join("dirty_log_perf_test");
    let cmd = format!("{} -v {vcpus} -b {bytes} -i {iterations}", bin.display());
    println!("theirs: {cmd}");
    let out = Command::new(&bin)
        .args([
            "-v",
            &vcpus.to_string(),
            "-b",
            bytes,
            "-i",
            &iterations.to_string(),
        ])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
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
    let (ours, slot_bytes) = ours(args.vcpus, per_vcpu, args.iterations, backing)?;
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
    println!();
    println!(
        "dirty-log pass, {} vCPUs x {}, {} iterations; per GiB of memslot (ours: {:.3} GiB slot incl. {} MiB of code/tables; theirs: {:.3} GiB)",
        args.vcpus,
        args.bytes_per_vcpu,
        args.iterations,
        gib(slot_bytes),
        AREA_GPA >> 20,
        gib(dirty_bytes)
    );
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>14} {:>8}",
        "step", "ours (us)", "ours us/GiB", "theirs (us)", "theirs us/GiB", "ratio"
    );
    type Pick = fn(&(f64, f64)) -> f64;
    let steps: [(&str, Pick); 3] = [
        ("get", |f| f.0),
        ("clear", |f| f.1),
        ("get+clear", |f| f.0 + f.1),
    ];
    for (name, pick) in steps {
        let o = median(ours.iter().map(pick).collect()) * 1e6;
        let o_g = o / gib(slot_bytes);
        match &theirs {
            Some(t) => {
                let t = median(t.iter().map(pick).collect()) * 1e6;
                let t_g = t / gib(dirty_bytes);
                println!(
                    "{name:<10} {o:>14.1} {o_g:>14.1} {t:>14.1} {t_g:>14.1} {:>7.2}x",
                    o_g / t_g
                );
            }
            None => println!(
                "{name:<10} {o:>14.1} {o_g:>14.1} {:>14} {:>14} {:>8}",
                "-", "-", "-"
            ),
        }
    }
    println!("(medians over the iterations; ratio = ours per GiB / theirs per GiB, goal <= 1.00x)");
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_selftest_lines() {
        let out = "Iteration 1 dirty memory time: 10.3s\nIteration 1 get dirty log time: 0.000010363s\nIteration 1 clear dirty log time: 0.000275107s\nIteration 2 get dirty log time: 0.000009299s\nIteration 2 clear dirty log time: 0.000256566s\n";
        let f = parse_selftest(out);
        assert_eq!(
            f,
            vec![(0.000010363, 0.000275107), (0.000009299, 0.000256566)]
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert!(parse_size("0").is_err());
        assert!(parse_size("12x").is_err());
    }
}
