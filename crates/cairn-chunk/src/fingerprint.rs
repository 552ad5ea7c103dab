//! Fingerprints: BLAKE3-256 of a segment's plaintext; in an encrypted repository keyed
//! BLAKE3 under the repository's fingerprint key, so equal data in two repositories cannot be
//! matched.

use cairn_types::Digest;

use crate::crypto::Keys;

/// The fingerprint of `data`.
pub fn fingerprint(data: &[u8]) -> Digest {
    Digest(*blake3::hash(data).as_bytes())
}

/// The fingerprint of `data` in a repository with these keys (plain BLAKE3 without).
pub fn fingerprint_with(keys: Option<&Keys>, data: &[u8]) -> Digest {
    match keys {
        Some(k) => k.fingerprint(data),
        None => fingerprint(data),
    }
}

/// True when every byte of `data` is zero (such regions are stored as holes).
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words.all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 100]));
        for i in 0..100 {
            let mut v = vec![0u8; 100];
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
        }
    }

    #[test]
    fn fingerprint_is_blake3() {
        assert_eq!(
            fingerprint(b"abc").to_hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
