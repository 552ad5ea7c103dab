//! A service's identity: its certificate, whom it trusts as callers, and joining the
//! deployment's CA with a single-use token (`--join`).
//!
//! | given | the service serves with | asks callers for a certificate |
//! |---|---|---|
//! | nothing | a self-signed certificate (`STATE/tls/`) | no |
//! | `--cert/--key` | that certificate, and presents it as a client | with `--client-ca` |
//! | `--join URL --join-token T` (first start) | the certificate the CA issued (`STATE/identity/`) | yes, from the CA, with its revocation list kept fresh from the server |

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_http::ca::{JoinAnswer, JoinRequest};
use cairn_http::mtls::ClientAuth;
use cairn_http::tls::Identity;

/// How often a joined service fetches the revocation list from the server.
const CRL_REFRESH: Duration = Duration::from_secs(2);

/// Who may call each service under mutual TLS, by the role in the caller's certificate.
/// Operators (`operator/NAME`) may call every service.
pub const VAULT_CALLERS: &[&str] = &["storage", "server", "operator"];
pub const MANAGER_CALLERS: &[&str] = &["host", "storage", "server", "operator"];
pub const HOST_AGENT_CALLERS: &[&str] = &["manager", "server", "operator"];
pub const STORAGE_AGENT_CALLERS: &[&str] = &["manager", "server", "operator"];

/// Identity options every service takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct IdentityArgs {
    /// A PEM certificate chain to serve with (and present to other services) instead of the
    /// self-signed one (with --key); `cairn ca issue` makes one.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Require every caller to present a certificate signed by this CA (mutual TLS).
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// The CA's revocation list (PEM); read again whenever it changes.
    #[arg(long, requires = "client_ca")]
    pub crl: Option<PathBuf>,
    /// On first start, get this service's certificate from the backup server's CA
    /// (`https://HOST:PORT`) with a join token; later starts reuse it.
    #[arg(long, env = "CAIRN_JOIN")]
    pub join: Option<String>,
    /// The single-use join token (`cairn ca join-token`).
    #[arg(long, env = "CAIRN_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// SHA-256 of the backup server's certificate, to trust it while joining.
    #[arg(long, env = "CAIRN_JOIN_FINGERPRINT")]
    pub join_fingerprint: Option<String>,
}

/// Where a joined service keeps what the CA gave it.
fn joined_dir(state: &Path) -> PathBuf {
    state.join("identity")
}

