//! Shared vocabulary of Cairn: ids and digests as newtypes, byte extents, the disk
//! vocabulary every role shares ([`DiskFormat`]), the file model ([`FileKind`],
//! [`FileExtent`]), and the [`ReadAt`] trait through which
//! every role reads disk images.
//!
//! This crate depends on nothing of ours. Everything here is plain data; nothing does I/O
//! except the `ReadAt` implementations for files.

mod disk;
pub mod durable;
mod extent;
pub mod fault;
mod file;
mod id;
mod read_at;
pub mod time;

pub use disk::{DiskFormat, UnknownFormat};
pub use extent::{Extent, ExtentList, ExtentParseError};
pub use file::{CompressedExtent, Compression, FileExtent, FileKind};
pub use id::{ContainerId, Digest, IdParseError, SessionId, SnapshotId};
pub use read_at::ReadAt;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A name that is safe as an id, a URL path segment and a file name alike: 1 to 64 of
/// `A-Z a-z 0-9 . _ -`, not starting with a dot. VM, agent, schedule and job names use it.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod name_tests {
    #[test]
    fn plain_names() {
        for ok in ["vm1", "web-1.example_x", "a"] {
            assert!(super::is_plain_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "é", &"x".repeat(65)] {
            assert!(!super::is_plain_name(bad), "{bad}");
        }
    }
}
