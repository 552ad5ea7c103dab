//! btrfs on a single device, read-only.
//!
//! | piece | handled |
//! |---|---|
//! | superblock | primary copy at 64 KiB; crc32c, xxhash64 and sha256 checksums verified (blake2b: `Unsupported`) |
//! | chunks | bootstrap `sys_chunk_array`, then the chunk tree; SINGLE and DUP (first copy; a tree node whose first copy fails its checks is read from the second); RAID profiles and more than one device: `Unsupported` ("multi-device btrfs not supported") |
//! | trees | every node's checksum, address and fsid verified ([`volume`]); bounded searches ([`tree`]) |
//! | subvolumes | the top level (tree 5) is `/`; subvolumes and snapshots appear where their directory entry (a `ROOT_ITEM` location) links them, each entry tagged with its tree id in [`FileEntry::subvolume`] |
//! | inodes | `INODE_ITEM` (mode, uid, gid, size, nlink, atime, mtime, ctime, otime as creation time) |
//! | directories | `DIR_INDEX` (creation order), `DIR_ITEM` when a directory has no index items |
//! | data | regular extents mapped to image byte ranges (shared/reflinked extents are ordinary extents); holes and prealloc extents read as zeros; inline extents are extents too, pointing into their tree leaf (the copy that was read), so a listing carries no file contents; zlib, zstd and LZO extents, inline or not → [`FileEntry::compressed`] |
//! | symlinks | the target is the inline extent |
//!
//! Paths: the walk starts at the top-level subvolume (id 5), whatever the default subvolume
//! is (the report's `btrfs_default_subvolume` names it), so every subvolume and snapshot
//! appears once, at its place. A subvolume whose tree exists but that no directory links is
//! reported as an error (its files are not listed). Inode numbers repeat across subvolumes
//! (each subvolume's root directory is inode 256): `(subvolume, inode)` identifies a file.
//!
//! Not read: the log tree (fsync log of a crash; its changes are not replayed, and its
//! presence is reported as an `Unsupported` error in the report), extended
//! attributes, data checksums (file data is not verified), the backup superblocks and tree
//! roots, encrypted or otherwise encoded extents (an `Unsupported` error for that file).

mod csum;
mod items;
pub(crate) mod lzo;
mod tree;
mod volume;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

use cairn_types::ReadAt;

use crate::format::*;
use crate::util::{Sink, join};
use crate::{
    CompressedExtent, Compression, Error, ErrorKind, FileEntry, FileExtent, FileKind, Limits,
    Partition, Result,
};

use items::{DirEntry, ExtentItem, InodeItem, RootItem};
use tree::Key;
use volume::Volume;

/// Whether a btrfs superblock magic is at 64 KiB of the partition at `offset`.
pub(crate) fn probe(r: &dyn ReadAt, offset: u64, length: u64) -> bool {
    let mut magic = [0u8; 8];
    length >= BTRFS_SUPERBLOCK_OFFSET + BTRFS_SUPERBLOCK_LEN as u64
        && r.read_exact_at(
            &mut magic,
            offset + BTRFS_SUPERBLOCK_OFFSET + BTRFS_MAGIC_OFFSET as u64,
        )
        .is_ok()
        && magic == BTRFS_MAGIC
}

/// A tree's root node: (logical address, level).
type Root = (u64, u8);

struct Btrfs<'a> {
    vol: Volume<'a>,
    limits: &'a Limits,
    /// Subvolume trees found so far.
    trees: RefCell<HashMap<u64, Root>>,
}

