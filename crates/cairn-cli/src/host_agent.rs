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
    /// Protect the domains of a libvirt daemon (default URI `qemu:///system`) instead of
    /// running Cairn's own VMs. Needs libvirt's library (`libvirt0`) on this host.
    #[arg(long, value_name = "URI", num_args = 0..=1, default_missing_value = "qemu:///system")]
    libvirt: Option<String>,
    /// With `--libvirt`: where backup jobs put their NBD socket and scratch images (default
    /// `STATE/libvirt/scratch`; the socket path must stay under 108 bytes).
    #[arg(long, requires = "libvirt")]
    scratch_dir: Option<PathBuf>,
    /// With `--libvirt`: `own` (default) makes a `cairn-…` checkpoint with each backup;
    /// `borrow` makes none and reads the changes since the newest checkpoint another tool
    /// (virtnbdbackup) made, for domains that tool also backs up (it refuses foreign ones).
    #[arg(long, requires = "libvirt", value_enum, default_value_t = Checkpoints::Own)]
    libvirt_checkpoints: Checkpoints,
    /// Adopt a running QEMU Cairn did not start through this QMP socket (repeatable). A
    /// directory stands for every socket in it, rescanned whenever VMs are listed
    /// (`NAME.qga.sock` there is the guest agent of `NAME.sock`). `,qga=PATH` names the
    /// guest-agent socket; without one, snapshots pause the vCPUs. Adopted QEMU processes are
    /// never stopped by Cairn.
    #[arg(
        long = "qmp-socket",
        value_name = "PATH[,qga=PATH]",
        conflicts_with = "libvirt"
    )]
    qmp_socket: Vec<AdoptSource>,
    #[command(flatten)]
    register: crate::register::ManagerArgs,
    #[command(flatten)]
    identity: crate::identity::IdentityArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Checkpoints {
    Own,
    Borrow,
}

pub fn run(a: HostAgentArgs) -> Result<ExitCode> {
    if let Some(uri) = a.libvirt.clone() {
        return run_libvirt(a, uri);
    }
    let state = a.state_dir;
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let options = QemuDriverOptions {
        adopt: a.qmp_socket,
        ..QemuDriverOptions::default()
    };
    let driver = QemuDriver::open(&state, options)
        .with_context(|| format!("opening host agent state {}", state.display()))?;
    let creds = credentials(&state, &a.identity, crate::identity::HOST_AGENT_CALLERS)?;
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

/// `cairn host-agent --libvirt [URI]`: the same API over libvirt's domains.
fn run_libvirt(a: HostAgentArgs, uri: String) -> Result<ExitCode> {
    let state = a.state_dir;
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let driver = cairn_libvirt::LibvirtDriver::open(cairn_libvirt::LibvirtOptions {
        uri: uri.clone(),
        state_dir: state.clone(),
        scratch_dir: a.scratch_dir,
        checkpoints: match a.libvirt_checkpoints {
            Checkpoints::Own => cairn_libvirt::CheckpointMode::Own,
            Checkpoints::Borrow => cairn_libvirt::CheckpointMode::Borrow,
        },
    })
    .with_context(|| format!("opening libvirt at {uri}"))?;
    let creds = credentials(&state, &a.identity, crate::identity::HOST_AGENT_CALLERS)?;
    let announce =
        crate::register::Announce::from_args(cairn_api::manager::AgentKind::Host, &a.register)?;
    serve_registered(
        "host agent",
        creds,
        announce,
        move |tls, token| async move {
            use cairn_hypervisor::HypervisorDriver;
            let driver: Arc<dyn HypervisorDriver> = Arc::new(driver);
            // Backup jobs a previous agent left are ended before anything is served.
            let cleared = driver.recover().await.map_err(std::io::Error::other)?;
            let vms = driver
                .list_vms()
                .await
                .map_err(std::io::Error::other)?
                .len();
            eprintln!(
                "host agent: libvirt {uri}: {vms} domain(s), {cleared} backup job(s) recovered"
            );
            let service = HostAgentService::new(driver, &state);
            cairn_hypervisor::service::serve(service, a.listen, tls, token).await
        },
    )
}
