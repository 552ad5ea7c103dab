//! The segment codec: how a segment's plaintext becomes the bytes stored in a container.
//!
//! A segment is compressed with zstd only when that saves at least 1/32 of its size; otherwise
//! it is stored raw. Decoding always re-hashes the plaintext and compares it with the expected
//! fingerprint, so damaged bytes are reported, never returned.
//!
//! A stored blob is a **frame**: the encoding of one segment or of several consecutive ones
//! (compressing neighbours together saves space and time). A segment is found in its frame by
//! its place (`inner`) and length, and each segment's own bytes are fingerprinted on read:
//! damage to a frame fails the members whose bytes it changed (all of them when the frame no
//! longer decodes), never returns wrong bytes.

use std::sync::Arc;

use cairn_types::Digest;

use crate::crypto::Keys;
use crate::fingerprint::fingerprint_with;
use crate::format::SEGMENT_MAX_LEN;

/// How a stored segment is encoded. Stored as one byte in container and index records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
    /// Raw, then sealed (see [`crate::crypto`]).
    SealedRaw = 2,
    /// zstd, then sealed.
    SealedZstd = 3,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Raw),
            1 => Some(Self::Zstd),
            2 => Some(Self::SealedRaw),
            3 => Some(Self::SealedZstd),
            _ => None,
        }
    }

    /// Is the frame encrypted?
    pub fn is_sealed(self) -> bool {
        matches!(self, Self::SealedRaw | Self::SealedZstd)
    }

    /// Is the frame (inside its seal) compressed?
    pub fn is_compressed(self) -> bool {
        matches!(self, Self::Zstd | Self::SealedZstd)
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
    #[error("segment {digest:?} is sealed: the repository's key is needed to read it")]
    NoKey { digest: Digest },
    #[error("segment {digest:?}: sealed frame: {source}")]
    Open {
        digest: Digest,
        #[source]
        source: crate::crypto::CryptoError,
    },
    #[error("segment {digest:?}: {len} bytes at {inner} lie outside its {frame_len}-byte frame")]
    Outside {
        digest: Digest,
        inner: u32,
        len: u32,
        frame_len: u32,
    },
}

/// Where a segment lies in its frame: the frame's plaintext length, the segment's place in
/// that plaintext and its length. A frame of one segment has `inner == 0` and
/// `raw_len == frame_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Member {
    pub frame_len: u32,
    pub inner: u32,
    pub raw_len: u32,
}

impl Member {
    /// Is the segment the whole frame?
    pub fn is_whole(&self) -> bool {
        self.inner == 0 && self.raw_len == self.frame_len
    }
}

impl EncodedSegment {
    /// Plaintext stored as it is.
    pub fn raw(data: &[u8]) -> Self {
        Self {
            codec: Codec::Raw,
            bytes: data.to_vec(),
        }
    }
}

