//! XFS (v4 and v5), read-only.
//!
//! | piece | handled |
//! |---|---|
//! | superblock | v4 and v5 (CRC-32C checked: a bad superblock fails the walk); geometry validated; unknown incompatible features are `Unsupported` |
//! | inodes | located from the inode number (AG, block in AG, index); v1/v2 cores (v4) and v3 cores (v5: CRC, self-reference, creation time); bigtime timestamps |
//! | data forks | local (inline data, short-form directories, inline symlinks), extent lists, B+tree extent maps ([`bmap`]); unwritten extents are holes; reflinked extents read as ordinary ones |
//! | directories | short-form, block, leaf and node ([`dir`]: data blocks below the 32 GiB leaf offset, free space skipped); file-type bytes; multi-block directory blocks |
//! | symlinks | local and remote (v5 remote blocks have a checksummed header) |
//! | log | clean or dirty ([`log`]), reported in [`crate::WalkReport::xfs_log`]; a dirty log is **not replayed** |
//!
//! Invariants: every read goes through [`volume::Volume`] (inside the partition); on v5 every
//! metadata block read (inode, bmbt block, directory block, remote symlink block, log record)
//! has its CRC-32C checked and a mismatch costs only that entry (a `WalkError`); bmbt and
//! directory blocks are each read at most once per walk, so neither a looping tree nor
//! cross-linked directories can make the walk repeat work; every count read from disk is
//! checked against [`Limits`] before it drives a loop or an allocation.

mod bmap;
mod dir;
mod disk;
mod inode;
mod log;
mod sb;
mod volume;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

use cairn_types::ReadAt;

use crate::format::*;
use crate::util::{Sink, join};
use crate::{Error, FileEntry, FileExtent, FileKind, Limits, Partition, Result};

use bmap::{Mapper, Run};
use dir::DirName;
use disk::{be32, be64, check_crc};
use inode::Dinode;
use sb::Super;
use volume::Volume;

pub(crate) use sb::probe;

const INODE_CHUNK_LOG: u32 = 16;
/// Inode bytes read (and cached) at once.
const INODE_CHUNK: u64 = 1 << INODE_CHUNK_LOG;
/// Fewest inode chunks cached before the cache is dropped; more up to `Limits::max_alloc`.
const INODE_CACHE_MIN_CHUNKS: usize = 256;

pub(crate) struct Xfs<'a> {
    vol: Volume<'a>,
    sb: Super,
    limits: &'a Limits,
    cache: RefCell<HashMap<u64, Vec<u8>>>,
    /// bmbt and directory blocks read so far (partition byte offsets).
    claimed: RefCell<HashSet<u64>>,
    /// Extents of hard-linked files already mapped (their bmbt blocks are claimed).
    linked: RefCell<HashMap<u64, Vec<FileExtent>>>,
}

impl<'a> Xfs<'a> {
    fn open(r: &'a dyn ReadAt, part: &Partition, limits: &'a Limits) -> Result<Self> {
        let mut vol = Volume {
            r,
            base: part.offset,
            len: part.length,
            block_size: 512,
        };
        let mut head = [0u8; 512];
        vol.read(0, &mut head, &|| "XFS superblock".into())?;
        #[allow(clippy::cast_possible_truncation)] // at most 32 KiB
        let mut sbuf = vec![0u8; Super::sector_size(&head) as usize];
        vol.read(0, &mut sbuf, &|| "XFS superblock".into())?;
        let sb = Super::parse(&sbuf)?;
        vol.block_size = sb.block_size;
        Ok(Self {
            vol,
            sb,
            limits,
            cache: RefCell::default(),
            claimed: RefCell::default(),
            linked: RefCell::default(),
        })
    }

    fn inode(&self, ino: u64) -> Result<Dinode> {
        let off = self
            .sb
            .inode_byte(ino)
            .filter(|o| o.saturating_add(self.sb.inode_size) <= self.vol.len)
            .ok_or_else(|| Error::corrupt(format!("XFS inode number {ino} out of range")))?;
        let chunk = off / INODE_CHUNK;
        let mut cache = self.cache.borrow_mut();
        if !cache.contains_key(&chunk) {
            let max = INODE_CACHE_MIN_CHUNKS.max(self.limits.max_alloc >> INODE_CHUNK_LOG);
            if cache.len() >= max {
                cache.clear();
            }
            let start = chunk * INODE_CHUNK;
            #[allow(clippy::cast_possible_truncation)] // at most INODE_CHUNK
            let mut buf = vec![0u8; INODE_CHUNK.min(self.vol.len - start) as usize];
            self.vol
                .read(start, &mut buf, &|| format!("XFS inodes (inode {ino})"))?;
            cache.insert(chunk, buf);
        }
        // Inode size divides the chunk size, so the inode lies within one chunk.
        #[allow(clippy::cast_possible_truncation)]
        let (at, len) = (
            (off - chunk * INODE_CHUNK) as usize,
            self.sb.inode_size as usize,
        );
        Dinode::parse(&cache[&chunk][at..at + len], ino, &self.sb)
    }

