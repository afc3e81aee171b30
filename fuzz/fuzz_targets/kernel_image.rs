//! AFL++ entry point of the `kernel_image` fuzz target; the body is `vmm_fuzz::kernel_image::run`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmm_fuzz::kernel_image::run(data);
    });
}
