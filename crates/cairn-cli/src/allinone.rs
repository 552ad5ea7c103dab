//! `cairn all-in-one`: every role in one process on the embedded defaults — a local
//! directory vault, SQLite catalog, manager, one host agent, one storage agent and the
//! server, each still behind its own HTTPS API on loopback (so the data-path counters
//! mean the same as in a distributed setup).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_api::ManagerClient;
use cairn_api::manager::AgentKind;
use cairn_manager::Inventory;
use cairn_server::{Server, ServerConfig};
use cairn_storage::{AgentConfig, DatastoreConfig, StorageAgent};

use crate::register::Announce;
use crate::service::credentials;

#[derive(clap::Args, Debug)]
pub struct AllInOneArgs {
    /// Everything lives here: vault/, catalog, metadata, agents' state.
    #[arg(long, default_value = "/var/lib/cairn")]
    pub state_dir: PathBuf,
    /// Datastores of the storage agent, NAME=DIR (default: local=STATE/datastore).
    #[arg(long = "datastore")]
    pub datastores: Vec<String>,
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:8440")]
    pub listen: SocketAddr,
    /// Do not save VM execution state into metadata snapshots.
    #[arg(long)]
    pub no_state: bool,
    /// Protect the domains of this libvirt daemon (default `qemu:///system`) instead of
    /// running Cairn's own VMs. Backups run with `--libvirt-checkpoints own`.
    #[arg(long, value_name = "URI", num_args = 0..=1, default_missing_value = "qemu:///system")]
    pub libvirt: Option<String>,
    /// Create the vault unencrypted (default: encrypted, its key in STATE/vault.key).
    #[arg(long)]
    pub unencrypted_vault: bool,
    /// The vault's location (default STATE/vault): a directory or `s3://BUCKET[/PREFIX]`
    /// (S3 settings from --s3-* or AWS_*), created when there is no repository there.
    #[arg(long)]
    pub vault: Option<String>,
}

/// The running roles.
pub struct AllInOne {
    pub rt: tokio::runtime::Runtime,
    /// The runtimes of the storage agent's NBD connections, one per disk backed up at once:
    /// held only to keep them alive (they are dropped after `rt`).
    _nbd_rts: Vec<tokio::runtime::Runtime>,
    pub server: Arc<Server>,
    pub manager: ManagerClient,
    pub server_url: String,
    pub connection: PathBuf,
    /// The vault's location: a directory or `s3://...`.
    pub vault: PathBuf,
    /// The vault's key file, when it is encrypted.
    pub vault_key: Option<PathBuf>,
}

async fn bind(
    what: &'static str,
    state: &Path,
    listen: SocketAddr,
    router: impl FnOnce(String) -> axum::Router,
) -> Result<(String, String, String, PathBuf)> {
    std::fs::create_dir_all(state)?;
    let c = credentials(state, &crate::identity::IdentityArgs::default(), &[])?;
    let (addr, _task) =
        cairn_http::server::serve(router(c.token.clone()), listen, c.tls, what).await?;
    Ok((
        format!("https://{addr}"),
        c.fingerprint,
        c.token,
        c.token_file,
    ))
}

