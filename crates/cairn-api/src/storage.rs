//! The storage agent's API: datastores and their disks, storage-unit snapshots, disk backups
//! (where to read, what changed, where to send), restores, raw LUN mappings and the file
//! catalog's scans and reads (`docs/STORAGE-AGENT.md` has the route table).
//!
//! The server calls these routes; the manager reads `GET /v1/datastores`. Every struct refuses
//! fields it does not know and every enum names an unknown variant in its error.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cairn_http::ApiError;
use cairn_types::{DiskFormat, ExtentList, SnapshotId};
use serde::{Deserialize, Serialize};

/// The file model of scans and reads is `cairn-fs`'s (the parser that produces it).
pub use cairn_fs::{DiskLayout, FileEntry, FileExtent, FileKind, Partition};

/// A file system or volume holding datastores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageUnit {
    /// `dev:MAJOR:MINOR` of the file system.
    pub id: String,
    pub device: u64,
    pub mount_point: PathBuf,
    /// From `/proc/self/mountinfo` (`xfs`, `btrfs`, `ext4`, ...).
    pub fs_type: String,
    /// `statfs().f_type`.
    pub fs_magic: u64,
    /// Whether the file system type can share extents (xfs, btrfs, ...); a
    /// reflink provider still probes before trusting it.
    pub reflink_capable: bool,
}

/// A datastore as reported to a manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreInfo {
    pub name: String,
    pub path: PathBuf,
    pub unit: StorageUnit,
    pub disks: Vec<DiskInfo>,
}

/// What kind of disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskKind {
    /// A disk image file.
    Image,
    /// A raw LUN (file in `luns/` or block device) used as a raw device mapping.
    Lun,
}

/// One disk of a datastore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskInfo {
    /// Path relative to the datastore (`vm1.qcow2`, `luns/lun0`): the virtual disk id.
    pub id: String,
    pub path: PathBuf,
    pub kind: DiskKind,
    pub format: DiskFormat,
    pub virtual_size: u64,
    pub actual_size: u64,
    pub backing_file: Option<String>,
    /// Persistent dirty bitmaps (qcow2).
    pub bitmaps: Vec<String>,
    /// [`StorageUnit::id`] of the unit holding the disk's data.
    pub unit: String,
}

/// How expensive a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotCost {
    /// Metadata only: milliseconds, no data copied.
    Metadata,
    /// Proportional to the allocated data.
    CopiesData,
}

/// What a provider can do, as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    pub provider: String,
    pub cost: SnapshotCost,
    /// All disks of one `snapshot` call share one instant.
    pub group_instant: bool,
    pub formats: Vec<DiskFormat>,
    /// Change sources usable between two snapshots of this provider.
    pub change_sources: Vec<ChangeSource>,
    /// Space: false when the snapshot shares the disk's blocks.
    pub uses_full_space: bool,
    /// Snapshots are per storage unit: one `snapshot` call may only name disks of one unit.
    pub per_unit: bool,
    /// A human hint, e.g. "slow: copies every allocated byte".
    pub note: String,
}

/// A frozen, readable image of one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSnapshot {
    /// The live disk this is a snapshot of.
    pub disk: PathBuf,
    /// The file to read (the clone, the frozen base, or the disk holding `internal`).
    pub image: PathBuf,
    pub format: DiskFormat,
    /// Internal qcow2 snapshot name, read with `qemu-nbd -l`.
    #[serde(default)]
    pub internal: Option<String>,
    pub size: u64,
}

/// One snapshot call: a group of disks at (about) one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSnapshot {
    /// Sortable: `UNIXMILLIS-RANDOM`.
    pub id: String,
    pub provider: String,
    pub tag: String,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// Storage unit id, when the snapshot is of one unit.
    pub unit: Option<String>,
    /// Directory holding clones or copies.
    pub dir: Option<PathBuf>,
    /// Microseconds between the first and the last disk's snapshot.
    pub window_us: u64,
    pub disks: Vec<DiskSnapshot>,
}

