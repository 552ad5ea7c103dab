//! The host agent's HTTPS service: a thin JSON layer over a [`HypervisorDriver`].
//!
//! Every route but `GET /health` needs `Authorization: Bearer TOKEN`
//! ([`cairn_http::server::with_token`]); errors are `{"error": {"kind", "message"}}`
//! ([`ApiError`]). Ids in paths are 16 lowercase hex digits; a malformed id is `400`, a
//! well-formed id the agent does not know is `404`.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | `/health` | → `{"status": "ok"}` (no token needed) |
//! | GET | `/v1/vms` | → [`VmInfo`] list, oldest first |
//! | POST | `/v1/vms` | [`VmSpec`] → `201` [`VmInfo`]: QEMU started, QMP answers |
//! | GET | `/v1/vms/{vm}` | → [`VmInfo`] (`state`: running / unresponsive / gone) |
//! | DELETE | `/v1/vms/{vm}?timeout_ms=` | → `{"stopped": vm}`: snapshots torn down, `quit`, SIGKILL past the timeout (default 30 s); `409` for a running adopted QEMU (never stopped) |
//! | POST | `/v1/vms/{vm}/snapshots` | [`SnapshotRequest`] (empty body: defaults) → `201` [`VmSnapshot`] with `quiesce` and `quiesce_window_ms` |
//! | GET | `/v1/snapshots` | → in-flight [`VmSnapshot`] list |
//! | GET | `/v1/snapshots/{snapshot}` | → [`VmSnapshot`] |
//! | DELETE | `/v1/snapshots/{snapshot}` | → [`DeletedSnapshot`] (`lifetime_ms`) |
//! | GET | `/v1/vms/{vm}/changes?since=CHECKPOINT` | → [`ChangesReport`]: per disk, [`crate::Changes`] |
//! | POST | `/v1/vms/{vm}/state` | [`SaveStateRequest`] (empty body: defaults) → [`SavedState`]: file under `STATE/saved/` |
//! | GET | `/v1/vms/{vm}/usage` | → [`ResourceUsage`] |
//! | POST | `/v1/recover` | → `{"cleared": N}`: journal entries torn down |
//!
//! # Errors
//!
//! | driver error | status |
//! |---|---|
//! | unknown VM or snapshot | `404 not_found` |
//! | invalid spec, malformed JSON, id or query | `400 bad_request` |
//! | VM not running, QEMU gone mid-call, a snapshot already in flight, state file exists, stopping an adopted QEMU, a disk that cannot be mapped | `409 conflict` |
//! | timeouts, QEMU rejecting a command, tools, I/O, corrupt state files | `500 internal` |
//!
//! # Behaviour
//!
//! Handlers only translate HTTP to driver calls. Calls that change something (start, stop,
//! snapshot, delete, save state, recover) run in their own task: a client that hangs up does
//! not cancel them half-way, and a snapshot whose answer was lost is still listed under
//! `/v1/snapshots` for the caller to delete.
//!
//! The service keeps in-flight snapshots in memory, as the driver returned them, so
//! `DELETE /v1/snapshots/{id}` can hand the full [`VmSnapshot`] back to the driver. After an
//! agent restart the map is empty; the driver's journal still knows the snapshots and
//! `recover()` (run at start, or `POST /v1/recover`) tears them down. `POST /v1/recover` also
//! tears down the snapshots this agent holds: use it when nothing is backing up.

