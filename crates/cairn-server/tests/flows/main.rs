//! The backup flow against fake services behind the `cairn-api` traits: no QEMU, no network,
//! seconds. Each test runs one job on a fresh server and checks what it recorded and released.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::host::{
    Changes, DeletedSnapshot, DeletedState, DiskBacking, DiskSnapshot, DiskSource as VmDiskSource,
    DiskSpec, ExecResult, GuestStatus, KnownChanges, Quiesce, ResourceUsage, SavedState,
    SnapshotKind, SnapshotRequest, StoppedVm, VmDisk, VmInfo, VmSnapshot, VmSnapshotId, VmSpec,
};
use cairn_api::manager::{
    AgentKind, AgentRecord, DiskLocation, Registration, RemovedAgent, VmLocation, VmRunState,
};
use cairn_api::storage::{
    AgentStats, BackupsRequest, ChangeSource, DatastoreInfo, Deleted, DiskBackup,
    DiskBackupOutcome, DiskKind, DiskRestoreRequest, DiskSource, FileRestoreRequest, FileRestored,
    RdmRestore, RdmRestoreRequest, ReadFileRequest, ReadStats, RestoreReport, ScanRequest,
    ScanResult, UnitSnapshot, UnitSnapshotRequest, VaultSnapshot, VaultTarget,
};
use cairn_api::{AgentConnector, CallResult, HostAgentApi, ManagerApi, StorageAgentApi};
use cairn_catalog::{JobRecord, JobState};
use cairn_http::{ApiError, ClientError, ErrorKind};
use cairn_server::{JobKind, Server, ServerConfig};
use cairn_types::DiskFormat;

const SNAP: &str = "8000000000000002";

fn refused<T>() -> CallResult<T> {
    Err(ClientError::Api {
        url: "fake".into(),
        status: 500,
        api: ApiError::new(ErrorKind::Internal, "not faked"),
    })
}

fn spec() -> VmSpec {
    VmSpec {
        name: "vm1".into(),
        vcpus: 1,
        memory_mib: 64,
        machine: "q35".into(),
        disks: vec![DiskSpec::qcow2("vda", "/ds/vm1.qcow2")],
        nics: vec![],
        boot: Default::default(),
        start_paused: false,
    }
}

/// The manager: one running VM with one disk on storage agent `s1`; records deleted snapshots.
#[derive(Default)]
struct Manager {
    deleted: Mutex<Vec<VmSnapshotId>>,
}

impl ManagerApi for Manager {
    fn heartbeat(&self, _: &Registration) -> CallResult<AgentRecord> {
        refused()
    }
    fn agents(&self) -> CallResult<Vec<AgentRecord>> {
        Ok(vec![self.agent(AgentKind::Storage, "s1")?])
    }
    fn agent(&self, kind: AgentKind, name: &str) -> CallResult<AgentRecord> {
        Ok(AgentRecord {
            registration: Registration {
                kind,
                name: name.into(),
                url: "https://127.0.0.1:1".into(),
                fingerprint: "ab".repeat(32),
                token: "t".into(),
            },
            registered_ms: 0,
            last_seen_ms: 0,
            state: "live".into(),
        })
    }
    fn remove_agent(&self, _: AgentKind, _: &str) -> CallResult<RemovedAgent> {
        refused()
    }
    fn vms(&self) -> CallResult<Vec<VmLocation>> {
        Ok(vec![self.vm("vm1")?])
    }
    fn vm(&self, name: &str) -> CallResult<VmLocation> {
        if name != "vm1" {
            return Err(ClientError::Api {
                url: "fake".into(),
                status: 404,
                api: ApiError::not_found(format!("VM {name} not found")),
            });
        }
        Ok(VmLocation {
            name: "vm1".into(),
            host: "h1".into(),
            host_vm_id: "8000000000000001".parse().unwrap(),
            state: VmRunState::Running,
            spec: spec(),
            disks: vec![DiskLocation {
                disk: "vda".into(),
                path: "/ds/vm1.qcow2".into(),
                format: DiskFormat::Qcow2,
                lun: None,
                storage_agent: Some("s1".into()),
                datastore: Some("ds".into()),
                datastore_disk: Some("vm1.qcow2".into()),
                kind: Some(DiskKind::Image),
                unit: Some("dev:8:1".into()),
                unit_reflink: Some(true),
            }],
        })
    }
    fn snapshot(&self, _: &str, req: &SnapshotRequest) -> CallResult<VmSnapshot> {
        assert_eq!(req.kind, Some(SnapshotKind::Fleecing));
        Ok(VmSnapshot {
            id: SNAP.parse().unwrap(),
            vm: "8000000000000001".parse().unwrap(),
            kind: SnapshotKind::Fleecing,
            quiesce: Quiesce::GuestFreeze,
            quiesce_window_ms: 7,
            checkpoint: Some("8000000000000003".parse().unwrap()),
            created_at_ms: 1,
            disks: vec![DiskSnapshot {
                disk: VmDisk {
                    id: "vda".into(),
                    node_name: "disk0".into(),
                    backing: DiskBacking::Image {
                        path: "/ds/vm1.qcow2".into(),
                        format: DiskFormat::Qcow2,
                    },
                    read_only: false,
                },
                size: 1 << 20,
                source: VmDiskSource::Nbd {
                    socket: PathBuf::from("/run/nbd.sock"),
                    export: "vda".into(),
                },
                changes: Changes::Known(KnownChanges {
                    bitmaps: vec![],
                    export_bitmap: None,
                    meta_context: Some("qemu:dirty-bitmap:cx".into()),
                    dirty_bytes: 0,
                    granularity: 65536,
                }),
            }],
        })
    }
    fn delete_snapshot(&self, host: &str, id: VmSnapshotId) -> CallResult<DeletedSnapshot> {
        assert_eq!(host, "h1");
        self.deleted.lock().unwrap().push(id);
        Ok(DeletedSnapshot {
            snapshot: id,
            vm: "8000000000000001".parse().unwrap(),
            lifetime_ms: 42,
        })
    }
    fn save_state(&self, _: &str, _: &str) -> CallResult<SavedState> {
        refused()
    }
    fn saved_state(&self, _: &str, _: &str) -> CallResult<Box<dyn Read + Send + Sync>> {
        refused()
    }
    fn delete_saved_state(&self, _: &str, _: &str) -> CallResult<DeletedState> {
        refused()
    }
    fn usage(&self, _: &str) -> CallResult<ResourceUsage> {
        Ok(ResourceUsage {
            sampled_at_ms: 1,
            process_cpu_time_ms: 2,
            vcpus: vec![],
            memory_bytes: 64 << 20,
            rss_bytes: 1 << 20,
            disks: vec![],
        })
    }
    fn guest(&self, _: &str, _: u64) -> CallResult<GuestStatus> {
        refused()
    }
    fn guest_exec(&self, _: &str, _: &str) -> CallResult<ExecResult> {
        refused()
    }
    fn provision(&self, _: &str, _: &VmSpec) -> CallResult<VmInfo> {
        refused()
    }
    fn stop_vm(&self, _: &str) -> CallResult<StoppedVm> {
        refused()
    }
}