    fn runs(&self, ino: u64, d: &Dinode) -> Result<Vec<Run>> {
        if d.realtime && self.sb.has_realtime {
            return Err(Error::unsupported(format!(
                "XFS inode {ino}: data on the realtime device"
            )));
        }
        let m = Mapper {
            vol: &self.vol,
            sb: &self.sb,
            limits: self.limits,
            claimed: &self.claimed,
        };
        m.runs(ino, d.format, &d.fork, d.nextents)
    }

    /// File extents on the disk image, cut at `size`; unwritten runs are holes.
    fn extents(&self, runs: &[Run], size: u64) -> Vec<FileExtent> {
        let bs = self.sb.block_size;
        let mut out: Vec<FileExtent> = Vec::with_capacity(runs.len());
        for r in runs.iter().filter(|r| !r.unwritten) {
            let Some(fo) = r.logical.checked_mul(bs).filter(|&f| f < size) else {
                continue;
            };
            // runs() checked the run lies inside its allocation group.
            let disk = self.vol.base + self.sb.fsb_to_byte(r.fsb, r.count).unwrap_or(0);
            let len = r.count.saturating_mul(bs).min(size - fo);
            match out.last_mut() {
                Some(l) if l.file_offset + l.length == fo && l.disk_offset + l.length == disk => {
                    l.length += len;
                }
                _ => out.push(FileExtent {
                    file_offset: fo,
                    disk_offset: disk,
                    length: len,
                }),
            }
        }
        out
    }

    /// Builds the entry for inode `ino`; a mapping problem is returned beside the entry (which
    /// then has no extents) so the name still appears in the listing.
    fn entry(&self, path: String, ino: u64, d: &Dinode) -> (FileEntry, Option<Error>) {
        let mut e = FileEntry::new(path, d.kind(), ino);
        e.size = d.size;
        e.mode = Some(u32::from(d.mode));
        e.uid = Some(d.uid);
        e.gid = Some(d.gid);
        e.nlink = Some(d.nlink);
        e.atime = Some(d.atime);
        e.mtime = Some(d.mtime);
        e.ctime = Some(d.ctime);
        e.crtime = d.crtime;
        let err = match e.kind {
            FileKind::File if d.format == XFS_DINODE_FMT_LOCAL => match d.local_bytes(ino) {
                Ok(b) => {
                    e.inline_data = Some(b.to_vec());
                    None
                }
                Err(err) => Some(err),
            },
            FileKind::File => {
                if let Some(x) = self.linked.borrow().get(&ino) {
                    e.extents = x.clone();
                    return (e, None);
                }
                match self.runs(ino, d) {
                    Ok(r) => {
                        e.extents = self.extents(&r, d.size);
                        if d.nlink > 1 {
                            self.linked.borrow_mut().insert(ino, e.extents.clone());
                        }
                        None
                    }
                    Err(err) => Some(err),
                }
            }
            FileKind::Symlink => match self.symlink(ino, d) {
                Ok(t) => {
                    e.symlink_target = Some(t);
                    None
                }
                Err(err) => Some(err),
            },
            _ => None,
        };
        (e, err)
    }

