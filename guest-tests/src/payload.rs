//! The x86-64 guest payloads (`stress`, `touch`, `dirty`), assembled into the host binary.
//!
//! All three are one `global_asm!` so that they share the parameter-block offsets
//! (const operands from [`crate::params::offsets`]). Each guest lies between the global
//! symbols `gt_<name>_start` and `gt_<name>_end` in a section of its own and uses
//! RIP-relative addressing only, so its bytes run unchanged wherever the VMM copies
//! them. Entry state (set by the VMM): 64-bit mode, identity paging over all RAM,
//! interrupts off, `rdi` = vCPU id, `rsi` = gpa of the parameter block, `rsp` = a
//! private stack.
//!
//! The guests are written to run at CPL 3 with IOPL 3 (user pages, port I/O allowed):
//! this machine's software KVM interprets guest ring-0 code at about 1 µs per
//! instruction but runs ring-3 code natively (measured: a `dec`/`jnz` loop takes
//! 1.7 µs per iteration at CPL 0 and 1.8 ns at CPL 3). They use no privileged
//! instruction: a finished guest repeats an IDLE port write instead of `hlt`. They
//! also avoid `int3`, `xrstor` and `cmpxchg16b`, which this KVM cannot emulate.
//!
//! Registers shared by the routines of a guest:
//! `r15` params, `r14` own `VcpuBlock`, `r13` vCPU id, `r12` pages in the slice,
//! `rbx` slice base, `r11` generation, `r10` reclaim sequence at generation start,
//! `r9` xorshift state, `r8` page index, `rsi` page gpa, `rdi` pattern,
//! `rbp` the per-page routine of `for_each_page` (stress) or the shortest wait the host
//! sleeps through (dirty); `rax`, `rcx`, `rdx` are scratch.

use crate::params::{
    offsets as o, GuestKind, Mode, FLAG_EXPECT_RECLAIM, PACE_MAX_LAG_MS, PACE_SLEEP_MIN_US,
    PARAMS_MAGIC, SEED_GEN_MUL, SEED_VCPU_MUL,
};
use crate::protocol::{
    CMD_BAD_PARAMS, CMD_FAIL, CMD_IDLE, CMD_PASS, CMD_PROGRESS, CMD_SLEEP, CMD_START, PORT_MAGIC,
    TEST_PORT,
};

/// The machine code of one guest and where to start it.
#[derive(Clone, Copy, Debug)]
pub struct Payload {
    /// Position-independent code to copy into guest memory.
    pub code: &'static [u8],
    /// Offset of the entry point from the start of `code`.
    pub entry_offset: usize,
}

