//! NTFS, read-only, by scanning the MFT.
//!
//! Instead of descending the directory B+ trees, the walk reads the MFT front to back in large
//! sequential chunks, twice: the first pass records every directory's name and parent, the
//! second emits one entry per (record, non-DOS name) with the path built from the parent
//! chain. This is simple, fast (two sequential reads of the MFT) and robust: a damaged index
//! cannot hide files. Consequences: entries come in MFT order (the root first, but not
//! parents before children), and a file whose parent chain does not reach the root is an
//! error ("orphan"), not listed.
//!
//! Read: `$STANDARD_INFORMATION` (times, attributes, security id), `$FILE_NAME` (names, hard
//! links, parent), the unnamed `$DATA` (resident → inline bytes, non-resident → data runs as
//! image extents, cut at the initialized size; sparse runs are holes), `$REPARSE_POINT`
//! (symbolic links and junctions), `$ATTRIBUTE_LIST` (attributes in extension records).
//! Every record's update-sequence fixups are checked. Metadata files (records below 16) and
//! everything under `$Extend` are not listed.
//!
//! Not read: compressed and encrypted data (entry listed with an `Unsupported` error and no
//! extents), named streams (alternate data streams), `$Secure` descriptors (only the id),
//! the `$LogFile` (NTFS journal; a volume that was not cleanly unmounted is read as is).

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

use cairn_types::ReadAt;

use crate::format::*;
use crate::util::{Sink, alloc, join, le16, le32, le64, read_exact, utf16le};
use crate::{Error, FileEntry, FileExtent, FileKind, Limits, Partition, Result};

/// MFT bytes read at once during the scan.
const MFT_CHUNK: u64 = 1 << 20;
/// Largest non-resident attribute list read (a list entry is about 32 bytes).
const MAX_ATTRIBUTE_LIST: u64 = 4 << 20;
/// The USA stride: fixups protect the last two bytes of every 512 bytes.
const FIXUP_STRIDE: usize = 512;

/// An NTFS boot sector.
pub(crate) fn probe(b: &[u8]) -> bool {
    b.get(3..11) == Some(&NTFS_OEM_ID[..]) && Geometry::parse(b).is_some()
}

#[derive(Clone, Copy, Debug)]
struct Geometry {
    cluster: u64,
    clusters: u64,
    mft_lcn: u64,
    record: u64,
}

impl Geometry {
    fn parse(b: &[u8]) -> Option<Self> {
        let bps = u64::from(le16(b, 11));
        let spc_raw = *b.get(13)?;
        let spc = if spc_raw > 0x80 {
            1u64 << (256 - u32::from(spc_raw)).min(31)
        } else {
            u64::from(spc_raw)
        };
        if !matches!(bps, 512 | 1024 | 2048 | 4096) || spc == 0 || !spc.is_power_of_two() {
            return None;
        }
        let cluster = bps * spc;
        // Clusters per record, or (negative) log2 of the record size.
        let cpr = b.get(0x40)?.cast_signed();
        let record = if cpr > 0 {
            cluster * u64::from(cpr.unsigned_abs())
        } else {
            1u64 << (-i32::from(cpr)).clamp(0, 31)
        };
        let clusters = le64(b, 0x28) / spc;
        if !(512..=65536).contains(&record)
            || !record.is_power_of_two()
            || cluster > 2 << 20
            || clusters.checked_mul(cluster).is_none()
        {
            return None;
        }
        Some(Self {
            cluster,
            clusters,
            mft_lcn: le64(b, 0x30),
            record,
        })
    }

    /// The record size as a buffer length.
    fn record_len(&self) -> usize {
        #[allow(clippy::cast_possible_truncation)] // parse() keeps it at most 64 KiB
        let len = self.record as usize;
        len
    }
}

/// Virtual cluster `vcn` of an attribute lives at logical cluster `lcn`, for `len` clusters.
#[derive(Clone, Copy, Debug)]
struct Run {
    vcn: u64,
    lcn: u64,
    len: u64,
}

/// One attribute of a record.
struct Attr<'r> {
    ty: u32,
    named: bool,
    flags: u16,
    /// Resident value, or `None` when non-resident.
    value: Option<&'r [u8]>,
    start_vcn: u64,
    runlist: &'r [u8],
    data_size: u64,
    init_size: u64,
}

