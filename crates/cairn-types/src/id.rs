//! Ids and digests. Every id is a newtype made by one macro, so a snapshot id can never be
//! passed where a container id is expected, and all of them print and parse as lowercase hex.

use std::fmt;
use std::str::FromStr;

/// A string could not be parsed as an id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind}: expected {len} hex digits, got {got:?}")]
pub struct IdParseError {
    pub kind: &'static str,
    pub len: usize,
    pub got: String,
}

macro_rules! hex_id {
    ($(#[$meta:meta])* $name:ident, $len:expr) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length of the id in bytes.
            pub const LEN: usize = $len;

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Lowercase hex, `2 * LEN` characters.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first `n` hex digits, for humans.
            pub fn short(&self) -> String {
                let mut s = self.to_hex();
                s.truncate(12);
                s
            }

            /// Builds an id from a slice of exactly `LEN` bytes.
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                <[u8; $len]>::try_from(b).ok().map(Self)
            }

            /// A fresh random id.
            pub fn random() -> Self {
                Self(rand::random())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = || IdParseError {
                    kind: stringify!($name),
                    len: 2 * $len,
                    got: s.chars().take(80).collect(),
                };
                if s.len() != 2 * $len {
                    return Err(err());
                }
                let mut out = [0u8; $len];
                hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
                Ok(Self(out))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(
    /// BLAKE3 fingerprint of a segment's or a tree node's plaintext.
    Digest, 32
);
hex_id!(
    /// Id of one backup of one disk image in a vault.
    SnapshotId, 16
);
hex_id!(
    /// Id of a container (pack file) of segments.
    ContainerId, 16
);
hex_id!(
    /// Id of an open backup session on a vault service.
    SessionId, 16
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip_and_errors() {
        let id = SnapshotId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<SnapshotId>().unwrap(), id);
        assert!("zz".parse::<SnapshotId>().is_err());
        assert!(s[..30].parse::<SnapshotId>().is_err());
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SnapshotId>(&j).unwrap(), id);
    }
}