use std::collections::HashMap;
use std::error::Error as _;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cairn_http::{ApiError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::driver::{
    DriverError, HypervisorDriver, ResourceUsage, SavedState, SnapshotOptions, VmInfo, VmSnapshot,
    VmState,
};
use crate::qemu::QemuDriver;
use crate::qmp::QmpError;
use crate::spec::{CheckpointId, VmId, VmSnapshotId, VmSpec};

/// Request bodies are small JSON documents.
const MAX_BODY: usize = 1 << 20;
/// Default bound on stopping a VM (`quit`, then SIGKILL).
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Subdirectory of the state dir that saved execution states go to.
pub const SAVED_STATE_DIR: &str = "saved";

pub use cairn_api::host::{
    ChangesReport, DeletedSnapshot, DeletedState, DiskChanges, ExecRequest, ExecResult,
    GuestStatus, Recovered, SaveStateRequest, SnapshotRequest, StoppedVm,
};

/// The driver options of a snapshot request; scratch images always go to the driver's default
/// place.
pub fn snapshot_options(req: &SnapshotRequest) -> SnapshotOptions {
    let d = SnapshotOptions::default();
    SnapshotOptions {
        kind: req.kind.unwrap_or(d.kind),
        quiesce: req.quiesce,
        since: req.since,
        scratch_dir: None,
        agent_timeout: req
            .agent_timeout_ms
            .map_or(d.agent_timeout, Duration::from_millis),
        freeze_timeout: req
            .freeze_timeout_ms
            .map_or(d.freeze_timeout, Duration::from_millis),
    }
}

/// The host agent service: shared state of the handlers.
pub struct HostAgentService {
    driver: Arc<dyn HypervisorDriver>,
    state_dir: PathBuf,
    /// Snapshots created through this service and not yet deleted.
    snapshots: Mutex<HashMap<VmSnapshotId, VmSnapshot>>,
}

impl std::fmt::Debug for HostAgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAgentService")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

type Shared = Arc<HostAgentService>;
type ApiResult<T> = Result<T, ApiError>;

/// The error and its causes on one line.
fn chain(e: &DriverError) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cur = s.source();
    }
    msg
}

/// Maps a driver error to the status that says whose fault it is.
pub fn api_error(e: &DriverError) -> ApiError {
    let kind = match e {
        DriverError::UnknownVm(_) | DriverError::UnknownSnapshot(_) => ErrorKind::NotFound,
        DriverError::InvalidSpec(_) => ErrorKind::BadRequest,
        DriverError::NotRunning(_)
        | DriverError::SnapshotInProgress { .. }
        | DriverError::Refused { .. } => ErrorKind::Conflict,
        DriverError::Qmp {
            source: QmpError::Disconnected { .. } | QmpError::Connect { .. },
            ..
        } => ErrorKind::Conflict,
        DriverError::Qmp { .. }
        | DriverError::GuestAgent { .. }
        | DriverError::Process(_)
        | DriverError::Io { .. }
        | DriverError::Corrupt { .. }
        | DriverError::Tool { .. }
        | DriverError::Timeout { .. }
        | DriverError::Failed { .. } => ErrorKind::Internal,
    };
    ApiError::new(kind, chain(e))
}

fn json<T: Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

fn created<T: Serialize>(v: T) -> Response {
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

fn parse_id<T: std::str::FromStr<Err = crate::spec::IdError>>(s: &str) -> ApiResult<T> {
    s.parse()
        .map_err(|e: crate::spec::IdError| ApiError::bad_request(e.to_string()))
}

/// A JSON body; an empty (or all-whitespace) body is `T::default()`.
fn body<T: serde::de::DeserializeOwned + Default>(b: &[u8], what: &str) -> ApiResult<T> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
}

/// Runs a driver call to completion in its own task, whatever happens to the request.
async fn detached<T: Send + 'static>(
    f: impl Future<Output = Result<T, DriverError>> + Send + 'static,
) -> ApiResult<T> {
    tokio::spawn(f)
        .await
        .map_err(|e| ApiError::internal(format!("driver task: {e}")))?
        .map_err(|e| api_error(&e))
}

impl HostAgentService {
    /// A service over any driver; saved states go under `state_dir/saved/`.
    pub fn new(driver: Arc<dyn HypervisorDriver>, state_dir: &FsPath) -> Arc<Self> {
        Arc::new(Self {
            driver,
            state_dir: state_dir.to_owned(),
            snapshots: Mutex::new(HashMap::new()),
        })
    }

    /// A service over a [`QemuDriver`], sharing its state directory.
    pub fn qemu(driver: Arc<QemuDriver>) -> Arc<Self> {
        let state = driver.state_dir().to_owned();
        Self::new(driver, &state)
    }

