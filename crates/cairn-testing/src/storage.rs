//! The fake storage agent: answers backups, unit snapshots and restores, and records them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_api::storage::{
    AgentStats, BackupsRequest, ChangeSource, DatastoreInfo, Deleted, DiskBackup,
    DiskBackupOutcome, DiskInfo, DiskKind, DiskRef, DiskRestoreRequest, DiskSnapshot,
    FileRestoreRequest, FileRestored, RdmRestore, RdmRestoreRequest, ReadFileRequest, ReadStats,
    RestoreReport, ScanRequest, ScanResult, StorageUnit, UnitSnapshot, UnitSnapshotRequest,
    VaultSnapshot,
};
use cairn_api::{CallResult, StorageAgentApi};
use cairn_http::{ApiError, ErrorKind};
use cairn_types::DiskFormat;

use crate::{Script, lock, refused};

/// The datastore `ds` at `/ds` on a reflink-capable unit `dev:8:1`, holding `disks`.
pub fn datastore(disks: &[&str]) -> DatastoreInfo {
    DatastoreInfo {
        name: "ds".into(),
        path: "/ds".into(),
        unit: StorageUnit {
            id: "dev:8:1".into(),
            device: 2049,
            mount_point: "/".into(),
            fs_type: "xfs".into(),
            fs_magic: 0x5846_5342,
            reflink_capable: true,
        },
        disks: disks
            .iter()
            .map(|id| DiskInfo {
                id: id.to_string(),
                path: PathBuf::from("/ds").join(id),
                kind: if id.starts_with("luns/") {
                    DiskKind::Lun
                } else {
                    DiskKind::Image
                },
                format: DiskFormat::Qcow2,
                virtual_size: 1 << 20,
                actual_size: 1 << 16,
                backing_file: None,
                bitmaps: vec![],
                unit: "dev:8:1".into(),
            })
            .collect(),
    }
}

/// A storage agent named `name`: each call is scripted (see the crate doc).
#[derive(Debug)]
pub struct FakeStorage {
    pub name: String,
    pub script: Script,
    datastores: Mutex<Vec<DatastoreInfo>>,
    next: AtomicU64,
    /// Disks (by vault snapshot name, `vm/VM/DISK`) answered with a per-disk error.
    pub failing_disks: Mutex<BTreeSet<String>>,
    pub backups: Mutex<Vec<BackupsRequest>>,
    pub unit_snapshots: Mutex<Vec<UnitSnapshotRequest>>,
    /// Storage snapshots deleted, by id.
    pub deleted: Mutex<Vec<String>>,
    pub restores: Mutex<Vec<DiskRestoreRequest>>,
    /// Restored disks discarded after their job failed.
    pub discarded: Mutex<Vec<DiskRef>>,
}

impl FakeStorage {
    pub fn new(name: &str, datastores: Vec<DatastoreInfo>) -> Self {
        Self {
            name: name.into(),
            script: Script::default(),
            datastores: Mutex::new(datastores),
            next: AtomicU64::new(1),
            failing_disks: Mutex::default(),
            backups: Mutex::default(),
            unit_snapshots: Mutex::default(),
            deleted: Mutex::default(),
            restores: Mutex::default(),
            discarded: Mutex::default(),
        }
    }

    fn url(&self) -> String {
        format!("https://{}.fake:1", self.name)
    }

    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The ids of the unit snapshots taken, in order.
    pub fn taken(&self) -> Vec<String> {
        lock(&self.unit_snapshots)
            .iter()
            .map(|r| r.tag.clone())
            .collect()
    }
}

impl StorageAgentApi for FakeStorage {
    fn datastores(&self) -> CallResult<Vec<DatastoreInfo>> {
        self.script.enter("datastores", &self.url())?;
        Ok(lock(&self.datastores).clone())
    }

