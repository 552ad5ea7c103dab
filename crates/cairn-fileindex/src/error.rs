//! The file index's error type: a small kind enum plus the context (file, offset, backup id).

use std::path::PathBuf;

/// What kind of failure an [`IndexError`] is, for callers that branch on it (an API layer
/// maps these to status codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// An operating-system I/O error; possibly transient.
    Io,
    /// A file of the index does not follow its format or fails its checksum.
    Corrupt,
    /// Another process holds the index.
    Locked,
    /// The named backup is not in the index.
    NotFound,
    /// The caller's input was refused (bad path, duplicate id, limit exceeded).
    Invalid,
    /// The caller's record source failed; nothing was stored.
    Source,
}

/// Everything that can go wrong in the file index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: corrupt at offset {offset}: {reason}")]
    Corrupt {
        /// File name inside the index directory.
        file: String,
        /// Byte offset in the file (or in the decompressed section) where decoding stopped.
        offset: u64,
        reason: String,
    },
    #[error("file index {0} is locked by another process")]
    Locked(PathBuf),
    #[error("backup {0:?} is not in the file index")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("record source failed")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl IndexError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io { .. } => ErrorKind::Io,
            Self::Corrupt { .. } => ErrorKind::Corrupt,
            Self::Locked(_) => ErrorKind::Locked,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Invalid(_) => ErrorKind::Invalid,
            Self::Source(_) => ErrorKind::Source,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, what: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            what,
            source,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

/// A decoding failure before the file name is known; [`DecodeError::in_file`] adds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub offset: u64,
    pub reason: String,
}

impl DecodeError {
    pub(crate) fn new(offset: u64, reason: impl Into<String>) -> Self {
        Self {
            offset,
            reason: reason.into(),
        }
    }

    /// Attaches the file name.
    pub fn in_file(self, file: impl Into<String>) -> IndexError {
        IndexError::Corrupt {
            file: file.into(),
            offset: self.offset,
            reason: self.reason,
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at offset {}: {}", self.offset, self.reason)
    }
}

/// Result with [`IndexError`].
pub type Result<T, E = IndexError> = std::result::Result<T, E>;
