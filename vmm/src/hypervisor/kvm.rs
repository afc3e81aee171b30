//! The KVM side of the hypervisor seam: opens `/dev/kvm`, checks what we need, creates the VM
//! with its in-kernel irqchip and PIT and one memslot per guest RAM region, and implements
//! [`VcpuOps`], [`VmOps`] and the vCPU's run on `kvm_ioctls`.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use std::os::fd::{AsRawFd, RawFd};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_guest_debug, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_pit_state2, kvm_regs, kvm_run, kvm_sregs, kvm_translation, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use log::info;
use vmm_sys_util::eventfd::EventFd;

use super::{MsrWrite, Result, VcpuOps, VmExit, VmOps};
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
        source: super::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(super::Error) -> VmError {
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
fn open_kvm() -> std::result::Result<Kvm, VmError> {
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

/// The largest vCPU count KVM accepts here (opens `/dev/kvm` to ask).
pub fn max_vcpus() -> std::result::Result<u32, VmError> {
    Ok(max_vcpus_of(&open_kvm()?))
}

fn max_vcpus_of(kvm: &Kvm) -> u32 {
    // The MP table and xAPIC ids carry 8-bit APIC ids, 0xff is the broadcast id.
    (kvm.get_max_vcpus() as u32).min(254)
}

impl Vm {
    /// Creates the VM for `cpus` vCPUs over `ram`.
    pub fn new(ram: &GuestRam, cpus: u8) -> std::result::Result<Vm, VmError> {
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
        let max = max_vcpus_of(&kvm);
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

    /// A second handle on this VM (its own descriptor), for a thread that reads VM state
    /// while the VM runs and may outlive this borrow.
    pub fn handle(&self) -> std::io::Result<VmHandle> {
        // SAFETY: dup of the VM's own descriptor; the new descriptor is owned by the VmFd below.
        let raw = unsafe { libc::dup(self.fd.as_raw_fd()) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor of this KVM VM, owned by nothing else.
        let fd = unsafe { self.kvm.create_vmfd_from_rawfd(raw) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(VmHandle { fd })
    }

    /// Signals `gsi` of the in-kernel irqchip whenever `event` is written (KVM_IRQFD).
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(event, gsi)
    }

    /// Signals `event` when a vCPU writes the 4-byte value `datamatch` to guest-physical
    /// `addr`, without an exit to the VMM (KVM_IOEVENTFD): a virtio queue's notification.
    pub fn register_ioevent_mmio(&self, event: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .register_ioevent(event, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
    }

    /// The MSRs KVM can save and restore for a vCPU (KVM_GET_MSR_INDEX_LIST).
    pub fn msr_index_list(&self) -> Result<Vec<u32>> {
        Ok(self.kvm.get_msr_index_list()?.as_slice().to_vec())
    }

    /// KVM_CAP_XSAVE: a vCPU's XSAVE image can be read and written.
    pub fn has_xsave(&self) -> bool {
        self.kvm.check_extension(Cap::Xsave)
    }

    /// KVM_CAP_XCRS: a vCPU's XCR0 can be read and written.
    pub fn has_xcrs(&self) -> bool {
        self.kvm.check_extension(Cap::Xcrs)
    }

    /// Number of vCPUs this VM was created for.
    pub fn cpus(&self) -> u8 {
        self.cpus
    }

    /// CPUID as KVM supports it on this host (unfiltered).
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Makes the guest's writes to the MSR `index` exit to userspace (`KVM_CAP_X86_USER_SPACE_MSR`
    /// with an MSR filter; the syscall relay filters `IA32_LSTAR` so that the vCPU thread
    /// carries each write out and arms the relay). Every other MSR stays with KVM.
    pub fn filter_msr_writes(&self, index: u32) -> std::result::Result<(), VmError> {
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
                    base: index,
                    msr_count: 1,
                    bitmap: &deny,
                }],
            )
            .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))
    }

    /// Creates vCPU `id` (0 is the boot CPU).
    pub fn create_vcpu(&self, id: u8) -> std::result::Result<Vcpu, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map(Vcpu)
            .map_err(kvm_err("KVM_CREATE_VCPU"))
    }
}

impl AsRawFd for Vm {
    /// The VM descriptor, for the calls made on it by raw ioctl (the dirty log and rings).
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Another descriptor of a VM ([`Vm::handle`]): VM-wide state from any thread.
pub struct VmHandle {
    fd: VmFd,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle").finish_non_exhaustive()
    }
}

