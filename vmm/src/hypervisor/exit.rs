//! What a vCPU's run returned, in the VMM's terms: [`VmExit`] borrows the data of the exit
//! (the bytes of a port or MMIO access, an MSR write) from the vCPU's shared run page, so the
//! exit handler answers a read in place, as with KVM.

/// Why the guest stopped running on this vCPU.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// An `in` from `port`: fill the bytes.
    IoIn(u16, &'a mut [u8]),
    /// An `out` to `port` of these bytes.
    IoOut(u16, &'a [u8]),
    /// A read of guest-physical address with no RAM behind it: fill the bytes.
    MmioRead(u64, &'a mut [u8]),
    /// A write to a guest-physical address with no RAM behind it.
    MmioWrite(u64, &'a [u8]),
    /// `hlt` (only without an in-kernel irqchip).
    Hlt,
    /// A triple fault.
    Shutdown,
    /// A system event (`KVM_SYSTEM_EVENT_*`: shutdown, reset, crash) and its data.
    SystemEvent(u32, &'a [u64]),
    /// The hypervisor could not go on with this vCPU: `suberror` (`KVM_INTERNAL_ERROR_*`) and
    /// its data words (for an emulation failure: the instruction bytes when the hypervisor
    /// reports them).
    InternalError {
        /// `KVM_INTERNAL_ERROR_*`.
        suberror: u32,
        /// The data words the hypervisor gave (at most 16).
        data: Vec<u64>,
    },
    /// Hardware refused to enter the guest: reason, host CPU.
    FailEntry(u64, u32),
    /// A guest access to memory the hypervisor could not resolve (`KVM_EXIT_MEMORY_FAULT`).
    MemoryFault {
        /// `KVM_MEMORY_EXIT_FLAG_*`.
        flags: u64,
        /// Guest-physical address.
        gpa: u64,
        /// Size of the access.
        size: u64,
    },
    /// The run was interrupted (a signal, an interrupt window): run again.
    Interrupted,
    /// This vCPU's dirty ring is full (`KVM_EXIT_DIRTY_RING_FULL`).
    DirtyRingFull,
    /// The guest wrote an MSR filtered to userspace.
    MsrWrite(MsrWrite<'a>),
    /// A breakpoint or single step requested with `set_guest_debug` fired at `pc`.
    Debug {
        /// Where.
        pc: u64,
    },
    /// Any other exit, by name or number.
    Other(String),
}

/// A guest's write to an MSR filtered to userspace: the VMM carries it out (or refuses it).
#[derive(Debug)]
pub struct MsrWrite<'a> {
    /// The MSR.
    pub index: u32,
    /// The value the guest wrote.
    pub data: u64,
    /// Set to refuse the write (the guest gets #GP when it runs again).
    pub(crate) error: &'a mut u8,
}

impl<'a> MsrWrite<'a> {
    /// A write exit for `index`/`data` answered through `error` (for tests of exit handling).
    pub fn new(index: u32, data: u64, error: &'a mut u8) -> MsrWrite<'a> {
        MsrWrite { index, data, error }
    }

    /// Accepts the write: the VMM has carried it out, the guest runs on.
    pub fn accept(&mut self) {
        *self.error = 0;
    }

    /// Refuses the write: the guest gets #GP.
    pub fn refuse(&mut self) {
        *self.error = 1;
    }
}
