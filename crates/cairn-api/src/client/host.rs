//! The host agent's client.

use std::time::Duration;

use cairn_http::{Client, ClientError, Trust};

use super::{CallResult, seg};
use crate::host::{
    DeletedSnapshot, DeletedState, ExecRequest, ExecResult, GuestFileWrite, GuestFileWritten,
    GuestStatus, ResourceUsage, SaveStateRequest, SavedState, SnapshotRequest, StoppedVm, VmId,
    VmInfo, VmSnapshot, VmSnapshotId, VmSpec,
};

/// The host agent's calls (the manager relays the server's calls through these).
pub trait HostAgentApi: Send + Sync {
    /// `GET /v1/vms`.
    fn vms(&self) -> CallResult<Vec<VmInfo>>;
    /// `POST /v1/vms`: starts a VM.
    fn start_vm(&self, spec: &VmSpec) -> CallResult<VmInfo>;
    /// `DELETE /v1/vms/{vm}`.
    fn stop_vm(&self, vm: VmId, timeout: Option<Duration>) -> CallResult<StoppedVm>;
    /// `POST /v1/vms/{vm}/snapshots`.
    fn snapshot(&self, vm: VmId, req: &SnapshotRequest) -> CallResult<VmSnapshot>;
    /// `DELETE /v1/snapshots/{snapshot}`.
    fn delete_snapshot(&self, id: VmSnapshotId) -> CallResult<DeletedSnapshot>;
    /// `POST /v1/vms/{vm}/state`.
    fn save_state(&self, vm: VmId, req: &SaveStateRequest) -> CallResult<SavedState>;
    /// `GET /v1/saved/{name}`: the saved execution state's bytes.
    fn saved_state(&self, name: &str) -> CallResult<Vec<u8>>;
    /// `DELETE /v1/saved/{name}`.
    fn delete_saved_state(&self, name: &str) -> CallResult<DeletedState>;
    /// `GET /v1/vms/{vm}/usage`.
    fn usage(&self, vm: VmId) -> CallResult<ResourceUsage>;
    /// `GET /v1/vms/{vm}/guest?timeout_ms=`.
    fn guest(&self, vm: VmId, timeout_ms: u64) -> CallResult<GuestStatus>;
    /// `POST /v1/vms/{vm}/guest/exec`.
    fn guest_exec(&self, vm: VmId, req: &ExecRequest) -> CallResult<ExecResult>;
    /// `POST /v1/vms/{vm}/guest/files`: writes a directory or a piece of a file into the
    /// running guest through its guest agent.
    fn write_guest_file(&self, vm: VmId, req: &GuestFileWrite) -> CallResult<GuestFileWritten>;
}

/// [`HostAgentApi`] over HTTPS.
#[derive(Clone, Debug)]
pub struct HostAgentClient {
    http: Client,
}

impl HostAgentClient {
    pub fn new(url: &str, token: &str, trust: &Trust) -> Result<Self, ClientError> {
        Ok(Self::from_http(Client::new(url, token, trust)?))
    }

    pub fn from_http(http: Client) -> Self {
        Self { http }
    }
}

impl HostAgentApi for HostAgentClient {
    fn vms(&self) -> CallResult<Vec<VmInfo>> {
        self.http.get_json("/v1/vms")
    }

    fn start_vm(&self, spec: &VmSpec) -> CallResult<VmInfo> {
        self.http.post_json("/v1/vms", spec)
    }

    fn stop_vm(&self, vm: VmId, timeout: Option<Duration>) -> CallResult<StoppedVm> {
        let q = timeout.map_or(String::new(), |t| format!("?timeout_ms={}", t.as_millis()));
        self.http.delete_json(&format!("/v1/vms/{vm}{q}"))
    }

    fn snapshot(&self, vm: VmId, req: &SnapshotRequest) -> CallResult<VmSnapshot> {
        self.http.post_json(&format!("/v1/vms/{vm}/snapshots"), req)
    }

    fn delete_snapshot(&self, id: VmSnapshotId) -> CallResult<DeletedSnapshot> {
        self.http.delete_json(&format!("/v1/snapshots/{id}"))
    }

    fn save_state(&self, vm: VmId, req: &SaveStateRequest) -> CallResult<SavedState> {
        self.http.post_json(&format!("/v1/vms/{vm}/state"), req)
    }

    fn saved_state(&self, name: &str) -> CallResult<Vec<u8>> {
        self.http.get_bytes(&format!("/v1/saved/{}", seg(name)))
    }

    fn delete_saved_state(&self, name: &str) -> CallResult<DeletedState> {
        self.http.delete_json(&format!("/v1/saved/{}", seg(name)))
    }

    fn usage(&self, vm: VmId) -> CallResult<ResourceUsage> {
        self.http.get_json(&format!("/v1/vms/{vm}/usage"))
    }

    fn guest(&self, vm: VmId, timeout_ms: u64) -> CallResult<GuestStatus> {
        self.http
            .get_json(&format!("/v1/vms/{vm}/guest?timeout_ms={timeout_ms}"))
    }

    fn guest_exec(&self, vm: VmId, req: &ExecRequest) -> CallResult<ExecResult> {
        self.http
            .post_json(&format!("/v1/vms/{vm}/guest/exec"), req)
    }

    fn write_guest_file(&self, vm: VmId, req: &GuestFileWrite) -> CallResult<GuestFileWritten> {
        self.http
            .post_json(&format!("/v1/vms/{vm}/guest/files"), req)
    }
}
