//! Directories: short-form (in the inode) and the data blocks of block, leaf and node
//! directories. Listing needs only the data blocks (the hash leaves and free-space index
//! above `XFS_DIR2_LEAF_OFFSET` are lookup accelerators): each is parsed entry by entry,
//! unused regions skipped by their recorded length.

use super::bmap::Run;
use super::disk::{be16, be32, be64, check_crc};
use super::sb::Super;
use super::volume::Volume;
use crate::format::*;
use crate::{Error, Limits, Result};

/// A directory entry: (inode, name bytes).
pub(super) type DirName = (u64, Vec<u8>);

/// Entries of a short-form directory held in the data fork `b` (`di_size` bytes).
pub(super) fn shortform(b: &[u8], ino: u64, ftype: bool, out: &mut Vec<DirName>) -> Result<()> {
    let bad = |what: &str| Error::corrupt(format!("XFS short-form directory {ino}: {what}"));
    if b.len() < 6 {
        return Err(bad("too short"));
    }
    let count = usize::from(b[0]);
    let ino_len = if b[1] > 0 { 8 } else { 4 };
    let mut at = 2 + ino_len;
    for _ in 0..count {
        let namelen = usize::from(*b.get(at).ok_or_else(|| bad("entry past the end"))?);
        let name_at = at + 3;
        let ino_at = name_at + namelen + usize::from(ftype);
        let end = ino_at + ino_len;
        if namelen == 0 || end > b.len() {
            return Err(bad("entry past the end"));
        }
        let child = if ino_len == 8 {
            be64(b, ino_at)
        } else {
            u64::from(be32(b, ino_at))
        };
        out.push((child, b[name_at..name_at + namelen].to_vec()));
        at = end;
    }
    Ok(())
}

/// Appends the live entries of one directory data block (`XD2B`/`XD2D`/`XDB3`/`XDD3`).
pub(super) fn data_block(b: &[u8], ino: u64, sb: &Super, out: &mut Vec<DirName>) -> Result<()> {
    let bad = |what: String| Error::corrupt(format!("XFS directory {ino}: {what}"));
    let magic = be32(b, 0);
    let (hdr, single) = match (sb.v5, magic) {
        (false, XFS_DIR2_BLOCK_MAGIC) => (XFS_DIR2_DATA_HDR_LEN, true),
        (false, XFS_DIR2_DATA_MAGIC) => (XFS_DIR2_DATA_HDR_LEN, false),
        (true, XFS_DIR3_BLOCK_MAGIC) => (XFS_DIR3_DATA_HDR_LEN, true),
        (true, XFS_DIR3_DATA_MAGIC) => (XFS_DIR3_DATA_HDR_LEN, false),
        _ => return Err(bad(format!("data block magic {magic:#x}"))),
    };
    if sb.v5 {
        check_crc(b, XFS_DIR3_CRC_OFFSET, &|| {
            format!("XFS directory {ino} data block")
        })?;
        if be64(b, 40) != ino {
            return Err(bad("data block owned by another inode".into()));
        }
    }
    let end = if single {
        // The hash leaf entries and the tail sit at the end of a single-block directory.
        let count = be32(b, b.len() - XFS_DIR2_BLOCK_TAIL_LEN) as usize;
        count
            .checked_mul(XFS_DIR2_LEAF_ENTRY_LEN)
            .and_then(|l| b.len().checked_sub(XFS_DIR2_BLOCK_TAIL_LEN + l))
            .filter(|&e| e >= hdr)
            .ok_or_else(|| bad(format!("block tail counts {count} leaf entries")))?
    } else {
        b.len()
    };
    let mut at = hdr;
    while at + 8 <= end {
        if be16(b, at) == XFS_DIR2_DATA_FREE_TAG {
            let len = usize::from(be16(b, at + 2));
            if len < 8 || !len.is_multiple_of(8) || at + len > end {
                return Err(bad(format!("free region of {len} bytes at {at}")));
            }
            at += len;
            continue;
        }
        let child = be64(b, at);
        let namelen = usize::from(b[at + 8]);
        // inumber, namelen, name, [ftype], tag; padded to 8 bytes.
        let len = (8 + 1 + namelen + usize::from(sb.ftype) + 2).next_multiple_of(8);
        if namelen == 0 || at + len > end {
            return Err(bad(format!("entry at {at} past the data")));
        }
        let name = &b[at + 9..at + 9 + namelen];
        if name != b"." && name != b".." {
            out.push((child, name.to_vec()));
        }
        at += len;
    }
    Ok(())
}

