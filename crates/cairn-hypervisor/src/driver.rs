//! The hypervisor driver contract ([`HypervisorDriver`]) and the data it exchanges.
//!
//! The trait is object safe (methods return boxed futures), so the host agent can hold an
//! `Arc<dyn HypervisorDriver>` and tests can substitute a fake.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use cairn_api::host::{
    Changes, DiskIo, DiskSnapshot, DiskSource, KnownChanges, Quiesce, QuiescePolicy, ResourceUsage,
    SavedState, SnapshotKind, UnknownReason, VcpuUsage, VmHandle, VmInfo, VmOrigin, VmSnapshot,
    VmState,
};

use crate::process::ProcessError;
use crate::qga::QgaError;
use crate::qmp::QmpError;
use crate::spec::{CheckpointId, SpecError, VmId, VmSnapshotId, VmSpec};

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
    /// Not done on this VM: an adopted QEMU is never stopped, and a VM with a disk Cairn
    /// cannot map is not snapshotted.
    #[error("VM {vm}: {reason}")]
    Refused { vm: VmId, reason: String },
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
    /// Runs guest-agent commands for drivers whose VM manager owns the agent channel
    /// (libvirt); restore into the guest writes through it. `None`: the host agent uses its
    /// own client ([`guest_agent_of`](Self::guest_agent_of), or the VM's socket).
    fn agent_commands(&self, _vm: VmId) -> Option<std::sync::Arc<dyn crate::qga::AgentCommands>> {
        None
    }
    /// The guest as its agent reports it, for drivers that reach the agent through their VM
    /// manager rather than a socket of their own (libvirt owns its domains' agent channel).
    /// `None`: the host agent asks the guest agent itself.
    fn guest_status(
        &self,
        _vm: VmId,
        _timeout: Duration,
    ) -> Option<BoxFuture<'_, cairn_api::host::GuestStatus>> {
        None
    }
}
