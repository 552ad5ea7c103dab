//! The server's REST API (`docs/openapi.yaml`, also served at `/v1/openapi.yaml`). Handlers
//! only turn a request into a [`JobKind`] or a catalog query; long work runs as jobs and
//! answers `202` with the job, which clients poll at `/v1/jobs/{id}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cairn_catalog::Retention;
use cairn_http::ApiError;
use cairn_http::access::{Access, Caller, Need, Role, Rule};
use serde::Deserialize;

use cairn_api::server::{
    DeletedSchedule, PutSchedule, RestoreFileInto, RestoreFileIntoGuest, StartBackup, StartPrune,
    VmEntry, VmListState,
};

use crate::jobs::{JobKind, submit};
use crate::restore::RestoreParams;
use crate::scope::{self, READ};
use crate::{Result, Server};

type Shared = Arc<Server>;
type ApiResult<T> = std::result::Result<T, ApiError>;

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

async fn blocking<T: serde::Serialize + Send + 'static>(
    status: StatusCode,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> ApiResult<Response> {
    cairn_http::server::blocking_json(status, f).await
}

use cairn_http::server::json_body as body;

async fn vms(State(s): State<Shared>, Extension(c): Extension<Caller>) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        let live = s
            .manager
            .vms()
            .map_err(crate::ServerError::call("list VMs"))?;
        let known = s.catalog.vms()?;
        let mut out: Vec<VmEntry> = live
            .iter()
            .map(|v| {
                let k = known.iter().find(|k| k.name == v.name);
                VmEntry {
                    name: v.name.clone(),
                    host: Some(v.host.clone()),
                    state: v.state.into(),
                    origin: Some(v.origin.clone()),
                    vcpus: Some(v.spec.vcpus),
                    memory_mib: Some(v.spec.memory_mib),
                    disks: Some(v.disks.clone()),
                    unprotected: v.unprotected_disks(),
                    backups: k.map_or(0, |k| k.backups),
                    last_backup_ms: k.and_then(|k| k.last_backup_ms),
                }
            })
            .collect();
        // VMs with backups that no host runs any more.
        for k in known
            .iter()
            .filter(|k| !live.iter().any(|v| v.name == k.name))
        {
            out.push(VmEntry {
                name: k.name.clone(),
                host: None,
                state: VmListState::Absent,
                origin: None,
                vcpus: None,
                memory_mib: None,
                disks: None,
                unprotected: Vec::new(),
                backups: k.backups,
                last_backup_ms: k.last_backup_ms,
            });
        }
        out.retain(|v| scope::sees(&c, &v.name));
        Ok(out)
    })
    .await
}

#[derive(Deserialize)]
struct VmFilter {
    #[serde(default)]
    vm: Option<String>,
}

async fn backups(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<VmFilter>,
) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        let mut list = s.catalog.backups(q.vm.as_deref())?;
        list.retain(|b| scope::sees(&c, &b.vm));
        Ok(list)
    })
    .await
}

async fn backup(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        let mut b = s.catalog.backup(&id)?;
        scope::check(&c, READ, &b.vm)?;
        b.metadata = s.catalog.metadata(&b.timestamp_id).ok();
        b.volumes = s.catalog.backup_volumes(b.id.as_ref()).ok().flatten();
        Ok(b)
    })
    .await
}

async fn start_backup(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    b: Bytes,
) -> ApiResult<Response> {
    let r: StartBackup = body(&b)?;
    for vm in &r.vms {
        scope::check(&c, &[Role::Backup], vm).map_err(|e| e.to_api())?;
    }
    let kind = if r.group {
        JobKind::GroupBackup {
            vms: r.vms,
            full: r.full,
            skip_unprotected: r.skip_unprotected,
        }
    } else {
        JobKind::Backup {
            vms: r.vms,
            full: r.full,
            skip_unprotected: r.skip_unprotected,
        }
    };
    blocking(StatusCode::ACCEPTED, move || submit(&s, kind)).await
}

