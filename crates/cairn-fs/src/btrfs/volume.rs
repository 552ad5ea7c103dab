//! One btrfs device: the superblock, the chunk map (logical → physical) and checked tree
//! nodes.
//!
//! Invariants:
//! - the superblock's checksum is verified before any of its fields is trusted; every tree
//!   node's checksum, its own address (`bytenr`) and its fsid are verified before it is used
//!   ([`Volume::node`]), and only verified nodes are cached;
//! - the chunk map holds only SINGLE and DUP chunks whose stripes are on this device (DUP
//!   reads the first copy, and the second when a tree node's first copy fails its checks); a RAID profile or another device's stripe fails the open with
//!   "multi-device btrfs not supported";
//! - every physical range is checked against the partition before it is read, and physical
//!   offsets handed out include the partition offset.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use cairn_types::ReadAt;

use super::csum::Csum;
use super::tree::{self, Key};
use crate::format::*;
use crate::util::{le16, le32, le64, read_exact};
use crate::{Error, Limits, Result};

/// The superblock fields the reader uses.
pub(crate) struct Super {
    pub csum: Csum,
    pub nodesize: u32,
    pub sectorsize: u32,
    pub root: u64,
    pub root_level: u8,
    pub chunk_root: u64,
    pub chunk_root_level: u8,
    pub root_dir_objectid: u64,
    /// Logical address of the log tree (fsync log since the last commit), 0 when none.
    pub log_root: u64,
    pub devid: u64,
    /// The fsid node headers carry (`metadata_uuid` when that feature is on).
    pub node_fsid: [u8; 16],
}

impl Super {
    pub(crate) fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < BTRFS_SUPERBLOCK_LEN
            || b[BTRFS_MAGIC_OFFSET..BTRFS_MAGIC_OFFSET + 8] != BTRFS_MAGIC
        {
            return Err(Error::corrupt("btrfs superblock magic"));
        }
        let csum = Csum::from_type(le16(b, 0xC4))?;
        if !csum.verify(&b[..BTRFS_SUPERBLOCK_LEN]) {
            return Err(Error::corrupt("btrfs superblock checksum mismatch"));
        }
        let num_devices = le64(b, 0x88);
        if num_devices != 1 {
            return Err(Error::unsupported(format!(
                "multi-device btrfs not supported ({num_devices} devices)"
            )));
        }
        let nodesize = le32(b, 0x94);
        let sectorsize = le32(b, 0x90);
        if !nodesize.is_power_of_two()
            || !(BTRFS_NODESIZE_MIN..=BTRFS_NODESIZE_MAX).contains(&nodesize)
            || !sectorsize.is_power_of_two()
            || !(512..=BTRFS_SECTORSIZE_MAX).contains(&sectorsize)
        {
            return Err(Error::corrupt(format!(
                "btrfs geometry: node size {nodesize}, sector size {sectorsize}"
            )));
        }
        let (root_level, chunk_root_level) = (b[0xC6], b[0xC7]);
        if root_level > BTRFS_MAX_LEVEL || chunk_root_level > BTRFS_MAX_LEVEL {
            return Err(Error::corrupt("btrfs superblock: tree level above 7"));
        }
        let mut node_fsid = [0u8; 16];
        let incompat = le64(b, 0xBC);
        let at = if incompat & BTRFS_INCOMPAT_METADATA_UUID != 0 {
            0x23B
        } else {
            0x20
        };
        node_fsid.copy_from_slice(&b[at..at + 16]);
        Ok(Self {
            csum,
            nodesize,
            sectorsize,
            root: le64(b, 0x50),
            root_level,
            chunk_root: le64(b, 0x58),
            chunk_root_level,
            root_dir_objectid: le64(b, 0x80),
            log_root: le64(b, 0x60),
            devid: le64(b, BTRFS_SB_DEV_ITEM_OFFSET),
            node_fsid,
        })
    }
}

/// A chunk: logical `[start, start + len)` lives at partition byte `phys` (and, for DUP,
/// again at `mirror`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunk {
    start: u64,
    len: u64,
    phys: u64,
    mirror: Option<u64>,
}

