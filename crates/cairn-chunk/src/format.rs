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

/// Version of a repository's `config` without encryption.
pub const REPO_VERSION: u32 = 1;
/// Version of an encrypted repository's `config`: older Cairn refuses to open it rather than
/// failing on sealed frames.
pub const REPO_VERSION_ENCRYPTED: u32 = 2;

/// A sealed frame (codecs 2 and 3) starts with this clear header:
/// checksum(16) level(u8) pad(3) refs(u32). `checksum` is BLAKE3 (first 16 bytes) of every
/// byte after it, so a vault without the key checks the stored ciphertext.
pub const SEALED_HEADER_LEN: usize = 24;
/// Bytes of the keyless checksum at the start of a sealed frame.
pub const SEALED_CHECKSUM_LEN: usize = 16;
/// After the header: `refs` digests in the clear (a tree node's children; none for data),
/// then the XChaCha20-Poly1305 nonce, the ciphertext and its tag.
pub const SEALED_NONCE_LEN: usize = 24;
/// Poly1305 tag at the end of a sealed frame.
pub const SEALED_TAG_LEN: usize = 16;
/// Most clear references a sealed frame may carry (a tree node's records).
pub const SEALED_MAX_REFS: usize = NODE_MAX_RECORDS;

/// BLAKE3 `derive_key` contexts: every key used is derived from the 32-byte master key with
/// one of these, so no two uses share a key.
pub const KDF_CONTEXT_FINGERPRINT: &str = "cairn 2026-12-01 segment fingerprint key";
/// Key of the AEAD that seals frames.
pub const KDF_CONTEXT_FRAME: &str = "cairn 2026-12-01 frame sealing key";
/// Key of the AEAD that seals the private fields of snapshot manifests.
pub const KDF_CONTEXT_METADATA: &str = "cairn 2026-12-01 metadata sealing key";
/// Keyed hash of a snapshot's name: lets a vault without the key group a disk's history.
pub const KDF_CONTEXT_NAME_TAG: &str = "cairn 2026-12-01 snapshot name tag";
/// The value recorded in the config to recognise the right master key.
pub const KDF_CONTEXT_KEY_CHECK: &str = "cairn 2026-12-01 master key check";
/// Turns the secret of a key file into the key that wraps the master key.
pub const KDF_CONTEXT_KEY_FILE: &str = "cairn 2026-12-01 key file wrapping key";

/// Argon2id defaults for a passphrase (recorded with every wrapped key, so they may change).
pub const ARGON2_MEMORY_KIB: u32 = 64 * 1024;
/// Argon2id passes.
pub const ARGON2_PASSES: u32 = 3;
/// Argon2id lanes.
pub const ARGON2_LANES: u32 = 1;
/// Bounds a wrapped key's recorded Argon2 memory may take (a hostile key object must not
/// make an open allocate without limit).
pub const ARGON2_MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
/// Salt of a passphrase's Argon2id.
pub const ARGON2_SALT_LEN: usize = 16;
/// Hex digits of a paper recovery key: 64 for the key, 4 of checksum, in groups of 4.
pub const PAPER_KEY_DIGITS: usize = 68;

const _: () = assert!(CONTAINER_RECORD_LEN == 32 + 8 + 4 + 4 + 1 + 1 + 2);
const _: () = assert!(CONTAINER_FRAME_LEN == 8 + 4 + 4 + 4 + 1 + 1 + 2);
const _: () = assert!(CONTAINER_MEMBER_LEN == 32 + 4);
const _: () = assert!(CONTAINER_FOOTER_LEN == 8 + 4 + 4 + 16 + 8);
const _: () = assert!(LEAF_RECORD_LEN == 32 + 4 + 1);
const _: () = assert!(INNER_RECORD_LEN == 32 + 8 + 8);
const _: () = assert!(INDEX_RECORD_LEN == 32 + 4 * 6 + 1 + 1 + 2);
const _: () = assert!(SEALED_HEADER_LEN == SEALED_CHECKSUM_LEN + 1 + 3 + 4);
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
