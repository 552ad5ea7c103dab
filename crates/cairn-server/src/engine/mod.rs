//! The job engine: persisted jobs, a queue, workers, and the context a running job uses
//! (log, holds, cancel, follow-up jobs). It runs any [`Flow`] registered under a kind and
//! knows nothing of what flows do: it keeps a job's typed parameters and result (the API's
//! `JobKind` and `JobResult`) without looking inside them; of the application ([`App`]) it
//! knows only how to release a hold.
//!
//! | state | meaning |
//! |---|---|
//! | `queued` | accepted, waiting for a worker (at most `workers` run at once, in submission order) |
//! | `running` | a worker runs its flow; `holds` lists what it must release |
//! | `succeeded` / `failed` / `cancelled` | final; `result` or `error` set, holds released |
//!
//! Invariants:
//! - **Two unfinished jobs never share a VM**: [`Engine::submit`] refuses the second with
//!   a conflict (the VMs are the [`JobSpec`]'s; the engine does not interpret them).
//! - **A hold is recorded before it is acquired** ([`JobCtx::hold`], one catalog write each)
//!   and released at the end of the job whatever its outcome (success, failure, cancel, a
//!   panicking flow), or by [`recover`] when a previous process died running it. A release
//!   that fails (a peer away) stays recorded and is retried every 5 s and before each job.
//! - **A job's log is batched, never lost**: lines are buffered and written many per
//!   transaction ([`events`]), within [`events::FLUSH_EVERY`], at each step boundary, and
//!   always before the job's final state is written.
//! - **Cancel is cooperative**: flows call [`JobCtx::check_cancel`] between steps.
//! - **Only an active application starts jobs** ([`App::active`]: a standby server, or one
//!   that lost its leader lease, is not): workers leave queued jobs queued, and running
//!   flows stop at their next step boundary. Starting a job is one conditional catalog
//!   update (`queued` → `running`), so two workers or two servers never run one job.
//! - On start, and whenever a server becomes active, [`recover`] fails every job left
//!   `running` by a process that stopped (after releasing its holds) and queues the
//!   `queued` ones again. Jobs this process is still running are left alone.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};

use cairn_api::server::{JobId, JobKind, JobResult};
use cairn_catalog::{Catalog, Hold, JobRecord, JobState, now_ms};

use crate::{Result, ServerError};

mod ctx;
pub mod events;
#[cfg(test)]
mod tests;

pub use ctx::JobCtx;
use events::EventLog;

/// Runs the jobs of one kind.
pub trait Flow<A>: Send + Sync {
    /// The kind of job it runs, as the job record names it (`backup`, ...).
    fn kind(&self) -> &'static str;
    /// Runs one job with the parameters it was submitted with; the value is the job's
    /// result. Everything the flow holds when it returns is released by the engine.
    fn run(&self, ctx: &JobCtx<'_, A>, params: &JobKind) -> Result<JobResult>;
}

/// What the engine needs of the application whose jobs it runs.
pub trait App: Send + Sync + Sized + 'static {
    fn engine(&self) -> &Engine<Self>;
    /// Releases one held resource; a resource already gone counts as released.
    fn release(&self, hold: &Hold) -> Result<()>;
    /// A held resource, as a log line names it.
    fn describe(&self, hold: &Hold) -> String;
    /// Whether jobs may start now (see the module doc); always, unless several processes
    /// share the catalog.
    fn active(&self) -> bool {
        true
    }
}

/// A job to submit.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    /// The kind of a registered flow.
    pub kind: String,
    /// Handed to the flow as they are, and kept in the job record.
    pub params: JobKind,
    /// VMs the job works on (exclusive while it is unfinished).
    pub vms: Vec<String>,
}

/// The queue, the workers and the registered flows.
pub struct Engine<A> {
    catalog: Arc<Catalog>,
    flows: BTreeMap<&'static str, Box<dyn Flow<A>>>,
    workers: usize,
    queue: Mutex<VecDeque<JobId>>,
    ready: Condvar,
    /// Serializes "check conflicts, then insert".
    admit: Mutex<()>,
    /// Serializes releases of finished jobs' holds (each is released once).
    leftovers: Mutex<()>,
    /// The jobs this process's workers run now.
    running: Mutex<BTreeSet<JobId>>,
    events: EventLog,
}

