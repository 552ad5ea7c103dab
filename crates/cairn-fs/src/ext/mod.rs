//! ext2, ext3 and ext4, read-only.
//!
//! | piece | handled |
//! |---|---|
//! | superblock, group descriptors | 32- and 64-byte descriptors (`64bit`), `meta_bg`, `flex_bg` (tables anywhere) |
//! | inodes | 128-byte and larger; nanosecond and extended-epoch times, creation time |
//! | data | extent trees (any depth up to the limit), indirect maps, unwritten extents as holes, inline data |
//! | directories | linear and htree (leaf blocks read linearly), inline directories |
//! | symlinks | fast (in `i_block`), slow (a data block), inline |
//! | journal | committed jbd2 transactions replayed in memory ([`journal`]) when `needs_recovery` is set |
//!
//! Invariants: all metadata is read through [`volume::Volume`] (journal overlay applied);
//! inode tables are read in [`INODE_CHUNK`]-byte pieces and cached, so a walk costs about one
//! read per chunk of inodes plus one per directory run; nothing is allocated from an on-disk
//! count without a [`Limits`] check. A damaged directory or inode costs that subtree (an error
//! in the report), never the walk; a damaged superblock, group table or root fails the walk.

mod journal;
mod map;
mod volume;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

use cairn_types::ReadAt;

use crate::format::*;
use crate::util::{Sink, join, le16, le32};
use crate::{Error, FileEntry, FileExtent, FileKind, FsKind, Limits, Partition, Result};

use map::{Mapper, Run, inline_xattr};
use volume::Volume;

const INODE_CHUNK_LOG: u32 = 18;
/// Inode-table bytes read (and cached) at once.
const INODE_CHUNK: u64 = 1 << INODE_CHUNK_LOG;
/// Fewest inode chunks cached before the cache is dropped (64 MiB); more up to
/// `Limits::max_alloc`, so the inode tables of file systems up to about a million inodes are
/// read only once per walk.
const INODE_CACHE_MIN_CHUNKS: usize = 256;
/// Longest symlink target read from data blocks.
const MAX_SYMLINK: u64 = 64 << 10;

/// The kind of ext file system whose superblock (1024 bytes) is `sb`, if it is one.
pub(crate) fn probe(sb: &[u8]) -> Option<FsKind> {
    if le16(sb, 0x38) != EXT_MAGIC || le32(sb, 0x18) > 6 {
        return None;
    }
    let (compat, incompat, ro) = (le32(sb, 0x5C), le32(sb, 0x60), le32(sb, 0x64));
    if incompat & EXT_INCOMPAT_JOURNAL_DEV != 0 {
        return None;
    }
    let ext4_incompat = EXT_INCOMPAT_EXTENTS | EXT_INCOMPAT_64BIT | EXT_INCOMPAT_FLEX_BG;
    let ext4_ro = EXT_RO_COMPAT_HUGE_FILE | EXT_RO_COMPAT_GDT_CSUM | EXT_RO_COMPAT_METADATA_CSUM;
    Some(if incompat & ext4_incompat != 0 || ro & ext4_ro != 0 {
        FsKind::Ext4
    } else if compat & EXT_COMPAT_HAS_JOURNAL != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    })
}

struct Super {
    block_size: u64,
    blocks_count: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    inodes_per_group: u64,
    inodes_count: u64,
    inode_size: u64,
    compat: u32,
    incompat: u32,
    ro_compat: u32,
    desc_size: u64,
    journal_inum: u32,
    first_meta_bg: u64,
    groups: u64,
}

