//! FAT12, FAT16 and FAT32 with VFAT long file names, read-only.
//!
//! The FAT type follows from the cluster count (Microsoft's rule), not from the label in the
//! boot sector. The first FAT is decoded once into memory (4 bytes per cluster, checked against
//! `max_alloc`); every cluster chain is followed at most as far as the file size needs (files)
//! or `max_dir_bytes` allows (directories). Every cluster a chain visits is claimed in a bitmap
//! for the whole walk: a cluster met twice (a looping or cross-linked chain) is corruption, so a
//! walk follows each cluster at most once whatever the image.
//!
//! Entries: `inode` is the first cluster (0 for empty files); `fat_attributes` is the raw
//! attribute byte; times are the stored local times taken as UTC (mtime to 2 s, creation to
//! 10 ms, access to the day). A long name is used only when its checksum matches the short
//! entry, as the specification requires; otherwise the 8.3 name (with the NT lower-case bits)
//! is reported. Short names are decoded as Latin-1.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ops::ControlFlow;

use cairn_types::ReadAt;
use cairn_types::time::days_from_civil;

use crate::format::*;
use crate::util::{Sink, alloc, join, le16, le32, read_exact};
use crate::{Error, FileEntry, FileExtent, FileKind, FsKind, Limits, Partition, Result};

/// Geometry from a boot sector that passed the sanity checks.
#[derive(Clone, Copy, Debug)]
struct Bpb {
    bps: u64,
    spc: u64,
    reserved: u64,
    fats: u64,
    root_entries: u64,
    fat_sectors: u64,
    root_cluster: u32,
    kind: FsKind,
    clusters: u32,
}

impl Bpb {
    fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < 512 || !matches!(b[0], 0xEB | 0xE9) {
            return None;
        }
        let bps = u64::from(le16(b, 11));
        let spc = u64::from(b[13]);
        let reserved = u64::from(le16(b, 14));
        let fats = u64::from(b[16]);
        let root_entries = u64::from(le16(b, 17));
        let total16 = u64::from(le16(b, 19));
        let fat16 = u64::from(le16(b, 22));
        let total_sectors = if total16 != 0 {
            total16
        } else {
            u64::from(le32(b, 32))
        };
        let fat_sectors = if fat16 != 0 {
            fat16
        } else {
            u64::from(le32(b, 36))
        };
        if !matches!(bps, 512 | 1024 | 2048 | 4096)
            || spc == 0
            || !spc.is_power_of_two()
            || reserved == 0
            || fats == 0
            || fats > 4
            || fat_sectors == 0
            || total_sectors == 0
        {
            return None;
        }
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let meta = reserved + fats * fat_sectors + root_sectors;
        if meta >= total_sectors {
            return None;
        }
        let clusters = ((total_sectors - meta) / spc).min(0x0FFF_FFF5) as u32;
        let kind = if clusters < FAT12_MAX_CLUSTERS {
            FsKind::Fat12
        } else if clusters < FAT16_MAX_CLUSTERS {
            FsKind::Fat16
        } else {
            FsKind::Fat32
        };
        if (kind == FsKind::Fat32) != (root_entries == 0) {
            return None;
        }
        // The FAT must hold an entry for every cluster.
        let bits = match kind {
            FsKind::Fat12 => 12,
            FsKind::Fat16 => 16,
            _ => 32,
        };
        if fat_sectors * bps * 8 / bits < u64::from(clusters) + 2 {
            return None;
        }
        Some(Self {
            bps,
            spc,
            reserved,
            fats,
            root_entries,
            fat_sectors,
            root_cluster: if kind == FsKind::Fat32 {
                le32(b, 44)
            } else {
                0
            },
            kind,
            clusters,
        })
    }

    fn cluster_bytes(&self) -> u64 {
        self.bps * self.spc
    }

    fn root_dir_offset(&self) -> u64 {
        (self.reserved + self.fats * self.fat_sectors) * self.bps
    }

    fn data_offset(&self) -> u64 {
        self.root_dir_offset() + (self.root_entries * 32).div_ceil(self.bps) * self.bps
    }
}

/// The FAT kind of the boot sector `b`, if it is a FAT boot sector.
pub(crate) fn probe(b: &[u8]) -> Option<FsKind> {
    if b.get(3..11) == Some(&NTFS_OEM_ID[..]) {
        return None;
    }
    Bpb::parse(b).map(|p| p.kind)
}