fn attrs(rec: &[u8]) -> Result<Vec<Attr<'_>>> {
    let mut out = Vec::new();
    let mut off = le16(rec, 0x14) as usize;
    let used = (le32(rec, 0x18) as usize).min(rec.len());
    while off + 16 <= used {
        let ty = le32(rec, off);
        if ty == NTFS_ATTR_END {
            break;
        }
        let len = le32(rec, off + 4) as usize;
        if len < 16 || off + len > used || !len.is_multiple_of(8) {
            return Err(Error::corrupt(format!(
                "NTFS attribute at {off}: length {len}"
            )));
        }
        let a = &rec[off..off + len];
        let non_resident = a[8] != 0;
        let named = a[9] != 0;
        let flags = le16(a, 12);
        let attr = if non_resident {
            let rl = le16(a, 0x20) as usize;
            if len < 0x40 || rl > len {
                return Err(Error::corrupt("NTFS non-resident attribute header"));
            }
            Attr {
                ty,
                named,
                flags,
                value: None,
                start_vcn: le64(a, 0x10),
                runlist: &a[rl..],
                data_size: le64(a, 0x30),
                init_size: le64(a, 0x38),
            }
        } else {
            let vlen = le32(a, 0x10) as usize;
            let voff = le16(a, 0x14) as usize;
            let value = a
                .get(voff..voff.saturating_add(vlen))
                .ok_or_else(|| Error::corrupt("NTFS resident attribute value"))?;
            Attr {
                ty,
                named,
                flags,
                value: Some(value),
                start_vcn: 0,
                runlist: &[],
                data_size: vlen as u64,
                init_size: vlen as u64,
            }
        };
        out.push(attr);
        off += len;
    }
    Ok(out)
}

/// Decodes a run list; sparse runs are skipped (holes).
fn decode_runs(
    b: &[u8],
    start_vcn: u64,
    geo: &Geometry,
    max: usize,
    out: &mut Vec<Run>,
) -> Result<()> {
    let mut i = 0;
    let mut vcn = start_vcn;
    let mut lcn: i64 = 0;
    while let Some(&h) = b.get(i) {
        if h == 0 {
            break;
        }
        let (ls, os) = ((h & 0xF) as usize, (h >> 4) as usize);
        if ls == 0 || ls > 8 || os > 8 || i + 1 + ls + os > b.len() {
            return Err(Error::corrupt("NTFS run list header"));
        }
        let mut len = 0u64;
        for k in 0..ls {
            len |= u64::from(b[i + 1 + k]) << (8 * k);
        }
        if os > 0 {
            let mut d = 0i64;
            for k in 0..os {
                d |= i64::from(b[i + 1 + ls + k]) << (8 * k);
            }
            if os < 8 && d & (1 << (8 * os - 1)) != 0 {
                d -= 1 << (8 * os); // sign-extend
            }
            lcn = lcn
                .checked_add(d)
                .filter(|&l| l >= 0)
                .ok_or_else(|| Error::corrupt("NTFS run list: negative cluster"))?;
            let start = lcn.unsigned_abs();
            if start.checked_add(len).is_none_or(|e| e > geo.clusters) {
                return Err(Error::corrupt("NTFS run beyond the volume"));
            }
            if out.len() >= max {
                return Err(Error::limit(
                    "NTFS attribute has more than max_extents_per_file runs",
                ));
            }
            out.push(Run {
                vcn,
                lcn: start,
                len,
            });
        }
        vcn = vcn
            .checked_add(len)
            .ok_or_else(|| Error::corrupt("NTFS run list: cluster overflow"))?;
        i += 1 + ls + os;
    }
    Ok(())
}

/// Applies the update-sequence fixups of a record in place.
fn fixup(rec: &mut [u8]) -> Result<()> {
    if rec[..4] != NTFS_FILE_MAGIC {
        return Err(Error::corrupt("NTFS record magic"));
    }
    let usa = le16(rec, 4) as usize;
    let count = le16(rec, 6) as usize;
    if count == 0 || (count - 1) * FIXUP_STRIDE != rec.len() || usa + 2 * count > rec.len() {
        return Err(Error::corrupt("NTFS record update sequence"));
    }
    let check = [rec[usa], rec[usa + 1]];
    for i in 1..count {
        let at = i * FIXUP_STRIDE - 2;
        if rec[at..at + 2] != check {
            return Err(Error::corrupt("NTFS record torn (fixup mismatch)"));
        }
        rec[at] = rec[usa + 2 * i];
        rec[at + 1] = rec[usa + 2 * i + 1];
    }
    Ok(())
}

