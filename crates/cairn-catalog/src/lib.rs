//! The backup catalog: what the backup server knows about VMs, backups, metadata snapshots,
//! jobs, schedules and retention.
//!
//! | piece | where |
//! |---|---|
//! | schema, forward-only migrations | `migrations/NNNN_*.sql`, applied by [`migrate`] |
//! | typed rows | [`model`] |
//! | queries | [`Catalog`] (this module) |
//!
//! Invariants:
//! - **A backup row is a restorable full.** [`Catalog::insert_backup`] writes a backup, its
//!   disks and nothing else in one transaction, and the server calls it only after every
//!   disk is committed in the vault. There is no "partial" backup state to filter out.
//! - **Migrations only move forward.** Each file runs once, in order, inside a transaction,
//!   and is recorded in `schema_migrations`; a database newer than this build is refused.
//! - **Portable SQL.** Every statement uses `$N` parameters (numbered in order of first use),
//!   standard types and no SQLite-only syntax, so a PostgreSQL backend can run the same text;
//!   `tests/postgres.rs` applies the migrations to a real PostgreSQL.
//! - One [`Catalog`] per database file per process; SQLite's WAL mode lets other processes
//!   read (the CLI's `--json` inspection) while the server writes.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

pub mod model;

pub use model::*;

/// Catalog errors.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database")]
    Db(#[from] rusqlite::Error),
    #[error("catalog schema version {found} is newer than this build ({known})")]
    TooNew { found: i64, known: i64 },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("catalog value {what}: {message}")]
    Decode { what: String, message: String },
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// The migrations, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "backup_volumes",
        include_str!("../migrations/0002_backup_volumes.sql"),
    ),
];

/// Applies the migrations `conn` lacks. Returns the versions applied.
pub fn migrate(conn: &mut Connection) -> Result<Vec<i64>> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_ms BIGINT NOT NULL)",
    )?;
    let current: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if current > known {
        return Err(CatalogError::TooNew {
            found: current,
            known,
        });
    }
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
            params![version, name, now_ms()],
        )?;
        tx.commit()?;
        applied.push(*version);
    }
    Ok(applied)
}

pub use cairn_types::now_ms;

/// A new random id: 16 lowercase hex digits.
pub fn new_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

/// One line for [`Catalog::add_events`]: the job it belongs to and when it was logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub job: String,
    pub at_ms: i64,
    pub level: String,
    pub message: String,
}

/// The catalog database.
pub struct Catalog {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").finish_non_exhaustive()
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| CatalogError::Decode {
        what: what.into(),
        message: e.to_string(),
    })
}

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

/// Column lists, kept next to the row readers that depend on their order.
const BACKUP_COLS: &str = "id, vm, job_id, kind, group_id, timestamp_id, created_ms, duration_ms, \
    host, checkpoint, snapshot_kind, quiesce, quiesce_window_ms, vm_snapshot_lifetime_ms, \
    bytes_read, bytes_sent, attributes";
const DISK_COLS: &str = "backup_id, disk, vault_snapshot, size, format, storage_agent, datastore, \
    datastore_disk, change_source, changed_bytes, bytes_read, bytes_sent, rdm";
const JOB_COLS: &str = "id, kind, state, params, vms, created_ms, started_ms, finished_ms, error, \
    result, holds, cancel_requested";

/// An enumeration stored by its wire name (`full`, `guest_freeze`, `qcow2`, ...); a name this
/// build does not know is an error naming it.
fn named<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| {
        CatalogError::Decode {
            what: what.into(),
            message: e.to_string(),
        }
    })
}

fn backup_row(r: &rusqlite::Row<'_>) -> Result<BackupRecord> {
    let text = |i: usize| r.get::<_, String>(i);
    Ok(BackupRecord {
        id: named("backup id", &text(0)?)?,
        vm: r.get(1)?,
        job_id: named("job id", &text(2)?)?,
        kind: named("backup kind", &text(3)?)?,
        group_id: r.get(4)?,
        timestamp_id: named("timestamp id", &text(5)?)?,
        created_ms: r.get(6)?,
        duration_ms: r.get(7)?,
        host: r.get(8)?,
        checkpoint: r
            .get::<_, Option<String>>(9)?
            .map(|c| named("checkpoint", &c))
            .transpose()?,
        snapshot_kind: named("snapshot kind", &text(10)?)?,
        quiesce: named("quiesce", &text(11)?)?,
        quiesce_window_ms: r.get(12)?,
        vm_snapshot_lifetime_ms: r.get(13)?,
        bytes_read: r.get(14)?,
        bytes_sent: r.get(15)?,
        attributes: from_json("attributes", &text(16)?)?,
        disks: Vec::new(),
        metadata: None,
        volumes: None,
    })
}

