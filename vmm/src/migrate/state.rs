//! Capture and restore of x86-64 vCPU and VM state through KVM (registers, special registers,
//! FPU, XCRs, debug registers, MSRs, LAPIC, MP state, pending events, CPUID; PIC, IOAPIC, PIT,
//! kvmclock) and of the serial UART's registers, as serde structs in postcard's encoding.
//!
//! # Restore order (and why)
//!
//! Per vCPU, [`restore_vcpu`] applies, in this order:
//!
//! 1. **CPUID** — KVM derives which MSRs and XSAVE features exist from it, so it comes before
//!    anything that checks them (MSRs, XCRs).
//! 2. **sregs** — CR0/CR4/EFER and `apic_base`: the mode the registers are interpreted in, and
//!    whether the LAPIC is enabled (its state is ignored while disabled).
//! 3. **regs**, **FPU**, **XCRs** (only when KVM has `KVM_CAP_XCRS`), **debug registers**.
//! 4. **LAPIC** — after sregs enabled it; before MSRs because `IA32_TSC_DEADLINE` is only
//!    accepted while the LAPIC timer is in TSC-deadline mode.
//! 5. **MSRs** — `IA32_TSC` before `IA32_TSC_DEADLINE` (the deadline is relative to it; the list
//!    is ordered so on capture).
//! 6. **vCPU events** — pending exception/interrupt/NMI/SIPI; setting regs or sregs may clear
//!    them, so they come late.
//! 7. **MP state** last — running / halted / waiting for SIPI; KVM_SET_VCPU_EVENTS and
//!    KVM_SET_LAPIC may move it, so the saved one wins.
//!
//! Per VM, [`restore_vm`] sets PIC master, PIC slave, IOAPIC, PIT and then the clock; call it
//! before the vCPUs' restore and before any vCPU runs.
//!
//! Before capturing a vCPU that left KVM_RUN for an I/O or MMIO exit, call
//! [`complete_pending_io`]: KVM finishes the emulated instruction only on the next KVM_RUN
//! (Documentation/virt/kvm/api.rst, `immediate_exit`), so registers read earlier could replay it.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use serde::{Deserialize, Serialize};

use crate::hypervisor::{Vcpu, VcpuOps, Vm, VmOps};

/// Device-state chunk name of the VM-wide KVM state ([`VmState`]).
pub const DEVICE_KVM_VM: &str = "kvm-vm";
/// Device-state chunk name of COM1 ([`SerialRegs`]).
pub const DEVICE_SERIAL: &str = "serial-com1";
/// Device-state chunk name of the i8042 controller ([`crate::devices::i8042::I8042State`]).
pub const DEVICE_I8042: &str = "i8042";
/// Device-state chunk names of the virtio-mmio devices: this and the slot's index
/// ([`crate::virtio::TransportState`]).
pub const DEVICE_VIRTIO_PREFIX: &str = "virtio-mmio-";

// MSR indices, Intel SDM Vol. 4 Table 2-2.
/// IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: must follow IA32_TSC and the LAPIC on restore.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_MCG_CTL: KVM lists it but refuses it unless MCG_CAP.MCG_CTL_P is set.
const MSR_IA32_MCG_CTL: u32 = 0x17b;
// KVM's kvmclock and paravirtual MSRs (0x4b564d00.., Documentation/virt/kvm/x86/msr.rst) are in
// the index list and saved like any other.
/// CPUID leaf 1 ECX bit 26: XSAVE/XRSTOR and XCR0 supported (Intel SDM Vol. 2A Table 3-10).
const CPUID_1_ECX_XSAVE: u32 = 1 << 26;
/// The most MSRs one KVM_GET_MSRS call carries (kvm-bindings' FAM limit).
const MAX_MSRS_PER_CALL: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