async fn start_restore(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    b: Bytes,
) -> ApiResult<Response> {
    let r: RestoreParams = body(&b)?;
    blocking(StatusCode::ACCEPTED, move || {
        // An unknown backup: 404 now, not a failed job later.
        scope::check_backup(&s, &c, &[Role::Restore], &r.backup)?;
        if r.over_existing {
            scope::check(&c, &[Role::Restore], &r.as_name)?;
        }
        submit(&s, JobKind::Restore(r))
    })
    .await
}

async fn start_prune(State(s): State<Shared>, b: Bytes) -> ApiResult<Response> {
    let r: StartPrune = body(&b)?;
    blocking(StatusCode::ACCEPTED, move || {
        submit(
            &s,
            JobKind::Prune {
                vms: r.vms,
                dry_run: r.dry_run,
            },
        )
    })
    .await
}

#[derive(Deserialize)]
struct JobsQuery {
    #[serde(default)]
    limit: Option<usize>,
}

async fn jobs(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<JobsQuery>,
) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        let mut list = s.catalog.jobs(q.limit.unwrap_or(50))?;
        list.retain(|j| scope::may_job(&s, &c, READ, j));
        Ok(list)
    })
    .await
}

async fn job(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        let mut j = s.catalog.job(&id)?;
        scope::check_job(&s, &c, READ, &j)?;
        j.events = Some(s.catalog.events(&j.id)?);
        Ok(j)
    })
    .await
}

async fn cancel_job(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        scope::check_job(&s, &c, &[Role::Backup, Role::Restore], &s.catalog.job(&id)?)?;
        crate::jobs::cancel(&s, &id)
    })
    .await
}

async fn schedules(State(s): State<Shared>) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || Ok(s.catalog.schedules()?)).await
}

async fn put_schedule(
    State(s): State<Shared>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let r: PutSchedule = body(&b)?;
    blocking(StatusCode::OK, move || {
        crate::schedule::put_schedule(&s, &name, r.vms, r.group, &r.every, r.first_in_s)
    })
    .await
}

async fn delete_schedule(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        s.catalog.delete_schedule(&name)?;
        Ok(DeletedSchedule { deleted: name })
    })
    .await
}

async fn get_retention(State(s): State<Shared>, Path(vm): Path<String>) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || Ok(s.catalog.retention(&vm)?)).await
}

async fn put_retention(
    State(s): State<Shared>,
    Path(vm): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let r: Retention = body(&b)?;
    for v in [r.keep_last, r.keep_daily, r.keep_weekly, r.keep_monthly]
        .into_iter()
        .flatten()
    {
        if !(0..=100_000).contains(&v) {
            return Err(ApiError::bad_request(format!("retention count {v}")));
        }
    }
    blocking(StatusCode::OK, move || {
        s.catalog.set_retention(&vm, &r)?;
        Ok(r)
    })
    .await
}

#[derive(Deserialize)]
struct LsQuery {
    backup: String,
    #[serde(default)]
    path: Option<String>,
}

async fn files_ls(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<LsQuery>,
) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        scope::check_backup(&s, &c, READ, &q.backup)?;
        s.files_ls(&q.backup, q.path.as_deref().unwrap_or("/"))
    })
    .await
}

#[derive(Deserialize)]
struct FindQuery {
    pattern: String,
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    icase: bool,
}

async fn files_find(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<FindQuery>,
) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        let mut hits = s.files_find(&q.pattern, q.vm, q.limit.unwrap_or(1000), q.icase)?;
        hits.retain(|h| scope::sees(&c, &h.vm));
        Ok(hits)
    })
    .await
}

#[derive(Deserialize)]
struct VersionsQuery {
    vm: String,
    path: String,
}

async fn files_versions(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<VersionsQuery>,
) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || {
        scope::check(&c, READ, &q.vm)?;
        s.files_versions(&q.vm, &q.path)
    })
    .await
}

#[derive(Deserialize)]
struct ContentQuery {
    backup: String,
    path: String,
}