/// A retention plan: which snapshots to delete to keep `keep` per disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPlan {
    pub keep: usize,
    pub delete: Vec<String>,
    pub kept: Vec<String>,
}

/// Where a backup's list of changed extents came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeSource {
    /// No parent: everything was read.
    Full,
    /// `qemu-img map` of an overlay: its depth-0 extents.
    OverlayMap,
    /// FIEMAP diff of two reflink snapshots: extents no longer shared.
    ExtentMap,
    /// A persistent qcow2 dirty bitmap, read over NBD (`qemu-nbd -B`).
    PersistentBitmap,
    /// Extents handed over by the host agent (QEMU dirty bitmap / CBT).
    HypervisorBitmap,
    /// Last resort: read everything, chunk, and send only segments the parent lacks.
    RecipeCompare,
}

impl ChangeSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::OverlayMap => "overlay_map",
            Self::ExtentMap => "extent_map",
            Self::PersistentBitmap => "persistent_bitmap",
            Self::HypervisorBitmap => "hypervisor_bitmap",
            Self::RecipeCompare => "recipe_compare",
        }
    }
}

impl std::fmt::Display for ChangeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the caller knows about changes since the parent backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChangeHint {
    /// An overlay that received every guest write since the parent backup point and is
    /// frozen now (a newer overlay sits on top).
    Overlay { overlay: PathBuf },
    /// The reflink clone (raw, or qcow2: mapped through its L1/L2 tables) the parent backup
    /// was taken from, still on the same unit.
    ExtentMap { previous: PathBuf },
    /// A persistent bitmap of a qcow2 image, enabled since the parent backup point. The agent
    /// never clears it: after a successful backup the caller clears or rotates it — safely
    /// only while no VM writes the image, or through the host agent's QMP transaction
    /// otherwise. A bitmap left uncleared only over-reports.
    PersistentBitmap { image: PathBuf, bitmap: String },
    /// Extents from the host agent.
    Hypervisor { extents: ExtentList },
}

impl ChangeHint {
    pub fn source(&self) -> ChangeSource {
        match self {
            Self::Overlay { .. } => ChangeSource::OverlayMap,
            Self::ExtentMap { .. } => ChangeSource::ExtentMap,
            Self::PersistentBitmap { .. } => ChangeSource::PersistentBitmap,
            Self::Hypervisor { .. } => ChangeSource::HypervisorBitmap,
        }
    }
}

/// How many unchanged regions to verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossCheck {
    /// Parent segments (outside the changed extents) to read and compare; `usize::MAX` = all.
    pub samples: usize,
    /// Seed of the sample choice (fixed seeds make failures reproducible).
    pub seed: u64,
}

impl Default for CrossCheck {
    fn default() -> Self {
        Self {
            samples: 32,
            seed: 0x0063_6169_726e,
        }
    }
}

/// Disk-data byte counters of a storage agent since it started (`GET /v1/stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStats {
    pub disk_bytes_read: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub disk_bytes_written: u64,
}

/// One disk backup.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// Snapshot name in the vault (one name per disk).
    pub name: String,
    /// The previous backup of this disk (id, prefix or name).
    #[serde(default)]
    pub parent: Option<String>,
    /// Change hints, most preferred first. Unusable ones are skipped.
    #[serde(default)]
    pub hints: Vec<ChangeHint>,
    /// Verify unchanged regions before trusting a hint.
    #[serde(default)]
    pub cross_check: Option<CrossCheck>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Worker threads for chunking (0 = one per core).
    #[serde(default)]
    pub threads: usize,
}

/// How to restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreMode {
    /// Create a new disk (fails if the target exists).
    New,
    /// Rewrite only the differing regions of an existing disk.
    Over,
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreReport {
    pub snapshot: String,
    pub size: u64,
    /// Bytes of the target read for comparison (restore over a disk).
    pub bytes_compared: u64,
    /// Plaintext bytes fetched from the vault.
    pub bytes_fetched: u64,
    /// Bytes written to the target (zeros included when over a disk).
    pub bytes_written: u64,
    /// Segments written.
    pub regions_written: u64,
    /// Zero bytes left as holes (new disk).
    pub zero_bytes: u64,
    pub duration_ms: u64,
    /// Where the time went: vault fetches (summed over the fetch streams, which overlap each
    /// other and the writes), writes to the disk (summed likewise), and the end (tables,
    /// flush, sync, rename).
    #[serde(default)]
    pub fetch_ms: u64,
    #[serde(default)]
    pub write_ms: u64,
    #[serde(default)]
    pub finish_ms: u64,
}

