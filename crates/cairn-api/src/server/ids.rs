//! The ids of the server's records: a backup and a job are each named by 16 lowercase hex
//! digits, chosen at random when the record is made. Each is its own type, so a job id is
//! never passed where a backup id is meant; both borrow as the string they are (SQL
//! parameters, log lines, URLs) and refuse, when parsed or deserialized, anything else.

use serde::{Deserialize, Serialize};

/// A string id checked by `$valid` when parsed or deserialized; it borrows as its string.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $expected:literal, $valid:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let valid: fn(&str) -> bool = $valid;
                if valid(s) {
                    Ok(Self(s.to_string()))
                } else {
                    Err(format!(
                        concat!("invalid ", $what, " id {:?}: expected ", $expected),
                        s.chars().take(40).collect::<String>()
                    ))
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}
pub(crate) use string_id;

fn hex16(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A record id: 16 lowercase hex digits, random when the record is made.
macro_rules! record_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        string_id!($(#[$doc])* $name, $what, "16 lowercase hex digits", hex16);

        impl $name {
            /// A new random id.
            pub fn random() -> Self {
                Self(hex::encode(rand::random::<[u8; 8]>()))
            }
        }
    };
}

record_id!(
    /// A backup's id (`BackupRecord::id`).
    BackupId,
    "backup"
);

record_id!(
    /// A job's id (`JobRecord::id`).
    JobId,
    "job"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_back_and_refuse_what_they_are_not() {
        let b = BackupId::random();
        assert_eq!(b.len(), 16);
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<BackupId>(&json).unwrap(), b);
        for bad in [
            "",
            "0123456789ABCDEF",
            "0123456789abcde",
            "../../etc/passwd00",
        ] {
            assert!(bad.parse::<JobId>().is_err(), "{bad}");
        }
        let e = serde_json::from_str::<JobId>(r#""nope""#).unwrap_err();
        assert!(e.to_string().contains("invalid job id"), "{e}");
    }
}
