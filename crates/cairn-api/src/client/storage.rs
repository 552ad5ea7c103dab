//! The storage agent's client.

use cairn_http::{Client, ClientError, Trust};

use super::{CallResult, seg};
use crate::storage::{
    AgentStats, BackupsRequest, DatastoreInfo, Deleted, DiskBackupOutcome, DiskRef,
    DiskRestoreRequest, FileRestoreRequest, FileRestored, RdmRestore, RdmRestoreRequest,
    ReadFileRequest, ReadStats, RestoreReport, ScanRequest, ScanResult, UnitSnapshot,
    UnitSnapshotRequest,
};

/// The storage agent's calls (the manager reads datastores; the server runs backups,
/// restores and the file catalog's scans and reads through them).
pub trait StorageAgentApi: Send + Sync {
    /// `GET /v1/datastores`.
    fn datastores(&self) -> CallResult<Vec<DatastoreInfo>>;
    /// `POST /v1/snapshots`: one storage snapshot per unit.
    fn snapshot_units(&self, req: &UnitSnapshotRequest) -> CallResult<Vec<UnitSnapshot>>;
    /// `GET /v1/snapshots`.
    fn snapshots(&self) -> CallResult<Vec<UnitSnapshot>>;
    /// `DELETE /v1/snapshots/{id}`.
    fn delete_snapshot(&self, id: &str) -> CallResult<Deleted>;
    /// `POST /v1/backups`: one outcome per disk, in order.
    fn backups(&self, req: &BackupsRequest) -> CallResult<Vec<DiskBackupOutcome>>;
    /// `POST /v1/restores`.
    fn restore(&self, req: &DiskRestoreRequest) -> CallResult<RestoreReport>;
    /// `POST /v1/restores/discard`: removes a disk a restore wrote (the restore's job failed).
    fn discard_restored(&self, disk: &DiskRef) -> CallResult<Deleted>;
    /// `POST /v1/rdm/restores`.
    fn restore_rdm(&self, req: &RdmRestoreRequest) -> CallResult<RdmRestore>;
    /// `POST /v1/files/scan`.
    fn scan_files(&self, req: &ScanRequest) -> CallResult<ScanResult>;
    /// `POST /v1/files/read`: the file's bytes and what was fetched from the vault.
    fn read_file(&self, req: &ReadFileRequest) -> CallResult<(Vec<u8>, ReadStats)>;
    /// `POST /v1/files/restore`.
    fn restore_file(&self, req: &FileRestoreRequest) -> CallResult<FileRestored>;
    /// `GET /v1/stats`.
    fn stats(&self) -> CallResult<AgentStats>;
}

/// The header of a `/v1/files/read` answer saying how many plaintext bytes the agent fetched.
pub const VAULT_BYTES_HEADER: &str = "x-cairn-vault-bytes";
/// The header saying how many segments the agent fetched.
pub const VAULT_SEGMENTS_HEADER: &str = "x-cairn-vault-segments";

/// [`StorageAgentApi`] over HTTPS.
#[derive(Clone, Debug)]
pub struct StorageAgentClient {
    http: Client,
}

impl StorageAgentClient {
    pub fn new(url: &str, token: &str, trust: &Trust) -> Result<Self, ClientError> {
        Ok(Self::from_http(Client::new(url, token, trust)?))
    }

    pub fn from_http(http: Client) -> Self {
        Self { http }
    }
}

impl StorageAgentApi for StorageAgentClient {
    fn datastores(&self) -> CallResult<Vec<DatastoreInfo>> {
        self.http.get_json("/v1/datastores")
    }

    fn snapshot_units(&self, req: &UnitSnapshotRequest) -> CallResult<Vec<UnitSnapshot>> {
        self.http.post_json("/v1/snapshots", req)
    }

    fn snapshots(&self) -> CallResult<Vec<UnitSnapshot>> {
        self.http.get_json("/v1/snapshots")
    }

    fn delete_snapshot(&self, id: &str) -> CallResult<Deleted> {
        self.http.delete_json(&format!("/v1/snapshots/{}", seg(id)))
    }

    fn backups(&self, req: &BackupsRequest) -> CallResult<Vec<DiskBackupOutcome>> {
        self.http.post_json("/v1/backups", req)
    }

    fn restore(&self, req: &DiskRestoreRequest) -> CallResult<RestoreReport> {
        self.http.post_json("/v1/restores", req)
    }

    fn discard_restored(&self, disk: &DiskRef) -> CallResult<Deleted> {
        self.http.post_json("/v1/restores/discard", disk)
    }

    fn restore_rdm(&self, req: &RdmRestoreRequest) -> CallResult<RdmRestore> {
        self.http.post_json("/v1/rdm/restores", req)
    }

    fn scan_files(&self, req: &ScanRequest) -> CallResult<ScanResult> {
        self.http.post_json("/v1/files/scan", req)
    }

    fn read_file(&self, req: &ReadFileRequest) -> CallResult<(Vec<u8>, ReadStats)> {
        let (data, headers) = self.http.post_json_for_bytes("/v1/files/read", req)?;
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0)
        };
        let stats = ReadStats {
            bytes: header(VAULT_BYTES_HEADER),
            segments: header(VAULT_SEGMENTS_HEADER),
        };
        Ok((data, stats))
    }

    fn restore_file(&self, req: &FileRestoreRequest) -> CallResult<FileRestored> {
        self.http.post_json("/v1/files/restore", req)
    }

    fn stats(&self) -> CallResult<AgentStats> {
        self.http.get_json("/v1/stats")
    }
}
