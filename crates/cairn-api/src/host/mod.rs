//! The host agent's API: the VM attributes ([`VmSpec`]), what a host agent reports about its
//! VMs, its VM snapshots and their change tracking, and the request and answer bodies of its
//! routes (`docs/HOST-AGENT.md` has the route table).
//!
//! The manager relays the server's calls to the host agent running a VM; both ends of both
//! hops use these types. Every struct refuses fields it does not know and every enum names an
//! unknown variant in its error, so a peer speaking a different version fails loudly.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod spec;

pub use spec::{
    BootSpec, CHECKPOINT_PREFIX, CheckpointId, DiskBacking, DiskBus, DiskSpec, GUEST_AGENT_PORT,
    IdError, NicSpec, SpecError, TEMP_PREFIX, VmId, VmSnapshotId, VmSpec,
};

/// A disk of a running VM as the host agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDisk {
    /// Device id, e.g. `vda`.
    pub id: String,
    /// The format node QEMU knows the disk by.
    pub node_name: String,
    pub backing: DiskBacking,
    pub read_only: bool,
}

/// Run state of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", deny_unknown_fields)]
pub enum VmState {
    /// QEMU answers; `status` is its run state (`running`, `paused`, `prelaunch`, ...).
    Running { status: String, cpus_running: bool },
    /// The process is alive but QMP does not answer.
    Unresponsive { reason: String },
    /// The process is gone (crashed, killed, or the host rebooted).
    Gone,
    /// Defined but not running (a shut-off libvirt domain): a backup reads its disks in place.
    ShutOff,
}

/// Where a VM comes from, and so what the host agent may do with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
pub enum VmOrigin {
    /// Started by this host agent from its [`VmSpec`].
    #[default]
    Cairn,
    /// A QEMU process Cairn did not start, adopted through its QMP socket. The host agent
    /// never stops or kills it.
    Adopted { qmp_socket: PathBuf },
    /// A libvirt domain; the host agent talks to libvirt only, never to its QEMU directly.
    Libvirt {
        uri: String,
        uuid: String,
        /// Defined (survives a shutdown) rather than transient.
        persistent: bool,
    },
}

impl VmOrigin {
    /// A short word for listings: `cairn`, `qmp` or `libvirt`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Cairn => "cairn",
            Self::Adopted { .. } => "qmp",
            Self::Libvirt { .. } => "libvirt",
        }
    }
}

/// A VM this driver manages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmHandle {
    pub id: VmId,
    pub name: String,
    pub pid: u32,
    pub qmp_socket: PathBuf,
    pub qga_socket: PathBuf,
    pub disks: Vec<VmDisk>,
    #[serde(default)]
    pub origin: VmOrigin,
}

/// A disk of a VM that Cairn cannot back up, and why (a network disk such as rbd or iscsi, an
/// image format it cannot read, a path no storage agent serves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnprotectedDisk {
    pub disk: String,
    pub reason: String,
}

/// [`VmHandle`] plus its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    pub handle: VmHandle,
    pub spec: VmSpec,
    pub state: VmState,
    /// Disks of the VM that are not in `spec` because Cairn cannot back them up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unprotected: Vec<UnprotectedDisk>,
}

/// How the guest was made consistent for the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quiesce {
    /// File systems frozen through `qemu-ga` (application-consistent as far as fsfreeze goes).
    GuestFreeze,
    /// vCPUs stopped (`stop` … `cont`): crash-consistent.
    Pause,
    /// Nothing was done (asked for, or the vCPUs were not running anyway).
    None,
}

impl Quiesce {
    /// The wire name: `guest_freeze`, `pause` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GuestFreeze => "guest_freeze",
            Self::Pause => "pause",
            Self::None => "none",
        }
    }
}

impl std::fmt::Display for Quiesce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What the caller allows for quiescing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuiescePolicy {
    /// Guest agent freeze when it answers a ping in time, else pause.
    #[default]
    Auto,
    PauseOnly,
    None,
}

/// The two snapshot mechanisms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Pull mode: a point-in-time NBD export per disk, backed by copy-before-write into a scratch
    /// image; the guest keeps writing to its disk.
    Fleecing,
    /// External overlay: the guest writes to a new overlay file; the base files are frozen for
    /// the storage side to read; deleting the snapshot commits the overlay back.
    Overlay,
}

