//! The error type of vCPU configuration and platform tables.

/// Errors configuring a vCPU or writing platform tables.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {vcpu}: KVM {what} failed: {source}")]
    Kvm {
        /// vCPU id.
        vcpu: u8,
        /// The call.
        what: &'static str,
        /// errno.
        source: crate::hypervisor::Error,
    },
    /// KVM refused one of the boot MSRs.
    #[error("vCPU {vcpu}: KVM accepted {set} of {total} boot MSRs (refused MSR {msr:#x})")]
    Msrs {
        /// vCPU id.
        vcpu: u8,
        /// How many were set.
        set: usize,
        /// How many were asked.
        total: usize,
        /// The first refused index.
        msr: u32,
    },
    /// Writing a table into guest memory failed.
    #[error("cannot write {what} at guest address {gpa:#x}: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Where.
        gpa: u64,
        /// The vm-memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// The identity map asked for is larger than one PML4 entry (512 GiB) can map.
    #[error("identity map of {0:#x} bytes is larger than the 512 GiB one page-directory-pointer table maps")]
    IdentityMapTooLarge(u64),
    /// Too many CPUs for the MP table.
    #[error("{0} vCPUs do not fit the MP table (at most 254)")]
    TooManyCpus(u8),
    /// A CPUID table operation failed.
    #[error("vCPU {vcpu}: cannot build CPUID: {what}")]
    Cpuid {
        /// vCPU id.
        vcpu: u8,
        /// What went wrong.
        what: String,
    },
}