    /// The in-flight snapshots this service holds.
    pub fn snapshots(&self) -> Vec<VmSnapshot> {
        let mut v: Vec<VmSnapshot> = self.map().values().cloned().collect();
        v.sort_by_key(|s| s.created_at_ms);
        v
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<VmSnapshotId, VmSnapshot>> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The router, with the token check applied to every route but `/health`.
    pub fn router(self: Arc<Self>, token: String) -> Router {
        cairn_http::server::with_token(
            Router::new()
                .route("/health", get(health))
                .route("/v1/vms", get(list_vms).post(start_vm))
                .route("/v1/vms/{vm}", get(vm_status).delete(stop_vm))
                .route("/v1/vms/{vm}/snapshots", post(snapshot))
                .route("/v1/vms/{vm}/changes", get(changes))
                .route("/v1/vms/{vm}/state", post(save_state))
                .route("/v1/vms/{vm}/usage", get(usage))
                .route("/v1/vms/{vm}/guest", get(guest))
                .route("/v1/vms/{vm}/guest/exec", post(guest_exec))
                .route("/v1/vms/{vm}/guest/files", post(write_guest_file))
                .route(
                    "/v1/saved/{name}",
                    get(saved_state).delete(delete_saved_state),
                )
                .route("/v1/snapshots", get(list_snapshots))
                .route(
                    "/v1/snapshots/{snapshot}",
                    get(get_snapshot).delete(delete_snapshot),
                )
                .route("/v1/recover", post(recover))
                .layer(DefaultBodyLimit::max(MAX_BODY)),
            token,
        )
        .with_state(self)
    }
}

async fn health() -> Response {
    json(serde_json::json!({ "status": "ok" }))
}

async fn list_vms(State(s): State<Shared>) -> ApiResult<Response> {
    let vms = s.driver.list_vms().await.map_err(|e| api_error(&e))?;
    Ok(json(vms))
}

async fn start_vm(State(s): State<Shared>, b: Bytes) -> ApiResult<Response> {
    let spec: VmSpec =
        serde_json::from_slice(&b).map_err(|e| ApiError::bad_request(format!("VM spec: {e}")))?;
    let d = Arc::clone(&s.driver);
    let info: VmInfo = detached(async move {
        let handle = d.start_vm(&spec).await?;
        // Started and recorded: a failing status query must not hide that.
        Ok(match d.vm_status(handle.id).await {
            Ok(info) => info,
            Err(e) => VmInfo {
                unprotected: Vec::new(),
                handle,
                spec,
                state: VmState::Unresponsive { reason: chain(&e) },
            },
        })
    })
    .await?;
    tracing::info!(vm = %info.handle.id, name = %info.handle.name, "VM started");
    Ok(created(info))
}

async fn vm_status(State(s): State<Shared>, Path(vm): Path<String>) -> ApiResult<Response> {
    let vm: VmId = parse_id(&vm)?;
    let info = s.driver.vm_status(vm).await.map_err(|e| api_error(&e))?;
    Ok(json(info))
}

#[derive(Deserialize)]
struct StopQuery {
    timeout_ms: Option<u64>,
}

async fn stop_vm(
    State(s): State<Shared>,
    Path(vm): Path<String>,
    Query(q): Query<StopQuery>,
) -> ApiResult<Response> {
    let vm: VmId = parse_id(&vm)?;
    let timeout = q
        .timeout_ms
        .map_or(DEFAULT_STOP_TIMEOUT, Duration::from_millis);
    let d = Arc::clone(&s.driver);
    detached(async move { d.stop_vm(vm, timeout).await }).await?;
    // stop_vm tears the VM's snapshots down first.
    s.map().retain(|_, snap| snap.vm != vm);
    tracing::info!(vm = %vm, "VM stopped");
    Ok(json(StoppedVm { stopped: vm }))
}

async fn snapshot(
    State(s): State<Shared>,
    Path(vm): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let vm: VmId = parse_id(&vm)?;
    let req: SnapshotRequest = body(&b, "snapshot request")?;
    let opts = snapshot_options(&req);
    let svc = Arc::clone(&s);
    let snap = detached(async move {
        let snap = svc.driver.snapshot(vm, &opts).await?;
        // Recorded inside the task: a lost answer still leaves it deletable.
        svc.map().insert(snap.id, snap.clone());
        cairn_types::fault::point("host.snapshot.after_snapshot");
        Ok(snap)
    })
    .await?;
    tracing::info!(vm = %vm, snapshot = %snap.id, quiesce = ?snap.quiesce,
        window_ms = snap.quiesce_window_ms, "snapshot taken");
    Ok(created(snap))
}

async fn list_snapshots(State(s): State<Shared>) -> Response {
    json(s.snapshots())
}

fn find_snapshot(s: &HostAgentService, id: &str) -> ApiResult<VmSnapshot> {
    let id: VmSnapshotId = parse_id(id)?;
    s.map()
        .get(&id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no snapshot {id} in flight")))
}

async fn get_snapshot(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(find_snapshot(&s, &id)?))
}

async fn delete_snapshot(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult<Response> {
    let snap = find_snapshot(&s, &id)?;
    // Taken out while the driver works, so a second delete is a clean 404.
    if s.map().remove(&snap.id).is_none() {
        return Err(ApiError::not_found(format!(
            "no snapshot {} in flight",
            snap.id
        )));
    }
    let svc = Arc::clone(&s);
    let deleted = detached(async move {
        match svc.driver.delete_snapshot(&snap).await {
            Ok(lifetime_ms) => Ok(DeletedSnapshot {
                snapshot: snap.id,
                vm: snap.vm,
                lifetime_ms,
            }),
            // Gone from the driver already (recovered, VM stopped): nothing to put back.
            Err(e @ DriverError::UnknownSnapshot(_)) => Err(e),
            // Cleanup failed: the journal keeps it for recover(); the caller may retry.
            Err(e) => {
                svc.map().insert(snap.id, snap);
                Err(e)
            }
        }
    })
    .await?;
    tracing::info!(snapshot = %deleted.snapshot, lifetime_ms = deleted.lifetime_ms,
        "snapshot deleted");
    Ok(json(deleted))
}

#[derive(Deserialize)]
struct ChangesQuery {
    since: Option<String>,
}

async fn changes(
    State(s): State<Shared>,
    Path(vm): Path<String>,
    Query(q): Query<ChangesQuery>,
) -> ApiResult<Response> {
    let vm: VmId = parse_id(&vm)?;
    let since: CheckpointId =
        parse_id(q.since.as_deref().ok_or_else(|| {
            ApiError::bad_request("query parameter since=CHECKPOINT is required")
        })?)?;
    let disks = s
        .driver
        .changes_since(vm, since)
        .await
        .map_err(|e| api_error(&e))?
        .into_iter()
        .map(|(disk, changes)| DiskChanges { disk, changes })
        .collect();
    Ok(json(ChangesReport { vm, since, disks }))
}

/// A plain file name: one component, printable, no leading dot.
fn valid_state_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

async fn save_state(
    State(s): State<Shared>,
    Path(vm): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let vm: VmId = parse_id(&vm)?;
    let req: SaveStateRequest = body(&b, "save-state request")?;
    let name = match req.name {
        Some(n) if valid_state_name(&n) => n,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "state file name {n:?}: use letters, digits, '.', '-', '_' and no leading dot"
            )));
        }
        None => format!("{vm}-{}.state", crate::state::now_ms()),
    };
    let dir = s.state_dir.join(SAVED_STATE_DIR);
    std::fs::create_dir_all(&dir).map_err(|source| {
        api_error(&DriverError::Io {
            path: dir.clone(),
            source,
        })
    })?;
    let path = dir.join(&name);
    if path.exists() {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!("{} exists", path.display()),
        ));
    }
    let d = Arc::clone(&s.driver);
    let saved: SavedState = detached(async move { d.save_state(vm, &path).await }).await?;
    tracing::info!(vm = %vm, path = %saved.path.display(), bytes = saved.bytes, "state saved");
    Ok(json(saved))
}

