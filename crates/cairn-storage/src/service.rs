//! The storage agent service, with the conventions of every Cairn service (`cairn-http`:
//! TLS, bearer token, JSON errors).
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | `/health` | → `ok` (no token needed) |
//! | GET | `/v1/datastores` | → list of `DatastoreInfo` (unit and disks of each) |
//! | GET | `/v1/providers` | → list of `Capabilities` |
//! | POST | `/v1/snapshots` | `{provider, disks: [{datastore, disk}], tag}` → list of `UnitSnapshot`, one per storage unit |
//! | GET | `/v1/snapshots` | → list of `UnitSnapshot` |
//! | DELETE | `/v1/snapshots/{id}` | → `{"deleted": id}` |
//! | POST | `/v1/retention` | `{keep, dry_run}` → RetentionPlan |
//! | POST | `/v1/backups` | `{vault, parallel?, disks: [{source, request}]}` → [`{ok}` or `{error}`] per disk; `source` is `{kind: snapshot\|in_place\|nbd\|rdm, ...}` ([`DiskSource`]) |
//! | POST | `/v1/restores` | `{vault, snapshot, datastore, disk, format, mode}` → RestoreReport |
//! | POST | `/v1/rdm/resolve` | `{datastore, disk}` → RdmMapping (mapping file written) |
//! | POST | `/v1/rdm/restores` | `{vault, snapshot, datastore, disk}` → RdmRestore (new LUN + mapping file) |
//! | POST | `/v1/files/scan` | `{vault, snapshot}` → ScanResult: every file of every volume, with disk extents (file catalog) |
//! | POST | `/v1/files/read` | `{vault, snapshot, entry}` → the file's bytes; `x-cairn-vault-bytes` / `-segments` say what was fetched |
//! | POST | `/v1/files/restore` | `{vault, snapshot, entry, datastore, dest}` → the file written into the datastore (FIG. 6), with what was fetched |
//! | GET | `/v1/stats` | → AgentStats: disk data read/sent/received/written |
//!
//! `vault` is `{url, token, fingerprint}` for a vault service, or `{url: "/path"}` for a local
//! repository directory. Each disk of a backup gets its own vault connection, so its
//! `bytes_sent` is exact. Handlers only turn a request into a call on [`StorageAgent`]; all
//! work runs on the blocking pool. Paths in change hints are trusted: the token holder is the
//! backup server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use cairn_http::ApiError;
use cairn_vault::Vault;

use crate::agent::{BackupRequest, BackupResult, StorageAgent};
use crate::error::{Result, StorageError};
use crate::provider::{
    CopyProvider, DiskSnapshot, Qcow2Mode, Qcow2Provider, ReflinkProvider, SnapshotProvider,
    provider_for,
};
use crate::qemu::{DiskFormat, NbdImage};
use crate::restore::{RestoreMode, RestoreRequest};
use crate::tracker::ChangeHint;

type Shared = Arc<StorageAgent>;
type ApiResult<T> = std::result::Result<T, ApiError>;

async fn blocking<T: serde::Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> ApiResult<Response> {
    cairn_http::server::blocking_json(axum::http::StatusCode::OK, f).await
}

use cairn_http::server::json_body as body;

/// Where to send or fetch disk data.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VaultTarget {
    /// `https://HOST:PORT` of a vault service, or the path of a local repository.
    pub url: String,
    #[serde(default)]
    pub token: Option<String>,
    /// SHA-256 of the vault's certificate (hex).
    #[serde(default)]
    pub fingerprint: Option<String>,
}