/// Lists a block/leaf/node directory from its data-fork runs. Damaged blocks are skipped and
/// returned as errors beside the entries that could be read.
pub(super) fn read_blocks(
    vol: &Volume,
    sb: &Super,
    limits: &Limits,
    ino: u64,
    runs: &[Run],
    claim: &mut dyn FnMut(u64) -> bool,
) -> Result<(Vec<DirName>, Vec<Error>)> {
    let per = 1u64 << sb.dir_blk_log;
    let leaf_fsb = XFS_DIR2_LEAF_OFFSET >> sb.block_log;
    // Data directory blocks: their first file block, from every run below the leaf offset.
    let mut starts: Vec<u64> = Vec::new();
    let mut bytes = 0u64;
    for r in runs.iter().filter(|r| r.logical < leaf_fsb && !r.unwritten) {
        let end = (r.logical + r.count).min(leaf_fsb);
        let mut d = r.logical - r.logical % per;
        while d < end {
            if starts.last() != Some(&d) {
                bytes += sb.dir_block_size();
                if bytes > limits.max_dir_bytes {
                    return Err(Error::limit(format!(
                        "XFS directory {ino}: more than max_dir_bytes of data blocks"
                    )));
                }
                starts.push(d);
            }
            d += per;
        }
    }
    #[allow(clippy::cast_possible_truncation)] // at most 64 KiB
    let mut buf = vec![0u8; sb.dir_block_size() as usize];
    let bs = vol.block_len();
    let (mut out, mut errs) = (Vec::new(), Vec::new());
    'blocks: for d in starts {
        // A directory block may span runs: map each of its file-system blocks.
        for (i, piece) in buf.chunks_mut(bs).enumerate() {
            let lb = d + i as u64;
            let found = runs
                .binary_search_by(|r| {
                    if r.logical + r.count <= lb {
                        std::cmp::Ordering::Less
                    } else if r.logical > lb {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                })
                .ok()
                .map(|k| runs[k])
                .filter(|r| !r.unwritten)
                .and_then(|r| sb.fsb_to_byte(r.fsb + (lb - r.logical), 1));
            let Some(off) = found else {
                errs.push(Error::corrupt(format!(
                    "XFS directory {ino}: block {lb} of a directory block is a hole"
                )));
                continue 'blocks;
            };
            if !claim(off) {
                return Err(Error::corrupt(format!(
                    "XFS directory {ino}: block at byte {off} is used twice"
                )));
            }
            if let Err(e) = vol.read(off, piece, &|| format!("XFS directory {ino}")) {
                errs.push(e);
                continue 'blocks;
            }
        }
        if let Err(e) = data_block(&buf, ino, sb, &mut out) {
            errs.push(e);
        }
    }
    Ok((out, errs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortform_entries_with_and_without_ftype() {
        // count 2, 4-byte inode numbers, parent 128; "ab" -> 131, "c" -> 132.
        let mut b = vec![2, 0, 0, 0, 0, 128];
        b.extend_from_slice(&[2, 0, 0x30, b'a', b'b', 1, 0, 0, 0, 131]);
        b.extend_from_slice(&[1, 0, 0x40, b'c', 2, 0, 0, 0, 132]);
        let mut out = Vec::new();
        shortform(&b, 128, true, &mut out).unwrap();
        assert_eq!(out, [(131, b"ab".to_vec()), (132, b"c".to_vec())]);
        // Without the ftype byte the same bytes misalign: the second entry runs past the end.
        let mut out = Vec::new();
        assert!(shortform(&b, 128, false, &mut out).is_err());
        // A count beyond the bytes is an error, not a panic.
        let mut b2 = b.clone();
        b2[0] = 200;
        assert!(shortform(&b2, 128, true, &mut Vec::new()).is_err());
    }
}
