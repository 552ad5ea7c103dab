//! The vault service: the fingerprint-first protocol over HTTPS.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | `/health` | → `ok` (no token needed) |
//! | GET | `/v1/config` | → RepoConfig |
//! | GET | `/v1/stats` | → [`VaultStats`]: disk-data bytes received and sent, open and expired sessions |
//! | GET | `/v1/keys` | → the wrapped keys of an encrypted repository (useless without a passphrase or key file) |
//! | GET | `/v1/snapshots` | → list of SnapshotManifest |
//! | GET | `/v1/damaged` | → digests whose stored copy is marked damaged (a backup that has their data sends them again) |
//! | GET | `/v1/snapshots/{spec}` | → SnapshotManifest |
//! | GET | `/v1/snapshots/{spec}/entries` | → recipe entries (binary leaf records) |
//! | GET | `/v1/snapshots/{spec}/data?offset=&len=` | → image bytes (at most 64 MiB) |
//! | POST | `/v1/sessions` | → [`SessionBegun`] `{"session", "lease_ms"}` (takes a shared lock) |
//! | POST | `/v1/sessions/{id}/keepalive` | → [`LeaseRenewed`] `{"lease_ms"}`: renews the lease, nothing else |
//! | POST | `/v1/sessions/{id}/lacking` | digests → one byte per digest (1 = lacking) |
//! | POST | `/v1/sessions/{id}/blobs` | upload frames → [`Stored`] `{"stored"}`; every blob is decoded and re-hashed |
//! | POST | `/v1/sessions/{id}/commit` | CommitRequest → SnapshotManifest |
//! | DELETE | `/v1/sessions/{id}` | → [`Aborted`]; nothing becomes visible |
//! | POST | `/v1/fetch` | digests → download frames (stored bytes; the client verifies) |
//! | POST | `/v1/fetch-near` | required + optional digests → the required ones and the optional ones in the same frames, indexed (see [`wire`]) |
//! | POST | `/v1/verify`, `/v1/prune`, `/v1/gc` | [`MaintRequest`] → report or plan |
//! | POST | `/v1/forget` | [`ForgetRequest`] → forgotten snapshot ids (a snapshot under a retention lock: `409`) |
//! | GET | `/v1/locks` | → list of [`SnapshotLock`] (see [`crate::retention`]) |
//! | POST | `/v1/snapshots/{spec}/lock` | [`LockRequest`] → [`LockAnswer`]; extends, never shortens (`409`) |
//! | GET, PUT | `/v1/retention` | [`RetentionPolicy`]: the minimum lock of new snapshots |
//!
//! The JSON messages are in [`messages`]; unknown fields are refused on both ends.
//!
//! Who may call which route: [`access_rule`] (roles of [`cairn_http::access`] on the object
//! `/vault/<repository id>`); forget, prune, GC and the retention policy need `admin`, and no
//! credential at all can forget a snapshot under a retention lock ([`crate::retention`]).
//!
//! Handlers only turn requests into calls on the [`Repository`]; blocking work runs on the
//! blocking pool. See `docs/PROTOCOL.md` for the frames (module [`crate::wire`]).
//!
//! # Session leases
//!
//! An open session holds a shared repository lock, which keeps gc and prune out. So that a
//! client that dies (kill -9, a lost host, a cut network) cannot hold it for ever, every
//! session has a **lease** ([`ServiceOptions::session_lease`], 5 minutes by default,
//! `cairn vault --session-lease SECS`):
//!
//! - every request naming the session renews it when it starts, as each piece of its body
//!   arrives, and when it ends; a session with a request in flight is never expired;
//! - [`RemoteVault`](crate::remote::RemoteVault) sessions also send `keepalive` every third of
//!   the lease (the lease is in the `begin` answer), so a client that is alive but busy for
//!   longer than the lease between two calls keeps its session;
//! - a reaper ([`VaultService::spawn_reaper`], every quarter of the lease, at most 10 s)
//!   aborts every session idle for longer than the lease: exactly as `DELETE` does, nothing
//!   of it becomes visible (durable containers stay unreferenced, for a retry to reuse and gc
//!   to sweep) and its shared lock is released. A later request naming it is `404`.
//!
//! # Request bodies
//!
//! No body is read whole before it is checked ([`cairn_http::body`]):
//!
//! | route | per-request limit | held in memory at once |
//! |---|---|---|
//! | `blobs` | [`wire::MAX_BODY`] | one frame: header, members, stored bytes and room for its plaintext (a few frames up to 1 MiB together), checked as it arrives |
//! | `lacking`, `fetch`, `fetch-near` | [`wire::MAX_DIGEST_BODY`] | the body |
//! | JSON routes | [`wire::MAX_JSON_BODY`] | the body |
//!
//! What a request holds is first reserved from one budget shared by every connection
//! ([`ServiceOptions::body_budget`], 64 MiB by default); a reservation waits its turn at most
//! [`ServiceOptions::body_wait`] (then `503`). A declared length over the limit is `413`
//! before anything is read; a malformed frame is `400` as soon as its header or members are
//! read, and the rest of the body is read and discarded so that the client gets the answer.
//! Frames of a refused upload that came before the bad one may already be stored: each was
//! decoded and re-hashed, and only a commit makes anything visible.
//! A body that sends nothing for [`ServiceOptions::body_idle`] is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use cairn_chunk::EncodedSegment;
use cairn_chunk::format::BlobKind;
use cairn_http::ApiError;
use cairn_http::access::Access;
use cairn_http::body::{BodyBudget, BodyError, BodyStream, Reservation};
use cairn_types::{Digest, SessionId};