/// Implements [`VmOps`] by forwarding to a `VmFd` field.
macro_rules! vm_ops_on_fd {
    ($t:ty) => {
        impl VmOps for $t {
            fn get_irqchip(&self, chip: &mut kvm_irqchip) -> Result<()> {
                self.fd.get_irqchip(chip)
            }
            fn set_irqchip(&self, chip: &kvm_irqchip) -> Result<()> {
                self.fd.set_irqchip(chip)
            }
            fn get_pit2(&self) -> Result<kvm_pit_state2> {
                self.fd.get_pit2()
            }
            fn set_pit2(&self, pit: &kvm_pit_state2) -> Result<()> {
                self.fd.set_pit2(pit)
            }
            fn get_clock(&self) -> Result<kvm_clock_data> {
                self.fd.get_clock()
            }
            fn set_clock(&self, clock: &kvm_clock_data) -> Result<()> {
                self.fd.set_clock(clock)
            }
        }
    };
}
vm_ops_on_fd!(Vm);
vm_ops_on_fd!(VmHandle);

/// `KVM_EXIT_DIRTY_RING_FULL` (include/uapi/linux/kvm.h; api.rst §8.29): kvm-ioctls 0.25 has
/// no variant for it and returns `VcpuExit::Unsupported(31)`.
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// Translates a kvm-ioctls exit; `internal` reads the suberror and data words of an
/// internal-error exit (kvm-ioctls does not hand them over).
fn vm_exit<'a>(exit: VcpuExit<'a>, internal: impl FnOnce() -> (u32, Vec<u64>)) -> VmExit<'a> {
    match exit {
        VcpuExit::IoIn(port, data) => VmExit::IoIn(port, data),
        VcpuExit::IoOut(port, data) => VmExit::IoOut(port, data),
        VcpuExit::MmioRead(addr, data) => VmExit::MmioRead(addr, data),
        VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite(addr, data),
        VcpuExit::Hlt => VmExit::Hlt,
        VcpuExit::Shutdown => VmExit::Shutdown,
        VcpuExit::SystemEvent(kind, data) => VmExit::SystemEvent(kind, data),
        VcpuExit::InternalError => {
            let (suberror, data) = internal();
            VmExit::InternalError { suberror, data }
        }
        VcpuExit::FailEntry(reason, cpu) => VmExit::FailEntry(reason, cpu),
        VcpuExit::MemoryFault { flags, gpa, size } => VmExit::MemoryFault { flags, gpa, size },
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => VmExit::Interrupted,
        VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => VmExit::DirtyRingFull,
        VcpuExit::X86Wrmsr(w) => VmExit::MsrWrite(MsrWrite::new(w.index, w.data, w.error)),
        VcpuExit::Debug(d) => VmExit::Debug { pc: d.pc },
        other => VmExit::Other(format!("{other:?}")),
    }
}

/// A KVM vCPU. Lives on its own thread once the VM runs (`vcpu::VmControl`).
pub struct Vcpu(VcpuFd);

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Vcpu").field(&self.0.as_raw_fd()).finish()
    }
}

impl AsRawFd for Vcpu {
    /// The vCPU descriptor, for the mappings made on it (the dirty ring).
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Vcpu {
    /// Enters the guest until the next exit. `Err` with EINTR or EAGAIN: the run was
    /// kicked ([`set_immediate_exit`](Self::set_immediate_exit) or a signal).
    pub fn run(&mut self) -> Result<VmExit<'_>> {
        let run: *const kvm_run = self.0.get_kvm_run();
        let exit = self.0.run()?;
        Ok(vm_exit(exit, || {
            // SAFETY: `run` is this vCPU's kvm_run mapping, alive as long as the VcpuFd; the
            // exit reason is KVM_EXIT_INTERNAL_ERROR (vm_exit calls this only then), so
            // `internal` is the live union field.
            let internal = unsafe { (*run).__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            (internal.suberror, internal.data[..n].to_vec())
        }))
    }

    /// Sets or clears `kvm_run.immediate_exit`: while set, [`run`](Self::run) returns EINTR
    /// at once (after completing a pending I/O exit).
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.0.set_kvm_immediate_exit(on.into());
    }

    /// The `kvm_run.immediate_exit` byte, for a signal handler that kicks this vCPU out of the
    /// guest: valid while this `Vcpu` lives.
    pub fn immediate_exit_flag(&mut self) -> *mut u8 {
        let run: *mut kvm_run = self.0.get_kvm_run();
        // SAFETY: `run` is this vCPU's kvm_run mapping; taking a field's address reads nothing.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) }
    }

    /// Completes an I/O or MMIO exit the vCPU has not re-entered for, so that its saved state
    /// is consistent: one run with `immediate_exit` set (it returns EINTR at once after
    /// finishing the instruction). An exit other than EINTR also leaves consistent state.
    pub fn complete_pending_io(&mut self) -> Result<()> {
        self.set_immediate_exit(true);
        let res = self.run().map(|_| ());
        self.set_immediate_exit(false);
        match res {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            other => other,
        }
    }
}