impl VaultTarget {
    /// Connects to the vault.
    pub fn open(&self) -> Result<Box<dyn Vault>> {
        if self.url.starts_with("https://") {
            let token = self
                .token
                .as_deref()
                .ok_or_else(|| StorageError::Invalid("vault token missing".into()))?;
            let fp = self
                .fingerprint
                .clone()
                .ok_or_else(|| StorageError::Invalid("vault fingerprint missing".into()))?;
            let v = cairn_vault::remote::RemoteVault::connect(
                &self.url,
                token,
                &cairn_http::Trust::Fingerprint(fp),
            )?;
            return Ok(Box::new(v));
        }
        let dir = PathBuf::from(self.url.strip_prefix("file://").unwrap_or(&self.url));
        if !dir.is_absolute() {
            return Err(StorageError::Invalid(format!(
                "vault url {:?}: https://... or an absolute path",
                self.url
            )));
        }
        Ok(Box::new(cairn_vault::LocalVault {
            repo: cairn_vault::Repository::open_dir(&dir)?,
        }))
    }
}

/// A disk in a datastore.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskRef {
    pub datastore: String,
    pub disk: String,
}

#[derive(serde::Deserialize)]
struct SnapshotBody {
    provider: String,
    disks: Vec<DiskRef>,
    #[serde(default)]
    tag: String,
}

/// What to read for one disk backup.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskSource {
    /// Disk number `index` of an agent snapshot.
    Snapshot { snapshot: String, index: usize },
    /// A disk read in place (offline, or a frozen base).
    InPlace { datastore: String, disk: String },
    /// A read-only NBD export on a unix socket (a host agent's fleecing snapshot). With
    /// `bitmap_context` (`qemu:dirty-bitmap:NAME`) the export's dirty bitmap becomes the
    /// first change hint (source `hypervisor_bitmap`).
    Nbd {
        socket: PathBuf,
        export: String,
        #[serde(default)]
        bitmap_context: Option<String>,
    },
    /// A raw device mapping (seed 003): the LUN `disk` of `datastore`, read in place, plus
    /// its mapping (see [`crate::rdm`]).
    Rdm { datastore: String, disk: String },
}

/// One disk of a backup call.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BackupJob {
    pub source: DiskSource,
    pub request: BackupRequest,
}

#[derive(serde::Deserialize)]
struct BackupBody {
    vault: VaultTarget,
    disks: Vec<BackupJob>,
    #[serde(default)]
    parallel: usize,
}

#[derive(serde::Deserialize)]
struct RestoreBody {
    vault: VaultTarget,
    snapshot: String,
    datastore: String,
    disk: String,
    format: DiskFormat,
    mode: RestoreMode,
}

#[derive(serde::Deserialize)]
struct RetentionBody {
    keep: usize,
    #[serde(default)]
    dry_run: bool,
}

impl StorageAgent {
    fn resolve_source(&self, s: &DiskSource) -> Result<DiskSnapshot> {
        match s {
            DiskSource::Snapshot { snapshot, index } => {
                let u = self.get_snapshot(snapshot)?;
                u.disks.get(*index).cloned().ok_or_else(|| {
                    StorageError::NotFound(format!("disk {index} of snapshot {snapshot}"))
                })
            }
            DiskSource::InPlace { datastore, disk } => {
                DiskSnapshot::of_file(&self.disk_path(datastore, disk)?)
            }
            DiskSource::Nbd { .. } | DiskSource::Rdm { .. } => {
                Err(StorageError::Invalid("not a storage snapshot".into()))
            }
        }
    }

    /// Backs up one disk of a backup call.
    fn run_backup_job(&self, vault: &VaultTarget, job: &BackupJob) -> Result<BackupResult> {
        let v = vault.open()?;
        match &job.source {
            DiskSource::Nbd {
                socket,
                export,
                bitmap_context,
            } => {
                let img = NbdImage::connect(socket, export, bitmap_context.as_deref())?;
                let mut req = job.request.clone();
                if bitmap_context.is_some() && req.parent.is_some() {
                    match img.dirty_extents() {
                        Ok(extents) => req.hints.insert(0, ChangeHint::Hypervisor { extents }),
                        Err(e) => tracing::warn!("{}: dirty bitmap unreadable: {e}", req.name),
                    }
                }
                let snap = DiskSnapshot {
                    disk: PathBuf::from(format!("nbd:{export}")),
                    image: img_path(socket, export),
                    format: DiskFormat::Raw,
                    internal: None,
                    size: img.size(),
                };
                self.backup_source(&*v, &snap, &img, &req)
            }
            DiskSource::Rdm { datastore, disk } => {
                let r = self.backup_rdm(&*v, datastore, disk, &job.request)?;
                Ok(r.data)
            }
            s => {
                let snap = self.resolve_source(s)?;
                self.backup_disk(&*v, &snap, &job.request)
            }
        }
    }

