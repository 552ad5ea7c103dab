//! Partition tables: GPT (primary header, backup as fallback), MBR with extended/logical
//! partitions, or none.
//!
//! Decision order (first match wins):
//! 1. a GPT header with a valid CRC at LBA 1 (512- or 4096-byte sectors), or the backup
//!    header at the last LBA;
//! 2. a FAT or NTFS boot sector at byte 0 (these also end in `55 AA`, so they must be told
//!    apart from an MBR before the MBR is trusted) → whole disk;
//! 3. an MBR with at least one plausible entry;
//! 4. otherwise the whole disk.
//!
//! Partitions are clamped to the image; entries starting beyond it are dropped with a
//! warning. The EBR chain is followed at most `max_partitions` links and never revisits an
//! EBR.

use std::collections::HashSet;

use cairn_types::ReadAt;

use crate::format::*;
use crate::util::{alloc, crc32, guid, le32, le64, read_exact, utf16le};
use crate::{DiskLayout, Error, FsKind, Limits, Partition, PartitionType, Result, TableKind};

/// Reads the partition table and probes each partition's file system.
pub fn scan(r: &dyn ReadAt, limits: &Limits) -> Result<DiskLayout> {
    let size = r
        .size()
        .map_err(|e| Error::io("size of the disk image", e))?;
    let mut layout = DiskLayout {
        table: TableKind::None,
        size,
        disk_guid: None,
        mbr_signature: None,
        partitions: Vec::new(),
        warnings: Vec::new(),
    };
    if size < 512 {
        layout.partitions.push(whole_disk(size));
        return Ok(layout);
    }
    let mut sector0 = [0u8; 512];
    read_exact(r, &mut sector0, 0, &|| "sector 0".into())?;

    if !gpt(r, size, limits, &mut layout)? {
        let boot_sector_fs = crate::fat::probe(&sector0).is_some() || crate::ntfs::probe(&sector0);
        if boot_sector_fs || !mbr(r, &sector0, size, limits, &mut layout)? {
            layout.table = TableKind::None;
            layout.mbr_signature = None;
            layout.partitions = vec![whole_disk(size)];
        }
    }
    for p in &mut layout.partitions {
        p.fs = probe_fs(r, p.offset, p.length);
    }
    crate::lvm::assemble(r, limits, &mut layout);
    Ok(layout)
}

fn whole_disk(size: u64) -> Partition {
    Partition {
        index: 0,
        part_type: PartitionType::WholeDisk,
        guid: None,
        name: String::new(),
        offset: 0,
        length: size,
        logical: false,
        bootable: false,
        fs: FsKind::Unknown,
        note: None,
    }
}

/// Which file system starts at `offset` (read errors and short partitions give `Unknown`).
pub(crate) fn probe_fs(r: &dyn ReadAt, offset: u64, length: u64) -> FsKind {
    let mut head = vec![0u8; 2048];
    let n = length.min(2048) as usize;
    if n < 512 || r.read_exact_at(&mut head[..n], offset).is_err() {
        return FsKind::Unknown;
    }
    if let Some(k) = crate::ext::probe(&head[1024..]) {
        return k;
    }
    if crate::ntfs::probe(&head[..512]) {
        return FsKind::Ntfs;
    }
    if crate::xfs::probe(&head[..512]) {
        return FsKind::Xfs;
    }
    if crate::btrfs::probe(r, offset, length) {
        return FsKind::Btrfs;
    }
    if head[3..11] == BITLOCKER_OEM {
        return FsKind::BitLocker;
    }
    if let Some(k) = crate::fat::probe(&head[..512]) {
        return k;
    }
    probe_other(r, offset, length, &head[..n])
}