/// Parses one chunk item (logical start `start`); returns it and its length in bytes.
fn parse_chunk(start: u64, b: &[u8], devid: u64) -> Result<(Chunk, usize)> {
    let bad = |what: &str| Error::corrupt(format!("btrfs chunk at logical {start}: {what}"));
    if b.len() < BTRFS_CHUNK_ITEM_HEADER_LEN + BTRFS_STRIPE_LEN {
        return Err(bad("truncated"));
    }
    let len = le64(b, 0);
    let ty = le64(b, 24);
    let stripes = usize::from(le16(b, 44));
    let size = BTRFS_CHUNK_ITEM_HEADER_LEN + stripes * BTRFS_STRIPE_LEN;
    if stripes == 0 || size > b.len() {
        return Err(bad("stripe count"));
    }
    if ty & BTRFS_BLOCK_GROUP_MULTI_DEVICE != 0 {
        return Err(Error::unsupported(format!(
            "multi-device btrfs not supported (chunk at logical {start} has profile bits {ty:#x})"
        )));
    }
    let s0 = &b[BTRFS_CHUNK_ITEM_HEADER_LEN..];
    if le64(s0, 0) != devid {
        return Err(Error::unsupported(format!(
            "multi-device btrfs not supported (chunk at logical {start} is on device {})",
            le64(s0, 0)
        )));
    }
    if len == 0 || start.checked_add(len).is_none() {
        return Err(bad("length"));
    }
    let mirror = (ty & BTRFS_BLOCK_GROUP_DUP != 0 && stripes >= 2)
        .then(|| &b[BTRFS_CHUNK_ITEM_HEADER_LEN + BTRFS_STRIPE_LEN..])
        .filter(|s1| le64(s1, 0) == devid)
        .map(|s1| le64(s1, 8));
    Ok((
        Chunk {
            start,
            len,
            phys: le64(s0, 8),
            mirror,
        },
        size,
    ))
}

pub(crate) struct Volume<'a> {
    r: &'a dyn ReadAt,
    /// Partition offset in the image.
    pub base: u64,
    /// Partition length.
    pub len: u64,
    pub sb: Super,
    pub limits: &'a Limits,
    /// Sorted by start, non-overlapping.
    chunks: Vec<Chunk>,
    cache: RefCell<HashMap<u64, Rc<Vec<u8>>>>,
    /// Nodes whose first DUP copy was damaged, read from the second.
    from_mirror: RefCell<HashSet<u64>>,
}

