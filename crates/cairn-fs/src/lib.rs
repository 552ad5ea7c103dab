//! Read-only partition tables and file systems over any [`ReadAt`], for Cairn's file catalog
//! and file-level restore.
//!
//! ```text
//! disk image (ReadAt) ──scan──▶ DiskLayout { table, partitions[fs kind] }
//!                      ──walk(partition)──▶ FileEntry* (path, metadata, extents) + WalkReport
//!                      ──read_file(entry)──▶ content, reassembled from the extents
//! ```
//!
//! | module | reads |
//! |---|---|
//! | [`part`](crate::scan) | GPT, MBR with extended/logical partitions, unpartitioned disks |
//! | `ext` | ext2/3/4: extents, indirect maps, htree and inline directories, in-memory jbd2 replay |
//! | `fat` | FAT12/16/32 with long names |
//! | `ntfs` | NTFS: MFT scan, `$STANDARD_INFORMATION`, `$FILE_NAME`, `$DATA` runs, reparse-point links |
//! | `lvm` | LVM2 labels and text metadata; linear and striped logical volumes, read in place |
//! | `xfs` | XFS v4/v5: CRC-checked metadata, extent lists and bmbt maps, short-form/block/leaf/node directories, log cleanliness (no replay) |
//! | `btrfs` | btrfs on one device: checked superblock and nodes, chunk map, every subvolume and snapshot at its place, inline/regular/compressed extents |
//! | `compressed` | [`CompressedExtent`]: zlib, zstd and btrfs-LZO data that `copy_file` decompresses |
//! | `format` | every magic number and on-disk constant |
//!
//! All the file-system readers are our own rather than `ext4-view`, `fatfs` or `ntfs`: the
//! catalog needs every file's data as byte ranges of the *disk image*, a bounded streaming walk,
//! and speed (one read per inode-table chunk and per directory run). `fatfs` hides cluster
//! locations and wants `Read + Write + Seek`; `ext4-view` (which also replays the journal in
//! memory) gives file contents, not their block locations; `ntfs` exposes data runs but reads
//! through one `&mut Read + Seek` cursor, whereas one sequential MFT scan over [`ReadAt`] is
//! simpler to bound and faster.
//!
//! # Invariants
//!
//! - **Never writes** to the source, not even for journal replay: committed ext journal
//!   transactions are overlaid in memory. A dirty XFS log is not replayed at all: the walk
//!   reads the last checkpoint and says so in [`WalkReport::xfs_log`].
//! - **Extents are image byte ranges**: [`FileExtent::disk_offset`] includes the partition
//!   offset, so `reader.read_at(disk_offset)` returns file bytes with no further mapping.
//!   Holes and unwritten extents are absent and read as zeros. When ext journal replay put a
//!   file's data block in the journal (data=journal mode), the extent points at the journal
//!   copy and [`FileEntry::data_from_journal`] is set. Compressed data (btrfs) cannot be a
//!   byte range: it is listed in [`FileEntry::compressed`], and [`copy_file`] decompresses it.
//! - **Bounded on hostile input**: every count, size and depth read from disk is checked
//!   against [`Limits`] before it drives a loop or an allocation; directory cycles are detected.
//!   Damage inside the tree yields a partial listing with errors in the [`WalkReport`];
//!   damage to the top-level structures (superblock, boot sector, MFT record 0) is an
//!   [`Error`]. No input panics.
//! - **Streaming**: [`walk`] hands entries to a visitor as it meets them; memory grows with the
//!   directory stack and the set of visited directories, not with the number of files.

#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

mod btrfs;
mod compressed;
mod entry;
mod error;
mod ext;
mod fat;
pub mod format;
mod lvm;
mod ntfs;
mod part;
mod util;
mod xfs;

use std::io::Write;
use std::ops::ControlFlow;

pub use cairn_types::ReadAt;
pub use compressed::{CompressedExtent, Compression};
pub use entry::{
    DiskLayout, FileEntry, FileExtent, FileKind, FsKind, Limits, LvSegment, Partition,
    PartitionType, TableKind, WalkError, WalkReport, XfsLog,
};
pub use error::{Error, ErrorKind, Result};

/// Reads the partition table of `reader` and detects each partition's file system.
pub fn scan(reader: &dyn ReadAt) -> Result<DiskLayout> {
    part::scan(reader, &Limits::default())
}

/// [`scan`] with explicit limits (partition count).
pub fn scan_with(reader: &dyn ReadAt, limits: &Limits) -> Result<DiskLayout> {
    part::scan(reader, limits)
}

/// Lists every file of the file system in `partition`, handing each to `visitor`. The root
/// (path `/`) comes first; on ext and FAT a directory's entries come before its subtree, on
/// NTFS entries come in MFT order. A hard-linked file is reported once per path (same
/// `inode`). The visitor returns `ControlFlow::Break(())` to stop early.
///
/// Fails only when the file system cannot be opened at all; damage further down is reported
/// in the returned [`WalkReport`] and the listing is partial.
pub fn walk(
    reader: &dyn ReadAt,
    partition: &Partition,
    limits: &Limits,
    mut visitor: impl FnMut(FileEntry) -> ControlFlow<()>,
) -> Result<WalkReport> {
    walk_to(reader, partition, limits, &mut visitor, None)
}

