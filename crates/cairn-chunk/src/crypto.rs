//! Encryption at rest: the keys of an encrypted repository and the sealed frame format.
//!
//! ```text
//! master key (32 random bytes; wrapped by passphrases / key files, see `wrap`)
//!   ├─ derive_key(KDF_CONTEXT_FINGERPRINT) → keyed BLAKE3 of segments and tree nodes
//!   ├─ derive_key(KDF_CONTEXT_FRAME)       → XChaCha20-Poly1305 key of frames
//!   ├─ derive_key(KDF_CONTEXT_METADATA)    → XChaCha20-Poly1305 key of manifests' private part
//!   ├─ derive_key(KDF_CONTEXT_NAME_TAG)    → keyed BLAKE3 of snapshot names
//!   └─ derive_key(KDF_CONTEXT_KEY_CHECK)   → the value the config records to recognise it
//! ```
//!
//! A sealed frame is what the codec made of a frame's plaintext (raw or zstd), encrypted:
//!
//! ```text
//! checksum[16] | level u8 | pad[3] | refs u32 | refs × digest[32] | nonce[24] | ciphertext | tag[16]
//! ```
//!
//! `checksum` is BLAKE3 (first 16 bytes) of everything after it: a vault without the key
//! checks stored frames with it. `refs` are a tree node's children (its data segments for a
//! leaf, `level` 0; its child nodes above) in the clear, so a vault without the key walks
//! trees for GC; they are keyed fingerprints and tell nothing of the data. The header and
//! the references are the AEAD's associated data: changing them fails the open.
//!
//! Nonces are 24 random bytes per frame (XChaCha20): with many writers sealing under one key
//! and no coordination between them, a random 192-bit nonce repeats with negligible
//! probability (2^-97 after 2^48 frames), where a 96-bit one would not stay safe.
//!
//! Frames are sealed as XChaCha20-Poly1305 is defined: HChaCha20 of the key and the nonce's
//! first 16 bytes gives a subkey, used with ChaCha20-Poly1305 and the nonce's last 8 bytes;
//! the ChaCha20-Poly1305 step is `ring`'s (assembly, several times the pure-Rust speed). The
//! tests check that RustCrypto's `XChaCha20Poly1305` opens what this seals and the reverse.

use cairn_types::Digest;
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};

use crate::FormatError;
use crate::format::{
    KDF_CONTEXT_FINGERPRINT, KDF_CONTEXT_FRAME, KDF_CONTEXT_KEY_CHECK, KDF_CONTEXT_METADATA,
    KDF_CONTEXT_NAME_TAG, SEALED_CHECKSUM_LEN, SEALED_HEADER_LEN, SEALED_MAX_REFS,
    SEALED_NONCE_LEN, SEALED_TAG_LEN,
};

/// A sealed frame or sealed metadata did not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("sealed bytes do not open: damaged, or sealed under another key")]
    Open,
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// The keys of an encrypted repository, derived from its master key. `Debug` shows nothing
/// secret.
#[derive(Clone)]
pub struct Keys {
    master: [u8; 32],
    fingerprint: [u8; 32],
    name_tag: [u8; 32],
    frame: [u8; 32],
    metadata: XChaCha20Poly1305,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("check", &self.check_value())
            .finish_non_exhaustive()
    }
}

fn aead(key: &[u8; 32]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new_from_slice(key).expect("a 32-byte key")
}

impl Keys {
    /// A new random master key.
    pub fn generate() -> Self {
        Self::from_master(&rand::random())
    }

    /// The keys derived from `master`.
    pub fn from_master(master: &[u8; 32]) -> Self {
        Self {
            master: *master,
            fingerprint: blake3::derive_key(KDF_CONTEXT_FINGERPRINT, master),
            name_tag: blake3::derive_key(KDF_CONTEXT_NAME_TAG, master),
            frame: blake3::derive_key(KDF_CONTEXT_FRAME, master),
            metadata: aead(&blake3::derive_key(KDF_CONTEXT_METADATA, master)),
        }
    }

    /// The master key itself (for wrapping and export only).
    pub fn master(&self) -> &[u8; 32] {
        &self.master
    }