    fn snapshot_units(&self, req: &UnitSnapshotRequest) -> CallResult<Vec<UnitSnapshot>> {
        self.script.enter("snapshot_units", &self.url())?;
        lock(&self.unit_snapshots).push(req.clone());
        let id = format!("1700000000000-{:04}", self.next());
        Ok(vec![UnitSnapshot {
            id: id.clone(),
            provider: req.provider.clone(),
            tag: req.tag.clone(),
            created_ms: 1,
            unit: Some("dev:8:1".into()),
            dir: Some(PathBuf::from("/ds/.snapshots").join(&id)),
            window_us: 10,
            disks: req
                .disks
                .iter()
                .map(|d| DiskSnapshot {
                    disk: PathBuf::from("/").join(&d.datastore).join(&d.disk),
                    image: PathBuf::from("/ds/.snapshots").join(&id).join(&d.disk),
                    format: DiskFormat::Qcow2,
                    internal: None,
                    size: 1 << 20,
                })
                .collect(),
        }])
    }

    fn snapshots(&self) -> CallResult<Vec<UnitSnapshot>> {
        self.script.enter("snapshots", &self.url())?;
        Ok(vec![])
    }

    fn delete_snapshot(&self, id: &str) -> CallResult<Deleted> {
        self.script.enter("delete_snapshot", &self.url())?;
        lock(&self.deleted).push(id.into());
        Ok(Deleted { deleted: id.into() })
    }

    fn backups(&self, req: &BackupsRequest) -> CallResult<Vec<DiskBackupOutcome>> {
        self.script.enter("backups", &self.url())?;
        lock(&self.backups).push(req.clone());
        let failing = lock(&self.failing_disks).clone();
        Ok(req
            .disks
            .iter()
            .map(|j| {
                if failing.contains(&j.request.name) {
                    return DiskBackupOutcome::Error(ApiError::new(
                        ErrorKind::InsufficientStorage,
                        "vault full",
                    ));
                }
                let id = format!("{:032x}", self.next());
                DiskBackupOutcome::Ok(DiskBackup {
                    manifest: VaultSnapshot {
                        id: id.parse().expect("a snapshot id"),
                        name: j.request.name.clone(),
                        created_ms: 1,
                        size: 1 << 20,
                        parent: None,
                        labels: j.request.labels.clone(),
                    },
                    change_source: ChangeSource::Full,
                    changed_bytes: 1 << 20,
                    bytes_read: 1 << 20,
                    bytes_sent: 4096,
                    fallbacks: vec![],
                })
            })
            .collect())
    }

    fn restore(&self, req: &DiskRestoreRequest) -> CallResult<RestoreReport> {
        self.script.enter("restore", &self.url())?;
        lock(&self.restores).push(req.clone());
        Ok(RestoreReport {
            snapshot: req.snapshot.clone(),
            size: 1 << 20,
            bytes_compared: 0,
            bytes_fetched: 4096,
            bytes_written: 4096,
            regions_written: 1,
            zero_bytes: (1 << 20) - 4096,
            duration_ms: 1,
            ..Default::default()
        })
    }

    fn discard_restored(&self, disk: &DiskRef) -> CallResult<Deleted> {
        self.script.enter("discard_restored", &self.url())?;
        lock(&self.discarded).push(disk.clone());
        Ok(Deleted {
            deleted: format!("{}/{}", disk.datastore, disk.disk),
        })
    }

    fn restore_rdm(&self, _: &RdmRestoreRequest) -> CallResult<RdmRestore> {
        refused()
    }

    fn scan_files(&self, _: &ScanRequest) -> CallResult<ScanResult> {
        refused()
    }

    fn read_file(&self, _: &ReadFileRequest) -> CallResult<(Vec<u8>, ReadStats)> {
        refused()
    }

    fn restore_file(&self, _: &FileRestoreRequest) -> CallResult<FileRestored> {
        refused()
    }

    fn stats(&self) -> CallResult<AgentStats> {
        self.script.enter("stats", &self.url())?;
        Ok(AgentStats::default())
    }
}
