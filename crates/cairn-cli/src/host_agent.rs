//! `cairn host-agent`: run the QEMU host agent's HTTPS API over a state directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_hypervisor::service::HostAgentService;
use cairn_hypervisor::{QemuDriver, QemuDriverOptions};

#[derive(clap::Args, Debug)]
pub struct HostAgentArgs {
    /// The agent's state directory: VM registry, snapshot journal, scratch images, saved
    /// states, certificate and token (created if it does not exist).
    #[arg(long)]
    state_dir: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8444")]
    listen: SocketAddr,
}

pub fn run(a: HostAgentArgs) -> Result<ExitCode> {
    let state = a.state_dir;
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let driver = QemuDriver::open(&state, QemuDriverOptions::default())
        .with_context(|| format!("opening host agent state {}", state.display()))?;
    let (identity, fingerprint) = cairn_http::tls::ensure_self_signed(&state.join("tls"), &[])?;
    let token_file = state.join("token");
    let token = match std::env::var("CAIRN_TOKEN") {
        Ok(t) if !t.is_empty() => t,
        _ => cairn_http::server::ensure_token(&token_file)
            .with_context(|| format!("token file {}", token_file.display()))?,
    };
    let tls = cairn_http::tls::server_config(&identity)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let driver = Arc::new(driver);
        // Snapshots a previous agent left in flight are torn down before anything is served.
        let cleared = driver
            .recover()
            .await
            .context("recovering snapshots left in flight")?;
        let vms = driver.list_vms().await?.len();
        let service = HostAgentService::qemu(driver);
        let (addr, handle) =
            cairn_hypervisor::service::serve(service, a.listen, tls, token).await?;
        // One line on stdout tells scripts where and how to connect.
        println!(
            "{}",
            serde_json::json!({
                "listen": format!("https://{addr}"),
                "fingerprint": fingerprint,
                "token_file": token_file,
                "pid": std::process::id(),
            })
        );
        eprintln!(
            "host agent serving {} on https://{addr} (certificate SHA-256 {fingerprint}); \
             {vms} VM(s) adopted, {cleared} snapshot(s) recovered",
            state.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = handle => {}
        }
        // VMs keep running: the next agent on this state directory adopts them.
        eprintln!("host agent: stopping (VMs keep running)");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