async fn usage(State(s): State<Shared>, Path(vm): Path<String>) -> ApiResult<Response> {
    let vm: VmId = parse_id(&vm)?;
    let u: ResourceUsage = s
        .driver
        .resource_usage(vm)
        .await
        .map_err(|e| api_error(&e))?;
    Ok(json(u))
}

#[derive(Deserialize)]
struct GuestQuery {
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// The driver's guest-agent client of `vm` (a second connection would starve the first).
async fn guest_agent(s: &HostAgentService, vm: VmId) -> ApiResult<Arc<crate::qga::GuestAgent>> {
    let info = s.driver.vm_status(vm).await.map_err(|e| api_error(&e))?;
    if matches!(
        info.handle.origin,
        cairn_api::host::VmOrigin::Libvirt { .. }
    ) {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            "libvirt owns this domain's guest agent channel: use libvirt (virsh \
             qemu-agent-command) to run commands in the guest",
        ));
    }
    Ok(s.driver.guest_agent_of(vm).unwrap_or_else(|| {
        Arc::new(crate::qga::GuestAgent::new(
            &info.handle.qga_socket,
            Default::default(),
        ))
    }))
}

async fn guest(
    State(s): State<Shared>,
    Path(vm): Path<String>,
    Query(q): Query<GuestQuery>,
) -> ApiResult<Response> {
    let vm: VmId = parse_id(&vm)?;
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(2000).min(60_000));
    if let Some(status) = s.driver.guest_status(vm, timeout) {
        return Ok(json(status.await));
    }
    let ga = guest_agent(&s, vm).await?;
    let status = match ga.wait_ready(timeout).await {
        Err(e) => GuestStatus {
            agent: false,
            filesystems: vec![],
            error: Some(e.to_string()),
        },
        Ok(_) => match ga.get_fsinfo().await {
            Ok(fs) => GuestStatus {
                agent: true,
                filesystems: fs
                    .into_iter()
                    .map(|f| (f.mountpoint, f.fs_type, f.name))
                    .collect(),
                error: None,
            },
            Err(e) => GuestStatus {
                agent: true,
                filesystems: vec![],
                error: Some(e.to_string()),
            },
        },
    };
    Ok(json(status))
}