/// Contents that are recognised but not read: LVM physical volumes (read through their
/// logical volumes), LUKS, swap, md-raid members, ZFS, blank volumes.
fn probe_other(r: &dyn ReadAt, offset: u64, length: u64, head: &[u8]) -> FsKind {
    if crate::lvm::label_in(head).is_some() {
        return FsKind::LvmPv;
    }
    if head.starts_with(&LUKS_MAGIC) {
        return FsKind::Luks;
    }
    let at = |pos: u64, buf: &mut [u8]| {
        pos.checked_add(buf.len() as u64)
            .is_some_and(|end| end <= length)
            && r.read_exact_at(buf, offset + pos).is_ok()
    };
    let mut magic = [0u8; 10];
    if at(SWAP_MAGIC_OFFSET, &mut magic) && SWAP_MAGICS.iter().any(|m| **m == magic) {
        return FsKind::Swap;
    }
    // md superblocks: v1.1 at 0, v1.2 at 4 KiB, v1.0 8 KiB before the end (4 KiB aligned),
    // 0.90 in the last 64 KiB-aligned 64 KiB.
    let mut word = [0u8; 4];
    let md_at = [
        Some(0),
        Some(MD_V12_OFFSET),
        length.checked_sub(8192).map(|p| p & !4095),
        (length & !0xffff).checked_sub(0x10000),
    ];
    for pos in md_at.into_iter().flatten() {
        if at(pos, &mut word) && u32::from_le_bytes(word) == MD_MAGIC {
            return FsKind::MdRaid;
        }
    }
    let mut ub = [0u8; 8];
    if at(ZFS_UBERBLOCK_OFFSET, &mut ub)
        && (u64::from_le_bytes(ub) == ZFS_UBERBLOCK_MAGIC
            || u64::from_be_bytes(ub) == ZFS_UBERBLOCK_MAGIC)
    {
        return FsKind::Zfs;
    }
    let mut first = vec![0u8; BLANK_PROBE_LEN];
    let n = usize::try_from(length).map_or(BLANK_PROBE_LEN, |l| l.min(BLANK_PROBE_LEN));
    if r.read_exact_at(&mut first[..n], offset).is_ok() && first[..n].iter().all(|b| *b == 0) {
        return FsKind::Blank;
    }
    FsKind::Unknown
}

/// Tries primary then backup GPT header for each sector size; fills `layout` on success.
fn gpt(r: &dyn ReadAt, size: u64, limits: &Limits, layout: &mut DiskLayout) -> Result<bool> {
    for sector in [512u64, 4096] {
        if size < sector * 2 {
            continue;
        }
        let last_lba = size / sector - 1;
        let mut errors = Vec::new();
        for lba in [1, last_lba] {
            match gpt_at(r, sector, lba, size, limits) {
                Ok(Some((disk, parts))) => {
                    layout.table = TableKind::Gpt;
                    layout.disk_guid = Some(disk);
                    layout.partitions = parts;
                    if lba != 1 {
                        layout.warnings.push(format!(
                            "primary GPT header unusable ({}), used the backup",
                            errors.join("; ")
                        ));
                    }
                    return Ok(true);
                }
                Ok(None) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() {
            layout.warnings.extend(errors);
        }
    }
    Ok(false)
}

type GptTable = (String, Vec<Partition>);

/// `Ok(None)`: no GPT signature there; `Err`: a signature but a damaged header or table.
fn gpt_at(
    r: &dyn ReadAt,
    sector: u64,
    lba: u64,
    size: u64,
    limits: &Limits,
) -> Result<Option<GptTable>> {
    let mut h = alloc(sector, limits, "GPT header")?;
    let at = lba * sector;
    read_exact(r, &mut h, at, &|| "GPT header".into())?;
    if h[..8] != GPT_SIGNATURE {
        return Ok(None);
    }
    let hsize = le32(&h, 12);
    if hsize < GPT_HEADER_MIN_LEN || u64::from(hsize) > sector {
        return Err(Error::corrupt(format!("GPT header at {at}: size {hsize}")));
    }
    let mut hc = h[..hsize as usize].to_vec();
    hc[16..20].fill(0);
    if crc32(&hc) != le32(&h, 16) {
        return Err(Error::corrupt(format!("GPT header at {at}: bad CRC")));
    }
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80);
    let esize = le32(&h, 84);
    if !(GPT_ENTRY_MIN_LEN..=4096).contains(&esize) || !esize.is_power_of_two() {
        return Err(Error::corrupt(format!(
            "GPT header at {at}: entry size {esize}"
        )));
    }
    if count > limits.max_partitions.max(128) * 16 {
        return Err(Error::limit(format!("GPT header at {at}: {count} entries")));
    }
    let table_len = u64::from(count) * u64::from(esize);
    let table_at = entries_lba
        .checked_mul(sector)
        .filter(|t| t.saturating_add(table_len) <= size)
        .ok_or_else(|| Error::corrupt(format!("GPT entries at LBA {entries_lba}")))?;
    let mut table = alloc(table_len, limits, "GPT entries")?;
    read_exact(r, &mut table, table_at, &|| "GPT entries".into())?;
    if crc32(&table) != le32(&h, 88) {
        return Err(Error::corrupt(format!(
            "GPT entries at {table_at}: bad CRC"
        )));
    }
    let mut parts = Vec::new();
    for (index, e) in (1u32..).zip(table.chunks_exact(esize as usize)) {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        let (Some(offset), Some(end)) = (
            first.checked_mul(sector),
            last.checked_add(1).and_then(|l| l.checked_mul(sector)),
        ) else {
            continue;
        };
        if last < first || offset >= size {
            continue;
        }
        if parts.len() >= limits.max_partitions as usize {
            break;
        }
        let name = utf16le(&e[56..128]);
        parts.push(Partition {
            index,
            part_type: PartitionType::Gpt(guid(&e[..16])),
            guid: Some(guid(&e[16..32])),
            name: name.trim_end_matches('\0').to_string(),
            offset,
            length: end.min(size) - offset,
            logical: false,
            bootable: false,
            fs: FsKind::Unknown,
            note: None,
        });
    }
    Ok(Some((guid(&h[56..72]), parts)))
}

/// One 16-byte MBR/EBR entry: (bootable, type, start LBA, sector count).
fn mbr_entry(s: &[u8], i: usize) -> (u8, u8, u64, u64) {
    let e = &s[MBR_TABLE_OFFSET + i * MBR_ENTRY_LEN..][..MBR_ENTRY_LEN];
    (e[0], e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)))
}

