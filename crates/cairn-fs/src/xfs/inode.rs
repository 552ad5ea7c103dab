//! On-disk inodes (`xfs_dinode`): v1/v2 cores (v4 file systems) and v3 cores with CRC,
//! creation time and bigtime timestamps (v5), and the bounds of the data fork.

use super::disk::{be16, be32, be64, check_crc};
use super::sb::Super;
use crate::format::*;
use crate::{Error, FileKind, Result};

/// The parts of an on-disk inode the reader uses.
#[derive(Debug)]
pub(super) struct Dinode {
    pub mode: u16,
    pub format: u8,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub crtime: Option<i64>,
    pub size: u64,
    /// Data-fork extent records (extents format) as the inode counts them.
    pub nextents: u64,
    pub realtime: bool,
    /// The data fork: inline bytes, extent records or the bmbt root.
    pub fork: Vec<u8>,
}

/// Nanoseconds since the Unix epoch of an 8-byte XFS timestamp.
pub(super) fn xfs_time(raw: u64, bigtime: bool) -> i64 {
    if bigtime {
        // Unsigned nanoseconds counted from −2^31 s.
        let secs = (raw / 1_000_000_000).cast_signed() - XFS_BIGTIME_EPOCH_OFFSET;
        let ns = (raw % 1_000_000_000).cast_signed();
        return secs.saturating_mul(1_000_000_000).saturating_add(ns);
    }
    #[allow(clippy::cast_possible_truncation)] // the two 32-bit halves
    let (secs, ns) = ((raw >> 32) as u32, raw as u32);
    i64::from(secs.cast_signed())
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(ns.min(999_999_999)))
}

impl Dinode {
    /// Parses inode `ino` from its `sb.inode_size` bytes; checks magic, version, v5 CRC and
    /// self-reference.
    pub fn parse(b: &[u8], ino: u64, sb: &Super) -> Result<Self> {
        let what = || format!("XFS inode {ino}");
        if be16(b, 0) != XFS_DINODE_MAGIC {
            return Err(Error::corrupt(format!("{}: bad magic", what())));
        }
        let version = b[4];
        let core_len = match (sb.v5, version) {
            (true, 3) => XFS_DINODE_CORE_V3_LEN,
            (false, 1 | 2) => XFS_DINODE_CORE_V2_LEN,
            _ => {
                return Err(Error::corrupt(format!(
                    "{}: version {version} on a v{} file system",
                    what(),
                    if sb.v5 { 5 } else { 4 }
                )));
            }
        };
        if sb.v5 {
            check_crc(b, XFS_DINODE_CRC_OFFSET, &what)?;
            if be64(b, 152) != ino {
                return Err(Error::corrupt(format!(
                    "{}: records inode number {}",
                    what(),
                    be64(b, 152)
                )));
            }
        }
        let flags2 = if version == 3 { be64(b, 120) } else { 0 };
        let bigtime = flags2 & XFS_DIFLAG2_BIGTIME != 0;
        let nextents = if flags2 & XFS_DIFLAG2_NREXT64 != 0 {
            be64(b, 24)
        } else {
            u64::from(be32(b, 76))
        };
        // The literal area holds the data fork, then the attribute fork at forkoff * 8.
        let literal = b.len().saturating_sub(core_len);
        let forkoff = usize::from(b[82]) * 8;
        let fork_len = if forkoff == 0 { literal } else { forkoff };
        if fork_len > literal {
            return Err(Error::corrupt(format!("{}: fork offset {forkoff}", what())));
        }
        let size = be64(b, 56);
        if size > i64::MAX as u64 {
            return Err(Error::corrupt(format!("{}: size {size}", what())));
        }
        Ok(Self {
            mode: be16(b, 2),
            format: b[5],
            uid: be32(b, 8),
            gid: be32(b, 12),
            nlink: if version == 1 {
                u32::from(be16(b, 6))
            } else {
                be32(b, 16)
            },
            atime: xfs_time(be64(b, 32), bigtime),
            mtime: xfs_time(be64(b, 40), bigtime),
            ctime: xfs_time(be64(b, 48), bigtime),
            crtime: (version == 3).then(|| xfs_time(be64(b, 144), bigtime)),
            size,
            nextents,
            realtime: be16(b, 90) & XFS_DIFLAG_REALTIME != 0,
            fork: b[core_len..core_len + fork_len].to_vec(),
        })
    }

    pub fn kind(&self) -> FileKind {
        match self.mode & 0o170000 {
            0o100000 => FileKind::File,
            0o040000 => FileKind::Dir,
            0o120000 => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }

    /// Inline (local-format) content cut at the size; an error when the size exceeds the fork.
    pub fn local_bytes(&self, ino: u64) -> Result<&[u8]> {
        usize::try_from(self.size)
            .ok()
            .and_then(|n| self.fork.get(..n))
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "XFS inode {ino}: local size {} exceeds the fork",
                    self.size
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_classic_and_bigtime() {
        // Classic: signed seconds, nanoseconds.
        assert_eq!(xfs_time((5 << 32) | 7, false), 5_000_000_007);
        assert_eq!(xfs_time(0xFFFF_FFFF << 32, false), -1_000_000_000);
        // Bigtime: 0 is -2^31 s; 2^31 s + 1 ns after that is the Unix epoch + 1 ns.
        assert_eq!(xfs_time(0, true), -(1i64 << 31) * 1_000_000_000);
        assert_eq!(xfs_time((1u64 << 31) * 1_000_000_000 + 1, true), 1);
        // The largest value saturates instead of overflowing.
        assert_eq!(xfs_time(u64::MAX, true), i64::MAX);
    }
}
