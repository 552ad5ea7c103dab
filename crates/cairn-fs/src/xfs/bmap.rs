//! Data-fork block maps: extent lists in the inode and B+tree extent maps (bmbt), as
//! logical → file-system block runs.
//!
//! Bounds: a file's records and the bmbt blocks read for it count against
//! `Limits::max_extents_per_file`; the tree is at most [`MAX_LEVELS`] high and every level
//! must be one below its parent's, so a pointer back up the tree cannot loop; v5 blocks must
//! name their owner inode; each bmbt block is read at most once per walk (a block reached
//! again belongs to two maps or loops: corruption).

use std::cell::RefCell;
use std::collections::HashSet;

use super::disk::{be16, be32, be64, check_crc};
use super::sb::Super;
use super::volume::Volume;
use crate::format::*;
use crate::{Error, Limits, Result};

/// Highest bmbt the reader follows (including the root in the inode): enough for 2^64
/// extents at the smallest block size.
pub(super) const MAX_LEVELS: u16 = 12;

/// One extent record: `count` blocks at file block `logical`, disk block `fsb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub logical: u64,
    pub fsb: u64,
    pub count: u64,
    /// Preallocated, never written: reads as zeros.
    pub unwritten: bool,
}

/// Decodes a 16-byte `xfs_bmbt_rec`.
pub(super) fn decode(rec: &[u8]) -> Run {
    let (l0, l1) = (be64(rec, 0), be64(rec, 8));
    Run {
        unwritten: l0 >> 63 != 0,
        logical: (l0 >> 9) & ((1 << 54) - 1),
        fsb: ((l0 & 0x1FF) << 43) | (l1 >> 21),
        count: l1 & ((1 << 21) - 1),
    }
}

pub(super) struct Mapper<'a> {
    pub vol: &'a Volume<'a>,
    pub sb: &'a Super,
    pub limits: &'a Limits,
    /// bmbt blocks read so far in this walk.
    pub claimed: &'a RefCell<HashSet<u64>>,
}

