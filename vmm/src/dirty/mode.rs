//! The dirty-tracking modes (`--dirty-mode`): [`DirtyMode`], its spelling and parsing.

/// Which source of dirty pages a tracker uses (`--dirty-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// `kvm-bitmap`: KVM's dirty bitmap with manual protect, cleared per chunk.
    KvmBitmap,
    /// `kvm-ring`: KVM's per-vCPU dirty rings of `ring_bytes` bytes each (a power of two).
    KvmRing {
        /// Bytes per vCPU ring (16 bytes per entry).
        ring_bytes: u32,
    },
    /// `stage2-wp`: stage2's write tracking through userfaultfd write-protect (needs a
    /// [`crate::pager::Pager`] started with `write_tracking`).
    Stage2Wp,
}

impl std::str::FromStr for DirtyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm-bitmap" => Ok(DirtyMode::KvmBitmap),
            "kvm-ring" => Ok(DirtyMode::KvmRing {
                ring_bytes: DEFAULT_RING_BYTES,
            }),
            "stage2-wp" => Ok(DirtyMode::Stage2Wp),
            other => Err(format!(
                "unknown dirty-tracking mode {other:?}: use kvm-bitmap, kvm-ring or stage2-wp"
            )),
        }
    }
}

impl DirtyMode {
    /// The `--dirty-mode` spelling.
    pub fn name(&self) -> &'static str {
        match self {
            DirtyMode::KvmBitmap => "kvm-bitmap",
            DirtyMode::KvmRing { .. } => "kvm-ring",
            DirtyMode::Stage2Wp => "stage2-wp",
        }
    }
}

/// Default per-vCPU ring: 64 KiB = 4096 entries (the selftest's default size).
pub const DEFAULT_RING_BYTES: u32 = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_with_a_helpful_error() {
        assert_eq!("kvm-bitmap".parse::<DirtyMode>(), Ok(DirtyMode::KvmBitmap));
        assert_eq!("stage2-wp".parse::<DirtyMode>(), Ok(DirtyMode::Stage2Wp));
        assert!(matches!(
            "kvm-ring".parse::<DirtyMode>(),
            Ok(DirtyMode::KvmRing { .. })
        ));
        let e = "ring".parse::<DirtyMode>().unwrap_err();
        assert!(e.contains("kvm-bitmap"), "{e}");
    }

    #[test]
    fn names_parse_back_to_their_mode() {
        for m in [
            DirtyMode::KvmBitmap,
            DirtyMode::KvmRing {
                ring_bytes: DEFAULT_RING_BYTES,
            },
            DirtyMode::Stage2Wp,
        ] {
            assert_eq!(m.name().parse::<DirtyMode>(), Ok(m));
        }
    }
}