impl Btrfs<'_> {
    fn root_tree(&self) -> Root {
        (self.vol.sb.root, self.vol.sb.root_level)
    }

    /// The live `ROOT_ITEM` of tree `id` (the one with the highest key offset).
    fn root_item(&self, id: u64) -> Result<Option<RootItem>> {
        let (lo, hi) = Key::all(id, BTRFS_ROOT_ITEM_KEY);
        let mut last = None;
        let (root, level) = self.root_tree();
        tree::range(&self.vol, root, level, lo, hi, &mut |_, d, _| {
            last = Some(d.to_vec());
            Ok(ControlFlow::Continue(()))
        })?;
        last.map(|d| RootItem::parse(&d)).transpose()
    }

    /// The root node of subvolume tree `id`.
    fn tree(&self, id: u64) -> Result<Root> {
        if let Some(r) = self.trees.borrow().get(&id) {
            return Ok(*r);
        }
        let item = self
            .root_item(id)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("btrfs subvolume {id}")))?;
        if item.refs == 0 {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("btrfs subvolume {id} is deleted"),
            ));
        }
        if item.level > BTRFS_MAX_LEVEL {
            return Err(Error::corrupt(format!(
                "btrfs subvolume {id}: root level {}",
                item.level
            )));
        }
        let root = (item.bytenr, item.level);
        self.trees.borrow_mut().insert(id, root);
        Ok(root)
    }

    /// The default subvolume: the `default` entry of the root tree's directory, else 5.
    fn default_subvolume(&self) -> Result<u64> {
        let (lo, hi) = Key::all(self.vol.sb.root_dir_objectid, BTRFS_DIR_ITEM_KEY);
        let mut names = Vec::new();
        for (_, d, _) in tree::items(&self.vol, self.root_tree(), (lo, hi), 1024, 1 << 20)? {
            items::parse_dir(&d, &mut names)?;
        }
        Ok(names
            .iter()
            .find(|n| n.name == b"default")
            .map_or(BTRFS_FS_TREE_OBJECTID, |n| n.location.objectid))
    }

    /// Ids of the live subvolume and snapshot trees.
    fn subvolume_ids(&self) -> Result<Vec<u64>> {
        let lo = Key::new(BTRFS_FIRST_FREE_OBJECTID, BTRFS_ROOT_ITEM_KEY, 0);
        let hi = Key::new(BTRFS_LAST_FREE_OBJECTID, BTRFS_ROOT_ITEM_KEY, u64::MAX);
        let mut ids = Vec::new();
        let max = self.limits.max_entries;
        let (root, level) = self.root_tree();
        tree::range(&self.vol, root, level, lo, hi, &mut |k, d, _| {
            if k.ty == BTRFS_ROOT_ITEM_KEY
                && ids.last() != Some(&k.objectid)
                && RootItem::parse(d).is_ok_and(|r| r.refs > 0)
            {
                if ids.len() as u64 >= max {
                    return Err(Error::limit("btrfs: more subvolumes than max_entries"));
                }
                ids.push(k.objectid);
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(ids)
    }

    /// The name subvolume `id` has in its parent (its first `ROOT_BACKREF`), for messages.
    fn backref_name(&self, id: u64) -> Option<String> {
        let (lo, hi) = Key::all(id, BTRFS_ROOT_BACKREF_KEY);
        let (_, d) = tree::first(&self.vol, self.root_tree(), lo, hi).ok()??;
        let len = usize::from(crate::util::le16(&d, 16));
        let name = d.get(BTRFS_ROOT_REF_HEADER_LEN..BTRFS_ROOT_REF_HEADER_LEN + len)?;
        Some(String::from_utf8_lossy(name).into_owned())
    }

    fn inode(&self, root: Root, ino: u64) -> Result<InodeItem> {
        let (lo, hi) = Key::all(ino, BTRFS_INODE_ITEM_KEY);
        match tree::first(&self.vol, root, lo, hi)? {
            Some((_, d)) => InodeItem::parse(&d),
            None => Err(Error::corrupt(format!(
                "btrfs inode {ino} has no inode item"
            ))),
        }
    }

    /// The entry of inode `ino` of subvolume `sub`; a data problem comes back beside the
    /// entry (which then has no data) so the name still appears in the listing.
    fn entry(
        &self,
        sub: u64,
        root: Root,
        ino: u64,
        path: String,
    ) -> Result<(FileEntry, Option<Error>)> {
        let i = self.inode(root, ino)?;
        let mut e = FileEntry::new(path, i.kind(), ino);
        e.size = i.size;
        e.mode = Some(i.mode);
        e.uid = Some(i.uid);
        e.gid = Some(i.gid);
        e.nlink = Some(i.nlink);
        e.atime = Some(i.atime);
        e.mtime = Some(i.mtime);
        e.ctime = Some(i.ctime);
        e.crtime = Some(i.otime);
        e.subvolume = Some(sub);
        let err = match e.kind {
            FileKind::File => self.data(root, ino, &mut e).err(),
            FileKind::Symlink => match self.data(root, ino, &mut e) {
                Ok(()) => match e.inline_data.take() {
                    Some(t) => {
                        e.symlink_target = Some(String::from_utf8_lossy(&t).into_owned());
                        None
                    }
                    None => Some(Error::corrupt(format!(
                        "btrfs symlink inode {ino} has no inline target"
                    ))),
                },
                Err(err) => Some(err),
            },
            _ => None,
        };
        if err.is_some() {
            e.extents.clear();
            e.compressed.clear();
            e.inline_data = None;
        }
        Ok((e, err))
    }

    /// Fills the data fields of `e` from the inode's `EXTENT_DATA` items.
    fn data(&self, root: Root, ino: u64, e: &mut FileEntry) -> Result<()> {
        let max = self.limits.max_extents_per_file;
        let bytes = self.limits.max_alloc as u64;
        let list = tree::items(
            &self.vol,
            root,
            Key::all(ino, BTRFS_EXTENT_DATA_KEY),
            max,
            bytes,
        )?;
        let size = e.size;
        let mut end = 0u64; // file offset covered so far
        for (k, d, place) in &list {
            let at = k.offset;
            if at < end {
                return Err(Error::corrupt(format!(
                    "btrfs inode {ino}: extent at {at} overlaps the previous one"
                )));
            }
            match ExtentItem::parse(d)? {
                ExtentItem::Inline {
                    compression,
                    ram_bytes,
                    data,
                } => {
                    if at != 0 || list.len() != 1 {
                        return Err(Error::unsupported(format!(
                            "btrfs inode {ino}: inline extent beside other extents"
                        )));
                    }
                    if e.kind == FileKind::Symlink {
                        e.inline_data =
                            Some(self.inline(ino, compression, ram_bytes, data, size)?);
                    } else {
                        let place = tree::Place {
                            leaf: place.leaf,
                            offset: place.offset + BTRFS_FILE_EXTENT_INLINE_HEADER,
                        };
                        self.inline_extent(ino, e, (compression, ram_bytes), data, place)?;
                    }
                    return Ok(());
                }
                ExtentItem::Regular {
                    compression,
                    prealloc,
                    ram_bytes,
                    disk_bytenr,
                    disk_num_bytes,
                    offset,
                    num_bytes,
                } => {
                    end = at.checked_add(num_bytes).ok_or_else(|| {
                        Error::corrupt(format!("btrfs inode {ino}: extent at {at} overflows"))
                    })?;
                    if prealloc || disk_bytenr == 0 || at >= size {
                        continue; // reads as zeros
                    }
                    let len = num_bytes.min(size - at);
                    if compression == BTRFS_COMPRESS_NONE {
                        if offset.checked_add(len).is_none_or(|e| e > disk_num_bytes) {
                            return Err(Error::corrupt(format!(
                                "btrfs inode {ino}: extent at {at} reads past its disk extent"
                            )));
                        }
                        let start = disk_bytenr.checked_add(offset).ok_or_else(|| {
                            Error::corrupt(format!("btrfs inode {ino}: extent address"))
                        })?;
                        let mut fo = at;
                        for (phys, n) in self.vol.map(start, len)? {
                            push_extent(&mut e.extents, fo, self.vol.base + phys, n, max, ino)?;
                            fo += n;
                        }
                    } else {
                        let x = self.compressed_extent(
                            ino,
                            compression,
                            (at, len),
                            ram_bytes,
                            disk_bytenr,
                            disk_num_bytes,
                            offset,
                        )?;
                        if e.extents.len() + e.compressed.len() >= max {
                            return Err(Error::limit(format!(
                                "btrfs inode {ino}: more than {max} extents"
                            )));
                        }
                        e.compressed.push(x);
                    }
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn compressed_extent(
        &self,
        ino: u64,
        compression: u8,
        (at, len): (u64, u64),
        ram_bytes: u64,
        disk_bytenr: u64,
        disk_num_bytes: u64,
        offset: u64,
    ) -> Result<CompressedExtent> {
        let c = self.compression(ino, compression)?;
        if ram_bytes > BTRFS_MAX_COMPRESSED || disk_num_bytes > BTRFS_MAX_COMPRESSED {
            return Err(Error::limit(format!(
                "btrfs inode {ino}: compressed extent of {disk_num_bytes} → {ram_bytes} bytes"
            )));
        }
        if offset.checked_add(len).is_none_or(|e| e > ram_bytes) {
            return Err(Error::corrupt(format!(
                "btrfs inode {ino}: extent uses bytes past its decompressed length"
            )));
        }
        let pieces = self.vol.map(disk_bytenr, disk_num_bytes)?;
        let [(phys, _)] = pieces[..] else {
            return Err(Error::corrupt(format!(
                "btrfs inode {ino}: compressed extent crosses a chunk"
            )));
        };
        Ok(CompressedExtent {
            file_offset: at,
            length: len,
            disk_offset: self.vol.base + phys,
            disk_length: disk_num_bytes,
            compression: c,
            decompressed_len: ram_bytes,
            skip: offset,
        })
    }

    fn compression(&self, ino: u64, c: u8) -> Result<Compression> {
        match c {
            BTRFS_COMPRESS_ZLIB => Ok(Compression::Zlib),
            BTRFS_COMPRESS_ZSTD => Ok(Compression::Zstd),
            BTRFS_COMPRESS_LZO => Ok(Compression::BtrfsLzo {
                sector: self.vol.sb.sectorsize,
            }),
            c => Err(Error::unsupported(format!(
                "btrfs inode {ino}: compression type {c}"
            ))),
        }
    }

    /// A file's inline extent as an extent of the image: its bytes are read in place, inside
    /// their tree leaf, like any other extent (so the file catalog does not carry file
    /// contents). A compressed one becomes a compressed extent; bytes past the inline data
    /// and up to the file size read as zeros.
    fn inline_extent(
        &self,
        ino: u64,
        e: &mut FileEntry,
        (compression, ram_bytes): (u8, u64),
        data: &[u8],
        place: tree::Place,
    ) -> Result<()> {
        let disk_offset = self.vol.base + self.vol.item_offset(place, data.len())?;
        if compression == BTRFS_COMPRESS_NONE {
            let len = (data.len() as u64).min(e.size);
            if len > 0 {
                e.extents.push(FileExtent {
                    file_offset: 0,
                    disk_offset,
                    length: len,
                });
            }
            return Ok(());
        }
        let compression = self.compression(ino, compression)?;
        if ram_bytes > BTRFS_MAX_COMPRESSED {
            return Err(Error::limit(format!(
                "btrfs inode {ino}: inline extent of {ram_bytes} bytes"
            )));
        }
        e.compressed.push(CompressedExtent {
            file_offset: 0,
            length: ram_bytes.min(e.size),
            disk_offset,
            disk_length: data.len() as u64,
            compression,
            decompressed_len: ram_bytes,
            skip: 0,
        });
        Ok(())
    }

    /// The content of an inline extent, decompressed, cut or zero-extended to `size`.
    fn inline(
        &self,
        ino: u64,
        compression: u8,
        ram_bytes: u64,
        data: &[u8],
        size: u64,
    ) -> Result<Vec<u8>> {
        let mut v = if compression == BTRFS_COMPRESS_NONE {
            data.to_vec()
        } else {
            let c = self.compression(ino, compression)?;
            let max = usize::try_from(ram_bytes)
                .ok()
                .filter(|_| ram_bytes <= BTRFS_MAX_COMPRESSED)
                .ok_or_else(|| {
                    Error::limit(format!(
                        "btrfs inode {ino}: inline extent of {ram_bytes} bytes"
                    ))
                })?;
            let mut v = crate::compressed::decompress(c, data, max)
                .map_err(|e| Error::new(e.kind, format!("btrfs inode {ino}: {}", e.context)))?;
            v.resize(max, 0);
            v
        };
        let n = usize::try_from(size)
            .ok()
            .filter(|&n| n <= self.limits.max_alloc)
            .ok_or_else(|| Error::limit(format!("btrfs inode {ino}: {size} bytes inline")))?;
        v.resize(n, 0);
        Ok(v)
    }

    /// The names in directory `ino`: `DIR_INDEX` items in index order, or `DIR_ITEM`s when
    /// there are none. Damaged items are returned as errors beside the others.
    fn read_dir(&self, root: Root, ino: u64) -> Result<(Vec<DirEntry>, Vec<Error>)> {
        let max_bytes = self.limits.max_dir_bytes;
        let max =
            usize::try_from(max_bytes / BTRFS_DIR_ITEM_HEADER_LEN as u64).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut errs = Vec::new();
        for ty in [BTRFS_DIR_INDEX_KEY, BTRFS_DIR_ITEM_KEY] {
            for (k, d, _) in tree::items(&self.vol, root, Key::all(ino, ty), max, max_bytes)? {
                let before = out.len();
                if let Err(e) = items::parse_dir(&d, &mut out) {
                    errs.push(e);
                }
                if ty == BTRFS_DIR_INDEX_KEY && out.len() > before + 1 {
                    errs.push(Error::corrupt(format!(
                        "btrfs directory {ino}: index {} holds several names",
                        k.offset
                    )));
                    out.truncate(before + 1);
                }
            }
            if !out.is_empty() {
                break;
            }
        }
        Ok((out, errs))
    }
}

/// Appends a file extent, merging it with the previous one when they are contiguous.
fn push_extent(
    v: &mut Vec<FileExtent>,
    fo: u64,
    disk: u64,
    len: u64,
    max: usize,
    ino: u64,
) -> Result<()> {
    if let Some(p) = v.last_mut()
        && p.file_offset + p.length == fo
        && p.disk_offset + p.length == disk
    {
        p.length += len;
        return Ok(());
    }
    if v.len() >= max {
        return Err(Error::limit(format!(
            "btrfs inode {ino}: more than {max} extents"
        )));
    }
    v.push(FileExtent {
        file_offset: fo,
        disk_offset: disk,
        length: len,
    });
    Ok(())
}

/// A directory waiting to be listed: (subvolume id, its root, inode, path, depth).
type Pending = (u64, Root, u64, String, u32);

/// Lists the file system in `part` depth first from the top-level subvolume, a directory's
/// entries before its subtrees.
pub(crate) fn walk(
    r: &dyn ReadAt,
    part: &Partition,
    limits: &Limits,
    sink: &mut Sink,
) -> Result<()> {
    let fs = Btrfs {
        vol: Volume::open(r, part.offset, part.length, limits)?,
        limits,
        trees: RefCell::default(),
    };
    if fs.vol.sb.log_root != 0 {
        sink.error(
            "",
            Error::unsupported(
                "btrfs log tree not replayed: files fsynced after the last commit may show older content",
            ),
        );
    }
    match fs.default_subvolume() {
        Ok(id) => sink.report.btrfs_default_subvolume = Some(id),
        Err(e) => sink.error("", e),
    }
    let top = fs.tree(BTRFS_FS_TREE_OBJECTID)?;
    let (e, err) = fs.entry(
        BTRFS_FS_TREE_OBJECTID,
        top,
        BTRFS_FIRST_FREE_OBJECTID,
        "/".into(),
    )?;
    if e.kind != FileKind::Dir {
        return Err(Error::corrupt(
            "btrfs top-level root inode is not a directory",
        ));
    }
    if let Some(err) = err {
        sink.error("/", err);
    }
    if sink.emit(e).is_break() {
        return Ok(());
    }
    let mut subvolumes = HashSet::from([BTRFS_FS_TREE_OBJECTID]);
    let mut dirs = HashSet::from([(BTRFS_FS_TREE_OBJECTID, BTRFS_FIRST_FREE_OBJECTID)]);
    let mut stack: Vec<Pending> = vec![(
        BTRFS_FS_TREE_OBJECTID,
        top,
        BTRFS_FIRST_FREE_OBJECTID,
        "/".into(),
        0,
    )];
    while let Some((sub, root, ino, path, depth)) = stack.pop() {
        let (names, errs) = match fs.read_dir(root, ino) {
            Ok(x) => x,
            Err(e) => {
                sink.error(&path, e);
                continue;
            }
        };
        for e in errs {
            sink.error(&path, e);
        }
        for d in names {
            let cpath = match join(&path, &String::from_utf8_lossy(&d.name), limits) {
                Ok(p) => p,
                Err(e) => {
                    sink.error(&path, e);
                    continue;
                }
            };
            let (csub, croot, cino) = match d.location.ty {
                BTRFS_INODE_ITEM_KEY => (sub, root, d.location.objectid),
                BTRFS_ROOT_ITEM_KEY => {
                    let id = d.location.objectid;
                    if !subvolumes.insert(id) {
                        sink.error(
                            &cpath,
                            Error::corrupt(format!("btrfs subvolume {id} is linked twice")),
                        );
                        continue;
                    }
                    match fs.tree(id) {
                        Ok(r) => (id, r, BTRFS_FIRST_FREE_OBJECTID),
                        Err(e) => {
                            sink.error(&cpath, e);
                            continue;
                        }
                    }
                }
                t => {
                    sink.error(
                        &cpath,
                        Error::corrupt(format!("btrfs directory entry of key type {t}")),
                    );
                    continue;
                }
            };
            let (entry, err) = match fs.entry(csub, croot, cino, cpath.clone()) {
                Ok(x) => x,
                Err(e) => {
                    sink.error(&cpath, e);
                    continue;
                }
            };
            if let Some(err) = err {
                sink.error(&cpath, err);
            }
            let is_dir = entry.kind == FileKind::Dir;
            if sink.emit(entry).is_break() {
                return Ok(());
            }
            if is_dir && sink.descend(&cpath) {
                if depth + 1 > limits.max_depth {
                    sink.error(&cpath, Error::limit("directory deeper than max_depth"));
                } else if !dirs.insert((csub, cino)) {
                    sink.error(
                        &cpath,
                        Error::corrupt(format!(
                            "directory cycle: inode {cino} of subvolume {csub} seen before"
                        )),
                    );
                } else {
                    stack.push((csub, croot, cino, cpath, depth + 1));
                }
            }
        }
    }
    if sink.target.is_none() {
        match fs.subvolume_ids() {
            Ok(ids) => {
                for id in ids.into_iter().filter(|id| !subvolumes.contains(id)) {
                    let name = fs.backref_name(id).unwrap_or_default();
                    sink.error(
                        "",
                        Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "btrfs subvolume {id} {name:?} is linked from no directory: not listed"
                            ),
                        ),
                    );
                }
            }
            Err(e) => sink.error("", e),
        }
    }
    Ok(())
}
