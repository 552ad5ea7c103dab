//! The backup server's REST API (`docs/openapi.yaml`): the bodies of the calls that start work
//! or change settings, and every answer. Long work answers `202` with the job
//! ([`JobRecord`]), which clients poll at `/v1/jobs/{id}`; a finished job carries a typed
//! [`JobResult`].
//!
//! | module | holds |
//! |---|---|
//! | this one | request bodies, the data-path counters |
//! | [`records`] | what the catalog stores and the server answers with: backups, metadata snapshots, jobs (their [`JobKind`] parameters), schedules, retention |
//! | [`answers`] | the VM list, job results, file listings |

pub mod answers;
pub mod ids;
pub mod records;

pub use answers::*;
pub use ids::{BackupId, JobId};
pub use records::*;

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/backups`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBackup {
    pub vms: Vec<String>,
    /// One targeted group snapshot of all `vms`, then a backup of each.
    #[serde(default)]
    pub group: bool,
    /// Read every disk whole even with a previous backup.
    #[serde(default)]
    pub full: bool,
    /// Back up the disks Cairn can read and skip (with a warning) those it cannot, instead of
    /// refusing the VM.
    #[serde(default)]
    pub skip_unprotected: bool,
}

/// Body of `POST /v1/restores`: a backup restored as a new VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreParams {
    /// Backup id or unique prefix.
    pub backup: String,
    /// The new VM's name.
    pub as_name: String,
    /// Host to start it on (default: the backup's host).
    #[serde(default)]
    pub host: Option<String>,
    /// Start the VM (default true).
    #[serde(default = "yes")]
    pub start: bool,
    /// Wait up to this long for the guest agent to answer (0 = do not wait).
    #[serde(default)]
    pub wait_boot_s: u64,
    /// Write the backup over the disks of the existing VM `as_name` instead of creating a new
    /// VM: only differing regions are written. The VM must be shut off (a libvirt domain);
    /// it is not started.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub over_existing: bool,
}

fn yes() -> bool {
    true
}

/// Body of `POST /v1/prune`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartPrune {
    /// VMs whose retention policy to apply (all when empty).
    #[serde(default)]
    pub vms: Vec<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// Body of `PUT /v1/schedules/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSchedule {
    pub vms: Vec<String>,
    /// An interval: `30m`, `6h`, `1d` (at least one minute).
    pub every: String,
    #[serde(default)]
    pub group: bool,
    /// Seconds until the first run (default: one interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_in_s: Option<i64>,
}

/// Body of `POST /v1/files/restore`: one file of a backup written into primary storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreFileInto {
    pub backup: String,
    /// `/<disk>/<volume>/<path>`.
    pub path: String,
    /// Default: the storage agent holding the backed-up disk.
    #[serde(default)]
    pub storage_agent: Option<String>,
    /// Default: the datastore of the backed-up disk.
    #[serde(default)]
    pub datastore: Option<String>,
    /// Relative to the datastore; must not exist.
    pub dest: String,
}

/// Body of `POST /v1/files/restore-guest`: a file or a directory of a backup written into a
/// running VM through its guest agent (restore into the guest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreFileIntoGuest {
    pub backup: String,
    /// `/<disk>/<volume>/<path>`.
    pub path: String,
    /// Default: the backup's own VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Absolute path in the guest.
    pub dest: String,
    /// Replace what exists at `dest` (default: refuse).
    #[serde(default)]
    pub overwrite: bool,
}

/// Answer of `GET /v1/leader`: whether this server is the active one. Servers sharing one
/// PostgreSQL catalog take turns through a lease: the active one runs jobs and schedules and
/// accepts changes; a standby answers reads and refuses changes with `503`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderStatus {
    /// This server runs jobs and accepts changes.
    pub active: bool,
    /// This server's name in the lease (`HOST pid PID #RANDOM`).
    pub me: String,
    /// Whether the catalog may be shared (PostgreSQL), so that a lease decides which server
    /// is active; on SQLite the only server is always active.
    pub shared: bool,
    /// The lease's holder as stored (it may have lapsed); none before any server took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// When the holder's lease lapses unless renewed (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
}

/// Answer of `GET /v1/stats`: the data-path proof — disk-data bytes through the server (by
/// design 0) next to each storage agent's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPath {
    pub server_disk_bytes: u64,
    /// Bytes of single files restored through the server (file contents, not disk data).
    pub server_file_restore_bytes: u64,
    pub storage_agents: Vec<StorageAgentStats>,
}

/// One storage agent's counters in [`DataPath`]; `stats` is `None` when it did not answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageAgentStats {
    pub name: String,
    pub stats: Option<crate::storage::AgentStats>,
}
