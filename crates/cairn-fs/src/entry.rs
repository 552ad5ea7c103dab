//! What a walk produces: layouts, file entries, limits and reports.

use serde::{Deserialize, Serialize};

use crate::Error;

/// Kind of partition table found on a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableKind {
    Gpt,
    Mbr,
    /// No partition table: the file system (if any) starts at byte 0.
    None,
}

/// File system found in a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Fat12,
    Fat16,
    Fat32,
    Ntfs,
    Xfs,
    /// btrfs on a single device.
    Btrfs,
    /// An LVM2 physical volume: its logical volumes are volumes of their own.
    LvmPv,
    /// Detected, never read: the reason is [`FsKind::not_read_reason`].
    Luks,
    BitLocker,
    Swap,
    Zfs,
    MdRaid,
    /// The first 64 KiB are zeros.
    Blank,
    /// Nothing this crate can read or recognise.
    Unknown,
}

impl FsKind {
    /// Why a volume of this kind is not listed (`None` for the file systems this crate reads
    /// and for LVM physical volumes, which are read through their logical volumes).
    pub fn not_read_reason(self) -> Option<&'static str> {
        Some(match self {
            Self::Luks => "LUKS encrypted volume (no key)",
            Self::BitLocker => "BitLocker encrypted volume (no key)",
            Self::Swap => "swap space",
            Self::Zfs => "ZFS pool member (ZFS is not read)",
            Self::MdRaid => "md-raid member (arrays are not assembled)",
            Self::Blank => "blank (no data in its first 64 KiB)",
            Self::Unknown => "unknown contents (no file system this reader knows)",
            _ => return None,
        })
    }
}

/// One piece of a logical volume: `length` bytes from `lv_offset`, spread over `stripes`
/// (disk byte offsets where each stripe's area starts) in chunks of `stripe_size` bytes; a
/// linear piece has one stripe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvSegment {
    pub lv_offset: u64,
    pub length: u64,
    pub stripe_size: u64,
    pub stripes: Vec<u64>,
}

/// The partition type as the table states it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionType {
    /// MBR system id, e.g. `0x83` (Linux), `0x07` (NTFS/exFAT), `0x0c` (FAT32 LBA).
    Mbr(u8),
    /// GPT partition type GUID in its canonical text form (lower case).
    Gpt(String),
    /// The whole disk (no table).
    WholeDisk,
    /// An LVM2 logical volume, assembled from physical volumes on this disk; `segments` map
    /// its bytes to the disk (empty when it cannot be read, see [`Partition::note`]).
    LogicalVolume {
        vg: String,
        lv: String,
        segments: Vec<LvSegment>,
    },
}

/// One partition (or the whole disk when there is no table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// 1-based number as Linux names it (`sda1`..; MBR logical partitions start at 5); 0 for
    /// the whole disk.
    pub index: u32,
    pub part_type: PartitionType,
    /// GPT unique partition GUID.
    pub guid: Option<String>,
    /// GPT partition name (empty for MBR).
    pub name: String,
    /// Byte offset of the partition in the disk image.
    pub offset: u64,
    /// Length in bytes (clamped to the image size).
    pub length: u64,
    /// An MBR logical partition inside an extended one.
    pub logical: bool,
    /// MBR active (boot) flag.
    pub bootable: bool,
    pub fs: FsKind,
    /// Why this volume cannot be listed although its kind could be (a thin or snapshot
    /// logical volume, one on a physical volume missing from this disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Partition {
    /// Whether [`crate::walk`] can list it.
    pub fn readable(&self) -> bool {
        self.note.is_none() && self.fs.not_read_reason().is_none() && self.fs != FsKind::LvmPv
    }

    /// Why it is not listed, for the catalog's "not indexed: …"; `None` when it is readable
    /// and for an LVM physical volume whose logical volumes were all found on this disk.
    pub fn not_indexed_reason(&self) -> Option<String> {
        self.note
            .clone()
            .or_else(|| self.fs.not_read_reason().map(str::to_string))
    }
}

/// Partition table and partitions of a disk image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    pub table: TableKind,
    /// Image size in bytes.
    pub size: u64,
    /// GPT disk GUID.
    pub disk_guid: Option<String>,
    /// MBR disk signature.
    pub mbr_signature: Option<u32>,
    pub partitions: Vec<Partition>,
    /// Problems that did not stop the scan (e.g. a bad backup GPT header, a broken EBR chain).
    pub warnings: Vec<String>,
}

pub use cairn_types::{FileExtent, FileKind};

/// One file, directory or link as found in a file system.
///
/// Timestamps are nanoseconds since the Unix epoch (UTC; FAT stores local time, which is
/// taken as UTC). Fields a file system does not store are `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Full path from the file system root, `/`-separated, starting with `/` (the root
    /// itself is `/`). Names that are not valid UTF-8 (ext) are converted lossily.
    pub path: String,
    pub kind: FileKind,
    /// Logical size in bytes (for symlinks: length of the target).
    pub size: u64,
    /// Unix mode including the file type bits (ext only).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Inode number (ext), MFT record number (NTFS), first cluster (FAT).
    pub inode: u64,
    /// Hard-link count (ext, NTFS).
    pub nlink: Option<u32>,
    pub mtime: Option<i64>,
    pub atime: Option<i64>,
    /// Inode / MFT record change time.
    pub ctime: Option<i64>,
    /// Creation time.
    pub crtime: Option<i64>,
    /// FAT attribute byte (read-only 0x01, hidden 0x02, system 0x04, dir 0x10, archive 0x20).
    pub fat_attributes: Option<u8>,
    /// NTFS file attributes from `$STANDARD_INFORMATION`.
    pub ntfs_attributes: Option<u32>,
    /// NTFS security id (index into `$Secure`).
    pub ntfs_security_id: Option<u32>,
    pub symlink_target: Option<String>,
    /// Where the data is, in file order; empty for directories, empty files and inline data.
    pub extents: Vec<FileExtent>,
    /// The whole content when it lives in metadata (ext4 inline data, NTFS resident data).
    pub inline_data: Option<Vec<u8>>,
    /// Some extents point into the ext journal: the block was replayed from a committed
    /// transaction (data=journal mode), so the current content lives there, not at the
    /// block's home location.
    pub data_from_journal: bool,
    /// Compressed data (btrfs), merged with `extents` in file order by `copy_file`; empty on
    /// other file systems. See [`CompressedExtent`](crate::CompressedExtent).
    #[serde(default)]
    pub compressed: Vec<crate::CompressedExtent>,
    /// btrfs: id of the subvolume (tree) the entry belongs to (5 for the top level). Inode
    /// numbers are unique only within one subvolume; a subvolume's or snapshot's own root
    /// directory is the entry with inode 256.
    #[serde(default)]
    pub subvolume: Option<u64>,
}

