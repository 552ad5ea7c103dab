//! The vault service: the fingerprint-first protocol over HTTPS.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | `/health` | → `ok` (no token needed) |
//! | GET | `/v1/config` | → RepoConfig |
//! | GET | `/v1/stats` | → disk-data bytes received and sent |
//! | GET | `/v1/snapshots` | → [SnapshotManifest] |
//! | GET | `/v1/snapshots/{spec}` | → SnapshotManifest |
//! | GET | `/v1/snapshots/{spec}/entries` | → recipe entries (binary leaf records) |
//! | GET | `/v1/snapshots/{spec}/data?offset=&len=` | → image bytes (at most 64 MiB) |
//! | POST | `/v1/sessions` | → `{"session"}` (takes a shared lock) |
//! | POST | `/v1/sessions/{id}/lacking` | digests → one byte per digest (1 = lacking) |
//! | POST | `/v1/sessions/{id}/blobs` | upload frames → `{"stored"}`; every blob is decoded and re-hashed |
//! | POST | `/v1/sessions/{id}/commit` | CommitRequest → SnapshotManifest |
//! | DELETE | `/v1/sessions/{id}` | → abort; nothing becomes visible |
//! | POST | `/v1/fetch` | digests → download frames (stored bytes; the client verifies) |
//! | POST | `/v1/verify`, `/v1/prune`, `/v1/gc` | options → report or plan |
//!
//! Handlers only turn requests into calls on the [`Repository`]; blocking work runs on the
//! blocking pool. See `docs/PROTOCOL.md` for the frames (module [`crate::wire`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use cairn_http::ApiError;
use cairn_types::SessionId;

use crate::error::VaultError;
use crate::maint::PruneOptions;
use crate::repo::Repository;
use crate::session::{BackupSession, CommitRequest};
use crate::wire;

/// Shared state of the service.
pub struct VaultService {
    repo: Arc<Repository>,
    sessions: Mutex<HashMap<SessionId, Arc<BackupSession>>>,
    /// Disk-data bytes received (uploaded blobs) and sent (fetched blobs, image data).
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
}

impl std::fmt::Debug for VaultService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultService").finish()
    }
}

type Shared = Arc<VaultService>;
type ApiResult<T> = Result<T, ApiError>;

fn api(e: VaultError) -> ApiError {
    e.to_api()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VaultError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(api)
}

fn json<T: serde::Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

fn parse_session(id: &str) -> ApiResult<SessionId> {
    id.parse()
        .map_err(|e: cairn_types::IdParseError| ApiError::bad_request(e.to_string()))
}

impl VaultService {
    pub fn new(repo: Arc<Repository>) -> Arc<Self> {
        Arc::new(Self {
            repo,
            sessions: Mutex::new(HashMap::new()),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
        })
    }

    fn session(&self, id: &str) -> ApiResult<Arc<BackupSession>> {
        let id = parse_session(id)?;
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no open session {id}")))
    }

    /// The router, with the token check applied to every route but `/health`.
    pub fn router(self: Arc<Self>, token: String) -> Router {
        cairn_http::server::with_token(
            Router::new()
                .route("/health", get(|| async { "ok" }))
                .route("/v1/config", get(config))
                .route("/v1/stats", get(stats))
                .route("/v1/snapshots", get(list))
                .route("/v1/snapshots/{spec}", get(find))
                .route("/v1/snapshots/{spec}/entries", get(entries))
                .route("/v1/snapshots/{spec}/data", get(data))
                .route("/v1/sessions", post(begin))
                .route("/v1/sessions/{id}/lacking", post(lacking))
                .route("/v1/sessions/{id}/blobs", post(blobs))
                .route("/v1/sessions/{id}/commit", post(commit))
                .route("/v1/sessions/{id}", delete(abort))
                .route("/v1/fetch", post(fetch))
                .route("/v1/verify", post(verify))
                .route("/v1/prune", post(prune))
                .route("/v1/gc", post(gc))
                .route("/v1/forget", post(forget))
                .layer(DefaultBodyLimit::max(wire::MAX_BODY)),
            token,
        )
        .with_state(self)
    }
}

async fn config(State(s): State<Shared>) -> Response {
    json(s.repo.config().clone())
}

async fn stats(State(s): State<Shared>) -> Response {
    json(serde_json::json!({
        "bytes_received": s.bytes_received.load(Ordering::Relaxed),
        "bytes_sent": s.bytes_sent.load(Ordering::Relaxed),
        "open_sessions": s.sessions.lock().map(|m| m.len()).unwrap_or(0),
    }))
}

async fn list(State(s): State<Shared>) -> ApiResult<Response> {
    let repo = s.repo.clone();
    Ok(json(blocking(move || repo.list_snapshots()).await?))
}

async fn find(State(s): State<Shared>, Path(spec): Path<String>) -> ApiResult<Response> {
    let repo = s.repo.clone();
    Ok(json(blocking(move || repo.find_snapshot(&spec)).await?))
}

async fn entries(State(s): State<Shared>, Path(spec): Path<String>) -> ApiResult<Vec<u8>> {
    let repo = s.repo.clone();
    blocking(move || {
        let m = repo.find_snapshot(&spec)?;
        Ok(cairn_chunk::recipe::encode_entries(&repo.entries(&m)?))
    })
    .await
}

