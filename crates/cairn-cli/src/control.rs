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
}

pub fn run_manager(a: ManagerArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let inv = Arc::new(Inventory::open(
        &a.state_dir,
        Duration::from_secs(a.stale_after_s),
    )?);
    let creds = credentials(&a.state_dir, None, None)?;
    serve_until_signal("manager", creds, move |tls, token| {
        cairn_manager::service::serve(inv, a.listen, tls, token)
    })
}

/// How to reach the vault: a directory or a vault service.
#[derive(clap::Args, Debug, Clone)]
pub struct VaultTargetArgs {
    /// The vault: a repository directory (embedded default) or `https://HOST:PORT`.
    #[arg(long)]
    pub vault: String,
    #[arg(long, env = "CAIRN_VAULT_FINGERPRINT")]
    pub vault_fingerprint: Option<String>,
    #[arg(long, env = "CAIRN_VAULT_TOKEN_FILE")]
    pub vault_token_file: Option<PathBuf>,
}

impl VaultTargetArgs {
    pub fn target(&self) -> Result<VaultTarget> {
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
        let dir = std::path::absolute(&self.vault)?;
        if !dir.join("config").exists() {
            cairn_vault::Repository::init_dir(&dir, &Default::default())
                .with_context(|| format!("creating the vault {}", dir.display()))?;
        }
        Ok(VaultTarget {
            url: dir.display().to_string(),
            token: None,
            fingerprint: None,
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Catalog (`catalog.db`), metadata store, certificate, token, `connection.json`.
    #[arg(long)]
    state_dir: PathBuf,
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
    let token = std::fs::read_to_string(&a.manager_token_file)
        .with_context(|| format!("reading {}", a.manager_token_file.display()))?;
    let manager = ManagerClient::new(
        &a.manager,
        token.trim(),
        &cairn_http::Trust::Fingerprint(a.manager_fingerprint.clone()),
    )?;
    let server = Server::start(
        ServerConfig {
            state_dir: a.state_dir.clone(),
            metadata_dir: a.metadata_dir.clone(),
            vault: a.vault.target()?,
            max_jobs: a.max_jobs,
            save_state: !a.no_state,
        },
        manager,
    )?;
    let creds = credentials(&a.state_dir, None, None)?;
    let (fp, tf, state, listen) = (
        creds.fingerprint.clone(),
        creds.token_file.clone(),
        a.state_dir.clone(),
        a.listen,
    );
    serve_until_signal("backup server", creds, move |tls, token| async move {
        let rule = cairn_server::service::access_rule();
        let access = cairn_http::access::Access::from_state("server", &token, &state, rule)?;
        let r = cairn_server::service::serve_with(server, listen, tls, Arc::new(access)).await?;
        write_connection(&state, &format!("https://{}", r.0), &fp, &tf)
            .map_err(std::io::Error::other)?;
        Ok(r)
    })
}
