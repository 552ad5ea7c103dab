//! [`LibvirtDriver`]: the host agent's driver for libvirt domains.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::host::{
    DiskBacking, ResourceUsage, SavedState, VmDisk, VmHandle, VmInfo, VmOrigin, VmSnapshot, VmState,
};
use cairn_hypervisor::driver::{
    BoxFuture, Changes, DriverError, HypervisorDriver, SnapshotOptions,
};
use cairn_hypervisor::spec::{CheckpointId, VmId, VmSpec};

use crate::ffi::{self, Connect, Domain, LibvirtError};
use crate::journal::Journal;
use crate::xml::{self, DomainXml};

/// How the driver reaches libvirt and where it keeps its files.
#[derive(Debug, Clone)]
pub struct LibvirtOptions {
    /// e.g. `qemu:///system`.
    pub uri: String,
    /// The host agent's state directory; the driver uses `libvirt/` in it.
    pub state_dir: PathBuf,
    /// Where backup jobs put their NBD socket and scratch images (one private subdirectory
    /// per job, owned by the user QEMU runs as). Default `STATE/libvirt/scratch`.
    pub scratch_dir: Option<PathBuf>,
    /// Whose checkpoints incrementals read from (default: Cairn's own).
    pub checkpoints: crate::backup::CheckpointMode,
}

/// The host agent's driver for the domains of one libvirt daemon.
#[derive(Clone)]
pub struct LibvirtDriver {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for LibvirtDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtDriver")
            .field("uri", &self.inner.uri)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub uri: String,
    conn: Mutex<Option<Arc<Connect>>>,
    pub scratch_dir: PathBuf,
    pub journal: Journal,
    pub mode: crate::backup::CheckpointMode,
    /// Snapshots handed out and not yet deleted.
    pub flights: Mutex<HashMap<cairn_hypervisor::spec::VmSnapshotId, crate::journal::Flight>>,
}

