//! Metadata checksums: the superblock's and every tree node's first 32 bytes hold a checksum
//! of the rest of the block, of the type the superblock names.
//!
//! | type | stored |
//! |---|---|
//! | crc32c (0) | CRC-32C (Castagnoli), 4 bytes little-endian |
//! | xxhash64 (1) | XXH64 with seed 0, 8 bytes little-endian |
//! | sha256 (2) | 32 bytes |
//! | blake2b (3) | not verified: opening fails with `Unsupported` |

use sha2::Digest;

pub(crate) use crate::util::crc32c;

use crate::format::{
    BTRFS_CSUM_BLAKE2B, BTRFS_CSUM_CRC32C, BTRFS_CSUM_LEN, BTRFS_CSUM_SHA256, BTRFS_CSUM_XXHASH64,
};
use crate::{Error, Result};

/// A checksum algorithm the reader can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Csum {
    Crc32c,
    XxHash64,
    Sha256,
}

impl Csum {
    pub(crate) fn from_type(t: u16) -> Result<Self> {
        match t {
            BTRFS_CSUM_CRC32C => Ok(Self::Crc32c),
            BTRFS_CSUM_XXHASH64 => Ok(Self::XxHash64),
            BTRFS_CSUM_SHA256 => Ok(Self::Sha256),
            BTRFS_CSUM_BLAKE2B => Err(Error::unsupported("btrfs blake2b checksums")),
            t => Err(Error::corrupt(format!("btrfs checksum type {t}"))),
        }
    }

    /// Whether `block` (a superblock or a tree node) carries the checksum of its contents.
    pub(crate) fn verify(self, block: &[u8]) -> bool {
        let Some((stored, body)) = block.split_at_checked(BTRFS_CSUM_LEN) else {
            return false;
        };
        match self {
            Self::Crc32c => stored[..4] == crc32c(body).to_le_bytes(),
            Self::XxHash64 => stored[..8] == xxh64(body).to_le_bytes(),
            Self::Sha256 => stored[..] == sha2::Sha256::digest(body)[..],
        }
    }

    /// Writes the checksum of `block`'s contents into its first bytes (tests mutate images
    /// with it).
    #[cfg(test)]
    pub(crate) fn seal(self, block: &mut [u8]) {
        if block.len() < BTRFS_CSUM_LEN {
            return;
        }
        let (stored, body) = block.split_at_mut(BTRFS_CSUM_LEN);
        stored.fill(0);
        match self {
            Self::Crc32c => stored[..4].copy_from_slice(&crc32c(body).to_le_bytes()),
            Self::XxHash64 => stored[..8].copy_from_slice(&xxh64(body).to_le_bytes()),
            Self::Sha256 => stored.copy_from_slice(&sha2::Sha256::digest(body)),
        }
    }
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn xx_round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn xx_merge(acc: u64, v: u64) -> u64 {
    (acc ^ xx_round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 with seed 0.
pub(crate) fn xxh64(data: &[u8]) -> u64 {
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
        while rest.len() >= 32 {
            for (i, acc) in v.iter_mut().enumerate() {
                *acc = xx_round(*acc, u64_at(&rest[i * 8..]));
            }
            rest = &rest[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for x in v {
            h = xx_merge(h, x);
        }
        h
    } else {
        P5
    };
    h = h.wrapping_add(data.len() as u64);
    while rest.len() >= 8 {
        h ^= xx_round(0, u64_at(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        let w = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        h ^= u64::from(w).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(xxh64(b""), 0xEF46_DB37_51D8_E999);
    }

    #[test]
    fn seal_then_verify() {
        for c in [Csum::Crc32c, Csum::XxHash64, Csum::Sha256] {
            let mut b: Vec<u8> = (0..4096u32)
                .map(|i| u8::try_from(i % 251).unwrap())
                .collect();
            assert!(!c.verify(&b));
            c.seal(&mut b);
            assert!(c.verify(&b), "{c:?}");
            b[100] ^= 1;
            assert!(!c.verify(&b), "{c:?}");
        }
    }
}