/// What the walk needs from one base record (with its extension records folded in).
#[derive(Default)]
struct Info {
    is_dir: bool,
    /// (parent record, name), DOS-only names left out.
    names: Vec<(u64, String)>,
    std: Option<Vec<u8>>,
    data: Option<DataInfo>,
    reparse: Option<Vec<u8>>,
}

#[derive(Default)]
struct DataInfo {
    resident: Option<Vec<u8>>,
    runs: Vec<Run>,
    size: u64,
    init: u64,
    flags: u16,
}

struct Ntfs<'a> {
    r: &'a dyn ReadAt,
    base: u64,
    len: u64,
    geo: Geometry,
    mft: Vec<Run>,
    limits: &'a Limits,
    /// Clusters of non-resident attribute lists read in the current pass: each at most once.
    claimed: std::cell::RefCell<HashSet<u64>>,
}

impl<'a> Ntfs<'a> {
    fn open(r: &'a dyn ReadAt, part: &Partition, limits: &'a Limits) -> Result<Self> {
        let mut boot = [0u8; 512];
        read_exact(r, &mut boot, part.offset, &|| "NTFS boot sector".into())?;
        let geo = Geometry::parse(&boot).ok_or_else(|| Error::corrupt("NTFS boot sector"))?;
        let mut fs = Self {
            r,
            base: part.offset,
            len: part.length,
            geo,
            mft: Vec::new(),
            limits,
            claimed: Default::default(),
        };
        // Record 0 ($MFT) sits at mft_lcn; its $DATA maps the whole MFT.
        let mut rec0 = vec![0u8; geo.record_len()];
        fs.read_volume(geo.mft_lcn.saturating_mul(geo.cluster), &mut rec0)?;
        fixup(&mut rec0)?;
        fs.mft = vec![Run {
            vcn: 0,
            lcn: geo.mft_lcn,
            len: geo.record.div_ceil(geo.cluster),
        }];
        let info = fs.info(0, &rec0)?;
        let data = info
            .data
            .filter(|d| d.resident.is_none() && !d.runs.is_empty())
            .ok_or_else(|| Error::corrupt("NTFS $MFT has no data runs"))?;
        fs.mft = data.runs;
        Ok(fs)
    }

    fn read_volume(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if off.saturating_add(buf.len() as u64) > self.len {
            return Err(Error::corrupt(format!(
                "NTFS read at {off} beyond the partition"
            )));
        }
        read_exact(self.r, buf, self.base + off, &|| "NTFS".into())
    }

    /// Reads record `n` through the MFT's runs (fixups applied).
    fn record(&self, n: u64) -> Result<Vec<u8>> {
        let rs = self.geo.record;
        let mut rec = vec![0u8; self.geo.record_len()];
        let mut done = 0u64;
        while done < rs {
            let byte = n
                .checked_mul(rs)
                .and_then(|b| b.checked_add(done))
                .ok_or_else(|| Error::corrupt("NTFS record number"))?;
            let vcn = byte / self.geo.cluster;
            let i = self.mft.partition_point(|r| r.vcn + r.len <= vcn);
            let run = self
                .mft
                .get(i)
                .filter(|r| r.vcn <= vcn)
                .ok_or_else(|| Error::corrupt(format!("NTFS record {n} not in the MFT")))?;
            let within = byte % self.geo.cluster;
            let k = (self.geo.cluster - within).min(rs - done);
            let off = (run.lcn + (vcn - run.vcn)) * self.geo.cluster + within;
            #[allow(clippy::cast_possible_truncation)] // done + k <= rs, the length of rec
            let piece = &mut rec[done as usize..(done + k) as usize];
            self.read_volume(off, piece)?;
            done += k;
        }
        fixup(&mut rec)?;
        Ok(rec)
    }

