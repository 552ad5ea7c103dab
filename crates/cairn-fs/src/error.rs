//! The one error type of this crate: a small kind enum plus context.

use std::fmt;
use std::io;

/// What went wrong, coarsely; callers branch on this, humans read [`Error`]'s message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The source could not be read.
    Io,
    /// The bytes do not follow the format (damaged or hostile image).
    Corrupt,
    /// A [`crate::Limits`] bound was reached.
    Limit,
    /// A valid feature this reader does not implement (e.g. encryption, compression).
    Unsupported,
    /// No such partition, file system or path.
    NotFound,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Io => "read error",
            Self::Corrupt => "corrupt",
            Self::Limit => "limit reached",
            Self::Unsupported => "unsupported",
            Self::NotFound => "not found",
        })
    }
}

/// An error with its kind and where it happened (structure, offset, path).
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {context}")]
pub struct Error {
    pub kind: ErrorKind,
    /// What was being read, e.g. `ext4 inode 12 extent tree` or `GPT header at 512`.
    pub context: String,
    #[source]
    pub source: Option<io::Error>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    pub(crate) fn corrupt(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, context)
    }

    pub(crate) fn limit(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Limit, context)
    }

    pub(crate) fn unsupported(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, context)
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        // A read past the end of the source is a damaged (truncated) image, not an I/O fault.
        let kind = if source.kind() == io::ErrorKind::UnexpectedEof {
            ErrorKind::Corrupt
        } else {
            ErrorKind::Io
        };
        Self {
            kind,
            context: context.into(),
            source: Some(source),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
