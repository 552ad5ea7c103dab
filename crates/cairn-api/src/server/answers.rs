//! The backup server's answers that are not catalog rows: the VM list, the jobs' results and
//! the file catalog's listings.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ids::BackupId;
use super::records::{BackupKind, Retention, TimestampId};
use crate::host::{GuestStatus, Quiesce, VmId, VmSpec};
use crate::manager::DiskLocation;
use crate::storage::ChangeSource;

/// A VM's state in `GET /v1/vms`: the manager's, or `absent` for a VM that only has backups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmListState {
    Running,
    Unresponsive,
    Gone,
    /// Defined but not running (a shut-off libvirt domain).
    ShutOff,
    /// No host runs it any more; its backups remain.
    Absent,
}

impl VmListState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Unresponsive => "unresponsive",
            Self::Gone => "gone",
            Self::ShutOff => "shut_off",
            Self::Absent => "absent",
        }
    }
}

impl From<crate::manager::VmRunState> for VmListState {
    fn from(s: crate::manager::VmRunState) -> Self {
        match s {
            crate::manager::VmRunState::Running => Self::Running,
            crate::manager::VmRunState::Unresponsive => Self::Unresponsive,
            crate::manager::VmRunState::Gone => Self::Gone,
            crate::manager::VmRunState::ShutOff => Self::ShutOff,
        }
    }
}

/// One VM of `GET /v1/vms`. `vcpus`, `memory_mib` and `disks` are absent for a VM no host
/// runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    pub name: String,
    pub host: Option<String>,
    pub state: VmListState,
    /// Who started the VM; absent for a VM no host runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<crate::host::VmOrigin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskLocation>>,
    /// Disks a backup cannot read, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unprotected: Vec<crate::host::UnprotectedDisk>,
    pub backups: i64,
    pub last_backup_ms: Option<i64>,
}

/// Answer of `DELETE /v1/schedules/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletedSchedule {
    pub deleted: String,
}

/// What a finished job returns (`result` of a job), tagged with the job's `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum JobResult {
    Backup(BackupsDone),
    GroupBackup(GroupBackupDone),
    Restore(Box<RestoreDone>),
    Index(IndexDone),
    Prune(PruneDone),
}

impl JobResult {
    /// The backups a backup or group backup job recorded (none for other jobs).
    pub fn backups(&self) -> &[BackupSummary] {
        match self {
            Self::Backup(b) => &b.backups,
            Self::GroupBackup(g) => &g.backups,
            _ => &[],
        }
    }
}

/// Result of a `backup` job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupsDone {
    pub backups: Vec<BackupSummary>,
}

/// One recorded backup in a job's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSummary {
    pub backup: BackupId,
    pub vm: String,
    pub kind: BackupKind,
    pub group: Option<String>,
    pub timestamp_id: TimestampId,
    pub duration_ms: i64,
    pub quiesce: Quiesce,
    pub quiesce_window_ms: i64,
    pub vm_snapshot_lifetime_ms: i64,
    pub bytes_read: i64,
    pub bytes_sent: i64,
    pub disks: Vec<DiskSummary>,
}

/// One disk of a [`BackupSummary`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSummary {
    pub disk: String,
    pub vault_snapshot: String,
    pub size: i64,
    pub change_source: ChangeSource,
    pub changed_bytes: i64,
    pub bytes_read: i64,
    pub bytes_sent: i64,
}

/// Result of a `group_backup` job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupBackupDone {
    pub group: String,
    pub duration_ms: i64,
    /// Time to take every storage-unit snapshot.
    pub unit_snapshot_ms: i64,
    pub vm_snapshot_lifetimes_ms: Vec<VmSnapshotLifetime>,
    pub backups: Vec<BackupSummary>,
}

/// How long one VM's snapshot lived in a group backup, as the host agent and the server
/// measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotLifetime {
    pub vm: String,
    pub host_measured_ms: i64,
    pub server_measured_ms: i64,
}

/// Result of a `restore` job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreDone {
    /// The new VM's name.
    pub vm: String,
    pub from_backup: BackupId,
    pub host: String,
    pub disks: Vec<RestoredDisk>,
    /// The new VM's attributes.
    pub attributes: VmSpec,
    /// Set when the VM was started.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_vm_id: Option<VmId>,
    /// The guest agent's answer, when the restore waited for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
    pub duration_ms: u64,
}

