//! Wrapping the master key: by a passphrase (Argon2id, its parameters recorded with the
//! wrapped key), by the secret of a key file, and as a paper recovery key.
//!
//! A wrapped key is `nonce[24] | XChaCha20-Poly1305(master key) | tag[16]` under the wrapping
//! key, with the repository id as associated data (a wrapped key of another repository does
//! not open). Adding, changing or removing a wrapping touches only the wrapped key objects,
//! never a data object.

use chacha20poly1305::{KeyInit, XChaCha20Poly1305};

use crate::FormatError;
use crate::crypto::{CryptoError, open_from, seal_into};
use crate::format::{
    ARGON2_LANES, ARGON2_MAX_MEMORY_KIB, ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_SALT_LEN,
    KDF_CONTEXT_KEY_FILE, PAPER_KEY_DIGITS,
};

/// Argon2id parameters, recorded with each passphrase-wrapped key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub passes: u32,
    pub lanes: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            memory_kib: ARGON2_MEMORY_KIB,
            passes: ARGON2_PASSES,
            lanes: ARGON2_LANES,
        }
    }
}

/// The key a passphrase wraps with: Argon2id of it under `salt`.
pub fn passphrase_key(
    passphrase: &[u8],
    salt: &[u8],
    p: &KdfParams,
) -> Result<[u8; 32], FormatError> {
    let err = |r: String| FormatError::new("argon2id parameters", r);
    if p.memory_kib > ARGON2_MAX_MEMORY_KIB || p.passes > 64 || p.lanes > 64 {
        return Err(err(format!("{p:?} exceed the limits")));
    }
    if salt.len() < ARGON2_SALT_LEN {
        return Err(err(format!("salt of {} bytes", salt.len())));
    }
    let params = argon2::Params::new(p.memory_kib, p.passes, p.lanes, Some(32))
        .map_err(|e| err(e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    a.hash_password_into(passphrase, salt, &mut out)
        .map_err(|e| err(e.to_string()))?;
    Ok(out)
}

/// The key a key file's secret wraps with.
pub fn key_file_key(secret: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key(KDF_CONTEXT_KEY_FILE, secret)
}

/// A random salt for [`passphrase_key`].
pub fn new_salt() -> [u8; ARGON2_SALT_LEN] {
    rand::random()
}

/// Wraps `master` under `wrapping`, bound to `repo_id`.
pub fn wrap(wrapping: &[u8; 32], master: &[u8; 32], repo_id: &str) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new_from_slice(wrapping).expect("32-byte key");
    let mut out = repo_id.as_bytes().to_vec();
    seal_into(&cipher, &mut out, 0, master);
    out.split_off(repo_id.len())
}

/// Unwraps what [`wrap`] made; fails with [`CryptoError::Open`] under a wrong key or another
/// repository's id.
pub fn unwrap(wrapping: &[u8; 32], wrapped: &[u8], repo_id: &str) -> Result<[u8; 32], CryptoError> {
    let cipher = XChaCha20Poly1305::new_from_slice(wrapping).expect("32-byte key");
    let mut buf = repo_id.as_bytes().to_vec();
    buf.extend_from_slice(wrapped);
    let plain = open_from(&cipher, &buf, 0, repo_id.len())?;
    plain
        .try_into()
        .map_err(|_| FormatError::new("wrapped key", "not 32 bytes").into())
}

/// The master key as a paper recovery key: 64 hex digits and 4 of checksum (the first two
/// bytes of its BLAKE3), in groups of four.
pub fn paper_key(master: &[u8; 32]) -> String {
    let mut digits: String = master.iter().map(|b| format!("{b:02x}")).collect();
    let sum = blake3::hash(master);
    digits.push_str(&format!(
        "{:02x}{:02x}",
        sum.as_bytes()[0],
        sum.as_bytes()[1]
    ));
    let groups: Vec<&str> = (0..PAPER_KEY_DIGITS / 4)
        .map(|i| &digits[i * 4..i * 4 + 4])
        .collect();
    groups.join("-")
}

/// Reads a paper key back (white space and dashes ignored, either case); the checksum
/// catches a mistyped digit.
pub fn parse_paper_key(text: &str) -> Result<[u8; 32], FormatError> {
    let err = |r: &str| FormatError::new("recovery key", r);
    let digits: Vec<u8> = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_digit(16).and_then(|d| u8::try_from(d).ok()).ok_or(()))
        .collect::<Result<_, _>>()
        .map_err(|()| err("holds a character that is not a hex digit"))?;
    if digits.len() != PAPER_KEY_DIGITS {
        return Err(err(&format!(
            "has {} hex digits, not {PAPER_KEY_DIGITS}",
            digits.len()
        )));
    }
    let bytes: Vec<u8> = digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect();
    let master: [u8; 32] = bytes[..32].try_into().expect("32 bytes");
    if blake3::hash(&master).as_bytes()[..2] != bytes[32..] {
        return Err(err("checksum does not match (a digit is mistyped)"));
    }
    Ok(master)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> KdfParams {
        KdfParams {
            memory_kib: 64,
            passes: 1,
            lanes: 1,
        }
    }

    #[test]
    fn a_wrapped_key_opens_only_with_its_passphrase_and_repository() {
        let master = [42u8; 32];
        let salt = new_salt();
        let k = passphrase_key(b"right", &salt, &fast()).unwrap();
        let w = wrap(&k, &master, "repo-a");
        assert_eq!(unwrap(&k, &w, "repo-a").unwrap(), master);
        let wrong = passphrase_key(b"wrong", &salt, &fast()).unwrap();
        assert_eq!(unwrap(&wrong, &w, "repo-a"), Err(CryptoError::Open));
        assert_eq!(unwrap(&k, &w, "repo-b"), Err(CryptoError::Open));
        assert!(unwrap(&k, &w[..20], "repo-a").is_err());
        let f = key_file_key(&[1; 32]);
        assert_eq!(unwrap(&f, &wrap(&f, &master, "r"), "r").unwrap(), master);
        let huge = KdfParams {
            memory_kib: u32::MAX,
            ..fast()
        };
        assert!(passphrase_key(b"x", &salt, &huge).is_err());
    }

    #[test]
    fn paper_keys_round_trip_and_catch_typos() {
        let master: [u8; 32] = rand::random();
        let paper = paper_key(&master);
        assert_eq!(paper.len(), PAPER_KEY_DIGITS + PAPER_KEY_DIGITS / 4 - 1);
        assert_eq!(parse_paper_key(&paper).unwrap(), master);
        assert_eq!(
            parse_paper_key(&paper.to_uppercase().replace('-', " ")).unwrap(),
            master
        );
        let mut typo = paper.into_bytes();
        typo[0] = if typo[0] == b'0' { b'1' } else { b'0' };
        assert!(parse_paper_key(&String::from_utf8(typo).unwrap()).is_err());
        assert!(parse_paper_key("abcd").is_err());
    }
}