/// Routines every guest carries (each under its own label prefix): port report,
/// halt, failure report, progress and pass reports, and the common entry checks.
macro_rules! common_asm {
    ($p:literal, $kind:literal) => {
        concat!(
            // Entry: locate the parameter block and this vCPU's block, check them,
            // report START, load the slice, continue at <p>_main.
            "gt_",
            $p,
            "_start:\n",
            "gt_",
            $p,
            "_entry:\n",
            "  mov r15, rsi\n",
            "  mov r13, rdi\n",
            "  mov rax, rdi\n",
            "  shl rax, {VCPU_BLOCK_SHIFT}\n",
            "  lea r14, [r15 + rax + {VCPUS}]\n",
            "  movabs rax, {MAGIC_VALUE}\n",
            "  cmp rax, qword ptr [r15 + {MAGIC}]\n",
            "  jne .Lgt_",
            $p,
            "_bad_params\n",
            "  cmp dword ptr [r15 + {KIND}], ",
            $kind,
            "\n",
            "  jne .Lgt_",
            $p,
            "_bad_params\n",
            "  rdtsc\n",
            "  shl rdx, 32\n",
            "  or rax, rdx\n",
            "  mov qword ptr [r14 + {V_TSC_START}], rax\n",
            "  mov qword ptr [r14 + {V_ARGS} + 8], rax\n",
            "  mov qword ptr [r14 + {V_ARGS}], r13\n",
            "  mov eax, {CMD_START}\n",
            "  call .Lgt_",
            $p,
            "_report\n",
            "  mov rbx, qword ptr [r14 + {V_SLICE_BASE}]\n",
            "  mov r12, qword ptr [r14 + {V_SLICE_LEN}]\n",
            "  shr r12, 12\n",
            "  jmp .Lgt_",
            $p,
            "_main\n",
            ".Lgt_",
            $p,
            "_bad_params:\n",
            "  mov rax, qword ptr [r15 + {MAGIC}]\n",
            "  mov qword ptr [r14 + {V_ARGS}], rax\n",
            "  mov eax, dword ptr [r15 + {KIND}]\n",
            "  mov qword ptr [r14 + {V_ARGS} + 8], rax\n",
            "  mov eax, {CMD_BAD_PARAMS}\n",
            "  call .Lgt_",
            $p,
            "_report\n",
            "  jmp .Lgt_",
            $p,
            "_halt\n",
            // report: eax = command; the mailbox is filled. Clobbers eax, edx.
            ".Lgt_",
            $p,
            "_report:\n",
            "  or eax, {CMD_HIGH}\n",
            "  mov edx, {TEST_PORT}\n",
            "  out dx, eax\n",
            "  ret\n",
            // halt: the guest runs in ring 3, where `hlt` faults, so a finished guest
            // idles on the port instead (the VMM sleeps a little on each write).
            ".Lgt_",
            $p,
            "_halt:\n",
            "  mov eax, {CMD_IDLE}\n",
            "  call .Lgt_",
            $p,
            "_report\n",
            "  jmp .Lgt_",
            $p,
            "_halt\n",
            // fail: rcx = gpa, rdx = expected, rax = actual. Does not return.
            ".Lgt_",
            $p,
            "_fail:\n",
            "  mov qword ptr [r14 + {V_ARGS} + 16], rax\n",
            "  mov qword ptr [r14 + {V_ARGS}], rcx\n",
            "  mov qword ptr [r14 + {V_ARGS} + 8], rdx\n",
            "  mov rax, qword ptr [r14 + {V_GENERATION}]\n",
            "  mov qword ptr [r14 + {V_ARGS} + 24], rax\n",
            "  mov eax, {CMD_FAIL}\n",
            "  call .Lgt_",
            $p,
            "_report\n",
            "  jmp .Lgt_",
            $p,
            "_halt\n",
            // progress: reports the counters of the vCPU block. Clobbers rax, rdx.
            ".Lgt_",
            $p,
            "_progress:\n",
            "  mov rax, qword ptr [r14 + {V_GENERATION}]\n",
            "  mov qword ptr [r14 + {V_ARGS}], rax\n",
            "  mov rax, qword ptr [r14 + {V_PAGES}]\n",
            "  mov qword ptr [r14 + {V_ARGS} + 8], rax\n",
            "  mov rax, qword ptr [r14 + {V_CHECKSUM}]\n",
            "  mov qword ptr [r14 + {V_ARGS} + 16], rax\n",
            "  rdtsc\n",
            "  shl rdx, 32\n",
            "  or rax, rdx\n",
            "  mov qword ptr [r14 + {V_ARGS} + 24], rax\n",
            "  mov rax, qword ptr [r14 + {V_WRITES}]\n",
            "  mov qword ptr [r14 + {V_ARGS} + 32], rax\n",
            "  mov eax, {CMD_PROGRESS}\n",
            "  jmp .Lgt_",
            $p,
            "_report\n",
            // pass: rcx = cycles to report. Does not return.
            ".Lgt_",
            $p,
            "_pass:\n",
            "  mov rax, qword ptr [r14 + {V_PAGES}]\n",
            "  mov qword ptr [r14 + {V_ARGS}], rax\n",
            "  mov rax, qword ptr [r14 + {V_CHECKSUM}]\n",
            "  mov qword ptr [r14 + {V_ARGS} + 8], rax\n",
            "  mov rax, qword ptr [r14 + {V_REINIT}]\n",
            "  mov qword ptr [r14 + {V_ARGS} + 16], rax\n",
            "  mov qword ptr [r14 + {V_ARGS} + 24], rcx\n",
            "  mov rax, qword ptr [r14 + {V_WRITES}]\n",
            "  mov qword ptr [r14 + {V_ARGS} + 32], rax\n",
            "  mov eax, {CMD_PASS}\n",
            "  call .Lgt_",
            $p,
            "_report\n",
            "  jmp .Lgt_",
            $p,
            "_halt\n",
            // cycles_since_start: rcx = tsc now - tsc at start. Clobbers rax, rdx.
            ".Lgt_",
            $p,
            "_cycles:\n",
            "  rdtsc\n",
            "  shl rdx, 32\n",
            "  or rax, rdx\n",
            "  sub rax, qword ptr [r14 + {V_TSC_START}]\n",
            "  mov rcx, rax\n",
            "  ret\n",
        )
    };
}

/// r9 = one xorshift64 step (13, 7, 17). Clobbers rax.
macro_rules! xorshift_r9 {
    () => {
        concat!(
            "  mov rax, r9\n",
            "  shl rax, 13\n",
            "  xor r9, rax\n",
            "  mov rax, r9\n",
            "  shr rax, 7\n",
            "  xor r9, rax\n",
            "  mov rax, r9\n",
            "  shl rax, 17\n",
            "  xor r9, rax\n",
        )
    };
}