    /// Runs backup jobs, each with its own connection to `vault`, at most `parallel` at once.
    pub fn run_backup_jobs(
        &self,
        vault: &VaultTarget,
        jobs: &[BackupJob],
        parallel: usize,
    ) -> Vec<Result<crate::agent::BackupResult>> {
        crate::agent::parallel_map(jobs, parallel, |job| self.run_backup_job(vault, job))
    }
}

fn img_path(socket: &std::path::Path, export: &str) -> PathBuf {
    PathBuf::from(format!("nbd+unix:///{export}?socket={}", socket.display()))
}

fn all_providers() -> Vec<Box<dyn SnapshotProvider>> {
    vec![
        Box::new(Qcow2Provider {
            mode: Qcow2Mode::FrozenBase,
        }),
        Box::new(Qcow2Provider {
            mode: Qcow2Mode::Internal,
        }),
        Box::new(ReflinkProvider),
        Box::new(CopyProvider),
    ]
}

async fn datastores(State(a): State<Shared>) -> ApiResult<Response> {
    blocking(move || a.list_datastores()).await
}

async fn providers() -> Response {
    axum::Json(
        all_providers()
            .iter()
            .map(|p| p.capabilities())
            .collect::<Vec<_>>(),
    )
    .into_response()
}

async fn take_snapshot(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: SnapshotBody = body(&b)?;
    blocking(move || {
        let provider = provider_for(&req.provider)?;
        let disks = req
            .disks
            .iter()
            .map(|d| a.disk_path(&d.datastore, &d.disk))
            .collect::<Result<Vec<_>>>()?;
        a.snapshot_units(&*provider, &disks, &req.tag)
    })
    .await
}

async fn list_snapshots(State(a): State<Shared>) -> ApiResult<Response> {
    blocking(move || a.list_snapshots()).await
}

async fn delete_snapshot(State(a): State<Shared>, Path(id): Path<String>) -> ApiResult<Response> {
    blocking(move || {
        a.delete_snapshot(&id)?;
        Ok(serde_json::json!({ "deleted": id }))
    })
    .await
}

async fn retention(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: RetentionBody = body(&b)?;
    blocking(move || a.apply_retention(req.keep, req.dry_run)).await
}

async fn backups(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: BackupBody = body(&b)?;
    blocking(move || {
        let parallel = if req.parallel == 0 {
            a.config().parallel.max(2)
        } else {
            req.parallel
        };
        let results = a.run_backup_jobs(&req.vault, &req.disks, parallel);
        Ok(results
            .into_iter()
            .map(|r| match r {
                Ok(r) => serde_json::json!({ "ok": r }),
                Err(e) => serde_json::json!({ "error": e.to_api() }),
            })
            .collect::<Vec<_>>())
    })
    .await
}

async fn restores(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: RestoreBody = body(&b)?;
    blocking(move || {
        let target = a.disk_path(&req.datastore, &req.disk)?;
        let v = req.vault.open()?;
        a.restore(
            &*v,
            &RestoreRequest {
                snapshot: req.snapshot,
                target,
                format: req.format,
                mode: req.mode,
            },
        )
    })
    .await
}

#[derive(serde::Deserialize)]
struct RdmRestoreBody {
    vault: VaultTarget,
    snapshot: String,
    datastore: String,
    /// The new LUN: `luns/NAME` (created) or a block device.
    disk: String,
}