/// Errors capturing, encoding or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The call (and vCPU).
        what: String,
        /// errno.
        source: crate::hypervisor::Error,
    },
    /// KVM accepted or returned only part of an MSR list.
    #[error("vCPU {vcpu}: KVM_SET_MSRS accepted {done} of {total} MSRs and refused MSR {msr:#x}: the destination's KVM lacks a feature the source used; migrate between hosts with the same CPU and kernel")]
    MsrRefused {
        /// vCPU id.
        vcpu: u32,
        /// How many were set.
        done: usize,
        /// How many were asked.
        total: usize,
        /// The refused index.
        msr: u32,
    },
    /// The saved state needs a KVM capability this host lacks.
    #[error("vCPU {vcpu}: the saved state has {what} but this host's KVM lacks {cap}: migrate between hosts with the same CPU and kernel")]
    MissingCap {
        /// vCPU id.
        vcpu: u32,
        /// What the state has.
        what: &'static str,
        /// The missing capability.
        cap: &'static str,
    },
    /// A FAM table (CPUID, MSRs) could not be built.
    #[error("cannot build the {what} table: {why}")]
    Table {
        /// Which table.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// Encoding or decoding a blob failed.
    #[error("{what} state blob does not decode ({source}): the stream is corrupted or comes from another vmm build")]
    Decode {
        /// Which blob.
        what: &'static str,
        /// postcard's error.
        source: postcard::Error,
    },
    /// The serial state is impossible.
    #[error("serial state: {0}")]
    Serial(String),
}

fn kvm(what: impl Into<String>) -> impl FnOnce(crate::hypervisor::Error) -> StateError {
    let what = what.into();
    move |source| StateError::Kvm { what, source }
}

/// `kvm_fpu` as a serde struct (kvm-bindings gives it no serde impl).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers ST0-ST7 (80 bits each in 16 bytes).
    pub fpr: [[u8; 16]; 8],
    /// FPU control word.
    pub fcw: u16,
    /// FPU status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> FpuState {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> kvm_fpu {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU id.
    pub id: u32,
    /// CPUID as set on the vCPU (KVM_GET_CPUID2).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state (legacy KVM_GET_FPU layout).
    pub fpu: FpuState,
    /// The XSAVE image (KVM_GET_XSAVE, 4096 bytes as 1024 words) when KVM has
    /// `KVM_CAP_XSAVE`. Restored after the FPU: KVM_SET_FPU drops MXCSR (measured on this
    /// host), the XSAVE image carries it with the x87/SSE state.
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers, when KVM has KVM_CAP_XCRS and the guest's CPUID has XSAVE.
    pub xcrs: Option<kvm_xcrs>,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// MSRs, `IA32_TSC` first and `IA32_TSC_DEADLINE` last.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exception / interrupt / NMI / SIPI and interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
}

impl VcpuState {
    /// The compact binary encoding (postcard).
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        postcard::to_stdvec(self).map_err(|source| StateError::Decode {
            what: "vCPU",
            source,
        })
    }

    /// Decodes [`encode`](Self::encode)'s output.
    pub fn decode(blob: &[u8]) -> Result<VcpuState, StateError> {
        postcard::from_bytes(blob).map_err(|source| StateError::Decode {
            what: "vCPU",
            source,
        })
    }

    /// The saved value of MSR `index`.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

/// What this host's KVM lets us save per vCPU; probe once per VM with [`VcpuCaps::probe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuCaps {
    /// KVM_CAP_XCRS (XSAVE's XCR0); absent on this project's software KVM.
    pub xcrs: bool,
    /// KVM_CAP_XSAVE: the vCPU's XSAVE image can be read and written (KVM_GET/SET_XSAVE).
    pub xsave: bool,
    /// The MSR indices to save, in restore order.
    pub msr_indices: Vec<u32>,
}

impl VcpuCaps {
    /// Reads KVM_GET_MSR_INDEX_LIST and the XCRS capability.
    pub fn probe(vm: &Vm) -> Result<VcpuCaps, StateError> {
        let list = vm.msr_index_list().map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(VcpuCaps {
            xcrs: vm.has_xcrs(),
            xsave: vm.has_xsave(),
            msr_indices: order_msrs(&list),
        })
    }
}