/// The `stress` guest: for each generation, write then verify every page of the
/// slice (sequential, random or shared-hot), report progress, then PASS.
macro_rules! stress_asm {
    () => {
        concat!(
            ".pushsection .text.gt_stress,\"ax\",@progbits\n",
            ".globl gt_stress_start\n.globl gt_stress_entry\n.globl gt_stress_end\n",
            common_asm!("stress", "1"),
            ".Lgt_stress_main:\n",
            "  mov qword ptr [r14 + {V_START}], 0\n",
            "  mov qword ptr [r14 + {V_STEP}], 1\n",
            "  cmp dword ptr [r15 + {MODE}], {MODE_SHARED_HOT}\n",
            "  jne .Lgt_stress_gens\n",
            // Shared-hot: writers are the even vCPUs, nw = (nr_vcpus + 1) / 2 of them;
            // writer w owns the pages w, w + nw, w + 2 nw, ... of the hot page.
            "  mov eax, dword ptr [r15 + {NR_VCPUS}]\n",
            "  inc eax\n",
            "  shr eax, 1\n",
            "  test r13, 1\n",
            "  jnz .Lgt_stress_reader\n",
            "  mov qword ptr [r14 + {V_STEP}], rax\n",
            "  mov rcx, r13\n",
            "  shr rcx, 1\n",
            "  mov qword ptr [r14 + {V_START}], rcx\n",
            ".Lgt_stress_gens:\n",
            "  mov r11, 1\n",
            ".Lgt_stress_gen:\n",
            "  cmp r11, qword ptr [r15 + {GENERATIONS}]\n",
            "  ja .Lgt_stress_done\n",
            "  mov qword ptr [r14 + {V_GENERATION}], r11\n",
            "  mov r10, qword ptr [r15 + {RECLAIM_SEQ}]\n",
            "  lea rbp, [rip + .Lgt_stress_write_one]\n",
            "  call .Lgt_stress_for_each_page\n",
            "  lea rbp, [rip + .Lgt_stress_verify_one]\n",
            "  call .Lgt_stress_for_each_page\n",
            "  call .Lgt_stress_progress\n",
            "  inc r11\n",
            "  jmp .Lgt_stress_gen\n",
            ".Lgt_stress_done:\n",
            "  call .Lgt_stress_cycles\n",
            "  jmp .Lgt_stress_pass\n",
            // for_each_page: calls rbp for each page with r8 = index, rsi = gpa,
            // rdi = pattern. Clobbers rax, rcx, rdx, rsi, rdi, r8, r9.
            ".Lgt_stress_for_each_page:\n",
            "  cmp dword ptr [r15 + {MODE}], {MODE_RANDOM}\n",
            "  je .Lgt_stress_fe_random\n",
            "  mov r8, qword ptr [r14 + {V_START}]\n",
            ".Lgt_stress_fe_seq:\n",
            "  cmp r8, r12\n",
            "  jae .Lgt_stress_fe_done\n",
            "  call .Lgt_stress_prep\n",
            "  call rbp\n",
            "  add r8, qword ptr [r14 + {V_STEP}]\n",
            "  jmp .Lgt_stress_fe_seq\n",
            ".Lgt_stress_fe_random:\n",
            // r9 = rng_seed(seed, vcpu, generation)
            "  lea rax, [r13 + 1]\n",
            "  movabs rcx, {SEED_VCPU_MUL}\n",
            "  imul rax, rcx\n",
            "  mov rcx, r11\n",
            "  movabs rdx, {SEED_GEN_MUL}\n",
            "  imul rcx, rdx\n",
            "  xor rax, rcx\n",
            "  xor rax, qword ptr [r15 + {SEED}]\n",
            "  or rax, 1\n",
            "  mov r9, rax\n",
            "  mov rcx, r12\n",
            ".Lgt_stress_fe_rloop:\n",
            "  test rcx, rcx\n",
            "  jz .Lgt_stress_fe_done\n",
            "  push rcx\n",
            xorshift_r9!(),
            "  mov rax, r9\n",
            "  mul r12\n",
            "  mov r8, rdx\n",
            "  call .Lgt_stress_prep\n",
            "  call rbp\n",
            "  pop rcx\n",
            "  dec rcx\n",
            "  jmp .Lgt_stress_fe_rloop\n",
            ".Lgt_stress_fe_done:\n",
            "  ret\n",
            // prep: rsi = slice base + r8 * 4096, rdi = stress_pattern(r8, vcpu, r11).
            ".Lgt_stress_prep:\n",
            "  mov rsi, r8\n",
            "  shl rsi, 12\n",
            "  add rsi, rbx\n",
            "  mov rdi, r11\n",
            "  shl rdi, 40\n",
            "  movzx eax, r13b\n",
            "  shl rax, 32\n",
            "  or rdi, rax\n",
            "  mov eax, r8d\n",
            "  or rdi, rax\n",
            "  ret\n",
            // write_one: pattern at +0, the gpa at +8, ~pattern at +4088.
            ".Lgt_stress_write_one:\n",
            "  mov rax, rdi\n",
            "  not rax\n",
            "  mov qword ptr [rsi + 4088], rax\n",
            "  mov qword ptr [rsi + 8], rsi\n",
            "  mov qword ptr [rsi], rdi\n",
            "  ret\n",
            // verify_one: the three words, or (expect-reclaim) a page a reclaim zeroed.
            ".Lgt_stress_verify_one:\n",
            "  cmp qword ptr [rsi], rdi\n",
            "  jne .Lgt_stress_v_bad\n",
            "  cmp qword ptr [rsi + 8], rsi\n",
            "  jne .Lgt_stress_v_bad\n",
            "  mov rcx, rdi\n",
            "  not rcx\n",
            "  cmp qword ptr [rsi + 4088], rcx\n",
            "  jne .Lgt_stress_v_bad\n",
            ".Lgt_stress_v_ok:\n",
            "  add qword ptr [r14 + {V_CHECKSUM}], rdi\n",
            "  inc qword ptr [r14 + {V_PAGES}]\n",
            "  ret\n",
            ".Lgt_stress_v_bad:\n",
            "  test dword ptr [r15 + {FLAGS}], {FLAG_EXPECT_RECLAIM}\n",
            "  jz .Lgt_stress_v_fail\n",
            // Each word must be either what was written or zero ...
            "  mov rax, qword ptr [rsi]\n",
            "  test rax, rax\n",
            "  jz .Lgt_stress_v_z1\n",
            "  cmp rax, rdi\n",
            "  jne .Lgt_stress_v_fail\n",
            ".Lgt_stress_v_z1:\n",
            "  mov rax, qword ptr [rsi + 8]\n",
            "  test rax, rax\n",
            "  jz .Lgt_stress_v_z2\n",
            "  cmp rax, rsi\n",
            "  jne .Lgt_stress_v_fail\n",
            ".Lgt_stress_v_z2:\n",
            "  mov rax, qword ptr [rsi + 4088]\n",
            "  test rax, rax\n",
            "  jz .Lgt_stress_v_z3\n",
            "  mov rcx, rdi\n",
            "  not rcx\n",
            "  cmp rax, rcx\n",
            "  jne .Lgt_stress_v_fail\n",
            ".Lgt_stress_v_z3:\n",
            // ... and a reclaim must have run since the generation started.
            "  cmp r10, qword ptr [r15 + {RECLAIM_SEQ}]\n",
            "  jne .Lgt_stress_v_reinit\n",
            "  test r10, 1\n",
            "  jz .Lgt_stress_v_fail\n",
            ".Lgt_stress_v_reinit:\n",
            "  call .Lgt_stress_write_one\n",
            "  inc qword ptr [r14 + {V_REINIT}]\n",
            "  jmp .Lgt_stress_v_ok\n",
            ".Lgt_stress_v_fail:\n",
            "  mov rcx, rsi\n",
            "  mov rdx, rdi\n",
            "  mov rax, qword ptr [rsi]\n",
            "  cmp rax, rdx\n",
            "  jne .Lgt_stress_fail\n",
            "  lea rcx, [rsi + 8]\n",
            "  mov rdx, rsi\n",
            "  mov rax, qword ptr [rsi + 8]\n",
            "  cmp rax, rdx\n",
            "  jne .Lgt_stress_fail\n",
            "  lea rcx, [rsi + 4088]\n",
            "  mov rdx, rdi\n",
            "  not rdx\n",
            "  mov rax, qword ptr [rsi + 4088]\n",
            "  jmp .Lgt_stress_fail\n",
            // Shared-hot reader: each generation reads every page of the hot page; a
            // word is zero (not written yet, or reclaimed) or a valid value of the
            // page's owner: index, owner vCPU and a generation in 1..=generations.
            ".Lgt_stress_reader:\n",
            "  mov rbp, rax\n",
            "  mov r11, 1\n",
            ".Lgt_stress_r_gen:\n",
            "  cmp r11, qword ptr [r15 + {GENERATIONS}]\n",
            "  ja .Lgt_stress_done\n",
            "  mov qword ptr [r14 + {V_GENERATION}], r11\n",
            "  xor r8d, r8d\n",
            ".Lgt_stress_r_page:\n",
            "  cmp r8, r12\n",
            "  jae .Lgt_stress_r_gen_done\n",
            "  mov rsi, r8\n",
            "  shl rsi, 12\n",
            "  add rsi, rbx\n",
            // rdi = owner tag = (2 * (index % nw)) << 32 | index
            "  mov rax, r8\n",
            "  xor edx, edx\n",
            "  div rbp\n",
            "  shl rdx, 33\n",
            "  mov edi, r8d\n",
            "  or rdi, rdx\n",
            "  mov rax, qword ptr [rsi]\n",
            "  test rax, rax\n",
            "  jz .Lgt_stress_r_w1\n",
            "  call .Lgt_stress_r_check\n",
            "  jne .Lgt_stress_r_fail0\n",
            "  add qword ptr [r14 + {V_CHECKSUM}], rax\n",
            ".Lgt_stress_r_w1:\n",
            "  mov rax, qword ptr [rsi + 8]\n",
            "  test rax, rax\n",
            "  jz .Lgt_stress_r_w2\n",
            "  cmp rax, rsi\n",
            "  jne .Lgt_stress_r_fail1\n",
            ".Lgt_stress_r_w2:\n",
            "  mov rax, qword ptr [rsi + 4088]\n",
            "  test rax, rax\n",
            "  jz .Lgt_stress_r_next\n",
            "  not rax\n",
            "  call .Lgt_stress_r_check\n",
            "  jne .Lgt_stress_r_fail2\n",
            ".Lgt_stress_r_next:\n",
            "  inc qword ptr [r14 + {V_PAGES}]\n",
            "  inc r8\n",
            "  jmp .Lgt_stress_r_page\n",
            ".Lgt_stress_r_gen_done:\n",
            "  call .Lgt_stress_progress\n",
            "  inc r11\n",
            "  jmp .Lgt_stress_r_gen\n",
            // r_check: ZF set when rax is a valid pattern for tag rdi. Clobbers rcx.
            ".Lgt_stress_r_check:\n",
            "  mov rcx, rax\n",
            "  shr rcx, 40\n",
            "  jz .Lgt_stress_r_check_bad\n",
            "  cmp rcx, qword ptr [r15 + {GENERATIONS}]\n",
            "  ja .Lgt_stress_r_check_bad\n",
            "  mov rcx, rax\n",
            "  shl rcx, 24\n",
            "  shr rcx, 24\n",
            "  cmp rcx, rdi\n",
            "  ret\n",
            ".Lgt_stress_r_check_bad:\n",
            "  or ecx, 1\n",
            "  ret\n",
            ".Lgt_stress_r_fail0:\n",
            "  mov rcx, rsi\n",
            "  mov rdx, rdi\n",
            "  mov rax, qword ptr [rsi]\n",
            "  jmp .Lgt_stress_fail\n",
            ".Lgt_stress_r_fail1:\n",
            "  lea rcx, [rsi + 8]\n",
            "  mov rdx, rsi\n",
            "  jmp .Lgt_stress_fail\n",
            ".Lgt_stress_r_fail2:\n",
            "  lea rcx, [rsi + 4088]\n",
            "  mov rdx, rdi\n",
            "  not rdx\n",
            "  mov rax, qword ptr [rsi + 4088]\n",
            "  jmp .Lgt_stress_fail\n",
            "gt_stress_end:\n",
            ".popsection\n",
        )
    };
}