impl Super {
    fn parse(b: &[u8], limits: &Limits) -> Result<Self> {
        if le16(b, 0x38) != EXT_MAGIC {
            return Err(Error::corrupt("ext superblock magic"));
        }
        let log = le32(b, 0x18);
        if log > 6 {
            return Err(Error::corrupt(format!("ext block size 2^(10+{log})")));
        }
        let block_size = 1024u64 << log;
        let incompat = le32(b, 0x60);
        let is64 = incompat & EXT_INCOMPAT_64BIT != 0;
        let blocks_count = u64::from(le32(b, 0x4))
            | if is64 {
                u64::from(le32(b, 0x150)) << 32
            } else {
                0
            };
        let rev = le32(b, 0x4C);
        let inode_size = if rev == 0 {
            128
        } else {
            u64::from(le16(b, 0x58))
        };
        let desc_size = if is64 { u64::from(le16(b, 0xFE)) } else { 32 };
        let s = Super {
            block_size,
            blocks_count,
            first_data_block: u64::from(le32(b, 0x14)),
            blocks_per_group: u64::from(le32(b, 0x20)),
            inodes_per_group: u64::from(le32(b, 0x28)),
            inodes_count: u64::from(le32(b, 0x0)),
            inode_size,
            compat: le32(b, 0x5C),
            incompat,
            ro_compat: le32(b, 0x64),
            desc_size,
            journal_inum: le32(b, 0xE0),
            first_meta_bg: u64::from(le32(b, 0x104)),
            groups: 0,
        };
        // With bigalloc the bitmaps count clusters of 2^(log_cluster - log) blocks.
        let ratio = if s.ro_compat & EXT_RO_COMPAT_BIGALLOC != 0 {
            1u64 << le32(b, 0x1C).saturating_sub(log).min(16)
        } else {
            1
        };
        let bits = block_size * 8;
        if s.blocks_per_group == 0
            || s.blocks_per_group > bits * ratio
            || s.inodes_per_group == 0
            || s.inodes_per_group > bits
            || s.inode_size < 128
            || s.inode_size > block_size
            || !s.inode_size.is_power_of_two()
            || s.desc_size < 32
            || s.desc_size > 1024
            || !s.desc_size.is_power_of_two()
            || s.first_data_block >= s.blocks_count
            || s.blocks_count.checked_mul(block_size).is_none()
        {
            return Err(Error::corrupt("ext superblock geometry"));
        }
        if incompat & EXT_INCOMPAT_COMPRESSION != 0 {
            return Err(Error::unsupported("ext compression"));
        }
        if incompat & EXT_INCOMPAT_JOURNAL_DEV != 0 {
            return Err(Error::unsupported("ext external journal device"));
        }
        let groups = (s.blocks_count - s.first_data_block).div_ceil(s.blocks_per_group);
        if groups.saturating_mul(s.desc_size) > limits.max_alloc as u64 {
            return Err(Error::limit(format!("ext: {groups} block groups")));
        }
        if s.inodes_count > groups * s.inodes_per_group {
            return Err(Error::corrupt("ext inode count exceeds the groups' tables"));
        }
        Ok(Self { groups, ..s })
    }

    /// Group `g` holds a superblock backup (and so group descriptor copies).
    fn has_super(&self, g: u64) -> bool {
        if self.ro_compat & EXT_RO_COMPAT_SPARSE_SUPER == 0 || g <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut x = g;
            while x.is_multiple_of(p) {
                x /= p;
            }
            x == 1
        })
    }

    /// Block holding group descriptor block `i`.
    fn desc_block(&self, i: u64) -> u64 {
        let per_block = self.block_size / self.desc_size;
        // The superblock's own block (1 with 1 KiB blocks, even when bigalloc makes
        // first_data_block 0), then the descriptors.
        let sb_block = EXT_SUPERBLOCK_OFFSET / self.block_size;
        if self.incompat & EXT_INCOMPAT_META_BG == 0 || i < self.first_meta_bg {
            return sb_block + 1 + i;
        }
        let g = i * per_block;
        let first = self.first_data_block + g * self.blocks_per_group;
        first + u64::from(self.has_super(g)) + u64::from(g == 0 && first < sb_block)
    }
}

/// The parts of an on-disk inode the reader uses.
struct Inode {
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    links: u16,
    flags: u32,
    i_block: [u8; EXT_I_BLOCK_LEN],
    atime: i64,
    ctime: i64,
    mtime: i64,
    crtime: Option<i64>,
    /// Bytes of inline data past `i_block` (the `system.data` attribute).
    inline_tail: Vec<u8>,
}

