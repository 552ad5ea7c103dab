//! The primary superblock: geometry, version and features, and the address arithmetic they
//! define (inode numbers and file-system block numbers → partition byte offsets).

use super::disk::{be16, be32, be64, check_crc};
use crate::format::*;
use crate::{Error, Result};

/// Smallest and largest block and sector sizes the format allows.
const MIN_BLOCK: u64 = 512;
const MAX_BLOCK: u64 = 64 << 10;
const MAX_SECTOR: u64 = 32 << 10;

#[derive(Debug)]
pub(super) struct Super {
    pub block_size: u64,
    pub block_log: u32,
    pub dblocks: u64,
    pub agblocks: u64,
    pub agcount: u64,
    pub agblklog: u32,
    pub inopblog: u32,
    pub inode_size: u64,
    pub root_ino: u64,
    /// File-system block of the internal log; 0 when the log is on another device.
    pub log_start: u64,
    pub log_blocks: u64,
    /// Directory blocks are `block_size << dir_blk_log` bytes.
    pub dir_blk_log: u32,
    /// Version 5: CRC-enabled metadata with self-describing headers.
    pub v5: bool,
    /// Directory entries carry a file-type byte.
    pub ftype: bool,
    /// Some blocks are on a realtime device this reader does not have.
    pub has_realtime: bool,
}

/// Whether `b` (at least the first 512 bytes of a partition) starts with an XFS superblock.
pub(crate) fn probe(b: &[u8]) -> bool {
    let version = be16(b, 100) & XFS_SB_VERSION_NUMBITS;
    be32(b, 0) == XFS_SB_MAGIC && (XFS_SB_VERSION_4..=XFS_SB_VERSION_5).contains(&version)
}

fn log2_exact(v: u64, log: u8) -> bool {
    v.is_power_of_two() && v.trailing_zeros() == u32::from(log)
}

impl Super {
    /// The sector size declared by a superblock whose first 512 bytes are `b` (so the caller
    /// can read the whole sector the checksum covers).
    pub fn sector_size(b: &[u8]) -> u64 {
        u64::from(be16(b, 102)).clamp(XFS_LOG_BBSIZE, MAX_SECTOR)
    }

    /// Parses and validates the superblock sector `b`; a v5 superblock's CRC must match.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if be32(b, 0) != XFS_SB_MAGIC {
            return Err(Error::corrupt("XFS superblock magic"));
        }
        let versionnum = be16(b, 100);
        let version = versionnum & XFS_SB_VERSION_NUMBITS;
        let v5 = match version {
            XFS_SB_VERSION_5 => true,
            XFS_SB_VERSION_4 => false,
            v => return Err(Error::unsupported(format!("XFS superblock version {v}"))),
        };
        if v5 {
            check_crc(b, XFS_SB_CRC_OFFSET, &|| "XFS superblock".into())?;
        }
        let features2 = if versionnum & XFS_SB_VERSION_MOREBITS != 0 {
            be32(b, 200)
        } else {
            0
        };
        let incompat = if v5 { be32(b, 216) } else { 0 };
        if !v5 && features2 & XFS_SB_FEATURES2_CRC != 0 {
            return Err(Error::corrupt("XFS v4 superblock with the CRC feature"));
        }
        if incompat & !XFS_SB_INCOMPAT_KNOWN != 0 {
            return Err(Error::unsupported(format!(
                "XFS incompatible features {:#x}",
                incompat & !XFS_SB_INCOMPAT_KNOWN
            )));
        }
        let block_size = u64::from(be32(b, 4));
        let sect_size = u64::from(be16(b, 102));
        let inode_size = u64::from(be16(b, 104));
        let inopblock = u64::from(be16(b, 106));
        let (block_log, sect_log, inode_log, inopblog, agblklog) =
            (b[120], b[121], b[122], b[123], b[124]);
        let agblocks = u64::from(be32(b, 84));
        let agcount = u64::from(be32(b, 88));
        let dblocks = be64(b, 8);
        let dir_blk_log = u32::from(b[192]);
        let min_inode = if v5 { 512 } else { 256 };
        let geometry_ok = (MIN_BLOCK..=MAX_BLOCK).contains(&block_size)
            && log2_exact(block_size, block_log)
            && (XFS_LOG_BBSIZE..=MAX_SECTOR).contains(&sect_size)
            && log2_exact(sect_size, sect_log)
            && (min_inode..=2048).contains(&inode_size)
            && inode_size <= block_size
            && log2_exact(inode_size, inode_log)
            && inopblock == block_size / inode_size
            && log2_exact(inopblock, inopblog)
            && agblocks >= 5
            && agblklog <= 31
            && agblocks <= 1 << agblklog
            && agblocks > (1 << agblklog) >> 1
            && agcount > 0
            && dblocks > (agcount - 1) * agblocks
            && dblocks <= agcount * agblocks
            && block_size << dir_blk_log.min(16) <= MAX_BLOCK;
        if !geometry_ok {
            return Err(Error::corrupt("XFS superblock geometry"));
        }
        Ok(Self {
            block_size,
            block_log: u32::from(block_log),
            dblocks,
            agblocks,
            agcount,
            agblklog: u32::from(agblklog),
            inopblog: u32::from(inopblog),
            inode_size,
            root_ino: be64(b, 56),
            log_start: be64(b, 48),
            log_blocks: u64::from(be32(b, 96)),
            dir_blk_log,
            v5,
            ftype: if v5 {
                incompat & XFS_SB_INCOMPAT_FTYPE != 0
            } else {
                features2 & XFS_SB_FEATURES2_FTYPE != 0
            },
            has_realtime: be64(b, 16) != 0,
        })
    }

    /// Byte offset in the partition of file-system block `fsb` (AG number in the high bits),
    /// checking that `count` blocks from there stay inside its allocation group.
    pub fn fsb_to_byte(&self, fsb: u64, count: u64) -> Option<u64> {
        let agno = fsb >> self.agblklog;
        let agbno = fsb & ((1u64 << self.agblklog) - 1);
        let end = agbno.checked_add(count)?;
        // The last AG may be shorter than the others: dblocks bounds it.
        if agno >= self.agcount || end > self.agblocks || agno * self.agblocks + end > self.dblocks
        {
            return None;
        }
        (agno * self.agblocks + agbno).checked_mul(self.block_size)
    }

    /// Byte offset in the partition of inode `ino` (AG, block in the AG, index in the block).
    pub fn inode_byte(&self, ino: u64) -> Option<u64> {
        let index = ino & ((1u64 << self.inopblog) - 1);
        let fsb = ino >> self.inopblog;
        let block = self.fsb_to_byte(fsb, 1)?;
        Some(block + index * self.inode_size)
    }

    /// Directory block size in bytes.
    pub fn dir_block_size(&self) -> u64 {
        self.block_size << self.dir_blk_log
    }
}
