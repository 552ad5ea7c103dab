//! The driver's state directory: what survives an agent restart.
//!
//! ```text
//! STATE/
//!   vms/<vm id>/vm.json          VmRecord: spec, pid, socket paths (the registry)
//!   vms/<vm id>/{qmp,qga,nbd}.sock, serial.log, qemu.log
//!   journal/<snapshot id>.json   JournalEntry: one in-flight VM snapshot
//!   checkpoints.json             per disk path: the ordered checkpoints and the disk size at each
//!   scratch/                     default place for fleecing scratch images
//! ```
//!
//! Every JSON file is written whole to a temporary name, fsynced, renamed over the old one and
//! the directory fsynced ([`write_json`]): a crash leaves the old or the new file, never half.
//! A journal entry is durable **before** the first QEMU object of its snapshot exists and is
//! removed only after the last one is gone, so `recover()` always knows what to tear down.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use cairn_api::host::VmDisk;
use cairn_api::host::VmOrigin;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::driver::{DriverError, SnapshotKind};
use crate::spec::{CheckpointId, VmId, VmSnapshotId, VmSpec};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `value` as JSON to `path` atomically and durably
/// ([`cairn_types::durable::write_atomic`]: temp file, fsync, rename, fsync dir).
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), DriverError> {
    let data = serde_json::to_vec_pretty(value).expect("state types always serialize");
    cairn_types::durable::write_atomic(path, &data).map_err(io_err(path))
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, DriverError> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| DriverError::Corrupt {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Removes a file and fsyncs its directory; a missing file is fine.
pub(crate) fn remove_file(path: &Path) -> Result<(), DriverError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    }
    if let Some(dir) = path.parent() {
        cairn_types::durable::sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(())
}

/// One VM in the registry (`vms/<id>/vm.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VmRecord {
    pub id: VmId,
    pub spec: VmSpec,
    pub pid: u32,
    pub qmp_socket: PathBuf,
    pub qga_socket: PathBuf,
    pub started_at_ms: u64,
    pub disks: Vec<VmDisk>,
    /// Cairn's own, or an adopted QEMU (never recorded here, rediscovered at each start).
    #[serde(default)]
    pub origin: VmOrigin,
    /// Adopted VMs: why a disk could not be mapped; a snapshot is refused while non-empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmapped: Vec<String>,
    /// Adopted VMs: the process's start time (`/proc/<pid>/stat` field 22), so a recycled PID
    /// is never taken for the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
}

/// Where a snapshot is in its life (see the crate docs' diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Phase {
    /// Being created: on recovery, tear down *and* roll the checkpoint back.
    Creating,
    /// Handed to the caller: on recovery, tear down and keep the checkpoint.
    Active,
}

/// The QEMU objects of one disk of a snapshot. Every name exists in the plan before QEMU sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DiskPlan {
    pub disk_id: String,
    pub node: String,
    pub path: PathBuf,
    /// Fleecing: scratch qcow2 node and file, backup job, export id and export name.
    pub scratch_node: Option<String>,
    pub scratch_file: Option<PathBuf>,
    pub job: Option<String>,
    pub export_id: Option<String>,
    pub export_name: Option<String>,
    /// Overlay: node and file.
    pub overlay_node: Option<String>,
    pub overlay_file: Option<PathBuf>,
    /// The new checkpoint's bitmap, when this disk takes part in change tracking.
    pub new_bitmap: Option<String>,
    /// The disabled export copy (the changes since the requested checkpoint).
    pub copy_bitmap: Option<String>,
    /// Checkpoint bitmaps the transaction disables (restored on rollback).
    pub disabled: Vec<String>,
}

/// One in-flight VM snapshot (`journal/<snapshot id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JournalEntry {
    pub snapshot: VmSnapshotId,
    pub vm: VmId,
    pub kind: SnapshotKind,
    pub phase: Phase,
    pub checkpoint: Option<CheckpointId>,
    pub created_at_ms: u64,
    /// Set once our `nbd-server-start` succeeded: teardown stops only a server we started.
    #[serde(default)]
    pub nbd_started: bool,
    pub disks: Vec<DiskPlan>,
}

/// A checkpoint as remembered for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CheckpointRecord {
    pub id: CheckpointId,
    /// Virtual size of the disk when the checkpoint was taken.
    pub size: u64,
    pub created_at_ms: u64,
}

/// `checkpoints.json`: per disk path, checkpoints oldest first.
pub(crate) type CheckpointStore = std::collections::BTreeMap<String, Vec<CheckpointRecord>>;

/// Paths inside the state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> Result<Self, DriverError> {
        for sub in ["vms", "journal", "scratch"] {
            let d = root.join(sub);
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn vm_dir(&self, id: VmId) -> PathBuf {
        self.root.join("vms").join(id.to_string())
    }

    pub fn scratch_dir(&self) -> PathBuf {
        self.root.join("scratch")
    }

    fn journal_path(&self, id: VmSnapshotId) -> PathBuf {
        self.root.join("journal").join(format!("{id}.json"))
    }

    pub fn save_vm(&self, rec: &VmRecord) -> Result<(), DriverError> {
        write_json(&self.vm_dir(rec.id).join("vm.json"), rec)
    }

    pub fn remove_vm(&self, id: VmId) -> Result<(), DriverError> {
        let dir = self.vm_dir(id);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Every VM record; unreadable ones are reported, not skipped.
    pub fn load_vms(&self) -> Result<Vec<VmRecord>, DriverError> {
        let dir = self.root.join("vms");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            if let Some(rec) = read_json::<VmRecord>(&e.path().join("vm.json"))? {
                out.push(rec);
            }
        }
        out.sort_by_key(|r| r.started_at_ms);
        Ok(out)
    }

    pub fn save_journal(&self, j: &JournalEntry) -> Result<(), DriverError> {
        write_json(&self.journal_path(j.snapshot), j)
    }

    pub fn remove_journal(&self, id: VmSnapshotId) -> Result<(), DriverError> {
        remove_file(&self.journal_path(id))
    }

    pub fn load_journal(&self) -> Result<Vec<JournalEntry>, DriverError> {
        let dir = self.root.join("journal");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let p = e.map_err(io_err(&dir))?.path();
            if p.extension().is_some_and(|x| x == "json")
                && let Some(j) = read_json::<JournalEntry>(&p)?
            {
                out.push(j);
            }
        }
        out.sort_by_key(|j| j.created_at_ms);
        Ok(out)
    }

    pub fn load_checkpoints(&self) -> Result<CheckpointStore, DriverError> {
        Ok(read_json(&self.root.join("checkpoints.json"))?.unwrap_or_default())
    }

    pub fn save_checkpoints(&self, s: &CheckpointStore) -> Result<(), DriverError> {
        write_json(&self.root.join("checkpoints.json"), s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_files_are_replaced_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a/b.json");
        write_json(&p, &vec![1, 2, 3]).unwrap();
        write_json(&p, &vec![4]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&p).unwrap(), Some(vec![4]));
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("b.json")]);
        remove_file(&p).unwrap();
        remove_file(&p).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&p).unwrap(), None);
        fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            read_json::<Vec<i32>>(&p),
            Err(DriverError::Corrupt { .. })
        ));
    }
}
