//! AFL++ entry point of the `virtio_net` fuzz target; the body is `vmm_fuzz::virtio_net::run`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmm_fuzz::virtio_net::run(data);
    });
}
