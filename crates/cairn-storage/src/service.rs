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
//! | POST | `/v1/files/restore` | `{vault, snapshot, entry, datastore, dest}` → the file written into the datastore (restore into primary storage), with what was fetched |
//! | GET | `/v1/stats` | → AgentStats: disk data read/sent/received/written |
//!
//! Every body is a type of `cairn_api::storage` (`UnitSnapshotRequest`, `BackupsRequest` →
//! `DiskBackupOutcome` per disk, `DiskRestoreRequest`, `RdmRestoreRequest`, `ScanRequest`,
//! `ReadFileRequest`, `FileRestoreRequest` → `FileRestored`, `Deleted`, ...), re-exported
//! here; a field or variant the agent does not know is `400` naming it.
//!
//! `vault` is `{url, token, fingerprint}` for a vault service, or `{url: "/path"}` for a local
//! repository directory. Each disk of a backup gets its own vault connection, so its
//! `bytes_sent` is exact. Handlers only turn a request into a call on [`StorageAgent`]
//! (backup calls: [`crate::jobs`]); all work runs on the blocking pool. Paths in change hints are trusted: the token holder is the
//! backup server.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use cairn_api::client::{VAULT_BYTES_HEADER, VAULT_SEGMENTS_HEADER};
use cairn_http::ApiError;
use cairn_vault::Vault;

use crate::agent::StorageAgent;
use crate::error::Result;
use crate::jobs::VaultTargetExt;
use crate::provider::provider_for;
use crate::restore::RestoreRequest;

type Shared = Arc<StorageAgent>;
type ApiResult<T> = std::result::Result<T, ApiError>;

async fn blocking<T: serde::Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> ApiResult<Response> {
    cairn_http::server::blocking_json(axum::http::StatusCode::OK, f).await
}

use cairn_http::server::json_body as body;

pub use cairn_api::storage::{
    BackupJob, BackupsRequest, Deleted, DiskBackup, DiskBackupOutcome, DiskRef, DiskRestoreRequest,
    DiskSource, FileRestoreRequest, FileRestored, RdmRestoreRequest, ReadFileRequest,
    RetentionRequest, ScanRequest, UnitSnapshotRequest, VaultSnapshot, VaultTarget,
};

async fn datastores(State(a): State<Shared>) -> ApiResult<Response> {
    blocking(move || a.list_datastores()).await
}

async fn providers() -> Response {
    axum::Json(
        crate::provider::all_providers()
            .iter()
            .map(|p| p.capabilities())
            .collect::<Vec<_>>(),
    )
    .into_response()
}

async fn take_snapshot(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: UnitSnapshotRequest = body(&b)?;
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
        Ok(Deleted { deleted: id })
    })
    .await
}

async fn retention(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: RetentionRequest = body(&b)?;
    blocking(move || a.apply_retention(req.keep, req.dry_run)).await
}

async fn backups(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: BackupsRequest = body(&b)?;
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
                Ok(r) => DiskBackupOutcome::Ok(r.to_wire()),
                Err(e) => DiskBackupOutcome::Error(e.to_api()),
            })
            .collect::<Vec<_>>())
    })
    .await
}

async fn restores(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: DiskRestoreRequest = body(&b)?;
    blocking(move || {
        let target = a.disk_path(&req.datastore, &req.disk)?;
        let v = req.vault.open(a.config().vault_key_file.as_deref())?;
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

async fn discard_restored(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: DiskRef = body(&b)?;
    blocking(move || {
        a.discard_restored(&req.datastore, &req.disk)?;
        Ok(Deleted {
            deleted: format!("{}/{}", req.datastore, req.disk),
        })
    })
    .await
}

async fn rdm_restore(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: RdmRestoreRequest = body(&b)?;
    blocking(move || {
        let v = req.vault.open(a.config().vault_key_file.as_deref())?;
        a.restore_rdm(&*v, &req.datastore, &req.snapshot, &req.disk)
    })
    .await
}

async fn rdm_resolve(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: DiskRef = body(&b)?;
    blocking(move || crate::rdm::resolve(a.datastore(&req.datastore)?, &req.disk)).await
}

async fn scan_files(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: ScanRequest = body(&b)?;
    blocking(move || {
        let v: Arc<dyn Vault> = Arc::from(req.vault.open(a.config().vault_key_file.as_deref())?);
        a.scan_files(v, &req.snapshot)
    })
    .await
}

/// Files larger than this are refused by `/v1/files/read` (one response in memory).
const MAX_FILE_READ: u64 = 4 << 30;

async fn read_file(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: ReadFileRequest = body(&b)?;
    if req.entry.size > MAX_FILE_READ {
        return Err(ApiError::bad_request(format!(
            "{}: {} bytes, more than the {MAX_FILE_READ} a read returns",
            req.entry.path, req.entry.size
        )));
    }
    let (data, stats) = tokio::task::spawn_blocking(move || -> Result<_> {
        let v: Arc<dyn Vault> = Arc::from(req.vault.open(a.config().vault_key_file.as_deref())?);
        let mut out = Vec::with_capacity(req.entry.size as usize);
        let stats = a.read_file(v, &req.snapshot, &req.entry, &mut out)?;
        Ok((out, stats))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| e.to_api())?;
    Ok((
        [
            (VAULT_BYTES_HEADER, stats.bytes.to_string()),
            (VAULT_SEGMENTS_HEADER, stats.segments.to_string()),
        ],
        data,
    )
        .into_response())
}

async fn restore_file(State(a): State<Shared>, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: FileRestoreRequest = body(&b)?;
    blocking(move || {
        let v: Arc<dyn Vault> = Arc::from(req.vault.open(a.config().vault_key_file.as_deref())?);
        let (path, read) =
            a.restore_file_into(v, &req.snapshot, &req.entry, &req.datastore, &req.dest)?;
        Ok(FileRestored {
            path,
            bytes: req.entry.size,
            vault_bytes_read: read.bytes,
            vault_segments_read: read.segments,
        })
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
            .route("/v1/restores/discard", post(discard_restored))
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
    tls: impl Into<cairn_http::server::ServerTls>,
    token: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    cairn_http::server::serve(router(agent, token), addr, tls, "storage agent service").await
}
