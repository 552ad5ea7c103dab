//! `cairn manager` and `cairn server`: the control-plane services.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_api::ManagerClient;
use cairn_api::storage::VaultTarget;
use cairn_manager::Inventory;
use cairn_server::{Server, ServerConfig};

use crate::service::{credentials, serve_until_signal};

#[derive(clap::Args, Debug)]
pub struct ManagerArgs {
    /// Registry, certificate and token.
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8441")]
    listen: SocketAddr,
    /// An agent silent this long is reported stale and its VMs unreachable.
    #[arg(long, default_value_t = 15)]
    stale_after_s: u64,
    #[command(flatten)]
    identity: crate::identity::IdentityArgs,
}

pub fn run_manager(a: ManagerArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let inv = Arc::new(Inventory::open(
        &a.state_dir,
        Duration::from_secs(a.stale_after_s),
    )?);
    let creds = credentials(&a.state_dir, &a.identity, crate::identity::MANAGER_CALLERS)?;
    let state = a.state_dir.clone();
    serve_until_signal("manager", creds, move |tls, token| async move {
        let access = cairn_http::access::Access::from_state(
            "manager",
            &token,
            &state,
            cairn_manager::service::access_rule(),
        )?;
        cairn_manager::service::serve_with(inv, a.listen, tls, Arc::new(access)).await
    })
}

/// The key file of a vault directory the server or all-in-one creates, in its state directory.
pub const VAULT_KEY_FILE: &str = "vault.key";

/// How to reach the vault: a directory or a vault service.
#[derive(clap::Args, Debug, Clone)]
pub struct VaultTargetArgs {
    /// The vault: a repository directory (embedded default), `s3://BUCKET[/PREFIX]` (S3
    /// settings from --s3-* or AWS_*) or a vault service `https://HOST:PORT`.
    #[arg(long)]
    pub vault: String,
    #[arg(long, env = "CAIRN_VAULT_FINGERPRINT")]
    pub vault_fingerprint: Option<String>,
    #[arg(long, env = "CAIRN_VAULT_TOKEN_FILE")]
    pub vault_token_file: Option<PathBuf>,
    /// A vault directory this command creates is encrypted by default, its key in a new key
    /// file (`STATE/vault.key`); this creates it unencrypted instead.
    #[arg(long)]
    pub unencrypted_vault: bool,
}

impl VaultTargetArgs {
    /// The vault to use. A vault directory that does not exist yet is created, encrypted
    /// with a new key file at `new_key` unless `--unencrypted-vault`.
    pub fn target(&self, new_key: &Path) -> Result<VaultTarget> {
        if self.vault.starts_with("https://") {
            let token = std::fs::read_to_string(
                self.vault_token_file
                    .as_ref()
                    .context("a vault service needs --vault-token-file")?,
            )?
            .trim()
            .to_string();
            return Ok(VaultTarget {
                url: self.vault.clone(),
                token: Some(token),
                fingerprint: Some(
                    self.vault_fingerprint
                        .clone()
                        .context("a vault service needs --vault-fingerprint")?,
                ),
            });
        }
        if cairn_vault::location::is_s3(&self.vault) {
            let loc = Path::new(&self.vault);
            match cairn_vault::Repository::open_location(loc) {
                Ok(_) => {}
                Err(cairn_vault::VaultError::NotARepository(_)) => {
                    create_vault(loc, (!self.unencrypted_vault).then_some(new_key))?;
                }
                Err(e) => return Err(e.into()),
            }
            return Ok(VaultTarget {
                url: self.vault.clone(),
                token: None,
                fingerprint: None,
            });
        }
        let dir = std::path::absolute(&self.vault)?;
        if !dir.join("config").exists() {
            create_vault(&dir, (!self.unencrypted_vault).then_some(new_key))?;
        }
        Ok(VaultTarget {
            url: dir.display().to_string(),
            token: None,
            fingerprint: None,
        })
    }
}

