//! In-memory jbd2 journal replay.
//!
//! A crash- or freeze-consistent snapshot of a mounted ext3/4 file system may hold committed
//! transactions that were never checkpointed to their home blocks. The kernel replays them at
//! mount; we cannot write, so [`replay`] computes the same result as a map *file-system block
//! → newest committed copy in the journal*, which [`super::volume::Volume`] lays over every
//! read.
//!
//! What is followed, as in the kernel's recovery (`fs/jbd2/recovery.c`):
//! - the log runs from `s_start` with sequence `s_sequence`, wrapping from the end of the log
//!   area (`s_maxlen`, minus fast-commit blocks) to `s_first`; it ends at the first block whose
//!   header has a wrong magic or sequence;
//! - descriptor blocks carry tags (32- or 64-bit block numbers, csum v2/v3 tag sizes, optional
//!   UUID, escape flag) for the data blocks that follow them;
//! - a transaction counts only once its commit block is found;
//! - revoke records cancel copies of a block in transactions up to and including the revoking
//!   one.
//!
//! Not done: checksums (descriptor tails, tag and commit checksums) are not verified, so a
//! torn async-commit transaction is applied where the kernel would stop; fast-commit blocks are
//! not replayed. Both are noted in `docs/FILESYSTEMS.md`.

use std::collections::HashMap;

use crate::format::*;
use crate::util::be32;
use crate::{Error, Limits, Result};

use super::map::Run;
use super::volume::{JournalCopy, Volume};

/// Result of a replay: the overlay and what it took.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    pub overlay: HashMap<u64, JournalCopy>,
    pub transactions: u64,
    /// Image offset of the journal superblock, whose first 4 bytes are the jbd2 magic.
    pub magic_disk: u64,
}

struct Tag {
    fs_block: u64,
    journal_block: u64,
    escaped: bool,
}