/// The `touch` guest: one write per 4 KiB page of the slice, timed with rdtsc,
/// then a verify pass outside the timed loop.
macro_rules! touch_asm {
    () => {
        concat!(
            ".pushsection .text.gt_touch,\"ax\",@progbits\n",
            ".globl gt_touch_start\n.globl gt_touch_entry\n.globl gt_touch_end\n",
            common_asm!("touch", "2"),
            ".Lgt_touch_main:\n",
            "  mov qword ptr [r14 + {V_GENERATION}], 1\n",
            "  rdtsc\n",
            "  shl rdx, 32\n",
            "  or rax, rdx\n",
            "  mov r10, rax\n",
            "  mov rsi, rbx\n",
            "  mov rcx, r12\n",
            ".Lgt_touch_loop:\n",
            "  test rcx, rcx\n",
            "  jz .Lgt_touch_timed\n",
            "  mov qword ptr [rsi], rsi\n",
            "  add rsi, 4096\n",
            "  dec rcx\n",
            "  jmp .Lgt_touch_loop\n",
            ".Lgt_touch_timed:\n",
            "  rdtsc\n",
            "  shl rdx, 32\n",
            "  or rax, rdx\n",
            "  sub rax, r10\n",
            "  mov r10, rax\n",
            "  mov rsi, rbx\n",
            "  mov rcx, r12\n",
            ".Lgt_touch_verify:\n",
            "  test rcx, rcx\n",
            "  jz .Lgt_touch_ok\n",
            "  mov rax, qword ptr [rsi]\n",
            "  cmp rax, rsi\n",
            "  jne .Lgt_touch_bad\n",
            "  add qword ptr [r14 + {V_CHECKSUM}], rax\n",
            "  inc qword ptr [r14 + {V_PAGES}]\n",
            "  add rsi, 4096\n",
            "  dec rcx\n",
            "  jmp .Lgt_touch_verify\n",
            ".Lgt_touch_bad:\n",
            "  mov rcx, rsi\n",
            "  mov rdx, rsi\n",
            "  jmp .Lgt_touch_fail\n",
            ".Lgt_touch_ok:\n",
            "  mov rcx, r10\n",
            "  jmp .Lgt_touch_pass\n",
            "gt_touch_end:\n",
            ".popsection\n",
        )
    };
}