/// One extent of a file's map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhysExtent {
    /// Offset in the file.
    pub logical: u64,
    /// Byte address on the device (for btrfs: in its logical address space).
    pub physical: u64,
    pub len: u64,
    pub flags: u32,
}

impl PhysExtent {
    pub fn end(&self) -> u64 {
        self.logical.saturating_add(self.len)
    }
}

/// What a LUN is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LunKind {
    File,
    BlockDevice,
}

/// Identifies a LUN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunId {
    pub kind: LunKind,
    pub path: PathBuf,
    /// `dev:MAJOR:MINOR` of the device holding the extents (the block device itself, or the
    /// file system holding the file).
    pub device: String,
    /// Inode of a LUN file.
    pub inode: Option<u64>,
    pub size: u64,
}

/// The RDM mapping file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdmMapping {
    pub version: u32,
    /// The virtual disk id (`luns/NAME` or a device path).
    pub disk_id: String,
    pub lun: LunId,
    /// Where the LUN's bytes lie on `lun.device`.
    pub extents: Vec<PhysExtent>,
    /// Set on restored LUNs: the backup and the LUN it came from.
    #[serde(default)]
    pub restored_from: Option<RestoredFrom>,
}

/// Provenance of a restored LUN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoredFrom {
    pub snapshot: String,
    pub lun: LunId,
}

/// An RDM restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdmRestore {
    pub report: RestoreReport,
    /// The mapping of the LUN as backed up.
    pub original: RdmMapping,
    /// The mapping of the new LUN (also written to its mapping file).
    pub mapping: RdmMapping,
    pub mapping_file: PathBuf,
}

/// Where to send or fetch disk data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultTarget {
    /// `https://HOST:PORT` of a vault service, or the path of a local repository.
    pub url: String,
    #[serde(default)]
    pub token: Option<String>,
    /// SHA-256 of the vault's certificate (hex).
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// A disk in a datastore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    pub datastore: String,
    pub disk: String,
}

/// What to read for one disk backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DiskSource {
    /// Disk number `index` of an agent snapshot.
    Snapshot { snapshot: String, index: usize },
    /// A disk read in place (offline, or a frozen base).
    InPlace { datastore: String, disk: String },
    /// A read-only NBD export on a unix socket (a host agent's fleecing snapshot). With
    /// `bitmap_context` (`qemu:dirty-bitmap:NAME`) the export's dirty bitmap becomes the
    /// first change hint (source `hypervisor_bitmap`).
    Nbd {
        socket: PathBuf,
        export: String,
        #[serde(default)]
        bitmap_context: Option<String>,
    },
    /// A raw LUN mapping: the LUN `disk` of `datastore`, read in place, plus its mapping
    /// file ([`RdmMapping`]).
    Rdm { datastore: String, disk: String },
}

/// One disk of a backup call.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupJob {
    pub source: DiskSource,
    pub request: BackupRequest,
}

/// Tags of storage snapshots that live only as long as the job that took them (a group
/// backup's `group-<id>`): a storage agent that restarts deletes the ones it finds, because the
/// job cannot use them any more and, if the agent died before answering, never learned their
/// ids to release them.
pub const JOB_SCOPED_TAG_PREFIX: &str = "group-";

/// Body of `POST /v1/snapshots`: one storage snapshot per storage unit of `disks`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSnapshotRequest {
    /// `qcow2-frozen-base`, `qcow2-internal`, `reflink` or `copy`.
    pub provider: String,
    pub disks: Vec<DiskRef>,
    #[serde(default)]
    pub tag: String,
}

