//! [`QemuDriver`]: the [`HypervisorDriver`] for QEMU VMs this host agent launched, and for
//! running QEMU processes it adopts through their QMP socket ([`adopt`]).
//!
//! VMs run as their own process group (a signal to the agent never reaches them) and outlive
//! the agent: [`QemuDriver::open`] re-adopts every VM of the registry whose process still runs.
//! A PID is trusted only while `/proc/<pid>/cmdline` still names the VM's QMP socket, so a
//! recycled PID is never signalled. VMs are stopped by their PID only; an adopted QEMU
//! (`VmOrigin::Adopted`) is never stopped or signalled at all.

pub mod adopt;
mod cbt;
mod graph;
mod snapshot;
mod usage;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::{Instant, sleep};

use crate::driver::{
    BoxFuture, Changes, DriverError, HypervisorDriver, ResourceUsage, SavedState, SnapshotOptions,
    VmHandle, VmInfo, VmSnapshot, VmState,
};
use crate::process::{ProcessError, QEMU_SYSTEM, find_program};
use crate::qga::{GuestAgent, QgaOptions};
use crate::qmp::{QmpClient, QmpError, QmpOptions};
use crate::spec::{CheckpointId, DiskSpecExt, RunPaths, VmId, VmSpec, qemu_args};
use crate::state::{StateDir, VmDisk, VmRecord, now_ms};
use cairn_api::host::VmOrigin;

/// Limits and knobs of a [`QemuDriver`].
#[derive(Debug, Clone)]
pub struct QemuDriverOptions {
    pub qmp: QmpOptions,
    /// From spawning QEMU to QMP answering.
    pub start_timeout: Duration,
    /// A block job (backup cancel, commit) reaching the next state.
    pub job_timeout: Duration,
    /// Writing the execution state.
    pub migrate_timeout: Duration,
    /// Checkpoint bitmaps kept per disk (older ones are removed after a snapshot).
    pub max_checkpoints: usize,
    /// `qemu-system-x86_64` to run; default `$CAIRN_QEMU_SYSTEM` or the one on `PATH`.
    pub qemu_program: Option<PathBuf>,
    /// Running QEMU processes to adopt through their QMP sockets (a directory: every socket in
    /// it, rescanned whenever VMs are listed).
    pub adopt: Vec<adopt::AdoptSource>,
}

impl Default for QemuDriverOptions {
    fn default() -> Self {
        Self {
            qmp: QmpOptions {
                command_timeout: Duration::from_secs(20),
                ..QmpOptions::default()
            },
            start_timeout: Duration::from_secs(20),
            job_timeout: Duration::from_secs(60),
            migrate_timeout: Duration::from_secs(120),
            max_checkpoints: 4,
            qemu_program: None,
            adopt: Vec::new(),
        }
    }
}

/// The QEMU driver. See the crate docs for the snapshot lifecycle.
pub struct QemuDriver {
    state: StateDir,
    options: QemuDriverOptions,
    vms: StdMutex<HashMap<VmId, VmRecord>>,
    /// Processes this instance spawned, to reap them; adopted VMs are not our children.
    children: StdMutex<HashMap<VmId, Child>>,
    conns: Mutex<HashMap<VmId, Arc<QmpClient>>>,
    /// One guest-agent client per VM: the chardev serves a single connection.
    agents: StdMutex<HashMap<VmId, Arc<GuestAgent>>>,
    /// Serializes block-graph work (snapshot, delete, recover, save) per VM.
    vm_locks: StdMutex<HashMap<VmId, Arc<Mutex<()>>>>,
}

impl std::fmt::Debug for QemuDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuDriver")
            .field("state", &self.state.root)
            .finish_non_exhaustive()
    }
}

/// Whether `pid` is a live (not zombie) process whose command line mentions `marker`.
fn pid_matches(pid: u32, marker: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let marker = marker.as_os_str().as_encoded_bytes();
    cmdline.windows(marker.len()).any(|w| w == marker)
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot) of a live, not
/// zombie process.
fn pid_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    if matches!(f.first(), None | Some(&"Z") | Some(&"X")) {
        return None;
    }
    f.get(19)?.parse().ok()
}

fn kill_pid(pid: u32) {
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    if let Err(e) = rustix::process::kill_process(p, rustix::process::Signal::KILL) {
        tracing::debug!(pid, error = %e, "SIGKILL");
    }
}