/// The `dirty` guest: per generation, `writes_per_gen` writes of the generation
/// number into xorshift-chosen pages (gpa at +8, generation at +0), counting each
/// completed write; runs `generations` generations, or until `stop` when that is 0.
/// With `write_interval_tsc` set it spaces its writes that many TSC cycles apart
/// (rdtsc is allowed at CPL 3: the VMM leaves CR4.TSD clear), sleeping in the host
/// (`CMD_SLEEP`) for each wait, at least `PACE_SLEEP_MIN_US`: the writes that fall
/// due during a rounded-up sleep go in a burst, so a high rate does not spin.
macro_rules! dirty_asm {
    () => {
        concat!(
            ".pushsection .text.gt_dirty,\"ax\",@progbits\n",
            ".globl gt_dirty_start\n.globl gt_dirty_entry\n.globl gt_dirty_end\n",
            common_asm!("dirty", "3"),
            ".Lgt_dirty_main:\n",
            // r9 = rng_seed(seed, vcpu, 0)
            "  lea rax, [r13 + 1]\n",
            "  movabs rcx, {SEED_VCPU_MUL}\n",
            "  imul rax, rcx\n",
            "  xor rax, qword ptr [r15 + {SEED}]\n",
            "  or rax, 1\n",
            "  mov r9, rax\n",
            "  mov r11, 1\n",
            // Pacing: r10 = TSC deadline of the next write, r8 = longest backlog made up.
            "  rdtsc\n",
            "  shl rdx, 32\n",
            "  or rax, rdx\n",
            "  mov r10, rax\n",
            "  imul r8, qword ptr [r15 + {TSC_KHZ}], {PACE_MAX_LAG_MS}\n",
            // rbp = shortest wait handed to the host (PACE_SLEEP_MIN_US in cycles:
            // kHz * µs / 1000); all ones (never) when the TSC frequency is unknown.
            "  imul rax, qword ptr [r15 + {TSC_KHZ}], {PACE_SLEEP_MIN_US}\n",
            "  xor edx, edx\n",
            "  mov ecx, 1000\n",
            "  div rcx\n",
            "  mov rbp, rax\n",
            "  test rbp, rbp\n",
            "  jnz .Lgt_dirty_gen\n",
            "  dec rbp\n",
            ".Lgt_dirty_gen:\n",
            "  cmp qword ptr [r15 + {GENERATIONS}], 0\n",
            "  je .Lgt_dirty_go\n",
            "  cmp r11, qword ptr [r15 + {GENERATIONS}]\n",
            "  ja .Lgt_dirty_done\n",
            ".Lgt_dirty_go:\n",
            "  mov rcx, qword ptr [r15 + {WRITES_PER_GEN}]\n",
            ".Lgt_dirty_write:\n",
            "  test rcx, rcx\n",
            "  jz .Lgt_dirty_gen_done\n",
            "  call .Lgt_dirty_pace\n",
            xorshift_r9!(),
            "  mov rax, r9\n",
            "  mul r12\n",
            "  mov rsi, rdx\n",
            "  shl rsi, 12\n",
            "  add rsi, rbx\n",
            "  mov qword ptr [rsi + 8], rsi\n",
            "  mov qword ptr [rsi], r11\n",
            "  mov rax, rsi\n",
            "  xor rax, r11\n",
            "  add qword ptr [r14 + {V_CHECKSUM}], rax\n",
            "  inc qword ptr [r14 + {V_WRITES}]\n",
            "  dec rcx\n",
            "  jmp .Lgt_dirty_write\n",
            ".Lgt_dirty_gen_done:\n",
            "  mov qword ptr [r14 + {V_GENERATION}], r11\n",
            "  call .Lgt_dirty_progress\n",
            "  cmp qword ptr [r15 + {STOP}], 0\n",
            "  jne .Lgt_dirty_done\n",
            "  inc r11\n",
            "  jmp .Lgt_dirty_gen\n",
            ".Lgt_dirty_done:\n",
            "  call .Lgt_dirty_cycles\n",
            "  jmp .Lgt_dirty_pass\n",
            // pace: returns when this vCPU's next write is due: r10 advances by
            // write_interval_tsc (0 = unpaced); a backlog beyond r8 cycles is dropped, and
            // a deadline more than one interval ahead (the TSC went back, e.g. after a
            // migration) restarts from now. A wait is handed to the host (SLEEP with the
            // cycles left; the host may return early, so the TSC is read again after
            // it); a wait shorter than rbp cycles sleeps rbp cycles and the writes that
            // fall due meanwhile go in a burst, so the average rate holds without
            // spinning. Only with an unknown TSC frequency (rbp all ones) does it spin.
            // Clobbers rax, rdx, rdi.
            ".Lgt_dirty_pace:\n",
            "  mov rdi, qword ptr [r15 + {WRITE_INTERVAL_TSC}]\n",
            "  test rdi, rdi\n",
            "  jz .Lgt_dirty_pace_ret\n",
            "  add r10, rdi\n",
            ".Lgt_dirty_pace_spin:\n",
            "  rdtsc\n",
            "  shl rdx, 32\n",
            "  or rax, rdx\n",
            "  mov rdx, r10\n",
            "  sub rdx, rax\n",
            "  jle .Lgt_dirty_pace_due\n",
            "  cmp rdx, rdi\n",
            "  ja .Lgt_dirty_pace_reset\n",
            "  cmp rdx, rbp\n",
            "  jae .Lgt_dirty_pace_sleep\n",
            "  cmp rbp, -1\n",
            "  jne .Lgt_dirty_pace_round_up\n",
            "  pause\n",
            "  jmp .Lgt_dirty_pace_spin\n",
            ".Lgt_dirty_pace_round_up:\n",
            "  mov rdx, rbp\n",
            ".Lgt_dirty_pace_sleep:\n",
            "  mov qword ptr [r14 + {V_ARGS}], rdx\n",
            "  mov eax, {CMD_SLEEP}\n",
            "  call .Lgt_dirty_report\n",
            "  jmp .Lgt_dirty_pace_spin\n",
            ".Lgt_dirty_pace_due:\n",
            "  neg rdx\n",
            "  cmp rdx, r8\n",
            "  jbe .Lgt_dirty_pace_ret\n",
            ".Lgt_dirty_pace_reset:\n",
            "  mov r10, rax\n",
            ".Lgt_dirty_pace_ret:\n",
            "  ret\n",
            "gt_dirty_end:\n",
            ".popsection\n",
        )
    };
}

