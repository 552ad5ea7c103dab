//! Byte access to one XFS partition: every read is checked against the partition's end, so
//! nothing outside it is ever read.

use cairn_types::ReadAt;

use crate::util::read_exact;
use crate::{Error, Result};

pub(super) struct Volume<'a> {
    pub r: &'a dyn ReadAt,
    /// Byte offset of the partition in the image.
    pub base: u64,
    /// Partition length in bytes.
    pub len: u64,
    /// At most 64 KiB (checked by the superblock parser).
    pub block_size: u64,
}

impl Volume<'_> {
    pub fn block_len(&self) -> usize {
        #[allow(clippy::cast_possible_truncation)] // at most 64 KiB
        let n = self.block_size as usize;
        n
    }

    /// Reads partition bytes `[off, off + buf.len())`.
    pub fn read(&self, off: u64, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<()> {
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(Error::corrupt(format!(
                "{} at {off}+{} is beyond the partition ({} bytes)",
                what(),
                buf.len(),
                self.len
            )));
        }
        read_exact(self.r, buf, self.base + off, what)
    }
}
