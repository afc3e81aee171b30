//! Errors of reading or writing a migration stream, each naming where in the stream and what to do.

use std::io;

use super::format::VERSION;

/// Errors reading or writing a migration stream. Offsets are byte offsets from the start of
/// the stream; chunk numbers count from 0 (the header chunk).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The transport failed.
    #[error("migration stream I/O error at offset {offset}: {source}")]
    Io {
        /// Where.
        offset: u64,
        /// The error.
        source: io::Error,
    },
    /// The stream ended in the middle of something.
    #[error("migration stream truncated at offset {offset} inside chunk {chunk} ({what}): the source stopped or the connection dropped; the source VM keeps running, retry the migration")]
    Truncated {
        /// Where the data ran out.
        offset: u64,
        /// Chunk number.
        chunk: u64,
        /// Which part was missing.
        what: &'static str,
    },
    /// Not a migration stream.
    #[error("not a vmm migration stream (magic {found:02x?}): check that --incoming and the source's --to name the same address")]
    BadMagic {
        /// The first bytes read.
        found: [u8; 8],
    },
    /// The source opened with an authentication this destination was not told to expect.
    #[error("the migration source authenticates with a shared secret (--migrate-secret): start this destination with the same --migrate-secret FILE")]
    AuthWanted,
    /// Another format version.
    #[error("migration stream version {found}, this vmm reads version {VERSION}: run the same vmm build on both sides")]
    Version {
        /// The stream's version.
        found: u32,
    },
    /// A chunk's checksum does not match its bytes.
    #[error("migration stream corrupted: checksum mismatch in chunk {chunk} ({kind}) at offset {offset} (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Chunk number.
        chunk: u64,
        /// Chunk kind name.
        kind: &'static str,
        /// Offset of the chunk frame.
        offset: u64,
        /// CRC on the wire.
        stored: u32,
        /// CRC of the bytes received.
        computed: u32,
    },
    /// A chunk frame is impossible (unknown kind, oversized length, bad payload shape).
    #[error("migration stream corrupted: chunk {chunk} at offset {offset}: {what}")]
    Malformed {
        /// Chunk number.
        chunk: u64,
        /// Offset of the chunk frame.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A chunk arrived where another was required.
    #[error("migration stream out of order: chunk {chunk} at offset {offset} is {found}, expected {expected}")]
    Unexpected {
        /// Chunk number.
        chunk: u64,
        /// Offset of the chunk frame.
        offset: u64,
        /// What came.
        found: &'static str,
        /// What was required.
        expected: &'static str,
    },
    /// Source and destination disagree on the vCPU count.
    #[error("source has {source_vcpus} vCPUs, this VM has {here}: start the destination with --cpus {source_vcpus}")]
    VcpuMismatch {
        /// Source's count.
        source_vcpus: u32,
        /// Ours.
        here: u32,
    },
    /// Source and destination disagree on guest RAM.
    #[error("source guest RAM is {source_ram} ({source_regions}), this VM has {here_ram} ({here_regions}): start the destination with --mem {source_ram}")]
    RamMismatch {
        /// Source's total, human readable.
        source_ram: String,
        /// Source's regions.
        source_regions: String,
        /// Our total.
        here_ram: String,
        /// Our regions.
        here_regions: String,
    },
    /// Source and destination disagree on the page size.
    #[error("source streams {source_page}-byte pages, this vmm uses {here}: run the same vmm build on both sides")]
    PageSizeMismatch {
        /// Source's page size.
        source_page: u32,
        /// Ours.
        here: u32,
    },
    /// A writer call with impossible arguments (a bug in the caller).
    #[error("invalid migration chunk: {0}")]
    InvalidArgument(String),
}