core::arch::global_asm!(
    stress_asm!(),
    touch_asm!(),
    dirty_asm!(),
    MAGIC = const o::MAGIC,
    KIND = const o::KIND,
    MODE = const o::MODE,
    NR_VCPUS = const o::NR_VCPUS,
    FLAGS = const o::FLAGS,
    GENERATIONS = const o::GENERATIONS,
    SEED = const o::SEED,
    WRITES_PER_GEN = const o::WRITES_PER_GEN,
    RECLAIM_SEQ = const o::RECLAIM_SEQ,
    STOP = const o::STOP,
    TSC_KHZ = const o::TSC_KHZ,
    WRITE_INTERVAL_TSC = const o::WRITE_INTERVAL_TSC,
    PACE_MAX_LAG_MS = const PACE_MAX_LAG_MS,
    PACE_SLEEP_MIN_US = const PACE_SLEEP_MIN_US,
    VCPUS = const o::VCPUS,
    VCPU_BLOCK_SHIFT = const o::VCPU_BLOCK_SHIFT,
    V_SLICE_BASE = const o::V_SLICE_BASE,
    V_SLICE_LEN = const o::V_SLICE_LEN,
    V_START = const o::V_START,
    V_STEP = const o::V_STEP,
    V_GENERATION = const o::V_GENERATION,
    V_PAGES = const o::V_PAGES,
    V_WRITES = const o::V_WRITES,
    V_CHECKSUM = const o::V_CHECKSUM,
    V_REINIT = const o::V_REINIT,
    V_TSC_START = const o::V_TSC_START,
    V_ARGS = const o::V_ARGS,
    MAGIC_VALUE = const PARAMS_MAGIC,
    MODE_RANDOM = const Mode::Random as u32,
    MODE_SHARED_HOT = const Mode::SharedHot as u32,
    FLAG_EXPECT_RECLAIM = const FLAG_EXPECT_RECLAIM,
    SEED_VCPU_MUL = const SEED_VCPU_MUL,
    SEED_GEN_MUL = const SEED_GEN_MUL,
    CMD_HIGH = const PORT_MAGIC << 16,
    TEST_PORT = const TEST_PORT,
    CMD_START = const CMD_START,
    CMD_PROGRESS = const CMD_PROGRESS,
    CMD_PASS = const CMD_PASS,
    CMD_FAIL = const CMD_FAIL,
    CMD_BAD_PARAMS = const CMD_BAD_PARAMS,
    CMD_IDLE = const CMD_IDLE,
    CMD_SLEEP = const CMD_SLEEP,
);