struct Fat<'a> {
    r: &'a dyn ReadAt,
    base: u64,
    len: u64,
    bpb: Bpb,
    /// Decoded first FAT (FAT32 entries masked to 28 bits).
    table: Vec<u32>,
    /// One bit per cluster already visited by some chain during this walk.
    claimed: RefCell<Vec<u64>>,
    limits: &'a Limits,
}

impl<'a> Fat<'a> {
    fn open(r: &'a dyn ReadAt, part: &Partition, limits: &'a Limits) -> Result<Self> {
        let mut boot = [0u8; 512];
        read_exact(r, &mut boot, part.offset, &|| "FAT boot sector".into())?;
        let bpb = Bpb::parse(&boot).ok_or_else(|| Error::corrupt("FAT boot sector"))?;
        let n = u64::from(bpb.clusters) + 2;
        let raw_len = match bpb.kind {
            FsKind::Fat12 => (n * 3).div_ceil(2),
            FsKind::Fat16 => n * 2,
            _ => n * 4,
        };
        let entries = usize::try_from(n)
            .ok()
            .filter(|&e| e.saturating_mul(4) <= limits.max_alloc)
            .ok_or_else(|| Error::limit(format!("FAT of {n} clusters")))?;
        let mut raw = alloc(raw_len, limits, "FAT table")?;
        read_exact(r, &mut raw, part.offset + bpb.reserved * bpb.bps, &|| {
            "FAT table".into()
        })?;
        let table = (0..entries)
            .map(|c| match bpb.kind {
                FsKind::Fat12 => {
                    let v = u32::from(le16(&raw, c + c / 2));
                    if c % 2 == 0 { v & 0xFFF } else { v >> 4 }
                }
                FsKind::Fat16 => u32::from(le16(&raw, c * 2)),
                _ => le32(&raw, c * 4) & 0x0FFF_FFFF,
            })
            .collect();
        Ok(Self {
            r,
            base: part.offset,
            len: part.length,
            bpb,
            table,
            claimed: RefCell::new(vec![0u64; entries.div_ceil(64)]),
            limits,
        })
    }

    fn is_end(&self, v: u32) -> bool {
        v >= match self.bpb.kind {
            FsKind::Fat12 => 0xFF8,
            FsKind::Fat16 => 0xFFF8,
            _ => 0x0FFF_FFF8,
        }
    }

    /// Up to `max` clusters of the chain starting at `first`; ends early at end-of-chain.
    fn chain(&self, first: u32, max: u64) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut c = first;
        let last = self.bpb.clusters + 1;
        while (out.len() as u64) < max {
            if c < 2 || c > last {
                return Err(Error::corrupt(format!(
                    "FAT cluster chain from {first}: cluster {c} is not a data cluster"
                )));
            }
            let (word, bit) = (c as usize / 64, 1u64 << (c % 64));
            let mut claimed = self.claimed.borrow_mut();
            if claimed[word] & bit != 0 {
                return Err(Error::corrupt(format!(
                    "FAT cluster chain from {first}: cluster {c} loops or is cross-linked"
                )));
            }
            claimed[word] |= bit;
            drop(claimed);
            out.push(c);
            let next = self.table[c as usize];
            if self.is_end(next) {
                break;
            }
            c = next;
        }
        Ok(out)
    }

    fn cluster_offset(&self, c: u32) -> u64 {
        self.bpb.data_offset() + (u64::from(c) - 2) * self.bpb.cluster_bytes()
    }

    /// Image extents for `size` bytes of the chain from `first`.
    fn extents(&self, first: u32, size: u64) -> Result<Vec<FileExtent>> {
        if size == 0 {
            return Ok(Vec::new());
        }
        let cb = self.bpb.cluster_bytes();
        let need = size.div_ceil(cb);
        let chain = self.chain(first, need)?;
        if (chain.len() as u64) < need {
            return Err(Error::corrupt(format!(
                "FAT chain from {first} holds {} of {need} clusters",
                chain.len()
            )));
        }
        let mut out: Vec<FileExtent> = Vec::new();
        for (i, &c) in chain.iter().enumerate() {
            let fo = i as u64 * cb;
            let len = cb.min(size - fo);
            let disk = self.base + self.cluster_offset(c);
            match out.last_mut() {
                Some(l) if l.disk_offset + l.length == disk => l.length += len,
                _ => {
                    if out.len() >= self.limits.max_extents_per_file {
                        return Err(Error::limit("FAT file has more than max_extents_per_file"));
                    }
                    out.push(FileExtent {
                        file_offset: fo,
                        disk_offset: disk,
                        length: len,
                    })
                }
            }
        }
        Ok(out)
    }

    /// The raw bytes of a directory: the fixed root (`first == 0` on FAT12/16) or a chain.
    fn dir_bytes(&self, first: u32) -> Result<Vec<u8>> {
        let (off_len, chain) = if first == 0 && self.bpb.kind != FsKind::Fat32 {
            (
                Some((self.bpb.root_dir_offset(), self.bpb.root_entries * 32)),
                None,
            )
        } else {
            let max = self.limits.max_dir_bytes / self.bpb.cluster_bytes() + 1;
            (None, Some(self.chain(first, max)?))
        };
        let read = |buf: &mut [u8], off: u64| {
            if off + buf.len() as u64 > self.len {
                return Err(Error::corrupt(format!(
                    "FAT directory at {off} is beyond the partition"
                )));
            }
            read_exact(self.r, buf, self.base + off, &|| "FAT directory".into())
        };
        if let Some((off, len)) = off_len {
            let mut buf = alloc(len, self.limits, "FAT root directory")?;
            read(&mut buf, off)?;
            return Ok(buf);
        }
        let chain = chain.unwrap_or_default();
        let cb = self.bpb.cluster_bytes();
        let total = chain.len() as u64 * cb;
        if total > self.limits.max_dir_bytes {
            return Err(Error::limit(format!("FAT directory of {total} bytes")));
        }
        let mut buf = alloc(total, self.limits, "FAT directory")?;
        // alloc() made chain.len() * cb bytes, so cb is a usize.
        #[allow(clippy::cast_possible_truncation)]
        let cb = cb as usize;
        for (piece, &c) in buf.chunks_exact_mut(cb).zip(&chain) {
            read(piece, self.cluster_offset(c))?;
        }
        Ok(buf)
    }
}

