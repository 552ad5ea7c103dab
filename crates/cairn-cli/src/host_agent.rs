//! `cairn host-agent`: run the QEMU host agent's HTTPS API over a state directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::service::{credentials, serve_registered};
use cairn_hypervisor::service::HostAgentService;
use cairn_hypervisor::{AdoptSource, QemuDriver, QemuDriverOptions};

#[derive(clap::Args, Debug)]
pub struct HostAgentArgs {
    /// The agent's state directory: VM registry, snapshot journal, scratch images, saved
    /// states, certificate and token (created if it does not exist).
    #[arg(long)]
    state_dir: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8444")]
    listen: SocketAddr,
    /// Adopt a running QEMU Cairn did not start through this QMP socket (repeatable). A
    /// directory stands for every socket in it, rescanned whenever VMs are listed
    /// (`NAME.qga.sock` there is the guest agent of `NAME.sock`). `,qga=PATH` names the
    /// guest-agent socket; without one, snapshots pause the vCPUs. Adopted QEMU processes are
    /// never stopped by Cairn.
    #[arg(long = "qmp-socket", value_name = "PATH[,qga=PATH]")]
    qmp_socket: Vec<AdoptSource>,
    #[command(flatten)]
    register: crate::register::ManagerArgs,
}

pub fn run(a: HostAgentArgs) -> Result<ExitCode> {
    let state = a.state_dir;
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let options = QemuDriverOptions {
        adopt: a.qmp_socket,
        ..QemuDriverOptions::default()
    };
    let driver = QemuDriver::open(&state, options)
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
            let vms = driver.list_vms().await.map_err(std::io::Error::other)?;
            let foreign = vms
                .iter()
                .filter(|v| v.handle.origin != cairn_api::host::VmOrigin::Cairn)
                .count();
            eprintln!(
                "host agent: {} VM(s) of ours re-adopted, {foreign} QEMU process(es) adopted \
                 through QMP, {cleared} snapshot(s) recovered",
                vms.len() - foreign
            );
            cairn_hypervisor::service::serve(HostAgentService::qemu(driver), a.listen, tls, token)
                .await
        },
    )
}
