//! Where an inode's data is: extent trees, indirect block maps, inline data.
//!
//! Both mappers return [`Run`]s (logical block → physical block, count) sorted by logical
//! block, merged when contiguous, and bounded: at most `max_extents_per_file` runs and as
//! many tree or indirect blocks read, extent trees no deeper than `max_extent_depth`, and
//! every physical block inside the file system. Unwritten extents are left out (they read
//! as zeros, like holes).
//!
//! Tree and indirect blocks are *claimed* in a set shared by the whole walk: a block met a
//! second time (two inodes sharing a node, or a tree pointing back into itself) is corruption.
//! This bounds the mapping work of a walk by the size of the file system, whatever the image.

use std::cell::RefCell;
use std::collections::HashSet;

use crate::format::*;
use crate::util::{le16, le32};
use crate::{Error, Limits, Result};

use super::volume::Volume;

/// `count` blocks of the file starting at block `logical` are at block `phys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub logical: u64,
    pub phys: u64,
    pub count: u64,
}

pub(crate) struct Mapper<'v, 'a> {
    pub vol: &'v Volume<'a>,
    pub blocks_count: u64,
    pub limits: &'v Limits,
    pub ino: u32,
    claimed: &'v RefCell<HashSet<u64>>,
    runs: Vec<Run>,
    /// Tree / indirect blocks read so far.
    reads: usize,
}

impl<'v, 'a> Mapper<'v, 'a> {
    pub fn new(
        vol: &'v Volume<'a>,
        blocks_count: u64,
        limits: &'v Limits,
        ino: u32,
        claimed: &'v RefCell<HashSet<u64>>,
    ) -> Self {
        Self {
            vol,
            blocks_count,
            limits,
            ino,
            claimed,
            runs: Vec::new(),
            reads: 0,
        }
    }

    fn push(&mut self, logical: u64, phys: u64, count: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        if phys
            .checked_add(count)
            .is_none_or(|e| e > self.blocks_count)
            || phys == 0
        {
            return Err(Error::corrupt(format!(
                "ext inode {}: blocks {phys}+{count} outside the file system",
                self.ino
            )));
        }
        if let Some(last) = self.runs.last_mut()
            && last.logical + last.count == logical
            && last.phys + last.count == phys
        {
            last.count += count;
            return Ok(());
        }
        if self.runs.len() >= self.limits.max_extents_per_file {
            return Err(Error::limit(format!(
                "ext inode {}: more than max_extents_per_file runs",
                self.ino
            )));
        }
        self.runs.push(Run {
            logical,
            phys,
            count,
        });
        Ok(())
    }

    fn read_node(&mut self, block: u64) -> Result<Vec<u8>> {
        self.reads += 1;
        if self.reads > self.limits.max_extents_per_file {
            return Err(Error::limit(format!(
                "ext inode {}: too many mapping blocks",
                self.ino
            )));
        }
        if block == 0 || block >= self.blocks_count {
            return Err(Error::corrupt(format!(
                "ext inode {}: mapping block {block} outside the file system",
                self.ino
            )));
        }
        if !self.claimed.borrow_mut().insert(block) {
            return Err(Error::corrupt(format!(
                "ext inode {}: mapping block {block} is used twice",
                self.ino
            )));
        }
        let mut buf = vec![0u8; self.vol.block_len()];
        let ino = self.ino;
        self.vol.read_block(block, &mut buf, &|| {
            format!("ext inode {ino} mapping block")
        })?;
        Ok(buf)
    }

    /// Maps an extent-tree inode whose root is `i_block`; `max_blocks` bounds logical blocks.
    pub fn extents(mut self, i_block: &[u8], max_blocks: u64) -> Result<Vec<Run>> {
        let depth = u32::from(le16(i_block, 6));
        if depth > self.limits.max_extent_depth {
            return Err(Error::limit(format!(
                "ext inode {}: extent tree depth {depth}",
                self.ino
            )));
        }
        self.node(i_block, depth, max_blocks)?;
        self.runs.sort_by_key(|r| r.logical);
        for w in self.runs.windows(2) {
            if w[0].logical + w[0].count > w[1].logical {
                return Err(Error::corrupt(format!(
                    "ext inode {}: overlapping extents",
                    self.ino
                )));
            }
        }
        Ok(self.runs)
    }

