//! `cairn storage-agent`: serve the datastores of this primary storage system.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_storage::{AgentConfig, DatastoreConfig, NbdRuntime, StorageAgent};

use crate::service::{credentials, serve_registered};

#[derive(clap::Args, Debug)]
pub struct StorageAgentArgs {
    /// A datastore as NAME=DIR (a directory of disk images); repeat for more.
    #[arg(long = "datastore", required = true, value_parser = parse_datastore)]
    datastores: Vec<DatastoreConfig>,
    /// Where snapshot records, the certificate and the token live.
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8445")]
    listen: SocketAddr,
    /// Disks backed up at once.
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// A key file (`cairn repo key export`) that opens the encrypted repositories this agent
    /// backs up to and restores from: the agent seals and opens, vaults store ciphertext.
    #[arg(long)]
    vault_key_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    register: crate::register::ManagerArgs,
    #[command(flatten)]
    identity: crate::identity::IdentityArgs,
}

fn parse_datastore(s: &str) -> Result<DatastoreConfig, String> {
    let (name, path) = s.split_once('=').ok_or("expected NAME=DIR")?;
    if name.is_empty() {
        return Err("datastore name is empty".into());
    }
    Ok(DatastoreConfig {
        name: name.to_string(),
        path: PathBuf::from(path),
    })
}

pub fn run(a: StorageAgentArgs) -> Result<ExitCode> {
    for d in &a.datastores {
        anyhow::ensure!(
            d.path.is_dir(),
            "datastore {}: {} is not a directory",
            d.name,
            d.path.display()
        );
    }
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let creds = credentials(
        &a.state_dir,
        &a.identity,
        crate::identity::STORAGE_AGENT_CALLERS,
    )?;
    // NBD connections get runtimes of their own, apart from the service's, one per disk
    // backed up at once: the agent's blocking work drives them with `Handle::block_on`. They
    // live until the process exits.
    let nbd_rts = (0..a.parallel.max(1))
        .map(|_| NbdRuntime::builder().build())
        .collect::<std::io::Result<Vec<_>>>()
        .context("starting the NBD runtimes")?;
    let agent = Arc::new(StorageAgent::new(
        AgentConfig {
            datastores: a.datastores,
            state_dir: a.state_dir.clone(),
            parallel: a.parallel,
            vault_key_file: a.vault_key_file.clone(),
        },
        NbdRuntime::new(nbd_rts.iter().map(|rt| rt.handle().clone()))?,
    ));
    match agent.remove_orphaned_job_snapshots() {
        Ok(0) => {}
        Ok(n) => {
            tracing::warn!("deleted {n} storage-unit snapshots left by jobs of an earlier run")
        }
        Err(e) => tracing::warn!("could not delete snapshots left by an earlier run: {e}"),
    }
    match agent.remove_partial_restores() {
        Ok(0) => {}
        Ok(n) => tracing::warn!("deleted {n} partial restores left by an earlier run"),
        Err(e) => tracing::warn!("could not delete partial restores of an earlier run: {e}"),
    }
    let announce =
        crate::register::Announce::from_args(cairn_api::manager::AgentKind::Storage, &a.register)?;
    serve_registered("storage agent", creds, announce, move |tls, token| {
        cairn_storage::service::serve(agent, a.listen, tls, token)
    })
}
