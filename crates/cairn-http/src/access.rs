//! Who may call what: scoped tokens, each service's rules, and the audit log.
//!
//! A service knows two kinds of bearer token:
//!
//! - its **admin token** (`STATE/token`, or `CAIRN_TOKEN`): every scope on everything, as
//!   before scopes existed;
//! - **scoped tokens** in `STATE/tokens.json`, made with `cairn token add`: a name, the
//!   SHA-256 of the secret (the secret itself is shown once and never stored), and scopes.
//!
//! A scope is `ROLE:PATH`, as an access rule in Proxmox Backup Server: the role on every
//! object whose path starts with PATH (whole segments: `/vault/ab` covers `/vault/ab/x`, not
//! `/vault/abc`). Roles:
//!
//! | role | may |
//! |---|---|
//! | `audit` | read lists, states, counters and reports; change nothing, read no data |
//! | `backup` | add snapshots and read what an incremental needs; never forget, prune, collect or shorten a lock |
//! | `restore` | read data |
//! | `admin` | everything |
//!
//! Each service names, for each of its routes, the roles that may call it and the object's
//! path ([`Rule`]). A request with no valid token is `401`; one whose token lacks the scope is
//! `403`; either does nothing. The token file is read again when it changes, so a removed
//! token is refused from its next request on.
//!
//! **Audit log**: every call that changes something (any method but `GET`, except the
//! high-volume calls a rule marks quiet) and every refusal is appended to `STATE/audit.log`
//! as one JSON line: time, service, caller, method, path, status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};

use crate::error::{ApiError, ErrorKind};

/// A role a scope grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Audit,
    Backup,
    Restore,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Audit, Role::Backup, Role::Restore, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Audit => "audit",
            Role::Backup => "backup",
            Role::Restore => "restore",
            Role::Admin => "admin",
        }
    }
}

/// `ROLE:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub role: Role,
    pub path: String,
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (role, path) = s.split_once(':').unwrap_or((s, "/"));
        let role = Role::ALL
            .into_iter()
            .find(|r| r.as_str() == role)
            .ok_or_else(|| format!("{role:?} is not a role (audit, backup, restore, admin)"))?;
        if !path.starts_with('/') || path.contains("//") || path.chars().any(char::is_whitespace) {
            return Err(format!("{path:?} is not a path (e.g. / or /vault/ID)"));
        }
        let path = if path.len() > 1 {
            path.trim_end_matches('/')
        } else {
            path
        };
        Ok(Scope {
            role,
            path: path.to_string(),
        })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.role.as_str(), self.path)
    }
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Scope {
    /// Does this scope grant one of `roles` on `object`?
    pub fn grants(&self, roles: &[Role], object: &str) -> bool {
        let path_ok = self.path == "/"
            || object == self.path
            || object
                .strip_prefix(self.path.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
        self.has_role(roles) && path_ok
    }

    /// Does this scope grant one of `roles` on some object below `object` (and not on
    /// `object` itself)?
    pub fn grants_below(&self, roles: &[Role], object: &str) -> bool {
        let below = object == "/"
            || self
                .path
                .strip_prefix(object)
                .is_some_and(|rest| rest.starts_with('/'));
        self.has_role(roles) && below && self.path != object
    }

    fn has_role(&self, roles: &[Role]) -> bool {
        self.role == Role::Admin || roles.contains(&self.role)
    }
}

/// One scoped token as `tokens.json` keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    /// SHA-256 of the secret, hex.
    pub sha256: String,
    pub scopes: Vec<Scope>,
    /// Unix seconds.
    pub created: u64,
}

/// `tokens.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    pub tokens: Vec<TokenEntry>,
}

/// The file of scoped tokens in a state directory.
pub fn tokens_path(state: &Path) -> PathBuf {
    state.join("tokens.json")
}

/// The audit log in a state directory.
pub fn audit_path(state: &Path) -> PathBuf {
    state.join("audit.log")
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

impl TokenFile {
    /// Reads `path`; a missing file holds no tokens.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes `path` atomically, readable by its owner only.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("token json"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// Adds a token named `name` with `scopes`; returns its secret (shown once).
    pub fn add(&mut self, name: &str, scopes: Vec<Scope>) -> Result<String, String> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!("{name:?}: a token name is 1-64 of [A-Za-z0-9._-]"));
        }
        if self.tokens.iter().any(|t| t.name == name) {
            return Err(format!("a token named {name:?} exists (remove it first)"));
        }
        if scopes.is_empty() {
            return Err("a token needs at least one scope (ROLE:PATH)".into());
        }
        let secret = format!("cairn_{}", hex::encode(rand::random::<[u8; 24]>()));
        self.tokens.push(TokenEntry {
            name: name.to_string(),
            sha256: sha256_hex(secret.as_bytes()),
            scopes,
            created: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
        Ok(secret)
    }

    /// Removes the token named `name`; false when there is none.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.tokens.len();
        self.tokens.retain(|t| t.name != name);
        self.tokens.len() != before
    }
}