/// What the fake storage agent answers a backup call with.
#[derive(Clone, Copy)]
enum Answer {
    Ok,
    /// The typed client could not parse the agent's answer.
    UnknownVariant,
    /// The agent cannot be reached at all.
    Down,
}

struct Storage {
    answer: Answer,
    requests: Mutex<Vec<BackupsRequest>>,
}

impl StorageAgentApi for Storage {
    fn datastores(&self) -> CallResult<Vec<DatastoreInfo>> {
        refused()
    }
    fn snapshot_units(&self, _: &UnitSnapshotRequest) -> CallResult<Vec<UnitSnapshot>> {
        refused()
    }
    fn snapshots(&self) -> CallResult<Vec<UnitSnapshot>> {
        refused()
    }
    fn delete_snapshot(&self, _: &str) -> CallResult<Deleted> {
        refused()
    }
    fn backups(&self, req: &BackupsRequest) -> CallResult<Vec<DiskBackupOutcome>> {
        self.requests.lock().unwrap().push(req.clone());
        match self.answer {
            Answer::Ok => Ok(vec![DiskBackupOutcome::Ok(DiskBackup {
                manifest: VaultSnapshot {
                    id: "0123456789abcdef0123456789abcdef".parse().unwrap(),
                    name: "vm/vm1/vda".into(),
                    created_ms: 1,
                    size: 1 << 20,
                    parent: None,
                    labels: Default::default(),
                },
                change_source: ChangeSource::Full,
                changed_bytes: 1 << 20,
                bytes_read: 1 << 20,
                bytes_sent: 4096,
                fallbacks: vec![],
            })]),
            Answer::UnknownVariant => Err(ClientError::Decode {
                url: "https://127.0.0.1:1/v1/backups".into(),
                msg: "unknown variant `maybe`, expected `ok` or `error`".into(),
            }),
            Answer::Down => unreachable!("the connector refuses first"),
        }
    }
    fn restore(&self, _: &DiskRestoreRequest) -> CallResult<RestoreReport> {
        refused()
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
        Ok(AgentStats::default())
    }
}

struct Agents(Arc<Storage>);