impl SnapshotKind {
    /// The wire name: `fleecing` or `overlay`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fleecing => "fleecing",
            Self::Overlay => "overlay",
        }
    }
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Why changed blocks are not known; the backup must then read the whole disk (or diff
/// snapshots). Never a reason to fail the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownReason {
    /// The checkpoint's bitmap is not on the disk (never made, deleted, raw or read-only disk).
    BitmapMissing,
    /// QEMU died without storing it (SIGKILL, crash): it came back `inconsistent` and was removed.
    BitmapInconsistent,
    /// The disk's size changed since the checkpoint.
    DiskResized,
    /// No checkpoint was given.
    NoPreviousCheckpoint,
}

impl UnknownReason {
    /// The wire name, e.g. `bitmap_missing`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BitmapMissing => "bitmap_missing",
            Self::BitmapInconsistent => "bitmap_inconsistent",
            Self::DiskResized => "disk_resized",
            Self::NoPreviousCheckpoint => "no_previous_checkpoint",
        }
    }
}

/// Changes of one disk since a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
pub enum Changes {
    Known(KnownChanges),
    Unknown { reason: UnknownReason },
}

impl Changes {
    pub fn is_known(&self) -> bool {
        matches!(self, Changes::Known(_))
    }
}

/// Where the changed blocks are recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownChanges {
    /// Checkpoint bitmaps on the disk whose union is the change set, oldest first.
    pub bitmaps: Vec<String>,
    /// Fleecing: the frozen union, exported with the disk.
    pub export_bitmap: Option<String>,
    /// Fleecing: the NBD meta context to query with `NBD_CMD_BLOCK_STATUS`.
    pub meta_context: Option<String>,
    /// Dirty bytes (exact for the export bitmap, an upper bound otherwise).
    pub dirty_bytes: u64,
    /// Bitmap granularity in bytes.
    pub granularity: u64,
}

/// How to read one disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
pub enum DiskSource {
    /// Read-only NBD export: `nbd+unix:///<export>?socket=<socket>`.
    Nbd { socket: PathBuf, export: String },
    /// A frozen image file (overlay snapshot base).
    File { path: PathBuf, format: String },
}

/// One disk of a [`VmSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSnapshot {
    pub disk: VmDisk,
    /// Virtual size in bytes.
    pub size: u64,
    pub source: DiskSource,
    pub changes: Changes,
}

/// A point-in-time VM snapshot. Must be deleted (`DELETE /v1/snapshots/{id}`) to release it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    pub id: VmSnapshotId,
    pub vm: VmId,
    pub kind: SnapshotKind,
    pub quiesce: Quiesce,
    /// How long the guest was frozen or paused.
    pub quiesce_window_ms: u64,
    /// The checkpoint this snapshot started; pass it as `since` next time.
    pub checkpoint: Option<CheckpointId>,
    pub created_at_ms: u64,
    pub disks: Vec<DiskSnapshot>,
}

/// What saving a VM's execution state wrote (`POST /v1/vms/{vm}/state`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub path: PathBuf,
    pub bytes: u64,
    pub total_ms: u64,
    /// QEMU's reported downtime (vCPUs stopped).
    pub downtime_ms: u64,
}

/// CPU time of one vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuUsage {
    pub index: u32,
    pub thread_id: u32,
    pub cpu_time_ms: u64,
}

/// I/O counters of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskIo {
    pub device: String,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_ops: u64,
    pub wr_ops: u64,
    pub flush_ops: u64,
}

/// Host resources a VM uses, sampled at `sampled_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceUsage {
    pub sampled_at_ms: u64,
    /// user + system time of the whole QEMU process.
    pub process_cpu_time_ms: u64,
    pub vcpus: Vec<VcpuUsage>,
    /// Guest RAM configured.
    pub memory_bytes: u64,
    /// Resident set of the QEMU process.
    pub rss_bytes: u64,
    pub disks: Vec<DiskIo>,
}