/// What a route needs: one of `roles` (admin always qualifies) on `object`; `quiet` keeps
/// an allowed call out of the audit log (high-volume data calls of a session).
///
/// With `below`, the route works on objects below `object` (one VM of `/server/vms`): a
/// token with the role on one of them passes the middleware too, and the handler then
/// checks each object it touches, or filters what it lists, with [`Caller::may`].
#[derive(Clone, Debug)]
pub struct Need {
    pub roles: &'static [Role],
    pub object: String,
    pub quiet: bool,
    pub below: bool,
    /// Open to callers without a token (the credential is in the request, as a join token's);
    /// audited like any change.
    pub public: bool,
}

impl Need {
    /// `roles` on `object`, audited, not below.
    pub fn on(roles: &'static [Role], object: impl Into<String>) -> Self {
        Self {
            roles,
            object: object.into(),
            quiet: false,
            below: false,
            public: false,
        }
    }

    /// Open to every caller, audited (see [`Need::public`](Self::public)).
    pub fn public(object: impl Into<String>) -> Self {
        Self {
            public: true,
            ..Self::on(&[], object)
        }
    }
}

/// A service's rules: what `method` on `path` needs.
pub type Rule = Arc<dyn Fn(&Method, &str) -> Need + Send + Sync>;

/// The caller a request was allowed for, in the request's extensions.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    /// The token's scopes; `None` for the admin token, which may do everything.
    pub scopes: Option<Vec<Scope>>,
}

impl Caller {
    /// The admin: every scope.
    pub fn admin() -> Self {
        Self {
            name: "admin".into(),
            scopes: None,
        }
    }

    /// May this caller act with one of `roles` on `object`?
    pub fn may(&self, roles: &[Role], object: &str) -> bool {
        self.scopes
            .as_ref()
            .is_none_or(|s| s.iter().any(|s| s.grants(roles, object)))
    }

    /// The refusal of an object [`may`](Self::may) denies (`403`, naming the caller).
    pub fn refuse(&self, roles: &[Role], object: &str) -> ApiError {
        let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        ApiError::new(
            ErrorKind::Forbidden,
            format!(
                "not allowed: token {:?} has no {} scope on {object}",
                self.name,
                if roles.is_empty() {
                    "admin".to_string()
                } else {
                    roles.join(" or ")
                },
            ),
        )
    }
}

/// A file's modification time and length: when either changes, the file is read again.
type FileStamp = (SystemTime, u64);

/// A service's access control: its admin token, its scoped tokens, its rules, its audit log.
pub struct Access {
    service: &'static str,
    admin_sha256: String,
    tokens_path: Option<PathBuf>,
    /// The token file as last read, and its modification time and length then.
    cached: Mutex<(Option<FileStamp>, Vec<TokenEntry>)>,
    rule: Rule,
    audit: Option<Mutex<std::fs::File>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("service", &self.service)
            .field("tokens", &self.tokens_path)
            .finish()
    }
}

impl Access {
    /// Only the admin token: every route, no audit log (tests, embedded services).
    pub fn admin_only(service: &'static str, admin_token: &str, rule: Rule) -> Self {
        Self {
            service,
            admin_sha256: sha256_hex(admin_token.as_bytes()),
            tokens_path: None,
            cached: Mutex::new((None, Vec::new())),
            rule,
            audit: None,
        }
    }

    /// The admin token, the scoped tokens of `STATE/tokens.json` and the audit log
    /// `STATE/audit.log`.
    pub fn from_state(
        service: &'static str,
        admin_token: &str,
        state: &Path,
        rule: Rule,
    ) -> std::io::Result<Self> {
        let audit = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(audit_path(state))?;
        let a = Self {
            tokens_path: Some(tokens_path(state)),
            audit: Some(Mutex::new(audit)),
            ..Self::admin_only(service, admin_token, rule)
        };
        a.scoped()?;
        Ok(a)
    }

