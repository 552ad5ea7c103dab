//! The storage agent: runs where VM disks live (the primary storage), takes
//! disk and storage-unit snapshots, finds what changed since the last backup, and sends disk
//! data **straight to the vault** — the backup server only orchestrates.
//!
//! | module | what |
//! |---|---|
//! | [`datastore`] | datastores (directories of qcow2/raw images and `luns/`), disks, storage units |
//! | [`provider`] | snapshot providers behind [`SnapshotProvider`], retention |
//! | [`tracker`] | the disk change tracker ([`ChangeSource`]) and the cross-check |
//! | [`agent`] | [`StorageAgent`]: backup logic, parallel disks, fallbacks, byte counters |
//! | [`restore`] | restore to a new disk, or over an existing one writing only differences |
//! | [`rdm`] | raw device mappings: LUN id + mapping file + data |
//! | [`jobs`] | backup calls: the vault they name, each disk's source (snapshot, in place, NBD export and its bitmap, raw LUN) |
//! | [`service`] | the HTTPS service in front of the agent: HTTP only |
//! | [`qcow2`] | qcow2 header and L1/L2 tables: host file ranges → guest ranges (qcow2 `ExtentMap`) |
//! | `lastclone` | each disk's last reflink clone after a backup from a unit snapshot: the previous point of the next backup's `ExtentMap` |
//! | [`qemu`] | `qemu-img` and `qemu-nbd` (through `cairn-nbd`) |
//! | `sys` | the only `unsafe`: `FICLONE`, `FIEMAP`, `statfs` |
//!
//! # Snapshot providers
//!
//! | provider | how | cost | consistency | cleanup |
//! |---|---|---|---|---|
//! | [`Qcow2Provider`] frozen base | the host agent's external overlay froze the base; recorded only | none | the VM snapshot's (quiesced by the host agent) | the host agent merges the overlay |
//! | [`Qcow2Provider`] internal | `qemu-img snapshot -c`, read with `qemu-nbd -l` | metadata | crash-consistent; VM must be offline | `qemu-img snapshot -d` |
//! | [`ReflinkProvider`] | `FICLONE` of every disk of one unit into `UNIT/.cairn-snapshots/ID/` (targeted group snapshot) | metadata, shared extents | per disk atomic; group window reported (µs) | remove the directory |
//! | [`CopyProvider`] | sparse plain copy | **slow**: all allocated bytes, full space | per disk, only with I/O stopped | remove the directory |
//!
//! Snapshots are recorded in `STATE/snapshots/` and kept N per disk
//! ([`StorageAgent::apply_retention`]).
//!
//! # Change sources, and when each is chosen
//!
//! A backup request lists hints in order of preference; the first hint that works (and
//! passes the optional cross-check) is used. With no parent there is nothing to compare:
//! [`ChangeSource::Full`].
//!
//! | source | what it reads | cost | chosen when | fails (→ next hint) when |
//! |---|---|---|---|---|
//! | `OverlayMap` | `qemu-img map` of the frozen overlay: depth-0 extents | metadata | the host agent kept an overlay per backup interval | not an overlay |
//! | `HypervisorBitmap` | extents passed in by the host agent (QEMU dirty bitmap) | none here | the VM ran with a bitmap since the parent | never (the cross-check guards it) |
//! | `PersistentBitmap` | qcow2 bitmap via `qemu-nbd -B` + NBD block status | metadata | offline qcow2 with a bitmap since the parent | bitmap missing (lost) or `in-use` (QEMU killed) |
//! | `ExtentMap` | FIEMAP of the previous and current reflink clones: extents not shared; for qcow2 mapped to guest offsets through both clones' L1/L2 tables ([`qcow2`]) | metadata, no data read | reflink unit, raw or qcow2 disk, previous clone kept | no FIEMAP/different fs; qcow2 with backing/external data file, encrypted, resized, other cluster size, bad tables |
//! | `RecipeCompare` | the whole disk, chunked and fingerprinted against the vault | reads the disk, sends only new segments | every hint failed or none given | — (always works) |
//!
//! The chosen source, the changed byte count and the skipped hints with reasons are stored in
//! the snapshot's labels (`change_source`, `changed_bytes`, `change_fallbacks`; a qcow2
//! `ExtentMap` adds `change_mapping=qcow2_tables`) and returned in
//! [`BackupResult`]. A failed hint never fails the job.
//!
//! # Invariants
//!
//! - A tracker may over-report, never under-report; [`CrossCheck`] samples regions a tracker
//!   called unchanged and compares their fingerprints with the parent recipe.
//! - Disk data flows only agent ↔ vault, and every byte is counted ([`AgentStats`]).
//! - Restores write under a temporary name and rename when complete (new disks); a restore
//!   over a disk rewrites only segments whose fingerprint differs.
//! - Resuming a killed backup is the vault's job: durable containers of an uncommitted session
//!   are found by the retry, which therefore does not resend them.
//! - The library starts no tokio runtime: NBD connections run on the runtimes the binary
//!   hands to [`StorageAgent::new`] as an [`NbdRuntime`], driven with `Handle::block_on`
//!   from the agent's blocking threads (never from an async task).

pub mod agent;
pub mod catalog;
pub mod datastore;
pub mod error;
pub mod files;
pub mod jobs;
mod lastclone;
pub mod provider;
pub mod qcow2;
pub mod qemu;
pub mod rdm;
pub mod restore;
pub mod service;
mod sys;
pub mod tracker;

pub use agent::{AgentConfig, AgentStats, BackupRequest, BackupResult, StorageAgent};
pub use datastore::{DatastoreConfig, DatastoreInfo, DiskInfo, DiskKind, StorageUnit};
pub use error::{Result, StorageError};
pub use jobs::VaultTargetExt;
pub use provider::{
    Capabilities, CopyProvider, DiskSnapshot, DiskSnapshotExt, Qcow2Mode, Qcow2Provider,
    ReflinkProvider, RetentionPlan, SnapshotProvider, UnitSnapshot,
};
pub use qemu::{DiskFormat, NbdRuntime};
pub use rdm::{RdmBackup, RdmMapping, RdmRestore};
pub use restore::{RestoreMode, RestoreReport, RestoreRequest};
pub use sys::PhysExtent;
pub use tracker::{ChangeHint, ChangeSet, ChangeSource, CrossCheck, changed_extents, cross_check};

/// FIEMAP extent flags, for reading [`PhysExtent::flags`].
pub mod fiemap_flags {
    pub use crate::sys::flags::*;
}

/// The extent map of a file (FIEMAP, synced first).
pub fn file_extents(path: &std::path::Path) -> Result<Vec<PhysExtent>> {
    let f = std::fs::File::open(path).map_err(StorageError::io(path, "open"))?;
    sys::fiemap(&f).map_err(StorageError::io(path, "FIEMAP"))
}