    /// Reads a non-resident attribute's content (attribute lists only; bounded by max_alloc).
    fn read_runs(&self, runs: &[Run], size: u64) -> Result<Vec<u8>> {
        if size > MAX_ATTRIBUTE_LIST {
            return Err(Error::limit(format!("NTFS attribute list of {size} bytes")));
        }
        {
            let mut claimed = self.claimed.borrow_mut();
            for r in runs {
                for c in r.lcn..r.lcn + r.len.min(MAX_ATTRIBUTE_LIST) {
                    if !claimed.insert(c) {
                        return Err(Error::corrupt(format!(
                            "NTFS attribute list cluster {c} is used twice"
                        )));
                    }
                }
            }
        }
        let mut v = alloc(size, self.limits, "NTFS attribute list")?;
        for r in runs {
            let fo = r.vcn.saturating_mul(self.geo.cluster);
            if fo >= size {
                continue;
            }
            let len = (r.len * self.geo.cluster).min(size - fo);
            #[allow(clippy::cast_possible_truncation)] // fo + len <= size, the length of v
            let piece = &mut v[fo as usize..(fo + len) as usize];
            self.read_volume(r.lcn * self.geo.cluster, piece)?;
        }
        Ok(v)
    }

    /// Folds the attributes of base record `n` (and its extension records) into an [`Info`].
    fn info(&self, n: u64, rec: &[u8]) -> Result<Info> {
        let mut info = Info {
            is_dir: le16(rec, 0x16) & NTFS_RECORD_IS_DIR != 0,
            ..Info::default()
        };
        let list = self.add_attrs(&mut info, rec)?;
        if let Some(list) = list {
            let mut seen = HashSet::from([n]);
            let mut at = 0;
            while at + 26 <= list.len() {
                let ty = le32(&list, at);
                let len = le16(&list, at + 4) as usize;
                let reference = le64(&list, at + 16) & 0xFFFF_FFFF_FFFF;
                if len < 26 || at + len > list.len() {
                    return Err(Error::corrupt(format!("NTFS record {n}: attribute list")));
                }
                at += len;
                let wanted = matches!(
                    ty,
                    NTFS_ATTR_FILE_NAME | NTFS_ATTR_DATA | NTFS_ATTR_STANDARD_INFORMATION
                );
                if !wanted || !seen.insert(reference) {
                    continue;
                }
                if seen.len() > self.limits.max_extents_per_file {
                    return Err(Error::limit(format!("NTFS record {n}: attribute list")));
                }
                let ext = self.record(reference)?;
                if le64(&ext, 0x20) & 0xFFFF_FFFF_FFFF != n {
                    return Err(Error::corrupt(format!(
                        "NTFS record {reference} is not an extension of {n}"
                    )));
                }
                self.add_attrs(&mut info, &ext)?;
            }
        }
        if let Some(d) = &mut info.data {
            d.runs.sort_by_key(|r| r.vcn);
        }
        Ok(info)
    }

    /// Adds one record's attributes to `info`; returns the attribute list's bytes, if any.
    fn add_attrs(&self, info: &mut Info, rec: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut list = None;
        for a in attrs(rec)? {
            match a.ty {
                NTFS_ATTR_STANDARD_INFORMATION => {
                    if let Some(v) = a.value {
                        info.std = Some(v.to_vec());
                    }
                }
                NTFS_ATTR_FILE_NAME => {
                    let Some(v) = a.value else { continue };
                    if v.len() < 0x42 {
                        continue;
                    }
                    let nlen = v[0x40] as usize * 2;
                    let ns = v[0x41];
                    if ns == NTFS_NAMESPACE_DOS || v.len() < 0x42 + nlen {
                        continue;
                    }
                    let parent = le64(v, 0) & 0xFFFF_FFFF_FFFF;
                    info.names.push((parent, utf16le(&v[0x42..0x42 + nlen])));
                }
                NTFS_ATTR_DATA if !a.named => {
                    let d = info.data.get_or_insert_with(DataInfo::default);
                    d.flags |= a.flags;
                    if let Some(v) = a.value {
                        d.resident = Some(v.to_vec());
                        d.size = v.len() as u64;
                    } else {
                        if a.start_vcn == 0 {
                            d.size = a.data_size;
                            d.init = a.init_size.min(a.data_size);
                        }
                        let max = self.limits.max_extents_per_file;
                        decode_runs(a.runlist, a.start_vcn, &self.geo, max, &mut d.runs)?;
                    }
                }
                NTFS_ATTR_REPARSE_POINT => {
                    if let Some(v) = a.value {
                        info.reparse = Some(v.to_vec());
                    }
                }
                NTFS_ATTR_ATTRIBUTE_LIST => {
                    list = Some(match a.value {
                        Some(v) => v.to_vec(),
                        None => {
                            let mut runs = Vec::new();
                            let max = self.limits.max_extents_per_file;
                            decode_runs(a.runlist, 0, &self.geo, max, &mut runs)?;
                            self.read_runs(&runs, a.data_size)?
                        }
                    });
                }
                _ => {}
            }
        }
        Ok(list)
    }