/// The saveable subset of `list` in restore order: `IA32_TSC` first, `IA32_TSC_DEADLINE` last,
/// `IA32_MCG_CTL` dropped (KVM lists it but refuses it without MCG_CTL_P).
pub fn order_msrs(list: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = list
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_MCG_CTL && i != MSR_IA32_TSC && i != MSR_IA32_TSC_DEADLINE)
        .collect();
    if list.contains(&MSR_IA32_TSC) {
        out.insert(0, MSR_IA32_TSC);
    }
    if list.contains(&MSR_IA32_TSC_DEADLINE) {
        out.push(MSR_IA32_TSC_DEADLINE);
    }
    out
}

fn msr_table(entries: &[kvm_msr_entry]) -> Result<Msrs, StateError> {
    Msrs::from_entries(entries).map_err(|e| StateError::Table {
        what: "MSR",
        why: format!("{e:?}"),
    })
}

/// Reads `indices`; an MSR KVM will not read (KVM_GET_MSRS stops at it) is skipped and logged,
/// which is how the index list is filtered down to what this vCPU really has.
fn read_msrs(
    vcpu: &dyn VcpuOps,
    id: u32,
    indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MAX_MSRS_PER_CALL)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_table(&entries)?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm(format!("vCPU {id}: KVM_GET_MSRS")))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < batch.len() {
            log::debug!("vCPU {id}: MSR {:#x} is not readable, not saved", batch[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok(out)
}

/// Completes an I/O or MMIO exit the vCPU has not re-entered for: one KVM_RUN with
/// `immediate_exit` set (it returns EINTR at once after finishing the instruction).
pub fn complete_pending_io(vcpu: &mut Vcpu) -> Result<(), StateError> {
    vcpu.complete_pending_io()
        .map_err(|source| StateError::Kvm {
            what: "KVM_RUN (immediate exit, to complete pending I/O)".into(),
            source,
        })
}

/// Captures vCPU `id`. The vCPU must be out of KVM_RUN (paused) and its last I/O exit
/// completed ([`complete_pending_io`]).
pub fn save_vcpu(vcpu: &dyn VcpuOps, id: u32, caps: &VcpuCaps) -> Result<VcpuState, StateError> {
    let w = |call: &str| format!("vCPU {id}: {call}");
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm(w("KVM_GET_CPUID2")))?;
    // MP state first: KVM_GET_MP_STATE may flush pending LAPIC events into the other state.
    let mp_state = vcpu.get_mp_state().map_err(kvm(w("KVM_GET_MP_STATE")))?;
    let regs = vcpu.get_regs().map_err(kvm(w("KVM_GET_REGS")))?;
    let sregs = vcpu.get_sregs().map_err(kvm(w("KVM_GET_SREGS")))?;
    let fpu = vcpu.get_fpu().map_err(kvm(w("KVM_GET_FPU")))?;
    let xsave = if caps.xsave {
        Some(
            vcpu.get_xsave()
                .map_err(kvm(w("KVM_GET_XSAVE")))?
                .region
                .to_vec(),
        )
    } else {
        None
    };
    // XCR0 means something only when the guest was given XSAVE; without it there is nothing to
    // save (this project's software KVM offers no XSAVE to guests).
    let guest_xsave = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 1 && e.index == 0 && e.ecx & CPUID_1_ECX_XSAVE != 0);
    let xcrs = if caps.xcrs && guest_xsave {
        Some(vcpu.get_xcrs().map_err(kvm(w("KVM_GET_XCRS")))?)
    } else {
        None
    };
    let debugregs = vcpu.get_debug_regs().map_err(kvm(w("KVM_GET_DEBUGREGS")))?;
    let lapic = vcpu.get_lapic().map_err(kvm(w("KVM_GET_LAPIC")))?;
    let msrs = read_msrs(vcpu, id, &caps.msr_indices)?;
    let events = vcpu
        .get_vcpu_events()
        .map_err(kvm(w("KVM_GET_VCPU_EVENTS")))?;
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        regs,
        sregs,
        fpu: FpuState::from(&fpu),
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
        mp_state,
    })
}

