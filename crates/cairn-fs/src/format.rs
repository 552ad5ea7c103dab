//! Every on-disk magic number and fixed offset this crate relies on, in one place.
//!
//! Sources: the UEFI specification (GPT), the MBR/EBR conventions, the kernel's
//! `Documentation/filesystems/ext4/` and `include/linux/jbd2.h` descriptions, Microsoft's FAT
//! specification and the public NTFS documentation (linux-ntfs). Integers are little-endian
//! unless a name says `BE` (jbd2 is big-endian).

// ---- partition tables ----
/// `0x55 0xAA` at byte 510 of an MBR, EBR or FAT/NTFS boot sector.
pub const BOOT_SIGNATURE: [u8; 2] = [0x55, 0xAA];
pub const MBR_TABLE_OFFSET: usize = 446;
pub const MBR_ENTRY_LEN: usize = 16;
pub const MBR_TYPE_GPT_PROTECTIVE: u8 = 0xEE;
/// CHS extended, LBA extended, Linux extended.
pub const MBR_TYPES_EXTENDED: [u8; 3] = [0x05, 0x0F, 0x85];
pub const GPT_SIGNATURE: [u8; 8] = *b"EFI PART";
pub const GPT_HEADER_MIN_LEN: u32 = 92;
pub const GPT_ENTRY_MIN_LEN: u32 = 128;

// ---- ext2/3/4 ----
pub const EXT_SUPERBLOCK_OFFSET: u64 = 1024;
pub const EXT_SUPERBLOCK_LEN: usize = 1024;
pub const EXT_MAGIC: u16 = 0xEF53;
pub const EXT_ROOT_INO: u32 = 2;
pub const EXT_COMPAT_HAS_JOURNAL: u32 = 0x4;
pub const EXT_INCOMPAT_COMPRESSION: u32 = 0x1;
pub const EXT_INCOMPAT_FILETYPE: u32 = 0x2;
pub const EXT_INCOMPAT_RECOVER: u32 = 0x4;
pub const EXT_INCOMPAT_JOURNAL_DEV: u32 = 0x8;
pub const EXT_INCOMPAT_META_BG: u32 = 0x10;
pub const EXT_INCOMPAT_EXTENTS: u32 = 0x40;
pub const EXT_INCOMPAT_64BIT: u32 = 0x80;
pub const EXT_INCOMPAT_FLEX_BG: u32 = 0x200;
pub const EXT_INCOMPAT_INLINE_DATA: u32 = 0x8000;
pub const EXT_RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
pub const EXT_RO_COMPAT_HUGE_FILE: u32 = 0x8;
pub const EXT_RO_COMPAT_GDT_CSUM: u32 = 0x10;
pub const EXT_RO_COMPAT_BIGALLOC: u32 = 0x200;
pub const EXT_RO_COMPAT_METADATA_CSUM: u32 = 0x400;
pub const EXT_INODE_FLAG_ENCRYPT: u32 = 0x800;
pub const EXT_INODE_FLAG_HUGE_FILE: u32 = 0x4_0000;
pub const EXT_INODE_FLAG_EXTENTS: u32 = 0x8_0000;
pub const EXT_INODE_FLAG_INLINE_DATA: u32 = 0x1000_0000;
pub const EXT_EXTENT_MAGIC: u16 = 0xF30A;
/// `ee_len` above this marks an unwritten (preallocated, reads as zeros) extent.
pub const EXT_EXTENT_INIT_MAX_LEN: u16 = 32768;
/// Size of `i_block` (direct/indirect block map, extent root, fast symlink, inline data).
pub const EXT_I_BLOCK_LEN: usize = 60;
/// In-inode extended attribute header magic.
pub const EXT_XATTR_MAGIC: u32 = 0xEA02_0000;
/// `system.` attribute name index (inline data lives in `system.data`).
pub const EXT_XATTR_INDEX_SYSTEM: u8 = 7;