/// What a service runs with.
pub struct Resolved {
    pub identity: Identity,
    /// Set when callers must present certificates.
    pub clients: Option<Arc<ClientAuth>>,
    /// Whether the certificate is the CA's (then clients present it too).
    pub ca_issued: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Joined {
    server: String,
    fingerprint: String,
    id: String,
    serial: String,
}

impl IdentityArgs {
    /// The identity, joining the CA first if told to and not joined yet. `roles` are the
    /// roles whose certificates may call this service.
    pub fn resolve(&self, state: &Path, roles: &[&str]) -> Result<Option<Resolved>> {
        let dir = joined_dir(state);
        if self.join.is_some() && !dir.join("joined.json").exists() {
            self.join_now(&dir)?;
        }
        if dir.join("joined.json").exists() {
            let j: Joined = serde_json::from_slice(&std::fs::read(dir.join("joined.json"))?)
                .with_context(|| format!("{}", dir.join("joined.json").display()))?;
            let clients = ClientAuth::for_roles(
                &dir.join("ca.pem"),
                Some(&dir.join("crl.pem")),
                false,
                Some(roles),
            )?;
            spawn_crl_refresh(&j, &dir.join("crl.pem"));
            return Ok(Some(Resolved {
                identity: Identity {
                    cert_path: dir.join("cert.pem"),
                    key_path: dir.join("key.pem"),
                },
                clients: Some(clients),
                ca_issued: true,
            }));
        }
        let clients = match &self.client_ca {
            Some(ca) => Some(ClientAuth::for_roles(
                ca,
                self.crl.as_deref(),
                false,
                Some(roles),
            )?),
            None => None,
        };
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Resolved {
                identity: Identity {
                    cert_path: c.clone(),
                    key_path: k.clone(),
                },
                clients,
                ca_issued: true,
            })),
            _ if clients.is_some() => {
                bail!("--client-ca needs --cert and --key (a certificate from the same CA)")
            }
            _ => Ok(None),
        }
    }

    fn join_now(&self, dir: &Path) -> Result<()> {
        let url = self.join.as_deref().expect("join URL");
        let token = self
            .join_token
            .as_deref()
            .context("--join needs --join-token (or CAIRN_JOIN_TOKEN)")?;
        let fp = self
            .join_fingerprint
            .as_deref()
            .context("--join needs --join-fingerprint (the server's certificate SHA-256)")?;
        let (key_pem, public_key) = cairn_http::ca::new_join_key()?;
        let client = cairn_http::Client::with_identity(
            url,
            "",
            &cairn_http::Trust::Fingerprint(fp.into()),
            None,
        )?;
        let req = JoinRequest {
            token: token.trim().into(),
            public_key,
            hosts: Vec::new(),
        };
        let a: JoinAnswer = client
            .post_json("/v1/join", &req)
            .with_context(|| format!("joining the CA at {url}"))?;
        std::fs::create_dir_all(dir)?;
        cairn_types::durable::write_atomic_private(&dir.join("key.pem"), key_pem.as_bytes())?;
        cairn_types::durable::write_atomic(&dir.join("cert.pem"), a.cert_pem.as_bytes())?;
        cairn_types::durable::write_atomic(&dir.join("ca.pem"), a.ca_pem.as_bytes())?;
        cairn_types::durable::write_atomic(&dir.join("crl.pem"), a.crl_pem.as_bytes())?;
        let j = Joined {
            server: url.into(),
            fingerprint: fp.into(),
            id: a.id.to_string(),
            serial: a.serial.clone(),
        };
        // Written last: a join that stopped half-way is retried (with a new token).
        cairn_types::durable::write_atomic(
            &dir.join("joined.json"),
            &serde_json::to_vec_pretty(&j)?,
        )?;
        eprintln!(
            "joined the CA at {url} as {} (certificate {})",
            a.id, a.serial
        );
        Ok(())
    }
}

/// Keeps `path` equal to the server's revocation list, checking every [`CRL_REFRESH`]. A list
/// that does not parse is not written (the service keeps the one it has).
fn spawn_crl_refresh(j: &Joined, path: &Path) {
    let Ok(client) = cairn_http::Client::with_identity(
        &j.server,
        "",
        &cairn_http::Trust::Fingerprint(j.fingerprint.clone()),
        None,
    ) else {
        return;
    };
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(CRL_REFRESH);
            let Ok(pem) = client.get_bytes("/v1/ca/crl") else {
                continue;
            };
            let parses = cairn_http::mtls::is_crl_pem(&pem);
            let same = std::fs::read(&path).is_ok_and(|old| old == pem);
            if parses
                && !same
                && let Err(e) = cairn_types::durable::write_atomic(&path, &pem)
            {
                tracing::warn!("revocation list {}: {e}", path.display());
            }
        }
    });
}

/// The backup server's own certificate from its CA (`STATE/identity/`, made on first start),
/// presented on every call the server makes to the manager, the agents and the vault.
pub fn server_identity(state: &Path) -> Result<Identity> {
    let ca = cairn_http::ca::Ca::open_or_create(&state.join("ca"))?;
    let dir = joined_dir(state);
    let id = Identity {
        cert_path: dir.join("cert.pem"),
        key_path: dir.join("key.pem"),
    };
    if !id.cert_path.exists() || !id.key_path.exists() {
        let name = cairn_http::ca::ServiceId::new("server", "server")?;
        let pair = ca.issue(&name, &[], None)?;
        std::fs::create_dir_all(&dir)?;
        cairn_types::durable::write_atomic_private(&id.key_path, pair.key_pem.as_bytes())?;
        cairn_types::durable::write_atomic(&id.cert_path, pair.cert_pem.as_bytes())?;
    }
    Ok(id)
}
