//! The manager's HTTPS API. Handlers turn a request into one [`Inventory`] call or one relayed
//! call to an agent, run on the blocking pool; see `docs/MANAGER.md` for the table.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::Method;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use cairn_api::host::{
    ExecRequest, GuestFileWrite, IdError, SaveStateRequest, SnapshotRequest, VmSnapshotId, VmSpec,
};
use cairn_api::manager::RemovedAgent;
use cairn_api::{CallResult, HostAgentApi};
use cairn_http::ca::ServiceId;
use cairn_http::mtls::Peer;
use cairn_http::{ApiError, ErrorKind};

use crate::inventory::{AgentKind, Inventory, Registration, agent_error};
use crate::{ManagerError, Result};

type Shared = Arc<Inventory>;
type ApiResult<T> = std::result::Result<T, ApiError>;

async fn blocking<T: serde::Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> ApiResult<Response> {
    cairn_http::server::blocking_json(StatusCode::OK, f).await
}

use cairn_http::server::json_body as body;

fn kind(s: &str) -> ApiResult<AgentKind> {
    match s {
        "host" => Ok(AgentKind::Host),
        "storage" => Ok(AgentKind::Storage),
        _ => Err(ApiError::bad_request(format!(
            "agent kind {s:?}: host or storage"
        ))),
    }
}

/// An agent's certificate names it (`storage/st1`): it registers only itself.
async fn heartbeat(
    State(inv): State<Shared>,
    peer: Option<Extension<Peer>>,
    b: Bytes,
) -> ApiResult<Response> {
    let r: Registration = body(&b)?;
    if let Some(id) = peer.as_ref().and_then(|p| p.id())
        && is_agent(id)
        && (id.role != r.kind.as_str() || id.name != r.name)
    {
        return Err(ApiError::new(
            ErrorKind::Forbidden,
            format!(
                "certificate {id} may register only itself, not {}/{}",
                r.kind, r.name
            ),
        ));
    }
    blocking(move || inv.heartbeat(r)).await
}

fn is_agent(id: &ServiceId) -> bool {
    id.role == "host" || id.role == "storage"
}