impl<'a> Volume<'a> {
    /// Reads and checks the superblock, then builds the chunk map from the bootstrap array
    /// and the chunk tree.
    pub(crate) fn open(r: &'a dyn ReadAt, base: u64, len: u64, limits: &'a Limits) -> Result<Self> {
        if len < BTRFS_SUPERBLOCK_OFFSET + BTRFS_SUPERBLOCK_LEN as u64 {
            return Err(Error::corrupt("btrfs partition too small for a superblock"));
        }
        let mut b = vec![0u8; BTRFS_SUPERBLOCK_LEN];
        read_exact(r, &mut b, base + BTRFS_SUPERBLOCK_OFFSET, &|| {
            "btrfs superblock".into()
        })?;
        let sb = Super::parse(&b)?;
        let mut vol = Self {
            r,
            base,
            len,
            sb,
            limits,
            chunks: Vec::new(),
            cache: RefCell::default(),
            from_mirror: RefCell::default(),
        };
        let array_len = le32(&b, 0xA0) as usize;
        if array_len > BTRFS_SYS_CHUNK_ARRAY_MAX {
            return Err(Error::corrupt(format!(
                "btrfs sys_chunk_array of {array_len} bytes"
            )));
        }
        let array = &b[BTRFS_SYS_CHUNK_ARRAY_OFFSET..BTRFS_SYS_CHUNK_ARRAY_OFFSET + array_len];
        let mut at = 0;
        while at < array.len() {
            let key = Key::parse(&array[at..]);
            if key.ty != BTRFS_CHUNK_ITEM_KEY || at + BTRFS_KEY_LEN > array.len() {
                return Err(Error::corrupt("btrfs sys_chunk_array: not a chunk item"));
            }
            at += BTRFS_KEY_LEN;
            let (c, size) = parse_chunk(key.offset, &array[at..], vol.sb.devid)?;
            vol.add_chunk(c)?;
            at += size;
        }
        let hi = Key::new(
            BTRFS_FIRST_CHUNK_TREE_OBJECTID,
            BTRFS_CHUNK_ITEM_KEY,
            u64::MAX,
        );
        let lo = Key::new(BTRFS_FIRST_CHUNK_TREE_OBJECTID, BTRFS_CHUNK_ITEM_KEY, 0);
        let mut found = Vec::new();
        let max = limits.max_alloc / 64;
        let (root, level) = (vol.sb.chunk_root, vol.sb.chunk_root_level);
        tree::range(&vol, root, level, lo, hi, &mut |k, data, _| {
            if found.len() >= max {
                return Err(Error::limit("btrfs chunk tree: too many chunks"));
            }
            found.push(parse_chunk(k.offset, data, vol.sb.devid)?.0);
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        for c in found {
            vol.add_chunk(c)?;
        }
        Ok(vol)
    }

    fn add_chunk(&mut self, c: Chunk) -> Result<()> {
        let i = self.chunks.partition_point(|x| x.start < c.start);
        if self.chunks.get(i) == Some(&c) {
            return Ok(()); // the bootstrap copy of a system chunk
        }
        let end = c.start + c.len;
        let prev_overlaps = i > 0 && self.chunks[i - 1].start + self.chunks[i - 1].len > c.start;
        let next_overlaps = self.chunks.get(i).is_some_and(|n| n.start < end);
        if prev_overlaps || next_overlaps {
            return Err(Error::corrupt(format!(
                "btrfs chunk at logical {} overlaps another",
                c.start
            )));
        }
        self.chunks.insert(i, c);
        Ok(())
    }

    /// The partition byte ranges holding logical `[logical, logical + len)`, in order: one
    /// per chunk crossed.
    pub(crate) fn map(&self, logical: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.map_copy(logical, len, false)
    }

    /// [`Volume::map`] to the first copy, or to the second copy of DUP chunks (`mirror`).
    fn map_copy(&self, logical: u64, len: u64, mirror: bool) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut at = logical;
        let end = logical
            .checked_add(len)
            .ok_or_else(|| Error::corrupt(format!("btrfs logical range {logical}+{len}")))?;
        while at < end {
            let i = self.chunks.partition_point(|c| c.start <= at);
            let c = i
                .checked_sub(1)
                .map(|i| self.chunks[i])
                .filter(|c| at - c.start < c.len)
                .ok_or_else(|| {
                    Error::corrupt(format!("btrfs logical address {at} is in no chunk"))
                })?;
            let n = (end - at).min(c.start + c.len - at);
            let base = if mirror {
                c.mirror.unwrap_or(c.phys)
            } else {
                c.phys
            };
            let phys = base.checked_add(at - c.start);
            match phys {
                Some(p) if p.checked_add(n).is_some_and(|e| e <= self.len) => out.push((p, n)),
                _ => {
                    return Err(Error::corrupt(format!(
                        "btrfs logical {at} maps beyond the device"
                    )));
                }
            }
            at += n;
        }
        Ok(out)
    }

    /// Reads logical bytes into `buf` (from the second DUP copy when `mirror`).
    fn read_logical(
        &self,
        logical: u64,
        buf: &mut [u8],
        mirror: bool,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let mut done = 0usize;
        for (phys, n) in self.map_copy(logical, buf.len() as u64, mirror)? {
            // The pieces add up to buf.len().
            #[allow(clippy::cast_possible_truncation)]
            let n = n as usize;
            read_exact(self.r, &mut buf[done..done + n], self.base + phys, what)?;
            done += n;
        }
        Ok(())
    }

    /// The partition byte offset of `len` bytes of an item's data at `place`, in the copy of
    /// its leaf that was read (and checked); the leaf must have been read.
    pub(crate) fn item_offset(&self, place: super::tree::Place, len: usize) -> Result<u64> {
        let size = self.sb.nodesize as usize;
        if place.offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::corrupt(format!(
                "btrfs leaf {}: item data outside the node",
                place.leaf
            )));
        }
        let mirror = self.from_mirror.borrow().contains(&place.leaf);
        match self.map_copy(place.leaf, size as u64, mirror)?[..] {
            [(phys, _)] => Ok(phys + place.offset as u64),
            _ => Err(Error::corrupt(format!(
                "btrfs tree node {} crosses a chunk",
                place.leaf
            ))),
        }
    }

    fn has_mirror(&self, logical: u64) -> bool {
        let i = self.chunks.partition_point(|c| c.start <= logical);
        i > 0 && self.chunks[i - 1].mirror.is_some()
    }

    /// The tree node at `logical`, checked (checksum, address, fsid) and cached.
    pub(crate) fn node(&self, logical: u64) -> Result<Rc<Vec<u8>>> {
        if let Some(n) = self.cache.borrow().get(&logical) {
            return Ok(Rc::clone(n));
        }
        let size = self.sb.nodesize as usize;
        let mut b = vec![0u8; size];
        let what = || format!("btrfs tree node {logical}");
        let check = |b: &mut Vec<u8>, mirror: bool| -> Result<()> {
            self.read_logical(logical, b, mirror, &what)?;
            if !self.sb.csum.verify(b) {
                return Err(Error::corrupt(format!(
                    "btrfs tree node {logical}: checksum mismatch"
                )));
            }
            if le64(b, 0x30) != logical || b[0x20..0x30] != self.sb.node_fsid {
                return Err(Error::corrupt(format!(
                    "btrfs tree node {logical}: header names another block or file system"
                )));
            }
            Ok(())
        };
        // A damaged first copy of a DUP node falls back to the second.
        if let Err(e) = check(&mut b, false) {
            if !self.has_mirror(logical) || check(&mut b, true).is_err() {
                return Err(e);
            }
            self.from_mirror.borrow_mut().insert(logical);
        }
        let n = Rc::new(b);
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= (self.limits.max_alloc / 4 / size).max(64) {
            cache.clear();
        }
        cache.insert(logical, Rc::clone(&n));
        Ok(n)
    }
}
