//! The job engine.
//!
//! | state | meaning |
//! |---|---|
//! | `queued` | accepted, waiting for a worker (at most `max_jobs` run at once) |
//! | `running` | a worker runs its flow; `holds` lists what it must release |
//! | `succeeded` / `failed` / `cancelled` | final; `result` or `error` set, holds released |
//!
//! Two unfinished jobs never share a VM: [`submit`] refuses the second with a conflict.
//! Cancel is cooperative: flows call [`JobCtx::check_cancel`] between steps. On start,
//! `recover` fails every job a previous process left `running` (after releasing its holds)
//! and queues the `queued` ones again.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use cairn_catalog::{Hold, JobRecord, JobState, new_id, now_ms};

use crate::{Result, Server, ServerError};

/// What a job does, with its parameters: the API's type, stored as the job's `params`.
pub use cairn_api::server::JobKind;

/// Refuses a job that cannot run.
fn validate(kind: &JobKind) -> Result<()> {
    match kind {
        JobKind::Backup { vms, .. } | JobKind::GroupBackup { vms, .. } => {
            if vms.is_empty() {
                return Err(ServerError::Invalid("no VM given".into()));
            }
            let mut seen = std::collections::BTreeSet::new();
            for v in vms {
                if !seen.insert(v) {
                    return Err(ServerError::Invalid(format!("VM {v} given twice")));
                }
            }
            Ok(())
        }
        JobKind::Restore(p) => crate::restore::validate(p),
        JobKind::Prune { .. } | JobKind::Index { .. } => Ok(()),
    }
}

pub(crate) struct Engine {
    queue: Mutex<VecDeque<String>>,
    ready: Condvar,
    /// Serializes "check conflicts, then insert".
    admit: Mutex<()>,
    workers: usize,
}

impl Engine {
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            admit: Mutex::new(()),
            workers,
        }
    }

    fn push(&self, id: String) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(id);
        self.ready.notify_one();
    }

    fn pop(&self) -> String {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(id) = q.pop_front() {
                return id;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Accepts a job: validates it, refuses it when a VM is busy, records it queued.
pub fn submit(server: &Arc<Server>, kind: JobKind) -> Result<JobRecord> {
    validate(&kind)?;
    let vms = kind.vms();
    let _admit = server
        .engine
        .admit
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for state in [JobState::Queued, JobState::Running] {
        for j in server.catalog.jobs_in(state)? {
            if let Some(v) = j.vms.iter().find(|v| vms.contains(v)) {
                return Err(ServerError::Conflict(format!(
                    "VM {v} is busy with {} job {}",
                    j.kind, j.id
                )));
            }
        }
    }
    let job = JobRecord {
        id: new_id(),
        kind: kind.name().into(),
        state: JobState::Queued,
        params: kind,
        vms,
        created_ms: now_ms(),
        started_ms: None,
        finished_ms: None,
        error: None,
        result: None,
        holds: Vec::new(),
        cancel_requested: false,
        events: None,
    };
    server.catalog.insert_job(&job)?;
    server.catalog.add_event(&job.id, "info", "queued")?;
    server.engine.push(job.id.clone());
    Ok(job)
}

/// Requests a job's cancellation.
pub fn cancel(server: &Server, id: &str) -> Result<JobRecord> {
    let j = server.catalog.job(id)?;
    if !server.catalog.request_cancel(&j.id)? {
        return Err(ServerError::Conflict(format!(
            "job {} already {}",
            j.id,
            j.state.as_str()
        )));
    }
    server
        .catalog
        .add_event(&j.id, "warn", "cancel requested")?;
    Ok(server.catalog.job(&j.id)?)
}

/// What a running flow uses to log, hold resources and see cancellation.
pub struct JobCtx<'a> {
    pub server: &'a Arc<Server>,
    pub id: String,
    holds: Mutex<Vec<Hold>>,
}

impl JobCtx<'_> {
    pub fn info(&self, msg: impl AsRef<str>) {
        tracing::info!("job {}: {}", self.id, msg.as_ref());
        let _ = self
            .server
            .catalog
            .add_event(&self.id, "info", msg.as_ref());
    }

    pub fn warn(&self, msg: impl AsRef<str>) {
        tracing::warn!("job {}: {}", self.id, msg.as_ref());
        let _ = self
            .server
            .catalog
            .add_event(&self.id, "warn", msg.as_ref());
    }

    pub fn check_cancel(&self) -> Result<()> {
        if self.server.catalog.cancel_requested(&self.id)? {
            return Err(ServerError::Cancelled);
        }
        Ok(())
    }

    /// Records `h` durably before the flow acquires it.
    pub fn hold(&self, h: Hold) -> Result<()> {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.push(h);
        self.server.catalog.set_job_holds(&self.id, &holds)?;
        Ok(())
    }

    /// Forgets `h` after the flow released it (or failed to acquire it).
    pub fn unhold(&self, h: &Hold) {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.retain(|x| x != h);
        let _ = self.server.catalog.set_job_holds(&self.id, &holds);
    }

    /// Releases everything still held (failure paths).
    pub fn release_all(&self) {
        let holds = self.holds.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for h in holds {
            match release(self.server, &h) {
                Ok(()) => {
                    self.warn(format!("released {}", describe(&h)));
                    self.unhold(&h);
                }
                Err(e) => self.warn(format!("could not release {}: {}", describe(&h), e.chain())),
            }
        }
    }
}