/// Restores a vCPU of a fresh VM in the order the module documentation gives.
pub fn restore_vcpu(vcpu: &dyn VcpuOps, st: &VcpuState, caps: &VcpuCaps) -> Result<(), StateError> {
    let id = st.id;
    let w = |call: &str| format!("vCPU {id}: {call}");
    let cpuid = CpuId::from_entries(&st.cpuid).map_err(|e| StateError::Table {
        what: "CPUID",
        why: format!("{e:?}"),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm(w("KVM_SET_CPUID2")))?;
    vcpu.set_sregs(&st.sregs).map_err(kvm(w("KVM_SET_SREGS")))?;
    vcpu.set_regs(&st.regs).map_err(kvm(w("KVM_SET_REGS")))?;
    vcpu.set_fpu(&kvm_fpu::from(&st.fpu))
        .map_err(kvm(w("KVM_SET_FPU")))?;
    if let Some(words) = &st.xsave {
        if !caps.xsave {
            return Err(StateError::MissingCap {
                vcpu: id,
                what: "the XSAVE image",
                cap: "KVM_CAP_XSAVE",
            });
        }
        let mut image = kvm_bindings::kvm_xsave::default();
        if words.len() != image.region.len() {
            return Err(StateError::Table {
                what: "XSAVE image",
                why: format!(
                    "{} words, KVM's image has {}",
                    words.len(),
                    image.region.len()
                ),
            });
        }
        image.region.copy_from_slice(words);
        // KVM reports the effective x87/SSE state (MXCSR included) even where XSTATE_BV calls
        // it initial, but takes MXCSR back only when XSTATE_BV has SSE: mark both present.
        use crate::arch::x86_64::emulate::kvm::{XSAVE_XSTATE_BV_WORD, XSTATE_FP_SSE};
        image.region[XSAVE_XSTATE_BV_WORD] |= XSTATE_FP_SSE;
        // SAFETY: `image` is a whole `kvm_xsave` (4096 bytes), as KVM_GET_XSAVE on the source
        // filled it; KVM reads the guest's uabi XSAVE size, 4096 bytes unless dynamic XSTATE
        // features were enabled for guests, which this VMM never does.
        unsafe { vcpu.set_xsave(&image) }.map_err(kvm(w("KVM_SET_XSAVE")))?;
    }
    if let Some(xcrs) = &st.xcrs {
        if !caps.xcrs {
            return Err(StateError::MissingCap {
                vcpu: id,
                what: "XCRs",
                cap: "KVM_CAP_XCRS",
            });
        }
        vcpu.set_xcrs(xcrs).map_err(kvm(w("KVM_SET_XCRS")))?;
    }
    vcpu.set_debug_regs(&st.debugregs)
        .map_err(kvm(w("KVM_SET_DEBUGREGS")))?;
    vcpu.set_lapic(&st.lapic).map_err(kvm(w("KVM_SET_LAPIC")))?;
    for (b, batch) in st.msrs.chunks(MAX_MSRS_PER_CALL).enumerate() {
        let n = vcpu
            .set_msrs(&msr_table(batch)?)
            .map_err(kvm(w("KVM_SET_MSRS")))?;
        if n < batch.len() {
            return Err(StateError::MsrRefused {
                vcpu: id,
                done: b * MAX_MSRS_PER_CALL + n,
                total: st.msrs.len(),
                msr: batch[n].index,
            });
        }
    }
    vcpu.set_vcpu_events(&st.events)
        .map_err(kvm(w("KVM_SET_VCPU_EVENTS")))?;
    vcpu.set_mp_state(st.mp_state)
        .map_err(kvm(w("KVM_SET_MP_STATE")))?;
    Ok(())
}

/// VM-wide KVM state: the in-kernel PICs, IOAPIC, PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT (KVM_GET_PIT2).
    pub pit: kvm_pit_state2,
    /// kvmclock (KVM_GET_CLOCK).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl VmState {
    /// The compact binary encoding (postcard).
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        postcard::to_stdvec(self).map_err(|source| StateError::Decode { what: "VM", source })
    }

    /// Decodes [`encode`](Self::encode)'s output.
    pub fn decode(blob: &[u8]) -> Result<VmState, StateError> {
        postcard::from_bytes(blob).map_err(|source| StateError::Decode { what: "VM", source })
    }
}