fn ext_time(secs: u32, extra: Option<u32>) -> i64 {
    // Without the extra field the seconds are signed 32-bit (times before 1970).
    let mut s = i64::from(secs.cast_signed());
    let mut ns = 0;
    if let Some(x) = extra {
        s += i64::from(x & 3) << 32;
        ns = i64::from(x >> 2);
    }
    s.saturating_mul(1_000_000_000).saturating_add(ns)
}

impl Inode {
    fn parse(b: &[u8]) -> Self {
        let extra_isize = if b.len() > 128 {
            (le16(b, 0x80) as usize).min(b.len() - 128)
        } else {
            0
        };
        let extra = |off: usize| (extra_isize >= off + 4 - 128).then(|| le32(b, off));
        let mut i_block = [0u8; EXT_I_BLOCK_LEN];
        i_block.copy_from_slice(&b[0x28..0x28 + EXT_I_BLOCK_LEN]);
        let flags = le32(b, 0x20);
        let inline_tail = if flags & EXT_INODE_FLAG_INLINE_DATA != 0 && b.len() > 128 {
            let body = &b[(128 + extra_isize + 3) & !3..];
            inline_xattr(body).map(<[u8]>::to_vec).unwrap_or_default()
        } else {
            Vec::new()
        };
        Self {
            mode: le16(b, 0),
            uid: u32::from(le16(b, 2)) | u32::from(le16(b, 0x78)) << 16,
            gid: u32::from(le16(b, 0x18)) | u32::from(le16(b, 0x7A)) << 16,
            size: u64::from(le32(b, 4)) | u64::from(le32(b, 0x6C)) << 32,
            links: le16(b, 0x1A),
            flags,
            i_block,
            atime: ext_time(le32(b, 0x8), extra(0x8C)),
            ctime: ext_time(le32(b, 0xC), extra(0x84)),
            mtime: ext_time(le32(b, 0x10), extra(0x88)),
            crtime: extra(0x90).map(|s| ext_time(s, extra(0x94))),
            inline_tail,
        }
    }

    fn kind(&self) -> FileKind {
        match self.mode & 0o170000 {
            0o100000 => FileKind::File,
            0o040000 => FileKind::Dir,
            0o120000 => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }

    fn is_inline(&self) -> bool {
        self.flags & EXT_INODE_FLAG_INLINE_DATA != 0
    }

    /// Inline content: `i_block` then the `system.data` tail, cut at `size`.
    fn inline_data(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.size.min(4096) as usize);
        v.extend_from_slice(&self.i_block);
        v.extend_from_slice(&self.inline_tail);
        v.truncate(usize::try_from(self.size).unwrap_or(usize::MAX));
        v
    }
}

pub(crate) struct Ext<'a> {
    vol: Volume<'a>,
    sb: Super,
    /// Inode table block of each group.
    itables: Vec<u64>,
    cache: HashMap<u64, Vec<u8>>,
    limits: &'a Limits,
    /// Mapping and directory blocks read so far: each may be read once per walk.
    claimed: RefCell<HashSet<u64>>,
    /// Extents of hard-linked files already mapped (their blocks are claimed).
    linked: RefCell<HashMap<u32, (Vec<FileExtent>, bool)>>,
}

impl<'a> Ext<'a> {
    /// Opens the file system and replays its journal; replay problems go to `sink`.
    fn open(
        r: &'a dyn ReadAt,
        part: &Partition,
        limits: &'a Limits,
        sink: &mut Sink,
    ) -> Result<Self> {
        let mut vol = Volume::new(r, part.offset, part.length, 1024);
        let mut sbuf = vec![0u8; EXT_SUPERBLOCK_LEN];
        vol.read(EXT_SUPERBLOCK_OFFSET, &mut sbuf, &|| {
            "ext superblock".into()
        })?;
        let sb = Super::parse(&sbuf, limits)?;
        vol.block_size = sb.block_size;
        let mut fs = Self {
            itables: Vec::new(),
            vol,
            sb,
            cache: HashMap::new(),
            limits,
            claimed: RefCell::default(),
            linked: RefCell::default(),
        };
        fs.itables = fs.read_groups()?;
        if fs.sb.incompat & EXT_INCOMPAT_RECOVER != 0 {
            match fs.replay() {
                Ok((tx, blocks)) => {
                    sink.report.journal_transactions = tx;
                    sink.report.journal_blocks = blocks;
                }
                Err(e) => sink.error("", e),
            }
        }
        Ok(fs)
    }

