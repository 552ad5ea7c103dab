//! Leaf item payloads: inodes, directory entries, file extents, subvolume roots.
//!
//! Every parser checks the payload length before reading a field; a short or inconsistent
//! item is `Corrupt`.

use super::tree::Key;
use crate::format::*;
use crate::util::{le16, le32, le64};
use crate::{Error, FileKind, Result};

fn short(what: &str, len: usize) -> Error {
    Error::corrupt(format!("btrfs {what} item of {len} bytes"))
}

/// A btrfs timestamp (signed seconds, nanoseconds) in nanoseconds since the epoch.
fn time(b: &[u8], at: usize) -> i64 {
    let secs = le64(b, at).cast_signed();
    let ns = i64::from(le32(b, at + 8).min(999_999_999));
    secs.saturating_mul(1_000_000_000).saturating_add(ns)
}

/// `INODE_ITEM`.
pub(crate) struct InodeItem {
    pub size: u64,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub atime: i64,
    pub ctime: i64,
    pub mtime: i64,
    pub otime: i64,
}

impl InodeItem {
    pub(crate) fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < BTRFS_INODE_ITEM_LEN {
            return Err(short("inode", b.len()));
        }
        Ok(Self {
            size: le64(b, 16),
            nlink: le32(b, 40),
            uid: le32(b, 44),
            gid: le32(b, 48),
            mode: le32(b, 52),
            atime: time(b, 112),
            ctime: time(b, 124),
            mtime: time(b, 136),
            otime: time(b, 148),
        })
    }

    pub(crate) fn kind(&self) -> FileKind {
        match self.mode & 0o170000 {
            0o100000 => FileKind::File,
            0o040000 => FileKind::Dir,
            0o120000 => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }
}

/// One name in a directory (`DIR_INDEX`, or one of the entries packed in a `DIR_ITEM`).
#[derive(Debug)]
pub(crate) struct DirEntry {
    /// An `INODE_ITEM` key (an inode of the same tree) or a `ROOT_ITEM` key (a subvolume).
    pub location: Key,
    pub name: Vec<u8>,
}

/// Appends the entries packed in one `DIR_ITEM` / `DIR_INDEX` payload to `out`.
pub(crate) fn parse_dir(b: &[u8], out: &mut Vec<DirEntry>) -> Result<()> {
    let mut at = 0;
    while at < b.len() {
        let h = &b[at..];
        if h.len() < BTRFS_DIR_ITEM_HEADER_LEN {
            return Err(short("directory", b.len()));
        }
        let data_len = usize::from(le16(h, 25));
        let name_len = usize::from(le16(h, 27));
        let end = BTRFS_DIR_ITEM_HEADER_LEN + name_len + data_len;
        if end > h.len() {
            return Err(short("directory", b.len()));
        }
        out.push(DirEntry {
            location: Key::parse(h),
            name: h[BTRFS_DIR_ITEM_HEADER_LEN..BTRFS_DIR_ITEM_HEADER_LEN + name_len].to_vec(),
        });
        at += end;
    }
    Ok(())
}

/// `EXTENT_DATA`.
pub(crate) enum ExtentItem<'a> {
    /// Data stored in the item itself (compressed when `compression` is not 0).
    Inline {
        compression: u8,
        ram_bytes: u64,
        data: &'a [u8],
    },
    /// Data in a disk extent; `disk_bytenr` 0 is a hole.
    Regular {
        compression: u8,
        prealloc: bool,
        ram_bytes: u64,
        disk_bytenr: u64,
        disk_num_bytes: u64,
        offset: u64,
        num_bytes: u64,
    },
}

impl<'a> ExtentItem<'a> {
    pub(crate) fn parse(b: &'a [u8]) -> Result<Self> {
        if b.len() < BTRFS_FILE_EXTENT_INLINE_HEADER {
            return Err(short("file extent", b.len()));
        }
        let (ram_bytes, compression) = (le64(b, 8), b[16]);
        if b[17] != 0 || le16(b, 18) != 0 {
            return Err(Error::unsupported("btrfs encrypted or encoded file extent"));
        }
        match b[20] {
            BTRFS_FILE_EXTENT_INLINE => Ok(Self::Inline {
                compression,
                ram_bytes,
                data: &b[BTRFS_FILE_EXTENT_INLINE_HEADER..],
            }),
            t @ (BTRFS_FILE_EXTENT_REG | BTRFS_FILE_EXTENT_PREALLOC) => {
                if b.len() < BTRFS_FILE_EXTENT_REG_LEN {
                    return Err(short("file extent", b.len()));
                }
                Ok(Self::Regular {
                    compression,
                    prealloc: t == BTRFS_FILE_EXTENT_PREALLOC,
                    ram_bytes,
                    disk_bytenr: le64(b, 21),
                    disk_num_bytes: le64(b, 29),
                    offset: le64(b, 37),
                    num_bytes: le64(b, 45),
                })
            }
            t => Err(Error::corrupt(format!("btrfs file extent type {t}"))),
        }
    }
}

/// `ROOT_ITEM`: where a tree's root node is.
pub(crate) struct RootItem {
    pub bytenr: u64,
    pub level: u8,
    pub refs: u32,
}

impl RootItem {
    pub(crate) fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < BTRFS_ROOT_ITEM_MIN_LEN {
            return Err(short("root", b.len()));
        }
        Ok(Self {
            bytenr: le64(b, 176),
            level: b[238],
            refs: le32(b, 216),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_dir_items_and_short_ones() {
        let mut b = Vec::new();
        for name in [&b"a"[..], b"bcd"] {
            let mut h = [0u8; BTRFS_DIR_ITEM_HEADER_LEN];
            h[..8].copy_from_slice(&257u64.to_le_bytes());
            h[8] = BTRFS_INODE_ITEM_KEY;
            h[27..29].copy_from_slice(&u16::try_from(name.len()).unwrap().to_le_bytes());
            b.extend_from_slice(&h);
            b.extend_from_slice(name);
        }
        let mut out = Vec::new();
        parse_dir(&b, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].name, b"bcd");
        assert_eq!(out[0].location, Key::new(257, BTRFS_INODE_ITEM_KEY, 0));
        assert!(parse_dir(&b[..b.len() - 1], &mut Vec::new()).is_err());
    }

    #[test]
    fn times_saturate() {
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes()); // -1 s
        b[8..].copy_from_slice(&5u32.to_le_bytes());
        assert_eq!(time(&b, 0), -1_000_000_000 + 5);
        b[..8].copy_from_slice(&i64::MAX.cast_unsigned().to_le_bytes());
        assert_eq!(time(&b, 0), i64::MAX);
    }
}
