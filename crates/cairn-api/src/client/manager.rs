//! The manager's client, and the heartbeat loop agents run.

use std::io::Read;
use std::time::Duration;

use cairn_http::{Client, ClientError, Trust};

use super::{CallResult, seg};
use crate::host::{
    DeletedSnapshot, DeletedState, ExecRequest, ExecResult, GuestFileWrite, GuestFileWritten,
    GuestStatus, ResourceUsage, SaveStateRequest, SavedState, SnapshotRequest, StoppedVm, VmInfo,
    VmSnapshot, VmSnapshotId, VmSpec,
};
use crate::manager::{AgentKind, AgentRecord, Registration, RemovedAgent, VmLocation};

/// The manager's calls: the registry, the VM map, and the host-agent calls it relays to the
/// host running a VM (by VM name) or to a host by name.
pub trait ManagerApi: Send + Sync {
    /// `POST /v1/agents`: registers or refreshes an agent.
    fn heartbeat(&self, r: &Registration) -> CallResult<AgentRecord>;
    /// `GET /v1/agents`.
    fn agents(&self) -> CallResult<Vec<AgentRecord>>;
    /// `GET /v1/agents/{kind}/{name}`: a live agent's registration (with its credentials).
    fn agent(&self, kind: AgentKind, name: &str) -> CallResult<AgentRecord>;
    /// `DELETE /v1/agents/{kind}/{name}`.
    fn remove_agent(&self, kind: AgentKind, name: &str) -> CallResult<RemovedAgent>;
    /// `GET /v1/vms`.
    fn vms(&self) -> CallResult<Vec<VmLocation>>;
    /// `GET /v1/vms/{vm}`.
    fn vm(&self, name: &str) -> CallResult<VmLocation>;
    /// `POST /v1/vms/{vm}/snapshots`, relayed to the VM's host agent.
    fn snapshot(&self, vm: &str, req: &SnapshotRequest) -> CallResult<VmSnapshot>;
    /// `DELETE /v1/hosts/{host}/snapshots/{id}`.
    fn delete_snapshot(&self, host: &str, id: VmSnapshotId) -> CallResult<DeletedSnapshot>;
    /// `POST /v1/vms/{vm}/state`: saves the execution state under `name` on its host.
    fn save_state(&self, vm: &str, name: &str) -> CallResult<SavedState>;
    /// `GET /v1/hosts/{host}/saved/{name}`: streams a saved execution state.
    fn saved_state(&self, host: &str, name: &str) -> CallResult<Box<dyn Read + Send + Sync>>;
    /// `DELETE /v1/hosts/{host}/saved/{name}`.
    fn delete_saved_state(&self, host: &str, name: &str) -> CallResult<DeletedState>;
    /// `GET /v1/vms/{vm}/usage`.
    fn usage(&self, vm: &str) -> CallResult<ResourceUsage>;
    /// `GET /v1/vms/{vm}/guest?timeout_ms=`.
    fn guest(&self, vm: &str, timeout_ms: u64) -> CallResult<GuestStatus>;
    /// `POST /v1/vms/{vm}/guest/exec`: runs a shell command in the VM's guest.
    fn guest_exec(&self, vm: &str, shell: &str) -> CallResult<ExecResult>;
    /// `POST /v1/vms/{vm}/guest/files`: relayed to the VM's host agent.
    fn write_guest_file(&self, vm: &str, req: &GuestFileWrite) -> CallResult<GuestFileWritten>;
    /// `POST /v1/hosts/{host}/vms`: starts a VM on `host`.
    fn provision(&self, host: &str, spec: &VmSpec) -> CallResult<VmInfo>;
    /// `DELETE /v1/vms/{vm}`.
    fn stop_vm(&self, vm: &str) -> CallResult<StoppedVm>;
}

/// [`ManagerApi`] over HTTPS.
#[derive(Clone)]
pub struct ManagerClient {
    http: Client,
}

impl std::fmt::Debug for ManagerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerClient")
            .field("base", &self.http.base())
            .finish()
    }
}

impl ManagerClient {
    pub fn new(url: &str, token: &str, trust: &Trust) -> Result<Self, ClientError> {
        Ok(Self {
            http: Client::new(url, token, trust)?,
        })
    }

    /// The underlying HTTP client (base URL, raw calls in tests).
    pub fn http(&self) -> &Client {
        &self.http
    }
}