fn describe(h: &Hold) -> String {
    match h {
        Hold::VmSnapshot { vm, snapshot } => format!("VM snapshot {snapshot} of {vm}"),
        Hold::StorageSnapshot { agent, snapshot } => {
            format!("storage snapshot {snapshot} on {agent}")
        }
        Hold::SavedState { vm, name } => format!("saved state {name} of {vm}"),
    }
}

/// Releases what finished jobs still hold: a release that failed because a peer was away
/// (the manager restarting, a host agent down) is tried again until it succeeds, so a VM is
/// never left with a snapshot that blocks its next backup. Runs every few seconds and before
/// each job.
pub(crate) fn release_leftovers(server: &Arc<Server>) {
    let Ok(jobs) = server.catalog.finished_jobs_holding() else {
        return;
    };
    for j in jobs {
        let ctx = JobCtx {
            server,
            id: j.id.clone(),
            holds: Mutex::new(j.holds.clone()),
        };
        for h in &j.holds {
            match release(server, h) {
                Ok(()) => {
                    ctx.info(format!("released {} after the job ended", describe(h)));
                    ctx.unhold(h);
                }
                Err(e) => {
                    tracing::debug!("job {}: {} still held: {}", j.id, describe(h), e.chain())
                }
            }
        }
    }
}

/// Releases one held resource. A resource already gone counts as released.
pub fn release(server: &Server, h: &Hold) -> Result<()> {
    let gone = |e: &cairn_http::ClientError| e.kind() == Some(cairn_http::ErrorKind::NotFound);
    match h {
        Hold::VmSnapshot { vm, snapshot } => {
            // The host is wherever the VM is now; "host/snapshot" when recorded with a host.
            let (host, id) = match snapshot.split_once('/') {
                Some((h, i)) => (h.to_string(), i.to_string()),
                None => (
                    server
                        .manager
                        .vm(vm)
                        .map_err(ServerError::call(format!("locate {vm}")))?
                        .host,
                    snapshot.clone(),
                ),
            };
            let id = id
                .parse()
                .map_err(|e| ServerError::Invalid(format!("held VM snapshot {snapshot}: {e}")))?;
            match server.manager.delete_snapshot(&host, id) {
                Err(e) if !gone(&e) => Err(ServerError::call("delete VM snapshot")(e)),
                _ => Ok(()),
            }
        }
        Hold::StorageSnapshot { agent, snapshot } => {
            let c = server.storage_agent(agent)?;
            match c.delete_snapshot(snapshot) {
                Err(e) if !gone(&e) => Err(ServerError::call("delete storage snapshot")(e)),
                _ => Ok(()),
            }
        }
        Hold::SavedState { vm, name } => {
            let (host, name) = name
                .split_once('/')
                .map(|(h, n)| (h.to_string(), n.to_string()))
                .unwrap_or_else(|| (vm.clone(), name.clone()));
            match server.manager.delete_saved_state(&host, &name) {
                Err(e) if !gone(&e) => Err(ServerError::call("delete saved state")(e)),
                _ => Ok(()),
            }
        }
    }
}