impl AgentConnector for Agents {
    fn host_agent(&self, _: &Registration) -> CallResult<Arc<dyn HostAgentApi>> {
        unreachable!("the server reaches host agents through the manager")
    }
    fn storage_agent(&self, r: &Registration) -> CallResult<Arc<dyn StorageAgentApi>> {
        if let Answer::Down = self.0.answer {
            return Err(ClientError::Transport {
                url: r.url.clone(),
                msg: "connection refused".into(),
            });
        }
        Ok(self.0.clone())
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    server: Arc<Server>,
    manager: Arc<Manager>,
    storage: Arc<Storage>,
}

fn setup(answer: Answer) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let manager = Arc::new(Manager::default());
    let storage = Arc::new(Storage {
        answer,
        requests: Mutex::new(vec![]),
    });
    let config = ServerConfig {
        state_dir: dir.path().join("server"),
        metadata_dir: None,
        vault: VaultTarget {
            url: dir.path().join("vault").display().to_string(),
            token: None,
            fingerprint: None,
        },
        max_jobs: 1,
        save_state: false,
    };
    let server =
        Server::start_with(config, manager.clone(), Arc::new(Agents(storage.clone()))).unwrap();
    Setup {
        _dir: dir,
        server,
        manager,
        storage,
    }
}

fn run(s: &Setup, kind: JobKind) -> JobRecord {
    let id = cairn_server::jobs::submit(&s.server, kind).unwrap().id;
    let t = Instant::now();
    loop {
        let j = s.server.catalog.job(&id).unwrap();
        if matches!(
            j.state,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        ) {
            return j;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "job {id} hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn backup_vm1() -> JobKind {
    JobKind::Backup {
        vms: vec!["vm1".into()],
        full: false,
    }
}

#[test]
fn a_backup_sends_typed_sources_and_records_the_answer() {
    let s = setup(Answer::Ok);
    let j = run(&s, backup_vm1());
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    // The storage agent got the host agent's NBD export, with the bitmap as the change source
    // only when there is a checkpoint to compare with (none here: first backup).
    let reqs = s.storage.requests.lock().unwrap();
    let job = &reqs[0].disks[0];
    assert!(matches!(
        &job.source,
        DiskSource::Nbd { export, bitmap_context: None, .. } if export == "vda"
    ));
    assert_eq!(job.request.name, "vm/vm1/vda");
    assert_eq!(job.request.labels["vm"], "vm1");
    // Recorded, and the VM snapshot released exactly once.
    let b = s.server.catalog.latest_backup("vm1").unwrap().unwrap();
    assert_eq!(
        b.disks[0].vault_snapshot,
        "0123456789abcdef0123456789abcdef"
    );
    assert_eq!(b.disks[0].change_source, "full");
    assert_eq!(b.quiesce, "guest_freeze");
    assert_eq!(b.checkpoint.as_deref(), Some("8000000000000003"));
    assert_eq!(b.vm_snapshot_lifetime_ms, 42);
    assert_eq!(b.attributes["name"], "vm1");
    assert_eq!(s.manager.deleted.lock().unwrap().len(), 1);
    assert!(j.holds.is_empty());
}

#[test]
fn an_incremental_passes_the_checkpoint_and_the_bitmap() {
    let s = setup(Answer::Ok);
    assert_eq!(run(&s, backup_vm1()).state, JobState::Succeeded);
    assert_eq!(run(&s, backup_vm1()).state, JobState::Succeeded);
    let reqs = s.storage.requests.lock().unwrap();
    let job = &reqs[1].disks[0];
    assert!(matches!(
        &job.source,
        DiskSource::Nbd { bitmap_context: Some(c), .. } if c == "qemu:dirty-bitmap:cx"
    ));
    assert_eq!(
        job.request.parent.as_deref(),
        Some("0123456789abcdef0123456789abcdef")
    );
}

#[test]
fn an_answer_the_server_cannot_parse_fails_the_job_naming_it_and_releases() {
    let s = setup(Answer::UnknownVariant);
    let j = run(&s, backup_vm1());
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert!(e.contains("unknown variant `maybe`"), "{e}");
    assert!(e.contains("storage agent s1"), "{e}");
    assert_eq!(
        s.manager.deleted.lock().unwrap().as_slice(),
        &[SNAP.parse::<VmSnapshotId>().unwrap()]
    );
    assert!(s.server.catalog.latest_backup("vm1").unwrap().is_none());
    assert!(s.server.catalog.job(&j.id).unwrap().holds.is_empty());
}

#[test]
fn a_storage_agent_down_fails_the_job_and_releases() {
    let s = setup(Answer::Down);
    let j = run(&s, backup_vm1());
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert!(
        e.contains("storage agent s1") && e.contains("connection refused"),
        "{e}"
    );
    assert_eq!(s.manager.deleted.lock().unwrap().len(), 1);
    assert!(s.server.catalog.latest_backup("vm1").unwrap().is_none());
}

#[test]
fn an_unknown_vm_fails_before_any_snapshot() {
    let s = setup(Answer::Ok);
    let j = run(
        &s,
        JobKind::Backup {
            vms: vec!["nope".into()],
            full: false,
        },
    );
    assert_eq!(j.state, JobState::Failed);
    assert!(j.error.unwrap().contains("VM nope not found"));
    assert!(s.manager.deleted.lock().unwrap().is_empty());
    assert!(s.storage.requests.lock().unwrap().is_empty());
}