    /// What the config records to recognise this master key (hex); reveals nothing of it.
    pub fn check_value(&self) -> String {
        let k = blake3::derive_key(KDF_CONTEXT_KEY_CHECK, &self.master);
        hex(&k[..16])
    }

    /// The keyed fingerprint of a segment or tree node.
    pub fn fingerprint(&self, data: &[u8]) -> Digest {
        Digest(*blake3::keyed_hash(&self.fingerprint, data).as_bytes())
    }

    /// The keyed tag of a snapshot name (hex, 32 digits): equal names give equal tags.
    pub fn name_tag(&self, name: &str) -> String {
        hex(&blake3::keyed_hash(&self.name_tag, name.as_bytes()).as_bytes()[..16])
    }

    /// Seals the encoded bytes of a frame; `level` and `refs` travel in the clear (see the
    /// module docs). Panics when `refs` exceed [`SEALED_MAX_REFS`] (a tree node never does).
    pub fn seal_frame(&self, encoded: &[u8], level: u8, refs: &[Digest]) -> Vec<u8> {
        assert!(refs.len() <= SEALED_MAX_REFS, "too many references");
        let head = SEALED_HEADER_LEN + refs.len() * 32;
        let mut out = Vec::with_capacity(head + SEALED_NONCE_LEN + encoded.len() + SEALED_TAG_LEN);
        out.resize(SEALED_CHECKSUM_LEN, 0);
        out.extend_from_slice(&[level, 0, 0, 0]);
        let n = u32::try_from(refs.len()).expect("checked above");
        out.extend_from_slice(&n.to_le_bytes());
        refs.iter()
            .for_each(|r| out.extend_from_slice(r.as_bytes()));
        xseal(&self.frame, &mut out, SEALED_CHECKSUM_LEN, encoded);
        let sum = blake3::hash(&out[SEALED_CHECKSUM_LEN..]);
        out[..SEALED_CHECKSUM_LEN].copy_from_slice(&sum.as_bytes()[..SEALED_CHECKSUM_LEN]);
        out
    }

    /// Opens a sealed frame: its encoded bytes (what the codec made of the plaintext).
    pub fn open_frame(&self, stored: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (head, _) = SealedHeader::parse(stored)?;
        xopen(&self.frame, stored, SEALED_CHECKSUM_LEN, head)
    }

    /// Seals metadata (a manifest's private fields); `aad` binds it to its context.
    pub fn seal_metadata(&self, plain: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut out = aad.to_vec();
        seal_into(&self.metadata, &mut out, 0, plain);
        out.split_off(aad.len())
    }

    /// Opens what [`seal_metadata`](Self::seal_metadata) sealed under the same `aad`.
    pub fn open_metadata(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut buf = aad.to_vec();
        buf.extend_from_slice(sealed);
        open_from(&self.metadata, &buf, 0, aad.len())
    }
}

/// Appends `nonce | ciphertext | tag` of `plain` to `out`; the associated data is
/// `out[aad_from..]` as it was before.
pub(crate) fn seal_into(
    cipher: &XChaCha20Poly1305,
    out: &mut Vec<u8>,
    aad_from: usize,
    plain: &[u8],
) {
    let nonce: [u8; SEALED_NONCE_LEN] = rand::random();
    let aad_end = out.len();
    out.extend_from_slice(&nonce);
    let body = out.len();
    out.extend_from_slice(plain);
    let (aad, rest) = out.split_at_mut(body);
    let tag = cipher
        .encrypt_inout_detached(&XNonce::from(nonce), &aad[aad_from..aad_end], rest.into())
        .expect("a frame is far below the cipher's limit");
    out.extend_from_slice(&tag);
}

/// Opens `buf[head..]` (`nonce | ciphertext | tag`) with `buf[aad_from..head]` as associated
/// data.
pub(crate) fn open_from(
    cipher: &XChaCha20Poly1305,
    buf: &[u8],
    aad_from: usize,
    head: usize,
) -> Result<Vec<u8>, CryptoError> {
    let body = buf.get(head..).unwrap_or_default();
    if body.len() < SEALED_NONCE_LEN + SEALED_TAG_LEN {
        return Err(FormatError::new("sealed frame", "shorter than its nonce and tag").into());
    }
    let (nonce, rest) = body.split_at(SEALED_NONCE_LEN);
    let (ct, tag) = rest.split_at(rest.len() - SEALED_TAG_LEN);
    let mut plain = ct.to_vec();
    let nonce = XNonce::try_from(nonce).expect("24 bytes");
    let tag = chacha20poly1305::Tag::try_from(tag).expect("16 bytes");
    cipher
        .decrypt_inout_detached(
            &nonce,
            &buf[aad_from..head],
            plain.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| CryptoError::Open)?;
    Ok(plain)
}

