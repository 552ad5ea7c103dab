//! Jobs and their logs, schedules and retention.

use crate::backend::{Row, Value, args};
use crate::{
    Catalog, CatalogError, Hold, JobEvent, JobRecord, JobResult, JobState, NewEvent, Result,
    Retention, Schedule, from_json, json, now_ms,
};

const JOB_COLS: &str = "id, kind, state, params, vms, created_ms, started_ms, finished_ms, error, \
    result, holds, cancel_requested";

/// A job's stored result. Results written before they carried their job's `kind` get it
/// from the row, so old catalogs stay readable; anything else unknown is an error naming it.
fn job_result(kind: &str, s: &str) -> Result<JobResult> {
    let mut v: serde_json::Value = from_json("result", s)?;
    if let Some(o) = v.as_object_mut() {
        o.entry("kind")
            .or_insert_with(|| serde_json::Value::String(kind.to_string()));
    }
    serde_json::from_value(v).map_err(|e| CatalogError::Decode {
        what: "result".into(),
        message: e.to_string(),
    })
}

fn job_row(r: &Row) -> Result<JobRecord> {
    let kind = r.text(1)?.to_string();
    let state = r.text(2)?;
    Ok(JobRecord {
        id: r.text(0)?.parse().map_err(|message| CatalogError::Decode {
            what: "job id".into(),
            message,
        })?,
        state: JobState::parse(state).ok_or_else(|| CatalogError::Decode {
            what: "job state".into(),
            message: format!("unknown job state {state:?}"),
        })?,
        params: from_json("params", r.opt_text(3)?.unwrap_or("null"))?,
        vms: from_json("vms", r.opt_text(4)?.unwrap_or("[]"))?,
        created_ms: r.int(5)?,
        started_ms: r.opt_int(6)?,
        finished_ms: r.opt_int(7)?,
        error: r.opt_text(8)?.map(Into::into),
        result: r.opt_text(9)?.map(|s| job_result(&kind, s)).transpose()?,
        holds: from_json("holds", r.opt_text(10)?.unwrap_or("[]"))?,
        cancel_requested: r.flag(11)?,
        events: None,
        kind,
    })
}

/// Appends one line to a job's log, numbered after the lines it has.
const ADD_EVENT: &str = "INSERT INTO job_events (job_id, seq, at_ms, level, message)
     VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = $1),
             $2, $3, $4)";

impl Catalog {
    pub fn insert_job(&self, j: &JobRecord) -> Result<()> {
        self.db().execute(
            &format!(
                "INSERT INTO jobs ({JOB_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                 $11, $12)"
            ),
            args![
                j.id.as_str(),
                &j.kind,
                j.state.as_str(),
                json(&j.params),
                json(&j.vms),
                j.created_ms,
                j.started_ms,
                j.finished_ms,
                j.error.as_deref(),
                j.result.as_ref().map(json),
                json(&j.holds),
                j.cancel_requested
            ],
        )?;
        Ok(())
    }

    fn jobs_where(&self, cond: &str, args: &[Value]) -> Result<Vec<JobRecord>> {
        self.db()
            .query(&format!("SELECT {JOB_COLS} FROM jobs {cond}"), args)?
            .iter()
            .map(job_row)
            .collect()
    }

    /// Jobs, newest first, at most `limit`.
    pub fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>> {
        self.jobs_where(
            "ORDER BY created_ms DESC, id LIMIT $1",
            args![limit.min(100_000) as i64],
        )
    }

    /// Jobs in a state.
    pub fn jobs_in(&self, state: JobState) -> Result<Vec<JobRecord>> {
        self.jobs_where(
            "WHERE state = $1 ORDER BY created_ms, id",
            args![state.as_str()],
        )
    }

    /// Finished jobs that still hold something (a release failed while a peer was away).
    pub fn finished_jobs_holding(&self) -> Result<Vec<JobRecord>> {
        self.jobs_where(
            "WHERE state IN ('succeeded', 'failed', 'cancelled') AND holds IS NOT NULL \
             AND holds <> '[]' ORDER BY created_ms, id",
            &[],
        )
    }