    /// The scoped tokens, read again when the file changed.
    fn scoped(&self) -> std::io::Result<Vec<TokenEntry>> {
        let Some(path) = &self.tokens_path else {
            return Ok(Vec::new());
        };
        let stamp = match std::fs::metadata(path) {
            Ok(m) => Some((m.modified()?, m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut c = self.cached.lock().expect("token cache");
        if c.0 != stamp || (stamp.is_some() && c.1.is_empty()) {
            *c = (stamp, TokenFile::load(path)?.tokens);
        }
        Ok(c.1.clone())
    }

    /// Who presents `token` and whether they may do what `need` says; a refusal names the
    /// caller when the token is known.
    fn check(
        &self,
        token: Option<&str>,
        need: &Need,
    ) -> Result<Caller, (Option<String>, ApiError)> {
        self.check_inner(token, need).map_err(|e| {
            let who = match (&e.kind, token) {
                (ErrorKind::Forbidden, Some(t)) => self.name_of(t),
                _ => None,
            };
            (who, e)
        })
    }

    fn name_of(&self, token: &str) -> Option<String> {
        let hash = sha256_hex(token.as_bytes());
        let tokens = self.scoped().ok()?;
        tokens
            .into_iter()
            .find(|t| t.sha256 == hash)
            .map(|t| t.name)
    }

    fn check_inner(&self, token: Option<&str>, need: &Need) -> Result<Caller, ApiError> {
        let unauthorized =
            || ApiError::new(ErrorKind::Unauthorized, "missing or invalid bearer token");
        let token = token.ok_or_else(unauthorized)?;
        let hash = sha256_hex(token.as_bytes());
        if constant_time_eq(hash.as_bytes(), self.admin_sha256.as_bytes()) {
            return Ok(Caller::admin());
        }
        let tokens = self.scoped().map_err(|e| {
            ApiError::new(ErrorKind::Internal, format!("reading the token file: {e}"))
        })?;
        let entry = tokens
            .iter()
            .find(|t| constant_time_eq(hash.as_bytes(), t.sha256.as_bytes()))
            .ok_or_else(unauthorized)?;
        let granted = entry.scopes.iter().any(|s| {
            s.grants(need.roles, &need.object)
                || (need.below && s.grants_below(need.roles, &need.object))
        });
        if granted {
            Ok(Caller {
                name: entry.name.clone(),
                scopes: Some(entry.scopes.clone()),
            })
        } else {
            let roles: Vec<&str> = need.roles.iter().map(|r| r.as_str()).collect();
            Err(ApiError::new(
                ErrorKind::Forbidden,
                format!(
                    "not allowed: token {:?} has no {} scope on {} (it has {})",
                    entry.name,
                    if roles.is_empty() {
                        "admin".to_string()
                    } else {
                        roles.join(" or ")
                    },
                    need.object,
                    entry
                        .scopes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    }

    fn audit(&self, caller: &str, peer: Option<&str>, method: &Method, path: &str, status: u16) {
        let Some(f) = &self.audit else { return };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let line = serde_json::json!({
            "time": cairn_types::time::rfc3339(now.as_secs()),
            "unix_ms": u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            "service": self.service,
            "caller": caller,
            "peer": peer,
            "method": method.as_str(),
            "path": path,
            "status": status,
        });
        let mut f = f.lock().expect("audit log");
        if let Err(e) = writeln!(f, "{line}") {
            tracing::error!("audit log: {e}");
        }
    }
}

/// Puts the access check ([`require_access`]) in front of every route of `router`.
pub fn with_access<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    access: Arc<Access>,
) -> axum::Router<S> {
    router.layer(axum::middleware::from_fn_with_state(access, require_access))
}

/// Middleware: `401` without a valid token, `403` without the scope the route needs; both
/// logged. `GET /health` is open.
pub async fn require_access(
    State(access): State<Arc<Access>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    if path == "/health" {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let need = (access.rule)(&method, &path);
    let peer = req
        .extensions()
        .get::<crate::mtls::Peer>()
        .and_then(|p| p.cert.as_ref())
        .map(|c| c.common_name.clone());
    let peer = peer.as_deref();
    if need.public {
        let resp = next.run(req).await;
        if method != Method::GET || !resp.status().is_success() {
            access.audit("(public)", peer, &method, &path, resp.status().as_u16());
        }
        return resp;
    }
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match access.check(token, &need) {
        Ok(caller) => {
            let name = caller.name.clone();
            req.extensions_mut().insert(caller);
            let resp = next.run(req).await;
            // A handler's own refusal (one VM of a `below` route) is a refusal too.
            let refused = resp.status() == axum::http::StatusCode::FORBIDDEN;
            if (method != Method::GET && !need.quiet) || refused {
                access.audit(&name, peer, &method, &path, resp.status().as_u16());
            }
            resp
        }
        Err((known, e)) => {
            let who = match (known, token) {
                (Some(name), _) => name,
                (None, Some(_)) => "(invalid token)".into(),
                (None, None) => "(no token)".into(),
            };
            let resp = e.into_response();
            access.audit(&who, peer, &method, &path, resp.status().as_u16());
            resp
        }
    }
}

/// The rule of a service whose every route needs admin (one token, as before scopes).
pub fn admin_rule(_: &Method, path: &str) -> Need {
    Need::on(&[], path)
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(roles: &'static [Role], object: &str) -> Need {
        Need::on(roles, object)
    }

    #[test]
    fn scopes_parse_and_grant_by_role_and_whole_path_segments() {
        let s: Scope = "backup:/vault/ab".parse().unwrap();
        assert!(s.grants(&[Role::Backup], "/vault/ab"));
        assert!(s.grants(&[Role::Backup, Role::Restore], "/vault/ab/snap"));
        assert!(!s.grants(&[Role::Backup], "/vault/abc"));
        assert!(!s.grants(&[Role::Restore], "/vault/ab"));
        assert!(!s.grants(&[], "/vault/ab"), "admin routes need admin");
        let admin: Scope = "admin:/".parse().unwrap();
        assert!(admin.grants(&[], "/anything"));
        assert_eq!("audit".parse::<Scope>().unwrap().to_string(), "audit:/");
        assert_eq!("audit:/x/".parse::<Scope>().unwrap().path, "/x");
        for bad in ["root:/", "backup:x", "backup:/a//b", "backup:/a b"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_scope_below_an_object_passes_routes_that_narrow_and_is_checked_per_object() {
        let vm: Scope = "restore:/server/vms/web1".parse().unwrap();
        assert!(vm.grants_below(&[Role::Restore], "/server/vms"));
        assert!(vm.grants_below(&[Role::Restore], "/"));
        assert!(
            !vm.grants_below(&[Role::Restore], "/server/vms/web1"),
            "not below itself"
        );
        assert!(!vm.grants_below(&[Role::Backup], "/server/vms"));
        assert!(
            !vm.grants_below(&[Role::Restore], "/server/vm"),
            "whole segments"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut f = TokenFile::default();
        let secret = f.add("web1-restore", vec![vm]).unwrap();
        f.save(&tokens_path(dir.path())).unwrap();
        let a = Access::from_state("test", "the-admin", dir.path(), Arc::new(admin_rule)).unwrap();
        let route = Need {
            below: true,
            ..need(&[Role::Restore], "/server/vms")
        };
        let caller = a.check(Some(&secret), &route).unwrap();
        assert!(caller.may(&[Role::Restore], "/server/vms/web1"));
        assert!(!caller.may(&[Role::Restore], "/server/vms/web2"));
        assert!(!caller.may(&[Role::Backup], "/server/vms/web1"));
        let e = caller.refuse(&[Role::Restore], "/server/vms/web2");
        assert_eq!(e.kind, ErrorKind::Forbidden);
        assert!(e.message.contains("web1-restore"), "{}", e.message);
        // Without `below` the same route on the whole collection is refused.
        assert!(
            a.check(Some(&secret), &need(&[Role::Restore], "/server/vms"))
                .is_err()
        );
        assert!(
            a.check(Some("the-admin"), &route)
                .unwrap()
                .may(&[], "/anything")
        );
    }

    #[test]
    fn tokens_are_stored_hashed_and_checked_against_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = TokenFile::default();
        let secret = f
            .add("agent-1", vec!["backup:/vault/r1".parse().unwrap()])
            .unwrap();
        assert!(f.add("agent-1", vec![]).is_err(), "names are unique");
        assert!(f.add("bad name", vec![]).is_err());
        f.save(&tokens_path(dir.path())).unwrap();
        let raw = std::fs::read_to_string(tokens_path(dir.path())).unwrap();
        assert!(!raw.contains(&secret), "the secret is never stored");

        let a = Access::from_state("test", "the-admin", dir.path(), Arc::new(admin_rule)).unwrap();
        let n = need(&[Role::Backup], "/vault/r1");
        assert_eq!(a.check(Some(&secret), &n).unwrap().name, "agent-1");
        let unwrap_err = |r: Result<Caller, (Option<String>, ApiError)>| r.unwrap_err().1;
        assert_eq!(a.check(Some("the-admin"), &n).unwrap().name, "admin");
        let (who, e) = a.check(Some(&secret), &need(&[], "/vault/r1")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Forbidden);
        assert_eq!(
            who.as_deref(),
            Some("agent-1"),
            "a refusal names a known caller"
        );
        assert!(e.message.contains("agent-1"), "{}", e.message);
        let e = unwrap_err(a.check(Some(&secret), &need(&[Role::Backup], "/vault/r2")));
        assert_eq!(e.kind, ErrorKind::Forbidden);
        let e = unwrap_err(a.check(Some("nope"), &n));
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        assert_eq!(unwrap_err(a.check(None, &n)).kind, ErrorKind::Unauthorized);

        // Revoked: refused from the next request on.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(f.remove("agent-1"));
        f.save(&tokens_path(dir.path())).unwrap();
        let e = unwrap_err(a.check(Some(&secret), &n));
        assert_eq!(e.kind, ErrorKind::Unauthorized);
    }
}