use crate::error::VaultError;
use crate::repo::Repository;
use crate::session::{BackupSession, CommitRequest};
use crate::wire;

/// How long a session may go without a request before it is aborted.
pub const DEFAULT_SESSION_LEASE: Duration = Duration::from_secs(300);
/// Request-body bytes all connections may hold at once.
pub const DEFAULT_BODY_BUDGET: usize = 64 << 20;
/// How long a request may send no body data before it is dropped.
pub const DEFAULT_BODY_IDLE: Duration = Duration::from_secs(60);
/// How long a request waits for room in the body budget before it is `503`.
pub const DEFAULT_BODY_WAIT: Duration = Duration::from_secs(60);
/// After refusing a body, the service reads and discards at most this much more of it (for at
/// most `LINGER_TIME`) so that the client hears why.
const LINGER_BYTES: u64 = wire::MAX_BODY as u64;
const LINGER_TIME: Duration = Duration::from_secs(30);
/// Uploaded frames are stored in groups of about this many bytes (stored and plaintext),
/// one trip to the blocking pool each.
const UPLOAD_GROUP_BYTES: usize = 1 << 20;

/// How the service treats sessions and request bodies.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    pub session_lease: Duration,
    pub body_budget: usize,
    pub body_idle: Duration,
    pub body_wait: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            session_lease: DEFAULT_SESSION_LEASE,
            body_budget: DEFAULT_BODY_BUDGET,
            body_idle: DEFAULT_BODY_IDLE,
            body_wait: DEFAULT_BODY_WAIT,
        }
    }
}

/// When a session was last heard of.
#[derive(Debug)]
struct Lease {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Lease {
    fn new(epoch: Instant) -> Self {
        let l = Self {
            epoch,
            last_ms: AtomicU64::new(0),
        };
        l.renew();
        l
    }

    fn renew(&self) {
        self.last_ms
            .fetch_max(millis(self.epoch.elapsed()), Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let now = millis(self.epoch.elapsed());
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// An open session. Requests hold clones of `session` while they use it: one holder (the
/// table) means no request is in flight.
struct OpenSession {
    session: Arc<BackupSession>,
    lease: Arc<Lease>,
}

/// Shared state of the service.
pub struct VaultService {
    repo: Arc<Repository>,
    opts: ServiceOptions,
    epoch: Instant,
    sessions: Mutex<HashMap<SessionId, OpenSession>>,
    budget: BodyBudget,
    /// Disk-data bytes received (uploaded blobs) and sent (fetched blobs, image data).
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Sessions aborted because their lease ran out.
    pub sessions_expired: AtomicU64,
}

impl std::fmt::Debug for VaultService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultService")
            .field("opts", &self.opts)
            .finish()
    }
}

type Shared = Arc<VaultService>;
type ApiResult<T> = Result<T, ApiError>;

/// Milliseconds, saturating (a clock 584 million years on).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

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

/// Drains a refused body beside the error answer (see [`BodyStream::drain`]).
fn linger(body: BodyStream) {
    tokio::spawn(body.drain(LINGER_BYTES, LINGER_TIME));
}

fn parse_session(id: &str) -> ApiResult<SessionId> {
    id.parse()
        .map_err(|e: cairn_types::IdParseError| ApiError::bad_request(e.to_string()))
}

impl VaultService {
    pub fn new(repo: Arc<Repository>) -> Arc<Self> {
        Self::with_options(repo, ServiceOptions::default())
    }

