//! Pure data code shared by the storage agent and the vault.
//!
//! | module | what |
//! |---|---|
//! | [`format`](mod@format) | every magic number, version and fixed size of Cairn's on-disk formats |
//! | [`chunker`] | content-defined (FastCDC 2020) and fixed-size segmentation |
//! | [`fingerprint`](mod@fingerprint) | BLAKE3 fingerprints and zero detection |
//! | [`codec`] | the segment codec: per-segment zstd when it pays, verified decode |
//! | [`recipe`] | recipe entries and the content-defined tree over them |
//! | [`container`] | the self-describing container (pack file) format |
//! | [`crypto`] | an encrypted repository's keys, keyed fingerprints, sealed frames |
//! | [`wrap`] | wrapping the master key by passphrases, key files, paper recovery keys |
//!
//! Nothing here does I/O; every parser of untrusted bytes has hard limits and returns
//! [`FormatError`] instead of panicking.

#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod chunker;
pub mod codec;
pub mod container;
pub mod crypto;
pub mod fingerprint;
pub mod format;
pub mod recipe;
pub mod wrap;

pub use chunker::{Chunker, ChunkerParams};
pub use codec::{Codec, CodecError, EncodedSegment, Encoder, FrameCache, Member};
pub use crypto::Keys;
pub use fingerprint::{fingerprint, fingerprint_with, is_zero};
pub use recipe::{Entry, EntryKind};

/// Bytes that do not follow one of Cairn's formats.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what}: {reason}")]
pub struct FormatError {
    /// Which format (e.g. "container footer", "tree node").
    pub what: &'static str,
    pub reason: String,
}

impl FormatError {
    pub(crate) fn new(what: &'static str, reason: impl Into<String>) -> Self {
        Self {
            what,
            reason: reason.into(),
        }
    }
}