// ---- jbd2 (big-endian) ----
pub const JBD2_MAGIC_BE: u32 = 0xC03B_3998;
pub const JBD2_DESCRIPTOR_BLOCK: u32 = 1;
pub const JBD2_COMMIT_BLOCK: u32 = 2;
pub const JBD2_SUPERBLOCK_V1: u32 = 3;
pub const JBD2_SUPERBLOCK_V2: u32 = 4;
pub const JBD2_REVOKE_BLOCK: u32 = 5;
pub const JBD2_INCOMPAT_64BIT: u32 = 0x2;
pub const JBD2_INCOMPAT_CSUM_V2: u32 = 0x8;
pub const JBD2_INCOMPAT_CSUM_V3: u32 = 0x10;
pub const JBD2_INCOMPAT_FAST_COMMIT: u32 = 0x20;
pub const JBD2_FLAG_ESCAPE: u32 = 0x1;
pub const JBD2_FLAG_SAME_UUID: u32 = 0x2;
pub const JBD2_FLAG_LAST_TAG: u32 = 0x8;
/// Fast-commit blocks when the superblock says 0.
pub const JBD2_DEFAULT_FC_BLOCKS: u32 = 256;
/// Descriptor and revoke blocks end in a 4-byte checksum tail with csum v2/v3.
pub const JBD2_TAIL_LEN: usize = 4;

// ---- FAT ----
pub const FAT_DIRENT_LEN: usize = 32;
pub const FAT_ATTR_READ_ONLY: u8 = 0x01;
pub const FAT_ATTR_VOLUME_ID: u8 = 0x08;
pub const FAT_ATTR_DIRECTORY: u8 = 0x10;
pub const FAT_ATTR_LFN: u8 = 0x0F;
pub const FAT_DELETED: u8 = 0xE5;
/// Cluster counts below these make a volume FAT12 / FAT16 (Microsoft's rule).
pub const FAT12_MAX_CLUSTERS: u32 = 4085;
pub const FAT16_MAX_CLUSTERS: u32 = 65525;

// ---- NTFS ----
pub const NTFS_OEM_ID: [u8; 8] = *b"NTFS    ";
pub const NTFS_FILE_MAGIC: [u8; 4] = *b"FILE";
pub const NTFS_ROOT_RECORD: u64 = 5;
/// `$Extend`, parent of `$Quota`, `$ObjId`, `$Reparse`, ...: hidden from listings.
pub const NTFS_EXTEND_RECORD: u64 = 11;
/// Records below this are NTFS metadata files (only the root is listed).
pub const NTFS_FIRST_USER_RECORD: u64 = 16;
pub const NTFS_ATTR_STANDARD_INFORMATION: u32 = 0x10;
pub const NTFS_ATTR_ATTRIBUTE_LIST: u32 = 0x20;
pub const NTFS_ATTR_FILE_NAME: u32 = 0x30;
pub const NTFS_ATTR_DATA: u32 = 0x80;
pub const NTFS_ATTR_REPARSE_POINT: u32 = 0xC0;
pub const NTFS_ATTR_END: u32 = 0xFFFF_FFFF;
pub const NTFS_RECORD_IN_USE: u16 = 0x1;
pub const NTFS_RECORD_IS_DIR: u16 = 0x2;
pub const NTFS_ATTR_FLAG_COMPRESSED: u16 = 0x1;
pub const NTFS_ATTR_FLAG_ENCRYPTED: u16 = 0x4000;
pub const NTFS_NAMESPACE_DOS: u8 = 2;
pub const NTFS_REPARSE_TAG_SYMLINK: u32 = 0xA000_000C;
pub const NTFS_REPARSE_TAG_MOUNT_POINT: u32 = 0xA000_0003;
/// Seconds between 1601-01-01 and 1970-01-01 (NTFS times count 100 ns from 1601).
pub const NTFS_EPOCH_DELTA_SECS: i64 = 11_644_473_600;

