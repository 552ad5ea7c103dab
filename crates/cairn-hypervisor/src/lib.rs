//! Cairn's host agent for QEMU: the hypervisor driver ([`HypervisorDriver`], [`QemuDriver`]) on
//! top of a QMP client, a guest-agent client and a QEMU process helper.
//!
//! | module | what |
//! |---|---|
//! | [`driver`] | the driver trait and its data: snapshots, changes, usage, errors |
//! | [`spec`] | [`VmSpec`], the VM attributes a backup stores, and the QEMU command line |
//! | [`qemu`] | [`QemuDriver`]: VMs, snapshots, checkpoints, recovery, execution state; adopting running QEMU processes ([`qemu::adopt`]) |
//! | [`qmp`] / [`qga`] | QEMU (QMP unix socket) / `qemu-ga` (virtio-serial chardev socket) |
//! | [`process`] | a throw-away QEMU with a private runtime dir, killed by PID on drop (tests) |
//! | [`service`] | the host agent's HTTPS API over a driver (`cairn host-agent`); route table there |
//!
//! # Snapshot lifecycle
//!
//! ```text
//!            journal written (Creating)            transaction done, exports up
//!  (none) ──────────────────────────────> Creating ─────────────────────────────> Active
//!     ^                                       │ any error: teardown + checkpoint     │
//!     │                                       │ rollback at once, journal removed    │ delete_snapshot
//!     └───────────────────────────────────────┴──────────────────────────────────────┘
//!                         recover() after an agent crash: same teardown
//! ```
//!
//! 1. **Plan**: inspect each disk's checkpoint bitmaps (removing `inconsistent` ones), decide
//!    [`Changes`], name every temporary object (`cx<kind>-<snapshot>-<disk>`), write the journal
//!    entry durably (temp + fsync + rename + dir fsync).
//! 2. **Fleecing**: create qcow2 scratch images and `blockdev-add` them backed by the disks.
//! 3. **Quiesce**: `guest-ping` bounded by [`SnapshotOptions::agent_timeout`] (default 2 s); when
//!    it answers, `guest-fsfreeze-freeze`, else `stop` (only if the vCPUs run). A guard undoes it —
//!    thaw or `cont` — on every path, also when the future is dropped.
//! 4. **One `transaction`** over all disks: add the new persistent checkpoint bitmap
//!    `cairn-<id>`, add a disabled export copy and merge the checkpoint chain since
//!    `options.since` into it, disable the previous checkpoint, and either `blockdev-backup
//!    sync=none` into the scratch node (fleecing) or `blockdev-snapshot-sync` (overlay).
//! 5. **Release** the quiesce; the window is reported (`quiesce_window_ms`).
//! 6. **Fleecing**: `nbd-server-start` on `STATE/vms/<vm>/nbd.sock`, one read-only export per disk
//!    named by the disk id, carrying the copy bitmap (`qemu:dirty-bitmap:<copy>`).
//! 7. Journal → `Active`, checkpoint recorded with the disk size in `checkpoints.json`; the
//!    oldest checkpoints beyond [`QemuDriverOptions::max_checkpoints`] are removed.
//!
//! **Delete** (and recovery): exports deleted, backup jobs cancelled, scratch nodes and copy
//! bitmaps removed, the NBD server stopped if we started it; overlays committed (`block-commit`
//! → ready → `job-complete` → `BLOCK_JOB_COMPLETED`, each wait bounded). A snapshot that never
//! reached `Active` also has its checkpoint rolled back (the new bitmap merged into the one it
//! replaced, which records again). With the VM gone, only files remain: overlays are committed
//! offline (`qemu-img commit`), scratch files deleted. `recover()` additionally sweeps every
//! running VM for objects with our prefix that no journal names.
//!
//! # Change tracking failure cases
//!
//! | situation | result |
//! |---|---|
//! | no `since` | `Unknown(NoPreviousCheckpoint)`; a first checkpoint starts |
//! | bitmap gone, raw or read-only disk, QEMU killed before it ever stored the bitmap | `Unknown(BitmapMissing)` |
//! | QEMU killed after the bitmap was stored: it reloads `inconsistent` | removed; `Unknown(BitmapInconsistent)` |
//! | disk size differs from the size recorded at the checkpoint | `Unknown(DiskResized)` |
//!
//! Unknown changes never fail a backup; the caller reads the whole disk. A partially known chain
//! is reported unknown, never as a short incremental.
//!
//! # Invariants
//!
//! - **No call waits without a bound.** Every QMP command, event wait, job wait, migration and
//!   guest-agent exchange has a timeout and fails with a typed `Timeout` error when it passes.
//! - **QEMU dying is an error, not a hang**: QMP EOF fails every pending call with
//!   [`qmp::QmpError::Disconnected`].
//! - **No orphans**: a journal entry exists before the first QEMU object of a snapshot and is
//!   removed after the last one; a failed cleanup keeps the entry for `recover()`.
//! - **VMs outlive the agent**: own process group, registry in `STATE/vms/<id>/vm.json`;
//!   a PID is signalled only while `/proc/<pid>/cmdline` names the VM's QMP socket.
//! - **Always `-accel tcg`** and never a real network (`-nic none` or `user,restrict=on`).
//! - Messages are parsed as `serde_json::Value`: newer QEMU never breaks parsing; single
//!   messages are capped at 32 MiB.
//! - Libraries never start a tokio runtime; the caller provides one.

pub mod driver;
pub mod process;
pub mod qemu;
pub mod qga;
pub mod qmp;
pub mod service;
pub mod spec;
mod state;
mod wire;

pub use driver::{
    BoxFuture, Changes, DiskIo, DiskSnapshot, DiskSource, DriverError, HypervisorDriver,
    KnownChanges, Quiesce, QuiescePolicy, ResourceUsage, SavedState, SnapshotKind, SnapshotOptions,
    UnknownReason, VcpuUsage, VmHandle, VmInfo, VmOrigin, VmSnapshot, VmState,
};
pub use qemu::adopt::{AdoptSource, adopted_id};
pub use qemu::{QemuDriver, QemuDriverOptions};
pub use spec::{
    BootSpec, CheckpointId, DiskBacking, DiskBus, DiskFormat, DiskSpec, DiskSpecExt, NicSpec, VmId,
    VmSnapshotId, VmSpec,
};
pub use state::VmDisk;

pub use process::{ProcessError, QemuCommand, QemuKind, QemuProcess, find_program};
pub use qga::{
    FreezeStatus, GuestAgent, GuestExec, GuestExecStatus, GuestFsInfo, QgaError, QgaOptions,
};
pub use qmp::{QmpClient, QmpError, QmpErrorClass, QmpEvent, QmpGreeting, QmpOptions, VmStatus};
