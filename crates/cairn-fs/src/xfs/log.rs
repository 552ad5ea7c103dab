//! Is the internal metadata log clean? XFS writes metadata changes to a circular log first
//! and to their home blocks later; a volume snapshotted while mounted may hold changes only in
//! the log. This module finds the log head and checks whether the last record is an unmount
//! record (clean). It does not replay a dirty log: the walk then reads the volume as of its
//! last checkpoint, and the report says so.
//!
//! Head: every 512-byte log block starts with the cycle number of the pass that wrote it
//! (a record header holds it after its magic). Blocks before the head carry the current cycle
//! `c`, blocks from the head on the previous one (`c − 1`, or 0 where never written); a
//! binary search finds the change. The last record header is then searched backwards from the
//! head (at most [`MAX_BACK`] blocks).

use super::disk::{be32, check_crc};
use super::sb::Super;
use super::volume::Volume;
use crate::format::*;
use crate::{Error, Result, XfsLog};

/// Log blocks searched backwards from the head for the last record header: one record of the
/// largest size (256 KiB) plus its header blocks, twice.
const MAX_BACK: u64 = 2 * (256 * 1024 / XFS_LOG_BBSIZE + 8);

struct Log<'a> {
    vol: &'a Volume<'a>,
    /// Partition byte offset of the log and its length in 512-byte blocks.
    start: u64,
    blocks: u64,
}

impl Log<'_> {
    fn block(&self, b: u64) -> Result<[u8; 512]> {
        let mut buf = [0u8; 512];
        let b = b % self.blocks;
        self.vol
            .read(self.start + b * XFS_LOG_BBSIZE, &mut buf, &|| {
                format!("XFS log block {b}")
            })?;
        Ok(buf)
    }

    /// The cycle number that block `b` was written in.
    fn cycle(&self, b: u64) -> Result<u32> {
        let buf = self.block(b)?;
        Ok(if be32(&buf, 0) == XFS_LOG_HEADER_MAGIC {
            be32(&buf, 4)
        } else {
            be32(&buf, 0)
        })
    }
}

/// The state of the internal log of the file system `sb` describes.
pub(super) fn state(vol: &Volume, sb: &Super) -> XfsLog {
    if sb.log_start == 0 {
        return XfsLog::External;
    }
    match check(vol, sb) {
        Ok(s) => s,
        Err(e) => XfsLog::Unknown(e.to_string()),
    }
}

fn check(vol: &Volume, sb: &Super) -> Result<XfsLog> {
    let start = sb
        .fsb_to_byte(sb.log_start, sb.log_blocks)
        .filter(|_| sb.log_blocks > 0)
        .ok_or_else(|| Error::corrupt("XFS log outside the file system"))?;
    let log = Log {
        vol,
        start,
        blocks: sb.log_blocks * sb.block_size / XFS_LOG_BBSIZE,
    };
    let first = log.cycle(0)?;
    let last = log.cycle(log.blocks - 1)?;
    if first == 0 {
        // Never written since it was zeroed.
        return Ok(XfsLog::Clean);
    }
    let head = if first == last {
        // One pass ended exactly at the end: the head is back at block 0.
        log.blocks
    } else if last == first - 1 || last == 0 {
        // First block whose cycle is not `first`.
        let (mut lo, mut hi) = (0u64, log.blocks - 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if log.cycle(mid)? == first {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    } else {
        return Err(Error::corrupt(format!(
            "XFS log cycles {first} at the start and {last} at the end"
        )));
    };
    // The last record: the nearest header before the head.
    let mut found = None;
    for back in 1..=MAX_BACK.min(log.blocks) {
        let b = (head + log.blocks - back) % log.blocks;
        let buf = log.block(b)?;
        if be32(&buf, 0) == XFS_LOG_HEADER_MAGIC {
            found = Some((b, buf));
            break;
        }
    }
    let Some((rec, hdr)) = found else {
        return Err(Error::corrupt("XFS log: no record header before the head"));
    };
    if sb.v5 {
        record_crc(&log, rec, &hdr)?;
    }
    let num_ops = be32(&hdr, 40);
    let hblocks = header_blocks(&hdr);
    let data = log.block(rec + hblocks)?;
    let unmount = num_ops == 1 && data[XFS_LOG_OP_FLAG_OFFSET] & XFS_LOG_UNMOUNT_TRANS != 0;
    Ok(if unmount {
        XfsLog::Clean
    } else {
        XfsLog::Dirty
    })
}

/// Header blocks of a record: one, or one per 32 KiB of record size in v2 logs.
fn header_blocks(hdr: &[u8]) -> u64 {
    let size = be32(hdr, 320);
    if be32(hdr, 8) == 2 && size > XFS_LOG_HEADER_CYCLE_SIZE {
        u64::from(size.div_ceil(XFS_LOG_HEADER_CYCLE_SIZE)).min(8)
    } else {
        1
    }
}

/// Checks the CRC-32C of the record at block `rec`: header, extra header blocks, data. A zero
/// checksum is accepted (mkfs writes its unmount record without one); the header counts
/// as 328 bytes (its C struct size on 64-bit hosts) or 324 (on i386, whose kernels wrote such
/// logs).
fn record_crc(log: &Log, rec: u64, hdr: &[u8; 512]) -> Result<()> {
    let stored = u32::from_le_bytes([hdr[32], hdr[33], hdr[34], hdr[35]]);
    if stored == 0 {
        return Ok(());
    }
    let len = u64::from(be32(hdr, 12));
    if len > 256 * 1024 {
        return Err(Error::corrupt(format!("XFS log record of {len} bytes")));
    }
    let hblocks = header_blocks(hdr);
    let mut bytes = hdr[..XFS_LOG_REC_HDR_LEN].to_vec();
    let mut short = hdr[..XFS_LOG_REC_HDR_LEN_I386].to_vec();
    for i in 1..hblocks {
        let ext = log.block(rec + i)?;
        bytes.extend_from_slice(&ext[..XFS_LOG_EXT_HDR_LEN]);
        short.extend_from_slice(&ext[..XFS_LOG_EXT_HDR_LEN]);
    }
    let mut data = Vec::new();
    for i in 0..len.div_ceil(XFS_LOG_BBSIZE) {
        data.extend_from_slice(&log.block(rec + hblocks + i)?);
    }
    #[allow(clippy::cast_possible_truncation)] // at most 256 KiB
    data.truncate(len as usize);
    bytes.extend_from_slice(&data);
    short.extend_from_slice(&data);
    let what = || format!("XFS log record at block {rec}");
    check_crc(&bytes, XFS_LOG_REC_CRC_OFFSET, &what)
        .or_else(|_| check_crc(&short, XFS_LOG_REC_CRC_OFFSET, &what))
}
