//! LVM2: physical-volume labels, the text metadata, and logical volumes read in place.
//!
//! ```text
//! PV (a partition or the whole disk)
//!   sector 0..3: label  "LABELONE" sector crc offset "LVM2 001" → pv_header
//!   pv_header: uuid[32] device_size { data area }* 0 { metadata area (offset, size) }* 0
//!   metadata area: mda_header (crc, magic, version, start, size, raw_locn[]) + ring buffer
//!     raw_locn[0] = the current text (offset in the area, size, crc), may wrap past the end
//! ```
//!
//! [`assemble`] reads every PV found on the disk, takes each volume group's newest metadata
//! (highest `seqno`), and adds one [`Partition`] per visible logical volume with
//! [`PartitionType::LogicalVolume`]: its segments map LV bytes to disk bytes (linear and
//! striped). What is not read gets a [`Partition::note`]: thin volumes and pools, the
//! copy-on-write store of a snapshot, RAID, mirror, cache or other segment types, and LVs on
//! a PV that is not on this disk. [`LvReader`] reads an LV through its segments, and
//! [`map_extents`] turns a file's LV byte ranges back into disk byte ranges, so entries keep
//! the crate's invariant (extents are byte ranges of the disk image).
//!
//! Nothing is activated and nothing written; damaged metadata leaves the PV partition with
//! a note saying why.

pub(crate) mod text;

use std::collections::BTreeMap;

use cairn_types::ReadAt;

use crate::format::*;
use crate::util::{crc32_update, le32, le64};
use crate::{
    DiskLayout, Error, FileExtent, FsKind, Limits, LvSegment, Partition, PartitionType, Result,
};
use text::Value;

/// The byte offset of the label inside `head` (the first 2048 bytes of a volume).
pub(crate) fn label_in(head: &[u8]) -> Option<usize> {
    (0..LVM_LABEL_SECTORS)
        .map(|s| usize::try_from(s * LVM_SECTOR).unwrap_or(usize::MAX))
        .find(|&at| {
            head.get(at..at + 32)
                .is_some_and(|l| l[..8] == LVM_LABEL_ID && l[24..32] == LVM_LABEL_TYPE)
        })
}

fn lvm_crc(data: &[u8]) -> u32 {
    crc32_update(LVM_CRC_INIT, data)
}

/// One physical volume as its label and metadata describe it.
struct PvRead {
    uuid: String,
    text: String,
}