fn run_one(server: &Arc<Server>, id: &str) {
    let job = match server.catalog.job(id) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!("job {id}: {e}");
            return;
        }
    };
    let ctx = JobCtx {
        server,
        id: job.id.clone(),
        holds: Mutex::new(job.holds.clone()),
    };
    if job.cancel_requested {
        let _ = server
            .catalog
            .set_job_state(&job.id, JobState::Cancelled, Some("cancelled"), None);
        return;
    }
    let _ = server
        .catalog
        .set_job_state(&job.id, JobState::Running, None, None);
    ctx.info("started");
    release_leftovers(server);
    let outcome = match &job.params {
        JobKind::Backup { vms, full } => crate::backup::run(&ctx, vms, *full),
        JobKind::GroupBackup { vms, full } => crate::group::run(&ctx, vms, *full),
        JobKind::Restore(p) => crate::restore::run(&ctx, p),
        JobKind::Prune { vms, dry_run } => crate::schedule::prune(&ctx, vms, *dry_run),
        JobKind::Index { backup } => crate::files::index_backup(&ctx, backup),
    };
    match outcome {
        Ok(result) => {
            ctx.release_all();
            ctx.info("succeeded");
            let _ = server
                .catalog
                .set_job_state(&job.id, JobState::Succeeded, None, Some(&result));
        }
        Err(e) => {
            ctx.release_all();
            let (state, msg) = match e {
                ServerError::Cancelled => (JobState::Cancelled, "cancelled".to_string()),
                e => (JobState::Failed, e.chain()),
            };
            let _ = server.catalog.add_event(&job.id, "error", &msg);
            let _ = server
                .catalog
                .set_job_state(&job.id, state, Some(&msg), None);
        }
    }
}

pub(crate) fn start_workers(server: &Arc<Server>) {
    for i in 0..server.engine.workers {
        let s = Arc::clone(server);
        std::thread::Builder::new()
            .name(format!("job-worker-{i}"))
            .spawn(move || {
                loop {
                    let id = s.engine.pop();
                    run_one(&s, &id);
                }
            })
            .expect("spawn job worker");
    }
}

/// Fails the jobs a previous process left running (releasing their holds) and queues the
/// queued ones again.
pub(crate) fn recover(server: &Arc<Server>) -> Result<()> {
    for j in server.catalog.jobs_in(JobState::Running)? {
        let ctx = JobCtx {
            server,
            id: j.id.clone(),
            holds: Mutex::new(j.holds.clone()),
        };
        ctx.release_all();
        let msg = "the server stopped while the job ran; what it held was released";
        let _ = server.catalog.add_event(&j.id, "error", msg);
        server
            .catalog
            .set_job_state(&j.id, JobState::Failed, Some(msg), None)?;
    }
    for j in server.catalog.jobs_in(JobState::Queued)? {
        server.engine.push(j.id);
    }
    // Metadata snapshots of backups that never got recorded (no job runs yet, so every one
    // without a backup is an orphan).
    for m in server.catalog.orphan_metadata()? {
        let _ = server.meta.remove(&server.catalog, &m);
    }
    Ok(())
}