// ---- LVM2 (physical-volume label, metadata area header) ----
/// The label sits in one of the first four 512-byte sectors of a physical volume.
pub const LVM_LABEL_SECTORS: u64 = 4;
pub const LVM_SECTOR: u64 = 512;
pub const LVM_LABEL_ID: [u8; 8] = *b"LABELONE";
pub const LVM_LABEL_TYPE: [u8; 8] = *b"LVM2 001";
/// The label header's CRC covers the sector from this offset (after the CRC field).
pub const LVM_LABEL_CRC_FROM: usize = 20;
/// Seed of LVM2's CRC-32 (reflected, no final inversion).
pub const LVM_CRC_INIT: u32 = 0xf597_a6cf;
/// Length of a PV uuid on disk (no dashes).
pub const LVM_ID_LEN: usize = 32;
pub const LVM_MDA_MAGIC: [u8; 16] = *b" LVM2 x[5A%r0N*>";
pub const LVM_MDA_HEADER_LEN: u64 = 512;
pub const LVM_MDA_VERSION: u32 = 1;
/// `raw_locn.flags`: this copy of the metadata is to be ignored.
pub const LVM_RAW_LOCN_IGNORED: u32 = 0x1;
/// Largest text metadata read (LVM's own default area is 1 MiB).
pub const LVM_MAX_METADATA: u64 = 16 << 20;
/// Deepest section nesting and most values accepted in text metadata.
pub const LVM_MAX_TEXT_DEPTH: usize = 16;
pub const LVM_MAX_TEXT_ITEMS: usize = 1 << 20;

// ---- contents that are detected but not read ----
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// OEM id at byte 3 of a BitLocker volume's boot sector.
pub const BITLOCKER_OEM: [u8; 8] = *b"-FVE-FS-";
/// Swap signatures end the first 4 KiB page.
pub const SWAP_MAGICS: [&[u8; 10]; 2] = [b"SWAPSPACE2", b"SWAP-SPACE"];
pub const SWAP_MAGIC_OFFSET: u64 = 4096 - 10;
/// md-raid superblock magic (little-endian) at 4 KiB (v1.2) or 0 (v1.1), near the end (v1.0,
/// 0.90).
pub const MD_MAGIC: u32 = 0xa92b_4efc;
pub const MD_V12_OFFSET: u64 = 4096;
/// ZFS: the first uberblock of vdev label 0 at 128 KiB, magic in either byte order.
pub const ZFS_UBERBLOCK_OFFSET: u64 = 128 << 10;
pub const ZFS_UBERBLOCK_MAGIC: u64 = 0x00ba_b10c;
/// A volume whose first bytes are all zero holds nothing (checked over this many bytes).
pub const BLANK_PROBE_LEN: usize = 64 << 10;

const _: () = assert!(MBR_TABLE_OFFSET + 4 * MBR_ENTRY_LEN + 2 == 512);
const _: () = assert!(EXT_I_BLOCK_LEN == 15 * 4);

// ---- XFS (big-endian; CRC fields are CRC-32C stored little-endian) ----
// Source: "XFS Algorithms & Data Structures" (the public on-disk format book).
/// `XFSB` at byte 0 of the primary superblock (AG 0).
pub const XFS_SB_MAGIC: u32 = 0x5846_5342;
/// Bytes of the superblock the reader parses (v5 fields end at 264).
pub const XFS_SB_LEN: usize = 512;
pub const XFS_SB_CRC_OFFSET: usize = 224;
/// Low four bits of `sb_versionnum`.
pub const XFS_SB_VERSION_NUMBITS: u16 = 0x000F;
pub const XFS_SB_VERSION_4: u16 = 4;
pub const XFS_SB_VERSION_5: u16 = 5;
pub const XFS_SB_VERSION_MOREBITS: u16 = 0x8000;
/// `sb_features2` (v4): directory entries carry a file type byte.
pub const XFS_SB_FEATURES2_FTYPE: u32 = 0x200;
pub const XFS_SB_FEATURES2_CRC: u32 = 0x100;
pub const XFS_SB_INCOMPAT_FTYPE: u32 = 0x1;
pub const XFS_SB_INCOMPAT_SPINODES: u32 = 0x2;
pub const XFS_SB_INCOMPAT_META_UUID: u32 = 0x4;
pub const XFS_SB_INCOMPAT_BIGTIME: u32 = 0x8;
pub const XFS_SB_INCOMPAT_NEEDSREPAIR: u32 = 0x10;
pub const XFS_SB_INCOMPAT_NREXT64: u32 = 0x20;
/// Incompatible features this reader understands; any other bit is `Unsupported`.
pub const XFS_SB_INCOMPAT_KNOWN: u32 = XFS_SB_INCOMPAT_FTYPE
    | XFS_SB_INCOMPAT_SPINODES
    | XFS_SB_INCOMPAT_META_UUID
    | XFS_SB_INCOMPAT_BIGTIME
    | XFS_SB_INCOMPAT_NEEDSREPAIR
    | XFS_SB_INCOMPAT_NREXT64;