    pub fn with_options(repo: Arc<Repository>, opts: ServiceOptions) -> Arc<Self> {
        Arc::new(Self {
            repo,
            budget: BodyBudget::new(opts.body_budget, opts.body_wait),
            opts,
            epoch: Instant::now(),
            sessions: Mutex::new(HashMap::new()),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            sessions_expired: AtomicU64::new(0),
        })
    }

    pub fn options(&self) -> &ServiceOptions {
        &self.opts
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, OpenSession>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_ms(&self) -> u64 {
        millis(self.opts.session_lease)
    }

    fn no_session(&self, id: SessionId) -> ApiError {
        ApiError::not_found(format!(
            "no open session {id} (committed, aborted, or expired after {} s without a request)",
            self.opts.session_lease.as_secs()
        ))
    }

    /// The open session `id`, its lease renewed.
    fn session(&self, id: &str) -> ApiResult<(Arc<BackupSession>, Arc<Lease>)> {
        let id = parse_session(id)?;
        let t = self.table();
        let open = t.get(&id).ok_or_else(|| self.no_session(id))?;
        open.lease.renew();
        Ok((open.session.clone(), open.lease.clone()))
    }

    /// Number of open sessions.
    pub fn open_sessions(&self) -> usize {
        self.table().len()
    }

    /// Aborts every session idle for longer than the lease with no request in flight, and
    /// returns how many. Blocks while their writers finish (call it off the async runtime).
    pub fn reap_expired(&self) -> usize {
        let lease = self.opts.session_lease;
        let expired: Vec<(SessionId, Duration, Arc<BackupSession>)> = {
            let mut t = self.table();
            let ids: Vec<SessionId> = t
                .iter()
                .filter(|(_, o)| o.lease.idle() > lease && Arc::strong_count(&o.session) == 1)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| t.remove(&id).map(|o| (id, o.lease.idle(), o.session)))
                .collect()
        };
        for (id, idle, _) in &expired {
            tracing::warn!(
                "session {id}: no request for {} s (lease {} s), aborting it",
                idle.as_secs(),
                lease.as_secs()
            );
        }
        let n = expired.len();
        self.sessions_expired.fetch_add(n as u64, Ordering::Relaxed);
        // Dropping the last holders aborts: writers finish, locks are released.
        drop(expired);
        n
    }

    /// Runs [`reap_expired`](Self::reap_expired) every quarter of the lease (at least every
    /// 10 s) until the service is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let every =
            (self.opts.session_lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(10));
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = weak.upgrade() else { break };
                let _ = tokio::task::spawn_blocking(move || s.reap_expired()).await;
            }
        })
    }

    /// A request's body, within `limit` and the idle timeout.
    fn body(&self, req: Request, limit: usize) -> BodyStream {
        BodyStream::new(req, limit as u64, self.opts.body_idle)
    }

    /// A whole (small) request body, with room reserved in the budget while it is used.
    async fn small_body(&self, req: Request, limit: usize) -> ApiResult<(Vec<u8>, Reservation)> {
        let mut body = self.body(req, limit);
        match body.to_vec(&self.budget).await {
            Ok(b) => Ok(b),
            Err(e) => {
                linger(body);
                Err(e.into())
            }
        }
    }

    /// The router, with only the admin token accepted (every route but `/health`).
    pub fn router(self: Arc<Self>, token: String) -> Router {
        let rule = access_rule(&self.repo.config().id);
        let access = Access::admin_only("vault", &token, rule);
        self.router_with(Arc::new(access))
    }

    /// The router, with `access` (admin and scoped tokens, [`access_rule`]) checking every
    /// route but `/health`.
    pub fn router_with(self: Arc<Self>, access: Arc<Access>) -> Router {
        cairn_http::access::with_access(
            Router::new()
                .route("/health", get(|| async { "ok" }))
                .route("/v1/config", get(config))
                .route("/v1/stats", get(stats))
                .route("/v1/keys", get(keys))
                .route("/v1/snapshots", get(list))
                .route("/v1/damaged", get(damaged))
                .route("/v1/snapshots/{spec}", get(find))
                .route("/v1/snapshots/{spec}/entries", get(entries))
                .route("/v1/snapshots/{spec}/data", get(data))
                .route("/v1/sessions", post(begin))
                .route("/v1/sessions/{id}/keepalive", post(keepalive))
                .route("/v1/sessions/{id}/lacking", post(lacking))
                .route("/v1/sessions/{id}/blobs", post(blobs))
                .route("/v1/sessions/{id}/commit", post(commit))
                .route("/v1/sessions/{id}", delete(abort))
                .route("/v1/fetch", post(fetch))
                .route("/v1/fetch-near", post(fetch_near))
                .route("/v1/verify", post(verify))
                .route("/v1/prune", post(prune))
                .route("/v1/gc", post(gc))
                .route("/v1/forget", post(forget))
                .route("/v1/locks", get(locks))
                .route("/v1/snapshots/{spec}/lock", post(lock))
                .route("/v1/retention", get(policy).put(set_policy))
                // Every handler reads its body through `BodyStream`; this only bounds an
                // extractor that would buffer one.
                .layer(DefaultBodyLimit::max(wire::MAX_JSON_BODY)),
            access,
        )
        .with_state(self)
    }
}