impl QemuDriver {
    /// Opens (creating) the state directory and re-adopts the VMs recorded there. Call
    /// [`QemuDriver::recover`] next to clear snapshots a previous agent left behind.
    pub fn open(state_dir: &Path, options: QemuDriverOptions) -> Result<Self, DriverError> {
        let state = StateDir::open(state_dir)?;
        let vms = state.load_vms()?.into_iter().map(|r| (r.id, r)).collect();
        Ok(Self {
            state,
            options,
            vms: StdMutex::new(vms),
            children: StdMutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            agents: StdMutex::new(HashMap::new()),
            vm_locks: StdMutex::new(HashMap::new()),
        })
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state.root
    }

    pub fn options(&self) -> &QemuDriverOptions {
        &self.options
    }

    fn record(&self, vm: VmId) -> Result<VmRecord, DriverError> {
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vm)
            .cloned()
            .ok_or(DriverError::UnknownVm(vm))
    }

    fn vm_lock(&self, vm: VmId) -> Arc<Mutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(vm).or_default())
    }

    fn is_alive(&self, rec: &VmRecord) -> bool {
        if matches!(rec.origin, VmOrigin::Adopted { .. }) {
            // Not our child: the same process as when adopted (PID and start time), or, when
            // the kernel did not tell the PID, a socket that still exists.
            return match (rec.pid, rec.pid_start) {
                (0, _) => rec.qmp_socket.exists(),
                (pid, Some(start)) => pid_start(pid) == Some(start),
                (pid, None) => pid_start(pid).is_some(),
            };
        }
        if let Some(child) = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&rec.id)
            && !matches!(child.try_wait(), Ok(None))
        {
            return false;
        }
        pid_matches(rec.pid, &rec.qmp_socket)
    }

    /// The VM's QMP connection, reconnecting when the cached one closed.
    pub async fn qmp(&self, vm: VmId) -> Result<Arc<QmpClient>, DriverError> {
        let rec = self.record(vm)?;
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&vm) {
            if c.closed_reason().is_none() {
                return Ok(Arc::clone(c));
            }
            conns.remove(&vm);
        }
        if !self.is_alive(&rec) {
            return Err(DriverError::NotRunning(vm));
        }
        // QEMU's monitor serves one client at a time: right after a previous client (a crashed
        // or restarted agent) went away, a new connection can be reset. Retry within the bound.
        let deadline = Instant::now() + self.options.qmp.connect_timeout;
        let client = loop {
            match QmpClient::connect(&rec.qmp_socket, self.options.qmp.clone()).await {
                Ok(c) => break c,
                Err(e @ (QmpError::Connect { .. } | QmpError::Disconnected { .. }))
                    if Instant::now() < deadline && self.is_alive(&rec) =>
                {
                    tracing::debug!(vm = %vm, error = %e, "QMP connect: retrying");
                    sleep(Duration::from_millis(50)).await;
                }
                Err(source) => return Err(DriverError::Qmp { vm, source }),
            }
        };
        let client = Arc::new(client);
        conns.insert(vm, Arc::clone(&client));
        Ok(client)
    }

    /// The VM's guest-agent client. Use this one rather than a new [`GuestAgent`]: QEMU's
    /// chardev accepts one connection, so a second client would starve the driver's quiesce.
    pub fn guest_agent(&self, vm: VmId) -> Result<Arc<GuestAgent>, DriverError> {
        let rec = self.record(vm)?;
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let agent = agents.entry(vm).or_insert_with(|| {
            Arc::new(GuestAgent::new(
                &rec.qga_socket,
                QgaOptions {
                    connect_timeout: Duration::from_secs(2),
                    sync_timeout: Duration::from_secs(2),
                    ..QgaOptions::default()
                },
            ))
        });
        Ok(Arc::clone(agent))
    }

    fn handle(rec: &VmRecord) -> VmHandle {
        VmHandle {
            id: rec.id,
            name: rec.spec.name.clone(),
            pid: rec.pid,
            qmp_socket: rec.qmp_socket.clone(),
            qga_socket: rec.qga_socket.clone(),
            disks: rec.disks.clone(),
            origin: rec.origin.clone(),
        }
    }

    /// Starts a VM from its attributes and waits until QMP answers.
    pub async fn start_vm(&self, spec: &VmSpec) -> Result<VmHandle, DriverError> {
        spec.validate()?;
        let id = VmId::random();
        let dir = self.state.vm_dir(id);
        std::fs::create_dir_all(&dir).map_err(|source| DriverError::Io {
            path: dir.clone(),
            source,
        })?;
        let paths = RunPaths {
            qmp: dir.join("qmp.sock"),
            qga: dir.join("qga.sock"),
            serial: dir.join("serial.log"),
        };
        let name = self
            .options
            .qemu_program
            .clone()
            .map(|p| p.display().to_string())
            .or_else(|| std::env::var("CAIRN_QEMU_SYSTEM").ok())
            .unwrap_or_else(|| QEMU_SYSTEM.to_owned());
        let program = find_program(&name).ok_or(ProcessError::NotFound { program: name })?;
        let log_path = dir.join("qemu.log");
        let io = |source| DriverError::Io {
            path: log_path.clone(),
            source,
        };
        let log = File::create(&log_path).map_err(io)?;
        let log2 = log.try_clone().map_err(io)?;
        let args = qemu_args(spec, &paths);
        tracing::info!(vm = %id, program = %program.display(), ?args, "starting VM");
        let child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                program: program.clone(),
                source,
            })?;
        let disks = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| VmDisk {
                id: d.id.clone(),
                node_name: d.node(i),
                backing: d.backing(),
                read_only: d.read_only,
            })
            .collect();
        let rec = VmRecord {
            id,
            spec: spec.clone(),
            pid: child.id(),
            qmp_socket: paths.qmp.clone(),
            qga_socket: paths.qga.clone(),
            started_at_ms: now_ms(),
            disks,
            origin: VmOrigin::Cairn,
            unmapped: Vec::new(),
            pid_start: None,
        };
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, child);
        // Recorded before we wait: an agent crash from here on still knows the VM.
        if let Err(e) = self.state.save_vm(&rec) {
            self.reap(id, rec.pid, true);
            return Err(e);
        }
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, rec.clone());
        if let Err(e) = self.wait_ready(&rec).await {
            self.reap(id, rec.pid, true);
            self.forget(id).await;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            tracing::warn!(vm = %id, log = %tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                "VM did not start");
            return Err(e);
        }
        Ok(Self::handle(&rec))
    }

    async fn wait_ready(&self, rec: &VmRecord) -> Result<(), DriverError> {
        let deadline = Instant::now() + self.options.start_timeout;
        loop {
            if !self.is_alive(rec) {
                let log = std::fs::read_to_string(self.state.vm_dir(rec.id).join("qemu.log"))
                    .unwrap_or_default();
                return Err(DriverError::Failed {
                    what: format!("starting VM {}", rec.id),
                    reason: format!("QEMU exited: {}", log.trim()),
                });
            }
            if rec.qmp_socket.exists() {
                match self.qmp(rec.id).await {
                    Ok(_) => return Ok(()),
                    // Still starting, or dying: the next round tells which.
                    Err(DriverError::Qmp { .. } | DriverError::NotRunning(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    what: format!("QMP of VM {}", rec.id),
                    after: self.options.start_timeout,
                });
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs (when `kill`) and reaps our child, or SIGKILLs an adopted PID that still matches.
    fn reap(&self, vm: VmId, pid: u32, kill: bool) {
        let child = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm);
        match child {
            Some(mut c) => {
                if kill {
                    let _ = c.kill();
                }
                let _ = c.wait();
            }
            None if kill => {
                if let Some(rec) = self.vms.lock().unwrap_or_else(|e| e.into_inner()).get(&vm)
                    && rec.origin == VmOrigin::Cairn
                    && pid_matches(pid, &rec.qmp_socket)
                {
                    kill_pid(pid);
                }
            }
            None => {}
        }
    }

    async fn forget(&self, vm: VmId) {
        self.conns.lock().await.remove(&vm);
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm);
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm);
        if let Err(e) = self.state.remove_vm(vm) {
            tracing::warn!(vm = %vm, error = %e, "removing VM record");
        }
    }

    /// Clean shutdown (snapshots torn down first, then `quit`, which also stores persistent
    /// bitmaps), SIGKILL past `timeout`. A VM that is already gone is just forgotten.
    ///
    /// An adopted QEMU is never stopped: refused while it runs; once gone it is only forgotten
    /// (files of snapshots in flight cleared).
    pub async fn stop_vm(&self, vm: VmId, timeout: Duration) -> Result<(), DriverError> {
        let rec = self.record(vm)?;
        if let VmOrigin::Adopted { qmp_socket } = &rec.origin {
            if self.is_alive(&rec) {
                return Err(DriverError::Refused {
                    vm,
                    reason: format!(
                        "adopted QEMU (QMP {}) was not started by Cairn and is never stopped by it",
                        qmp_socket.display()
                    ),
                });
            }
            if let Err(e) = self.recover_vm(vm).await {
                tracing::warn!(vm = %vm, error = %e, "clearing snapshots of a gone adopted VM");
            }
            self.forget(vm).await;
            return Ok(());
        }
        if self.is_alive(&rec) {
            if let Err(e) = self.recover_vm(vm).await {
                tracing::warn!(vm = %vm, error = %e, "tearing down snapshots before stop");
            }
            if let Ok(qmp) = self.qmp(vm).await {
                match qmp.execute_with_timeout("quit", None, timeout).await {
                    Ok(_) => {}
                    Err(e) if e.is_disconnected() => {}
                    Err(e) => tracing::warn!(vm = %vm, error = %e, "quit"),
                }
            }
            let deadline = Instant::now() + timeout;
            while self.is_alive(&rec) && Instant::now() < deadline {
                sleep(Duration::from_millis(20)).await;
            }
            let killed = self.is_alive(&rec);
            if killed {
                tracing::warn!(vm = %vm, "QEMU did not quit in time: SIGKILL");
            }
            self.reap(vm, rec.pid, killed);
        } else {
            self.reap(vm, rec.pid, false);
            // Whatever the journal holds for this VM can only be files now.
            if let Err(e) = self.recover_vm(vm).await {
                tracing::warn!(vm = %vm, error = %e, "clearing snapshots of a gone VM");
            }
        }
        self.forget(vm).await;
        Ok(())
    }

    async fn info(&self, rec: &VmRecord) -> VmInfo {
        let state = if !self.is_alive(rec) {
            VmState::Gone
        } else {
            let status = match self.qmp(rec.id).await {
                Ok(q) => q
                    .execute_with_timeout("query-status", None, Duration::from_secs(5))
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match status {
                Ok(v) => VmState::Running {
                    status: v["status"].as_str().unwrap_or("unknown").to_owned(),
                    cpus_running: v["running"].as_bool().unwrap_or(false),
                },
                Err(reason) => VmState::Unresponsive { reason },
            }
        };
        VmInfo {
            unprotected: Vec::new(),
            handle: Self::handle(rec),
            spec: rec.spec.clone(),
            state,
        }
    }

    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, DriverError> {
        self.refresh_adopted().await;
        let mut recs: Vec<VmRecord> = self
            .vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        recs.sort_by_key(|r| r.started_at_ms);
        let mut out = Vec::with_capacity(recs.len());
        for r in &recs {
            out.push(self.info(r).await);
        }
        Ok(out)
    }

    pub async fn vm_status(&self, vm: VmId) -> Result<VmInfo, DriverError> {
        let rec = match self.record(vm) {
            Err(DriverError::UnknownVm(_)) if !self.options.adopt.is_empty() => {
                self.refresh_adopted().await;
                self.record(vm)?
            }
            r => r?,
        };
        Ok(self.info(&rec).await)
    }
}

impl HypervisorDriver for QemuDriver {
    fn guest_agent_of(&self, vm: VmId) -> Option<Arc<GuestAgent>> {
        self.guest_agent(vm).ok()
    }

    fn start_vm<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<VmHandle, DriverError>> {
        Box::pin(QemuDriver::start_vm(self, spec))
    }

    fn stop_vm(&self, vm: VmId, timeout: Duration) -> BoxFuture<'_, Result<(), DriverError>> {
        Box::pin(QemuDriver::stop_vm(self, vm, timeout))
    }

    fn list_vms(&self) -> BoxFuture<'_, Result<Vec<VmInfo>, DriverError>> {
        Box::pin(QemuDriver::list_vms(self))
    }

    fn vm_status(&self, vm: VmId) -> BoxFuture<'_, Result<VmInfo, DriverError>> {
        Box::pin(QemuDriver::vm_status(self, vm))
    }

    fn snapshot<'a>(
        &'a self,
        vm: VmId,
        options: &'a SnapshotOptions,
    ) -> BoxFuture<'a, Result<VmSnapshot, DriverError>> {
        Box::pin(QemuDriver::snapshot(self, vm, options))
    }

    fn delete_snapshot<'a>(
        &'a self,
        snapshot: &'a VmSnapshot,
    ) -> BoxFuture<'a, Result<u64, DriverError>> {
        Box::pin(QemuDriver::delete_snapshot(self, snapshot))
    }

    fn changes_since(
        &self,
        vm: VmId,
        checkpoint: CheckpointId,
    ) -> BoxFuture<'_, Result<Vec<(String, Changes)>, DriverError>> {
        Box::pin(QemuDriver::changes_since(self, vm, checkpoint))
    }

    fn recover(&self) -> BoxFuture<'_, Result<usize, DriverError>> {
        Box::pin(QemuDriver::recover(self))
    }

    fn save_state<'a>(
        &'a self,
        vm: VmId,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<SavedState, DriverError>> {
        Box::pin(QemuDriver::save_state(self, vm, path))
    }

    fn resource_usage(&self, vm: VmId) -> BoxFuture<'_, Result<ResourceUsage, DriverError>> {
        Box::pin(QemuDriver::resource_usage(self, vm))
    }
}