    fn symlink(&self, ino: u64, d: &Dinode) -> Result<String> {
        if d.size == 0 || d.size > XFS_SYMLINK_MAXLEN {
            return Err(Error::corrupt(format!(
                "XFS symlink {ino}: length {}",
                d.size
            )));
        }
        if d.format == XFS_DINODE_FMT_LOCAL {
            return Ok(String::from_utf8_lossy(d.local_bytes(ino)?).into_owned());
        }
        // Below XFS_SYMLINK_MAXLEN.
        #[allow(clippy::cast_possible_truncation)]
        let want = d.size as usize;
        let bs = self.sb.block_size;
        let mut target = Vec::with_capacity(want);
        for r in self.runs(ino, d)? {
            if target.len() >= want {
                break;
            }
            if r.unwritten || r.count > 4 {
                return Err(Error::corrupt(format!("XFS symlink {ino}: bad block map")));
            }
            // One mapping is read as one buffer; on v5 it starts with a header whose CRC
            // covers the whole buffer.
            #[allow(clippy::cast_possible_truncation)] // at most 4 blocks of 64 KiB
            let mut buf = vec![0u8; (r.count * bs) as usize];
            let off = self.sb.fsb_to_byte(r.fsb, r.count).unwrap_or(0);
            let what = || format!("XFS symlink {ino} block");
            self.vol.read(off, &mut buf, &what)?;
            let body = if self.sb.v5 {
                if be32(&buf, 0) != XFS_SYMLINK_MAGIC {
                    return Err(Error::corrupt(format!("{}: bad magic", what())));
                }
                check_crc(&buf, XFS_SYMLINK_CRC_OFFSET, &what)?;
                if be64(&buf, 32) != ino {
                    return Err(Error::corrupt(format!(
                        "{}: owned by another inode",
                        what()
                    )));
                }
                let n = be32(&buf, 8) as usize;
                buf.get(XFS_SYMLINK_HDR_LEN..XFS_SYMLINK_HDR_LEN.saturating_add(n))
                    .ok_or_else(|| Error::corrupt(format!("{}: {n} bytes", what())))?
            } else {
                &buf[..]
            };
            let take = body.len().min(want - target.len());
            target.extend_from_slice(&body[..take]);
        }
        if target.len() < want {
            return Err(Error::corrupt(format!(
                "XFS symlink {ino}: target cut short"
            )));
        }
        Ok(String::from_utf8_lossy(&target).into_owned())
    }

    /// The (inode, name) pairs of a directory, without `.` and `..`. Damaged blocks are
    /// skipped and returned as errors beside the entries that could be read.
    fn read_dir(&self, ino: u64, d: &Dinode) -> Result<(Vec<DirName>, Vec<Error>)> {
        let mut out = Vec::new();
        if d.format == XFS_DINODE_FMT_LOCAL {
            dir::shortform(d.local_bytes(ino)?, ino, self.sb.ftype, &mut out)?;
            return Ok((out, Vec::new()));
        }
        let runs = self.runs(ino, d)?;
        let mut claimed = self.claimed.borrow_mut();
        dir::read_blocks(&self.vol, &self.sb, self.limits, ino, &runs, &mut |off| {
            claimed.insert(off)
        })
    }
}

/// Lists the file system in `part` depth first, directories' entries before their subtrees.
pub(crate) fn walk(
    r: &dyn ReadAt,
    part: &Partition,
    limits: &Limits,
    sink: &mut Sink,
) -> Result<()> {
    let fs = Xfs::open(r, part, limits)?;
    sink.report.xfs_log = Some(log::state(&fs.vol, &fs.sb));
    let root_ino = fs.sb.root_ino;
    let root = fs.inode(root_ino)?;
    if root.kind() != FileKind::Dir {
        return Err(Error::corrupt("XFS root inode is not a directory"));
    }
    let (e, err) = fs.entry("/".into(), root_ino, &root);
    if let Some(err) = err {
        sink.error("/", err);
    }
    if sink.emit(e).is_break() {
        return Ok(());
    }
    let mut visited = HashSet::from([root_ino]);
    let mut stack = vec![(root_ino, root, "/".to_string(), 0u32)];
    while let Some((ino, d, path, depth)) = stack.pop() {
        let (names, errs) = match fs.read_dir(ino, &d) {
            Ok(x) => x,
            Err(e) => {
                sink.error(&path, e);
                continue;
            }
        };
        for e in errs {
            sink.error(&path, e);
        }
        for (child, name) in names {
            let name = String::from_utf8_lossy(&name);
            let cpath = match join(&path, &name, limits) {
                Ok(p) => p,
                Err(e) => {
                    sink.error(&path, e);
                    continue;
                }
            };
            let cd = match fs.inode(child) {
                Ok(i) if i.mode != 0 => i,
                Ok(_) => {
                    sink.error(&cpath, Error::corrupt(format!("XFS inode {child} is free")));
                    continue;
                }
                Err(e) => {
                    sink.error(&cpath, e);
                    continue;
                }
            };
            let (entry, err) = fs.entry(cpath.clone(), child, &cd);
            if let Some(err) = err {
                sink.error(&cpath, err);
            }
            let is_dir = entry.kind == FileKind::Dir;
            if sink.emit(entry) == ControlFlow::Break(()) {
                return Ok(());
            }
            if is_dir && sink.descend(&cpath) {
                if depth + 1 > limits.max_depth {
                    sink.error(&cpath, Error::limit("directory deeper than max_depth"));
                } else if !visited.insert(child) {
                    sink.error(
                        &cpath,
                        Error::corrupt(format!("directory cycle: inode {child} seen before")),
                    );
                } else {
                    stack.push((child, cd, cpath, depth + 1));
                }
            }
        }
    }
    Ok(())
}