/// Creates the vault directory `dir`: encrypted, with a new key file at `key`, or (`None`)
/// unencrypted. Says where the key is and that losing it loses the backups.
fn create_vault(dir: &Path, key: Option<&Path>) -> Result<()> {
    let encrypt = match key {
        Some(k) => {
            anyhow::ensure!(
                std::fs::symlink_metadata(k).is_err(),
                "{} exists, but the vault {} does not: move the old key file away (it opens \
                 another vault) or give --unencrypted-vault",
                k.display(),
                dir.display()
            );
            Some(cairn_vault::FirstKey::KeyFile(k.to_path_buf()))
        }
        None => None,
    };
    let options = cairn_vault::InitOptions {
        encrypt,
        ..Default::default()
    };
    cairn_vault::Repository::init_location(dir, &options)
        .with_context(|| format!("creating the vault {}", dir.display()))?;
    match key {
        Some(k) => eprintln!(
            "created the vault {} encrypted; its key file is {}: storage agents need it \
             (--vault-key-file), and losing every copy of it loses every backup. Keep a copy \
             elsewhere (`cairn repo key export` or `--paper`).",
            dir.display(),
            k.display()
        ),
        None => eprintln!(
            "created the vault {} unencrypted (--unencrypted-vault)",
            dir.display()
        ),
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Catalog (`catalog.db`, unless --catalog), metadata store, certificate, token,
    /// `connection.json`.
    #[arg(long)]
    state_dir: PathBuf,
    /// The catalog: a PostgreSQL database, `postgresql://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// (no TLS), instead of the SQLite file STATE/catalog.db. Several servers may share one:
    /// one is active, the others wait on standby and take over within seconds when it stops.
    #[arg(long, env = "CAIRN_CATALOG", value_parser = postgres_url)]
    catalog: Option<String>,
    #[arg(long, default_value = "127.0.0.1:8440")]
    listen: SocketAddr,
    #[arg(long)]
    manager: String,
    #[arg(long)]
    manager_fingerprint: String,
    #[arg(long)]
    manager_token_file: PathBuf,
    #[command(flatten)]
    vault: VaultTargetArgs,
    /// Metadata store directory (default STATE/metadata).
    #[arg(long)]
    metadata_dir: Option<PathBuf>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 2)]
    max_jobs: usize,
    /// Do not save VM execution state into metadata snapshots.
    #[arg(long)]
    no_state: bool,
}

fn postgres_url(s: &str) -> Result<String, String> {
    if cairn_catalog::is_postgres_url(s) {
        Ok(s.to_string())
    } else {
        Err("a postgresql:// URL (without --catalog: the SQLite file STATE/catalog.db)".into())
    }
}

/// Writes `STATE/connection.json`, which the CLI reads with `--connect`.
pub fn write_connection(
    state: &Path,
    url: &str,
    fingerprint: &str,
    token_file: &Path,
) -> Result<()> {
    let c = crate::ops::Connection {
        url: url.to_string(),
        fingerprint: fingerprint.to_string(),
        token_file: token_file.to_path_buf(),
    };
    cairn_types::durable::write_atomic(
        &state.join("connection.json"),
        serde_json::to_string_pretty(&c)?.as_bytes(),
    )?;
    Ok(())
}

pub fn run_server(a: ServerArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.state_dir)?;
    // The server calls every other service with its own certificate from its CA.
    cairn_http::client::present_by_default(crate::identity::server_identity(&a.state_dir)?);
    let token = std::fs::read_to_string(&a.manager_token_file)
        .with_context(|| format!("reading {}", a.manager_token_file.display()))?;
    let manager = ManagerClient::new(
        &a.manager,
        token.trim(),
        &cairn_http::Trust::Fingerprint(a.manager_fingerprint.clone()),
    )?;
    let server = Server::start(
        ServerConfig {
            catalog: a.catalog.clone(),
            state_dir: a.state_dir.clone(),
            metadata_dir: a.metadata_dir.clone(),
            vault: a.vault.target(&a.state_dir.join(VAULT_KEY_FILE))?,
            max_jobs: a.max_jobs,
            save_state: !a.no_state,
        },
        manager,
    )?;
    let creds = credentials(&a.state_dir, &crate::identity::IdentityArgs::default(), &[])?;
    let (fp, tf, state, listen) = (
        creds.fingerprint.clone(),
        creds.token_file.clone(),
        a.state_dir.clone(),
        a.listen,
    );
    let stopping = Arc::clone(&server);
    let served = serve_until_signal("backup server", creds, move |tls, token| async move {
        let rule = cairn_server::service::access_rule();
        let access = cairn_http::access::Access::from_state("server", &token, &state, rule)?;
        let r = cairn_server::service::serve_with(server, listen, tls, Arc::new(access)).await?;
        write_connection(&state, &format!("https://{}", r.0), &fp, &tf)
            .map_err(std::io::Error::other)?;
        Ok(r)
    });
    // A standby sharing the catalog takes over at once instead of waiting for the lease to
    // lapse.
    cairn_server::leader::step_down(&stopping);
    served
}
