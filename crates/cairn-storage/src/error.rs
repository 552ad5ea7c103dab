//! Typed errors of the storage agent.

use std::path::PathBuf;

use cairn_http::{ApiError, ErrorKind};

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything the storage agent can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file-system call on `path` failed.
    #[error("{op} {}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// An external tool (`qemu-img`, `qemu-nbd`) could not be run or failed.
    #[error("{tool} {args}: {message}")]
    Tool {
        tool: &'static str,
        args: String,
        message: String,
    },
    /// Output of a tool or a stored file did not parse.
    #[error("cannot parse {what}: {message}")]
    Parse { what: String, message: String },
    /// An NBD request to a `qemu-nbd` export failed.
    #[error("NBD export of {}", path.display())]
    Nbd {
        path: PathBuf,
        #[source]
        source: Box<cairn_nbd::Error>,
    },
    /// The vault refused or failed.
    #[error("vault")]
    Vault(#[source] Box<cairn_vault::VaultError>),
    /// The provider cannot do this on that storage (e.g. reflinks on ext4).
    #[error("{provider}: {message}")]
    Unsupported {
        provider: &'static str,
        message: String,
    },
    /// Change tracking is missing or cannot be trusted (lost bitmap, failed cross-check).
    #[error("change tracking ({source_kind}) unusable: {message}")]
    Tracking {
        source_kind: cairn_api::storage::ChangeSource,
        message: String,
    },
    /// A region the tracker called unchanged differs from the parent backup.
    #[error(
        "cross-check: {source_kind} called bytes {offset}..{} unchanged, but they differ from the parent",
        offset + len
    )]
    TrackingMismatch {
        source_kind: cairn_api::storage::ChangeSource,
        offset: u64,
        len: u64,
    },
    /// A qcow2 image's header or tables cannot be used to map changes (the tracker falls back).
    #[error("qcow2 image {}", path.display())]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: Qcow2Error,
    },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Why the tables of a qcow2 image (or of two clones of it) cannot be trusted to map host
/// changes to guest offsets, or why the writer refuses an image. Never a panic: hostile or
/// corrupt images end here.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// A structure lies (partly) beyond the end of the file.
    #[error("{what} at bytes {offset}..{end} lies beyond the end of the file ({len} bytes)")]
    Truncated {
        what: &'static str,
        offset: u64,
        end: u64,
        len: u64,
    },
    #[error("not a qcow2 image (magic {0:#010x})")]
    Magic(u32),
    /// A valid feature this mapper does not handle (backing file, external data file, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A field out of its valid range.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The two clones differ in a way that makes their tables incomparable.
    #[error("the clones differ in {0}")]
    Incomparable(String),
    /// The writer was handed guest bytes outside the clusters it planned.
    #[error("guest bytes {offset}..{end} lie outside the planned clusters")]
    NotPlanned { offset: u64, end: u64 },
    #[error("read {what} at {offset}")]
    Read {
        what: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

impl From<cairn_vault::VaultError> for StorageError {
    fn from(e: cairn_vault::VaultError) -> Self {
        Self::Vault(Box::new(e))
    }
}

impl StorageError {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        op: &'static str,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, op, source }
    }

    /// The datastore (or a file system the agent writes to) is full: a write through
    /// `qemu-nbd` answered `ENOSPC`, or a file write did.
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::Nbd { source, .. } => matches!(
                **source,
                cairn_nbd::Error::Server { errno, .. } if errno == cairn_nbd::proto::ENOSPC
            ),
            Self::Io { source, .. } => {
                source.kind() == std::io::ErrorKind::StorageFull
                    || source.raw_os_error() == Some(libc::ENOSPC)
            }
            _ => false,
        }
    }

    /// The error as the service reports it.
    pub fn to_api(&self) -> ApiError {
        let kind = match self {
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Invalid(_) | Self::Unsupported { .. } => ErrorKind::BadRequest,
            Self::Vault(v) => v.to_api().kind,
            Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            _ if self.is_no_space() => ErrorKind::InsufficientStorage,
            _ => ErrorKind::Internal,
        };
        ApiError::new(kind, cairn_http::chain(self))
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        e.to_api()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_datastore_is_insufficient_storage_not_an_internal_error() {
        let full = StorageError::Nbd {
            path: "/ds/.a.qcow2.cairn-partial".into(),
            source: Box::new(cairn_nbd::Error::Server {
                errno: cairn_nbd::proto::ENOSPC,
                command: 1,
                offset: 0,
                len: 4096,
                error_offset: None,
                message: String::new(),
            }),
        };
        assert_eq!(full.to_api().kind, ErrorKind::InsufficientStorage);
        let io =
            StorageError::io("/ds/a", "write")(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(io.to_api().kind, ErrorKind::InsufficientStorage);
        let other =
            StorageError::io("/ds/a", "write")(std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(other.to_api().kind, ErrorKind::Internal);
    }
}
