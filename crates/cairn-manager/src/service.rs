//! The manager's HTTPS API. Handlers turn a request into one [`Inventory`] call or one relayed
//! call to an agent, run on the blocking pool; see `docs/MANAGER.md` for the table.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use cairn_http::ApiError;
use serde_json::Value;

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

/// Calls the host agent of `vm` at `path` (with `{id}` replaced by the host's VM id).
fn relay_vm(
    inv: &Inventory,
    vm: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value> {
    let loc = inv.vm(vm)?;
    let host = inv.agent(AgentKind::Host, &loc.host)?;
    let c = crate::inventory::client_for(&host.registration)?;
    let path = path.replace("{id}", &loc.host_vm_id);
    let r = match (method, body) {
        ("POST", Some(b)) => c.post_json(&path, b),
        ("DELETE", _) => c.delete_json(&path),
        _ => c.get_json(&path),
    };
    r.map_err(|e| agent_error(&host.registration, e))
}

async fn heartbeat(State(inv): State<Shared>, b: Bytes) -> ApiResult<Response> {
    let r: Registration = body(&b)?;
    blocking(move || inv.heartbeat(r)).await
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
        Ok(serde_json::json!({ "removed": name }))
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
    blocking(move || relay_vm(&inv, &name, "DELETE", "/v1/vms/{id}", None)).await
}

async fn snapshot(
    State(inv): State<Shared>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let req: Value = body(&b)?;
    let r = blocking(move || relay_vm(&inv, &name, "POST", "/v1/vms/{id}/snapshots", Some(&req)))
        .await?;
    Ok((StatusCode::CREATED, r).into_response())
}

async fn save_state(
    State(inv): State<Shared>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let req: Value = body(&b)?;
    blocking(move || relay_vm(&inv, &name, "POST", "/v1/vms/{id}/state", Some(&req))).await
}

async fn usage(State(inv): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    blocking(move || relay_vm(&inv, &name, "GET", "/v1/vms/{id}/usage", None)).await
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
    let path = format!(
        "/v1/vms/{{id}}/guest?timeout_ms={}",
        q.timeout_ms.unwrap_or(2000)
    );
    blocking(move || relay_vm(&inv, &name, "GET", &path, None)).await
}

async fn guest_exec(
    State(inv): State<Shared>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let req: Value = body(&b)?;
    blocking(move || relay_vm(&inv, &name, "POST", "/v1/vms/{id}/guest/exec", Some(&req))).await
}

fn host_client(inv: &Inventory, host: &str) -> Result<(cairn_http::Client, Registration)> {
    let a = inv.agent(AgentKind::Host, host)?;
    Ok((
        crate::inventory::client_for(&a.registration)?,
        a.registration,
    ))
}

async fn delete_snapshot(
    State(inv): State<Shared>,
    Path((host, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    blocking(move || {
        let (c, r) = host_client(&inv, &host)?;
        c.delete_json::<Value>(&format!("/v1/snapshots/{id}"))
            .map_err(|e| agent_error(&r, e))
    })
    .await
}

async fn provision(
    State(inv): State<Shared>,
    Path(host): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let spec: Value = body(&b)?;
    let r = blocking(move || {
        let (c, r) = host_client(&inv, &host)?;
        c.post_json::<_, Value>("/v1/vms", &spec)
            .map_err(|e| agent_error(&r, e))
    })
    .await?;
    Ok((StatusCode::CREATED, r).into_response())
}

async fn saved_state(
    State(inv): State<Shared>,
    Path((host, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let (c, r) = host_client(&inv, &host)?;
        c.get_bytes(&format!("/v1/saved/{name}"))
            .map_err(|e| agent_error(&r, e))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e: ManagerError| e.to_api())?;
    Ok(bytes.into_response())
}

async fn delete_saved_state(
    State(inv): State<Shared>,
    Path((host, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    blocking(move || {
        let (c, r) = host_client(&inv, &host)?;
        c.delete_json::<Value>(&format!("/v1/saved/{name}"))
            .map_err(|e| agent_error(&r, e))
    })
    .await
}

/// The router, with the token check on every route but `/health`.
pub fn router(inv: Arc<Inventory>, token: String) -> Router {
    cairn_http::server::with_token(
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
            .route("/v1/hosts/{host}/snapshots/{id}", delete(delete_snapshot))
            .route("/v1/hosts/{host}/vms", post(provision))
            .route(
                "/v1/hosts/{host}/saved/{name}",
                get(saved_state).delete(delete_saved_state),
            ),
        token,
    )
    .with_state(inv)
}

/// Serves until the task is aborted; returns once bound, with the listening address.
pub async fn serve(
    inv: Arc<Inventory>,
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    token: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    cairn_http::server::serve(router(inv, token), addr, tls, "manager service").await
}