/// Runs a shell command in the guest through `qemu-ga` (`guest-exec`) and waits for it.
async fn guest_exec(
    State(s): State<Shared>,
    Path(vm): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let vm: VmId = parse_id(&vm)?;
    let req: ExecRequest = body(&b, "exec request")?;
    let ga = guest_agent(&s, vm).await?;
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(30_000).min(600_000));
    let st = ga
        .exec_wait(&crate::qga::GuestExec::shell(&req.shell), timeout)
        .await
        .map_err(|e| ApiError::new(ErrorKind::Conflict, format!("guest agent: {e}")))?;
    Ok(json(ExecResult {
        exit_code: st.exit_code,
        signal: st.signal,
        stdout: String::from_utf8_lossy(&st.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&st.stderr).into_owned(),
    }))
}

/// Writes a directory or one piece of a file into the guest (restore into the guest).
async fn write_guest_file(
    State(s): State<Shared>,
    Path(vm): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    use crate::qga::files::{GuestFileError, write};
    let vm: VmId = parse_id(&vm)?;
    let req: cairn_api::host::GuestFileWrite = serde_json::from_slice(&b)
        .map_err(|e| ApiError::bad_request(format!("guest file request: {e}")))?;
    let ga: Arc<dyn crate::qga::AgentCommands> = match s.driver.agent_commands(vm) {
        Some(a) => a,
        None => guest_agent(&s, vm).await?,
    };
    match write(ga.as_ref(), &req).await {
        Ok(w) => Ok(json(w)),
        Err(GuestFileError::Invalid(m)) => Err(ApiError::bad_request(m)),
        Err(e) => Err(ApiError::new(ErrorKind::Conflict, e.to_string())),
    }
}

/// Downloads a saved execution state (`GET`) or deletes it (`DELETE`).
async fn saved_state(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    if !valid_state_name(&name) {
        return Err(ApiError::bad_request(format!("state file name {name:?}")));
    }
    let path = s.state_dir.join(SAVED_STATE_DIR).join(&name);
    match tokio::fs::read(&path).await {
        Ok(b) => Ok(b.into_response()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("no saved state {name}"),
        )),
        Err(source) => Err(api_error(&DriverError::Io { path, source })),
    }
}