    fn read_groups(&self) -> Result<Vec<u64>> {
        let sb = &self.sb;
        let per_block = sb.block_size / sb.desc_size;
        let nblocks = sb.groups.div_ceil(per_block);
        // Parsing bounded groups * desc_size by max_alloc, a usize.
        let mut out = Vec::with_capacity(usize::try_from(sb.groups).unwrap_or(0));
        let mut buf = vec![0u8; self.vol.block_len()];
        for i in 0..nblocks {
            self.vol.read_block(sb.desc_block(i), &mut buf, &|| {
                format!("ext group descriptor block {i}")
            })?;
            #[allow(clippy::cast_possible_truncation)] // 32 to 1024
            for d in buf.chunks_exact(sb.desc_size as usize) {
                if out.len() as u64 == sb.groups {
                    break;
                }
                let hi = if sb.desc_size >= 64 {
                    u64::from(le32(d, 0x28))
                } else {
                    0
                };
                out.push(u64::from(le32(d, 0x8)) | hi << 32);
            }
        }
        Ok(out)
    }

    /// Replays the internal journal, then re-reads the superblock and group table through it.
    fn replay(&mut self) -> Result<(u64, u64)> {
        if self.sb.compat & EXT_COMPAT_HAS_JOURNAL == 0 || self.sb.journal_inum == 0 {
            return Err(Error::unsupported(
                "ext needs recovery but has no internal journal (external journals are not replayed)",
            ));
        }
        let jino = self.sb.journal_inum;
        let inode = self.inode(jino)?;
        let nblocks = inode.size.div_ceil(self.sb.block_size);
        let runs = self.runs(jino, &inode, nblocks)?;
        let rep = journal::replay(&self.vol, &runs, self.limits)?;
        if rep.overlay.is_empty() {
            return Ok((rep.transactions, 0));
        }
        let blocks = rep.overlay.len() as u64;
        self.vol.overlay = rep.overlay;
        self.vol.magic_disk = rep.magic_disk;
        self.cache.clear();
        let mut sbuf = vec![0u8; EXT_SUPERBLOCK_LEN];
        self.vol.read(EXT_SUPERBLOCK_OFFSET, &mut sbuf, &|| {
            "ext superblock (replayed)".into()
        })?;
        self.sb = Super::parse(&sbuf, self.limits)?;
        self.itables = self.read_groups()?;
        Ok((rep.transactions, blocks))
    }

    fn inode(&mut self, ino: u32) -> Result<Inode> {
        let sb = &self.sb;
        let ino64 = u64::from(ino);
        if ino == 0 || ino64 > sb.inodes_count {
            return Err(Error::corrupt(format!(
                "ext inode number {ino} out of range"
            )));
        }
        let group = (ino64 - 1) / sb.inodes_per_group;
        let index = (ino64 - 1) % sb.inodes_per_group;
        let table = usize::try_from(group)
            .ok()
            .and_then(|g| self.itables.get(g).copied())
            .ok_or_else(|| Error::corrupt(format!("ext inode {ino}: no group {group}")))?;
        let off = table
            .checked_mul(sb.block_size)
            .and_then(|t| t.checked_add(index * sb.inode_size))
            .filter(|&o| o.saturating_add(sb.inode_size) <= self.vol.len)
            .ok_or_else(|| {
                Error::corrupt(format!("ext inode {ino}: table outside the partition"))
            })?;
        let chunk = off / INODE_CHUNK;
        if !self.cache.contains_key(&chunk) {
            let max = INODE_CACHE_MIN_CHUNKS.max(self.limits.max_alloc >> INODE_CHUNK_LOG);
            if self.cache.len() >= max {
                self.cache.clear();
            }
            let start = chunk * INODE_CHUNK;
            let len = INODE_CHUNK.min(self.vol.len - start);
            #[allow(clippy::cast_possible_truncation)] // at most INODE_CHUNK
            let mut buf = vec![0u8; len as usize];
            self.vol.read(start, &mut buf, &|| {
                format!("ext inode table (inode {ino})")
            })?;
            self.cache.insert(chunk, buf);
        }
        let buf = &self.cache[&chunk];
        // Below INODE_CHUNK, and the inode size is at most the block size.
        #[allow(clippy::cast_possible_truncation)]
        let (at, len) = ((off - chunk * INODE_CHUNK) as usize, sb.inode_size as usize);
        Ok(Inode::parse(&buf[at..at + len]))
    }