impl ManagerApi for ManagerClient {
    fn heartbeat(&self, r: &Registration) -> CallResult<AgentRecord> {
        self.http.post_json("/v1/agents", r)
    }

    fn agents(&self) -> CallResult<Vec<AgentRecord>> {
        self.http.get_json("/v1/agents")
    }

    fn agent(&self, kind: AgentKind, name: &str) -> CallResult<AgentRecord> {
        self.http
            .get_json(&format!("/v1/agents/{kind}/{}", seg(name)))
    }

    fn remove_agent(&self, kind: AgentKind, name: &str) -> CallResult<RemovedAgent> {
        self.http
            .delete_json(&format!("/v1/agents/{kind}/{}", seg(name)))
    }

    fn vms(&self) -> CallResult<Vec<VmLocation>> {
        self.http.get_json("/v1/vms")
    }

    fn vm(&self, name: &str) -> CallResult<VmLocation> {
        self.http.get_json(&format!("/v1/vms/{}", seg(name)))
    }

    fn snapshot(&self, vm: &str, req: &SnapshotRequest) -> CallResult<VmSnapshot> {
        self.http
            .post_json(&format!("/v1/vms/{}/snapshots", seg(vm)), req)
    }

    fn delete_snapshot(&self, host: &str, id: VmSnapshotId) -> CallResult<DeletedSnapshot> {
        self.http
            .delete_json(&format!("/v1/hosts/{}/snapshots/{id}", seg(host)))
    }

    fn save_state(&self, vm: &str, name: &str) -> CallResult<SavedState> {
        self.http.post_json(
            &format!("/v1/vms/{}/state", seg(vm)),
            &SaveStateRequest {
                name: Some(name.to_string()),
            },
        )
    }

    fn saved_state(&self, host: &str, name: &str) -> CallResult<Box<dyn Read + Send + Sync>> {
        self.http
            .get_reader(&format!("/v1/hosts/{}/saved/{}", seg(host), seg(name)))
    }

    fn delete_saved_state(&self, host: &str, name: &str) -> CallResult<DeletedState> {
        self.http
            .delete_json(&format!("/v1/hosts/{}/saved/{}", seg(host), seg(name)))
    }

    fn usage(&self, vm: &str) -> CallResult<ResourceUsage> {
        self.http.get_json(&format!("/v1/vms/{}/usage", seg(vm)))
    }

    fn guest(&self, vm: &str, timeout_ms: u64) -> CallResult<GuestStatus> {
        self.http.get_json(&format!(
            "/v1/vms/{}/guest?timeout_ms={timeout_ms}",
            seg(vm)
        ))
    }

    fn guest_exec(&self, vm: &str, shell: &str) -> CallResult<ExecResult> {
        self.http.post_json(
            &format!("/v1/vms/{}/guest/exec", seg(vm)),
            &ExecRequest {
                shell: shell.to_string(),
                timeout_ms: None,
            },
        )
    }

    fn write_guest_file(&self, vm: &str, req: &GuestFileWrite) -> CallResult<GuestFileWritten> {
        self.http
            .post_json(&format!("/v1/vms/{}/guest/files", seg(vm)), req)
    }

    fn provision(&self, host: &str, spec: &VmSpec) -> CallResult<VmInfo> {
        self.http
            .post_json(&format!("/v1/hosts/{}/vms", seg(host)), spec)
    }

    fn stop_vm(&self, vm: &str) -> CallResult<StoppedVm> {
        self.http.delete_json(&format!("/v1/vms/{}", seg(vm)))
    }
}

/// Registers `reg` with the manager now and then every `every` from a background thread,
/// for as long as the process lives. Failures are logged once and retried.
pub fn spawn_heartbeat<M: ManagerApi + 'static>(manager: M, reg: Registration, every: Duration) {
    std::thread::Builder::new()
        .name(format!("heartbeat-{}", reg.name))
        .spawn(move || {
            let mut failing = false;
            loop {
                match manager.heartbeat(&reg) {
                    Ok(_) if failing => {
                        tracing::warn!("manager reachable again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !failing {
                            tracing::warn!("heartbeat to the manager failed: {e}");
                        }
                        failing = true;
                    }
                }
                std::thread::sleep(every);
            }
        })
        .expect("spawn heartbeat thread");
}
