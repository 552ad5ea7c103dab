//! The fake manager: a fixed VM map, VM snapshots and saved states it records.

use std::io::{Cursor, Read};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_api::host::{
    Changes, DeletedSnapshot, DeletedState, DiskBacking, DiskSnapshot, DiskSource, DiskSpec,
    ExecResult, GuestFileWrite, GuestFileWritten, GuestStatus, KnownChanges, Quiesce,
    ResourceUsage, SavedState, SnapshotKind, SnapshotRequest, StoppedVm, VmDisk, VmInfo,
    VmSnapshot, VmSnapshotId, VmSpec,
};
use cairn_api::manager::{
    AgentKind, AgentRecord, DiskLocation, Registration, RemovedAgent, VmLocation, VmRunState,
};
use cairn_api::storage::DiskKind;
use cairn_api::{CallResult, ManagerApi};
use cairn_types::DiskFormat;

use crate::{Script, lock, not_found, refused};

const URL: &str = "https://manager.fake:1";

/// A running VM `name` on `host` whose disks (`vda`, ...) are `/ds/NAME-DISK.qcow2` on the
/// datastore `ds` of storage agent `agent` (a reflink-capable unit).
pub fn vm_location(name: &str, host: &str, agent: &str, disks: &[&str]) -> VmLocation {
    let file = |d: &str| format!("{name}-{d}.qcow2");
    VmLocation {
        unprotected: Vec::new(),
        origin: Default::default(),
        name: name.into(),
        host: host.into(),
        host_vm_id: "8000000000000001".parse().expect("an id"),
        state: VmRunState::Running,
        spec: VmSpec {
            domain_xml: None,
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            machine: "q35".into(),
            disks: disks
                .iter()
                .map(|d| DiskSpec::qcow2(d, format!("/ds/{}", file(d))))
                .collect(),
            nics: vec![],
            boot: Default::default(),
            start_paused: false,
        },
        disks: disks
            .iter()
            .map(|d| DiskLocation {
                disk: d.to_string(),
                path: PathBuf::from(format!("/ds/{}", file(d))),
                format: DiskFormat::Qcow2,
                lun: None,
                storage_agent: Some(agent.into()),
                datastore: Some("ds".into()),
                datastore_disk: Some(file(d)),
                kind: Some(DiskKind::Image),
                unit: Some("dev:8:1".into()),
                unit_reflink: Some(true),
            })
            .collect(),
    }
}

/// The snapshot a host agent answers for `loc`: one NBD export per disk, changes known.
pub(crate) fn vm_snapshot(id: VmSnapshotId, loc: &VmLocation, kind: SnapshotKind) -> VmSnapshot {
    VmSnapshot {
        id,
        vm: loc.host_vm_id,
        kind,
        quiesce: Quiesce::GuestFreeze,
        quiesce_window_ms: 7,
        checkpoint: Some("8000000000000003".parse().expect("an id")),
        created_at_ms: 1,
        disks: loc
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| DiskSnapshot {
                disk: VmDisk {
                    id: d.disk.clone(),
                    node_name: format!("disk{i}"),
                    backing: DiskBacking::Image {
                        path: d.path.clone(),
                        format: d.format,
                    },
                    read_only: false,
                },
                size: 1 << 20,
                source: DiskSource::Nbd {
                    socket: PathBuf::from("/run/nbd.sock"),
                    export: d.disk.clone(),
                },
                changes: Changes::Known(KnownChanges {
                    bitmaps: vec![],
                    export_bitmap: None,
                    meta_context: Some("qemu:dirty-bitmap:cx".into()),
                    dirty_bytes: 0,
                    granularity: 65536,
                }),
            })
            .collect(),
    }
}

/// The manager: a VM map, the storage agents it knows, and what it was asked to do.
#[derive(Debug)]
pub struct FakeManager {
    pub script: Script,
    vms: Mutex<Vec<VmLocation>>,
    storage_agents: Vec<String>,
    next: AtomicU64,
    /// VM snapshots taken: (VM, request, id).
    pub snapshots: Mutex<Vec<(String, SnapshotRequest, VmSnapshotId)>>,
    /// VM snapshots deleted: (host, id).
    pub deleted: Mutex<Vec<(String, VmSnapshotId)>>,
    /// Saved execution states deleted: (host, name).
    pub deleted_states: Mutex<Vec<(String, String)>>,
    /// VMs started: (host, configuration).
    pub provisioned: Mutex<Vec<(String, VmSpec)>>,
}

impl FakeManager {
    /// A manager of `vms` whose disks are on the storage agents `storage_agents`.
    pub fn new(vms: Vec<VmLocation>, storage_agents: &[&str]) -> Self {
        Self {
            script: Script::default(),
            vms: Mutex::new(vms),
            storage_agents: storage_agents.iter().map(|s| s.to_string()).collect(),
            next: AtomicU64::new(0x8000_0000_0000_0010),
            snapshots: Mutex::default(),
            deleted: Mutex::default(),
            deleted_states: Mutex::default(),
            provisioned: Mutex::default(),
        }
    }

