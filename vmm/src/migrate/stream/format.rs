//! The migration wire format on one screen: framing, chunk kinds and their payloads, limits.
//!
//! ```text
//! stream := MAGIC (8 bytes) VERSION (u32 LE) header-chunk chunk* end-chunk
//! lane   := LANE_MAGIC (8 bytes) VERSION (u32 LE) lane-chunk (page | zero-page | lane-end)* end-chunk
//! chunk  := kind (u32 LE) len (u32 LE) payload (len bytes) crc (u32 LE)
//!           crc = CRC-32 (IEEE, crc32fast) over kind, len and payload
//! ```
//!
//! Payloads (all integers little-endian):
//!
//! | kind | payload |
//! |------|---------|
//! | `HEADER` | page_size u32, vcpus u32, nr_regions u32, then (gpa u64, len u64) per region, then spec_len u32 and the machine spec (JSON: memory, vCPUs, backing, payload; empty when none), then connections u32 (1 to [`MAX_CONNECTIONS`]) and the lane token (16 bytes) |
//! | `PAGES` | gpa u64, then a whole number of pages (at most [`MAX_PAGES_PER_CHUNK`]) |
//! | `ZERO_PAGES` | gpa u64, count u64: `count` pages of zeros, no data |
//! | `VCPU` | vcpu id u32, then the state blob |
//! | `DEVICE` | name length u8, name (UTF-8), then the state blob |
//! | `ROUND` | round u32, dirty pages u64 |
//! | `END` | empty |
//! | `GUEST_RUNNING` | empty (destination to source) |
//! | `PAGE_REQUEST` | gpa u64, count u32 (destination to source, postcopy: send these first) |
//! | `DEST_INFO` | host page size u64, flags u32 (destination to source, right after accept) |
//! | `DISCARD` | (gpa u64, count u32) runs: pages whose copy here is stale (postcopy switch) |
//! | `POSTCOPY` | empty: the guest may run; the discarded pages follow, then `END` |
//! | `ALL_RECEIVED` | empty (destination to source: every postcopy page is in place) |
//! | `ROUND_APPLIED` | round u32 (destination to source: that round is in guest RAM here; the source waits for it before it times the round and harvests again) |
//! | `LANE` | the header's lane token (16 bytes), lane index u32 (1 to connections - 1): the first chunk of a lane |
//! | `LANE_END` | round u32: this lane has sent its share of that round |
//! | `DIGEST` | gpa u64, then one CRC-32 (u32) per 4 KiB page from there (`--migrate-verify`: the source's RAM at the pause, sent with the state) |
//!
//! A migration with `connections` > 1 (`--migrate-connections`) opens that many - 1 more
//! connections, the lanes, after the header. In each precopy round every connection carries
//! the pages of one address range (the main connection too, before its `ROUND`); a lane
//! ends its share with `LANE_END`, and the destination acknowledges the round once the main
//! connection's `ROUND` and every lane's `LANE_END` of it have come. Lanes end with `END`
//! before the main connection's postcopy switch or last `ROUND`; the state, the discard and
//! postcopy phases use the main connection only.
//!
//! [`super::Layout`] encodes the header, [`super::Chunk`] is a parsed chunk, and
//! [`super::StreamWriter`] / [`super::StreamReader`] put them on and take them off the wire.

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"VMMMIGR\0";
/// First bytes of a lane (a migration's further connection, see above).
pub const LANE_MAGIC: [u8; 8] = *b"VMMLANE\0";
/// Most connections one migration may use.
pub const MAX_CONNECTIONS: u32 = 16;
/// Bytes of the lane token the header carries and each lane repeats.
pub const LANE_TOKEN: usize = 16;
/// What a source that authenticates (`--migrate-secret`, see `migrate::auth`) sends instead of
/// [`MAGIC`] first.
pub const AUTH_MAGIC: [u8; 8] = *b"VMMAUTH\0";
/// The format version this code writes and reads (2: postcopy chunks; 3: the destination
/// acknowledges each precopy round once it has applied it; 4: the header carries the machine
/// spec, so a destination needs nothing but its address; 5: a vCPU's state carries its XSAVE
/// image, which has MXCSR; 6: several connections, the header says how many).
pub const VERSION: u32 = 6;
/// The page size of `PAGES` and `ZERO_PAGES` chunks.
pub const PAGE_SIZE: usize = 4096;
/// Most pages carried by one `PAGES` chunk (1 MiB of data).
pub const MAX_PAGES_PER_CHUNK: usize = 256;
/// Largest payload a reader accepts: a full `PAGES` chunk plus its address.
pub const MAX_PAYLOAD: usize = MAX_PAGES_PER_CHUNK * PAGE_SIZE + 8;
/// Bytes of a chunk frame around the payload (kind, len, crc).
pub const FRAME_OVERHEAD: usize = 12;
/// Most RAM regions a header may list (a corrupted count is refused before allocating).
pub(super) const MAX_REGIONS: usize = 64;
/// Longest machine spec a header may carry.
pub const MAX_SPEC: usize = 64 << 10;

/// Chunk kinds on the wire.
pub(super) mod kind {
    pub const HEADER: u32 = 1;
    pub const PAGES: u32 = 2;
    pub const ZERO_PAGES: u32 = 3;
    pub const VCPU: u32 = 4;
    pub const DEVICE: u32 = 5;
    pub const ROUND: u32 = 6;
    pub const END: u32 = 7;
    pub const GUEST_RUNNING: u32 = 8;
    pub const PAGE_REQUEST: u32 = 9;
    pub const DEST_INFO: u32 = 10;
    pub const DISCARD: u32 = 11;
    pub const POSTCOPY: u32 = 12;
    pub const ALL_RECEIVED: u32 = 13;
    pub const ROUND_APPLIED: u32 = 14;
    pub const LANE: u32 = 15;
    pub const LANE_END: u32 = 16;
    pub const DIGEST: u32 = 17;
    /// The highest kind a reader accepts.
    pub const LAST: u32 = DIGEST;
}

/// `DEST_INFO` flag: the destination runs with demand paging (it can receive postcopy).
pub const DEST_DEMAND_PAGING: u32 = 1 << 0;
/// Bytes of one `DISCARD` run on the wire (gpa u64, count u32).
pub(super) const DISCARD_RUN_BYTES: usize = 12;
/// Most page CRCs one `DIGEST` chunk carries.
pub const MAX_DIGEST_PAGES: usize = (MAX_PAYLOAD - 8) / 4;
/// Most runs one `DISCARD` chunk carries.
pub const MAX_DISCARD_RUNS: usize = (MAX_PAYLOAD - 8) / DISCARD_RUN_BYTES;

/// The wire name of chunk kind `k`.
pub(super) fn kind_name(k: u32) -> &'static str {
    match k {
        kind::HEADER => "header",
        kind::PAGES => "pages",
        kind::ZERO_PAGES => "zero-pages",
        kind::VCPU => "vcpu-state",
        kind::DEVICE => "device-state",
        kind::ROUND => "round",
        kind::END => "end",
        kind::GUEST_RUNNING => "guest-running",
        kind::PAGE_REQUEST => "page-request",
        kind::DEST_INFO => "destination-info",
        kind::DISCARD => "discard",
        kind::POSTCOPY => "postcopy",
        kind::ALL_RECEIVED => "all-received",
        kind::ROUND_APPLIED => "round-applied",
        kind::LANE => "lane",
        kind::LANE_END => "lane-end",
        kind::DIGEST => "digest",
        _ => "unknown",
    }
}
