//! AFL++ entry point of the `virtio_balloon` fuzz target; the body is `vmm_fuzz::virtio_balloon::run`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmm_fuzz::virtio_balloon::run(data);
    });
}