#[derive(serde::Deserialize)]
struct Range {
    offset: u64,
    len: u64,
}

async fn data(
    State(s): State<Shared>,
    Path(spec): Path<String>,
    Query(r): Query<Range>,
) -> ApiResult<Vec<u8>> {
    if r.len > 64 << 20 {
        return Err(ApiError::bad_request(
            "len is limited to 64 MiB per request",
        ));
    }
    let repo = s.repo.clone();
    let out = blocking(move || {
        let m = repo.find_snapshot(&spec)?;
        let reader = crate::reader::SnapshotReader::open(repo.clone(), &m)?;
        reader.read_range(r.offset, r.len)
    })
    .await?;
    s.bytes_sent.fetch_add(out.len() as u64, Ordering::Relaxed);
    Ok(out)
}

async fn begin(State(s): State<Shared>) -> ApiResult<Response> {
    let repo = s.repo.clone();
    let session = blocking(move || BackupSession::begin(repo, "vault service session")).await?;
    let id = SessionId::random();
    s.sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, Arc::new(session));
    Ok(json(serde_json::json!({ "session": id })))
}

async fn lacking(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Vec<u8>> {
    let session = s.session(&id)?;
    let digests = wire::decode_digests(&body).map_err(ApiError::bad_request)?;
    let l = blocking(move || session.lacking(&digests)).await?;
    Ok(l.into_iter().map(u8::from).collect())
}

async fn blobs(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let session = s.session(&id)?;
    let ups = wire::decode_uploads(&body).map_err(ApiError::bad_request)?;
    let n = ups.iter().map(|u| u.seg.bytes.len() as u64).sum::<u64>();
    let stored = blocking(move || {
        let mut k = 0;
        for u in ups {
            k += usize::from(session.put_verified(u.kind, &u.members, &u.seg)?);
        }
        Ok(k)
    })
    .await?;
    s.bytes_received.fetch_add(n, Ordering::Relaxed);
    Ok(json(serde_json::json!({ "stored": stored })))
}

async fn commit(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CommitRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("commit request: {e}")))?;
    let sid = parse_session(&id)?;
    let session = s
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&sid)
        .ok_or_else(|| ApiError::not_found(format!("no open session {sid}")))?;
    let session = match Arc::try_unwrap(session) {
        Ok(session) => session,
        Err(session) => {
            // Still in use by another request: keep it open so the client can retry.
            s.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(sid, session);
            return Err(ApiError::new(
                cairn_http::ErrorKind::Conflict,
                "session has requests in flight",
            ));
        }
    };
    Ok(json(blocking(move || session.commit(req)).await?))
}

async fn abort(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult<Response> {
    let sid = parse_session(&id)?;
    let gone = s
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&sid);
    if let Some(sess) = gone {
        tokio::task::spawn_blocking(move || drop(sess));
    }
    Ok(json(serde_json::json!({ "aborted": true })))
}

async fn fetch(State(s): State<Shared>, body: Bytes) -> ApiResult<Vec<u8>> {
    let digests = wire::decode_digests(&body).map_err(ApiError::bad_request)?;
    let repo = s.repo.clone();
    let blobs = blocking(move || repo.read_many_raw(&digests)).await?;
    let mut out = Vec::with_capacity(
        blobs
            .iter()
            .map(|b| b.1.as_ref().map_or(0, Vec::len) + 18)
            .sum(),
    );
    for (loc, b) in &blobs {
        wire::encode_download(&mut out, loc.codec, loc.member(), b.as_deref());
    }
    s.bytes_sent.fetch_add(out.len() as u64, Ordering::Relaxed);
    Ok(out)
}

#[derive(serde::Deserialize, serde::Serialize, Default)]
pub(crate) struct MaintRequest {
    #[serde(default)]
    pub read_data: bool,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub prune: Option<PruneOptions>,
}

fn maint_req(body: &[u8]) -> ApiResult<MaintRequest> {
    if body.is_empty() {
        return Ok(MaintRequest::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("request: {e}")))
}

async fn verify(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let r = maint_req(&body)?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || crate::maint::verify(&repo, r.read_data)).await?,
    ))
}

async fn prune(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let r = maint_req(&body)?;
    let opts = r
        .prune
        .ok_or_else(|| ApiError::bad_request("prune needs retention rules"))?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || crate::maint::prune(&repo, &opts, r.dry_run)).await?,
    ))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetRequest {
    snapshots: Vec<String>,
}

async fn forget(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let r: ForgetRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("forget request: {e}")))?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || crate::maint::forget(&repo, &r.snapshots)).await?,
    ))
}

async fn gc(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let r = maint_req(&body)?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || crate::maint::gc(&repo, r.dry_run)).await?,
    ))
}

/// Serves until the future is dropped; returns once bound with the listening address.
pub async fn serve(
    service: Arc<VaultService>,
    addr: std::net::SocketAddr,
    tls: rustls::ServerConfig,
    token: String,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    cairn_http::server::serve(service.router(token), addr, tls, "vault service").await
}
