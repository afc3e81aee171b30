//! The bodies of the fuzz targets (one module each), kept in a library so that the AFL binaries
//! under `fuzz_targets/`, the seed writer and the corpus replay test all run the same code.
//!
//! Every target takes any byte slice, caps its length, and panics only on a real finding: a
//! panic inside the vmm or stage2 code it drives, or (for `stage2_ops`) the engine and the
//! reference model disagreeing.

pub mod control_socket;
pub mod images;
pub mod input;
pub mod kernel_image;
pub mod migration_stream;
pub mod stage2_model;
pub mod stage2_ops;
pub mod virtio_balloon;
pub mod virtio_blk;
pub mod virtio_net;

/// Longest input any target looks at; the rest of a longer input is ignored.
pub const MAX_INPUT: usize = 1 << 20;

/// `data` cut to [`MAX_INPUT`] bytes.
pub fn capped(data: &[u8]) -> &[u8] {
    &data[..data.len().min(MAX_INPUT)]
}
