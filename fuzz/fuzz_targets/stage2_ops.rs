//! AFL++ entry point of the `stage2_ops` fuzz target; the body is `vmm_fuzz::stage2_ops::run`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmm_fuzz::stage2_ops::run(data);
    });
}
