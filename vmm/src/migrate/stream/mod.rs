//! The migration stream: the wire format ([`format`](mod@format), the place to read it), its header
//! ([`Layout`]), chunks ([`Chunk`]), the writer and the reader, and their errors.
//!
//! The reader keeps one reusable buffer, so reading a chunk allocates nothing after the first
//! large one; [`StreamReader::next_chunk_into`] reads page data straight into the caller's
//! memory instead. The writer checksums page data straight from the caller's slice.

mod chunk;
mod error;
pub mod format;
mod layout;
mod reader;
mod writer;

pub use chunk::{chunk_name, digest_crcs, discard_runs, Chunk};
pub use error::StreamError;
pub use format::{
    AUTH_MAGIC, DEST_DEMAND_PAGING, FRAME_OVERHEAD, LANE_MAGIC, LANE_TOKEN, MAGIC, MAX_CONNECTIONS,
    MAX_DIGEST_PAGES, MAX_DISCARD_RUNS, MAX_PAGES_PER_CHUNK, MAX_PAYLOAD, MAX_SPEC, PAGE_SIZE,
    VERSION,
};
pub use layout::Layout;
pub use reader::{PageSink, Received, StreamReader};
pub use writer::{is_zero, StreamWriter};