/// One disk of a [`RestoreDone`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoredDisk {
    pub disk: String,
    pub path: PathBuf,
    /// The vault snapshot it was written from.
    pub snapshot: String,
}

/// Result of a `prune` job: one plan per VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneDone {
    pub plans: Vec<PrunePlan>,
}

/// The retention of one VM: the backups it forgets (or would, with `dry_run`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrunePlan {
    pub vm: String,
    /// `None`: the VM has no policy (and no default applies); nothing is forgotten.
    pub policy: Option<Retention>,
    pub forget: Vec<BackupId>,
    #[serde(default)]
    pub dry_run: bool,
}

/// Result of an `index` job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexDone {
    pub backup: String,
    /// The backup was in the file catalog already; nothing else is set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub already_indexed: bool,
    #[serde(default)]
    pub volumes: Vec<IndexedVolume>,
    #[serde(default)]
    pub files: u64,
    #[serde(default)]
    pub records_new: u64,
    #[serde(default)]
    pub records_shared: u64,
    #[serde(default)]
    pub bytes_written: u64,
}

/// One volume of an [`IndexDone`]: parsed, or found and named but not indexed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexedVolume {
    pub disk: String,
    pub volume: String,
    pub files: u64,
    /// False when the file system was only partly readable.
    pub complete: bool,
    /// What the volume holds (`Ext4`, `Xfs`, `Luks`, `Swap`, …).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fs: String,
    /// Why nothing of it is indexed (`LUKS encrypted volume (no key)`, `thin volume in pool
    /// …`); `None` for a volume that was parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_indexed: Option<String>,
}

/// What an entry of a file listing is: a volume (file system) of a disk, or one of its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Volume,
    File,
    Dir,
    Symlink,
    Other,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Volume => "volume",
            Self::File => "file",
            Self::Dir => "dir",
            Self::Symlink => "symlink",
            Self::Other => "other",
        }
    }
}

impl From<cairn_types::FileKind> for EntryKind {
    fn from(k: cairn_types::FileKind) -> Self {
        match k {
            cairn_types::FileKind::File => Self::File,
            cairn_types::FileKind::Dir => Self::Dir,
            cairn_types::FileKind::Symlink => Self::Symlink,
            cairn_types::FileKind::Other => Self::Other,
        }
    }
}

/// One entry of `GET /v1/files` (a volume: `path` and `files` only) and the file described
/// by `x-cairn-file` and the file restores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    /// `/<disk>/<volume>/<path>`.
    pub path: String,
    pub kind: EntryKind,
    /// Files in a volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    /// Runs of the file on the disk image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extents: Option<u64>,
    /// A volume that was found but not indexed: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_indexed: Option<String>,
}

/// One hit of `GET /v1/files/find`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHit {
    pub backup: String,
    pub vm: String,
    pub created_ms: i64,
    /// `/<disk>/<volume>/<path>`.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: Option<i64>,
}

/// One backup's version of a file in `GET /v1/files/versions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileVersion {
    pub backup: String,
    pub created_ms: i64,
    pub size: u64,
    pub mtime_ns: Option<i64>,
    /// Differs from the previous backup's version.
    pub changed: bool,
}

/// Answer of `POST /v1/files/restore`: the storage agent's [`crate::storage::FileRestored`]
/// and which agent wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRestoredInto {
    pub path: PathBuf,
    pub bytes: u64,
    pub vault_bytes_read: u64,
    pub vault_segments_read: u64,
    pub storage_agent: String,
    pub file: FileInfo,
}

/// Answer of `POST /v1/files/restore-guest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRestoredIntoGuest {
    pub vm: String,
    pub dest: String,
    pub files: u64,
    pub dirs: u64,
    /// Symbolic links and special files, which are not written.
    pub skipped: u64,
    /// File bytes written into the guest.
    pub bytes: u64,
    /// Bytes the storage agent fetched from the vault for them.
    pub vault_bytes_read: u64,
}

/// A file's bytes from `GET /v1/files/content` with what its headers say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileContent {
    pub data: Vec<u8>,
    /// `x-cairn-file`; `None` when the server did not send it.
    pub file: Option<FileInfo>,
    /// `x-cairn-vault-bytes`: bytes the server read from the vault for it.
    pub vault_bytes_read: Option<u64>,
}
