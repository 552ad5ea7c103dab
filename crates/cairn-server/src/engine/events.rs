//! A job's log lines, buffered and written in batches.
//!
//! Lines of every running job go to one buffer; a flush writes all of them in
//! one catalog transaction ([`Catalog::add_events`]), in the order they were logged (a lock
//! held across "take the buffer, write it" keeps batches in order). The engine flushes:
//!
//! | when | by |
//! |---|---|
//! | every [`FLUSH_EVERY`] | the housekeeping thread (a running job's lines are visible within it) |
//! | at a step boundary | [`JobCtx::check_cancel`](super::JobCtx::check_cancel) |
//! | [`MAX_PENDING`] lines buffered | the thread that logs the last one |
//! | before a job's final state is written, after its holds are released | the worker (a finished job's log is complete) |
//! | cancel requested, a job recovered at start | at once |
//!
//! A process killed outright loses at most the last [`FLUSH_EVERY`] of lines.
//!
//! A batch that fails stays buffered, ahead of newer lines, and is tried again; after
//! [`GIVE_UP_AFTER`] failures in a row its lines are written one by one so that one bad line
//! (a job that no longer exists) cannot hold back every other.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::sync::Arc;

use cairn_catalog::{Catalog, CatalogError, NewEvent, now_ms};

/// The longest a logged line waits before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Buffered lines that trigger a flush by the logging thread.
pub const MAX_PENDING: usize = 256;
/// Failed batch writes in a row before lines are written one by one.
pub const GIVE_UP_AFTER: u32 = 3;

pub(crate) struct EventLog {
    catalog: Arc<Catalog>,
    pending: Mutex<Vec<NewEvent>>,
    /// Held while a batch is taken and written; counts failed writes in a row.
    write: Mutex<u32>,
    /// Catalog calls made for events.
    writes: AtomicU64,
    /// Lines logged.
    lines: AtomicU64,
}

impl EventLog {
    pub(crate) fn new(catalog: Arc<Catalog>) -> Self {
        Self {
            catalog,
            pending: Mutex::new(Vec::new()),
            write: Mutex::new(0),
            writes: AtomicU64::new(0),
            lines: AtomicU64::new(0),
        }
    }

    /// Buffers one line (written by the next flush).
    pub(crate) fn push(&self, job: &str, level: &str, message: &str) {
        let n = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.push(NewEvent {
                job: job.to_string(),
                at_ms: now_ms(),
                level: level.to_string(),
                message: message.to_string(),
            });
            p.len()
        };
        self.lines.fetch_add(1, Ordering::Relaxed);
        if n >= MAX_PENDING {
            let _ = self.flush();
        }
    }

    /// Buffers one line and writes the buffer now.
    pub(crate) fn push_now(
        &self,
        job: &str,
        level: &str,
        message: &str,
    ) -> Result<(), CatalogError> {
        self.push(job, level, message);
        self.flush()
    }

    /// Writes every buffered line, of every job, in one transaction.
    pub(crate) fn flush(&self) -> Result<(), CatalogError> {
        let mut failures = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return Ok(());
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        let Err(e) = self.catalog.add_events(&batch) else {
            *failures = 0;
            return Ok(());
        };
        *failures += 1;
        if *failures >= GIVE_UP_AFTER {
            *failures = 0;
            for line in &batch {
                self.writes.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.catalog.add_events(std::slice::from_ref(line)) {
                    tracing::error!("job {}: log line lost ({e}): {}", line.job, line.message);
                }
            }
        } else {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let newer = std::mem::replace(&mut *p, batch);
            p.extend(newer);
        }
        Err(e)
    }

    /// Catalog calls made for events so far.
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Lines logged so far (each was one catalog call before events were batched).
    pub(crate) fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }
}