/// `IN` at byte 0 of every on-disk inode.
pub const XFS_DINODE_MAGIC: u16 = 0x494E;
/// Inode core sizes: v1/v2 inodes, v3 (CRC) inodes; the data fork follows.
pub const XFS_DINODE_CORE_V2_LEN: usize = 100;
pub const XFS_DINODE_CORE_V3_LEN: usize = 176;
pub const XFS_DINODE_CRC_OFFSET: usize = 100;
pub const XFS_DINODE_FMT_DEV: u8 = 0;
pub const XFS_DINODE_FMT_LOCAL: u8 = 1;
pub const XFS_DINODE_FMT_EXTENTS: u8 = 2;
pub const XFS_DINODE_FMT_BTREE: u8 = 3;
/// `di_flags`: the data lives on the realtime device.
pub const XFS_DIFLAG_REALTIME: u16 = 0x1;
/// `di_flags2`: timestamps are 64-bit nanoseconds from 1901-12-13 (bigtime).
pub const XFS_DIFLAG2_BIGTIME: u64 = 0x8;
/// `di_flags2`: extent counters are 64-bit (`di_big_nextents` at byte 24).
pub const XFS_DIFLAG2_NREXT64: u64 = 0x10;
/// Seconds added to a bigtime timestamp's epoch to reach the Unix epoch (−2^31 s).
pub const XFS_BIGTIME_EPOCH_OFFSET: i64 = 1 << 31;
/// B+tree extent map blocks: v4 `BMAP`, v5 `BMA3`.
pub const XFS_BMAP_MAGIC: u32 = 0x424D_4150;
pub const XFS_BMAP_CRC_MAGIC: u32 = 0x424D_4133;
/// Long-format btree block header: v4 24 bytes, v5 72 bytes (CRC at 64).
pub const XFS_BTREE_LBLOCK_LEN: usize = 24;
pub const XFS_BTREE_LBLOCK_CRC_LEN: usize = 72;
pub const XFS_BTREE_LBLOCK_CRC_OFFSET: usize = 64;
/// An extent record (`xfs_bmbt_rec`): 128 bits, flag | startoff:54 | startblock:52 | count:21.
pub const XFS_BMBT_REC_LEN: usize = 16;
/// In-inode bmbt root header (`bb_level`, `bb_numrecs`).
pub const XFS_BMDR_HDR_LEN: usize = 4;
/// Directory data blocks: v4 `XD2B` (single block) / `XD2D`; v5 `XDB3` / `XDD3`.
pub const XFS_DIR2_BLOCK_MAGIC: u32 = 0x5844_3242;
pub const XFS_DIR2_DATA_MAGIC: u32 = 0x5844_3244;
pub const XFS_DIR3_BLOCK_MAGIC: u32 = 0x5844_4233;
pub const XFS_DIR3_DATA_MAGIC: u32 = 0x5844_4433;
/// Data block header length (magic + 3 best-free entries; v5 adds CRC, blkno, lsn, uuid, owner, pad).
pub const XFS_DIR2_DATA_HDR_LEN: usize = 16;
pub const XFS_DIR3_DATA_HDR_LEN: usize = 64;
pub const XFS_DIR3_CRC_OFFSET: usize = 4;
/// `freetag` of an unused region inside a directory data block.
pub const XFS_DIR2_DATA_FREE_TAG: u16 = 0xFFFF;
/// Byte offset of the first leaf block in a directory's address space (32 GiB): data blocks
/// lie below it.
pub const XFS_DIR2_LEAF_OFFSET: u64 = 32 << 30;
/// Single-block directory tail: `count`, `stale` (u32 each), after `count` 8-byte leaf entries.
pub const XFS_DIR2_BLOCK_TAIL_LEN: usize = 8;
pub const XFS_DIR2_LEAF_ENTRY_LEN: usize = 8;
/// Remote symlink block header (v5 `XSLM`): magic, offset, bytes, crc, uuid, owner, blkno, lsn.
pub const XFS_SYMLINK_MAGIC: u32 = 0x5853_4C4D;
pub const XFS_SYMLINK_HDR_LEN: usize = 56;
pub const XFS_SYMLINK_CRC_OFFSET: usize = 12;
pub const XFS_SYMLINK_MAXLEN: u64 = 1024;
/// Log: 512-byte basic blocks; each record starts with a header holding this magic.
pub const XFS_LOG_BBSIZE: u64 = 512;
pub const XFS_LOG_HEADER_MAGIC: u32 = 0xFEED_BABE;
/// Each log header block covers this many bytes of record data (v2 logs).
pub const XFS_LOG_HEADER_CYCLE_SIZE: u32 = 32 * 1024;
/// Log operation header (`tid`, `len`, `clientid`, `flags`, pad) and its unmount flag.
pub const XFS_LOG_OP_HDR_LEN: usize = 12;
pub const XFS_LOG_OP_FLAG_OFFSET: usize = 9;
pub const XFS_LOG_UNMOUNT_TRANS: u8 = 0x20;
/// Record header fields used: cycle 4, version 8, len 12, crc 32, num_logops 40, size 320.
pub const XFS_LOG_REC_CRC_OFFSET: usize = 32;
/// Bytes of a record header, and of each extra header block (cycle + 64 saved words), that
/// the record checksum covers.
pub const XFS_LOG_REC_HDR_LEN: usize = 328;
pub const XFS_LOG_REC_HDR_LEN_I386: usize = 324;
pub const XFS_LOG_EXT_HDR_LEN: usize = 260;