async fn config(State(s): State<Shared>) -> Response {
    json(s.repo.config().clone())
}

async fn stats(State(s): State<Shared>) -> Response {
    json(VaultStats {
        bytes_received: s.bytes_received.load(Ordering::Relaxed),
        bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
        open_sessions: s.open_sessions() as u64,
        expired_sessions: s.sessions_expired.load(Ordering::Relaxed),
        session_lease_ms: s.lease_ms(),
    })
}

async fn keys(State(s): State<Shared>) -> ApiResult<Response> {
    let repo = s.repo.clone();
    Ok(json(blocking(move || repo.list_keys()).await?))
}

async fn list(State(s): State<Shared>) -> ApiResult<Response> {
    let repo = s.repo.clone();
    Ok(json(blocking(move || repo.list_snapshots()).await?))
}

async fn damaged(State(s): State<Shared>) -> ApiResult<Response> {
    let repo = s.repo.clone();
    Ok(json(blocking(move || repo.damaged_segments()).await?))
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
    s.table().insert(
        id,
        OpenSession {
            session: Arc::new(session),
            lease: Arc::new(Lease::new(s.epoch)),
        },
    );
    Ok(json(SessionBegun {
        session: id,
        lease_ms: Some(s.lease_ms()),
    }))
}

/// Renews the lease only: holds nothing, so it never delays a commit.
async fn keepalive(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult<Response> {
    let sid = parse_session(&id)?;
    match s.table().get(&sid) {
        Some(open) => open.lease.renew(),
        None => return Err(s.no_session(sid)),
    }
    Ok(json(LeaseRenewed {
        lease_ms: s.lease_ms(),
    }))
}

async fn lacking(
    State(s): State<Shared>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Vec<u8>> {
    let (body, _room) = s.small_body(req, wire::MAX_DIGEST_BODY).await?;
    let (session, lease) = s.session(&id)?;
    let digests = wire::decode_digests(&body).map_err(ApiError::bad_request)?;
    drop(body);
    let l = blocking(move || session.lacking(&digests)).await?;
    lease.renew();
    Ok(l.into_iter().map(u8::from).collect())
}

async fn blobs(
    State(s): State<Shared>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let mut body = s.body(req, wire::MAX_BODY);
    let r = match s.session(&id) {
        Ok((session, lease)) => {
            let renew = lease.clone();
            body.on_data(move || renew.renew());
            let r = receive_uploads(&s, &session, &mut body).await;
            lease.renew();
            r
        }
        Err(e) => Err(e),
    };
    match r {
        Ok(stored) => Ok(json(Stored {
            stored: stored as u64,
        })),
        Err(e) => {
            linger(body);
            Err(e)
        }
    }
}

fn frame_error(what: &'static str) -> impl Fn(BodyError) -> ApiError {
    move |e| match e {
        BodyError::Truncated { .. } => ApiError::bad_request(format!("truncated frame: {what}")),
        e => e.into(),
    }
}

/// One uploaded frame, checked as far as it can be before it is decoded.
struct Frame {
    kind: BlobKind,
    members: Vec<(Digest, u32)>,
    seg: EncodedSegment,
}

/// Reads upload frames as they arrive (each header and member list checked before anything
/// more is read, each frame's room reserved in the budget first) and stores them in groups
/// of about [`UPLOAD_GROUP_BYTES`]. Returns how many frames were stored.
async fn receive_uploads(
    s: &VaultService,
    session: &Arc<BackupSession>,
    body: &mut BodyStream,
) -> ApiResult<usize> {
    let mut stored = 0;
    let mut segments = 0;
    let mut group: Vec<Frame> = Vec::new();
    // Room held by the frames of `group` (`room` below: by the frame being read).
    let mut group_room = Reservation::default();
    loop {
        let end = body.at_end().await.map_err(frame_error("frame header"))?;
        if end || group_room.bytes() >= UPLOAD_GROUP_BYTES {
            stored += store_group(s, session, std::mem::take(&mut group)).await?;
            group_room = Reservation::default();
        }
        if end {
            return Ok(stored);
        }
        let head = body
            .read_exact(wire::UPLOAD_HEADER_LEN)
            .await
            .map_err(frame_error("frame header"))?;
        let h = wire::parse_upload_header(&head, &mut segments).map_err(ApiError::bad_request)?;
        let members_len = h.members * wire::UPLOAD_MEMBER_LEN;
        // Room for the raw records and the parsed list.
        let need = members_len + h.members * std::mem::size_of::<(Digest, u32)>();
        if !group.is_empty() && s.budget.available() < need {
            // Never wait for room while holding much: store the group first.
            stored += store_group(s, session, std::mem::take(&mut group)).await?;
            group_room = Reservation::default();
        }
        let mut room = s.budget.reserve(need).await?;
        let raw = body
            .read_exact(members_len)
            .await
            .map_err(frame_error("frame members"))?;
        let members = wire::parse_upload_members(&raw).map_err(ApiError::bad_request)?;
        drop(raw);
        // Room for the stored bytes and for the plaintext they decode to.
        let plain: usize = members.iter().map(|m| m.1 as usize).sum();
        let need = h.stored + plain;
        if !group.is_empty() && s.budget.available() < need {
            stored += store_group(s, session, std::mem::take(&mut group)).await?;
            group_room = Reservation::default();
        }
        s.budget.grow(&mut room, need).await?;
        let bytes = body
            .read_exact(h.stored)
            .await
            .map_err(frame_error("frame body"))?;
        group.push(Frame {
            kind: h.kind,
            members,
            seg: EncodedSegment {
                codec: h.codec,
                bytes,
            },
        });
        group_room.merge(room);
    }
}

/// Decodes, re-hashes and stores a group of frames on the blocking pool.
async fn store_group(
    s: &VaultService,
    session: &Arc<BackupSession>,
    group: Vec<Frame>,
) -> ApiResult<usize> {
    if group.is_empty() {
        return Ok(0);
    }
    let n: u64 = group.iter().map(|f| f.seg.bytes.len() as u64).sum();
    let session = session.clone();
    let stored = blocking(move || {
        let mut k = 0;
        for f in group {
            k += usize::from(session.put_verified(f.kind, &f.members, &f.seg)?);
        }
        Ok(k)
    })
    .await?;
    s.bytes_received.fetch_add(n, Ordering::Relaxed);
    Ok(stored)
}

async fn commit(
    State(s): State<Shared>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let (body, room) = s.small_body(req, wire::MAX_JSON_BODY).await?;
    let sid = parse_session(&id)?;
    let req: CommitRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("commit request: {e}")))?;
    drop((body, room));
    let open = s.table().remove(&sid).ok_or_else(|| s.no_session(sid))?;
    let session = match Arc::try_unwrap(open.session) {
        Ok(session) => session,
        Err(session) => {
            // Still in use by another request: keep it open so the client can retry.
            open.lease.renew();
            s.table().insert(
                sid,
                OpenSession {
                    session,
                    lease: open.lease,
                },
            );
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
    let gone = s.table().remove(&sid);
    if let Some(open) = gone {
        tokio::task::spawn_blocking(move || drop(open));
    }
    Ok(json(Aborted { aborted: true }))
}

async fn fetch(State(s): State<Shared>, req: Request) -> ApiResult<Vec<u8>> {
    let (body, room) = s.small_body(req, wire::MAX_DIGEST_BODY).await?;
    let digests = wire::decode_digests(&body).map_err(ApiError::bad_request)?;
    drop((body, room));
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

async fn fetch_near(State(s): State<Shared>, req: Request) -> ApiResult<Vec<u8>> {
    let (body, room) = s.small_body(req, wire::MAX_DIGEST_BODY + 4).await?;
    let (required, optional) = wire::decode_near(&body).map_err(ApiError::bad_request)?;
    drop((body, room));
    let repo = s.repo.clone();
    let blobs = blocking(move || repo.read_near_raw(&required, &optional)).await?;
    let mut out = Vec::with_capacity(
        blobs
            .iter()
            .map(|b| b.1.1.as_ref().map_or(0, Vec::len) + 22)
            .sum(),
    );
    for (i, (loc, b)) in &blobs {
        let i = u32::try_from(*i).expect("at most MAX_DIGESTS");
        out.extend_from_slice(&i.to_le_bytes());
        wire::encode_download(&mut out, loc.codec, loc.member(), b.as_deref());
    }
    s.bytes_sent.fetch_add(out.len() as u64, Ordering::Relaxed);
    Ok(out)
}

async fn maint_req(s: &VaultService, req: Request) -> ApiResult<MaintRequest> {
    let (body, _room) = s.small_body(req, wire::MAX_JSON_BODY).await?;
    if body.is_empty() {
        return Ok(MaintRequest::default());
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("request: {e}")))
}

async fn verify(State(s): State<Shared>, req: Request) -> ApiResult<Response> {
    let r = maint_req(&s, req).await?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || crate::maint::verify(&repo, r.read_data)).await?,
    ))
}