/// Fills `layout` from an MBR; false when sector 0 is not a plausible MBR.
fn mbr(
    r: &dyn ReadAt,
    s: &[u8; 512],
    size: u64,
    limits: &Limits,
    layout: &mut DiskLayout,
) -> Result<bool> {
    if s[510..512] != BOOT_SIGNATURE {
        return Ok(false);
    }
    let mut any = false;
    for i in 0..4 {
        let (boot, ty, _, count) = mbr_entry(s, i);
        if boot & 0x7f != 0 {
            return Ok(false); // boot flag must be 0x00 or 0x80
        }
        if ty != 0 && count != 0 {
            any = true;
        }
    }
    if !any {
        return Ok(false);
    }
    layout.table = TableKind::Mbr;
    layout.mbr_signature = Some(le32(s, 440));
    for (i, index) in (0..4).zip(1u32..) {
        let (boot, ty, start, count) = mbr_entry(s, i);
        if ty == 0 || count == 0 {
            continue;
        }
        if MBR_TYPES_EXTENDED.contains(&ty) {
            ebr_chain(r, start, count, size, limits, layout);
            continue;
        }
        push_mbr(layout, index, ty, boot, start * 512, count * 512, false);
    }
    layout.partitions.sort_by_key(|p| p.index);
    Ok(true)
}

fn push_mbr(
    layout: &mut DiskLayout,
    index: u32,
    ty: u8,
    boot: u8,
    offset: u64,
    len: u64,
    logical: bool,
) {
    if offset >= layout.size {
        layout
            .warnings
            .push(format!("MBR partition {index} starts beyond the image"));
        return;
    }
    layout.partitions.push(Partition {
        index,
        part_type: PartitionType::Mbr(ty),
        guid: None,
        name: String::new(),
        offset,
        length: len.min(layout.size - offset),
        logical,
        bootable: boot == 0x80,
        fs: FsKind::Unknown,
        note: None,
    });
}