/// The ChaCha20-Poly1305 key and nonce XChaCha20-Poly1305 uses for `key` and `nonce`.
fn subkey(key: &[u8; 32], nonce: &[u8; SEALED_NONCE_LEN]) -> ring::aead::LessSafeKey {
    let input: [u8; 16] = nonce[..16].try_into().expect("16 bytes");
    let sub = chacha20::hchacha::<chacha20::R20>(&(*key).into(), &input.into());
    let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, sub.as_slice())
        .expect("a 32-byte key");
    ring::aead::LessSafeKey::new(unbound)
}

fn short_nonce(nonce: &[u8; SEALED_NONCE_LEN]) -> ring::aead::Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&nonce[16..]);
    ring::aead::Nonce::assume_unique_for_key(n)
}

/// [`seal_into`] for frames, with `ring`'s ChaCha20-Poly1305 (same bytes out).
fn xseal(key: &[u8; 32], out: &mut Vec<u8>, aad_from: usize, plain: &[u8]) {
    let nonce: [u8; SEALED_NONCE_LEN] = rand::random();
    let aad_end = out.len();
    out.extend_from_slice(&nonce);
    let body = out.len();
    out.extend_from_slice(plain);
    let (aad, rest) = out.split_at_mut(body);
    let tag = subkey(key, &nonce)
        .seal_in_place_separate_tag(
            short_nonce(&nonce),
            ring::aead::Aad::from(&aad[aad_from..aad_end]),
            rest,
        )
        .expect("a frame is far below the cipher's limit");
    out.extend_from_slice(tag.as_ref());
}

/// [`open_from`] for frames, with `ring`'s ChaCha20-Poly1305.
fn xopen(key: &[u8; 32], buf: &[u8], aad_from: usize, head: usize) -> Result<Vec<u8>, CryptoError> {
    let body = buf.get(head..).unwrap_or_default();
    if body.len() < SEALED_NONCE_LEN + SEALED_TAG_LEN {
        return Err(FormatError::new("sealed frame", "shorter than its nonce and tag").into());
    }
    let (nonce, rest) = body.split_at(SEALED_NONCE_LEN);
    let nonce: [u8; SEALED_NONCE_LEN] = nonce.try_into().expect("24 bytes");
    let mut plain = rest.to_vec();
    let n = subkey(key, &nonce)
        .open_in_place(
            short_nonce(&nonce),
            ring::aead::Aad::from(&buf[aad_from..head]),
            &mut plain,
        )
        .map_err(|_| CryptoError::Open)?
        .len();
    plain.truncate(n);
    Ok(plain)
}

/// The clear part of a sealed frame, readable without the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedHeader {
    pub level: u8,
    pub refs: Vec<Digest>,
}