    /// Replaces the VM map.
    pub fn set_vms(&self, vms: Vec<VmLocation>) {
        *lock(&self.vms) = vms;
    }

    /// The ids of the VM snapshots taken, in order.
    pub fn taken(&self) -> Vec<VmSnapshotId> {
        lock(&self.snapshots).iter().map(|s| s.2).collect()
    }

    /// The ids of the VM snapshots deleted, in order.
    pub fn deleted_ids(&self) -> Vec<VmSnapshotId> {
        lock(&self.deleted).iter().map(|d| d.1).collect()
    }

    fn find(&self, name: &str) -> CallResult<VmLocation> {
        match lock(&self.vms).iter().find(|v| v.name == name) {
            Some(v) => Ok(v.clone()),
            None => not_found(format!("VM {name} not found")),
        }
    }
}

impl ManagerApi for FakeManager {
    fn heartbeat(&self, _: &Registration) -> CallResult<AgentRecord> {
        refused()
    }

    fn agents(&self) -> CallResult<Vec<AgentRecord>> {
        self.script.enter("agents", URL)?;
        self.storage_agents
            .iter()
            .map(|n| self.agent(AgentKind::Storage, n))
            .collect()
    }

    fn agent(&self, kind: AgentKind, name: &str) -> CallResult<AgentRecord> {
        self.script.enter("agent", URL)?;
        if kind != AgentKind::Storage || !self.storage_agents.iter().any(|n| n == name) {
            return not_found(format!("{kind} agent {name} not found"));
        }
        Ok(AgentRecord {
            registration: Registration {
                kind,
                name: name.into(),
                url: format!("https://{name}.fake:1"),
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
        self.script.enter("vms", URL)?;
        Ok(lock(&self.vms).clone())
    }

    fn vm(&self, name: &str) -> CallResult<VmLocation> {
        self.script.enter("vm", URL)?;
        self.find(name)
    }

    fn snapshot(&self, vm: &str, req: &SnapshotRequest) -> CallResult<VmSnapshot> {
        self.script.enter("snapshot", URL)?;
        let loc = self.find(vm)?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id: VmSnapshotId = format!("{n:016x}").parse().expect("an id");
        lock(&self.snapshots).push((vm.into(), req.clone(), id));
        Ok(vm_snapshot(
            id,
            &loc,
            req.kind.unwrap_or(SnapshotKind::Fleecing),
        ))
    }

    fn delete_snapshot(&self, host: &str, id: VmSnapshotId) -> CallResult<DeletedSnapshot> {
        self.script.enter("delete_snapshot", URL)?;
        lock(&self.deleted).push((host.into(), id));
        Ok(DeletedSnapshot {
            snapshot: id,
            vm: "8000000000000001".parse().expect("an id"),
            lifetime_ms: 42,
        })
    }

    fn save_state(&self, _: &str, name: &str) -> CallResult<SavedState> {
        self.script.enter("save_state", URL)?;
        Ok(SavedState {
            path: PathBuf::from("/saved").join(name),
            bytes: 5,
            total_ms: 3,
            downtime_ms: 2,
        })
    }

    fn saved_state(&self, _: &str, _: &str) -> CallResult<Box<dyn Read + Send + Sync>> {
        self.script.enter("saved_state", URL)?;
        Ok(Box::new(Cursor::new(b"state".to_vec())))
    }

    fn delete_saved_state(&self, host: &str, name: &str) -> CallResult<DeletedState> {
        self.script.enter("delete_saved_state", URL)?;
        lock(&self.deleted_states).push((host.into(), name.into()));
        Ok(DeletedState {
            deleted: name.into(),
        })
    }

    fn usage(&self, _: &str) -> CallResult<ResourceUsage> {
        self.script.enter("usage", URL)?;
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
        self.script.enter("guest", URL)?;
        Ok(GuestStatus {
            agent: true,
            filesystems: vec![("/".into(), "ext4".into(), "vda1".into())],
            error: None,
        })
    }

    fn guest_exec(&self, _: &str, _: &str) -> CallResult<ExecResult> {
        refused()
    }

    fn write_guest_file(&self, _: &str, _: &GuestFileWrite) -> CallResult<GuestFileWritten> {
        refused()
    }

    fn provision(&self, host: &str, spec: &VmSpec) -> CallResult<VmInfo> {
        self.script.enter("provision", URL)?;
        lock(&self.provisioned).push((host.into(), spec.clone()));
        Ok(crate::vm_info(spec.clone(), "8000000000000009"))
    }

    fn stop_vm(&self, _: &str) -> CallResult<StoppedVm> {
        refused()
    }
}