fn disk_row(r: &rusqlite::Row<'_>) -> Result<BackupDisk> {
    let text = |i: usize| r.get::<_, String>(i);
    Ok(BackupDisk {
        disk: r.get(1)?,
        vault_snapshot: r.get(2)?,
        size: r.get(3)?,
        format: named("disk format", &text(4)?)?,
        storage_agent: r.get(5)?,
        datastore: r.get(6)?,
        datastore_disk: r.get(7)?,
        change_source: named("change source", &text(8)?)?,
        changed_bytes: r.get(9)?,
        bytes_read: r.get(10)?,
        bytes_sent: r.get(11)?,
        rdm: r
            .get::<_, Option<String>>(12)?
            .map(|s| from_json("rdm", &s))
            .transpose()?,
    })
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<[Option<String>; 6]> {
    Ok([
        r.get(3)?,
        r.get(4)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        Some(r.get::<_, String>(2)?),
    ])
}

impl Catalog {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Self::init(conn, &mut Vec::new())
    }

    /// An in-memory catalog (tests).
    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?, &mut Vec::new())
    }

    fn init(mut conn: Connection, applied: &mut Vec<i64>) -> Result<Self> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        *applied = migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The schema version.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn().query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?)
    }

    // ---- VMs and metadata snapshots -------------------------------------------------------

    /// Records a VM name (idempotent).
    pub fn ensure_vm(&self, name: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO vms (name, created_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            params![name, now_ms()],
        )?;
        Ok(())
    }

    /// VMs with at least one record, with their backup counts and newest backup.
    pub fn vms(&self) -> Result<Vec<VmSummary>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT v.name, COUNT(b.id), MAX(b.created_ms) FROM vms v
             LEFT JOIN backups b ON b.vm = v.name GROUP BY v.name ORDER BY v.name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(VmSummary {
                name: r.get(0)?,
                backups: r.get(1)?,
                last_backup_ms: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn insert_metadata(&self, m: &MetadataSnapshot) -> Result<()> {
        self.conn().execute(
            "INSERT INTO metadata_snapshots (timestamp_id, vm, created_ms, config_digest,
                config_reused, state_file, state_bytes, usage)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            params![
                m.timestamp_id.as_str(),
                m.vm,
                m.created_ms,
                m.config_digest,
                m.config_reused,
                m.state_file,
                m.state_bytes,
                json(&m.usage)
            ],
        )?;
        Ok(())
    }

    pub fn metadata(&self, timestamp_id: &str) -> Result<MetadataSnapshot> {
        let c = self.conn();
        let row = c
            .query_row(
                "SELECT timestamp_id, vm, created_ms, config_digest, config_reused, state_file,
                    state_bytes, usage FROM metadata_snapshots WHERE timestamp_id = $1",
                params![timestamp_id],
                |r| {
                    Ok((
                        MetadataSnapshot {
                            timestamp_id: TimestampId::new(0, 0),
                            vm: r.get(1)?,
                            created_ms: r.get(2)?,
                            config_digest: r.get(3)?,
                            config_reused: r.get(4)?,
                            state_file: r.get(5)?,
                            state_bytes: r.get(6)?,
                            usage: Default::default(),
                        },
                        r.get::<_, String>(7)?,
                        r.get::<_, String>(0)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| CatalogError::NotFound(format!("metadata snapshot {timestamp_id}")))?;
        let (mut m, usage, ts) = row;
        m.usage = from_json("usage", &usage)?;
        m.timestamp_id = named("timestamp id", &ts)?;
        Ok(m)
    }

    /// The configuration digest of the VM's newest metadata snapshot.
    pub fn last_config_digest(&self, vm: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT config_digest FROM metadata_snapshots WHERE vm = $1
                 ORDER BY created_ms DESC LIMIT 1",
                params![vm],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Metadata snapshots no backup refers to (left by failed jobs or pruned backups).
    pub fn orphan_metadata(&self) -> Result<Vec<MetadataSnapshot>> {
        let ids: Vec<String> = {
            let c = self.conn();
            let mut st = c.prepare(
                "SELECT m.timestamp_id FROM metadata_snapshots m
                 WHERE NOT EXISTS (SELECT 1 FROM backups b WHERE b.timestamp_id = m.timestamp_id)",
            )?;
            st.query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        ids.iter().map(|i| self.metadata(i)).collect()
    }

    pub fn delete_metadata(&self, timestamp_id: &str) -> Result<()> {
        self.conn().execute(
            "DELETE FROM metadata_snapshots WHERE timestamp_id = $1",
            params![timestamp_id],
        )?;
        Ok(())
    }

    /// Whether any metadata snapshot still uses configuration `digest`.
    pub fn config_in_use(&self, digest: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM metadata_snapshots WHERE config_digest = $1 LIMIT 1",
                params![digest],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    // ---- backups ---------------------------------------------------------------------------

    /// Records a committed backup and its disks, atomically.
    pub fn insert_backup(&self, b: &BackupRecord) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            &format!(
                "INSERT INTO backups ({BACKUP_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                 $10, $11, $12, $13, $14, $15, $16, $17)"
            ),
            params![
                b.id.as_str(),
                b.vm,
                b.job_id.as_str(),
                b.kind.as_str(),
                b.group_id,
                b.timestamp_id.as_str(),
                b.created_ms,
                b.duration_ms,
                b.host,
                b.checkpoint.map(|c| c.to_string()),
                b.snapshot_kind.as_str(),
                b.quiesce.as_str(),
                b.quiesce_window_ms,
                b.vm_snapshot_lifetime_ms,
                b.bytes_read,
                b.bytes_sent,
                json(&b.attributes)
            ],
        )?;
        for d in &b.disks {
            tx.execute(
                &format!(
                    "INSERT INTO backup_disks ({DISK_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7,
                     $8, $9, $10, $11, $12, $13)"
                ),
                params![
                    b.id.as_str(),
                    d.disk,
                    d.vault_snapshot,
                    d.size,
                    d.format.as_str(),
                    d.storage_agent,
                    d.datastore,
                    d.datastore_disk,
                    d.change_source.as_str(),
                    d.changed_bytes,
                    d.bytes_read,
                    d.bytes_sent,
                    d.rdm.as_ref().map(json)
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn load_disks(&self, b: &mut BackupRecord) -> Result<()> {
        let c = self.conn();
        let mut st = c.prepare(&format!(
            "SELECT {DISK_COLS} FROM backup_disks WHERE backup_id = $1 ORDER BY disk"
        ))?;
        b.disks = st
            .query_map(params![b.id.as_str()], |r| Ok(disk_row(r)))?
            .map(|d| -> Result<BackupDisk> { d? })
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn backups_where(
        &self,
        cond: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<BackupRecord>> {
        let rows: Vec<BackupRecord> = {
            let c = self.conn();
            let mut st = c.prepare(&format!(
                "SELECT {BACKUP_COLS} FROM backups {cond} ORDER BY created_ms, id"
            ))?;
            st.query_map(args, |r| Ok(backup_row(r)))?
                .map(|b| -> Result<BackupRecord> { b? })
                .collect::<Result<_>>()?
        };
        rows.into_iter()
            .map(|mut b| {
                self.load_disks(&mut b)?;
                Ok(b)
            })
            .collect()
    }

    /// Backups, oldest first; of one VM when `vm` is given.
    pub fn backups(&self, vm: Option<&str>) -> Result<Vec<BackupRecord>> {
        match vm {
            Some(vm) => self.backups_where("WHERE vm = $1", &[&vm]),
            None => self.backups_where("", &[]),
        }
    }

    /// A backup by id or unique id prefix (at least 4 digits).
    pub fn backup(&self, spec: &str) -> Result<BackupRecord> {
        if spec.len() < 4 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CatalogError::NotFound(format!("backup {spec:?}")));
        }
        let pattern = format!("{}%", spec.to_ascii_lowercase());
        let mut found = self.backups_where("WHERE id LIKE $1", &[&pattern])?;
        match found.len() {
            0 => Err(CatalogError::NotFound(format!("backup {spec}"))),
            1 => Ok(found.remove(0)),
            n => Err(CatalogError::Conflict(format!(
                "backup prefix {spec} matches {n} backups"
            ))),
        }
    }

    /// The newest backup of `vm`.
    pub fn latest_backup(&self, vm: &str) -> Result<Option<BackupRecord>> {
        Ok(self.backups(Some(vm))?.pop())
    }

    /// Removes a backup record (its vault snapshots are the caller's to prune).
    pub fn delete_backup(&self, id: &str) -> Result<()> {
        let c = self.conn();
        let n = c.execute("DELETE FROM backups WHERE id = $1", params![id])?;
        if n == 0 {
            return Err(CatalogError::NotFound(format!("backup {id}")));
        }
        c.execute(
            "DELETE FROM backup_volumes WHERE backup_id = $1",
            params![id],
        )?;
        Ok(())
    }

    /// Records what indexing found on the disks of backup `id` (replaces an earlier record).
    pub fn set_backup_volumes(&self, id: &str, volumes: &[IndexedVolume]) -> Result<()> {
        self.conn().execute(
            "INSERT INTO backup_volumes (backup_id, indexed_ms, volumes) VALUES ($1, $2, $3)
             ON CONFLICT (backup_id) DO UPDATE SET indexed_ms = excluded.indexed_ms,
                volumes = excluded.volumes",
            params![id, now_ms(), json(&volumes)],
        )?;
        Ok(())
    }

    /// What indexing found on the disks of backup `id`; `None` before it was indexed.
    pub fn backup_volumes(&self, id: &str) -> Result<Option<Vec<IndexedVolume>>> {
        let s: Option<String> = self
            .conn()
            .query_row(
                "SELECT volumes FROM backup_volumes WHERE backup_id = $1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        s.map(|s| from_json("backup volumes", &s)).transpose()
    }

    // ---- jobs ------------------------------------------------------------------------------

    pub fn insert_job(&self, j: &JobRecord) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO jobs ({JOB_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                 $11, $12)"
            ),
            params![
                j.id.as_str(),
                j.kind,
                j.state.as_str(),
                json(&j.params),
                json(&j.vms),
                j.created_ms,
                j.started_ms,
                j.finished_ms,
                j.error,
                j.result.as_ref().map(json),
                json(&j.holds),
                j.cancel_requested
            ],
        )?;
        Ok(())
    }

    fn jobs_where(&self, cond: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<JobRecord>> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {JOB_COLS} FROM jobs {cond}"))?;
        let rows = st.query_map(args, |r| {
            let id: String = r.get(0)?;
            let j = JobRecord {
                id: id.parse().map_err(|e: String| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })?,
                kind: r.get(1)?,
                state: JobState::Queued,
                params: JobKind::Prune {
                    vms: Vec::new(),
                    dry_run: true,
                },
                vms: Vec::new(),
                created_ms: r.get(5)?,
                started_ms: r.get(6)?,
                finished_ms: r.get(7)?,
                error: None,
                result: None,
                holds: Vec::new(),
                cancel_requested: r.get(11)?,
                events: None,
            };
            Ok((j, job_row(r)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut j, [params, vms, error, result, holds, state]) = row?;
            j.params = from_json("params", params.as_deref().unwrap_or("null"))?;
            j.vms = from_json("vms", vms.as_deref().unwrap_or("[]"))?;
            j.error = error;
            j.result = result.map(|r| job_result(&j.kind, &r)).transpose()?;
            j.holds = from_json("holds", holds.as_deref().unwrap_or("[]"))?;
            let state = state.unwrap_or_default();
            j.state = JobState::parse(&state).ok_or_else(|| CatalogError::Decode {
                what: "job state".into(),
                message: format!("unknown job state {state:?}"),
            })?;
            out.push(j);
        }
        Ok(out)
    }

    /// Jobs, newest first, at most `limit`.
    pub fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>> {
        self.jobs_where(
            "ORDER BY created_ms DESC, id LIMIT $1",
            &[&(limit.min(100_000) as i64)],
        )
    }

    /// Jobs in a state.
    pub fn jobs_in(&self, state: JobState) -> Result<Vec<JobRecord>> {
        self.jobs_where(
            "WHERE state = $1 ORDER BY created_ms, id",
            &[&state.as_str()],
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
        let mut found = self.jobs_where("WHERE id LIKE $1", &[&pattern])?;
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
        let c = self.conn();
        match state {
            JobState::Running => c.execute(
                "UPDATE jobs SET state = $1, started_ms = $2 WHERE id = $3",
                params![state.as_str(), now, id],
            )?,
            _ if state.is_final() => c.execute(
                "UPDATE jobs SET state = $1, finished_ms = $2, error = $3, result = $4
                 WHERE id = $5",
                params![state.as_str(), now, error, result.map(json), id],
            )?,
            _ => c.execute(
                "UPDATE jobs SET state = $1 WHERE id = $2",
                params![state.as_str(), id],
            )?,
        };
        Ok(())
    }

    /// Replaces the list of resources a job holds (written before each is acquired).
    pub fn set_job_holds(&self, id: &str, holds: &[Hold]) -> Result<()> {
        self.conn().execute(
            "UPDATE jobs SET holds = $1 WHERE id = $2",
            params![json(&holds), id],
        )?;
        Ok(())
    }

    /// Asks a queued or running job to stop. Returns false when it already finished.
    pub fn request_cancel(&self, id: &str) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE jobs SET cancel_requested = 1 WHERE id = $1
             AND state IN ('queued', 'running')",
            params![id],
        )?;
        Ok(n > 0)
    }

    pub fn cancel_requested(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT cancel_requested FROM jobs WHERE id = $1",
                params![id],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// Appends an event to a job's log.
    pub fn add_event(&self, job: &str, level: &str, message: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO job_events (job_id, seq, at_ms, level, message)
             VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = $1),
                     $2, $3, $4)",
            params![job, now_ms(), level, message],
        )?;
        Ok(())
    }

    /// Appends many events, of one job or several, in one transaction and in the order
    /// given: each job's lines get consecutive `seq` numbers after those it has. All or
    /// nothing: on an error no line of the batch is written.
    pub fn add_events(&self, events: &[NewEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare(
                "INSERT INTO job_events (job_id, seq, at_ms, level, message)
                 VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = $1),
                         $2, $3, $4)",
            )?;
            for e in events {
                st.execute(params![e.job, e.at_ms, e.level, e.message])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn events(&self, job: &str) -> Result<Vec<JobEvent>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT seq, at_ms, level, message FROM job_events WHERE job_id = $1 ORDER BY seq",
        )?;
        let rows = st.query_map(params![job], |r| {
            Ok(JobEvent {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                level: r.get(2)?,
                message: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- schedules and retention ----------------------------------------------------------

    pub fn upsert_schedule(&self, s: &Schedule) -> Result<()> {
        self.conn().execute(
            "INSERT INTO schedules (name, vms, group_backup, every_s, next_ms, enabled)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET vms = excluded.vms,
                group_backup = excluded.group_backup, every_s = excluded.every_s,
                next_ms = excluded.next_ms, enabled = excluded.enabled",
            params![
                s.name,
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
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT name, vms, group_backup, every_s, next_ms, enabled FROM schedules
             ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                Schedule {
                    name: r.get(0)?,
                    vms: Vec::new(),
                    group: r.get(2)?,
                    every_s: r.get(3)?,
                    next_ms: r.get(4)?,
                    enabled: r.get(5)?,
                },
                r.get::<_, String>(1)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut s, vms) = row?;
            s.vms = from_json("schedule vms", &vms)?;
            out.push(s);
        }
        Ok(out)
    }

    pub fn delete_schedule(&self, name: &str) -> Result<()> {
        let n = self
            .conn()
            .execute("DELETE FROM schedules WHERE name = $1", params![name])?;
        if n == 0 {
            return Err(CatalogError::NotFound(format!("schedule {name}")));
        }
        Ok(())
    }

    pub fn set_retention(&self, vm: &str, r: &Retention) -> Result<()> {
        self.conn().execute(
            "INSERT INTO retention (vm, keep_last, keep_daily, keep_weekly, keep_monthly)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (vm) DO UPDATE SET keep_last = excluded.keep_last,
                keep_daily = excluded.keep_daily, keep_weekly = excluded.keep_weekly,
                keep_monthly = excluded.keep_monthly",
            params![vm, r.keep_last, r.keep_daily, r.keep_weekly, r.keep_monthly],
        )?;
        Ok(())
    }

    /// The retention of `vm`, else the default (`*`), else `None` (keep everything).
    pub fn retention(&self, vm: &str) -> Result<Option<Retention>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT keep_last, keep_daily, keep_weekly, keep_monthly FROM retention
             WHERE vm = $1",
        )?;
        for key in [vm, "*"] {
            let r = st
                .query_row(params![key], |r| {
                    Ok(Retention {
                        keep_last: r.get(0)?,
                        keep_daily: r.get(1)?,
                        keep_weekly: r.get(2)?,
                        keep_monthly: r.get(3)?,
                    })
                })
                .optional()?;
            if r.is_some() {
                return Ok(r);
            }
        }
        Ok(None)
    }
}