/// One entry of a directory, long name resolved.
struct DirEntry {
    name: String,
    attr: u8,
    first: u32,
    size: u32,
    raw: [u8; 32],
}

fn short_name(e: &[u8]) -> String {
    let lower_base = e[12] & 0x08 != 0;
    let lower_ext = e[12] & 0x10 != 0;
    let conv = |b: &[u8], lower: bool| -> String {
        let s: String = b.iter().map(|&c| c as char).collect();
        let s = s.trim_end_matches(' ').to_string();
        if lower { s.to_lowercase() } else { s }
    };
    let mut base = e[..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xE5;
    }
    let base = conv(&base, lower_base);
    let ext = conv(&e[8..11], lower_ext);
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

fn lfn_checksum(short: &[u8]) -> u8 {
    short[..11]
        .iter()
        .fold(0u8, |s, &c| s.rotate_right(1).wrapping_add(c))
}

/// A long name being collected: (expected parts, checksum, parts by index).
type Lfn = (u8, u8, Vec<Option<[u16; 13]>>);

/// Parses directory bytes into entries (no `.`, `..`, volume labels or deleted entries).
fn parse_dir(buf: &[u8]) -> Vec<DirEntry> {
    let mut out = Vec::new();
    let mut lfn: Option<Lfn> = None;
    for e in buf.chunks_exact(FAT_DIRENT_LEN) {
        if e[0] == 0 {
            break;
        }
        if e[0] == FAT_DELETED {
            lfn = None;
            continue;
        }
        let attr = e[11];
        if attr & 0x3F == FAT_ATTR_LFN {
            let ord = e[0];
            let n = ord & 0x1F;
            if n == 0 || n > 20 {
                lfn = None;
                continue;
            }
            if ord & 0x40 != 0 {
                lfn = Some((n, e[13], vec![None; n as usize]));
            }
            if let Some((count, sum, parts)) = &mut lfn {
                if n > *count || e[13] != *sum {
                    lfn = None;
                    continue;
                }
                let mut units = [0u16; 13];
                let offs = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
                for (u, &o) in units.iter_mut().zip(offs.iter()) {
                    *u = le16(e, o);
                }
                parts[n as usize - 1] = Some(units);
            }
            continue;
        }
        let long = lfn.take().and_then(|(_, sum, parts)| {
            if sum != lfn_checksum(e) || parts.iter().any(Option::is_none) {
                return None;
            }
            let units: Vec<u16> = parts
                .into_iter()
                .flatten()
                .flatten()
                .take_while(|&u| u != 0)
                .collect();
            Some(
                char::decode_utf16(units)
                    .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                    .collect::<String>(),
            )
        });
        if attr & FAT_ATTR_VOLUME_ID != 0 {
            continue;
        }
        let name = long.unwrap_or_else(|| short_name(e));
        if name == "." || name == ".." {
            continue;
        }
        let mut raw = [0u8; 32];
        raw.copy_from_slice(e);
        out.push(DirEntry {
            name,
            attr,
            first: u32::from(le16(e, 20)) << 16 | u32::from(le16(e, 26)),
            size: le32(e, 28),
            raw,
        });
    }
    out
}

/// A FAT date and time (and 10 ms units) as Unix nanoseconds; `None` for an unset date.
fn fat_time(date: u16, time: u16, tenths: u8) -> Option<i64> {
    let (y, m, d) = (
        1980 + i64::from(date >> 9),
        u32::from((date >> 5) & 0xF),
        u32::from(date & 0x1F),
    );
    if date == 0 || !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    let secs = i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 0x3F) * 60
        + i64::from(time & 0x1F) * 2;
    let ns = (days_from_civil(y, m, d) * 86_400 + secs) * 1_000_000_000;
    Some(ns + i64::from(tenths.min(199)) * 10_000_000)
}

