//! Live migration: the peers' proof of a shared secret ([`auth`]), the wire format ([`stream`]), the sockets it travels over ([`transport`]),
//! the vCPU/VM/device state it carries ([`state`]), moving guest RAM through it ([`ram`],
//! [`pager`], [`page_set`]), the two ends ([`source`], [`destination`]), their errors
//! ([`error`]) and the figures ([`summary`]).
//!
//! Dependencies run one way: the ends use everything else, nothing else uses an end, and
//! neither end uses the other.

pub mod auth;
pub mod destination;
pub mod error;
pub mod lanes;
pub mod page_set;
pub mod pager;
mod priority;
pub mod ram;
pub mod source;
pub mod state;
pub mod stream;
pub mod summary;
pub mod transport;

pub use error::MigrateError;
pub use state::{DEVICE_I8042, DEVICE_KVM_VM, DEVICE_SERIAL, DEVICE_VIRTIO_PREFIX};
pub use stream::{Chunk, Layout, StreamError, StreamReader, StreamWriter};
pub use transport::{Address, AddressError, Connection, Listener};