async fn rdm_restore(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: RdmRestoreBody = body(&b)?;
    blocking(move || {
        let v = req.vault.open()?;
        a.restore_rdm(&*v, &req.datastore, &req.snapshot, &req.disk)
    })
    .await
}

async fn rdm_resolve(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: DiskRef = body(&b)?;
    blocking(move || crate::rdm::resolve(a.datastore(&req.datastore)?, &req.disk)).await
}

#[derive(serde::Deserialize)]
struct ScanBody {
    vault: VaultTarget,
    snapshot: String,
}

async fn scan_files(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: ScanBody = body(&b)?;
    blocking(move || {
        let v: Arc<dyn Vault> = Arc::from(req.vault.open()?);
        a.scan_files(v, &req.snapshot)
    })
    .await
}

#[derive(serde::Deserialize)]
struct ReadBody {
    vault: VaultTarget,
    snapshot: String,
    entry: cairn_fs::FileEntry,
}

/// Files larger than this are refused by `/v1/files/read` (one response in memory).
const MAX_FILE_READ: u64 = 4 << 30;

async fn read_file(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: ReadBody = body(&b)?;
    if req.entry.size > MAX_FILE_READ {
        return Err(ApiError::bad_request(format!(
            "{}: {} bytes, more than the {MAX_FILE_READ} a read returns",
            req.entry.path, req.entry.size
        )));
    }
    let (data, stats) = tokio::task::spawn_blocking(move || -> Result<_> {
        let v: Arc<dyn Vault> = Arc::from(req.vault.open()?);
        let mut out = Vec::with_capacity(req.entry.size as usize);
        let stats = a.read_file(v, &req.snapshot, &req.entry, &mut out)?;
        Ok((out, stats))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| e.to_api())?;
    Ok((
        [
            ("x-cairn-vault-bytes", stats.bytes.to_string()),
            ("x-cairn-vault-segments", stats.segments.to_string()),
        ],
        data,
    )
        .into_response())
}

#[derive(serde::Deserialize)]
struct FileRestoreBody {
    vault: VaultTarget,
    snapshot: String,
    entry: cairn_fs::FileEntry,
    datastore: String,
    dest: String,
}

async fn restore_file(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: FileRestoreBody = body(&b)?;
    blocking(move || {
        let v: Arc<dyn Vault> = Arc::from(req.vault.open()?);
        let (path, read) =
            a.restore_file_into(v, &req.snapshot, &req.entry, &req.datastore, &req.dest)?;
        Ok(serde_json::json!({
            "path": path, "bytes": req.entry.size, "vault_bytes_read": read.bytes,
            "vault_segments_read": read.segments,
        }))
    })
    .await
}

async fn stats(State(a): State<Shared>) -> Response {
    axum::Json(a.stats()).into_response()
}

/// The router, with the token check on every route but `/health`.
pub fn router(agent: Arc<StorageAgent>, token: String) -> Router {
    cairn_http::server::with_token(
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/v1/datastores", get(datastores))
            .route("/v1/providers", get(providers))
            .route("/v1/snapshots", post(take_snapshot).get(list_snapshots))
            .route("/v1/snapshots/{id}", delete(delete_snapshot))
            .route("/v1/retention", post(retention))
            .route("/v1/backups", post(backups))
            .route("/v1/restores", post(restores))
            .route("/v1/rdm/resolve", post(rdm_resolve))
            .route("/v1/rdm/restores", post(rdm_restore))
            .route("/v1/files/scan", post(scan_files))
            .route("/v1/files/read", post(read_file))
            .route("/v1/files/restore", post(restore_file))
            .route("/v1/stats", get(stats)),
        token,
    )
    .with_state(agent)
}

/// Serves until the task is aborted; returns once bound, with the listening address.
pub async fn serve(
    agent: Arc<StorageAgent>,
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    token: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    cairn_http::server::serve(router(agent, token), addr, tls, "storage agent service").await
}