/// Under mutual TLS, an agent's certificate calls nothing here but its own heartbeat: a
/// compromised agent cannot relay commands to hosts, list credentials or remove agents.
async fn agent_bounds(req: Request, next: Next) -> Response {
    let agent = req
        .extensions()
        .get::<Peer>()
        .and_then(|p| p.id())
        .filter(|id| is_agent(id))
        .cloned();
    let heartbeat = req.method() == Method::POST && req.uri().path() == "/v1/agents";
    match agent {
        Some(id) if !heartbeat && req.uri().path() != "/health" => ApiError::new(
            ErrorKind::Forbidden,
            format!("certificate {id} is an agent's: it may only register itself here"),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

async fn agents(State(inv): State<Shared>) -> ApiResult<Response> {
    blocking(move || Ok(inv.agents())).await
}

async fn agent(
    State(inv): State<Shared>,
    Path((k, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let k = kind(&k)?;
    blocking(move || inv.agent(k, &name)).await
}

async fn remove_agent(
    State(inv): State<Shared>,
    Path((k, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let k = kind(&k)?;
    blocking(move || {
        inv.remove(k, &name)?;
        Ok(RemovedAgent { removed: name })
    })
    .await
}

async fn vms(State(inv): State<Shared>) -> ApiResult<Response> {
    blocking(move || inv.vms()).await
}

async fn vm(State(inv): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    blocking(move || inv.vm(&name)).await
}

async fn stop_vm(State(inv): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    blocking(move || inv.on_vm_host(&name, |h, id| h.stop_vm(id, None))).await
}

async fn snapshot(
    State(inv): State<Shared>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let req: SnapshotRequest = body(&b)?;
    let r = blocking(move || inv.on_vm_host(&name, |h, id| h.snapshot(id, &req))).await?;
    Ok((StatusCode::CREATED, r).into_response())
}

async fn save_state(
    State(inv): State<Shared>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let req: SaveStateRequest = body(&b)?;
    blocking(move || inv.on_vm_host(&name, |h, id| h.save_state(id, &req))).await
}

async fn usage(State(inv): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    blocking(move || inv.on_vm_host(&name, |h, id| h.usage(id))).await
}

#[derive(serde::Deserialize)]
struct GuestQuery {
    #[serde(default)]
    timeout_ms: Option<u64>,
}

async fn guest(
    State(inv): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<GuestQuery>,
) -> ApiResult<Response> {
    let timeout_ms = q.timeout_ms.unwrap_or(2000);
    blocking(move || inv.on_vm_host(&name, |h, id| h.guest(id, timeout_ms))).await
}

async fn guest_exec(
    State(inv): State<Shared>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let req: ExecRequest = body(&b)?;
    blocking(move || inv.on_vm_host(&name, |h, id| h.guest_exec(id, &req))).await
}

async fn write_guest_file(
    State(inv): State<Shared>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let req: GuestFileWrite = body(&b)?;
    blocking(move || inv.on_vm_host(&name, |h, id| h.write_guest_file(id, &req))).await
}

/// Runs `call` on the host agent named `host`.
fn on_host<T>(
    inv: &Inventory,
    host: &str,
    call: impl FnOnce(&dyn HostAgentApi) -> CallResult<T>,
) -> Result<T> {
    let (c, r) = inv.host_agent(host)?;
    call(&*c).map_err(|e| agent_error(&r, e))
}

async fn delete_snapshot(
    State(inv): State<Shared>,
    Path((host, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let id: VmSnapshotId = id
        .parse()
        .map_err(|e: IdError| ApiError::bad_request(e.to_string()))?;
    blocking(move || on_host(&inv, &host, |h| h.delete_snapshot(id))).await
}

async fn provision(
    State(inv): State<Shared>,
    Path(host): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let spec: VmSpec = body(&b)?;
    let r = blocking(move || on_host(&inv, &host, |h| h.start_vm(&spec))).await?;
    Ok((StatusCode::CREATED, r).into_response())
}

async fn saved_state(
    State(inv): State<Shared>,
    Path((host, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let bytes = tokio::task::spawn_blocking(move || on_host(&inv, &host, |h| h.saved_state(&name)))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e: ManagerError| e.to_api())?;
    Ok(bytes.into_response())
}

async fn delete_saved_state(
    State(inv): State<Shared>,
    Path((host, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    blocking(move || on_host(&inv, &host, |h| h.delete_saved_state(&name))).await
}

/// The router, with the token check on every route but `/health`.
pub fn router(inv: Arc<Inventory>, token: String) -> Router {
    router_with(
        inv,
        Arc::new(cairn_http::access::Access::admin_only(
            "manager",
            &token,
            access_rule(),
        )),
    )
}

/// Every route needs the admin token; heartbeats (every few seconds from every agent) are
/// left out of the audit log unless refused.
pub fn access_rule() -> cairn_http::access::Rule {
    Arc::new(|m: &Method, path: &str| cairn_http::access::Need {
        quiet: m == Method::POST && path == "/v1/agents",
        ..cairn_http::access::Need::on(&[], path)
    })
}

/// [`router`] with `access` (the admin token and an audit log: `Access::from_state`).
pub fn router_with(inv: Arc<Inventory>, access: Arc<cairn_http::access::Access>) -> Router {
    cairn_http::access::with_access(
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/v1/agents", post(heartbeat).get(agents))
            .route("/v1/agents/{kind}/{name}", get(agent).delete(remove_agent))
            .route("/v1/vms", get(vms))
            .route("/v1/vms/{vm}", get(vm).delete(stop_vm))
            .route("/v1/vms/{vm}/snapshots", post(snapshot))
            .route("/v1/vms/{vm}/state", post(save_state))
            .route("/v1/vms/{vm}/usage", get(usage))
            .route("/v1/vms/{vm}/guest", get(guest))
            .route("/v1/vms/{vm}/guest/exec", post(guest_exec))
            .route("/v1/vms/{vm}/guest/files", post(write_guest_file))
            .route("/v1/hosts/{host}/snapshots/{id}", delete(delete_snapshot))
            .route("/v1/hosts/{host}/vms", post(provision))
            .route(
                "/v1/hosts/{host}/saved/{name}",
                get(saved_state).delete(delete_saved_state),
            ),
        access,
    )
    .layer(axum::middleware::from_fn(agent_bounds))
    .with_state(inv)
}

/// Serves until the task is aborted; returns once bound, with the listening address.
pub async fn serve(
    inv: Arc<Inventory>,
    addr: SocketAddr,
    tls: impl Into<cairn_http::server::ServerTls>,
    token: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    cairn_http::server::serve(router(inv, token), addr, tls, "manager service").await
}

/// [`serve`] with `access` (an audit log of every change and refusal).
pub async fn serve_with(
    inv: Arc<Inventory>,
    addr: SocketAddr,
    tls: impl Into<cairn_http::server::ServerTls>,
    access: Arc<cairn_http::access::Access>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    cairn_http::server::serve(router_with(inv, access), addr, tls, "manager service").await
}
