//! AFL++ entry point of the `control_socket` fuzz target; the body is `vmm_fuzz::control_socket::run`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmm_fuzz::control_socket::run(data);
    });
}
