//! Byte sizes: the page-size constants and the human-readable form of a byte count.

pub(super) const SZ_4K: u64 = 4 << 10;
pub(super) const SZ_2M: u64 = 2 << 20;
pub(super) const SZ_1G: u64 = 1 << 30;

/// Formats a byte count with the largest exact binary suffix (4G, 512M, 4K, or bytes).
pub fn human(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{}", bytes >> shift, suffix);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(4 << 30), "4G");
        assert_eq!(human(3 << 20), "3M");
        assert_eq!(human(5), "5 bytes");
    }
}