    /// Calls `f(record number, fixed-up record)` for every in-use base record, reading the
    /// MFT in large sequential chunks. Damaged records go to `bad`.
    fn scan(
        &self,
        mut f: impl FnMut(u64, &[u8]) -> ControlFlow<()>,
        mut bad: impl FnMut(u64, Error),
    ) -> Result<()> {
        let rs = self.geo.record;
        let cl = self.geo.cluster;
        let mut buf = Vec::new();
        for run in &self.mft {
            let run_bytes = run.len * cl;
            let mut done = 0u64;
            while done < run_bytes {
                let k = (run_bytes - done).min(MFT_CHUNK.max(rs));
                #[allow(clippy::cast_possible_truncation)] // at most MFT_CHUNK or a record
                buf.resize(k as usize, 0);
                self.read_volume(run.lcn * cl + done, &mut buf)?;
                let first_byte = run.vcn.saturating_mul(cl).saturating_add(done);
                // Records straddling a run boundary are read one by one.
                // A record whose start lies before this chunk was read by number there.
                let mut at = (rs - first_byte % rs) % rs;
                while at + rs <= k {
                    let n = (first_byte + at) / rs;
                    #[allow(clippy::cast_possible_truncation)] // at + rs <= k, the length of buf
                    let rec = &mut buf[at as usize..(at + rs) as usize];
                    at += rs;
                    if rec[..4] != NTFS_FILE_MAGIC {
                        continue; // never used
                    }
                    if let Err(e) = fixup(rec) {
                        bad(n, e);
                        continue;
                    }
                    let in_use = le16(rec, 0x16) & NTFS_RECORD_IN_USE != 0;
                    let base = le64(rec, 0x20) & 0xFFFF_FFFF_FFFF;
                    if !in_use || base != 0 {
                        continue;
                    }
                    if f(n, rec).is_break() {
                        return Ok(());
                    }
                }
                if at < k {
                    // A record continues in the next run: read it by number.
                    let n = (first_byte + at) / rs;
                    match self.record(n) {
                        Ok(rec) => {
                            let in_use = le16(&rec, 0x16) & NTFS_RECORD_IN_USE != 0;
                            if in_use
                                && le64(&rec, 0x20) & 0xFFFF_FFFF_FFFF == 0
                                && f(n, &rec).is_break()
                            {
                                return Ok(());
                            }
                        }
                        Err(e) => bad(n, e),
                    }
                }
                done += k;
            }
        }
        Ok(())
    }
}

fn ntfs_time(v: u64) -> i64 {
    // 100 ns units since 1601; a value past i64::MAX (hostile, or 29,000 years on) saturates
    // instead of wrapping to a time before 1601.
    let t = i64::try_from(v).unwrap_or(i64::MAX);
    t.saturating_sub(NTFS_EPOCH_DELTA_SECS * 10_000_000)
        .saturating_mul(100)
}

/// Symlink or junction target from a reparse point value.
fn reparse_target(v: &[u8]) -> Option<String> {
    let tag = le32(v, 0);
    let buf_at = match tag {
        NTFS_REPARSE_TAG_SYMLINK => 20,
        NTFS_REPARSE_TAG_MOUNT_POINT => 16,
        _ => return None,
    };
    let (so, sl, po, pl) = (
        le16(v, 8) as usize,
        le16(v, 10) as usize,
        le16(v, 12) as usize,
        le16(v, 14) as usize,
    );
    let buf = v.get(buf_at..)?;
    let print = buf.get(po..po + pl).map(utf16le).unwrap_or_default();
    if !print.is_empty() {
        return Some(print);
    }
    let sub = buf.get(so..so + sl).map(utf16le)?;
    Some(sub.strip_prefix("\\??\\").unwrap_or(&sub).to_string())
}