impl Mapper<'_> {
    /// The runs of a data fork in `format` (extents or btree), in file order, checked to be
    /// sorted, non-overlapping and inside the file system.
    pub fn runs(&self, ino: u64, format: u8, fork: &[u8], nextents: u64) -> Result<Vec<Run>> {
        let mut out = Vec::new();
        match format {
            XFS_DINODE_FMT_EXTENTS => {
                let n = usize::try_from(nextents)
                    .ok()
                    .filter(|&n| n <= fork.len() / XFS_BMBT_REC_LEN)
                    .ok_or_else(|| {
                        Error::corrupt(format!("XFS inode {ino}: {nextents} extents in the fork"))
                    })?;
                self.check_count(ino, n)?;
                out.extend(fork.chunks_exact(XFS_BMBT_REC_LEN).take(n).map(decode));
            }
            XFS_DINODE_FMT_BTREE => self.btree(ino, fork, &mut out)?,
            f => {
                return Err(Error::corrupt(format!(
                    "XFS inode {ino}: data fork format {f} has no block map"
                )));
            }
        }
        let mut next = 0u64;
        for r in &out {
            let end = r.logical.checked_add(r.count);
            if r.count == 0 || r.logical < next || end.is_none() {
                return Err(Error::corrupt(format!(
                    "XFS inode {ino}: extent at block {} out of order or overlapping",
                    r.logical
                )));
            }
            if self.sb.fsb_to_byte(r.fsb, r.count).is_none() {
                return Err(Error::corrupt(format!(
                    "XFS inode {ino}: extent of {} blocks at {:#x} is beyond the device",
                    r.count, r.fsb
                )));
            }
            next = end.unwrap_or(u64::MAX);
        }
        Ok(out)
    }

    fn check_count(&self, ino: u64, n: usize) -> Result<()> {
        if n > self.limits.max_extents_per_file {
            return Err(Error::limit(format!(
                "XFS inode {ino}: more than max_extents_per_file {} extents",
                self.limits.max_extents_per_file
            )));
        }
        Ok(())
    }

    /// Walks a bmbt whose root (`xfs_bmdr_block`) fills the data fork.
    fn btree(&self, ino: u64, fork: &[u8], out: &mut Vec<Run>) -> Result<()> {
        let level = be16(fork, 0);
        let numrecs = usize::from(be16(fork, 2));
        let maxrecs = fork.len().saturating_sub(XFS_BMDR_HDR_LEN) / 16;
        if level == 0 || level >= MAX_LEVELS || numrecs == 0 || numrecs > maxrecs {
            return Err(Error::corrupt(format!(
                "XFS inode {ino}: bmbt root level {level} with {numrecs} records"
            )));
        }
        let ptrs_at = XFS_BMDR_HDR_LEN + maxrecs * 8;
        // Depth first, children in key order: (block, level it must have).
        let mut stack: Vec<(u64, u16)> = (0..numrecs)
            .rev()
            .map(|i| (be64(fork, ptrs_at + i * 8), level - 1))
            .collect();
        let (hdr, magic) = if self.sb.v5 {
            (XFS_BTREE_LBLOCK_CRC_LEN, XFS_BMAP_CRC_MAGIC)
        } else {
            (XFS_BTREE_LBLOCK_LEN, XFS_BMAP_MAGIC)
        };
        let bs = self.vol.block_len();
        let cap = (bs - hdr) / 16;
        let mut buf = vec![0u8; bs];
        let mut blocks = 0usize;
        while let Some((fsb, want_level)) = stack.pop() {
            blocks += 1;
            self.check_count(ino, blocks + out.len())?;
            let what = || format!("XFS inode {ino} bmbt block {fsb:#x}");
            let off = self
                .sb
                .fsb_to_byte(fsb, 1)
                .ok_or_else(|| Error::corrupt(format!("{} is beyond the device", what())))?;
            if !self.claimed.borrow_mut().insert(off) {
                return Err(Error::corrupt(format!("{} is used twice", what())));
            }
            self.vol.read(off, &mut buf, &what)?;
            if be32(&buf, 0) != magic {
                return Err(Error::corrupt(format!("{}: bad magic", what())));
            }
            if self.sb.v5 {
                check_crc(&buf, XFS_BTREE_LBLOCK_CRC_OFFSET, &what)?;
                if be64(&buf, 56) != ino {
                    return Err(Error::corrupt(format!(
                        "{}: owned by another inode",
                        what()
                    )));
                }
            }
            let lvl = be16(&buf, 4);
            let n = usize::from(be16(&buf, 6));
            if lvl != want_level || n == 0 || n > cap {
                return Err(Error::corrupt(format!(
                    "{}: level {lvl} (expected {want_level}) with {n} records",
                    what()
                )));
            }
            if lvl == 0 {
                self.check_count(ino, blocks + out.len() + n)?;
                out.extend(
                    buf[hdr..hdr + n * XFS_BMBT_REC_LEN]
                        .chunks_exact(XFS_BMBT_REC_LEN)
                        .map(decode),
                );
            } else {
                let p = hdr + cap * 8;
                stack.extend((0..n).rev().map(|i| (be64(&buf, p + i * 8), lvl - 1)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a record the way the format lays it out.
    fn encode(r: Run) -> [u8; 16] {
        let l0 = (u64::from(r.unwritten) << 63) | (r.logical << 9) | (r.fsb >> 43);
        let l1 = (r.fsb << 21) | r.count;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&l0.to_be_bytes());
        b[8..].copy_from_slice(&l1.to_be_bytes());
        b
    }

    /// A v4 superblock: 512-byte blocks, one AG of 64 blocks, 256-byte inodes.
    fn tiny_super() -> Super {
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(&XFS_SB_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&512u32.to_be_bytes());
        b[8..16].copy_from_slice(&64u64.to_be_bytes());
        b[84..88].copy_from_slice(&64u32.to_be_bytes());
        b[88..92].copy_from_slice(&1u32.to_be_bytes());
        b[100..102].copy_from_slice(&4u16.to_be_bytes());
        b[102..104].copy_from_slice(&512u16.to_be_bytes());
        b[104..106].copy_from_slice(&256u16.to_be_bytes());
        b[106..108].copy_from_slice(&2u16.to_be_bytes());
        b[120..125].copy_from_slice(&[9, 9, 8, 1, 6]);
        Super::parse(&b).unwrap()
    }

    /// A v4 bmbt block at `fsb` of `img`: level, then records (leaf) or pointers (node).
    fn block(img: &mut [u8], fsb: usize, level: u16, recs: &[Run], ptrs: &[u64]) {
        let b = &mut img[fsb * 512..(fsb + 1) * 512];
        b[0..4].copy_from_slice(&XFS_BMAP_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&level.to_be_bytes());
        let n = u16::try_from(recs.len() + ptrs.len()).unwrap();
        b[6..8].copy_from_slice(&n.to_be_bytes());
        for (i, r) in recs.iter().enumerate() {
            b[24 + i * 16..40 + i * 16].copy_from_slice(&encode(*r));
        }
        let cap = (512 - 24) / 16;
        for (i, p) in ptrs.iter().enumerate() {
            b[24 + cap * 8 + i * 8..32 + cap * 8 + i * 8].copy_from_slice(&p.to_be_bytes());
        }
    }

    /// An in-inode root of `level` pointing at `ptr`, in a 156-byte fork (9 slots).
    fn root(level: u16, ptr: u64) -> Vec<u8> {
        let mut f = vec![0u8; 156];
        f[0..2].copy_from_slice(&level.to_be_bytes());
        f[2..4].copy_from_slice(&1u16.to_be_bytes());
        f[4 + 9 * 8..4 + 10 * 8].copy_from_slice(&ptr.to_be_bytes());
        f
    }

    fn map(img: &[u8], fork: &[u8], limits: &Limits) -> Result<Vec<Run>> {
        let sb = tiny_super();
        let data = img.to_vec();
        let vol = Volume {
            r: &data,
            base: 0,
            len: data.len() as u64,
            block_size: 512,
        };
        let claimed = RefCell::default();
        let m = Mapper {
            vol: &vol,
            sb: &sb,
            limits,
            claimed: &claimed,
        };
        m.runs(99, XFS_DINODE_FMT_BTREE, fork, 0)
    }

    #[test]
    fn three_level_bmbt_in_key_order_and_loops_caught() {
        let run = |logical, fsb| Run {
            logical,
            fsb,
            count: 2,
            unwritten: false,
        };
        let mut img = vec![0u8; 64 * 512];
        block(&mut img, 10, 0, &[run(0, 40), run(2, 44)], &[]);
        block(&mut img, 11, 0, &[run(8, 50)], &[]);
        block(&mut img, 5, 1, &[], &[10, 11]);
        let l = Limits::default();
        let runs = map(&img, &root(2, 5), &l).unwrap();
        assert_eq!(runs, [run(0, 40), run(2, 44), run(8, 50)]);
        // Too few allowed extents: a Limit error, not a partial map.
        let small = Limits {
            max_extents_per_file: 3,
            ..Limits::default()
        };
        assert!(map(&img, &root(2, 5), &small).is_err());
        // The node points twice at one leaf.
        let mut twice = img.clone();
        block(&mut twice, 5, 1, &[], &[10, 10]);
        assert!(
            map(&twice, &root(2, 5), &l)
                .unwrap_err()
                .context
                .contains("used twice")
        );
        // A node pointing at itself: its level cannot match twice, and it is read once.
        let mut selfloop = img.clone();
        block(&mut selfloop, 5, 2, &[], &[5]);
        assert!(map(&selfloop, &root(3, 5), &l).is_err());
        // Out-of-order leaves, a pointer past the AG, an absurd root level.
        let mut swapped = img.clone();
        block(&mut swapped, 5, 1, &[], &[11, 10]);
        assert!(
            map(&swapped, &root(2, 5), &l)
                .unwrap_err()
                .context
                .contains("out of order")
        );
        assert!(
            map(&img, &root(2, 64), &l)
                .unwrap_err()
                .context
                .contains("beyond")
        );
        assert!(map(&img, &root(MAX_LEVELS, 5), &l).is_err());
        // A leaf extent beyond the device.
        let mut far = img.clone();
        block(&mut far, 11, 0, &[run(8, 63)], &[]);
        assert!(
            map(&far, &root(2, 5), &l)
                .unwrap_err()
                .context
                .contains("beyond the device")
        );
    }

    #[test]
    fn records_round_trip_at_field_limits() {
        for r in [
            Run {
                logical: 0,
                fsb: 757,
                count: 1024,
                unwritten: false,
            },
            Run {
                logical: (1 << 54) - 1,
                fsb: (1 << 52) - 1,
                count: (1 << 21) - 1,
                unwritten: true,
            },
            Run {
                logical: 12345,
                fsb: 1 << 43,
                count: 1,
                unwritten: false,
            },
        ] {
            assert_eq!(decode(&encode(r)), r);
        }
    }
}