    /// Block runs of an extent or block-mapped inode, bounded to `nblocks` logical blocks.
    fn runs(&self, ino: u32, inode: &Inode, nblocks: u64) -> Result<Vec<Run>> {
        if inode.flags & EXT_INODE_FLAG_ENCRYPT != 0 && inode.kind() != FileKind::File {
            return Err(Error::unsupported(format!("ext inode {ino} is encrypted")));
        }
        let m = Mapper::new(
            &self.vol,
            self.sb.blocks_count,
            self.limits,
            ino,
            &self.claimed,
        );
        if inode.flags & EXT_INODE_FLAG_EXTENTS != 0 {
            m.extents(&inode.i_block, nblocks)
        } else {
            m.indirect(&inode.i_block, nblocks)
        }
    }

    /// File extents on the disk image, cut at `size`, with replayed blocks pointing at their
    /// journal copies. Returns (extents, some block came from the journal).
    fn extents(&self, runs: &[Run], size: u64) -> Result<(Vec<FileExtent>, bool)> {
        let bs = self.sb.block_size;
        let mut out: Vec<FileExtent> = Vec::with_capacity(runs.len());
        let mut journaled = false;
        let mut push = |file_offset: u64, disk_offset: u64, length: u64| {
            if let Some(l) = out.last_mut()
                && l.file_offset + l.length == file_offset
                && l.disk_offset + l.length == disk_offset
            {
                l.length += length;
            } else {
                out.push(FileExtent {
                    file_offset,
                    disk_offset,
                    length,
                });
            }
        };
        for r in runs {
            let fo = r.logical * bs;
            if fo >= size {
                break;
            }
            let len = (r.count * bs).min(size - fo);
            if self.vol.overlay.is_empty() {
                push(fo, self.vol.base + r.phys * bs, len);
                continue;
            }
            for i in 0..r.count {
                let bfo = fo + i * bs;
                if bfo >= fo + len {
                    break;
                }
                let blen = bs.min(fo + len - bfo);
                match self.vol.overlay.get(&(r.phys + i)) {
                    Some(c) if c.escaped => {
                        // The copy's first 4 bytes were zeroed; the jbd2 magic they stood
                        // for is at the start of the journal superblock.
                        journaled = true;
                        let head = blen.min(4);
                        push(bfo, self.vol.magic_disk, head);
                        if blen > head {
                            push(bfo + head, c.disk + head, blen - head);
                        }
                    }
                    Some(c) => {
                        journaled = true;
                        push(bfo, c.disk, blen);
                    }
                    None => push(bfo, self.vol.base + (r.phys + i) * bs, blen),
                }
            }
        }
        Ok((out, journaled))
    }

