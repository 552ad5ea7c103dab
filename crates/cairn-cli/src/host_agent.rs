//! `cairn host-agent`: run the QEMU host agent's HTTPS API over a state directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::service::{credentials, serve_registered};
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
    #[command(flatten)]
    register: crate::register::ManagerArgs,
}

pub fn run(a: HostAgentArgs) -> Result<ExitCode> {
    let state = a.state_dir;
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let driver = QemuDriver::open(&state, QemuDriverOptions::default())
        .with_context(|| format!("opening host agent state {}", state.display()))?;
    let creds = credentials(&state, None, None)?;
    // VMs keep running when the agent stops: the next agent on this state directory adopts them.
    let announce =
        crate::register::Announce::from_args(cairn_api::manager::AgentKind::Host, &a.register)?;
    serve_registered(
        "host agent",
        creds,
        announce,
        move |tls, token| async move {
            let driver = Arc::new(driver);
            // Snapshots a previous agent left in flight are torn down before anything is served.
            let cleared = driver.recover().await.map_err(std::io::Error::other)?;
            let vms = driver
                .list_vms()
                .await
                .map_err(std::io::Error::other)?
                .len();
            eprintln!("host agent: {vms} VM(s) adopted, {cleared} snapshot(s) recovered");
            cairn_hypervisor::service::serve(HostAgentService::qemu(driver), a.listen, tls, token)
                .await
        },
    )
}
