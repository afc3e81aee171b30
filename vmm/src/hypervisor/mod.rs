//! The seam between the VMM and the hypervisor: the vCPU and VM calls the VMM makes, as two
//! small traits ([`VcpuOps`], [`VmOps`]), and what a vCPU's run returns ([`VmExit`]), so that
//! `kvm_ioctls` types stay inside [`kvm`] and the rest of the VMM (and its tests) can be driven
//! by another implementation.
//!
//! The state the traits move is KVM's own ABI (`kvm_bindings` structs: `kvm_regs`,
//! `kvm_lapic_state`, ...), as in Firecracker: those are plain data, and the migration stream
//! carries them as they are. What stays behind the seam is the file descriptors, the ioctls
//! and the `kvm_run` page.

pub mod exit;
pub mod kvm;

pub use exit::{MsrWrite, VmExit};
pub use kvm::{
    max_vcpus, software_kvm, Vcpu, Vm, VmError, VmHandle, KVM_IDENTITY_MAP_ADDRESS, KVM_PATH,
    KVM_TSS_ADDRESS,
};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_guest_debug, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_translation, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs,
};

/// A failed hypervisor call: the errno it returned.
pub type Error = vmm_sys_util::errno::Error;
/// The result of a hypervisor call.
pub type Result<T> = std::result::Result<T, Error>;

/// The state of one vCPU: registers, MSRs, LAPIC, FPU/XSAVE, pending events, run state. Called
/// on the vCPU's own thread (KVM serialises a vCPU's calls with its `KVM_RUN`). Object-safe, so
/// code that only reads or writes state takes `&dyn VcpuOps`.
pub trait VcpuOps {
    /// General-purpose registers, RIP and RFLAGS.
    fn get_regs(&self) -> Result<kvm_regs>;
    /// Sets them.
    fn set_regs(&self, regs: &kvm_regs) -> Result<()>;
    /// Segment and control registers, EFER, the descriptor tables.
    fn get_sregs(&self) -> Result<kvm_sregs>;
    /// Sets them.
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()>;
    /// x87/SSE state in the legacy layout.
    fn get_fpu(&self) -> Result<kvm_fpu>;
    /// Sets it.
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()>;
    /// The XSAVE image (4 KiB).
    fn get_xsave(&self) -> Result<kvm_xsave>;
    /// Sets the XSAVE image.
    ///
    /// # Safety
    ///
    /// `xsave` must hold no state component that does not fit its 4 KiB (KVM reads as many
    /// bytes as the components enabled in its header need): an image read with
    /// [`get_xsave`](Self::get_xsave) on a host with the same features is fine.
    unsafe fn set_xsave(&self, xsave: &kvm_xsave) -> Result<()>;
    /// Extended control registers (XCR0).
    fn get_xcrs(&self) -> Result<kvm_xcrs>;
    /// Sets them.
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<()>;
    /// Reads the MSRs whose indices `msrs` holds; returns how many were read.
    fn get_msrs(&self, msrs: &mut Msrs) -> Result<usize>;
    /// Writes `msrs`; returns how many were written (KVM stops at the first it refuses).
    fn set_msrs(&self, msrs: &Msrs) -> Result<usize>;
    /// The local APIC's register page.
    fn get_lapic(&self) -> Result<kvm_lapic_state>;
    /// Sets it.
    fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()>;
    /// The CPUID the guest sees (at most `max_entries` entries).
    fn get_cpuid2(&self, max_entries: usize) -> Result<CpuId>;
    /// Sets the CPUID the guest sees.
    fn set_cpuid2(&self, cpuid: &CpuId) -> Result<()>;
    /// Pending and injected exceptions, interrupts, NMI, SMI; interrupt shadow.
    fn get_vcpu_events(&self) -> Result<kvm_vcpu_events>;
    /// Sets them.
    fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<()>;
    /// Run state: runnable, halted, waiting for INIT/SIPI (`KVM_MP_STATE_*`).
    fn get_mp_state(&self) -> Result<kvm_mp_state>;
    /// Sets it.
    fn set_mp_state(&self, state: kvm_mp_state) -> Result<()>;
    /// DR0-DR3, DR6, DR7.
    fn get_debug_regs(&self) -> Result<kvm_debugregs>;
    /// Sets them.
    fn set_debug_regs(&self, regs: &kvm_debugregs) -> Result<()>;
    /// Single-step and hardware breakpoints reported to the VMM (`KVM_EXIT_DEBUG`).
    fn set_guest_debug(&self, debug: &kvm_guest_debug) -> Result<()>;
    /// The guest TSC frequency in kHz.
    fn get_tsc_khz(&self) -> Result<u32>;
    /// Translates a guest-virtual address through the vCPU's current page tables.
    fn translate_gva(&self, gva: u64) -> Result<kvm_translation>;
}

/// VM-wide state: the in-kernel interrupt controllers, the PIT, the guest clock.
/// Any thread may call these.
pub trait VmOps {
    /// Reads the PIC or IOAPIC `chip.chip_id` names.
    fn get_irqchip(&self, chip: &mut kvm_irqchip) -> Result<()>;
    /// Sets it.
    fn set_irqchip(&self, chip: &kvm_irqchip) -> Result<()>;
    /// The PIT's channels.
    fn get_pit2(&self) -> Result<kvm_pit_state2>;
    /// Sets them.
    fn set_pit2(&self, pit: &kvm_pit_state2) -> Result<()>;
    /// kvmclock's view of guest time.
    fn get_clock(&self) -> Result<kvm_clock_data>;
    /// Sets it.
    fn set_clock(&self, clock: &kvm_clock_data) -> Result<()>;
}
