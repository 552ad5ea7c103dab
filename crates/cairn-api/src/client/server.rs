//! [`ServerApi`]: the backup server's REST API (`docs/openapi.yaml`), as the CLI calls it.

use cairn_http::{Client, ClientError, Trust};

use super::{CallResult, seg};
use crate::server::{
    BackupRecord, DataPath, DeletedSchedule, FileContent, FileHit, FileInfo, FileRestoredInto,
    FileRestoredIntoGuest, FileVersion, JobRecord, LeaderStatus, PutSchedule, RestoreFileInto,
    RestoreFileIntoGuest, RestoreParams, Retention, Schedule, StartBackup, StartPrune, VmEntry,
};

/// Header of `GET /v1/files/content`: the file's [`FileInfo`] as JSON.
pub const FILE_HEADER: &str = "x-cairn-file";
/// Header of `GET /v1/files/content`: bytes read from the vault for the answer.
pub const FILE_VAULT_BYTES_HEADER: &str = "x-cairn-vault-bytes";

/// Query of `GET /v1/files/find`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FindFiles {
    /// A glob (`*.conf`, `/etc/**/pass*`) or a substring.
    pub pattern: String,
    pub vm: Option<String>,
    /// At most this many hits (the server's default when `None`).
    pub limit: Option<usize>,
    /// Ignore case.
    pub icase: bool,
}

/// The backup server's calls.
pub trait ServerApi: Send + Sync {
    /// `GET /v1/vms`: the manager's VMs with their backups, then VMs with backups only.
    fn vms(&self) -> CallResult<Vec<VmEntry>>;
    /// `GET /v1/backups[?vm=]`, oldest first.
    fn backups(&self, vm: Option<&str>) -> CallResult<Vec<BackupRecord>>;
    /// `GET /v1/backups/{id}` (id or unique prefix), with its metadata snapshot.
    fn backup(&self, id: &str) -> CallResult<BackupRecord>;
    /// `POST /v1/backups`: the queued job.
    fn start_backup(&self, r: &StartBackup) -> CallResult<JobRecord>;
    /// `POST /v1/restores`: the queued job.
    fn start_restore(&self, r: &RestoreParams) -> CallResult<JobRecord>;
    /// `POST /v1/prune`: the queued job.
    fn start_prune(&self, r: &StartPrune) -> CallResult<JobRecord>;
    /// `GET /v1/jobs?limit=`, newest first.
    fn jobs(&self, limit: usize) -> CallResult<Vec<JobRecord>>;
    /// `GET /v1/jobs/{id}`, with its events.
    fn job(&self, id: &str) -> CallResult<JobRecord>;
    /// `POST /v1/jobs/{id}/cancel`.
    fn cancel_job(&self, id: &str) -> CallResult<JobRecord>;
    /// `GET /v1/schedules`.
    fn schedules(&self) -> CallResult<Vec<Schedule>>;
    /// `PUT /v1/schedules/{name}`.
    fn put_schedule(&self, name: &str, r: &PutSchedule) -> CallResult<Schedule>;
    /// `DELETE /v1/schedules/{name}`.
    fn delete_schedule(&self, name: &str) -> CallResult<DeletedSchedule>;
    /// `GET /v1/retention/{vm}` (`*`: the default); `None` when none is set.
    fn retention(&self, vm: &str) -> CallResult<Option<Retention>>;
    /// `PUT /v1/retention/{vm}`.
    fn set_retention(&self, vm: &str, r: &Retention) -> CallResult<Retention>;
    /// `GET /v1/files?backup=&path=`: a backup's volumes, or a directory's entries.
    fn files_ls(&self, backup: &str, path: &str) -> CallResult<Vec<FileInfo>>;
    /// `GET /v1/files/find`.
    fn files_find(&self, q: &FindFiles) -> CallResult<Vec<FileHit>>;
    /// `GET /v1/files/versions?vm=&path=`.
    fn files_versions(&self, vm: &str, path: &str) -> CallResult<Vec<FileVersion>>;
    /// `GET /v1/files/content?backup=&path=`: a file's bytes or a directory's tar stream.
    fn file_content(&self, backup: &str, path: &str) -> CallResult<FileContent>;
    /// `POST /v1/files/restore`: a file written into primary storage by a storage agent.
    fn restore_file_into(&self, r: &RestoreFileInto) -> CallResult<FileRestoredInto>;
    /// `POST /v1/files/restore-guest`: a file or directory written into a running guest.
    fn restore_file_into_guest(
        &self,
        r: &RestoreFileIntoGuest,
    ) -> CallResult<FileRestoredIntoGuest>;
    /// `GET /v1/stats`: the data-path proof.
    fn stats(&self) -> CallResult<DataPath>;
    /// `GET /v1/leader`: whether this server is the active one.
    fn leader(&self) -> CallResult<LeaderStatus>;
}

/// [`ServerApi`] over HTTPS.
#[derive(Clone)]
pub struct ServerClient {
    http: Client,
}

impl std::fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerClient")
            .field("base", &self.http.base())
            .finish()
    }
}

impl ServerClient {
    pub fn new(url: &str, token: &str, trust: &Trust) -> Result<Self, ClientError> {
        Ok(Self::from_http(Client::new(url, token, trust)?))
    }