extern "C" {
    static gt_stress_start: u8;
    static gt_stress_entry: u8;
    static gt_stress_end: u8;
    static gt_touch_start: u8;
    static gt_touch_entry: u8;
    static gt_touch_end: u8;
    static gt_dirty_start: u8;
    static gt_dirty_entry: u8;
    static gt_dirty_end: u8;
}

fn span(start: *const u8, entry: *const u8, end: *const u8) -> Payload {
    let len = end as usize - start as usize;
    // SAFETY: `start..end` brackets one guest's bytes in this binary's read-only,
    // executable text, which lives as long as the program; `end > start` since every
    // guest has code between the symbols (checked by the payload tests).
    let code = unsafe { core::slice::from_raw_parts(start, len) };
    Payload {
        code,
        entry_offset: entry as usize - start as usize,
    }
}

/// The payload of `kind`.
pub fn payload_of(kind: GuestKind) -> Payload {
    match kind {
        GuestKind::Stress => span(
            &raw const gt_stress_start,
            &raw const gt_stress_entry,
            &raw const gt_stress_end,
        ),
        GuestKind::Touch => span(
            &raw const gt_touch_start,
            &raw const gt_touch_entry,
            &raw const gt_touch_end,
        ),
        GuestKind::Dirty => span(
            &raw const gt_dirty_start,
            &raw const gt_dirty_entry,
            &raw const gt_dirty_end,
        ),
    }
}

