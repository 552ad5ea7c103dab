//! Vocabulary of virtual disks that every role shares.

use std::fmt;
use std::str::FromStr;

/// Image format of a virtual disk. On the wire and in files: `"raw"` or `"qcow2"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU and the wire use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name other than `raw` and `qcow2`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image format {0:?} (only raw and qcow2)")]
pub struct UnknownFormat(pub String);

impl FromStr for DiskFormat {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, UnknownFormat> {
        match s {
            "raw" => Ok(Self::Raw),
            "qcow2" => Ok(Self::Qcow2),
            other => Err(UnknownFormat(other.chars().take(40).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DiskFormat;

    #[test]
    fn names_round_trip_and_unknown_is_named() {
        for f in [DiskFormat::Raw, DiskFormat::Qcow2] {
            assert_eq!(f.as_str().parse::<DiskFormat>().unwrap(), f);
            let j = serde_json::to_string(&f).unwrap();
            assert_eq!(j, format!("\"{f}\""));
        }
        let e = "vmdk".parse::<DiskFormat>().unwrap_err();
        assert!(e.to_string().contains("vmdk"), "{e}");
        let e = serde_json::from_str::<DiskFormat>("\"vmdk\"").unwrap_err();
        assert!(e.to_string().contains("vmdk"), "{e}");
    }
}
