//! The vault's error type.

use cairn_chunk::{CodecError, FormatError};
use cairn_types::{ContainerId, Digest};

use crate::store::{StoreError, StoreErrorKind};

/// Everything that can go wrong in the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {what}")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("container {container}: {source}")]
    Format {
        container: ContainerId,
        #[source]
        source: FormatError,
    },
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// A run of the local index cache failed its checksums; the repository rebuilds it.
    #[error("index run {path} is damaged: {what}")]
    IndexDamaged { path: String, what: String },
    #[error("segment {digest:?} in container {container} at offset {offset}: {source}")]
    Segment {
        digest: Digest,
        container: ContainerId,
        offset: u32,
        #[source]
        source: CodecError,
    },
    #[error("segment {0:?} is not in the vault")]
    MissingSegment(Digest),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("repository is locked: {0}")]
    Locked(String),
    /// A retention lock forbids forgetting the snapshot before `until`.
    #[error(
        "snapshot {snapshot} is under a retention lock until {}: it cannot be forgotten before",
        crate::retention::describe(*until)
    )]
    RetentionLocked { snapshot: String, until: u64 },
    /// A request to set a lock earlier than the one in force.
    #[error(
        "snapshot {snapshot} is locked until {}: a retention lock can be extended, never \
         shortened (asked for {})",
        crate::retention::describe(*until),
        crate::retention::describe(*asked)
    )]
    RetentionShortened {
        snapshot: String,
        until: u64,
        asked: u64,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("vault service: {message}")]
    Remote {
        kind: cairn_http::ErrorKind,
        message: String,
    },
    #[error("not a Cairn repository ({0})")]
    NotARepository(String),
    /// The passphrase or key file does not open this repository's key.
    #[error("wrong passphrase or key file for this repository{0}")]
    WrongKey(String),
    /// An encrypted repository was opened without a passphrase or key file where one is needed.
    #[error("repository {0} is encrypted: give its passphrase (CAIRN_PASSWORD) or --key-file")]
    KeyNeeded(String),
    /// A key file that cannot be read as one.
    #[error("key file {path}: {reason}")]
    BadKeyFile { path: String, reason: String },
}

impl VaultError {
    pub(crate) fn io(
        path: impl std::fmt::Display,
        what: &'static str,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            path: path.to_string(),
            what,
            source,
        }
    }

    /// The API error a service reports for this error.
    pub fn to_api(&self) -> cairn_http::ApiError {
        use cairn_http::ErrorKind as K;
        let kind = match self {
            _ if self.is_no_space() => K::InsufficientStorage,
            Self::SnapshotNotFound(_) | Self::MissingSegment(_) => K::NotFound,
            Self::Invalid(_) | Self::BadKeyFile { .. } => K::BadRequest,
            Self::WrongKey(_) | Self::KeyNeeded(_) => K::BadRequest,
            Self::Locked(_) | Self::RetentionLocked { .. } | Self::RetentionShortened { .. } => {
                K::Conflict
            }
            Self::Corrupt(_)
            | Self::IndexDamaged { .. }
            | Self::Segment { .. }
            | Self::Format { .. } => K::Corrupt,
            Self::Remote { kind, .. } => *kind,
            _ => K::Internal,
        };
        cairn_http::ApiError::new(kind, self.to_string())
    }

    /// True when the store ran out of space.
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::Store(e) => e.kind == StoreErrorKind::NoSpace,
            Self::Io { source, .. } => {
                source.kind() == std::io::ErrorKind::StorageFull
                    || source.raw_os_error() == Some(libc::ENOSPC)
            }
            Self::Remote { kind, .. } => *kind == cairn_http::ErrorKind::InsufficientStorage,
            _ => false,
        }
    }
}

pub type Result<T, E = VaultError> = std::result::Result<T, E>;