/// A libvirt error as a driver error, naming what was being done.
pub(crate) fn failed(what: impl Into<String>) -> impl FnOnce(LibvirtError) -> DriverError {
    let what = what.into();
    move |e| DriverError::Failed {
        what: format!("libvirt: {what}"),
        reason: e.message,
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The host agent's id of a domain: the first 64 bits of its UUID, stable across restarts of
/// the agent and of libvirt.
pub fn vm_id(uuid: &str) -> Option<VmId> {
    let hex: String = uuid.chars().filter(|c| *c != '-').take(16).collect();
    hex.to_ascii_lowercase().parse().ok()
}

impl LibvirtDriver {
    /// Connects to libvirt at `options.uri` (failing at once with libvirt's message when it
    /// cannot be reached) and prepares the state directory.
    pub fn open(options: LibvirtOptions) -> Result<Self, DriverError> {
        let base = options.state_dir.join("libvirt");
        let scratch_dir = options
            .scratch_dir
            .clone()
            .unwrap_or_else(|| base.join("scratch"));
        for dir in [&base, &scratch_dir] {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let conn =
            Connect::open(&options.uri).map_err(failed(format!("connect to {}", options.uri)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                uri: options.uri,
                conn: Mutex::new(Some(Arc::new(conn))),
                scratch_dir,
                journal: Journal::open(&base)?,
                mode: options.checkpoints,
                flights: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Runs blocking libvirt work off the async runtime.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, DriverError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, DriverError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| DriverError::Failed {
                    what: "libvirt call".into(),
                    reason: e.to_string(),
                })?
        })
    }
}

impl Inner {
    /// The connection, reopened when libvirtd restarted since.
    pub fn conn(&self) -> Result<Arc<Connect>, DriverError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref().filter(|c| c.is_alive()) {
            return Ok(Arc::clone(c));
        }
        let c =
            Arc::new(Connect::open(&self.uri).map_err(failed(format!("connect to {}", self.uri)))?);
        *slot = Some(Arc::clone(&c));
        Ok(c)
    }

    /// Records a snapshot handed out, until `delete_snapshot` ends it.
    pub fn hand_out(&self, f: &crate::journal::Flight) {
        self.flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(f.id, f.clone());
    }

    /// A domain's UUID and its live XML, read.
    pub fn live(&self, d: &Domain) -> Result<(String, DomainXml), DriverError> {
        let uuid = d.uuid().map_err(failed("domain uuid"))?;
        let text = d.xml(0).map_err(failed("domain XML"))?;
        let parsed = xml::parse(&text).map_err(|e| DriverError::Failed {
            what: format!("libvirt: domain {uuid}"),
            reason: e.to_string(),
        })?;
        Ok((uuid, parsed))
    }

    /// The domain the host agent knows as `vm`.
    pub fn domain(&self, conn: &Connect, vm: VmId) -> Result<Domain, DriverError> {
        let doms = conn.domains().map_err(failed("list domains"))?;
        for d in doms {
            if d.uuid().ok().and_then(|u| vm_id(&u)) == Some(vm) {
                return Ok(d);
            }
        }
        Err(DriverError::UnknownVm(vm))
    }

    /// Everything the host agent reports about a domain.
    pub fn info(&self, d: &Domain) -> Result<VmInfo, DriverError> {
        let (uuid, parsed) = self.live(d)?;
        let id = vm_id(&uuid).ok_or_else(|| DriverError::Failed {
            what: "libvirt: domain uuid".into(),
            reason: format!("{uuid:?} is not a UUID"),
        })?;
        let inactive = d.xml(ffi::XML_INACTIVE).ok();
        let (st, _) = d.state().map_err(failed("domain state"))?;
        let persistent = d.is_persistent().unwrap_or(false);
        let state = run_state(st);
        let pid = match state {
            VmState::ShutOff => 0,
            _ => qemu_pid(&parsed.name).unwrap_or(0),
        };
        let spec = parsed.spec(inactive);
        let unprotected = parsed
            .disks
            .iter()
            .filter(|d| !matches!(d.device.as_str(), "cdrom" | "floppy"))
            .filter_map(|d| {
                Some(cairn_api::host::UnprotectedDisk {
                    disk: d.target.clone(),
                    reason: d.unprotectable()?,
                })
            })
            .collect();
        Ok(VmInfo {
            unprotected,
            handle: VmHandle {
                id,
                name: parsed.name.clone(),
                pid,
                qmp_socket: PathBuf::new(),
                qga_socket: parsed.agent_socket.clone().unwrap_or_default(),
                disks: vm_disks(&parsed),
                origin: VmOrigin::Libvirt {
                    uri: self.uri.clone(),
                    uuid,
                    persistent,
                },
            },
            spec,
            state,
        })
    }
}

/// The host agent's view of libvirt's `virDomainState`.
fn run_state(st: i32) -> VmState {
    use ffi::state::*;
    let (status, cpus) = match st {
        RUNNING | BLOCKED => ("running", true),
        PAUSED => ("paused", false),
        SHUTDOWN => ("shutdown", true),
        PMSUSPENDED => ("suspended", false),
        SHUTOFF | CRASHED => return VmState::ShutOff,
        _ => ("unknown", false),
    };
    VmState::Running {
        status: status.into(),
        cpus_running: cpus,
    }
}

/// The disks Cairn can protect, as the host agent reports them.
pub(crate) fn vm_disks(x: &DomainXml) -> Vec<VmDisk> {
    let spec = x.spec(None);
    spec.disks
        .iter()
        .map(|d| VmDisk {
            id: d.id.clone(),
            node_name: d.id.clone(),
            backing: match &d.lun {
                Some(identifier) => DiskBacking::RawDevice {
                    path: d.path.clone(),
                    identifier: identifier.clone(),
                },
                None => DiskBacking::Image {
                    path: d.path.clone(),
                    format: d.format,
                },
            },
            read_only: d.read_only,
        })
        .collect()
}

/// QEMU's pid, from the file libvirt's system QEMU driver keeps.
fn qemu_pid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).ok()?;
    text.trim().parse().ok()
}