/// Reusable compression state (one per thread); with keys, it seals what it compressed.
pub struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
    level: i32,
    keys: Option<Arc<Keys>>,
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
        Self::sealing(level, None)
    }

    /// An encoder that seals every frame with `keys` (when given).
    pub fn sealing(level: i32, keys: Option<Arc<Keys>>) -> Self {
        let zstd = zstd::bulk::Compressor::new(level.max(1)).expect("zstd compressor");
        Self { zstd, level, keys }
    }

    /// The keys frames are sealed with.
    pub fn keys(&self) -> Option<&Arc<Keys>> {
        self.keys.as_ref()
    }

    /// The fingerprint of a segment or node under this encoder's keys.
    pub fn fingerprint(&self, data: &[u8]) -> Digest {
        fingerprint_with(self.keys.as_deref(), data)
    }

    /// The zstd level (0 = off).
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Encodes `data`, compressing only when it pays, and seals it when the encoder has keys.
    pub fn encode(&mut self, data: &[u8]) -> EncodedSegment {
        self.encode_with_refs(data, 0, &[])
    }

    /// [`encode`](Self::encode) for a tree node: a sealed node carries its `level` and the
    /// digests it refers to in the clear, for a vault without the key.
    pub fn encode_with_refs(&mut self, data: &[u8], level: u8, refs: &[Digest]) -> EncodedSegment {
        let seg = self.compress(data);
        self.seal(seg, level, refs)
    }

    /// Seals what [`compress`](Self::compress) made, when the encoder has keys (as is,
    /// without). `encode` is `compress` then `seal`; a caller that may split an
    /// incompressible frame into its segments compresses first and seals what it keeps,
    /// so nothing is sealed twice.
    pub fn seal(&self, seg: EncodedSegment, level: u8, refs: &[Digest]) -> EncodedSegment {
        match &self.keys {
            None => seg,
            Some(k) => EncodedSegment {
                codec: if seg.codec == Codec::Zstd {
                    Codec::SealedZstd
                } else {
                    Codec::SealedRaw
                },
                bytes: k.seal_frame(&seg.bytes, level, refs),
            },
        }
    }

    /// Compresses `data` when it pays (`Zstd`), else keeps it `Raw`; never seals.
    pub fn compress(&mut self, data: &[u8]) -> EncodedSegment {
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
        EncodedSegment::raw(data)
    }
}

thread_local! {
    /// One zstd decompression context per thread: creating one costs more than decoding a
    /// small segment.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decodes a stored segment and checks it against `digest` and `raw_len`.
/// `keys` are the repository's (`None` when it is not encrypted, or unknown).
pub fn decode(
    keys: Option<&Keys>,
    codec: Codec,
    stored: &[u8],
    raw_len: usize,
    digest: &Digest,
) -> Result<Vec<u8>, CodecError> {
    let plain = decode_frame(keys, codec, stored, raw_len, digest)?;
    check(keys, &plain, digest)?;
    Ok(plain)
}

/// Checks plaintext against its fingerprint (keyed when `keys` are given).
pub fn check(keys: Option<&Keys>, plain: &[u8], digest: &Digest) -> Result<(), CodecError> {
    let got = fingerprint_with(keys, plain);
    if got != *digest {
        return Err(CodecError::Mismatch {
            digest: *digest,
            got,
        });
    }
    Ok(())
}

/// Decodes one segment of a stored frame and checks it against `digest`.
pub fn decode_member(
    keys: Option<&Keys>,
    codec: Codec,
    stored: &[u8],
    m: Member,
    digest: &Digest,
) -> Result<Vec<u8>, CodecError> {
    FrameCache::new().member(keys, (), codec, stored, m, digest)
}

/// The segment `m` of a decoded frame, checked against `digest`.
pub fn member_of<'a>(
    keys: Option<&Keys>,
    frame: &'a [u8],
    m: Member,
    digest: &Digest,
) -> Result<&'a [u8], CodecError> {
    let end = u64::from(m.inner) + u64::from(m.raw_len);
    if end > frame.len() as u64 || frame.len() as u64 != u64::from(m.frame_len) {
        return Err(CodecError::Outside {
            digest: *digest,
            inner: m.inner,
            len: m.raw_len,
            frame_len: m.frame_len,
        });
    }
    let piece = &frame[m.inner as usize..][..m.raw_len as usize];
    check(keys, piece, digest)?;
    Ok(piece)
}

/// Decodes segments of frames, keeping the last frame decoded: the members of one frame are
/// usually read one after another, and each frame is then decoded once. `K` names a frame
/// (for example its container and offset).
#[derive(Debug, Default)]
pub struct FrameCache<K> {
    last: Option<(K, Vec<u8>)>,
}

impl<K: PartialEq> FrameCache<K> {
    pub fn new() -> Self {
        Self { last: None }
    }