fn get_chip(vm: &dyn VmOps, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm(format!("KVM_GET_IRQCHIP ({what})")))?;
    Ok(chip)
}

/// Captures the VM's irqchip, PIT and clock. The vCPUs should be paused.
pub fn save_vm(vm: &dyn VmOps) -> Result<VmState, StateError> {
    let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    // The flags describe how the value was read (TSC-stable, realtime); KVM_SET_CLOCK takes
    // only the value: with KVM_CLOCK_REALTIME it would add the wall-clock time in between.
    clock.flags = 0;
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "PIC master")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "PIC slave")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Restores VM state into a VM created with its irqchip and PIT, before any vCPU runs.
pub fn restore_vm(vm: &dyn VmOps, st: &VmState) -> Result<(), StateError> {
    vm.set_irqchip(&st.pic_master)
        .map_err(kvm("KVM_SET_IRQCHIP (PIC master)"))?;
    vm.set_irqchip(&st.pic_slave)
        .map_err(kvm("KVM_SET_IRQCHIP (PIC slave)"))?;
    vm.set_irqchip(&st.ioapic)
        .map_err(kvm("KVM_SET_IRQCHIP (IOAPIC)"))?;
    vm.set_pit2(&st.pit).map_err(kvm("KVM_SET_PIT2"))?;
    vm.set_clock(&st.clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

/// The 16550's registers and receive FIFO (vm-superio's `SerialState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<&vm_superio::serial::SerialState> for SerialRegs {
    fn from(s: &vm_superio::serial::SerialState) -> SerialRegs {
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialRegs> for vm_superio::serial::SerialState {
    fn from(s: &SerialRegs) -> vm_superio::serial::SerialState {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialRegs {
    /// The compact binary encoding (postcard).
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        postcard::to_stdvec(self).map_err(|source| StateError::Decode {
            what: "serial",
            source,
        })
    }

    /// Decodes [`encode`](Self::encode)'s output.
    pub fn decode(blob: &[u8]) -> Result<SerialRegs, StateError> {
        postcard::from_bytes(blob).map_err(|source| StateError::Decode {
            what: "serial",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_superio::serial::{NoEvents, Serial};
    use vm_superio::Trigger;

    struct NoIrq;
    impl Trigger for NoIrq {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn msr_order_puts_tsc_first_and_deadline_last() {
        let got = order_msrs(&[
            0x174,
            MSR_IA32_TSC_DEADLINE,
            0xc000_0080,
            MSR_IA32_MCG_CTL,
            0x10,
        ]);
        assert_eq!(got, vec![0x10, 0x174, 0xc000_0080, MSR_IA32_TSC_DEADLINE]);
    }

    #[test]
    fn serial_registers_and_fifo_survive_encoding() {
        let mut uart = Serial::new(NoIrq, std::io::sink());
        uart.write(3, 0x80).unwrap(); // LCR: DLAB on
        uart.write(0, 0x0c).unwrap(); // DLL: 9600 baud
        uart.write(3, 0x03).unwrap(); // LCR: 8N1, DLAB off
        uart.write(7, 0x5a).unwrap(); // scratch
        uart.enqueue_raw_bytes(b"abc").unwrap();
        let regs = SerialRegs::from(&uart.state());
        let back = SerialRegs::decode(&regs.encode().unwrap()).unwrap();
        assert_eq!(back, regs);
        let mut restored = Serial::from_state(
            &vm_superio::serial::SerialState::from(&back),
            NoIrq,
            NoEvents,
            std::io::sink(),
        )
        .unwrap();
        assert_eq!(restored.read(7), 0x5a);
        assert_eq!(restored.read(0), b'a', "FIFO carried over");
        assert_eq!(restored.state().baud_divisor_low, 0x0c);
        assert!(SerialRegs::decode(&[0xff]).is_err());
    }
}
