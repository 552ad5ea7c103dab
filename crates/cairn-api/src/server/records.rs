//! What the backup server records and answers with: the catalog's rows (`cairn-catalog` stores
//! exactly these) and the jobs' parameters and results. One shape each, on the wire and in
//! the catalog.

use cairn_types::DiskFormat;
use serde::{Deserialize, Serialize};

use super::RestoreParams;
use super::answers::JobResult;
use super::ids::{BackupId, JobId};
use crate::host::{CheckpointId, Quiesce, ResourceUsage, SnapshotKind, VmSpec};
use crate::storage::{ChangeSource, LunId};

super::ids::string_id!(
    /// Links a backup (its storage snapshots) to its paired metadata snapshot:
    /// `UNIXMILLIS-RRRR` — 13 decimal digits of the time it was taken and 4 lowercase hex
    /// digits of chance — so ids sort by time. Anything else does not parse (its error names
    /// it).
    TimestampId,
    "timestamp",
    "UNIXMILLIS-RRRR (13 digits, 4 hex digits)",
    |s| {
        s.len() == 18
            && s.as_bytes()[13] == b'-'
            && s[..13].bytes().all(|b| b.is_ascii_digit())
            && s[14..]
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
);

impl TimestampId {
    /// The id of a metadata snapshot taken at `unix_ms`, `chance` telling apart two taken in
    /// the same millisecond.
    pub fn new(unix_ms: u64, chance: u16) -> Self {
        Self(format!("{unix_ms:013}-{chance:04x}"))
    }
}

/// Whether a backup read every disk whole or only what changed since its parent. Either
/// restores as a full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    Full,
    Incremental,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
        }
    }
}

impl std::fmt::Display for BackupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A VM known to the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSummary {
    pub name: String,
    pub backups: i64,
    pub last_backup_ms: Option<i64>,
}

/// One backup point of one VM: restorable as a full on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRecord {
    pub id: BackupId,
    pub vm: String,
    pub job_id: JobId,
    pub kind: BackupKind,
    /// Set for the backups of one targeted (group) snapshot.
    pub group_id: Option<String>,
    /// Links the backup (storage snapshot) to its paired metadata snapshot.
    pub timestamp_id: TimestampId,
    pub created_ms: i64,
    pub duration_ms: i64,
    /// The host the VM ran on.
    pub host: String,
    /// The host agent's checkpoint started by this backup (the next incremental's `since`).
    pub checkpoint: Option<CheckpointId>,
    /// The VM snapshot it was read from: `fleecing` (one VM) or `overlay` (a group).
    pub snapshot_kind: SnapshotKind,
    /// How the guest was made consistent.
    pub quiesce: Quiesce,
    pub quiesce_window_ms: i64,
    /// From VM snapshot creation to its deletion.
    pub vm_snapshot_lifetime_ms: i64,
    /// Disk bytes the storage agents read and sent for this backup.
    pub bytes_read: i64,
    pub bytes_sent: i64,
    /// The VM's attributes: vCPUs, memory, disks, NICs, firmware.
    pub attributes: VmSpec,
    pub disks: Vec<BackupDisk>,
    /// The paired metadata snapshot: set in the answer of `GET /v1/backups/{id}` only (the
    /// catalog keeps it in its own table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataSnapshot>,
    /// What the file catalog found on each disk, indexed or not and why: set in the answer
    /// of `GET /v1/backups/{id}` once the backup is indexed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<super::IndexedVolume>>,
}

/// One disk of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupDisk {
    /// The VM's device id (`vda`).
    pub disk: String,
    /// The vault snapshot holding the disk image.
    pub vault_snapshot: String,
    pub size: i64,
    pub format: DiskFormat,
    /// Name of the storage agent that holds the disk.
    pub storage_agent: String,
    pub datastore: String,
    /// The disk's id within the datastore (`web1.qcow2`, `luns/lun0`).
    pub datastore_disk: String,
    /// Which change source the storage agent used.
    pub change_source: ChangeSource,
    pub changed_bytes: i64,
    pub bytes_read: i64,
    pub bytes_sent: i64,
    /// Raw LUN mapping details for an RDM disk.
    pub rdm: Option<RdmMapping>,
}

/// How an RDM disk was backed up: the LUN's identity and the vault snapshot of its mapping
/// file (the storage agent's labels `rdm_lun` and `rdm_map_snapshot`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdmMapping {
    /// `None` when the agent's label did not parse as a LUN identity.
    pub lun: Option<LunId>,
    pub mapping_snapshot: Option<String>,
}

