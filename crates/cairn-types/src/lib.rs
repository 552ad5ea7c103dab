//! Shared vocabulary of Cairn: ids and digests as newtypes, byte extents, and the
//! [`ReadAt`] trait through which every role reads disk images.
//!
//! This crate depends on nothing of ours. Everything here is plain data; nothing does I/O
//! except the `ReadAt` implementations for files.

pub mod durable;
mod extent;
mod id;
mod read_at;

pub use extent::{Extent, ExtentList, ExtentParseError};
pub use id::{ContainerId, Digest, IdParseError, SessionId, SnapshotId};
pub use read_at::ReadAt;