fn entry(fs: &Ntfs, path: String, n: u64, info: &Info) -> (FileEntry, Option<Error>) {
    let target = info.reparse.as_deref().and_then(reparse_target);
    let kind = if target.is_some() {
        FileKind::Symlink
    } else if info.is_dir {
        FileKind::Dir
    } else {
        FileKind::File
    };
    let mut e = FileEntry::new(path, kind, n);
    e.nlink = Some(u32::try_from(info.names.len()).unwrap_or(u32::MAX));
    if let Some(s) = &info.std {
        e.crtime = Some(ntfs_time(le64(s, 0)));
        e.mtime = Some(ntfs_time(le64(s, 8)));
        e.ctime = Some(ntfs_time(le64(s, 0x10)));
        e.atime = Some(ntfs_time(le64(s, 0x18)));
        e.ntfs_attributes = Some(le32(s, 0x20));
        if s.len() >= 0x38 {
            e.ntfs_security_id = Some(le32(s, 0x34));
        }
    }
    if let Some(t) = target {
        e.size = t.len() as u64;
        e.symlink_target = Some(t);
        return (e, None);
    }
    if kind != FileKind::File {
        return (e, None);
    }
    let Some(d) = &info.data else {
        return (e, None);
    };
    e.size = d.size;
    if let Some(v) = &d.resident {
        e.inline_data = Some(v.clone());
        return (e, None);
    }
    if d.flags & (NTFS_ATTR_FLAG_COMPRESSED | NTFS_ATTR_FLAG_ENCRYPTED) != 0 {
        let what = if d.flags & NTFS_ATTR_FLAG_ENCRYPTED != 0 {
            "encrypted"
        } else {
            "compressed"
        };
        return (e, Some(Error::unsupported(format!("NTFS {what} data"))));
    }
    let cl = fs.geo.cluster;
    for r in &d.runs {
        let fo = r.vcn.saturating_mul(cl);
        if fo >= d.init {
            break;
        }
        let len = (r.len * cl).min(d.init - fo);
        let disk = fs.base + r.lcn * cl;
        match e.extents.last_mut() {
            Some(l) if l.file_offset + l.length == fo && l.disk_offset + l.length == disk => {
                l.length += len
            }
            _ => e.extents.push(FileExtent {
                file_offset: fo,
                disk_offset: disk,
                length: len,
            }),
        }
    }
    (e, None)
}

/// Directory record → (parent, name), for path building.
type DirMap = HashMap<u64, (u64, String)>;

/// The path of directory `n`, memoized; `None` for orphans, cycles and system directories.
fn dir_path(
    n: u64,
    dirs: &DirMap,
    memo: &mut HashMap<u64, Option<String>>,
    limits: &Limits,
) -> Option<String> {
    // Collect the chain up to the root or a memoized ancestor.
    let mut chain = Vec::new();
    let mut cur = n;
    let mut base: Option<String> = loop {
        if cur == NTFS_ROOT_RECORD {
            break Some("/".into());
        }
        if let Some(p) = memo.get(&cur) {
            break p.clone();
        }
        if cur < NTFS_FIRST_USER_RECORD
            || chain.len() > limits.max_depth as usize
            || chain.contains(&cur)
        {
            break None;
        }
        let Some((parent, _)) = dirs.get(&cur) else {
            break None;
        };
        chain.push(cur);
        cur = *parent;
    };
    for &c in chain.iter().rev() {
        base = base.and_then(|b| join(&b, &dirs[&c].1, limits).ok());
        memo.insert(c, base.clone());
    }
    base
}