/// Starts every role; returns once all listen and the agents are registered.
pub fn start(
    state: &Path,
    datastores: &[String],
    listen: SocketAddr,
    save_state: bool,
    libvirt: Option<&str>,
    encrypt: bool,
    vault: Option<&str>,
) -> Result<AllInOne> {
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    let state = std::path::absolute(state)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    // Vault: the embedded local directory, or where --vault says.
    let vault_at = vault.map_or_else(|| state.join("vault"), PathBuf::from);
    let vault_key = state.join(crate::control::VAULT_KEY_FILE);
    let vault = crate::control::VaultTargetArgs {
        vault: vault_at.display().to_string(),
        vault_fingerprint: None,
        vault_token_file: None,
        unencrypted_vault: !encrypt,
    }
    .target(&vault_key)?;
    // Manager.
    let inv = Arc::new(Inventory::open(
        &state.join("manager"),
        Duration::from_secs(15),
    )?);
    let (m_url, m_fp, m_token, _) =
        rt.block_on(bind("manager", &state.join("manager"), any, |t| {
            cairn_manager::service::router(inv, t)
        }))?;
    let manager = ManagerClient::new(&m_url, &m_token, &cairn_http::Trust::Fingerprint(m_fp))?;
    // Host agent.
    let hstate = state.join("host-agent");
    std::fs::create_dir_all(&hstate)?;
    let driver: Arc<dyn cairn_hypervisor::HypervisorDriver> = match libvirt {
        Some(uri) => Arc::new(
            cairn_libvirt::LibvirtDriver::open(cairn_libvirt::LibvirtOptions {
                uri: uri.into(),
                state_dir: hstate.clone(),
                scratch_dir: None,
                checkpoints: cairn_libvirt::CheckpointMode::Own,
            })
            .with_context(|| format!("opening libvirt at {uri}"))?,
        ),
        None => Arc::new(cairn_hypervisor::QemuDriver::open(
            &hstate,
            Default::default(),
        )?),
    };
    let recovered = rt.block_on(driver.recover())?;
    if recovered > 0 {
        eprintln!("host agent: {recovered} snapshot(s) left by a previous run recovered");
    }
    let (h_url, h_fp, h_token, _) = rt.block_on(bind("host agent", &hstate, any, |t| {
        cairn_hypervisor::service::HostAgentService::new(driver, &hstate).router(t)
    }))?;
    Announce::new(
        AgentKind::Host,
        "local",
        manager.clone(),
        Duration::from_secs(5),
    )
    .start(&h_url, &h_fp, &h_token);
    // Storage agent.
    let mut ds = Vec::new();
    for d in datastores {
        let (name, path) = d.split_once('=').context("--datastore NAME=DIR")?;
        ds.push(DatastoreConfig {
            name: name.into(),
            path: std::path::absolute(path)?,
        });
    }
    if ds.is_empty() {
        let p = state.join("datastore");
        std::fs::create_dir_all(&p)?;
        ds.push(DatastoreConfig {
            name: "local".into(),
            path: p,
        });
    }
    let sstate = state.join("storage-agent");
    let parallel = 2;
    let nbd_rts = (0..parallel)
        .map(|_| cairn_storage::NbdRuntime::builder().build())
        .collect::<std::io::Result<Vec<_>>>()
        .context("starting the NBD runtimes")?;
    let storage = Arc::new(StorageAgent::new(
        AgentConfig {
            datastores: ds,
            state_dir: sstate.clone(),
            parallel,
            vault_key_file: vault_key.exists().then(|| vault_key.clone()),
        },
        cairn_storage::NbdRuntime::new(nbd_rts.iter().map(|rt| rt.handle().clone()))?,
    ));
    let st = storage;
    let (s_url, s_fp, s_token, _) = rt.block_on(bind("storage agent", &sstate, any, |t| {
        cairn_storage::service::router(st, t)
    }))?;
    Announce::new(
        AgentKind::Storage,
        "local",
        manager.clone(),
        Duration::from_secs(5),
    )
    .start(&s_url, &s_fp, &s_token);
    // Server.
    let sv_state = state.join("server");
    let server = Server::start(
        ServerConfig {
            catalog: None,
            state_dir: sv_state.clone(),
            metadata_dir: None,
            vault,
            max_jobs: 2,
            save_state,
        },
        manager.clone(),
    )?;
    let srv = Arc::clone(&server);
    let (url, fp, _, token_file) = rt.block_on(bind("backup server", &sv_state, listen, |t| {
        cairn_server::service::router(srv, t)
    }))?;
    crate::control::write_connection(&sv_state, &url, &fp, &token_file)?;
    Ok(AllInOne {
        rt,
        _nbd_rts: nbd_rts,
        server,
        manager,
        server_url: url,
        connection: sv_state.join("connection.json"),
        vault_key: vault_key.exists().then_some(vault_key),
        vault: vault_at,
    })
}

pub fn run(a: AllInOneArgs) -> Result<ExitCode> {
    let all = start(
        &a.state_dir,
        &a.datastores,
        a.listen,
        !a.no_state,
        a.libvirt.as_deref(),
        !a.unencrypted_vault,
        a.vault.as_deref(),
    )?;
    println!(
        "{}",
        serde_json::json!({ "listen": all.server_url, "connection": all.connection,
                            "vault": all.vault, "vault_key": all.vault_key,
                            "pid": std::process::id() })
    );
    eprintln!(
        "cairn all-in-one: server on {}; try: cairn --connect {} vm list",
        all.server_url,
        all.connection.display()
    );
    all.rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    eprintln!("cairn all-in-one: stopping (VMs keep running; the next start adopts them)");
    Ok(ExitCode::SUCCESS)
}