/// Body of `POST /v1/vms/{vm}/snapshots`. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Default `fleecing`.
    #[serde(default)]
    pub kind: Option<SnapshotKind>,
    /// `auto` (default): guest freeze when `qemu-ga` answers, else pause; `pause_only`; `none`.
    #[serde(default)]
    pub quiesce: QuiescePolicy,
    /// Report the changes since this checkpoint (an incremental backup).
    #[serde(default)]
    pub since: Option<CheckpointId>,
    /// How long the guest agent has to answer a ping (default 2000).
    #[serde(default)]
    pub agent_timeout_ms: Option<u64>,
    /// Bound on the guest's fsfreeze (default 20000).
    #[serde(default)]
    pub freeze_timeout_ms: Option<u64>,
}

/// Answer of `DELETE /v1/snapshots/{snapshot}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletedSnapshot {
    pub snapshot: VmSnapshotId,
    pub vm: VmId,
    /// From the snapshot's creation to the end of its teardown.
    pub lifetime_ms: u64,
}

/// One disk of a [`ChangesReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskChanges {
    pub disk: String,
    pub changes: Changes,
}

/// Answer of `GET /v1/vms/{vm}/changes?since=`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesReport {
    pub vm: VmId,
    pub since: CheckpointId,
    pub disks: Vec<DiskChanges>,
}

/// Body of `POST /v1/vms/{vm}/state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveStateRequest {
    /// File name under `STATE/saved/` (one path component, no leading dot); default
    /// `<vm>-<unix ms>.state`. An existing file is not overwritten (`409`).
    #[serde(default)]
    pub name: Option<String>,
}

/// Answer of `GET /v1/vms/{vm}/guest`: what the guest agent says (proof that a guest booted
/// and mounted its disks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestStatus {
    /// `qemu-ga` answered a ping within `timeout_ms`.
    pub agent: bool,
    /// `(mountpoint, type, device)` of each mounted file system.
    pub filesystems: Vec<(String, String, String)>,
    #[serde(default)]
    pub error: Option<String>,
}

/// Body of `POST /v1/vms/{vm}/guest/exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Run with `/bin/sh -c`.
    pub shell: String,
    /// Default 30000, at most 600000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Answer of `POST /v1/vms/{vm}/guest/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    pub exit_code: Option<i64>,
    /// The signal that ended the process, if one did.
    pub signal: Option<i64>,
    /// Output, lossily decoded as UTF-8.
    pub stdout: String,
    pub stderr: String,
}

/// What `POST /v1/vms/{vm}/guest/files` writes into the running guest through its guest
/// agent: a directory, or one piece of a regular file.
///
/// A file is sent in order, in pieces of at most [`GUEST_FILE_PIECE`] bytes: the piece at
/// `offset` 0 creates a temporary file beside `path`; each later piece is appended after
/// checking that the temporary file holds exactly `offset` bytes; the `last` piece sets mode,
/// owner and modification time and moves the file into place, refusing when `path` exists
/// unless `overwrite`. An empty file is one piece, empty and last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestFileWrite {
    /// Absolute path in the guest.
    pub path: String,
    /// Create a directory (with its parents) instead of writing a file.
    #[serde(default)]
    pub dir: bool,
    #[serde(default)]
    pub offset: u64,
    /// The piece's bytes, base64 (standard alphabet, padded), as the guest agent takes them.
    #[serde(default)]
    pub data_b64: String,
    #[serde(default)]
    pub last: bool,
    /// Permission bits (`0o7777` at most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Modification time, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_s: Option<i64>,
    #[serde(default)]
    pub overwrite: bool,
}

/// Largest piece of a [`GuestFileWrite`] (before base64): keeps each request and each guest
/// agent message well under their size limits.
pub const GUEST_FILE_PIECE: usize = 384 << 10;

/// Answer of `POST /v1/vms/{vm}/guest/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestFileWritten {
    pub path: String,
    /// Bytes of the file written so far (the piece's offset plus its length).
    pub bytes: u64,
    /// The file (or directory) is in place with its mode, owner and time.
    pub done: bool,
}

/// Answer of `DELETE /v1/vms/{vm}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoppedVm {
    pub stopped: VmId,
}

/// Answer of `DELETE /v1/saved/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletedState {
    pub deleted: String,
}

/// Answer of `POST /v1/recover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recovered {
    pub cleared: usize,
}
