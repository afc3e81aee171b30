//! AFL++ entry point of the `virtio_blk` fuzz target; the body is `vmm_fuzz::virtio_blk::run`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmm_fuzz::virtio_blk::run(data);
    });
}
