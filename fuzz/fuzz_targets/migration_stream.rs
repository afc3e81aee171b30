//! AFL++ entry point of the `migration_stream` fuzz target; the body is `vmm_fuzz::migration_stream::run`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmm_fuzz::migration_stream::run(data);
    });
}