    /// Builds the entry for `inode`; a mapping problem is returned beside the entry (which
    /// then has no extents) so the name still appears in the listing.
    fn entry(&self, path: String, ino: u32, inode: &Inode) -> (FileEntry, Option<Error>) {
        let mut e = FileEntry::new(path, inode.kind(), u64::from(ino));
        e.size = inode.size;
        e.mode = Some(u32::from(inode.mode));
        e.uid = Some(inode.uid);
        e.gid = Some(inode.gid);
        e.nlink = Some(u32::from(inode.links));
        e.atime = Some(inode.atime);
        e.ctime = Some(inode.ctime);
        e.mtime = Some(inode.mtime);
        e.crtime = inode.crtime;
        let err = match e.kind {
            FileKind::File => {
                if inode.is_inline() {
                    e.inline_data = Some(inode.inline_data());
                    None
                } else if let Some((x, j)) = self.linked.borrow().get(&ino) {
                    e.extents = x.clone();
                    e.data_from_journal = *j;
                    None
                } else {
                    let nblocks = inode.size.div_ceil(self.sb.block_size);
                    match self
                        .runs(ino, inode, nblocks)
                        .and_then(|r| self.extents(&r, inode.size))
                    {
                        Ok((x, j)) => {
                            if inode.links > 1 {
                                self.linked.borrow_mut().insert(ino, (x.clone(), j));
                            }
                            e.extents = x;
                            e.data_from_journal = j;
                            None
                        }
                        Err(err) => Some(err),
                    }
                }
            }
            FileKind::Symlink => match self.symlink(ino, inode) {
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

    fn symlink(&self, ino: u32, inode: &Inode) -> Result<String> {
        let size = inode.size;
        let bytes = if inode.is_inline() {
            inode.inline_data()
        } else if inode.flags & EXT_INODE_FLAG_EXTENTS == 0 && size < EXT_I_BLOCK_LEN as u64 {
            inode
                .i_block
                .get(..usize::try_from(size).unwrap_or(0))
                .unwrap_or_default()
                .to_vec()
        } else {
            let len = usize::try_from(size)
                .ok()
                .filter(|_| size <= MAX_SYMLINK)
                .ok_or_else(|| Error::limit(format!("ext inode {ino}: symlink of {size} bytes")))?;
            let bs = self.sb.block_size;
            let runs = self.runs(ino, inode, size.div_ceil(bs))?;
            let mut v = vec![0u8; len];
            for r in &runs {
                // runs() keeps every run below size.div_ceil(bs) blocks: within v.
                #[allow(clippy::cast_possible_truncation)]
                let (fo, len) = (
                    (r.logical * bs) as usize,
                    (r.count * bs).min(size - r.logical * bs) as usize,
                );
                let dst = &mut v[fo..fo + len];
                self.vol
                    .read(r.phys * bs, dst, &|| format!("ext inode {ino} symlink"))?;
            }
            v
        };
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The (inode, name) pairs of a directory, without `.` and `..`. Damaged blocks are
    /// skipped and returned as errors beside the entries that could be read.
    fn read_dir(&self, ino: u32, inode: &Inode) -> Result<(Vec<DirName>, Vec<Error>)> {
        if inode.flags & EXT_INODE_FLAG_ENCRYPT != 0 {
            return Err(Error::unsupported(format!(
                "ext directory inode {ino} is encrypted"
            )));
        }
        let mut out = Vec::new();
        let mut errs = Vec::new();
        if inode.is_inline() {
            if let Err(e) = parse_dirents(&inode.i_block[4..], ino, &mut out) {
                errs.push(e);
            }
            if let Err(e) = parse_dirents(&inode.inline_tail, ino, &mut out) {
                errs.push(e);
            }
            return Ok((out, errs));
        }
        if inode.size > self.limits.max_dir_bytes {
            return Err(Error::limit(format!(
                "ext directory inode {ino}: {} bytes",
                inode.size
            )));
        }
        let bs = self.sb.block_size;
        let runs = self.runs(ino, inode, inode.size.div_ceil(bs))?;
        {
            let mut claimed = self.claimed.borrow_mut();
            for r in &runs {
                for b in r.phys..r.phys + r.count {
                    if !claimed.insert(b) {
                        return Err(Error::corrupt(format!(
                            "ext directory inode {ino}: block {b} is used twice"
                        )));
                    }
                }
            }
        }
        let mut buf = Vec::new();
        for r in &runs {
            let mut done = 0;
            while done < r.count {
                // At most 1 MiB per read.
                let n = (r.count - done).min((1 << 20) / bs);
                #[allow(clippy::cast_possible_truncation)] // at most 1 MiB
                buf.resize((n * bs) as usize, 0);
                if let Err(e) = self.vol.read_block(r.phys + done, &mut buf, &|| {
                    format!("ext directory inode {ino}")
                }) {
                    errs.push(e);
                    done += n;
                    continue;
                }
                for block in buf.chunks_exact(self.vol.block_len()) {
                    if let Err(e) = parse_dirents(block, ino, &mut out) {
                        errs.push(e);
                    }
                }
                done += n;
            }
        }
        Ok((out, errs))
    }
}

/// A directory entry: (inode, name bytes).
type DirName = (u32, Vec<u8>);

/// Appends the live entries of one directory block (or inline area) to `out`.
fn parse_dirents(b: &[u8], ino: u32, out: &mut Vec<DirName>) -> Result<()> {
    let mut at = 0usize;
    while at + 8 <= b.len() {
        let child = le32(b, at);
        let mut rec_len = le16(b, at + 4) as usize;
        if (rec_len == 0 || rec_len == 65535) && b.len() == 65536 {
            rec_len = 65536;
        }
        let name_len = b[at + 6] as usize;
        if rec_len < 8
            || !rec_len.is_multiple_of(4)
            || at + rec_len > b.len()
            || 8 + name_len > rec_len
        {
            return Err(Error::corrupt(format!(
                "ext directory inode {ino}: bad entry at byte {at} of a block"
            )));
        }
        let name = &b[at + 8..at + 8 + name_len];
        if child != 0 && name_len > 0 && name != b"." && name != b".." {
            out.push((child, name.to_vec()));
        }
        at += rec_len;
    }
    Ok(())
}

/// Lists the file system in `part` depth first, directories' entries before their subtrees.
pub(crate) fn walk(
    r: &dyn ReadAt,
    part: &Partition,
    limits: &Limits,
    sink: &mut Sink,
) -> Result<()> {
    let mut fs = Ext::open(r, part, limits, sink)?;
    let root = fs.inode(EXT_ROOT_INO)?;
    if root.kind() != FileKind::Dir {
        return Err(Error::corrupt("ext root inode is not a directory"));
    }
    let (e, err) = fs.entry("/".into(), EXT_ROOT_INO, &root);
    if let Some(err) = err {
        sink.error("/", err);
    }
    if sink.emit(e).is_break() {
        return Ok(());
    }
    let mut visited = HashSet::from([EXT_ROOT_INO]);
    let mut stack = vec![(EXT_ROOT_INO, root, "/".to_string(), 0u32)];
    while let Some((ino, inode, path, depth)) = stack.pop() {
        let (names, errs) = match fs.read_dir(ino, &inode) {
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
            let ci = match fs.inode(child) {
                Ok(i) if i.mode != 0 => i,
                Ok(_) => {
                    sink.error(&cpath, Error::corrupt(format!("ext inode {child} is free")));
                    continue;
                }
                Err(e) => {
                    sink.error(&cpath, e);
                    continue;
                }
            };
            let (entry, err) = fs.entry(cpath.clone(), child, &ci);
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
                    stack.push((child, ci, cpath, depth + 1));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext_times_use_epoch_bits_and_nanoseconds() {
        assert_eq!(ext_time(10, None), 10_000_000_000);
        // Pre-1970 seconds are signed; extra epoch bits add 2^32 s; the rest is nanoseconds.
        assert_eq!(ext_time(u32::MAX, None), -1_000_000_000);
        let t = ext_time(5, Some((123 << 2) | 1));
        assert_eq!(t, ((1i64 << 32) + 5) * 1_000_000_000 + 123);
        // The largest value saturates instead of overflowing.
        assert_eq!(ext_time(u32::MAX, Some(u32::MAX)), i64::MAX);
    }

    #[test]
    fn dirents_with_bad_record_lengths_are_errors() {
        let mut b = vec![0u8; 1024];
        b[0..4].copy_from_slice(&12u32.to_le_bytes());
        b[4..6].copy_from_slice(&12u16.to_le_bytes());
        b[6] = 1;
        b[8] = b'a';
        b[12 + 4..12 + 6].copy_from_slice(&3u16.to_le_bytes()); // rec_len 3
        let mut out = Vec::new();
        assert!(parse_dirents(&b, 2, &mut out).is_err());
        assert_eq!(out, [(12, b"a".to_vec())]);
    }
}
