//! The fake host agent and the connector that hands out fake agents by name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_api::host::{
    DeletedSnapshot, DeletedState, DiskBacking, ExecRequest, ExecResult, GuestFileWrite,
    GuestFileWritten, GuestStatus, ResourceUsage, SaveStateRequest, SavedState, SnapshotKind,
    SnapshotRequest, StoppedVm, VmDisk, VmHandle, VmId, VmInfo, VmSnapshot, VmSnapshotId, VmSpec,
    VmState,
};
use cairn_api::manager::Registration;
use cairn_api::{AgentConnector, CallResult, HostAgentApi, StorageAgentApi};

use crate::{FakeStorage, Fault, Script, lock, not_found, refused};

/// A running VM as a host agent reports it, with the host's id `id`.
pub fn vm_info(spec: VmSpec, id: &str) -> VmInfo {
    VmInfo {
        unprotected: Vec::new(),
        handle: VmHandle {
            origin: Default::default(),
            id: id.parse().expect("a VM id"),
            name: spec.name.clone(),
            pid: 1,
            qmp_socket: PathBuf::from("/q"),
            qga_socket: PathBuf::from("/g"),
            disks: spec
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| VmDisk {
                    id: d.id.clone(),
                    node_name: format!("disk{i}"),
                    backing: DiskBacking::Image {
                        path: d.path.clone(),
                        format: d.format,
                    },
                    read_only: false,
                })
                .collect(),
        },
        spec,
        state: VmState::Running {
            status: "running".into(),
            cpus_running: true,
        },
    }
}

/// A host agent running `vms`; records the snapshots it deleted.
#[derive(Debug)]
pub struct FakeHost {
    pub script: Script,
    pub vms: Mutex<Vec<VmInfo>>,
    pub deleted: Mutex<Vec<VmSnapshotId>>,
}

impl FakeHost {
    pub fn new(vms: Vec<VmInfo>) -> Self {
        Self {
            script: Script::default(),
            vms: Mutex::new(vms),
            deleted: Mutex::default(),
        }
    }

    fn find(&self, vm: VmId) -> CallResult<VmInfo> {
        match lock(&self.vms).iter().find(|v| v.handle.id == vm) {
            Some(v) => Ok(v.clone()),
            None => not_found(format!("VM {vm} not found")),
        }
    }
}

const HOST_URL: &str = "https://host.fake:1";

impl HostAgentApi for FakeHost {
    fn vms(&self) -> CallResult<Vec<VmInfo>> {
        self.script.enter("vms", HOST_URL)?;
        Ok(lock(&self.vms).clone())
    }
    fn start_vm(&self, _: &VmSpec) -> CallResult<VmInfo> {
        refused()
    }
    fn stop_vm(&self, _: VmId, _: Option<Duration>) -> CallResult<StoppedVm> {
        refused()
    }
    fn snapshot(&self, vm: VmId, req: &SnapshotRequest) -> CallResult<VmSnapshot> {
        self.script.enter("snapshot", HOST_URL)?;
        let v = self.find(vm)?;
        let loc = crate::vm_location(&v.spec.name, "host", "none", &[]);
        let mut s = crate::manager::vm_snapshot(
            "8000000000000002".parse().expect("an id"),
            &loc,
            req.kind.unwrap_or(SnapshotKind::Fleecing),
        );
        s.vm = vm;
        Ok(s)
    }
    fn delete_snapshot(&self, id: VmSnapshotId) -> CallResult<DeletedSnapshot> {
        self.script.enter("delete_snapshot", HOST_URL)?;
        lock(&self.deleted).push(id);
        Ok(DeletedSnapshot {
            snapshot: id,
            vm: "8000000000000001".parse().expect("an id"),
            lifetime_ms: 42,
        })
    }
    fn save_state(&self, _: VmId, _: &SaveStateRequest) -> CallResult<SavedState> {
        refused()
    }
    fn saved_state(&self, _: &str) -> CallResult<Vec<u8>> {
        refused()
    }
    fn delete_saved_state(&self, _: &str) -> CallResult<DeletedState> {
        refused()
    }
    fn usage(&self, _: VmId) -> CallResult<ResourceUsage> {
        refused()
    }
    fn guest(&self, _: VmId, _: u64) -> CallResult<GuestStatus> {
        refused()
    }
    fn guest_exec(&self, _: VmId, _: &ExecRequest) -> CallResult<ExecResult> {
        refused()
    }
    fn write_guest_file(&self, _: VmId, _: &GuestFileWrite) -> CallResult<GuestFileWritten> {
        refused()
    }
}

/// Hands out fake agents by registered name; an agent marked down refuses the connection,
/// an agent it does not know too.
#[derive(Debug, Default)]
pub struct FakeAgents {
    hosts: Mutex<BTreeMap<String, Arc<FakeHost>>>,
    storage: Mutex<BTreeMap<String, Arc<FakeStorage>>>,
    down: Mutex<BTreeSet<String>>,
}

impl FakeAgents {
    pub fn host(self, name: &str, host: Arc<FakeHost>) -> Self {
        lock(&self.hosts).insert(name.into(), host);
        self
    }

    pub fn storage(self, storage: Arc<FakeStorage>) -> Self {
        lock(&self.storage).insert(storage.name.clone(), storage);
        self
    }

    /// Makes agent `name` refuse (or accept again) connections.
    pub fn set_down(&self, name: &str, down: bool) {
        if down {
            lock(&self.down).insert(name.into());
        } else {
            lock(&self.down).remove(name);
        }
    }

    fn check(&self, r: &Registration) -> CallResult<()> {
        if lock(&self.down).contains(&r.name) {
            return Err(Fault::Down.error(&r.url));
        }
        Ok(())
    }
}

impl AgentConnector for FakeAgents {
    fn host_agent(&self, r: &Registration) -> CallResult<Arc<dyn HostAgentApi>> {
        self.check(r)?;
        match lock(&self.hosts).get(&r.name) {
            Some(h) => Ok(h.clone()),
            None => Err(Fault::Down.error(&r.url)),
        }
    }

    fn storage_agent(&self, r: &Registration) -> CallResult<Arc<dyn StorageAgentApi>> {
        self.check(r)?;
        match lock(&self.storage).get(&r.name) {
            Some(s) => Ok(s.clone()),
            None => Err(Fault::Down.error(&r.url)),
        }
    }
}