// ---- btrfs (single device; the btrfs documentation's "On-disk format") ----
/// The primary superblock's byte offset in the partition (copies at 64 MiB and 256 GiB are
/// not read).
pub const BTRFS_SUPERBLOCK_OFFSET: u64 = 64 << 10;
pub const BTRFS_SUPERBLOCK_LEN: usize = 4096;
/// `_BHRfS_M` at byte 0x40 of the superblock.
pub const BTRFS_MAGIC: [u8; 8] = *b"_BHRfS_M";
pub const BTRFS_MAGIC_OFFSET: usize = 0x40;
/// Checksums cover everything after the 32-byte checksum field (superblock and tree nodes).
pub const BTRFS_CSUM_LEN: usize = 32;
pub const BTRFS_CSUM_CRC32C: u16 = 0;
pub const BTRFS_CSUM_XXHASH64: u16 = 1;
pub const BTRFS_CSUM_SHA256: u16 = 2;
pub const BTRFS_CSUM_BLAKE2B: u16 = 3;
/// Offset and capacity of the superblock's bootstrap chunk array.
pub const BTRFS_SYS_CHUNK_ARRAY_OFFSET: usize = 0x32B;
pub const BTRFS_SYS_CHUNK_ARRAY_MAX: usize = 2048;
/// Offset of the superblock's own device item (98 bytes; devid first).
pub const BTRFS_SB_DEV_ITEM_OFFSET: usize = 0xC9;
/// Tree node header; a leaf's item headers and a node's key pointers follow it.
pub const BTRFS_HEADER_LEN: usize = 101;
pub const BTRFS_KEY_LEN: usize = 17;
/// Leaf item header: key, data offset (from the end of the header), data size.
pub const BTRFS_ITEM_LEN: usize = 25;
/// Internal node pointer: key, child block (logical), generation.
pub const BTRFS_KEY_PTR_LEN: usize = 33;
/// Levels 0..=7: a tree is at most 8 nodes deep.
pub const BTRFS_MAX_LEVEL: u8 = 7;
pub const BTRFS_NODESIZE_MIN: u32 = 4096;
pub const BTRFS_NODESIZE_MAX: u32 = 64 << 10;
pub const BTRFS_SECTORSIZE_MAX: u32 = 64 << 10;
// Tree ids (object ids in the root tree).
pub const BTRFS_ROOT_TREE_DIR_OBJECTID: u64 = 6;
pub const BTRFS_FS_TREE_OBJECTID: u64 = 5;
/// First id of a subvolume or snapshot tree, and the inode of every subvolume's root directory.
pub const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;
/// Largest subvolume id (`-256` as u64).
pub const BTRFS_LAST_FREE_OBJECTID: u64 = u64::MAX - 255;
/// Object id of every chunk item in the chunk tree.
pub const BTRFS_FIRST_CHUNK_TREE_OBJECTID: u64 = 256;
// Item (key) types.
pub const BTRFS_INODE_ITEM_KEY: u8 = 1;
pub const BTRFS_DIR_ITEM_KEY: u8 = 84;
pub const BTRFS_DIR_INDEX_KEY: u8 = 96;
pub const BTRFS_EXTENT_DATA_KEY: u8 = 108;
pub const BTRFS_ROOT_ITEM_KEY: u8 = 132;
pub const BTRFS_ROOT_BACKREF_KEY: u8 = 144;
pub const BTRFS_CHUNK_ITEM_KEY: u8 = 228;
/// Fixed sizes of on-disk items.
pub const BTRFS_INODE_ITEM_LEN: usize = 160;
pub const BTRFS_ROOT_ITEM_MIN_LEN: usize = 239;
pub const BTRFS_DIR_ITEM_HEADER_LEN: usize = 30;
pub const BTRFS_CHUNK_ITEM_HEADER_LEN: usize = 48;
pub const BTRFS_STRIPE_LEN: usize = 32;
/// `ROOT_BACKREF` payload: parent directory, index, name length, then the name.
pub const BTRFS_ROOT_REF_HEADER_LEN: usize = 18;
/// Extent data: 21-byte header (inline data follows it), 53 bytes for regular/prealloc.
pub const BTRFS_FILE_EXTENT_INLINE_HEADER: usize = 21;
pub const BTRFS_FILE_EXTENT_REG_LEN: usize = 53;
pub const BTRFS_FILE_EXTENT_INLINE: u8 = 0;
pub const BTRFS_FILE_EXTENT_REG: u8 = 1;
pub const BTRFS_FILE_EXTENT_PREALLOC: u8 = 2;
pub const BTRFS_COMPRESS_NONE: u8 = 0;
pub const BTRFS_COMPRESS_ZLIB: u8 = 1;
pub const BTRFS_COMPRESS_LZO: u8 = 2;
pub const BTRFS_COMPRESS_ZSTD: u8 = 3;
/// Largest compressed extent (stored or decompressed) this reader accepts; btrfs itself
/// writes at most 128 KiB.
pub const BTRFS_MAX_COMPRESSED: u64 = 1 << 20;
/// LZO framing: each segment's LZO1X data decompresses to at most one sector, and a 4-byte
/// segment length never straddles a sector boundary.
pub const BTRFS_LZO_LEN_BYTES: usize = 4;
/// zstd window the decoder allows (btrfs compresses with at most 2^17).
pub const BTRFS_ZSTD_WINDOW_LOG_MAX: u32 = 20;
// Block-group (chunk) profile bits.
pub const BTRFS_BLOCK_GROUP_DUP: u64 = 1 << 5;
/// RAID0, RAID1, RAID10, RAID5, RAID6, RAID1C3, RAID1C4: stripes on several devices.
pub const BTRFS_BLOCK_GROUP_MULTI_DEVICE: u64 =
    (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10);
/// `incompat` bit: the node headers carry `metadata_uuid` instead of the fsid.
pub const BTRFS_INCOMPAT_METADATA_UUID: u64 = 1 << 10;

const _: () = assert!(MBR_TABLE_OFFSET + 4 * MBR_ENTRY_LEN + 2 == 512);
const _: () = assert!(EXT_I_BLOCK_LEN == 15 * 4);
const _: () = assert!(BTRFS_ITEM_LEN == BTRFS_KEY_LEN + 8);
const _: () = assert!(BTRFS_KEY_PTR_LEN == BTRFS_KEY_LEN + 16);
const _: () =
    assert!(BTRFS_SYS_CHUNK_ARRAY_OFFSET + BTRFS_SYS_CHUNK_ARRAY_MAX <= BTRFS_SUPERBLOCK_LEN);
