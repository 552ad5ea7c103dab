//! The hypervisor driver contract ([`HypervisorDriver`]) and the data it exchanges.
//!
//! The trait is object safe (methods return boxed futures), so the host agent can hold an
//! `Arc<dyn HypervisorDriver>` and tests can substitute a fake.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::process::ProcessError;
use crate::qga::QgaError;
use crate::qmp::QmpError;
use crate::spec::{CheckpointId, SpecError, VmId, VmSnapshotId, VmSpec};
use crate::state::VmDisk;

/// A boxed, sendable future: what every [`HypervisorDriver`] method returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors of a hypervisor driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("no VM {0} in this host agent")]
    UnknownVm(VmId),
    #[error("VM {0} is not running")]
    NotRunning(VmId),
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    /// Only one snapshot per VM may exist at a time.
    #[error("VM {vm} already has snapshot {snapshot} in flight")]
    SnapshotInProgress { vm: VmId, snapshot: VmSnapshotId },
    #[error("no snapshot {0} in flight")]
    UnknownSnapshot(VmSnapshotId),
    #[error("QMP on VM {vm}")]
    Qmp {
        vm: VmId,
        #[source]
        source: QmpError,
    },
    #[error("guest agent of VM {vm}")]
    GuestAgent {
        vm: VmId,
        #[source]
        source: QgaError,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A state file exists but does not parse.
    #[error("corrupt state file {}", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// An external tool (`qemu-img`) failed.
    #[error("{program} failed: {stderr}")]
    Tool { program: String, stderr: String },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    /// A block job, migration or export ended in an error state.
    #[error("{what} failed: {reason}")]
    Failed { what: String, reason: String },
}

/// Run state of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VmState {
    /// QEMU answers; `status` is its run state (`running`, `paused`, `prelaunch`, ...).
    Running { status: String, cpus_running: bool },
    /// The process is alive but QMP does not answer.
    Unresponsive { reason: String },
    /// The process is gone (crashed, killed, or the host rebooted).
    Gone,
}

/// A VM this driver manages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmHandle {
    pub id: VmId,
    pub name: String,
    pub pid: u32,
    pub qmp_socket: PathBuf,
    pub qga_socket: PathBuf,
    pub disks: Vec<VmDisk>,
}

/// [`VmHandle`] plus its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub handle: VmHandle,
    pub spec: VmSpec,
    pub state: VmState,
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

/// One options struct for [`HypervisorDriver::snapshot`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotOptions {
    pub kind: SnapshotKind,
    pub quiesce: QuiescePolicy,
    /// Report changes since this checkpoint (incremental). `None`: a full backup.
    pub since: Option<CheckpointId>,
    /// Where scratch images (fleecing) or overlays go; default the state dir's `scratch/`.
    pub scratch_dir: Option<PathBuf>,
    /// How long the guest agent has to answer a ping before falling back to pause.
    pub agent_timeout: Duration,
    /// Bound on `guest-fsfreeze-freeze`.
    pub freeze_timeout: Duration,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self {
            kind: SnapshotKind::Fleecing,
            quiesce: QuiescePolicy::Auto,
            since: None,
            scratch_dir: None,
            agent_timeout: Duration::from_secs(2),
            freeze_timeout: Duration::from_secs(20),
        }
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

/// Changes of one disk since a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
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
#[serde(rename_all = "snake_case", tag = "type")]
pub enum DiskSource {
    /// Read-only NBD export: `nbd+unix:///<export>?socket=<socket>`.
    Nbd { socket: PathBuf, export: String },
    /// A frozen image file (overlay snapshot base).
    File { path: PathBuf, format: String },
}

/// One disk of a [`VmSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    pub disk: VmDisk,
    /// Virtual size in bytes.
    pub size: u64,
    pub source: DiskSource,
    pub changes: Changes,
}

/// A point-in-time VM snapshot. Must be handed back to [`HypervisorDriver::delete_snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// What [`HypervisorDriver::save_state`] wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedState {
    pub path: PathBuf,
    pub bytes: u64,
    pub total_ms: u64,
    /// QEMU's reported downtime (vCPUs stopped).
    pub downtime_ms: u64,
}

/// CPU time of one vCPU thread.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuUsage {
    pub index: u32,
    pub thread_id: u32,
    pub cpu_time_ms: u64,
}

/// I/O counters of one disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskIo {
    pub device: String,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_ops: u64,
    pub wr_ops: u64,
    pub flush_ops: u64,
}

/// Host resources a VM uses, sampled at `sampled_at_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// What a driver must do for the host agent. All methods are bounded in time.
///
/// Contracts:
/// - `start_vm` returns once QMP answers; the VM is recorded durably before that, so a restart
///   of the agent re-adopts it. `stop_vm` is idempotent for a VM that is already gone.
/// - `snapshot` returns a consistent point in time and **always** undoes its quiesce (thaw or
///   `cont`), also on error. A failed snapshot leaves nothing behind in QEMU or on disk.
///   Change tracking problems never fail it: they show as [`Changes::Unknown`].
/// - `delete_snapshot` releases everything of the snapshot and returns its lifetime in ms;
///   calling it again for a deleted snapshot is an error ([`DriverError::UnknownSnapshot`]).
/// - `recover` tears down every snapshot a previous agent left in flight; call it at start.
pub trait HypervisorDriver: Send + Sync {
    fn start_vm<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<VmHandle, DriverError>>;
    /// Shuts the VM down (QMP `quit`, SIGKILL past `timeout`) and forgets it.
    fn stop_vm(&self, vm: VmId, timeout: Duration) -> BoxFuture<'_, Result<(), DriverError>>;
    fn list_vms(&self) -> BoxFuture<'_, Result<Vec<VmInfo>, DriverError>>;
    fn vm_status(&self, vm: VmId) -> BoxFuture<'_, Result<VmInfo, DriverError>>;
    fn snapshot<'a>(
        &'a self,
        vm: VmId,
        options: &'a SnapshotOptions,
    ) -> BoxFuture<'a, Result<VmSnapshot, DriverError>>;
    /// Returns the snapshot's lifetime in milliseconds.
    fn delete_snapshot<'a>(
        &'a self,
        snapshot: &'a VmSnapshot,
    ) -> BoxFuture<'a, Result<u64, DriverError>>;
    /// Per disk id, the changes since `checkpoint` (removing bitmaps QEMU reports inconsistent).
    fn changes_since(
        &self,
        vm: VmId,
        checkpoint: CheckpointId,
    ) -> BoxFuture<'_, Result<Vec<(String, Changes)>, DriverError>>;
    /// Tears down leftovers of crashed agents; returns how many journal entries it cleared.
    fn recover(&self) -> BoxFuture<'_, Result<usize, DriverError>>;
    /// Writes the VM's execution state (RAM, devices) to `path`; the VM keeps running.
    fn save_state<'a>(
        &'a self,
        vm: VmId,
        path: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<SavedState, DriverError>>;
    fn resource_usage(&self, vm: VmId) -> BoxFuture<'_, Result<ResourceUsage, DriverError>>;
    /// The VM's one guest-agent client (the chardev takes one connection; the driver's
    /// quiesce uses the same client). `None` for drivers without a guest agent.
    fn guest_agent_of(&self, _vm: VmId) -> Option<std::sync::Arc<crate::qga::GuestAgent>> {
        None
    }
}