pub(crate) fn walk(
    r: &dyn ReadAt,
    part: &Partition,
    limits: &Limits,
    sink: &mut Sink,
) -> Result<()> {
    let fs = Ntfs::open(r, part, limits)?;
    // Pass 1: directories.
    fs.claimed.borrow_mut().clear();
    let mut dirs = DirMap::new();
    let errors = std::cell::RefCell::new(Vec::new());
    fs.scan(
        |n, rec| {
            if le16(rec, 0x16) & NTFS_RECORD_IS_DIR != 0 {
                match fs.info(n, rec) {
                    Ok(info) => {
                        if let Some((p, name)) = info.names.into_iter().next() {
                            dirs.insert(n, (p, name));
                        }
                    }
                    Err(e) => errors.borrow_mut().push((n, e)),
                }
            }
            ControlFlow::Continue(())
        },
        |n, e| errors.borrow_mut().push((n, e)),
    )?;
    for (n, e) in errors.into_inner() {
        sink.error(&format!("MFT record {n}"), e);
    }
    // Pass 2: entries.
    fs.claimed.borrow_mut().clear();
    let root_rec = fs.record(NTFS_ROOT_RECORD)?;
    let root = fs.info(NTFS_ROOT_RECORD, &root_rec)?;
    let (e, _) = entry(&fs, "/".into(), NTFS_ROOT_RECORD, &root);
    if sink
        .emit(FileEntry {
            kind: FileKind::Dir,
            ..e
        })
        .is_break()
    {
        return Ok(());
    }
    let mut memo = HashMap::new();
    fs.claimed.borrow_mut().clear();
    fs.scan(
        |n, rec| {
            if n < NTFS_FIRST_USER_RECORD {
                return ControlFlow::Continue(());
            }
            let info = match fs.info(n, rec) {
                Ok(i) => i,
                Err(e) => {
                    sink.error(&format!("MFT record {n}"), e);
                    return ControlFlow::Continue(());
                }
            };
            for (parent, name) in &info.names {
                let Some(pp) = dir_path(*parent, &dirs, &mut memo, limits) else {
                    if *parent != NTFS_EXTEND_RECORD && !is_under_extend(*parent, &dirs) {
                        sink.error(
                            &format!("MFT record {n} ({name})"),
                            Error::corrupt(format!(
                                "orphan: parent {parent} does not reach the root"
                            )),
                        );
                    }
                    continue;
                };
                let path = match join(&pp, name, limits) {
                    Ok(p) => p,
                    Err(e) => {
                        sink.error(&pp, e);
                        continue;
                    }
                };
                let (e, err) = entry(&fs, path.clone(), n, &info);
                if let Some(err) = err {
                    sink.error(&path, err);
                }
                if sink.emit(e).is_break() {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        },
        |_, _| {},
    )?;
    Ok(())
}

/// `n` lies below `$Extend` (metadata such as `$Quota`, `$ObjId`, `$RmMetadata`).
fn is_under_extend(mut n: u64, dirs: &DirMap) -> bool {
    for _ in 0..64 {
        if n == NTFS_EXTEND_RECORD {
            return true;
        }
        match dirs.get(&n) {
            Some((p, _)) if *p != n => n = *p,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_lists_decode_with_signed_offsets_and_holes() {
        let geo = Geometry {
            cluster: 4096,
            clusters: 1 << 20,
            mft_lcn: 4,
            record: 1024,
        };
        // 0x10 clusters at 0x100, a 4-cluster hole, 2 clusters at 0x100 - 0x10.
        let rl = [0x21, 0x10, 0x00, 0x01, 0x01, 0x04, 0x11, 0x02, 0xF0, 0x00];
        let mut runs = Vec::new();
        decode_runs(&rl, 0, &geo, 100, &mut runs).unwrap();
        let v: Vec<(u64, u64, u64)> = runs.iter().map(|r| (r.vcn, r.lcn, r.len)).collect();
        assert_eq!(v, [(0, 0x100, 0x10), (0x14, 0xF0, 2)]);
        // A run before cluster 0 is corrupt.
        assert!(decode_runs(&[0x11, 0x01, 0x80, 0x00], 0, &geo, 100, &mut runs).is_err());
    }

    #[test]
    fn ntfs_epoch_converts() {
        assert_eq!(ntfs_time(116_444_736_000_000_000), 0);
        // A hostile timestamp with the top bit set saturates; it used to wrap to before 1601.
        let latest = ntfs_time(i64::MAX.unsigned_abs());
        assert!(latest > 0);
        assert_eq!(ntfs_time(1 << 63), latest);
        assert_eq!(ntfs_time(u64::MAX), latest);
    }
}
