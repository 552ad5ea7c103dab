//! What a running flow uses: its log, its holds, cancellation and follow-up jobs.

use std::sync::Mutex;

use cairn_api::server::JobId;
use cairn_catalog::{Hold, JobRecord};

use super::{App, Engine, JobSpec};
use crate::{Result, ServerError};

/// The context of one job, handed to its flow.
pub struct JobCtx<'a, A> {
    /// The application the flow works for (the server's catalog, clients, stores).
    pub app: &'a A,
    /// The job's id.
    pub id: JobId,
    engine: &'a Engine<A>,
    holds: Mutex<Vec<Hold>>,
}

impl<'a, A: App> JobCtx<'a, A> {
    /// The context of job `job`, holding what its record says it holds.
    pub(crate) fn new(app: &'a A, job: &JobRecord) -> Self {
        Self {
            app,
            id: job.id.clone(),
            engine: app.engine(),
            holds: Mutex::new(job.holds.clone()),
        }
    }

    /// Logs a line (buffered: see [`super::events`]).
    pub fn info(&self, msg: impl AsRef<str>) {
        tracing::info!("job {}: {}", self.id, msg.as_ref());
        self.engine.events.push(&self.id, "info", msg.as_ref());
    }

    pub fn warn(&self, msg: impl AsRef<str>) {
        tracing::warn!("job {}: {}", self.id, msg.as_ref());
        self.engine.events.push(&self.id, "warn", msg.as_ref());
    }

    pub(crate) fn error(&self, msg: impl AsRef<str>) {
        tracing::error!("job {}: {}", self.id, msg.as_ref());
        self.engine.events.push(&self.id, "error", msg.as_ref());
    }

    /// Writes the lines logged so far (a failed write keeps them for the next flush).
    pub fn flush(&self) {
        if let Err(e) = self.engine.events.flush() {
            tracing::warn!("job {}: log not written yet: {e}", self.id);
        }
    }

    /// A step boundary: writes the log, then fails with [`ServerError::Cancelled`] when a
    /// cancel was requested, or with [`ServerError::Failed`] when the application stopped
    /// being active (a server that lost its leader lease: the active one recovers the job).
    pub fn check_cancel(&self) -> Result<()> {
        self.flush();
        if !self.app.active() {
            return Err(ServerError::Failed(
                "this server stopped being the active one (leader lease lost)".into(),
            ));
        }
        if self.engine.catalog.cancel_requested(&self.id)? {
            return Err(ServerError::Cancelled);
        }
        Ok(())
    }

    /// Records `h` durably before the flow acquires it.
    pub fn hold(&self, h: Hold) -> Result<()> {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.push(h);
        self.engine.catalog.set_job_holds(&self.id, &holds)?;
        Ok(())
    }

    /// Forgets `h` after the flow released it (or failed to acquire it).
    pub fn unhold(&self, h: &Hold) {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.retain(|x| x != h);
        let _ = self.engine.catalog.set_job_holds(&self.id, &holds);
    }

    /// Releases `h` through the application and forgets it.
    pub fn release(&self, h: &Hold) -> Result<()> {
        self.app.release(h)?;
        self.unhold(h);
        Ok(())
    }

    /// What the job holds now.
    pub fn holds(&self) -> Vec<Hold> {
        self.holds.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Releases everything still held (the end of a job, failure paths); what cannot be
    /// released now stays recorded and is retried by the engine.
    pub fn release_all(&self) {
        for h in self.holds() {
            let what = self.app.describe(&h);
            match self.release(&h) {
                Ok(()) => self.warn(format!("released {what}")),
                Err(e) => self.warn(format!("could not release {what}: {}", e.chain())),
            }
        }
    }

    /// Submits a follow-up job (e.g. indexing a backup just recorded); it runs on its own,
    /// after this one or beside it.
    pub fn submit(&self, spec: JobSpec) -> Result<JobRecord> {
        self.engine.submit(spec)
    }
}