/// The payload of the guest called `name` (`stress`, `touch`, `dirty`).
pub fn payload(name: &str) -> Option<Payload> {
    GuestKind::from_name(name).map(payload_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opcode bytes the guests must never contain as instructions. Checked over the
    /// whole blob: a false positive inside an immediate would show up as a failure to
    /// look at, never as a silent pass.
    fn contains(code: &[u8], pattern: &[u8]) -> bool {
        code.windows(pattern.len()).any(|w| w == pattern)
    }

    #[test]
    fn every_payload_is_non_empty_and_starts_at_its_entry() {
        for kind in GuestKind::ALL {
            let p = payload_of(kind);
            assert!(
                p.code.len() > 64,
                "{} is {} bytes",
                kind.name(),
                p.code.len()
            );
            assert!(p.code.len() < 64 * 1024);
            assert_eq!(p.entry_offset, 0);
            // mov r15, rsi (49 89 f7) is the first instruction of every guest.
            assert_eq!(&p.code[..3], &[0x49, 0x89, 0xf7], "{}", kind.name());
        }
    }

    #[test]
    fn payloads_are_distinct_and_found_by_name() {
        let s = payload("stress").unwrap();
        let t = payload("touch").unwrap();
        let d = payload("dirty").unwrap();
        assert_ne!(s.code.as_ptr(), t.code.as_ptr());
        assert_ne!(t.code.as_ptr(), d.code.as_ptr());
        assert!(payload("linux").is_none());
    }

    #[test]
    fn payloads_issue_port_writes_and_idle_forever() {
        let idle = (PORT_MAGIC << 16 | CMD_IDLE).to_le_bytes();
        for kind in GuestKind::ALL {
            let code = payload_of(kind).code;
            // out dx, eax (ef) then ret (c3).
            assert!(contains(code, &[0xef, 0xc3]), "{}", kind.name());
            // The idle loop: mov eax, CMD_IDLE (b8 06 00 00 00); call report; jmp back.
            let at = code
                .windows(5)
                .position(|w| w == [0xb8, CMD_IDLE as u8, 0, 0, 0])
                .unwrap_or_else(|| panic!("no idle loop in {}", kind.name()));
            assert_eq!(code[at + 5], 0xe8, "call after mov in {}", kind.name());
            assert_eq!(code[at + 10], 0xeb, "short jmp in {}", kind.name());
            let back = code[at + 11] as i8 as isize;
            assert_eq!(at as isize + 12 + back, at as isize, "jmp target");
            // The report routine ORs the magic in: the full dword is what the VMM sees.
            assert_eq!(idle[2..], PORT_MAGIC.to_le_bytes()[..2]);
        }
    }

    #[test]
    fn payloads_avoid_instructions_this_kvm_cannot_emulate() {
        for kind in GuestKind::ALL {
            let code = payload_of(kind).code;
            assert!(!code.contains(&0xcc), "int3 in {}", kind.name());
            // cmpxchg16b / cmpxchg8b: 0f c7 /1; xrstor: 0f ae /5.
            assert!(!contains(code, &[0x0f, 0xc7]), "cmpxchg in {}", kind.name());
            assert!(!contains(code, &[0x0f, 0xae]), "xrstor in {}", kind.name());
        }
    }
}
