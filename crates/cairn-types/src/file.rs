//! The file model every role shares: what a file is and where its bytes lie on a disk image.
//! `cairn-fs` produces it, the storage agent sends it, the file index stores it.

use crate::Extent;

/// Kind of a directory entry. On the wire: `"File"`, `"Dir"`, `"Symlink"`, `"Other"`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum FileKind {
    #[default]
    File,
    Dir,
    Symlink,
    /// Device node, FIFO, socket, or an NTFS reparse point that is not a link.
    Other,
}

/// A run of file bytes stored contiguously on the disk image.
///
/// Bytes `[file_offset, file_offset + length)` of the file are at
/// `[disk_offset, disk_offset + length)` of the **disk image** (partition offset included).
/// File ranges not covered by any extent read as zeros (holes, unwritten extents).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FileExtent {
    pub file_offset: u64,
    pub disk_offset: u64,
    pub length: u64,
}

impl FileExtent {
    /// The disk byte range as an [`Extent`].
    pub fn disk(&self) -> Extent {
        Extent::new(self.disk_offset, self.length)
    }
}
