//! Live migration: the wire format ([`stream`]), the sockets it travels over ([`transport`]),
//! the vCPU/VM/device state it carries ([`state`]), moving guest RAM through it ([`ram`],
//! [`pager`]), the two ends ([`precopy`], [`postcopy`]) and the figures ([`summary`]).

pub mod pager;
pub mod postcopy;
pub mod precopy;
pub mod ram;
pub mod state;
pub mod stream;
pub mod summary;
pub mod transport;

pub use stream::{Chunk, Layout, StreamError, StreamReader, StreamWriter};
pub use transport::{Address, AddressError, Connection, Listener};

/// Device-state chunk name of the VM-wide KVM state ([`state::VmState`]).
pub const DEVICE_KVM_VM: &str = "kvm-vm";
/// Device-state chunk name of COM1 ([`state::SerialRegs`]).
pub const DEVICE_SERIAL: &str = "serial-com1";
/// Device-state chunk name of the i8042 controller ([`crate::devices::i8042::I8042State`]).
pub const DEVICE_I8042: &str = "i8042";