/// [`walk`], listing only the ancestors of `target` when it is given (ext, FAT, XFS).
fn walk_to(
    reader: &dyn ReadAt,
    partition: &Partition,
    limits: &Limits,
    visitor: &mut dyn FnMut(FileEntry) -> ControlFlow<()>,
    target: Option<String>,
) -> Result<WalkReport> {
    if let Some(why) = partition.note.as_ref() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("not indexed: {why}"),
        ));
    }
    if let PartitionType::LogicalVolume { segments, .. } = &partition.part_type {
        // The file system sees the LV from byte 0; its extents go back to disk ranges.
        let lv = lvm::LvReader::new(reader, segments.clone(), partition.length);
        let inner = Partition {
            offset: 0,
            part_type: PartitionType::WholeDisk,
            ..partition.clone()
        };
        let mut bad = Vec::new();
        let mut mapped = |mut e: FileEntry| match lvm::map_extents(segments, &e.extents, limits)
            .and_then(|x| lvm::map_compressed(segments, &mut e.compressed).map(|()| x))
        {
            Ok(x) => {
                e.extents = x;
                visitor(e)
            }
            Err(err) => {
                bad.push((e.path, err));
                ControlFlow::Continue(())
            }
        };
        let mut report = walk_to(&lv, &inner, limits, &mut mapped, target)?;
        for (path, err) in bad {
            report.error(limits, &path, err);
        }
        return Ok(report);
    }
    let mut sink = util::Sink::new(visitor, limits);
    sink.target = target;
    let fs = match partition.fs {
        FsKind::Unknown => part::probe_fs(reader, partition.offset, partition.length),
        k => k,
    };
    match fs {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => {
            ext::walk(reader, partition, limits, &mut sink)?
        }
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => {
            fat::walk(reader, partition, limits, &mut sink)?
        }
        FsKind::Ntfs => ntfs::walk(reader, partition, limits, &mut sink)?,
        FsKind::Xfs => xfs::walk(reader, partition, limits, &mut sink)?,
        FsKind::Btrfs => btrfs::walk(reader, partition, limits, &mut sink)?,
        other => {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "not indexed: {} (at byte {})",
                    other.not_read_reason().unwrap_or("LVM physical volume"),
                    partition.offset
                ),
            ));
        }
    }
    Ok(sink.report)
}

/// Finds one entry by its full path (`/` separated, leading `/` optional).
///
/// On ext, FAT and XFS only the directories along the path are read; on NTFS it costs up to one
/// walk (the MFT is scanned).
pub fn lookup(
    reader: &dyn ReadAt,
    partition: &Partition,
    limits: &Limits,
    path: &str,
) -> Result<FileEntry> {
    let want = format!("/{}", path.trim_matches('/'));
    let mut found = None;
    let mut visitor = |e: FileEntry| {
        if e.path == want {
            found = Some(e);
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    walk_to(reader, partition, limits, &mut visitor, Some(want.clone()))?;
    found.ok_or_else(|| Error::new(ErrorKind::NotFound, want))
}

/// Writes the content of `entry` (a regular file) to `out`, holes as zeros; returns the
/// bytes written (`entry.size`).
pub fn copy_file(reader: &dyn ReadAt, entry: &FileEntry, out: &mut dyn Write) -> Result<u64> {
    let werr = |e| Error::io(format!("writing {}", entry.path), e);
    if let Some(d) = &entry.inline_data {
        out.write_all(d).map_err(werr)?;
        return Ok(d.len() as u64);
    }
    const CHUNK_LEN: usize = 1 << 20;
    const CHUNK: u64 = CHUNK_LEN as u64;
    let zeros = vec![0u8; CHUNK_LEN];
    let mut buf = vec![0u8; CHUNK_LEN];
    let mut pos = 0u64;
    let fill = |out: &mut dyn Write, mut n: u64| -> Result<()> {
        while n > 0 {
            let k = n.min(CHUNK);
            out.write_all(&zeros[..k as usize]).map_err(werr)?;
            n -= k;
        }
        Ok(())
    };
    for run in compressed::runs(entry) {
        let (file_offset, length) = run.file_range();
        let end = file_offset.checked_add(length);
        if file_offset < pos || end.is_none_or(|e| e > entry.size) {
            return Err(Error::corrupt(format!(
                "{}: extent at file offset {file_offset} ({length} bytes) out of order or past the size",
                entry.path
            )));
        }
        fill(out, file_offset - pos)?;
        match run {
            compressed::Run::Plain(x) => {
                let mut done = 0;
                while done < x.length {
                    let k = (x.length - done).min(CHUNK) as usize;
                    util::read_exact(reader, &mut buf[..k], x.disk_offset + done, &|| {
                        format!("data of {}", entry.path)
                    })?;
                    out.write_all(&buf[..k]).map_err(werr)?;
                    done += k as u64;
                }
            }
            compressed::Run::Compressed(x) => {
                let data = compressed::read_extent(reader, x, &entry.path)?;
                out.write_all(&data).map_err(werr)?;
            }
        }
        pos = file_offset + length;
    }
    fill(out, entry.size - pos)?;
    Ok(entry.size)
}

/// The content of `entry` in memory; refuses files over `limits.max_alloc`.
pub fn read_file(reader: &dyn ReadAt, entry: &FileEntry, limits: &Limits) -> Result<Vec<u8>> {
    let size = match &entry.inline_data {
        Some(d) => d.len() as u64,
        None => entry.size,
    };
    let mut v = util::alloc(size, limits, "read_file")?;
    v.clear();
    copy_file(reader, entry, &mut v)?;
    Ok(v)
}