/// Reads the label, the header and the current metadata text of the PV at `p`.
fn read_pv(r: &dyn ReadAt, p: &Partition, limits: &Limits) -> Result<PvRead> {
    let sector = usize::try_from(LVM_SECTOR).unwrap_or(512);
    let mut head = vec![0u8; sector * 4];
    r.read_exact_at(&mut head, p.offset)
        .map_err(|e| Error::io("LVM label", e))?;
    let at = label_in(&head).ok_or_else(|| Error::corrupt("no LVM label"))?;
    let label = &head[at..at + sector];
    if le32(label, 16) != lvm_crc(&label[LVM_LABEL_CRC_FROM..]) {
        return Err(Error::corrupt("LVM label checksum mismatch"));
    }
    let hdr = usize::try_from(le32(label, 20)).unwrap_or(usize::MAX);
    let pvh = label
        .get(hdr..)
        .filter(|h| h.len() >= LVM_ID_LEN + 8)
        .ok_or_else(|| Error::corrupt("LVM pv_header outside the label sector"))?;
    let uuid = String::from_utf8_lossy(&pvh[..LVM_ID_LEN]).into_owned();
    // Two zero-terminated lists of (offset, size): data areas, then metadata areas.
    let mut pos = LVM_ID_LEN + 8;
    let mut mdas = Vec::new();
    for list in 0..2 {
        loop {
            if pos + 16 > pvh.len() {
                return Err(Error::corrupt(
                    "LVM pv_header area lists run off the sector",
                ));
            }
            let (off, size) = (le64(pvh, pos), le64(pvh, pos + 8));
            pos += 16;
            if off == 0 && size == 0 {
                break;
            }
            if list == 1 {
                mdas.push((off, size));
            }
        }
    }
    let mut last_err = Error::corrupt("PV has no metadata area (its metadata is elsewhere)");
    for (off, size) in mdas {
        match read_mda(r, p, off, size, limits) {
            Ok(text) => return Ok(PvRead { uuid, text }),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

/// The current metadata text of the area at `off` (bytes into the PV).
fn read_mda(r: &dyn ReadAt, p: &Partition, off: u64, size: u64, limits: &Limits) -> Result<String> {
    let hdr_len = LVM_MDA_HEADER_LEN;
    if off.checked_add(size).is_none_or(|e| e > p.length) || size <= hdr_len {
        return Err(Error::corrupt(format!(
            "LVM metadata area {off}+{size} outside the PV"
        )));
    }
    let mut h = [0u8; 512];
    r.read_exact_at(&mut h, p.offset + off)
        .map_err(|e| Error::io("LVM metadata header", e))?;
    if h[4..20] != LVM_MDA_MAGIC {
        return Err(Error::corrupt("LVM metadata header magic missing"));
    }
    if le32(&h, 0) != lvm_crc(&h[4..]) {
        return Err(Error::corrupt("LVM metadata header checksum mismatch"));
    }
    if le32(&h, 20) != LVM_MDA_VERSION || le64(&h, 24) != off || le64(&h, 32) != size {
        return Err(Error::corrupt(
            "LVM metadata header disagrees with the PV header",
        ));
    }
    let (t_off, t_len, t_crc, flags) = (le64(&h, 40), le64(&h, 48), le32(&h, 56), le32(&h, 60));
    if flags & LVM_RAW_LOCN_IGNORED != 0 || t_len == 0 {
        return Err(Error::corrupt(
            "this metadata area holds no current metadata",
        ));
    }
    let ring = size - hdr_len;
    if t_off < hdr_len || t_off >= size || t_len > ring || t_len > LVM_MAX_METADATA {
        return Err(Error::corrupt(format!(
            "LVM metadata text {t_off}+{t_len} does not fit its area of {size}"
        )));
    }
    let mut text = crate::util::alloc(t_len, limits, "LVM metadata")?;
    // The text may wrap from the end of the area to just after the header.
    let first = t_len.min(size - t_off);
    let split = usize::try_from(first).unwrap_or(text.len());
    r.read_exact_at(&mut text[..split], p.offset + off + t_off)
        .map_err(|e| Error::io("LVM metadata", e))?;
    if split < text.len() {
        r.read_exact_at(&mut text[split..], p.offset + off + hdr_len)
            .map_err(|e| Error::io("LVM metadata", e))?;
    }
    if lvm_crc(&text) != t_crc {
        return Err(Error::corrupt("LVM metadata checksum mismatch"));
    }
    while text.last() == Some(&0) {
        text.pop();
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Reads every LVM physical volume of `layout` and appends its logical volumes.
pub(crate) fn assemble(r: &dyn ReadAt, limits: &Limits, layout: &mut DiskLayout) {
    // VG name → (seqno, parsed metadata); PV uuid → its partition.
    let mut vgs: BTreeMap<String, (u64, Value)> = BTreeMap::new();
    let mut pv_at: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in layout
        .partitions
        .iter_mut()
        .filter(|p| p.fs == FsKind::LvmPv)
    {
        let pv = match read_pv(r, p, limits).and_then(|pv| Ok((text::parse(&pv.text)?, pv))) {
            Ok(x) => x,
            Err(e) => {
                p.note = Some(format!("LVM physical volume with unreadable metadata: {e}"));
                continue;
            }
        };
        let (tree, pv) = pv;
        pv_at.insert(pv.uuid, (p.offset, p.length));
        for (name, vg) in tree.sections() {
            let seq = vg.uint("seqno").unwrap_or(0);
            if vgs.get(name).is_none_or(|(s, _)| *s < seq) {
                vgs.insert(name.to_string(), (seq, vg.clone()));
            }
        }
    }
    for (name, (_, vg)) in &vgs {
        match volumes(name, vg, &pv_at, layout.size, limits) {
            Ok(lvs) => layout.partitions.extend(lvs),
            Err(e) => layout
                .warnings
                .push(format!("LVM volume group {name}: {e}")),
        }
    }
    // A partition's LVs are now listed; its probe needs the LV reader.
    for i in 0..layout.partitions.len() {
        let p = &layout.partitions[i];
        if let PartitionType::LogicalVolume { segments, .. } = &p.part_type
            && p.note.is_none()
        {
            let lv = LvReader::new(r, segments.clone(), p.length);
            let fs = crate::part::probe_fs(&lv, 0, p.length);
            layout.partitions[i].fs = fs;
        }
    }
}

/// The visible logical volumes of one volume group.
fn volumes(
    vg_name: &str,
    vg: &Value,
    pv_at: &BTreeMap<String, (u64, u64)>,
    disk_size: u64,
    limits: &Limits,
) -> Result<Vec<Partition>> {
    let extent = vg
        .uint("extent_size")
        .and_then(|s| s.checked_mul(LVM_SECTOR))
        .filter(|s| *s > 0)
        .ok_or_else(|| Error::corrupt("no extent_size"))?;
    // PV name in the metadata (pv0) → disk offset of its first extent, extent count.
    let mut pvs: BTreeMap<&str, Option<(u64, u64)>> = BTreeMap::new();
    if let Some(list) = vg.get("physical_volumes") {
        for (name, pv) in list.sections() {
            let id: String = pv
                .str("id")
                .unwrap_or("")
                .chars()
                .filter(|c| *c != '-')
                .collect();
            let start = pv.uint("pe_start").and_then(|s| s.checked_mul(LVM_SECTOR));
            let found = pv_at.get(&id).and_then(|(off, len)| {
                let start = start?;
                let count = pv.uint("pe_count")?;
                let end = start.checked_add(count.checked_mul(extent)?)?;
                (end <= *len).then_some((off + start, count))
            });
            pvs.insert(name, found);
        }
    }
    let Some(lvs) = vg.get("logical_volumes") else {
        return Ok(Vec::new());
    };
    // Which LV is the copy-on-write store of which origin, which is a thin pool's part.
    let mut cow_of = BTreeMap::new();
    for (_, lv) in lvs.sections() {
        for (_, seg) in lv.sections() {
            if seg.str("type") == Some("snapshot")
                && let (Some(cow), Some(origin)) = (seg.str("cow_store"), seg.str("origin"))
            {
                cow_of.insert(cow.to_string(), origin.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for (lv_name, lv) in lvs.sections() {
        // LVM stores a snapshot's copy-on-write LV without VISIBLE, yet shows it as the
        // snapshot: list it too.
        if !lv.has_flag("status", "VISIBLE") && !cow_of.contains_key(lv_name) {
            continue;
        }
        if out.len() >= usize::try_from(limits.max_partitions).unwrap_or(usize::MAX) {
            return Err(Error::limit("more logical volumes than max_partitions"));
        }
        let (segments, size, note) = match lv_segments(lv, extent, &pvs, disk_size) {
            Ok((segs, size)) => match cow_of.get(lv_name) {
                Some(origin) => (
                    Vec::new(),
                    size,
                    Some(format!(
                        "snapshot of {vg_name}/{origin} (its copy-on-write store is not read; \
                         the origin is)"
                    )),
                ),
                None => (segs, size, None),
            },
            Err((size, why)) => (Vec::new(), size, Some(why)),
        };
        out.push(Partition {
            index: 0,
            offset: segments
                .first()
                .and_then(|s| s.stripes.first().copied())
                .unwrap_or(0),
            part_type: PartitionType::LogicalVolume {
                vg: vg_name.to_string(),
                lv: lv_name.to_string(),
                segments,
            },
            guid: lv.str("id").map(str::to_string),
            name: format!("{vg_name}/{lv_name}"),
            length: size,
            logical: false,
            bootable: false,
            fs: FsKind::Unknown,
            note,
        });
    }
    Ok(out)
}

/// The segments of one LV and its size, or its size and why it cannot be read.
fn lv_segments(
    lv: &Value,
    extent: u64,
    pvs: &BTreeMap<&str, Option<(u64, u64)>>,
    disk_size: u64,
) -> std::result::Result<(Vec<LvSegment>, u64), (u64, String)> {
    let mut segs = Vec::new();
    let mut size = 0u64;
    let mut why = None;
    for (_, seg) in lv.sections() {
        let (Some(start), Some(count)) = (seg.uint("start_extent"), seg.uint("extent_count"))
        else {
            why.get_or_insert("a segment without start_extent/extent_count".to_string());
            continue;
        };
        let (Some(lv_offset), Some(length)) =
            (start.checked_mul(extent), count.checked_mul(extent))
        else {
            why.get_or_insert("a segment beyond 2^64 bytes".to_string());
            continue;
        };
        size = size.max(lv_offset.saturating_add(length));
        match seg.str("type").unwrap_or("") {
            "striped" => {}
            "thin" => {
                why.get_or_insert(format!(
                    "thin volume in pool {} (thin pools are not read)",
                    seg.str("thin_pool").unwrap_or("?")
                ));
                continue;
            }
            "thin-pool" => {
                why.get_or_insert("thin pool (thin pools are not read)".to_string());
                continue;
            }
            other => {
                why.get_or_insert(format!("segment type {other:?} is not read"));
                continue;
            }
        }
        let n = seg.uint("stripe_count").unwrap_or(0);
        let list = seg.list("stripes");
        if n == 0 || n.checked_mul(2) != u64::try_from(list.len()).ok() || !count.is_multiple_of(n)
        {
            why.get_or_insert("a striped segment with a bad stripe list".to_string());
            continue;
        }
        let stripe_size = if n == 1 {
            length
        } else {
            match seg
                .uint("stripe_size")
                .and_then(|s| s.checked_mul(LVM_SECTOR))
            {
                Some(s) if s > 0 && extent.is_multiple_of(s) => s,
                _ => {
                    why.get_or_insert("a striped segment with a bad stripe_size".to_string());
                    continue;
                }
            }
        };
        let per_stripe = count / n;
        let mut stripes = Vec::new();
        for pair in list.chunks(2) {
            let (Value::Str(pv), Value::Int(pe)) = (&pair[0], &pair[1]) else {
                why.get_or_insert("a stripe that is not (PV, extent)".to_string());
                break;
            };
            let Some(found) = pvs.get(pv.as_str()) else {
                why.get_or_insert(format!("stripe on {pv}, which the volume group lacks"));
                break;
            };
            let Some((base, pe_count)) = found else {
                why.get_or_insert(format!(
                    "on physical volume {pv}, which is not on this disk"
                ));
                break;
            };
            let pe = u64::try_from(*pe).unwrap_or(u64::MAX);
            let in_range = pe
                .checked_add(per_stripe)
                .is_some_and(|end| end <= *pe_count);
            let at = base.saturating_add(pe.saturating_mul(extent));
            if !in_range || at.saturating_add(per_stripe.saturating_mul(extent)) > disk_size {
                why.get_or_insert(format!("extents {pe}+{per_stripe} beyond {pv}"));
                break;
            }
            stripes.push(at);
        }
        if stripes.len() as u64 == n {
            segs.push(LvSegment {
                lv_offset,
                length,
                stripe_size,
                stripes,
            });
        }
    }
    if let Some(w) = why {
        return Err((size, w));
    }
    segs.sort_by_key(|s| s.lv_offset);
    let mut at = 0;
    for s in &segs {
        if s.lv_offset != at {
            return Err((size, "segments overlap or leave a gap".into()));
        }
        at = s.lv_offset + s.length;
    }
    Ok((segs, size))
}

/// Where LV byte `off` lives on the disk, and how many bytes from there are contiguous.
fn locate(segs: &[LvSegment], off: u64) -> Option<(u64, u64)> {
    let i = segs.partition_point(|s| s.lv_offset + s.length <= off);
    let s = segs.get(i).filter(|s| s.lv_offset <= off)?;
    let rel = off - s.lv_offset;
    let n = s.stripes.len() as u64;
    let chunk = rel / s.stripe_size;
    let within = rel % s.stripe_size;
    let stripe = usize::try_from(chunk % n).ok()?;
    let disk = s.stripes[stripe] + (chunk / n) * s.stripe_size + within;
    Some((disk, (s.stripe_size - within).min(s.length - rel)))
}

/// Turns LV byte ranges into disk byte ranges (split at stripe chunks, adjacent ones merged).
pub(crate) fn map_extents(
    segs: &[LvSegment],
    extents: &[FileExtent],
    limits: &Limits,
) -> Result<Vec<FileExtent>> {
    let mut out: Vec<FileExtent> = Vec::with_capacity(extents.len());
    for x in extents {
        let mut done = 0;
        while done < x.length {
            let (disk, run) = locate(segs, x.disk_offset + done)
                .ok_or_else(|| Error::corrupt("a file extent beyond its logical volume"))?;
            let run = run.min(x.length - done);
            let file_offset = x.file_offset + done;
            match out.last_mut() {
                Some(l)
                    if l.file_offset + l.length == file_offset
                        && l.disk_offset + l.length == disk =>
                {
                    l.length += run;
                }
                _ => {
                    if out.len() >= limits.max_extents_per_file {
                        return Err(Error::limit("more extents than max_extents_per_file"));
                    }
                    out.push(FileExtent {
                        file_offset,
                        disk_offset: disk,
                        length: run,
                    });
                }
            }
            done += run;
        }
    }
    Ok(out)
}

/// Moves compressed extents from LV to disk offsets; each must lie in one contiguous run
/// (true on linear volumes; a compressed extent split by striping is refused).
pub(crate) fn map_compressed(segs: &[LvSegment], c: &mut [crate::CompressedExtent]) -> Result<()> {
    for x in c {
        match locate(segs, x.disk_offset) {
            Some((disk, run)) if run >= x.disk_length => x.disk_offset = disk,
            Some(_) => {
                return Err(Error::new(
                    crate::ErrorKind::Unsupported,
                    "a compressed extent split across LVM stripes",
                ));
            }
            None => {
                return Err(Error::corrupt(
                    "a compressed extent beyond its logical volume",
                ));
            }
        }
    }
    Ok(())
}

/// A logical volume's bytes, read through its segments.
pub(crate) struct LvReader<'a> {
    disk: &'a dyn ReadAt,
    segs: Vec<LvSegment>,
    size: u64,
}

impl<'a> LvReader<'a> {
    pub(crate) fn new(disk: &'a dyn ReadAt, segs: Vec<LvSegment>, size: u64) -> Self {
        Self { disk, segs, size }
    }
}

impl ReadAt for LvReader<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let Some((disk, run)) = locate(&self.segs, offset) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("byte {offset} of the logical volume is not mapped"),
            ));
        };
        let n = usize::try_from(run).map_or(buf.len(), |r| r.min(buf.len()));
        self.disk.read_at(&mut buf[..n], disk)
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn striped() -> Vec<LvSegment> {
        vec![
            LvSegment {
                lv_offset: 0,
                length: 100,
                stripe_size: 100,
                stripes: vec![1000],
            },
            LvSegment {
                lv_offset: 100,
                length: 80,
                stripe_size: 10,
                stripes: vec![5000, 9000],
            },
        ]
    }

    #[test]
    fn linear_and_striped_offsets_map_to_the_disk() {
        let s = striped();
        assert_eq!(locate(&s, 0), Some((1000, 100)));
        assert_eq!(locate(&s, 99), Some((1099, 1)));
        assert_eq!(locate(&s, 100), Some((5000, 10)));
        assert_eq!(locate(&s, 113), Some((9003, 7)));
        assert_eq!(locate(&s, 125), Some((5015, 5)));
        assert_eq!(locate(&s, 180), None);
        let x = [FileExtent {
            file_offset: 0,
            disk_offset: 90,
            length: 40,
        }];
        let m = map_extents(&s, &x, &Limits::default()).unwrap();
        let d: Vec<_> = m
            .iter()
            .map(|e| (e.file_offset, e.disk_offset, e.length))
            .collect();
        assert_eq!(
            d,
            [
                (0, 1090, 10),
                (10, 5000, 10),
                (20, 9000, 10),
                (30, 5010, 10)
            ]
        );
        let past = [FileExtent {
            file_offset: 0,
            disk_offset: 170,
            length: 20,
        }];
        assert!(map_extents(&s, &past, &Limits::default()).is_err());
    }

    fn vg(segments: &str) -> Vec<Partition> {
        let t = format!(
            r#"vg {{ extent_size = 8 physical_volumes {{ pv0 {{ id = "AAAA-BBBB" pe_start = 8
               pe_count = 10 }} }} logical_volumes {{ lv {{ status = ["VISIBLE"] {segments} }} }} }}"#
        );
        let tree = text::parse(&t).unwrap();
        let pv_at = BTreeMap::from([("AAAABBBB".to_string(), (1 << 20, 1 << 20))]);
        volumes(
            "vg",
            tree.get("vg").unwrap(),
            &pv_at,
            4 << 20,
            &Limits::default(),
        )
        .unwrap()
    }

    #[test]
    fn hostile_segments_give_a_note_not_a_mapping() {
        let ok = vg(
            r#"s1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 1
                         stripes = ["pv0", 0] }"#,
        );
        assert_eq!(ok[0].note, None);
        assert_eq!(ok[0].length, 2 * 8 * 512);
        for (segs, says) in [
            // Overlapping segments.
            (
                r#"s1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 1
                     stripes = ["pv0", 0] }
                s2 { start_extent = 1 extent_count = 2 type = "striped" stripe_count = 1
                     stripes = ["pv0", 4] }"#,
                "overlap",
            ),
            // Extents beyond the PV.
            (
                r#"s1 { start_extent = 0 extent_count = 4 type = "striped" stripe_count = 1
                     stripes = ["pv0", 8] }"#,
                "beyond",
            ),
            // A PV the VG does not have; a stripe list that does not match its count.
            (
                r#"s1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1
                     stripes = ["pv9", 0] }"#,
                "lacks",
            ),
            (
                r#"s1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 2
                     stripe_size = 4 stripes = ["pv0", 0] }"#,
                "stripe list",
            ),
            (
                r#"s1 { start_extent = 0 extent_count = 2 type = "raid1" }"#,
                "raid1",
            ),
            (
                r#"s1 { start_extent = 9223372036854775807 extent_count = 2 type = "striped" }"#,
                "2^64",
            ),
        ] {
            let p = vg(segs);
            let why = p[0].note.clone().unwrap_or_default();
            assert!(why.contains(says), "{segs}: {why:?}");
            assert!(matches!(&p[0].part_type,
                PartitionType::LogicalVolume { segments, .. } if segments.is_empty()));
        }
    }
}