impl FileEntry {
    /// An entry with only its path, kind and inode; every other field empty.
    pub fn new(path: String, kind: FileKind, inode: u64) -> Self {
        Self {
            path,
            kind,
            size: 0,
            mode: None,
            uid: None,
            gid: None,
            inode,
            nlink: None,
            mtime: None,
            atime: None,
            ctime: None,
            crtime: None,
            fat_attributes: None,
            ntfs_attributes: None,
            ntfs_security_id: None,
            symlink_target: None,
            extents: Vec::new(),
            inline_data: None,
            data_from_journal: false,
            compressed: Vec::new(),
            subvolume: None,
        }
    }
}

/// Hard bounds on what a walk reads and allocates; a hostile image hits one of these and
/// yields an error or a partial listing instead of exhausting memory or time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Entries reported by one walk.
    pub max_entries: u64,
    /// Directory nesting below the root.
    pub max_depth: u32,
    /// Bytes of a full path.
    pub max_path_len: usize,
    /// Bytes of one directory's data (ext directory blocks, FAT cluster chain, NTFS index).
    pub max_dir_bytes: u64,
    /// Extents (runs) of one file; more is an error for that file.
    pub max_extents_per_file: usize,
    /// Depth of an ext4 extent tree (the format allows 5).
    pub max_extent_depth: u32,
    /// Committed jbd2 transactions replayed.
    pub max_journal_transactions: u64,
    /// Journal blocks scanned while looking for transactions.
    pub max_journal_blocks: u64,
    /// Largest single allocation (a FAT table, an attribute list, `read_file`); also the size of
    /// the ext inode-table cache.
    pub max_alloc: usize,
    /// Partitions read from one table (GPT entries, EBR chain).
    pub max_partitions: u32,
    /// Errors kept in a [`WalkReport`]; more are only counted.
    pub max_errors: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 50_000_000,
            max_depth: 512,
            max_path_len: 32 * 1024,
            max_dir_bytes: 512 << 20,
            max_extents_per_file: 4 << 20,
            max_extent_depth: 5,
            max_journal_transactions: 1 << 20,
            max_journal_blocks: 1 << 24,
            max_alloc: 256 << 20,
            max_partitions: 256,
            max_errors: 1000,
        }
    }
}

/// A problem met during a walk that made the listing partial.
#[derive(Debug)]
pub struct WalkError {
    /// Path of the entry or directory concerned (empty when not tied to one).
    pub path: String,
    pub error: Error,
}

/// What a walk did.
#[derive(Debug, Default)]
pub struct WalkReport {
    /// Entries handed to the visitor.
    pub entries: u64,
    /// The visitor asked to stop.
    pub stopped: bool,
    /// Errors met (at most `Limits::max_errors`); each one lost part of the listing.
    pub errors: Vec<WalkError>,
    /// Errors beyond `errors`.
    pub errors_dropped: u64,
    /// ext only: committed journal transactions overlaid before reading.
    pub journal_transactions: u64,
    /// ext only: distinct blocks taken from the journal.
    pub journal_blocks: u64,
    /// XFS only: whether the metadata log was clean (it is never replayed).
    pub xfs_log: Option<XfsLog>,
    /// btrfs only: the default subvolume (what a mount without options shows; paths are
    /// always from the top level, id 5).
    pub btrfs_default_subvolume: Option<u64>,
}

/// State of an XFS metadata log when the volume was read. A dirty log is not replayed: the
/// listing is the volume as of its last checkpoint (changes only in the log are missing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum XfsLog {
    /// The log ends with an unmount record (or was never written): nothing is pending.
    Clean,
    /// The log holds changes after the last unmount record.
    Dirty,
    /// The log is on another device and was not checked.
    External,
    /// The log could not be read or understood (why).
    Unknown(String),
}

impl XfsLog {
    /// A one-line note for humans.
    pub fn note(&self) -> String {
        match self {
            Self::Clean => "XFS log is clean".into(),
            Self::Dirty => "XFS log is dirty: read as of the last checkpoint, not replayed".into(),
            Self::External => "XFS log is on an external device: not checked".into(),
            Self::Unknown(why) => format!("XFS log state unknown ({why}): not replayed"),
        }
    }
}

impl WalkReport {
    /// Every entry was listed: no error and the visitor did not stop early.
    pub fn is_complete(&self) -> bool {
        !self.stopped && self.errors.is_empty() && self.errors_dropped == 0
    }

    pub(crate) fn error(&mut self, limits: &Limits, path: &str, error: Error) {
        if self.errors.len() < limits.max_errors {
            self.errors.push(WalkError {
                path: path.to_string(),
                error,
            });
        } else {
            self.errors_dropped += 1;
        }
    }
}
