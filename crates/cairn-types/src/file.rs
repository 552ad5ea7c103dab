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

/// How a [`CompressedExtent`] is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// One zlib stream (RFC 1950).
    Zlib,
    /// One zstd frame.
    Zstd,
    /// btrfs's framing of LZO1X segments; a segment length never straddles a boundary of
    /// `sector` bytes.
    BtrfsLzo { sector: u32 },
}

/// File bytes `[file_offset, file_offset + length)` are bytes `[skip, skip + length)` of the
/// decompression of disk bytes `[disk_offset, disk_offset + disk_length)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CompressedExtent {
    pub file_offset: u64,
    pub length: u64,
    /// Image byte offset of the compressed data (partition offset included).
    pub disk_offset: u64,
    pub disk_length: u64,
    pub compression: Compression,
    /// Decompressed length as the file system states it; decompressing past it is an error,
    /// decompressing to less reads the rest as zeros.
    pub decompressed_len: u64,
    pub skip: u64,
}