    pub fn from_http(http: Client) -> Self {
        Self { http }
    }

    /// The underlying HTTP client (base URL, raw calls in tests).
    pub fn http(&self) -> &Client {
        &self.http
    }
}

impl ServerApi for ServerClient {
    fn vms(&self) -> CallResult<Vec<VmEntry>> {
        self.http.get_json("/v1/vms")
    }

    fn backups(&self, vm: Option<&str>) -> CallResult<Vec<BackupRecord>> {
        match vm {
            Some(vm) => self.http.get_json(&format!("/v1/backups?vm={}", seg(vm))),
            None => self.http.get_json("/v1/backups"),
        }
    }

    fn backup(&self, id: &str) -> CallResult<BackupRecord> {
        self.http.get_json(&format!("/v1/backups/{}", seg(id)))
    }

    fn start_backup(&self, r: &StartBackup) -> CallResult<JobRecord> {
        self.http.post_json("/v1/backups", r)
    }

    fn start_restore(&self, r: &RestoreParams) -> CallResult<JobRecord> {
        self.http.post_json("/v1/restores", r)
    }

    fn start_prune(&self, r: &StartPrune) -> CallResult<JobRecord> {
        self.http.post_json("/v1/prune", r)
    }

    fn jobs(&self, limit: usize) -> CallResult<Vec<JobRecord>> {
        self.http.get_json(&format!("/v1/jobs?limit={limit}"))
    }

    fn job(&self, id: &str) -> CallResult<JobRecord> {
        self.http.get_json(&format!("/v1/jobs/{}", seg(id)))
    }

    fn cancel_job(&self, id: &str) -> CallResult<JobRecord> {
        self.http
            .post_json(&format!("/v1/jobs/{}/cancel", seg(id)), &Empty {})
    }

    fn schedules(&self) -> CallResult<Vec<Schedule>> {
        self.http.get_json("/v1/schedules")
    }

    fn put_schedule(&self, name: &str, r: &PutSchedule) -> CallResult<Schedule> {
        self.http
            .put_json(&format!("/v1/schedules/{}", seg(name)), r)
    }

    fn delete_schedule(&self, name: &str) -> CallResult<DeletedSchedule> {
        self.http
            .delete_json(&format!("/v1/schedules/{}", seg(name)))
    }

    fn retention(&self, vm: &str) -> CallResult<Option<Retention>> {
        self.http.get_json(&format!("/v1/retention/{}", seg(vm)))
    }

    fn set_retention(&self, vm: &str, r: &Retention) -> CallResult<Retention> {
        self.http.put_json(&format!("/v1/retention/{}", seg(vm)), r)
    }

    fn files_ls(&self, backup: &str, path: &str) -> CallResult<Vec<FileInfo>> {
        self.http.get_json(&format!(
            "/v1/files?backup={}&path={}",
            seg(backup),
            seg(path)
        ))
    }

    fn files_find(&self, q: &FindFiles) -> CallResult<Vec<FileHit>> {
        let mut path = format!(
            "/v1/files/find?pattern={}&icase={}",
            seg(&q.pattern),
            q.icase
        );
        if let Some(l) = q.limit {
            path.push_str(&format!("&limit={l}"));
        }
        if let Some(vm) = &q.vm {
            path.push_str(&format!("&vm={}", seg(vm)));
        }
        self.http.get_json(&path)
    }

    fn files_versions(&self, vm: &str, path: &str) -> CallResult<Vec<FileVersion>> {
        self.http.get_json(&format!(
            "/v1/files/versions?vm={}&path={}",
            seg(vm),
            seg(path)
        ))
    }

    fn file_content(&self, backup: &str, path: &str) -> CallResult<FileContent> {
        let url = format!(
            "/v1/files/content?backup={}&path={}",
            seg(backup),
            seg(path)
        );
        let (data, headers) = self.http.get_for_bytes(&url)?;
        let header = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        let decode = |what: &str, msg: String| ClientError::Decode {
            url: format!("{}{url}", self.http.base()),
            msg: format!("{what}: {msg}"),
        };
        let file = header(FILE_HEADER)
            .map(serde_json::from_str::<FileInfo>)
            .transpose()
            .map_err(|e| decode(FILE_HEADER, e.to_string()))?;
        let vault_bytes_read = header(FILE_VAULT_BYTES_HEADER)
            .map(str::parse::<u64>)
            .transpose()
            .map_err(|e| decode(FILE_VAULT_BYTES_HEADER, e.to_string()))?;
        Ok(FileContent {
            data,
            file,
            vault_bytes_read,
        })
    }

    fn restore_file_into(&self, r: &RestoreFileInto) -> CallResult<FileRestoredInto> {
        self.http.post_json("/v1/files/restore", r)
    }

    fn restore_file_into_guest(
        &self,
        r: &RestoreFileIntoGuest,
    ) -> CallResult<FileRestoredIntoGuest> {
        self.http.post_json("/v1/files/restore-guest", r)
    }

    fn stats(&self) -> CallResult<DataPath> {
        self.http.get_json("/v1/stats")
    }

    fn leader(&self) -> CallResult<LeaderStatus> {
        self.http.get_json("/v1/leader")
    }
}

/// The empty body of `POST /v1/jobs/{id}/cancel`.
#[derive(serde::Serialize)]
struct Empty {}