/// Body of `POST /v1/retention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRequest {
    pub keep: usize,
    #[serde(default)]
    pub dry_run: bool,
}

/// Body of `POST /v1/backups`: disks sent to one vault, each over its own connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupsRequest {
    pub vault: VaultTarget,
    pub disks: Vec<BackupJob>,
    /// Disks at once (0: the agent's default).
    #[serde(default)]
    pub parallel: usize,
}

/// The vault snapshot a disk backup made, as the agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultSnapshot {
    pub id: SnapshotId,
    pub name: String,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// Virtual size of the disk in bytes.
    pub size: u64,
    #[serde(default)]
    pub parent: Option<SnapshotId>,
    /// `change_source`, `changed_bytes`, `change_fallbacks`, the caller's labels and, for a
    /// raw LUN, `rdm_lun` and `rdm_map_snapshot`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What one disk backup did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskBackup {
    pub manifest: VaultSnapshot,
    pub change_source: ChangeSource,
    /// Bytes the tracker reported changed (the disk size for full and recipe compare).
    pub changed_bytes: u64,
    /// Bytes read from the disk snapshot (including a cross-check).
    pub bytes_read: u64,
    /// Encoded disk-data bytes handed to the vault.
    pub bytes_sent: u64,
    /// Hints that were skipped, with the reason.
    pub fallbacks: Vec<String>,
}

/// One disk's answer in `POST /v1/backups`: `{"ok": DiskBackup}` or `{"error": ApiError}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DiskBackupOutcome {
    Ok(DiskBackup),
    Error(ApiError),
}

/// Body of `POST /v1/restores`: a vault snapshot written as the disk `disk` of `datastore`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRestoreRequest {
    pub vault: VaultTarget,
    /// Vault snapshot (id, prefix or name).
    pub snapshot: String,
    pub datastore: String,
    /// Path relative to the datastore.
    pub disk: String,
    pub format: DiskFormat,
    pub mode: RestoreMode,
}

/// Body of `POST /v1/rdm/restores`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdmRestoreRequest {
    pub vault: VaultTarget,
    pub snapshot: String,
    pub datastore: String,
    /// The new LUN: `luns/NAME` (created) or a block device.
    pub disk: String,
}

/// Body of `POST /v1/files/scan`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanRequest {
    pub vault: VaultTarget,
    pub snapshot: String,
}

/// What was fetched from the vault to answer a scan or a read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadStats {
    /// Segments fetched.
    pub segments: u64,
    /// Plaintext bytes of those segments.
    pub bytes: u64,
}

/// One volume's listing.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScannedVolume {
    /// `whole`, `pN`, or `VG-LV` for an LVM logical volume.
    pub volume: String,
    pub partition: Partition,
    /// False when damage cut the listing short (see `errors`).
    pub complete: bool,
    pub errors: Vec<String>,
    pub files: Vec<FileEntry>,
    /// Found but not read, and why (an encrypted volume, swap, a thin LV, unknown contents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_indexed: Option<String>,
}

/// Everything a scan found in one snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanResult {
    pub snapshot: String,
    pub layout: DiskLayout,
    pub volumes: Vec<ScannedVolume>,
    /// What was fetched from the vault.
    pub read: ReadStats,
    pub elapsed_ms: u64,
}

/// Body of `POST /v1/files/read`: one file of a scanned snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    pub vault: VaultTarget,
    pub snapshot: String,
    /// The entry as a scan listed it (its extents say which segments to fetch).
    pub entry: FileEntry,
}

/// Body of `POST /v1/files/restore`: one file written into a datastore, data from the vault.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRestoreRequest {
    pub vault: VaultTarget,
    pub snapshot: String,
    pub entry: FileEntry,
    pub datastore: String,
    /// Relative to the datastore; must not exist.
    pub dest: String,
}

/// Answer of `POST /v1/files/restore`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRestored {
    pub path: PathBuf,
    pub bytes: u64,
    pub vault_bytes_read: u64,
    pub vault_segments_read: u64,
}

/// Answer of `DELETE /v1/snapshots/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deleted {
    pub deleted: String,
}