/// Replays the journal stored in the inode blocks `runs` (logical journal block → fs block).
pub(crate) fn replay(vol: &Volume, runs: &[Run], limits: &Limits) -> Result<Replay> {
    let bs = vol.block_size;
    let jmap = |j: u64| -> Result<u64> {
        let i = runs.partition_point(|r| r.logical + r.count <= j);
        match runs.get(i) {
            Some(r) if r.logical <= j => Ok(r.phys + (j - r.logical)),
            _ => Err(Error::corrupt(format!("journal block {j} is not mapped"))),
        }
    };
    let mut buf = vec![0u8; vol.block_len()];
    let read = |j: u64, buf: &mut [u8]| -> Result<()> {
        let b = jmap(j)?;
        vol.read_block(b, buf, &|| format!("journal block {j}"))
    };
    read(0, &mut buf)?;
    let magic = be32(&buf, 0);
    let btype = be32(&buf, 4);
    if magic != JBD2_MAGIC_BE || !matches!(btype, JBD2_SUPERBLOCK_V1 | JBD2_SUPERBLOCK_V2) {
        return Err(Error::corrupt("journal superblock magic"));
    }
    if u64::from(be32(&buf, 12)) != bs {
        return Err(Error::unsupported(
            "journal block size differs from the file system's",
        ));
    }
    let maxlen = u64::from(be32(&buf, 16));
    let first = u64::from(be32(&buf, 20));
    let mut seq = be32(&buf, 24);
    let start = u64::from(be32(&buf, 28));
    let (incompat, num_fc) = if btype == JBD2_SUPERBLOCK_V2 {
        (be32(&buf, 40), be32(&buf, 84))
    } else {
        (0, 0)
    };
    if start == 0 {
        return Ok(Replay::default()); // clean journal
    }
    let fc = u64::from(if incompat & JBD2_INCOMPAT_FAST_COMMIT != 0 {
        if num_fc == 0 {
            JBD2_DEFAULT_FC_BLOCKS
        } else {
            num_fc
        }
    } else {
        0
    });
    let mapped: u64 = runs.iter().map(|r| r.count).sum();
    let last = maxlen.min(mapped).saturating_sub(fc);
    if first == 0 || first >= last || start < first || start >= last {
        return Err(Error::corrupt(format!(
            "journal bounds first {first} start {start} end {last}"
        )));
    }
    let csum3 = incompat & JBD2_INCOMPAT_CSUM_V3 != 0;
    let csum2 = incompat & JBD2_INCOMPAT_CSUM_V2 != 0;
    let is64 = incompat & JBD2_INCOMPAT_64BIT != 0;
    let tag_len: usize = if csum3 {
        16
    } else {
        8 + if is64 { 4 } else { 0 } + if csum2 { 2 } else { 0 }
    };
    let tail = if csum2 || csum3 { JBD2_TAIL_LEN } else { 0 };
    let next = |j: u64| if j + 1 >= last { first } else { j + 1 };

    let mut committed: Vec<(u32, Vec<Tag>)> = Vec::new();
    let mut revoked: HashMap<u64, u32> = HashMap::new();
    let mut pending: Vec<Tag> = Vec::new();
    let mut pending_revokes: Vec<u64> = Vec::new();
    let mut j = start;
    let mut scanned = 0u64;
    loop {
        scanned += 1;
        if scanned > limits.max_journal_blocks || scanned > last {
            break; // wrapped all the way round or hit the limit: stop at the last commit
        }
        if read(j, &mut buf).is_err() {
            break;
        }
        if be32(&buf, 0) != JBD2_MAGIC_BE || be32(&buf, 8) != seq {
            break;
        }
        match be32(&buf, 4) {
            JBD2_DESCRIPTOR_BLOCK => {
                let mut at = 12usize;
                let end = buf.len() - tail;
                let mut data = j;
                while at + tag_len <= end {
                    let t = &buf[at..at + tag_len];
                    let lo = u64::from(be32(t, 0));
                    let (flags, hi) = if csum3 {
                        (be32(t, 4), u64::from(be32(t, 8)))
                    } else {
                        (
                            u32::from(u16::from_be_bytes([t[6], t[7]])),
                            if is64 { u64::from(be32(t, 8)) } else { 0 },
                        )
                    };
                    data = next(data);
                    if pending.len() as u64 >= limits.max_journal_blocks {
                        return Err(Error::limit("journal transaction too large"));
                    }
                    pending.push(Tag {
                        fs_block: if is64 { (hi << 32) | lo } else { lo },
                        journal_block: data,
                        escaped: flags & JBD2_FLAG_ESCAPE != 0,
                    });
                    at += tag_len;
                    if flags & JBD2_FLAG_SAME_UUID == 0 {
                        at += 16;
                    }
                    if flags & JBD2_FLAG_LAST_TAG != 0 {
                        break;
                    }
                }
                j = next(data);
            }
            JBD2_COMMIT_BLOCK => {
                if committed.len() as u64 >= limits.max_journal_transactions {
                    return Err(Error::limit("more than max_journal_transactions"));
                }
                for b in pending_revokes.drain(..) {
                    let e = revoked.entry(b).or_insert(seq);
                    *e = (*e).max(seq);
                }
                committed.push((seq, std::mem::take(&mut pending)));
                seq = seq.wrapping_add(1);
                j = next(j);
            }
            JBD2_REVOKE_BLOCK => {
                let count = (be32(&buf, 12) as usize).min(buf.len() - tail);
                let rlen = if is64 { 8 } else { 4 };
                let mut at = 16;
                while at + rlen <= count {
                    let b = if is64 {
                        (u64::from(be32(&buf, at)) << 32) | u64::from(be32(&buf, at + 4))
                    } else {
                        u64::from(be32(&buf, at))
                    };
                    pending_revokes.push(b);
                    at += rlen;
                }
                j = next(j);
            }
            _ => break,
        }
    }

    let mut out = Replay {
        transactions: committed.len() as u64,
        magic_disk: vol.base + jmap(0)? * bs,
        ..Replay::default()
    };
    for (tseq, tags) in committed {
        for t in tags {
            if revoked
                .get(&t.fs_block)
                .is_some_and(|&r| !seq_after(tseq, r))
            {
                continue;
            }
            let phys = jmap(t.journal_block)?;
            out.overlay.insert(
                t.fs_block,
                JournalCopy {
                    disk: vol.base + phys * bs,
                    escaped: t.escaped,
                },
            );
        }
    }
    Ok(out)
}

/// `a` is a later transaction than `b` (sequence numbers wrap).
fn seq_after(a: u32, b: u32) -> bool {
    // jbd2's tid_gt: the wrapped difference read as signed.
    a.wrapping_sub(b).cast_signed() > 0
}