impl From<VcpuFd> for Vcpu {
    fn from(fd: VcpuFd) -> Vcpu {
        Vcpu(fd)
    }
}

impl VcpuOps for Vcpu {
    fn get_regs(&self) -> Result<kvm_regs> {
        self.0.get_regs()
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.0.set_regs(regs)
    }
    fn get_sregs(&self) -> Result<kvm_sregs> {
        self.0.get_sregs()
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.0.set_sregs(sregs)
    }
    fn get_fpu(&self) -> Result<kvm_fpu> {
        self.0.get_fpu()
    }
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.0.set_fpu(fpu)
    }
    fn get_xsave(&self) -> Result<kvm_xsave> {
        self.0.get_xsave()
    }
    unsafe fn set_xsave(&self, xsave: &kvm_xsave) -> Result<()> {
        // SAFETY: the caller keeps the trait method's contract, which is kvm-ioctls'.
        unsafe { self.0.set_xsave(xsave) }
    }
    fn get_xcrs(&self) -> Result<kvm_xcrs> {
        self.0.get_xcrs()
    }
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<()> {
        self.0.set_xcrs(xcrs)
    }
    fn get_msrs(&self, msrs: &mut Msrs) -> Result<usize> {
        self.0.get_msrs(msrs)
    }
    fn set_msrs(&self, msrs: &Msrs) -> Result<usize> {
        self.0.set_msrs(msrs)
    }
    fn get_lapic(&self) -> Result<kvm_lapic_state> {
        self.0.get_lapic()
    }
    fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()> {
        self.0.set_lapic(lapic)
    }
    fn get_cpuid2(&self, max_entries: usize) -> Result<CpuId> {
        self.0.get_cpuid2(max_entries)
    }
    fn set_cpuid2(&self, cpuid: &CpuId) -> Result<()> {
        self.0.set_cpuid2(cpuid)
    }
    fn get_vcpu_events(&self) -> Result<kvm_vcpu_events> {
        self.0.get_vcpu_events()
    }
    fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<()> {
        self.0.set_vcpu_events(events)
    }
    fn get_mp_state(&self) -> Result<kvm_mp_state> {
        self.0.get_mp_state()
    }
    fn set_mp_state(&self, state: kvm_mp_state) -> Result<()> {
        self.0.set_mp_state(state)
    }
    fn get_debug_regs(&self) -> Result<kvm_debugregs> {
        self.0.get_debug_regs()
    }
    fn set_debug_regs(&self, regs: &kvm_debugregs) -> Result<()> {
        self.0.set_debug_regs(regs)
    }
    fn set_guest_debug(&self, debug: &kvm_guest_debug) -> Result<()> {
        self.0.set_guest_debug(debug)
    }
    fn get_tsc_khz(&self) -> Result<u32> {
        self.0.get_tsc_khz()
    }
    fn translate_gva(&self, gva: u64) -> Result<kvm_translation> {
        self.0.translate_gva(gva)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_internal() -> (u32, Vec<u64>) {
        panic!("read only for an internal error")
    }

    #[test]
    fn exits_kvm_ioctls_has_no_name_for_are_named() {
        assert!(matches!(
            vm_exit(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL), no_internal),
            VmExit::DirtyRingFull
        ));
        match vm_exit(
            VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL + 1),
            no_internal,
        ) {
            VmExit::Other(what) => assert!(what.contains("32"), "{what}"),
            e => panic!("{e:?}"),
        }
        match vm_exit(VcpuExit::InternalError, || (1, vec![7, 8])) {
            VmExit::InternalError { suberror, data } => {
                assert_eq!((suberror, data), (1, vec![7, 8]))
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            vm_exit(VcpuExit::Intr, no_internal),
            VmExit::Interrupted
        ));
    }

    #[test]
    fn an_msr_write_exit_answers_through_the_run_page_byte() {
        let mut error = 1u8;
        let exit = VcpuExit::X86Wrmsr(kvm_ioctls::WriteMsrExit {
            error: &mut error,
            reason: kvm_ioctls::MsrExitReason::Filter,
            index: 0xc000_0082,
            data: 0xffff_ffff_8140_0040,
        });
        match vm_exit(exit, no_internal) {
            VmExit::MsrWrite(mut w) => {
                assert_eq!((w.index, w.data), (0xc000_0082, 0xffff_ffff_8140_0040));
                w.accept();
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(error, 0, "accepted: the guest runs on without #GP");
    }
}