/// The paired metadata snapshot of one backup point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataSnapshot {
    pub timestamp_id: TimestampId,
    pub vm: String,
    pub created_ms: i64,
    /// BLAKE3 of the configuration JSON; the file is shared by every snapshot with it.
    pub config_digest: String,
    /// True when the configuration was unchanged since the previous snapshot.
    pub config_reused: bool,
    /// The saved execution state in the metadata store (relative path), if taken.
    pub state_file: Option<String>,
    pub state_bytes: Option<i64>,
    /// Host resource usage at the backup point.
    pub usage: UsageSample,
}

/// The host's resource usage of a VM at a backup point, or why it is missing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSample {
    pub host: String,
    pub usage: Option<ResourceUsage>,
    /// Set when the host agent could not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [Self; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `s` (as [`JobState::as_str`] writes it); `None` for an unknown name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A resource a job holds that must be released if the job fails or the server dies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
pub enum Hold {
    /// A VM snapshot on a host agent (deleted through the manager).
    VmSnapshot { vm: String, snapshot: String },
    /// A storage-unit snapshot on a storage agent.
    StorageSnapshot { agent: String, snapshot: String },
    /// A saved execution state on a host agent.
    SavedState { vm: String, name: String },
    /// A disk a restore wrote for the new VM `vm`: discarded unless `vm` was defined.
    RestoredDisk {
        vm: String,
        agent: String,
        datastore: String,
        disk: String,
    },
    /// A vault snapshot of a pruned backup: forgotten once no backup in the catalog names it.
    VaultSnapshot { snapshot: String },
}

/// What a job does, with its parameters (a job's `params`; `kind` names the variant).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum JobKind {
    /// One backup per VM (full, or incremental when a previous backup exists).
    Backup {
        vms: Vec<String>,
        #[serde(default)]
        full: bool,
        /// Skip the disks Cairn cannot read instead of refusing the VM.
        #[serde(default)]
        skip_unprotected: bool,
    },
    /// One targeted group snapshot of all VMs, then a backup of each.
    GroupBackup {
        vms: Vec<String>,
        #[serde(default)]
        full: bool,
        /// Skip the disks Cairn cannot read instead of refusing the VM.
        #[serde(default)]
        skip_unprotected: bool,
    },
    /// A backup restored as a new VM.
    Restore(RestoreParams),
    /// Parses a recorded backup's disks into the file catalog.
    Index { backup: String },
    /// Applies the retention policy of the VMs (all VMs when empty).
    Prune {
        #[serde(default)]
        vms: Vec<String>,
        #[serde(default)]
        dry_run: bool,
    },
}

impl JobKind {
    /// The job's `kind`: the tag of its parameters and of its result.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Backup { .. } => "backup",
            Self::GroupBackup { .. } => "group_backup",
            Self::Restore(_) => "restore",
            Self::Prune { .. } => "prune",
            Self::Index { .. } => "index",
        }
    }

    /// VMs the job works on (exclusive while it is unfinished).
    pub fn vms(&self) -> Vec<String> {
        match self {
            Self::Backup { vms, .. } | Self::GroupBackup { vms, .. } => vms.clone(),
            Self::Restore(p) => vec![p.as_name.clone()],
            Self::Prune { .. } | Self::Index { .. } => Vec::new(),
        }
    }
}

/// A job and its outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRecord {
    pub id: JobId,
    /// `backup`, `group_backup`, `restore`, `index`, `prune` ([`JobKind::name`]).
    pub kind: String,
    pub state: JobState,
    pub params: JobKind,
    /// VMs the job works on (two running jobs never share one).
    pub vms: Vec<String>,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    pub result: Option<JobResult>,
    pub holds: Vec<Hold>,
    pub cancel_requested: bool,
    /// The job's log: set in the answer of `GET /v1/jobs/{id}` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<JobEvent>>,
}

/// One line of a job's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobEvent {
    pub seq: i64,
    pub at_ms: i64,
    pub level: String,
    pub message: String,
}

/// A backup schedule: back up `vms` every `every_s` seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub name: String,
    pub vms: Vec<String>,
    /// One targeted (group) snapshot of all `vms` instead of one backup each.
    pub group: bool,
    pub every_s: i64,
    pub next_ms: i64,
    pub enabled: bool,
}

/// How many backups to keep (`None` = no rule of that kind); also the body of
/// `PUT /v1/retention/{vm}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default)]
    pub keep_last: Option<i64>,
    #[serde(default)]
    pub keep_daily: Option<i64>,
    #[serde(default)]
    pub keep_weekly: Option<i64>,
    #[serde(default)]
    pub keep_monthly: Option<i64>,
}