    /// A job by id or unique prefix.
    pub fn job(&self, spec: &str) -> Result<JobRecord> {
        if spec.len() < 4 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CatalogError::NotFound(format!("job {spec:?}")));
        }
        let pattern = format!("{}%", spec.to_ascii_lowercase());
        let mut found = self.jobs_where("WHERE id LIKE $1", args![pattern])?;
        match found.len() {
            0 => Err(CatalogError::NotFound(format!("job {spec}"))),
            1 => Ok(found.remove(0)),
            n => Err(CatalogError::Conflict(format!(
                "job prefix {spec} matches {n} jobs"
            ))),
        }
    }

    /// Moves a job to `state`, setting start and finish times, error and result.
    pub fn set_job_state(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        result: Option<&JobResult>,
    ) -> Result<()> {
        let now = now_ms();
        let mut db = self.db();
        match state {
            JobState::Running => db.execute(
                "UPDATE jobs SET state = $1, started_ms = $2 WHERE id = $3",
                args![state.as_str(), now, id],
            )?,
            _ if state.is_final() => db.execute(
                "UPDATE jobs SET state = $1, finished_ms = $2, error = $3, result = $4
                 WHERE id = $5",
                args![state.as_str(), now, error, result.map(json), id],
            )?,
            _ => db.execute(
                "UPDATE jobs SET state = $1 WHERE id = $2",
                args![state.as_str(), id],
            )?,
        };
        Ok(())
    }

    /// Moves a queued job to `running`, as one conditional update. Returns false when the job
    /// is not queued (another worker or server started it, it was cancelled or finished): of
    /// two servers starting one job, exactly one gets `true`.
    pub fn start_job(&self, id: &str) -> Result<bool> {
        let n = self.db().execute(
            "UPDATE jobs SET state = $1, started_ms = $2 WHERE id = $3 AND state = $4",
            args![
                JobState::Running.as_str(),
                now_ms(),
                id,
                JobState::Queued.as_str()
            ],
        )?;
        Ok(n == 1)
    }

    /// Replaces the list of resources a job holds (written before each is acquired).
    pub fn set_job_holds(&self, id: &str, holds: &[Hold]) -> Result<()> {
        self.db().execute(
            "UPDATE jobs SET holds = $1 WHERE id = $2",
            args![json(&holds), id],
        )?;
        Ok(())
    }

    /// Asks a queued or running job to stop. Returns false when it already finished.
    pub fn request_cancel(&self, id: &str) -> Result<bool> {
        let n = self.db().execute(
            "UPDATE jobs SET cancel_requested = 1 WHERE id = $1
             AND state IN ('queued', 'running')",
            args![id],
        )?;
        Ok(n > 0)
    }

    pub fn cancel_requested(&self, id: &str) -> Result<bool> {
        match self
            .db()
            .query_opt("SELECT cancel_requested FROM jobs WHERE id = $1", args![id])?
        {
            Some(r) => r.flag(0),
            None => Ok(false),
        }
    }

    /// Appends an event to a job's log.
    pub fn add_event(&self, job: &str, level: &str, message: &str) -> Result<()> {
        self.db()
            .execute(ADD_EVENT, args![job, now_ms(), level, message])?;
        Ok(())
    }

    /// Appends many events, of one job or several, in one transaction and in the order
    /// given: each job's lines get consecutive `seq` numbers after those it has. All or
    /// nothing: on an error no line of the batch is written.
    pub fn add_events(&self, events: &[NewEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.db().transaction(&mut |tx| {
            for e in events {
                tx.execute(ADD_EVENT, args![&e.job, e.at_ms, &e.level, &e.message])?;
            }
            Ok(())
        })
    }

    pub fn events(&self, job: &str) -> Result<Vec<JobEvent>> {
        self.db()
            .query(
                "SELECT seq, at_ms, level, message FROM job_events WHERE job_id = $1
                 ORDER BY seq",
                args![job],
            )?
            .iter()
            .map(|r| {
                Ok(JobEvent {
                    seq: r.int(0)?,
                    at_ms: r.int(1)?,
                    level: r.text(2)?.into(),
                    message: r.text(3)?.into(),
                })
            })
            .collect()
    }

    // ---- schedules and retention ----------------------------------------------------------

    pub fn upsert_schedule(&self, s: &Schedule) -> Result<()> {
        self.db().execute(
            "INSERT INTO schedules (name, vms, group_backup, every_s, next_ms, enabled)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET vms = excluded.vms,
                group_backup = excluded.group_backup, every_s = excluded.every_s,
                next_ms = excluded.next_ms, enabled = excluded.enabled",
            args![
                &s.name,
                json(&s.vms),
                s.group,
                s.every_s,
                s.next_ms,
                s.enabled
            ],
        )?;
        Ok(())
    }

    pub fn schedules(&self) -> Result<Vec<Schedule>> {
        self.db()
            .query(
                "SELECT name, vms, group_backup, every_s, next_ms, enabled FROM schedules
                 ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(Schedule {
                    name: r.text(0)?.into(),
                    vms: from_json("schedule vms", r.text(1)?)?,
                    group: r.flag(2)?,
                    every_s: r.int(3)?,
                    next_ms: r.int(4)?,
                    enabled: r.flag(5)?,
                })
            })
            .collect()
    }

    pub fn delete_schedule(&self, name: &str) -> Result<()> {
        let n = self
            .db()
            .execute("DELETE FROM schedules WHERE name = $1", args![name])?;
        if n == 0 {
            return Err(CatalogError::NotFound(format!("schedule {name}")));
        }
        Ok(())
    }

    pub fn set_retention(&self, vm: &str, r: &Retention) -> Result<()> {
        self.db().execute(
            "INSERT INTO retention (vm, keep_last, keep_daily, keep_weekly, keep_monthly)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (vm) DO UPDATE SET keep_last = excluded.keep_last,
                keep_daily = excluded.keep_daily, keep_weekly = excluded.keep_weekly,
                keep_monthly = excluded.keep_monthly",
            args![vm, r.keep_last, r.keep_daily, r.keep_weekly, r.keep_monthly],
        )?;
        Ok(())
    }

    /// The retention of `vm`, else the default (`*`), else `None` (keep everything).
    pub fn retention(&self, vm: &str) -> Result<Option<Retention>> {
        let mut db = self.db();
        for key in [vm, "*"] {
            let row = db.query_opt(
                "SELECT keep_last, keep_daily, keep_weekly, keep_monthly FROM retention
                 WHERE vm = $1",
                args![key],
            )?;
            if let Some(r) = row {
                return Ok(Some(Retention {
                    keep_last: r.opt_int(0)?,
                    keep_daily: r.opt_int(1)?,
                    keep_weekly: r.opt_int(2)?,
                    keep_monthly: r.opt_int(3)?,
                }));
            }
        }
        Ok(None)
    }
}
