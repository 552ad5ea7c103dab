//! Object stores: where the vault keeps its objects (containers, snapshot manifests, locks,
//! the repository config).
//!
//! # Contract of [`ObjectStore`]
//!
//! | call | contract |
//! |---|---|
//! | `put` | atomic and durable: once it returns `Ok`, the whole object is stored and survives a crash; a reader never sees a partial object. Overwrites an existing object. |
//! | `put_new` | like `put`, but fails with [`StoreErrorKind::AlreadyExists`] if the key exists (best effort on stores that cannot enforce it, see [`Capabilities::exclusive_create`]). |
//! | `get`, `get_range` | [`StoreErrorKind::NotFound`] for a missing key; a range past the end is an error, never a short read. |
//! | `list` | every key under a prefix, in no particular order, with its size and (where the store keeps it) the time it was written. |
//! | `delete` | idempotent: deleting a missing key succeeds. |
//! | `remove_leftovers` | removes only what interrupted writes left (never an object `list` shows). |
//! | `protect` | best effort: makes the object undeletable and unchangeable by means outside the vault until `until` (or until `release`); answers whether the store did. Never changes the object's bytes. |
//! | `release` | undoes `protect` where the store can (a store whose protection holds until its time, such as S3 object lock, cannot: the vault only releases objects whose retention has expired). |
//!
//! Errors carry a kind; [`StoreErrorKind::Transient`] errors may be retried by the caller.
//! Nothing outside a backend may assume that keys are local files.
//!
//! Every backend passes the one conformance suite in [`conformance`].

pub mod conformance;
mod direct;
mod local;
pub mod s3;

pub use local::LocalStore;
pub use s3::{S3Config, S3Store};

use std::fmt;

/// A key: `/`-separated segments of `[A-Za-z0-9._-]`, never empty, never `..`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Checks and builds a key.
    pub fn new(s: impl Into<String>) -> Result<Self, StoreError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= 512
            && s.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            });
        if ok {
            Ok(Self(s))
        } else {
            Err(StoreError::new(
                StoreErrorKind::InvalidKey,
                &s,
                "invalid object key",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.0)
    }
}

/// What went wrong in a store, as data a caller can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    NotFound,
    AlreadyExists,
    InvalidKey,
    /// The store is out of space.
    NoSpace,
    /// Worth retrying (timeouts, throttling).
    Transient,
    Other,
}

/// An error of an object store, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("object {key}: {msg}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub key: String,
    pub msg: String,
    #[source]
    pub source: Option<std::io::Error>,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, key: &str, msg: impl Into<String>) -> Self {
        Self {
            kind,
            key: key.to_string(),
            msg: msg.into(),
            source: None,
        }
    }

    pub(crate) fn io(key: &str, what: &str, e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => StoreErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => StoreErrorKind::AlreadyExists,
            std::io::ErrorKind::StorageFull => StoreErrorKind::NoSpace,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => {
                StoreErrorKind::Transient
            }
            _ if e.raw_os_error() == Some(libc::ENOSPC)
                || e.raw_os_error() == Some(libc::EDQUOT) =>
            {
                StoreErrorKind::NoSpace
            }
            _ => StoreErrorKind::Other,
        };
        let msg = match kind {
            StoreErrorKind::NoSpace => format!("{what}: no space left on the store"),
            _ => what.to_string(),
        };
        Self {
            kind,
            key: key.to_string(),
            msg,
            source: Some(e),
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == StoreErrorKind::NotFound
    }
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: Key,
    pub size: u64,
    /// When it was last written (Unix seconds), where the store says.
    pub modified: Option<u64>,
}

/// What a store can do, as data (never `match` on a backend's type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// `put_new` is enforced atomically.
    pub exclusive_create: bool,
    /// Objects are local files (enables `fsync`-based durability and fast range reads).
    pub local: bool,
}

/// A flat namespace of immutable-ish objects. See the module docs for the contract.
pub trait ObjectStore: Send + Sync + fmt::Debug {
    fn put(&self, key: &Key, data: &[u8]) -> Result<(), StoreError>;
    fn put_new(&self, key: &Key, data: &[u8]) -> Result<(), StoreError>;
    fn get(&self, key: &Key) -> Result<Vec<u8>, StoreError>;
    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>, StoreError>;
    fn size(&self, key: &Key) -> Result<u64, StoreError>;
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;
    fn delete(&self, key: &Key) -> Result<(), StoreError>;
    fn capabilities(&self) -> Capabilities;
    /// Removes what interrupted writes left behind, if the store leaves anything (at least
    /// `min_age` old); returns how many objects it removed. Called by GC under the
    /// exclusive lock.
    fn remove_leftovers(&self, min_age: std::time::Duration) -> Result<usize, StoreError> {
        let _ = min_age;
        Ok(0)
    }
    /// Protects `key` against change and deletion until `until` (Unix seconds), where the
    /// store can; `Ok(false)` where it cannot (the vault's own retention rules still hold).
    fn protect(&self, key: &Key, until: u64) -> Result<bool, StoreError> {
        let _ = (key, until);
        Ok(false)
    }
    /// Lifts [`ObjectStore::protect`] so that the vault can delete or replace the object.
    fn release(&self, key: &Key) -> Result<(), StoreError> {
        let _ = key;
        Ok(())
    }
    /// A human-readable location, for messages.
    fn location(&self) -> String;
}