    fn node(&mut self, buf: &[u8], depth: u32, max_blocks: u64) -> Result<()> {
        if le16(buf, 0) != EXT_EXTENT_MAGIC {
            return Err(Error::corrupt(format!(
                "ext inode {}: bad extent header magic",
                self.ino
            )));
        }
        let entries = le16(buf, 2) as usize;
        if u32::from(le16(buf, 6)) != depth || 12 + entries * 12 > buf.len() {
            return Err(Error::corrupt(format!(
                "ext inode {}: bad extent header (depth {}, {entries} entries)",
                self.ino,
                le16(buf, 6)
            )));
        }
        for i in 0..entries {
            let e = &buf[12 + i * 12..24 + i * 12];
            let logical = u64::from(le32(e, 0));
            if depth == 0 {
                let raw_len = le16(e, 4);
                let phys = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
                if raw_len > EXT_EXTENT_INIT_MAX_LEN {
                    continue; // unwritten: reads as zeros
                }
                let len = u64::from(raw_len).min(max_blocks.saturating_sub(logical));
                self.push(logical, phys, len)?;
            } else {
                let child = (u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4));
                let node = self.read_node(child)?;
                self.node(&node, depth - 1, max_blocks)?;
            }
        }
        Ok(())
    }

    /// Maps a classic (ext2/3) inode: 12 direct, then single, double, triple indirect.
    pub fn indirect(mut self, i_block: &[u8], nblocks: u64) -> Result<Vec<Run>> {
        let per = self.vol.block_size / 4;
        let mut logical = 0u64;
        for i in 0..12 {
            if logical >= nblocks {
                return Ok(self.runs);
            }
            let b = u64::from(le32(i_block, i * 4));
            if b != 0 {
                self.push(logical, b, 1)?;
            }
            logical += 1;
        }
        let mut span = per;
        for level in 1..=3u32 {
            if logical >= nblocks {
                break;
            }
            let b = u64::from(le32(i_block, (11 + level as usize) * 4));
            if b != 0 {
                self.indirect_block(b, level, logical, nblocks)?;
            }
            logical = logical.saturating_add(span);
            span = span.saturating_mul(per);
        }
        Ok(self.runs)
    }

    fn indirect_block(&mut self, block: u64, level: u32, first: u64, nblocks: u64) -> Result<()> {
        let per = self.vol.block_size / 4;
        let span = per.saturating_pow(level - 1);
        let buf = self.read_node(block)?;
        for (i, entry) in (0..per).zip(buf.chunks_exact(4)) {
            let logical = first.saturating_add(i.saturating_mul(span));
            if logical >= nblocks {
                break;
            }
            let b = u64::from(le32(entry, 0));
            if b == 0 {
                continue;
            }
            if level == 1 {
                self.push(logical, b, 1)?;
            } else {
                self.indirect_block(b, level - 1, logical, nblocks)?;
            }
        }
        Ok(())
    }
}

/// The value of the in-inode extended attribute `system.data` (the tail of inline data).
///
/// `ibody` is the inode after `128 + i_extra_isize`.
pub(crate) fn inline_xattr(ibody: &[u8]) -> Option<&[u8]> {
    if le32(ibody, 0) != EXT_XATTR_MAGIC {
        return None;
    }
    let entries = &ibody[4..];
    let mut at = 0usize;
    while at + 16 <= entries.len() && le32(entries, at) != 0 {
        let name_len = entries[at] as usize;
        let index = entries[at + 1];
        let value_off = le16(entries, at + 2) as usize;
        let value_size = le32(entries, at + 8) as usize;
        let name = entries.get(at + 16..at + 16 + name_len)?;
        if index == EXT_XATTR_INDEX_SYSTEM && name == b"data" {
            return entries.get(value_off..value_off.checked_add(value_size)?);
        }
        at += (16 + name_len + 3) & !3;
    }
    None
}
