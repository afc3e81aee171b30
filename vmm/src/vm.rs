//! The KVM virtual machine: opens `/dev/kvm`, checks what we need, creates the VM with its
//! in-kernel irqchip and PIT, and installs one memslot per guest RAM region.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use log::info;

use crate::memory::GuestRam;

/// Path of the KVM device.
pub const KVM_PATH: &str = "/dev/kvm";
/// The KVM API version this VMM speaks (KVM_GET_API_VERSION, Documentation/virt/kvm/api.rst §4.1).
const KVM_API_VERSION: i32 = 12;
/// Guest-physical address of the 3-page TSS region KVM needs on Intel (KVM_SET_TSS_ADDR):
/// inside the 32-bit hole, below the 4 GiB boundary, never RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Guest-physical address of the one-page identity map for real mode on Intel
/// (KVM_SET_IDENTITY_MAP_ADDR): the page just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = KVM_TSS_ADDRESS - 0x1000;

/// Errors creating the VM; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` does not exist.
    #[error("{KVM_PATH} does not exist: load the KVM module (`modprobe kvm_intel` or `modprobe kvm_amd`) or run on a host with virtualization enabled")]
    NoKvm,
    /// `/dev/kvm` exists but cannot be opened.
    #[error("cannot open {KVM_PATH}: permission denied; add your user to the `kvm` group (`sudo usermod -aG kvm $USER`, then log in again) or `sudo chmod 666 {KVM_PATH}`")]
    KvmPermission,
    /// Any other open error.
    #[error("cannot open {KVM_PATH}: {0}")]
    KvmOpen(std::io::Error),
    /// Wrong API version.
    #[error("{KVM_PATH} speaks KVM API version {0}, this VMM needs {KVM_API_VERSION}: use a newer kernel")]
    ApiVersion(i32),
    /// A needed capability is missing.
    #[error("KVM on this host lacks {0}; this VMM needs it")]
    MissingCap(&'static str),
    /// Too many vCPUs.
    #[error("--cpus {asked} is more than KVM allows on this host ({max}): use --cpus 1..={max}")]
    TooManyCpus {
        /// Requested.
        asked: u32,
        /// KVM_CAP_MAX_VCPUS.
        max: u32,
    },
    /// Zero vCPUs.
    #[error("--cpus 0: a VM needs at least one vCPU; use --cpus 1 or more")]
    NoCpus,
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM VM with its memory installed.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    supported_cpuid: CpuId,
    cpus: u8,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("cpus", &self.cpus)
            .finish_non_exhaustive()
    }
}

/// Opens `/dev/kvm` with errors that name the fix.
pub fn open_kvm() -> Result<Kvm, VmError> {
    match Kvm::new() {
        Ok(kvm) => Ok(kvm),
        Err(e) => match e.errno() {
            libc::ENOENT => Err(VmError::NoKvm),
            libc::EACCES | libc::EPERM => Err(VmError::KvmPermission),
            _ => Err(VmError::KvmOpen(std::io::Error::from_raw_os_error(
                e.errno(),
            ))),
        },
    }
}

/// The software KVM this host runs, if any: `kvm_pvm` (PVM, as clouds without nested
/// virtualisation use) interprets guest ring-0 code and needs the VMM's help that hardware KVM
/// does not (the emulation fallback, the syscall relay, a kernel command line without XSAVE).
pub fn software_kvm() -> Option<&'static str> {
    std::path::Path::new("/sys/module/kvm_pvm")
        .exists()
        .then_some("kvm_pvm")
}

/// The largest vCPU count KVM accepts here.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    // The MP table and xAPIC ids carry 8-bit APIC ids, 0xff is the broadcast id.
    (kvm.get_max_vcpus() as u32).min(254)
}

impl Vm {
    /// Creates the VM for `cpus` vCPUs over `ram`.
    pub fn new(ram: &GuestRam, cpus: u8) -> Result<Vm, VmError> {
        if cpus == 0 {
            return Err(VmError::NoCpus);
        }
        let kvm = open_kvm()?;
        let api = kvm.get_api_version();
        if api != KVM_API_VERSION {
            return Err(VmError::ApiVersion(api));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let max = max_vcpus(&kvm);
        if u32::from(cpus) > max {
            return Err(VmError::TooManyCpus {
                asked: cpus.into(),
                max,
            });
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        for (slot, r) in ram.regions().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: r.host_addr,
            };
            // SAFETY: the host range is a live mapping owned by `ram`, which the caller keeps
            // alive for as long as the VM runs (the VM is dropped before guest RAM in `main`
            // and in the guest runner); slots do not overlap because RAM regions do not.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        info!(
            "KVM VM created: {cpus} vCPU(s), {} memslot(s)",
            ram.regions().count()
        );
        Ok(Vm {
            kvm,
            fd,
            supported_cpuid,
            cpus,
        })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Number of vCPUs this VM was created for.
    pub fn cpus(&self) -> u8 {
        self.cpus
    }

    /// CPUID as KVM supports it on this host (unfiltered).
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Makes the guest's writes to `IA32_LSTAR` exit to userspace (`KVM_CAP_X86_USER_SPACE_MSR`
    /// with an MSR filter), for the syscall relay: the vCPU thread carries each write out and
    /// arms the relay. Every other MSR stays with KVM.
    pub fn filter_syscall_msrs(&self) -> Result<(), VmError> {
        use crate::arch::x86_64::emulate::syscall_relay::MSR_LSTAR;
        use kvm_bindings::{
            kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER,
        };
        use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
        self.fd
            .enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)"))?;
        // One MSR, its bit 0 clear: writes to it are denied to KVM and so exit to us.
        let deny = [0u8; 1];
        self.fd
            .set_msr_filter(
                MsrFilterDefaultAction::ALLOW,
                &[MsrFilterRange {
                    flags: MsrFilterRangeFlags::WRITE,
                    base: MSR_LSTAR,
                    msr_count: 1,
                    bitmap: &deny,
                }],
            )
            .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))
    }

    /// Creates vCPU `id` (0 is the boot CPU).
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))
    }
}