    /// The plaintext of member `m` of the frame `key` stored as `stored`, checked against
    /// `digest`. A segment that is its whole frame is decoded directly, without the cache.
    pub fn member(
        &mut self,
        keys: Option<&Keys>,
        key: K,
        codec: Codec,
        stored: &[u8],
        m: Member,
        digest: &Digest,
    ) -> Result<Vec<u8>, CodecError> {
        if m.is_whole() {
            return decode(keys, codec, stored, m.raw_len as usize, digest);
        }
        if self.last.as_ref().is_none_or(|(k, _)| *k != key) {
            self.last = None;
            let frame = decode_frame(keys, codec, stored, m.frame_len as usize, digest)?;
            self.last = Some((key, frame));
        }
        let (_, frame) = self.last.as_ref().expect("just decoded");
        Ok(member_of(keys, frame, m, digest)?.to_vec())
    }
}

/// Decodes a stored frame to its `frame_len` bytes of plaintext, without a fingerprint check
/// (`digest` names the segment asked for, in errors). A sealed frame is opened with `keys`
/// first.
pub fn decode_frame(
    keys: Option<&Keys>,
    codec: Codec,
    stored: &[u8],
    frame_len: usize,
    digest: &Digest,
) -> Result<Vec<u8>, CodecError> {
    if codec.is_sealed() {
        let keys = keys.ok_or(CodecError::NoKey { digest: *digest })?;
        if stored.len() > SEGMENT_MAX_LEN {
            return Err(CodecError::TooLarge {
                digest: *digest,
                len: stored.len(),
            });
        }
        let opened = keys.open_frame(stored).map_err(|source| CodecError::Open {
            digest: *digest,
            source,
        })?;
        if !codec.is_compressed() {
            // Raw inside: the opened bytes are the plaintext (no second copy).
            if opened.len() != frame_len {
                return Err(CodecError::Length {
                    digest: *digest,
                    got: opened.len(),
                    want: frame_len,
                });
            }
            return Ok(opened);
        }
        return decode_frame(None, Codec::Zstd, &opened, frame_len, digest);
    }
    if stored.len() > SEGMENT_MAX_LEN || frame_len > SEGMENT_MAX_LEN {
        return Err(CodecError::TooLarge {
            digest: *digest,
            len: stored.len().max(frame_len),
        });
    }
    let plain = match codec {
        Codec::Raw | Codec::SealedRaw => stored.to_vec(),
        Codec::Zstd | Codec::SealedZstd => {
            let mut out = Vec::with_capacity(frame_len);
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
    if plain.len() != frame_len {
        return Err(CodecError::Length {
            digest: *digest,
            got: plain.len(),
            want: frame_len,
        });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::fingerprint;
    use proptest::prelude::*;

    #[test]
    fn sealed_frames_round_trip_and_need_their_key() {
        let keys = Arc::new(Keys::generate());
        let data = b"hello world ".repeat(1000);
        let d = keys.fingerprint(&data);
        let mut enc = Encoder::sealing(3, Some(keys.clone()));
        assert_eq!(enc.fingerprint(&data), d);
        let e = enc.encode(&data);
        assert_eq!(e.codec, Codec::SealedZstd);
        assert!(e.bytes.len() < data.len() / 10);
        assert_eq!(
            decode(Some(&keys), e.codec, &e.bytes, data.len(), &d).unwrap(),
            data
        );
        assert!(matches!(
            decode(None, e.codec, &e.bytes, data.len(), &d),
            Err(CodecError::NoKey { .. })
        ));
        let other = Keys::generate();
        assert!(matches!(
            decode(Some(&other), e.codec, &e.bytes, data.len(), &d),
            Err(CodecError::Open { .. })
        ));
        let mut bad = e.bytes.clone();
        bad[40] ^= 4;
        assert!(decode(Some(&keys), e.codec, &bad, data.len(), &d).is_err());
        let raw = Encoder::sealing(0, Some(keys.clone())).encode(b"tiny");
        assert_eq!(raw.codec, Codec::SealedRaw);
        assert!(!raw.bytes.windows(4).any(|w| w == b"tiny"));
    }

    #[test]
    fn compressible_data_is_compressed_and_round_trips() {
        let data = b"hello world ".repeat(1000);
        let d = fingerprint(&data);
        let e = Encoder::new(1).encode(&data);
        assert_eq!(e.codec, Codec::Zstd);
        assert!(e.bytes.len() < data.len() / 10);
        assert_eq!(
            decode(None, e.codec, &e.bytes, data.len(), &d).unwrap(),
            data
        );
    }

    #[test]
    fn damage_is_detected() {
        let data = b"hello world ".repeat(1000);
        let d = fingerprint(&data);
        let mut e = Encoder::new(1).encode(&data);
        let n = e.bytes.len();
        e.bytes[n / 2] ^= 1;
        assert!(decode(None, e.codec, &e.bytes, data.len(), &d).is_err());
        let raw = Encoder::new(0).encode(&data);
        let mut bad = raw.bytes.clone();
        bad[5] ^= 0x40;
        assert!(matches!(
            decode(None, Codec::Raw, &bad, data.len(), &d),
            Err(CodecError::Mismatch { .. })
        ));
    }

    #[test]
    fn members_of_a_frame_decode_once_and_are_checked_alone() {
        let parts: Vec<Vec<u8>> = (0..4)
            .map(|i| format!("part {i} ").repeat(300).into_bytes())
            .collect();
        let len32 = |p: &Vec<u8>| u32::try_from(p.len()).unwrap();
        let frame_len = parts.iter().map(len32).sum::<u32>();
        let e = Encoder::new(3).encode(&parts.concat());
        assert_eq!(e.codec, Codec::Zstd);
        let mut cache = FrameCache::new();
        let mut inner = 0;
        for p in &parts {
            let m = Member {
                frame_len,
                inner,
                raw_len: len32(p),
            };
            // After the first member the cached frame serves: the bytes passed are not read.
            let stored: &[u8] = if inner == 0 {
                &e.bytes
            } else {
                b"not the frame"
            };
            let got = cache
                .member(None, 7u32, e.codec, stored, m, &fingerprint(p))
                .unwrap();
            assert_eq!(&got, p);
            assert_eq!(
                decode_member(None, e.codec, &e.bytes, m, &fingerprint(p)).unwrap(),
                *p
            );
            inner += len32(p);
        }
        // A member asked for under another segment's digest, or outside its frame, fails.
        let m = Member {
            frame_len,
            inner: 0,
            raw_len: len32(&parts[0]),
        };
        assert!(matches!(
            decode_member(None, e.codec, &e.bytes, m, &fingerprint(&parts[1])),
            Err(CodecError::Mismatch { .. })
        ));
        let out = Member {
            frame_len,
            inner: frame_len - 10,
            raw_len: 20,
        };
        assert!(matches!(
            decode_member(None, e.codec, &e.bytes, out, &fingerprint(&parts[0])),
            Err(CodecError::Outside { .. })
        ));
        let short = Member {
            frame_len: frame_len + 1,
            inner: 0,
            raw_len: 5,
        };
        assert!(decode_member(None, e.codec, &e.bytes, short, &fingerprint(&parts[0])).is_err());
    }

    proptest! {
        #[test]
        fn decode_of_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000), len in 0usize..5000) {
            let _ = decode(None, Codec::Zstd, &bytes, len, &Digest::default());
            let _ = decode(None, Codec::Raw, &bytes, len, &Digest::default());
        }

        #[test]
        fn encode_decode_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..5000), level in 0i32..4) {
            let d = fingerprint(&bytes);
            let e = Encoder::new(level).encode(&bytes);
            prop_assert_eq!(decode(None, e.codec, &e.bytes, bytes.len(), &d).unwrap(), bytes);
        }
    }
}