/// A file's bytes (or a directory's tar stream), with its metadata in `x-cairn-*` headers.
async fn files_content(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<ContentQuery>,
) -> ApiResult<Response> {
    let (body, tar, meta, fetched) = tokio::task::spawn_blocking(move || {
        scope::check_backup(&s, &c, &[Role::Restore], &q.backup)?;
        s.files_content(&q.backup, &q.path)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| e.to_api())?;
    let ct = if tar {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    Ok((
        [
            ("content-type", ct.to_string()),
            (
                cairn_api::client::FILE_HEADER,
                serde_json::to_string(&meta).map_err(|e| ApiError::internal(e.to_string()))?,
            ),
            (
                cairn_api::client::FILE_VAULT_BYTES_HEADER,
                fetched.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

async fn files_restore(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    b: Bytes,
) -> ApiResult<Response> {
    let r: RestoreFileInto = body(&b)?;
    blocking(StatusCode::OK, move || {
        scope::check_backup(&s, &c, &[Role::Restore], &r.backup)?;
        s.files_restore_into(
            &r.backup,
            &r.path,
            r.storage_agent.as_deref(),
            r.datastore.as_deref(),
            &r.dest,
        )
    })
    .await
}

async fn files_restore_guest(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    b: Bytes,
) -> ApiResult<Response> {
    let r: RestoreFileIntoGuest = body(&b)?;
    blocking(StatusCode::OK, move || {
        let from = scope::backup_vm(&s, &r.backup)?;
        scope::check(&c, &[Role::Restore], &from)?;
        scope::check(&c, &[Role::Restore], r.vm.as_deref().unwrap_or(&from))?;
        s.files_restore_into_guest(&r)
    })
    .await
}

/// `POST /v1/join`: a join token and a public key in, a certificate out (no bearer token:
/// the join token is the credential; a refusal is `401` and audited).
async fn join(State(s): State<Shared>, b: Bytes) -> ApiResult<Response> {
    let r: cairn_http::ca::JoinRequest = body(&b)?;
    let ca = s.ca.clone();
    cairn_http::server::blocking_json(StatusCode::OK, move || {
        ca.join(&r).map_err(|e| {
            use cairn_http::ca::CaError;
            let kind = match &e {
                CaError::Join(_) => cairn_http::ErrorKind::Unauthorized,
                CaError::Invalid(_) => cairn_http::ErrorKind::BadRequest,
                _ => cairn_http::ErrorKind::Internal,
            };
            ApiError::new(kind, e.to_string())
        })
    })
    .await
}

/// `GET /v1/ca/crl`: the CA's signed revocation list (open: it is signed, and services on
/// other machines refresh their copy from it).
async fn crl(State(s): State<Shared>) -> ApiResult<Response> {
    let ca = s.ca.clone();
    let pem = tokio::task::spawn_blocking(move || ca.crl_pem())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(([("content-type", "application/pkix-crl")], pem).into_response())
}

/// `GET /v1/leader`: whether this server is the active one ([`crate::leader`]).
async fn leader(State(s): State<Shared>) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || s.leader.status(&s.catalog)).await
}

/// Middleware: a standby server ([`crate::leader`]) answers reads and refuses every change
/// with `503` naming the active server; joining stays open (the CA is this server's own).
async fn standby_refuses_changes(
    State(s): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let reads = matches!(*req.method(), Method::GET | Method::HEAD);
    if reads || req.uri().path() == "/v1/join" || s.leader.is_active() {
        return next.run(req).await;
    }
    let message = tokio::task::spawn_blocking(move || s.leader.standby_message(&s.catalog))
        .await
        .unwrap_or_else(|e| format!("standby: {e}"));
    ApiError::new(cairn_http::ErrorKind::Unavailable, message).into_response()
}

async fn stats(State(s): State<Shared>) -> ApiResult<Response> {
    blocking(StatusCode::OK, move || Ok(s.data_path())).await
}

/// What each route needs ([`cairn_http::access`]): reading takes any role; reading file
/// contents and restoring take `restore`; starting backups takes `backup`; a job is cancelled
/// by `backup` or `restore`; prune, schedules and retention rules need `admin`. The routes
/// that work on VMs name `/server/vms` and let a token scoped to single VMs through; their
/// handlers check each VM ([`crate::scope`]). The others need their role on `/server`.
pub fn access_rule() -> Rule {
    use Role::{Audit, Backup, Restore};
    Arc::new(|m: &Method, path: &str| {
        let p: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if matches!(
            (m.as_str(), &p[..]),
            ("POST", ["v1", "join"]) | ("GET", ["v1", "ca", "crl"])
        ) {
            return Need::public(path);
        }
        let (roles, per_vm): (&'static [Role], bool) = match (m.as_str(), &p[..]) {
            ("GET", ["v1", "files", "content"]) => (&[Restore], true),
            ("GET", ["v1", "vms" | "backups" | "jobs" | "files", ..]) => (READ, true),
            ("GET", _) => (&[Audit, Backup, Restore], false),
            ("POST", ["v1", "backups"]) => (&[Backup], true),
            (
                "POST",
                ["v1", "restores"] | ["v1", "files", "restore"] | ["v1", "files", "restore-guest"],
            ) => (&[Restore], true),
            ("POST", ["v1", "jobs", _, "cancel"]) => (&[Backup, Restore], true),
            _ => (&[], false),
        };
        if per_vm {
            Need {
                below: true,
                ..Need::on(roles, scope::VMS)
            }
        } else {
            Need::on(roles, "/server")
        }
    })
}

/// The router, with only the admin token accepted on every route but `/health` and the
/// OpenAPI document.
pub fn router(server: Arc<Server>, token: String) -> Router {
    router_with(
        server,
        Arc::new(Access::admin_only("server", &token, access_rule())),
    )
}

/// The router, with `access` (admin and scoped tokens, [`access_rule`]) on every route but
/// `/health` and the OpenAPI document.
pub fn router_with(server: Arc<Server>, access: Arc<Access>) -> Router {
    let api = cairn_http::access::with_access(
        Router::new()
            .route("/v1/leader", get(leader))
            .route("/v1/vms", get(vms))
            .route("/v1/backups", get(backups).post(start_backup))
            .route("/v1/backups/{id}", get(backup))
            .route("/v1/restores", post(start_restore))
            .route("/v1/prune", post(start_prune))
            .route("/v1/jobs", get(jobs))
            .route("/v1/jobs/{id}", get(job))
            .route("/v1/jobs/{id}/cancel", post(cancel_job))
            .route("/v1/schedules", get(schedules))
            .route(
                "/v1/schedules/{name}",
                axum::routing::put(put_schedule).delete(delete_schedule),
            )
            .route("/v1/retention/{vm}", get(get_retention).put(put_retention))
            .route("/v1/files", get(files_ls))
            .route("/v1/files/find", get(files_find))
            .route("/v1/files/versions", get(files_versions))
            .route("/v1/files/content", get(files_content))
            .route("/v1/files/restore", post(files_restore))
            .route("/v1/files/restore-guest", post(files_restore_guest))
            .route("/v1/stats", get(stats))
            .route("/v1/join", post(join))
            .route("/v1/ca/crl", get(crl))
            // Inside the access check: an unauthenticated caller learns nothing of the lease.
            .layer(axum::middleware::from_fn_with_state(
                server.clone(),
                standby_refuses_changes,
            )),
        access,
    )
    .with_state(server);
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/v1/openapi.yaml",
            get(|| async { ([("content-type", "application/yaml")], OPENAPI) }),
        )
        .merge(api)
}

/// Serves until the task is aborted; returns once bound, with the listening address.
pub async fn serve(
    server: Arc<Server>,
    addr: SocketAddr,
    tls: impl Into<cairn_http::server::ServerTls>,
    token: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    cairn_http::server::serve(router(server, token), addr, tls, "backup server").await
}

/// [`serve`] with scoped tokens and an audit log.
pub async fn serve_with(
    server: Arc<Server>,
    addr: SocketAddr,
    tls: impl Into<cairn_http::server::ServerTls>,
    access: Arc<Access>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    cairn_http::server::serve(router_with(server, access), addr, tls, "backup server").await
}
