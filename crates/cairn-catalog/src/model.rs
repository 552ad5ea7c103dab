//! The catalog's rows as typed values (also the JSON the server's API returns).

use serde::{Deserialize, Serialize};

use crate::{CatalogError, Result};

/// A VM known to the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    pub name: String,
    pub backups: i64,
    pub last_backup_ms: Option<i64>,
}

/// One backup point of one VM: restorable as a full on its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub id: String,
    pub vm: String,
    pub job_id: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// Set for the backups of one targeted (group) snapshot.
    pub group_id: Option<String>,
    /// Links the backup (storage snapshot) to its paired metadata snapshot.
    pub timestamp_id: String,
    pub created_ms: i64,
    pub duration_ms: i64,
    /// The host the VM ran on.
    pub host: String,
    /// The host agent's checkpoint started by this backup (the next incremental's `since`).
    pub checkpoint: Option<String>,
    /// `fleecing` or `overlay`.
    pub snapshot_kind: String,
    /// `guest_freeze`, `pause` or `none`.
    pub quiesce: String,
    pub quiesce_window_ms: i64,
    /// From VM snapshot creation to its deletion.
    pub vm_snapshot_lifetime_ms: i64,
    /// Disk bytes the storage agents read and sent for this backup.
    pub bytes_read: i64,
    pub bytes_sent: i64,
    /// The VM's attributes (its `VmSpec`: vCPUs, memory, disks, NICs, firmware).
    pub attributes: serde_json::Value,
    pub disks: Vec<BackupDisk>,
}

/// One disk of a backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupDisk {
    /// The VM's device id (`vda`).
    pub disk: String,
    /// The vault snapshot holding the disk image.
    pub vault_snapshot: String,
    pub size: i64,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Name of the storage agent that holds the disk.
    pub storage_agent: String,
    pub datastore: String,
    /// The disk's id within the datastore (`web1.qcow2`, `luns/lun0`).
    pub datastore_disk: String,
    /// Which change source the storage agent used.
    pub change_source: String,
    pub changed_bytes: i64,
    pub bytes_read: i64,
    pub bytes_sent: i64,
    /// Raw LUN mapping details for an RDM disk.
    pub rdm: Option<serde_json::Value>,
}

/// The paired metadata snapshot of one backup point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetadataSnapshot {
    pub timestamp_id: String,
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
    pub usage: serde_json::Value,
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
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => {
                return Err(CatalogError::Decode {
                    what: "job state".into(),
                    message: format!("{s:?}"),
                });
            }
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A resource a job holds that must be released if the job fails or the server dies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
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

/// A job and its outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// `backup`, `group_backup`, `restore`, `file_restore`, `prune`, ...
    pub kind: String,
    pub state: JobState,
    pub params: serde_json::Value,
    /// VMs the job works on (two running jobs never share one).
    pub vms: Vec<String>,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    pub holds: Vec<Hold>,
    pub cancel_requested: bool,
}

/// One line of a job's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub seq: i64,
    pub at_ms: i64,
    pub level: String,
    pub message: String,
}

/// A backup schedule: back up `vms` every `every_s` seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub name: String,
    pub vms: Vec<String>,
    /// One targeted (group) snapshot of all `vms` instead of one backup each.
    pub group: bool,
    pub every_s: i64,
    pub next_ms: i64,
    pub enabled: bool,
}

/// How many backups to keep (`None` = no rule of that kind).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub keep_last: Option<i64>,
    pub keep_daily: Option<i64>,
    pub keep_weekly: Option<i64>,
    pub keep_monthly: Option<i64>,
}
