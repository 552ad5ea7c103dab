//! Typed errors of the NBD client.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::proto;

/// What went wrong, in a few coarse classes a caller can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The transport failed (connect, read, write, EOF from the server).
    Io,
    /// The server broke the protocol; the connection is closed.
    Protocol,
    /// The server sent something larger than a configured limit; the connection is closed.
    LimitExceeded,
    /// A wait exceeded its timeout; the connection is closed.
    Timeout,
    /// The server refused an option during the handshake.
    OptionRejected,
    /// The server answered a request with an error value; the connection stays usable.
    Server,
    /// The export or server does not offer what was asked for (e.g. write to a read-only
    /// export, or a metadata context that was not negotiated).
    Unsupported,
    /// The caller's arguments are invalid (e.g. beyond the end of the export).
    InvalidArgument,
    /// The connection was closed earlier (by `disconnect` or by a previous fatal error).
    Closed,
}

/// An error of the NBD client.
///
/// Errors of kind [`ErrorKind::Server`], [`ErrorKind::InvalidArgument`] and
/// [`ErrorKind::Unsupported`] concern one request only; all others end the connection, and
/// every later request fails with a clone of the error that ended it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("NBD I/O error while {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("NBD protocol violation by server: {detail}")]
    Protocol { detail: String },
    #[error("NBD server exceeded limit on {what}: {got} > {max}")]
    LimitExceeded {
        what: &'static str,
        got: u64,
        max: u64,
    },
    #[error("NBD timeout after {after:?} while {op}")]
    Timeout { op: &'static str, after: Duration },
    #[error("NBD server rejected {} with {}{}", proto::option_name(*option), proto::reply_type_name(*reply), fmt_msg(message))]
    OptionRejected {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("NBD export {export:?} not found on server{}", fmt_msg(message))]
    ExportNotFound { export: String, message: String },
    #[error("NBD server error {} ({errno}) for {} offset {offset} length {len}{}{}",
        proto::errno_name(*errno), proto::command_name(*command),
        error_offset.map(|o| format!(" at offset {o}")).unwrap_or_default(), fmt_msg(message))]
    Server {
        errno: u32,
        command: u16,
        offset: u64,
        len: u64,
        error_offset: Option<u64>,
        message: String,
    },
    #[error("NBD: unsupported: {what}")]
    Unsupported { what: String },
    #[error("NBD: invalid argument: {what}")]
    InvalidArgument { what: String },
    #[error("NBD connection closed")]
    Closed,
}

fn fmt_msg(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

impl Error {
    /// The coarse class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::LimitExceeded { .. } => ErrorKind::LimitExceeded,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::OptionRejected { .. } | Error::ExportNotFound { .. } => {
                ErrorKind::OptionRejected
            }
            Error::Server { .. } => ErrorKind::Server,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::Closed => ErrorKind::Closed,
        }
    }

    /// Whether this error ended the connection.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self.kind(),
            ErrorKind::Server | ErrorKind::InvalidArgument | ErrorKind::Unsupported
        )
    }

    pub(crate) fn io(op: &'static str, e: io::Error) -> Self {
        Error::Io {
            op,
            source: Arc::new(e),
        }
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        Error::Protocol {
            detail: detail.into(),
        }
    }

    pub(crate) fn limit(what: &'static str, got: u64, max: u64) -> Self {
        Error::LimitExceeded { what, got, max }
    }

    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into() }
    }

    pub(crate) fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported { what: what.into() }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