impl<A> std::fmt::Debug for Engine<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("flows", &self.flows.keys().collect::<Vec<_>>())
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl<A: App> Engine<A> {
    /// An engine with no flows that runs at most `workers` jobs at once.
    pub fn new(catalog: Arc<Catalog>, workers: usize) -> Self {
        Self {
            events: EventLog::new(catalog.clone()),
            catalog,
            flows: BTreeMap::new(),
            workers: workers.max(1),
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            admit: Mutex::new(()),
            leftovers: Mutex::new(()),
            running: Mutex::new(BTreeSet::new()),
        }
    }

    /// Adds a flow; a second flow of the same kind replaces the first.
    pub fn register(mut self, flow: impl Flow<A> + 'static) -> Self {
        self.flows.insert(flow.kind(), Box::new(flow));
        self
    }

    /// Whether a flow runs jobs of `kind`.
    pub fn runs(&self, kind: &str) -> bool {
        self.flows.contains_key(kind)
    }

    /// Accepts a job: refuses an unknown kind and a busy VM, records the job queued.
    pub fn submit(&self, spec: JobSpec) -> Result<JobRecord> {
        if !self.runs(&spec.kind) {
            return Err(ServerError::Invalid(format!(
                "no flow runs {} jobs",
                spec.kind
            )));
        }
        let _admit = self.admit.lock().unwrap_or_else(|p| p.into_inner());
        for state in [JobState::Queued, JobState::Running] {
            for j in self.catalog.jobs_in(state)? {
                if let Some(v) = j.vms.iter().find(|v| spec.vms.contains(v)) {
                    return Err(ServerError::Conflict(format!(
                        "VM {v} is busy with {} job {}",
                        j.kind, j.id
                    )));
                }
            }
        }
        let job = JobRecord {
            id: JobId::random(),
            kind: spec.kind,
            state: JobState::Queued,
            params: spec.params,
            vms: spec.vms,
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            error: None,
            result: None,
            holds: Vec::new(),
            cancel_requested: false,
            events: None,
        };
        self.catalog.insert_job(&job)?;
        self.events.push(&job.id, "info", "queued");
        self.push(job.id.clone());
        Ok(job)
    }

    /// Requests a job's cancellation.
    pub fn cancel(&self, id: &str) -> Result<JobRecord> {
        let j = self.catalog.job(id)?;
        if !self.catalog.request_cancel(&j.id)? {
            return Err(ServerError::Conflict(format!(
                "job {} already {}",
                j.id,
                j.state.as_str()
            )));
        }
        self.events.push_now(&j.id, "warn", "cancel requested")?;
        Ok(self.catalog.job(&j.id)?)
    }

    /// Writes every buffered log line now.
    pub fn flush_events(&self) -> Result<()> {
        Ok(self.events.flush()?)
    }

    /// (catalog calls made for job events, lines logged) since the engine started.
    pub fn event_writes(&self) -> (u64, u64) {
        (self.events.writes(), self.events.lines())
    }

    fn push(&self, id: JobId) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(id);
        self.ready.notify_one();
    }

    fn pop(&self) -> JobId {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(id) = q.pop_front() {
                return id;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Empties the in-memory queue (the catalog keeps the queued jobs for [`recover`]).
    pub(crate) fn clear_queue(&self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeSet<JobId>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one queued job to its final state, unless the application is not active or the
    /// job is no longer queued.
    fn run_one(&self, app: &A, id: &JobId) {
        if !app.active() {
            // Left queued in the catalog: the active server (this one again, maybe) queues
            // it when it recovers.
            return;
        }
        let job = match self.catalog.job(id) {
            Ok(j) => j,
            Err(e @ cairn_catalog::CatalogError::NotFound(_)) => {
                return tracing::error!("job {id}: {e}");
            }
            Err(e) => return self.retry_later(id, &e.into()),
        };
        if job.state != JobState::Queued {
            return;
        }
        if job.cancel_requested {
            let _ =
                self.catalog
                    .set_job_state(&job.id, JobState::Cancelled, Some("cancelled"), None);
            return;
        }
        // Marked ours before the catalog says `running`: a recovery in between must not
        // take it for a job a stopped process left.
        self.running().insert(job.id.clone());
        match self.catalog.start_job(&job.id) {
            Ok(true) => {}
            Ok(false) => {
                self.running().remove(&job.id);
                return;
            }
            Err(e) => {
                self.running().remove(&job.id);
                return self.retry_later(id, &e.into());
            }
        }
        let ctx = JobCtx::new(app, &job);
        ctx.info("started");
        release_leftovers(app);
        let outcome = self.run_flow(&ctx, &job);
        self.finish(&ctx, outcome);
        self.running().remove(&job.id);
    }

    /// Queues `id` again after a pause: the catalog could not be read or written.
    fn retry_later(&self, id: &JobId, e: &ServerError) {
        tracing::error!("job {id}: not started: {}; trying again", e.chain());
        std::thread::sleep(std::time::Duration::from_secs(1));
        self.push(id.clone());
    }

    /// The flow's outcome; a flow that panics fails its job.
    fn run_flow(&self, ctx: &JobCtx<'_, A>, job: &JobRecord) -> Result<JobResult> {
        let Some(flow) = self.flows.get(job.kind.as_str()) else {
            return Err(ServerError::Invalid(format!(
                "no flow runs {} jobs",
                job.kind
            )));
        };
        std::panic::catch_unwind(AssertUnwindSafe(|| flow.run(ctx, &job.params))).unwrap_or_else(
            |panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(ServerError::Failed(format!(
                    "the {} flow panicked: {what}",
                    job.kind
                )))
            },
        )
    }

    /// Releases what the job still holds, completes its log, then writes its final state.
    fn finish(&self, ctx: &JobCtx<'_, A>, outcome: Result<JobResult>) {
        ctx.release_all();
        let (state, error, result) = match outcome {
            Ok(result) => {
                ctx.info("succeeded");
                (JobState::Succeeded, None, Some(result))
            }
            Err(ServerError::Cancelled) => {
                ctx.error("cancelled");
                (JobState::Cancelled, Some("cancelled".to_string()), None)
            }
            Err(e) => {
                let msg = e.chain();
                ctx.error(&msg);
                (JobState::Failed, Some(msg), None)
            }
        };
        ctx.flush();
        let _ = self
            .catalog
            .set_job_state(&ctx.id, state, error.as_deref(), result.as_ref());
    }
}

/// Fails the jobs a stopped process left running (releasing their holds) and queues the
/// queued ones again. Call before [`start`], and each time the application becomes active.
pub fn recover<A: App>(app: &A) -> Result<()> {
    let engine = app.engine();
    let mine = engine.running().clone();
    for j in engine.catalog.jobs_in(JobState::Running)? {
        if mine.contains(&j.id) {
            continue;
        }
        let ctx = JobCtx::new(app, &j);
        ctx.release_all();
        let msg = "the server stopped while the job ran; what it held was released";
        ctx.error(msg);
        ctx.flush();
        engine
            .catalog
            .set_job_state(&j.id, JobState::Failed, Some(msg), None)?;
    }
    engine.clear_queue();
    for j in engine.catalog.jobs_in(JobState::Queued)? {
        engine.push(j.id);
    }
    Ok(())
}

/// Starts the workers and the housekeeping thread (log flushes, leftover holds).
pub fn start<A: App>(app: &Arc<A>) {
    for i in 0..app.engine().workers {
        let app = Arc::clone(app);
        std::thread::Builder::new()
            .name(format!("job-worker-{i}"))
            .spawn(move || {
                loop {
                    let id = app.engine().pop();
                    app.engine().run_one(&app, &id);
                }
            })
            .expect("spawn job worker");
    }
    let app = Arc::clone(app);
    std::thread::Builder::new()
        .name("job-housekeeping".into())
        .spawn(move || {
            let leftovers_every = (5_000 / events::FLUSH_EVERY.as_millis()).max(1);
            for tick in 1u128.. {
                std::thread::sleep(events::FLUSH_EVERY);
                let _ = app.engine().events.flush();
                if tick % leftovers_every == 0 && app.active() {
                    release_leftovers(&*app);
                }
            }
        })
        .expect("spawn job housekeeping");
}

/// Releases what finished jobs still hold: a release that failed because a peer was away
/// (the manager restarting, a host agent down) is tried again until it succeeds, so a VM is
/// never left with a snapshot that blocks its next backup. Runs every 5 s and before each
/// job.
pub fn release_leftovers<A: App>(app: &A) {
    let engine = app.engine();
    let _one = engine.leftovers.lock().unwrap_or_else(|p| p.into_inner());
    let Ok(jobs) = engine.catalog.finished_jobs_holding() else {
        return;
    };
    for j in jobs {
        let ctx = JobCtx::new(app, &j);
        for h in &j.holds {
            match ctx.release(h) {
                Ok(()) => ctx.info(format!("released {} after the job ended", app.describe(h))),
                Err(e) => tracing::debug!(
                    "job {}: {} still held: {}",
                    j.id,
                    app.describe(h),
                    e.chain()
                ),
            }
        }
        ctx.flush();
    }
}