/// Follows the EBR chain of the extended partition at `ext_start` (LBA); damage ends the
/// chain with a warning.
fn ebr_chain(
    r: &dyn ReadAt,
    ext_start: u64,
    ext_count: u64,
    size: u64,
    limits: &Limits,
    layout: &mut DiskLayout,
) {
    let mut seen = HashSet::new();
    let mut ebr = ext_start;
    let mut index = 5;
    loop {
        if !seen.insert(ebr) || seen.len() > limits.max_partitions as usize {
            layout
                .warnings
                .push(format!("EBR chain loops or is too long at LBA {ebr}"));
            return;
        }
        let mut s = [0u8; 512];
        let Some(at) = ebr
            .checked_mul(512)
            .filter(|a| a.saturating_add(512) <= size)
        else {
            layout
                .warnings
                .push(format!("EBR at LBA {ebr} is beyond the image"));
            return;
        };
        if r.read_exact_at(&mut s, at).is_err() || s[510..512] != BOOT_SIGNATURE {
            layout
                .warnings
                .push(format!("EBR at LBA {ebr} has no boot signature"));
            return;
        }
        let (boot, ty, start, count) = mbr_entry(&s, 0);
        if ty != 0 && count != 0 {
            push_mbr(
                layout,
                index,
                ty,
                boot,
                (ebr + start) * 512,
                count * 512,
                true,
            );
            index += 1;
        }
        let (_, nty, next, _) = mbr_entry(&s, 1);
        if nty == 0 || next == 0 || next >= ext_count {
            return;
        }
        ebr = ext_start + next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &mut [u8], i: usize, ty: u8, start: u32, count: u32) {
        let e = &mut s[MBR_TABLE_OFFSET + i * 16..][..16];
        e[4] = ty;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&count.to_le_bytes());
    }

    #[test]
    fn mbr_with_a_looping_ebr_chain_ends() {
        let mut img = vec![0u8; 64 * 512];
        entry(&mut img, 0, 0x83, 1, 3);
        entry(&mut img, 1, 0x05, 4, 40);
        img[510] = 0x55;
        img[511] = 0xAA;
        // EBR at LBA 4: logical at +1, next EBR at +0 (itself).
        let ebr = &mut img[4 * 512..5 * 512];
        entry(ebr, 0, 0x83, 1, 2);
        entry(ebr, 1, 0x05, 0, 10);
        ebr[510] = 0x55;
        ebr[511] = 0xAA;
        let l = scan(&img, &Limits::default()).unwrap();
        assert_eq!(l.table, TableKind::Mbr);
        let idx: Vec<u32> = l.partitions.iter().map(|p| p.index).collect();
        assert_eq!(idx, [1, 5]);
        assert_eq!(l.partitions[1].offset, 5 * 512);
        assert!(l.partitions[1].logical);
    }

    /// A GPT disk of `sectors` sectors of `sector` bytes with one partition (LBA 34..=99).
    fn gpt_disk(sector: usize, sectors: usize) -> Vec<u8> {
        let mut img = vec![0u8; sector * sectors];
        let last = u32::try_from(sectors - 1).unwrap();
        entry(&mut img, 0, MBR_TYPE_GPT_PROTECTIVE, 1, last);
        img[510] = 0x55;
        img[511] = 0xAA;
        let mut e = vec![0u8; 128 * 128];
        e[..16].copy_from_slice(&[
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4,
        ]);
        e[16] = 1;
        e[32..40].copy_from_slice(&34u64.to_le_bytes());
        e[40..48].copy_from_slice(&99u64.to_le_bytes());
        for (i, c) in "data".encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        let h = &mut img[sector..sector + 92];
        h[..8].copy_from_slice(&GPT_SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&e).to_le_bytes());
        let crc = crc32(h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        img[2 * sector..2 * sector + e.len()].copy_from_slice(&e);
        img
    }

    #[test]
    fn gpt_with_512_and_4096_byte_sectors() {
        for sector in [512usize, 4096] {
            let img = gpt_disk(sector, 200);
            let l = scan(&img, &Limits::default()).unwrap();
            assert_eq!(l.table, TableKind::Gpt, "{sector}");
            assert_eq!(l.partitions.len(), 1);
            let p = &l.partitions[0];
            assert_eq!(
                (p.index, p.offset, p.length),
                (1, 34 * sector as u64, 66 * sector as u64)
            );
            assert_eq!(p.name, "data");
            // A flipped bit in the entries breaks their CRC: no GPT, the protective MBR remains.
            let mut bad = img.clone();
            bad[2 * sector + 40] ^= 1;
            let l = scan(&bad, &Limits::default()).unwrap();
            assert_eq!(l.table, TableKind::Mbr);
            assert!(!l.warnings.is_empty());
        }
    }

    #[test]
    fn tiny_and_empty_images_are_whole_disks() {
        for n in [0usize, 10, 512, 4096] {
            let l = scan(&vec![0u8; n], &Limits::default()).unwrap();
            assert_eq!(l.table, TableKind::None);
            assert_eq!(l.partitions.len(), 1);
            // Too short to probe, or all zeros.
            let want = if n < 512 {
                FsKind::Unknown
            } else {
                FsKind::Blank
            };
            assert_eq!(l.partitions[0].fs, want);
        }
    }
}