fn entry(fs: &Fat, path: String, d: &DirEntry) -> (FileEntry, Option<Error>) {
    let is_dir = d.attr & FAT_ATTR_DIRECTORY != 0;
    let kind = if is_dir {
        FileKind::Dir
    } else {
        FileKind::File
    };
    let mut e = FileEntry::new(path, kind, u64::from(d.first));
    let r = &d.raw;
    e.fat_attributes = Some(d.attr);
    e.mtime = fat_time(le16(r, 24), le16(r, 22), 0);
    e.atime = fat_time(le16(r, 18), 0, 0);
    e.crtime = fat_time(le16(r, 16), le16(r, 14), r[13]);
    let mut err = None;
    if !is_dir {
        e.size = u64::from(d.size);
        match fs.extents(d.first, e.size) {
            Ok(x) => e.extents = x,
            Err(x) => err = Some(x),
        }
    }
    (e, err)
}

pub(crate) fn walk(
    r: &dyn ReadAt,
    part: &Partition,
    limits: &Limits,
    sink: &mut Sink,
) -> Result<()> {
    let fs = Fat::open(r, part, limits)?;
    let root_first = if fs.bpb.kind == FsKind::Fat32 {
        fs.bpb.root_cluster
    } else {
        0
    };
    let root_bytes = fs.dir_bytes(root_first)?;
    let mut root = FileEntry::new("/".into(), FileKind::Dir, u64::from(root_first));
    root.fat_attributes = Some(FAT_ATTR_DIRECTORY);
    if sink.emit(root).is_break() {
        return Ok(());
    }
    let mut visited = HashSet::from([root_first]);
    let mut stack = vec![(parse_dir(&root_bytes), "/".to_string(), 0u32)];
    while let Some((entries, path, depth)) = stack.pop() {
        for d in entries {
            let cpath = match join(&path, &d.name, limits) {
                Ok(p) => p,
                Err(e) => {
                    sink.error(&path, e);
                    continue;
                }
            };
            let (e, err) = entry(&fs, cpath.clone(), &d);
            if let Some(err) = err {
                sink.error(&cpath, err);
            }
            let is_dir = e.kind == FileKind::Dir;
            if sink.emit(e) == ControlFlow::Break(()) {
                return Ok(());
            }
            if !is_dir || !sink.descend(&cpath) {
                continue;
            }
            if depth + 1 > limits.max_depth {
                sink.error(&cpath, Error::limit("directory deeper than max_depth"));
            } else if d.first == 0 || !visited.insert(d.first) {
                sink.error(
                    &cpath,
                    Error::corrupt(format!("directory cycle or bad start cluster {}", d.first)),
                );
            } else {
                match fs.dir_bytes(d.first) {
                    Ok(b) => stack.push((parse_dir(&b), cpath, depth + 1)),
                    Err(e) => sink.error(&cpath, e),
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
    fn fat_dates_convert_to_unix_time() {
        // 2000-01-01 00:00:00
        let date = (20 << 9) | (1 << 5) | 1;
        assert_eq!(fat_time(date, 0, 0), Some(946_684_800 * 1_000_000_000));
        assert_eq!(fat_time(0, 0, 0), None);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }

    #[test]
    fn lfn_checksum_matches_the_spec_example() {
        // Checksum is a rotate-right-and-add over the 11 short-name bytes.
        let s = *b"README  TXT";
        let mut sum = 0u8;
        for c in s {
            sum = (if sum & 1 != 0 { 0x80 } else { 0 }) + (sum >> 1);
            sum = sum.wrapping_add(c);
        }
        assert_eq!(lfn_checksum(&s), sum);
    }
}
