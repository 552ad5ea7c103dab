//! Block access to one ext partition, with the replayed journal laid over the raw blocks.
//!
//! Invariant: every metadata read of the ext reader goes through [`Volume::read`], so a
//! block that a committed journal transaction rewrote is seen in its new form everywhere
//! (superblock, group descriptors, inodes, extent nodes, directories). The source is never
//! written.

use std::collections::HashMap;

use cairn_types::ReadAt;

use crate::format::JBD2_MAGIC_BE;
use crate::util::read_exact;
use crate::{Error, Result};

/// Where the newest committed copy of a block lives in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct JournalCopy {
    /// Absolute byte offset of the copy in the disk image.
    pub disk: u64,
    /// The copy's first 4 bytes were zeroed because they equalled the jbd2 magic
    /// (`JBD2_FLAG_ESCAPE`); reads put the magic back.
    pub escaped: bool,
}

pub(crate) struct Volume<'a> {
    pub r: &'a dyn ReadAt,
    /// Byte offset of the partition in the image.
    pub base: u64,
    /// Partition length in bytes.
    pub len: u64,
    /// At most 64 KiB: the superblock parser rejects larger blocks.
    pub block_size: u64,
    /// File-system block number → journal copy.
    pub overlay: HashMap<u64, JournalCopy>,
    /// Image offset of 4 bytes holding the jbd2 magic (the journal superblock's start): the
    /// missing head of an escaped copy, as a disk range.
    pub magic_disk: u64,
}

impl<'a> Volume<'a> {
    pub fn new(r: &'a dyn ReadAt, base: u64, len: u64, block_size: u64) -> Self {
        Self {
            r,
            base,
            len,
            block_size,
            overlay: HashMap::new(),
            magic_disk: 0,
        }
    }

    /// The block size as a buffer length.
    pub fn block_len(&self) -> usize {
        #[allow(clippy::cast_possible_truncation)] // at most 64 KiB
        let len = self.block_size as usize;
        len
    }

    /// Reads partition bytes `[off, off + buf.len())`, journal overlay applied.
    pub fn read(&self, off: u64, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<()> {
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "{} at {off}+{} is beyond the partition ({} bytes)",
                    what(),
                    buf.len(),
                    self.len
                ))
            })?;
        read_exact(self.r, buf, self.base + off, what)?;
        if self.overlay.is_empty() {
            return Ok(());
        }
        let bs = self.block_size;
        let mut b = off / bs;
        while b * bs < end {
            if let Some(copy) = self.overlay.get(&b) {
                let bstart = b * bs;
                let from = off.max(bstart);
                let to = end.min(bstart + bs);
                // off <= from < to <= off + buf.len(): both are indexes into buf.
                #[allow(clippy::cast_possible_truncation)]
                let dst = &mut buf[(from - off) as usize..(to - off) as usize];
                let within = from - bstart;
                read_exact(self.r, dst, copy.disk + within, &|| {
                    format!("journal copy of block {b}")
                })?;
                if copy.escaped && within < 4 {
                    let magic = JBD2_MAGIC_BE.to_be_bytes();
                    #[allow(clippy::cast_possible_truncation)] // below 4
                    let within = within as usize;
                    for (d, m) in dst.iter_mut().zip(&magic[within..]) {
                        *d = *m;
                    }
                }
            }
            b += 1;
        }
        Ok(())
    }

    pub fn read_block(&self, block: u64, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<()> {
        let off = block
            .checked_mul(self.block_size)
            .ok_or_else(|| Error::corrupt(format!("{}: block {block} overflows", what())))?;
        self.read(off, buf, what)
    }
}
