//! The segment codec: how a segment's plaintext becomes the bytes stored in a container.
//!
//! A segment is compressed with zstd only when that saves at least 1/32 of its size; otherwise
//! it is stored raw. Decoding always re-hashes the plaintext and compares it with the expected
//! fingerprint, so damaged bytes are reported, never returned.

use cairn_types::Digest;

use crate::fingerprint::fingerprint;
use crate::format::SEGMENT_MAX_LEN;

/// How a stored segment is encoded. Stored as one byte in container and index records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Raw),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A segment as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedSegment {
    pub codec: Codec,
    pub bytes: Vec<u8>,
}

/// A stored segment could not be turned back into its plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("segment {digest:?}: stored length {len} exceeds the limit")]
    TooLarge { digest: Digest, len: usize },
    #[error("segment {digest:?}: zstd: {reason}")]
    Decompress { digest: Digest, reason: String },
    #[error("segment {digest:?}: decoded length {got} differs from the recorded {want}")]
    Length {
        digest: Digest,
        got: usize,
        want: usize,
    },
    #[error("segment {digest:?}: content hashes to {got:?}")]
    Mismatch { digest: Digest, got: Digest },
}

/// Reusable compression state (one per thread).
pub struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
    level: i32,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("level", &self.level)
            .finish()
    }
}

impl Encoder {
    /// `level` 0 disables compression.
    pub fn new(level: i32) -> Self {
        let zstd = zstd::bulk::Compressor::new(level.max(1)).expect("zstd compressor");
        Self { zstd, level }
    }

    /// The zstd level (0 = off).
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Encodes `data`, compressing only when it pays.
    pub fn encode(&mut self, data: &[u8]) -> EncodedSegment {
        if self.level > 0 && data.len() >= 64 {
            let cap = zstd::zstd_safe::compress_bound(data.len());
            let mut out = Vec::with_capacity(cap);
            if self.zstd.compress_to_buffer(data, &mut out).is_ok()
                && out.len() + data.len() / 32 < data.len()
            {
                return EncodedSegment {
                    codec: Codec::Zstd,
                    bytes: out,
                };
            }
        }
        EncodedSegment {
            codec: Codec::Raw,
            bytes: data.to_vec(),
        }
    }
}

thread_local! {
    /// One zstd decompression context per thread: creating one costs more than decoding a
    /// small segment.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decodes a stored segment and checks it against `digest` and `raw_len`.
pub fn decode(
    codec: Codec,
    stored: &[u8],
    raw_len: usize,
    digest: &Digest,
) -> Result<Vec<u8>, CodecError> {
    if stored.len() > SEGMENT_MAX_LEN || raw_len > SEGMENT_MAX_LEN {
        return Err(CodecError::TooLarge {
            digest: *digest,
            len: stored.len().max(raw_len),
        });
    }
    let plain = match codec {
        Codec::Raw => stored.to_vec(),
        Codec::Zstd => {
            let mut out = Vec::with_capacity(raw_len);
            DECOMPRESSOR
                .with(|d| {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = Some(zstd::bulk::Decompressor::new()?);
                    }
                    d.as_mut()
                        .expect("just set")
                        .decompress_to_buffer(stored, &mut out)
                })
                .map_err(|e| CodecError::Decompress {
                    digest: *digest,
                    reason: e.to_string(),
                })?;
            out
        }
    };
    if plain.len() != raw_len {
        return Err(CodecError::Length {
            digest: *digest,
            got: plain.len(),
            want: raw_len,
        });
    }
    let got = fingerprint(&plain);
    if got != *digest {
        return Err(CodecError::Mismatch {
            digest: *digest,
            got,
        });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_data_is_compressed_and_round_trips() {
        let data = b"hello world ".repeat(1000);
        let d = fingerprint(&data);
        let e = Encoder::new(1).encode(&data);
        assert_eq!(e.codec, Codec::Zstd);
        assert!(e.bytes.len() < data.len() / 10);
        assert_eq!(decode(e.codec, &e.bytes, data.len(), &d).unwrap(), data);
    }

    #[test]
    fn damage_is_detected() {
        let data = b"hello world ".repeat(1000);
        let d = fingerprint(&data);
        let mut e = Encoder::new(1).encode(&data);
        let n = e.bytes.len();
        e.bytes[n / 2] ^= 1;
        assert!(decode(e.codec, &e.bytes, data.len(), &d).is_err());
        let raw = Encoder::new(0).encode(&data);
        let mut bad = raw.bytes.clone();
        bad[5] ^= 0x40;
        assert!(matches!(
            decode(Codec::Raw, &bad, data.len(), &d),
            Err(CodecError::Mismatch { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_of_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000), len in 0usize..5000) {
            let _ = decode(Codec::Zstd, &bytes, len, &Digest::default());
            let _ = decode(Codec::Raw, &bytes, len, &Digest::default());
        }

        #[test]
        fn encode_decode_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..5000), level in 0i32..4) {
            let d = fingerprint(&bytes);
            let e = Encoder::new(level).encode(&bytes);
            prop_assert_eq!(decode(e.codec, &e.bytes, bytes.len(), &d).unwrap(), bytes);
        }
    }
}