fn rss_bytes(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

impl HypervisorDriver for LibvirtDriver {
    /// Defines a new persistent domain from `spec` (its stored domain XML with the restored
    /// disks, a new name, UUID and MAC addresses) and starts it. A domain libvirt refuses to
    /// start is undefined again, so nothing is left behind.
    fn start_vm<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<VmHandle, DriverError>> {
        let spec = spec.clone();
        self.blocking(move |inner| crate::restore::define_and_start(inner, &spec))
    }

    /// Powers the domain off (`virDomainDestroy`); its definition stays.
    fn stop_vm(&self, vm: VmId, _timeout: Duration) -> BoxFuture<'_, Result<(), DriverError>> {
        self.blocking(move |inner| {
            let conn = inner.conn()?;
            let d = match inner.domain(&conn, vm) {
                Err(DriverError::UnknownVm(_)) => return Ok(()),
                other => other?,
            };
            match d.destroy() {
                Ok(()) => Ok(()),
                Err(e) if e.code == ffi::ERR_OPERATION_INVALID => Ok(()),
                Err(e) => Err(failed("stop the domain")(e)),
            }
        })
    }

    fn list_vms(&self) -> BoxFuture<'_, Result<Vec<VmInfo>, DriverError>> {
        self.blocking(|inner| {
            let conn = inner.conn()?;
            let mut out = Vec::new();
            for d in conn.domains().map_err(failed("list domains"))? {
                match inner.info(&d) {
                    Ok(i) => out.push(i),
                    // A domain that vanished between listing and reading is simply gone.
                    Err(e) => tracing::warn!("skipping a libvirt domain: {e}"),
                }
            }
            Ok(out)
        })
    }

    fn vm_status(&self, vm: VmId) -> BoxFuture<'_, Result<VmInfo, DriverError>> {
        self.blocking(move |inner| {
            let conn = inner.conn()?;
            let d = inner.domain(&conn, vm)?;
            inner.info(&d)
        })
    }

    fn snapshot<'a>(
        &'a self,
        vm: VmId,
        options: &'a SnapshotOptions,
    ) -> BoxFuture<'a, Result<VmSnapshot, DriverError>> {
        let options = options.clone();
        self.blocking(move |inner| crate::backup::snapshot(inner, vm, &options))
    }

    fn delete_snapshot<'a>(
        &'a self,
        snapshot: &'a VmSnapshot,
    ) -> BoxFuture<'a, Result<u64, DriverError>> {
        let snapshot = snapshot.clone();
        self.blocking(move |inner| crate::backup::delete(inner, &snapshot))
    }

    fn changes_since(
        &self,
        vm: VmId,
        checkpoint: CheckpointId,
    ) -> BoxFuture<'_, Result<Vec<(String, Changes)>, DriverError>> {
        self.blocking(move |inner| crate::backup::changes_since(inner, vm, checkpoint))
    }

    fn recover(&self) -> BoxFuture<'_, Result<usize, DriverError>> {
        self.blocking(crate::backup::recover)
    }

    fn agent_commands(&self, vm: VmId) -> Option<Arc<dyn cairn_hypervisor::qga::AgentCommands>> {
        Some(Arc::new(crate::agent::LibvirtAgent {
            inner: Arc::clone(&self.inner),
            vm,
        }))
    }

    /// Through libvirt (`virDomainGetFSInfo`, answered by the guest agent): libvirt owns the
    /// domain's agent channel.
    fn guest_status(
        &self,
        vm: VmId,
        timeout: Duration,
    ) -> Option<BoxFuture<'_, cairn_api::host::GuestStatus>> {
        let f = self.blocking(move |inner| {
            let conn = inner.conn()?;
            let d = inner.domain(&conn, vm)?;
            let secs = i32::try_from(timeout.as_secs().max(1)).unwrap_or(i32::MAX);
            let _ = d.set_agent_timeout(secs);
            let r = d.fs_info();
            let _ = d.set_agent_timeout(-1);
            Ok(r)
        });
        Some(Box::pin(async move {
            let no = |e: String| cairn_api::host::GuestStatus {
                agent: false,
                filesystems: Vec::new(),
                error: Some(e),
            };
            match f.await {
                Ok(Ok(filesystems)) => cairn_api::host::GuestStatus {
                    agent: true,
                    filesystems,
                    error: None,
                },
                Ok(Err(e)) => no(e.message),
                Err(e) => no(e.to_string()),
            }
        }))
    }

    fn save_state<'a>(
        &'a self,
        vm: VmId,
        _path: &'a Path,
    ) -> BoxFuture<'a, Result<SavedState, DriverError>> {
        Box::pin(async move {
            Err(DriverError::Failed {
                what: format!("save the execution state of VM {vm}"),
                reason: "not supported for libvirt domains (the backup keeps the domain XML)"
                    .into(),
            })
        })
    }

    fn resource_usage(&self, vm: VmId) -> BoxFuture<'_, Result<ResourceUsage, DriverError>> {
        self.blocking(move |inner| {
            let conn = inner.conn()?;
            let d = inner.domain(&conn, vm)?;
            let info = d.info().map_err(failed("domain info"))?;
            let name = d.name().map_err(failed("domain name"))?;
            let pid = qemu_pid(&name).unwrap_or(0);
            Ok(ResourceUsage {
                sampled_at_ms: u64::try_from(cairn_types::now_ms()).unwrap_or(0),
                process_cpu_time_ms: info.cpu_time_ns / 1_000_000,
                vcpus: Vec::new(),
                memory_bytes: info.memory_kib * 1024,
                rss_bytes: if pid == 0 { 0 } else { rss_bytes(pid) },
                disks: Vec::new(),
            })
        })
    }
}

/// Milliseconds since `t`.
pub(crate) fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}
