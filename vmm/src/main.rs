//! The `vmm` binary: command line over the `vmm` library.

fn main() {
    eprintln!("vmm: not built yet");
    std::process::exit(1);
}