async fn prune(State(s): State<Shared>, req: Request) -> ApiResult<Response> {
    let r = maint_req(&s, req).await?;
    let opts = r
        .prune
        .ok_or_else(|| ApiError::bad_request("prune needs retention rules"))?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || crate::maint::prune(&repo, &opts, r.dry_run)).await?,
    ))
}

async fn forget(State(s): State<Shared>, req: Request) -> ApiResult<Response> {
    let (body, _room) = s.small_body(req, wire::MAX_JSON_BODY).await?;
    let r: ForgetRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("forget request: {e}")))?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || crate::maint::forget(&repo, &r.snapshots)).await?,
    ))
}

async fn locks(State(s): State<Shared>) -> ApiResult<Response> {
    let repo = s.repo.clone();
    Ok(json(blocking(move || repo.lock_list()).await?))
}

async fn lock(
    State(s): State<Shared>,
    Path(spec): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let (body, _room) = s.small_body(req, wire::MAX_JSON_BODY).await?;
    let r: LockRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("lock request: {e}")))?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || repo.lock_spec(&spec, r.until)).await?,
    ))
}

async fn policy(State(s): State<Shared>) -> ApiResult<Response> {
    let repo = s.repo.clone();
    Ok(json(blocking(move || repo.retention_policy()).await?))
}