async fn delete_saved_state(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    if !valid_state_name(&name) {
        return Err(ApiError::bad_request(format!("state file name {name:?}")));
    }
    let path = s.state_dir.join(SAVED_STATE_DIR).join(&name);
    match tokio::fs::remove_file(&path).await {
        Ok(()) => Ok(json(DeletedState { deleted: name })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("no saved state {name}"),
        )),
        Err(source) => Err(api_error(&DriverError::Io { path, source })),
    }
}

async fn recover(State(s): State<Shared>) -> ApiResult<Response> {
    let d = Arc::clone(&s.driver);
    let cleared = detached(async move { d.recover().await }).await?;
    // recover() tears down every journal entry, ours included.
    s.map().clear();
    Ok(json(Recovered { cleared }))
}

/// Serves until the task is aborted; returns once bound, with the listening address.
pub async fn serve(
    service: Arc<HostAgentService>,
    addr: SocketAddr,
    tls: impl Into<cairn_http::server::ServerTls>,
    token: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    cairn_http::server::serve(service.router(token), addr, tls, "host agent service").await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{QuiescePolicy, SnapshotKind};
    use crate::spec::SpecError;

    #[test]
    fn driver_errors_map_to_whose_fault_it_is() {
        let vm: VmId = "8000000000000001".parse().unwrap();
        let status = |e: DriverError| api_error(&e).kind.status().as_u16();
        assert_eq!(status(DriverError::UnknownVm(vm)), 404);
        assert_eq!(
            status(DriverError::UnknownSnapshot(
                "8000000000000002".parse().unwrap()
            )),
            404
        );
        assert_eq!(
            status(DriverError::InvalidSpec(SpecError("no disks".into()))),
            400
        );
        assert_eq!(status(DriverError::NotRunning(vm)), 409);
        let refused = DriverError::Refused {
            vm,
            reason: "adopted QEMU is never stopped".into(),
        };
        assert!(api_error(&refused).message.contains("never stopped"));
        assert_eq!(status(refused), 409);
        let gone = QmpError::Disconnected {
            what: "query-status".into(),
            reason: "EOF".into(),
        };
        let e = DriverError::Qmp { vm, source: gone };
        assert!(api_error(&e).message.contains("EOF"), "{}", api_error(&e));
        assert_eq!(status(e), 409);
        let slow = QmpError::Timeout {
            what: "migrate".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(status(DriverError::Qmp { vm, source: slow }), 500);
        assert_eq!(
            status(DriverError::Timeout {
                what: "job".into(),
                after: Duration::from_secs(1)
            }),
            500
        );
    }

    #[test]
    fn snapshot_request_defaults_and_strictness() {
        let r: SnapshotRequest = body(b"  ", "x").unwrap();
        let o = snapshot_options(&r);
        let d = SnapshotOptions::default();
        assert_eq!((o.kind, o.quiesce, o.since), (d.kind, d.quiesce, d.since));
        assert_eq!(o.agent_timeout, d.agent_timeout);
        let r: SnapshotRequest = body(
            br#"{"kind":"overlay","quiesce":"pause_only","agent_timeout_ms":250}"#,
            "x",
        )
        .unwrap();
        let o = snapshot_options(&r);
        assert_eq!(o.kind, SnapshotKind::Overlay);
        assert_eq!(o.quiesce, QuiescePolicy::PauseOnly);
        assert_eq!(o.agent_timeout, Duration::from_millis(250));
        assert!(o.scratch_dir.is_none());
        let e = body::<SnapshotRequest>(br#"{"scratch_dir":"/etc"}"#, "x").unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
    }

    #[test]
    fn state_file_names_stay_in_the_directory() {
        for ok in ["vm.state", "a-b_c.1"] {
            assert!(valid_state_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "../x",
            "a/b",
            "a\\b",
            "x y",
            &"a".repeat(201),
        ] {
            assert!(!valid_state_name(bad), "{bad:?}");
        }
    }
}