impl SealedHeader {
    /// Parses the clear header of a sealed frame; returns it and where the nonce starts.
    /// Checks the layout, not the checksum.
    pub fn parse(stored: &[u8]) -> Result<(usize, Self), FormatError> {
        let err = |r: String| FormatError::new("sealed frame", r);
        if stored.len() < SEALED_HEADER_LEN + SEALED_NONCE_LEN + SEALED_TAG_LEN {
            return Err(err(format!("only {} bytes", stored.len())));
        }
        let level = stored[SEALED_CHECKSUM_LEN];
        let n = u32::from_le_bytes(
            stored[SEALED_HEADER_LEN - 4..SEALED_HEADER_LEN]
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        let head = SEALED_HEADER_LEN + n.min(SEALED_MAX_REFS + 1) * 32;
        if n > SEALED_MAX_REFS || head + SEALED_NONCE_LEN + SEALED_TAG_LEN > stored.len() {
            return Err(err(format!(
                "{n} references do not fit its {} bytes",
                stored.len()
            )));
        }
        let refs = stored[SEALED_HEADER_LEN..head]
            .chunks_exact(32)
            .map(|c| Digest::from_slice(c).expect("32 bytes"))
            .collect();
        Ok((head, Self { level, refs }))
    }
}

/// Checks a sealed frame without the key: its layout and its checksum.
pub fn check_sealed(stored: &[u8]) -> Result<SealedHeader, FormatError> {
    let (_, head) = SealedHeader::parse(stored)?;
    let sum = blake3::hash(&stored[SEALED_CHECKSUM_LEN..]);
    if sum.as_bytes()[..SEALED_CHECKSUM_LEN] != stored[..SEALED_CHECKSUM_LEN] {
        return Err(FormatError::new("sealed frame", "checksum mismatch"));
    }
    Ok(head)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_every_flipped_bit_is_caught() {
        let keys = Keys::generate();
        let refs = [Digest([7; 32]), Digest([9; 32])];
        let sealed = keys.seal_frame(b"some encoded frame", 1, &refs);
        assert_eq!(keys.open_frame(&sealed).unwrap(), b"some encoded frame");
        assert_eq!(
            check_sealed(&sealed).unwrap(),
            SealedHeader {
                level: 1,
                refs: refs.to_vec()
            }
        );
        for i in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(check_sealed(&bad).is_err(), "keyless check misses bit {i}");
            if i >= SEALED_CHECKSUM_LEN * 8 {
                assert!(keys.open_frame(&bad).is_err(), "open misses bit {i}");
            }
        }
    }

    #[test]
    fn frames_are_xchacha20_poly1305_as_rustcrypto_has_it() {
        let master = [3u8; 32];
        let keys = Keys::from_master(&master);
        let rc = aead(&blake3::derive_key(KDF_CONTEXT_FRAME, &master));
        for len in [0usize, 1, 63, 64, 65, 1000, 70_000] {
            let plain: Vec<u8> = (0..len)
                .map(|i| u8::try_from(i * 7 % 251).unwrap())
                .collect();
            // Sealed here, opened by RustCrypto.
            let sealed = keys.seal_frame(&plain, 2, &[Digest([1; 32])]);
            let (head, _) = SealedHeader::parse(&sealed).unwrap();
            assert_eq!(
                open_from(&rc, &sealed, SEALED_CHECKSUM_LEN, head).unwrap(),
                plain
            );
            // Sealed by RustCrypto, opened here.
            let mut other = sealed[..head].to_vec();
            seal_into(&rc, &mut other, SEALED_CHECKSUM_LEN, &plain);
            assert_eq!(
                xopen(&keys.frame, &other, SEALED_CHECKSUM_LEN, head).unwrap(),
                plain
            );
        }
    }

    #[test]
    fn another_key_does_not_open_and_fingerprints_differ() {
        let (a, b) = (Keys::generate(), Keys::generate());
        let sealed = a.seal_frame(b"x", 0, &[]);
        assert_eq!(b.open_frame(&sealed), Err(CryptoError::Open));
        assert_ne!(a.fingerprint(b"data"), b.fingerprint(b"data"));
        assert_ne!(a.fingerprint(b"data"), crate::fingerprint(b"data"));
        assert_eq!(
            a.fingerprint(b"data"),
            Keys::from_master(a.master()).fingerprint(b"data")
        );
        assert_ne!(a.check_value(), b.check_value());
        // Two seals of one plaintext differ (random nonces).
        assert_ne!(a.seal_frame(b"x", 0, &[]), sealed);
    }

    #[test]
    fn metadata_is_bound_to_its_context() {
        let k = Keys::generate();
        let s = k.seal_metadata(b"{\"name\":\"vm1\"}", b"root-a");
        assert_eq!(
            k.open_metadata(&s, b"root-a").unwrap(),
            b"{\"name\":\"vm1\"}"
        );
        assert!(k.open_metadata(&s, b"root-b").is_err());
        assert!(k.open_metadata(&s[..10], b"root-a").is_err());
    }

    proptest! {
        #[test]
        fn parsing_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = check_sealed(&bytes);
            let _ = Keys::from_master(&[1; 32]).open_frame(&bytes);
        }
    }
}