async fn set_policy(State(s): State<Shared>, req: Request) -> ApiResult<Response> {
    let (body, _room) = s.small_body(req, wire::MAX_JSON_BODY).await?;
    let p: RetentionPolicy = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("retention policy: {e}")))?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || repo.set_retention_policy(&p).map(|()| p)).await?,
    ))
}

async fn gc(State(s): State<Shared>, req: Request) -> ApiResult<Response> {
    let r = maint_req(&s, req).await?;
    let repo = s.repo.clone();
    Ok(json(
        blocking(move || {
            let opts = crate::maint::GcOptions {
                dry_run: r.dry_run,
                grace_secs: r.gc_grace_secs,
            };
            crate::maint::gc(&repo, &opts)
        })
        .await?,
    ))
}

/// Serves (and reaps expired sessions) until the runtime stops; returns once bound with the
/// listening address. Only the admin `token` is accepted.
pub async fn serve(
    service: Arc<VaultService>,
    addr: std::net::SocketAddr,
    tls: impl Into<cairn_http::server::ServerTls>,
    token: String,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let rule = access_rule(&service.repo.config().id);
    serve_with(
        service,
        addr,
        tls,
        Arc::new(Access::admin_only("vault", &token, rule)),
    )
    .await
}

/// [`serve`] with scoped tokens and an audit log ([`cairn_http::access`]).
pub async fn serve_with(
    service: Arc<VaultService>,
    addr: std::net::SocketAddr,
    tls: impl Into<cairn_http::server::ServerTls>,
    access: Arc<Access>,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    service.spawn_reaper();
    cairn_http::server::serve(service.router_with(access), addr, tls, "vault service").await
}

pub mod messages;
mod rules;

pub use rules::access_rule;

pub use messages::{
    Aborted, Empty, ForgetRequest, LeaseRenewed, LockAnswer, LockRequest, MaintRequest,
    RetentionPolicy, SessionBegun, SnapshotLock, Stored, VaultStats,
};

#[cfg(test)]
mod tests;
