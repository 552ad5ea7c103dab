//! Foundations of Cairn's host agent for QEMU: a QMP client, a guest-agent client and a helper
//! that runs QEMU processes.
//!
//! | module | talks to | over |
//! |---|---|---|
//! | [`qmp`] | QEMU (`qemu-system-x86_64`, `qemu-storage-daemon`) | the QMP unix socket |
//! | [`qga`] | `qemu-ga` inside the guest | the host end of its virtio-serial chardev socket |
//! | [`process`] | — | starts QEMU with a private runtime dir, kills it by PID on drop |
//!
//! # Invariants
//!
//! - **No call waits without a bound.** Every QMP command, every event wait and every
//!   guest-agent exchange has a timeout and fails with a typed `Timeout` error when it passes.
//!   A guest agent that never answers (absent, hung, frozen guest) costs at most that timeout.
//! - **QEMU dying is an error, not a hang.** When QEMU exits or crashes, the QMP socket reaches
//!   EOF: every command in flight and every event waiter fails at once with
//!   [`qmp::QmpError::Disconnected`], as does every later call. The guest-agent client reports
//!   [`qga::QgaError::Disconnected`] and reconnects on its next call.
//! - **Events are never missed between a command and its wait.** The QMP client buffers events
//!   from the moment it connects; [`qmp::QmpClient::wait_event`] consumes the oldest matching
//!   buffered event, so `execute("block-commit")` followed by `wait_event("BLOCK_JOB_READY")` is
//!   race free.
//! - **Newer QEMU never breaks parsing.** Messages are handled as `serde_json::Value`; unknown
//!   fields, events, error classes and enum values are kept or ignored, never rejected.
//! - **Untrusted input is bounded.** A single message from QEMU or the guest agent is capped at
//!   32 MiB; a longer one ends the connection.
//! - Libraries never start a tokio runtime; the caller provides one (any flavour).

pub mod driver;
pub mod process;
pub mod qemu;
pub mod qga;
pub mod qmp;
pub mod spec;
mod state;
mod wire;

pub use driver::{
    BoxFuture, Changes, DiskIo, DiskSnapshot, DiskSource, DriverError, HypervisorDriver,
    KnownChanges, Quiesce, QuiescePolicy, ResourceUsage, SavedState, SnapshotKind, SnapshotOptions,
    UnknownReason, VcpuUsage, VmHandle, VmInfo, VmSnapshot, VmState,
};
pub use qemu::{QemuDriver, QemuDriverOptions};
pub use spec::{
    BootSpec, CheckpointId, DiskBacking, DiskBus, DiskFormat, DiskSpec, NicSpec, VmId,
    VmSnapshotId, VmSpec,
};
pub use state::VmDisk;

pub use process::{ProcessError, QemuCommand, QemuKind, QemuProcess, find_program};
pub use qga::{
    FreezeStatus, GuestAgent, GuestExec, GuestExecStatus, GuestFsInfo, QgaError, QgaOptions,
};
pub use qmp::{QmpClient, QmpError, QmpErrorClass, QmpEvent, QmpGreeting, QmpOptions, VmStatus};
