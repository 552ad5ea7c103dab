//! Big-endian field access and the CRC-32C that guards every XFS v5 metadata block.

use crate::{Error, Result};

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .unwrap_or(0)
}

pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
        .unwrap_or(0)
}

pub(super) use crate::util::{be32, crc32c};

/// Checks the CRC-32C of `buf` whose 4-byte checksum (stored little-endian) sits at
/// `crc_at`; the checksum is computed with that field taken as zero.
pub(super) fn check_crc(buf: &[u8], crc_at: usize, what: &dyn Fn() -> String) -> Result<()> {
    let Some(stored) = buf.get(crc_at..crc_at + 4) else {
        return Err(Error::corrupt(format!(
            "{}: too short for a checksum",
            what()
        )));
    };
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    // Fuzzing builds (cargo fuzz passes `--cfg fuzzing`) accept any checksum, so mutated v5
    // metadata reaches the parsers behind it.
    #[allow(unexpected_cfgs)]
    let fuzzing = cfg!(fuzzing);
    if !fuzzing && crc32c_skipping(buf, crc_at) != stored {
        return Err(Error::corrupt(format!("{}: bad CRC-32C", what())));
    }
    Ok(())
}

/// CRC-32C of `buf` with the 4 bytes at `at` read as zeros.
pub(super) fn crc32c_skipping(buf: &[u8], at: usize) -> u32 {
    if at + 4 > buf.len() {
        return crc32c(buf);
    }
    let c = crate::util::crc32c_update(!0, &buf[..at]);
    let c = crate::util::crc32c_update(c, &[0; 4]);
    !crate::util::crc32c_update(c, &buf[at + 4..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn crc_field_is_zeroed_and_little_endian() {
        let mut b = b"abcdXXXXefgh".to_vec();
        let c = crc32c_skipping(&b, 4);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        check_crc(&b, 4, &|| "t".into()).unwrap();
        b[0] ^= 1;
        assert!(check_crc(&b, 4, &|| "t".into()).is_err());
        assert!(check_crc(&b, 10, &|| "t".into()).is_err());
    }
}
