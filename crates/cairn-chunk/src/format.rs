//! Every on-disk magic number, version and fixed size, in one place.
//!
//! All integers in Cairn's binary formats are little-endian. Sizes of fixed records are
//! asserted at compile time so a change to a layout cannot go unnoticed.

/// First 8 bytes of every container.
pub const CONTAINER_MAGIC: [u8; 8] = *b"CAIRNPK1";
/// Last 8 bytes of every container.
pub const CONTAINER_END_MAGIC: [u8; 8] = *b"CAIRNEND";
/// Version of the container layout written today, stored in the footer: frames of segments.
pub const CONTAINER_VERSION: u32 = 2;
/// The first layout, one segment per blob; still read.
pub const CONTAINER_VERSION_SINGLE: u32 = 1;
/// Version 1 trailer record: digest(32) offset(u64) stored_len(u32) raw_len(u32) kind(u8) codec(u8) pad(2).
pub const CONTAINER_RECORD_LEN: usize = 52;
/// Version 2 frame record: offset(u64) stored_len(u32) raw_len(u32) members(u32) kind(u8) codec(u8) pad(2).
pub const CONTAINER_FRAME_LEN: usize = 24;
/// Version 2 member record, after its frame's record: digest(32) raw_len(u32).
pub const CONTAINER_MEMBER_LEN: usize = 36;
/// Footer: trailer_offset(u64) count(u32) version(u32) trailer_checksum(16) end_magic(8).
/// `count` is records in version 1, frames in version 2.
pub const CONTAINER_FOOTER_LEN: usize = 40;
/// Consecutive new data segments are compressed together up to this many plaintext bytes
/// (measured on the benchmark corpus: see docs/BENCHMARKS.md, "Compression frames").
pub const FRAME_TARGET_LEN: usize = 256 << 10;
/// Containers are sealed once they reach this many bytes of segments.
pub const CONTAINER_TARGET_LEN: usize = 16 << 20;
/// Hard limit on segments in one container, checked when parsing.
pub const CONTAINER_MAX_RECORDS: usize = 1 << 20;

/// First 4 bytes of every recipe tree node.
pub const NODE_MAGIC: [u8; 4] = *b"CRN1";
/// Header: magic(4) level(u8) pad(3) count(u32).
pub const NODE_HEADER_LEN: usize = 12;
/// Leaf record: digest(32) len(u32) kind(u8).
pub const LEAF_RECORD_LEN: usize = 37;
/// Inner record: digest(32) span_bytes(u64) span_entries(u64).
pub const INNER_RECORD_LEN: usize = 48;
/// A node closes after at most this many records.
pub const NODE_MAX_RECORDS: usize = 256;
/// A node closes after a record whose boundary key is divisible by this (content-defined).
pub const NODE_BOUNDARY_DIVISOR: u64 = 32;
/// Deepest tree accepted when reading (2^… entries, far beyond any disk).
pub const NODE_MAX_LEVEL: u8 = 12;

/// First 8 bytes of an index run file.
pub const INDEX_MAGIC: [u8; 8] = *b"CAIRNIX1";
/// Version of the index run layout (runs of other versions are dropped and rebuilt).
/// Version 3 added the checksums: one over the header and everything before the records, one
/// per fence page of records.
pub const INDEX_VERSION: u32 = 3;
/// Index run header: magic(8) version(u32) containers(u32) records(u64) bloom_words(u64)
/// bloom_k(u32) pad(u32) meta_checksum(16). The checksum is BLAKE3 (first 16 bytes) of the
/// header's first 40 bytes, the container table, the bloom words, the fences and the page
/// checksums.
pub const INDEX_HEADER_LEN: usize = 56;
/// Per fence page (INDEX_FENCE_STRIDE records, the last one shorter), after the fences: the
/// first 8 bytes of BLAKE3 of the page's records. Checked on every read of the page.
pub const INDEX_PAGE_SUM_LEN: usize = 8;
/// Index record: digest(32) container(u32, a place in the run's container table) offset(u32)
/// stored_len(u32) frame_len(u32) inner(u32) raw_len(u32) kind(u8) codec(u8) pad(2).
pub const INDEX_RECORD_LEN: usize = 60;
/// Records per fence (one in-memory key per this many records).
pub const INDEX_FENCE_STRIDE: usize = 64;
/// Bloom filter bits per record (about 0.8% false positives with 7 hashes).
pub const INDEX_BLOOM_BITS_PER_RECORD: u64 = 10;
/// Bloom filter hash count.
pub const INDEX_BLOOM_K: u32 = 7;

/// Largest segment the codec accepts (raw or stored), far above any chunker maximum.
pub const SEGMENT_MAX_LEN: usize = 16 << 20;

const _: () = assert!(CONTAINER_RECORD_LEN == 32 + 8 + 4 + 4 + 1 + 1 + 2);
const _: () = assert!(CONTAINER_FRAME_LEN == 8 + 4 + 4 + 4 + 1 + 1 + 2);
const _: () = assert!(CONTAINER_MEMBER_LEN == 32 + 4);
const _: () = assert!(CONTAINER_FOOTER_LEN == 8 + 4 + 4 + 16 + 8);
const _: () = assert!(LEAF_RECORD_LEN == 32 + 4 + 1);
const _: () = assert!(INNER_RECORD_LEN == 32 + 8 + 8);
const _: () = assert!(INDEX_RECORD_LEN == 32 + 4 * 6 + 1 + 1 + 2);
const _: () = assert!(INDEX_HEADER_LEN == 8 + 4 + 4 + 8 + 8 + 4 + 4 + 16);

/// Kind of a blob stored in a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum BlobKind {
    /// A segment of disk data.
    Data = 0,
    /// A recipe tree node.
    Tree = 1,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Data),
            1 => Some(Self::Tree),
            _ => None,
        }
    }
}
