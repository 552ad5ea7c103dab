//! The backup catalog: what the backup server knows about VMs, backups, metadata snapshots,
//! jobs, schedules, retention and which server is active.
//!
//! | piece | where |
//! |---|---|
//! | schema, forward-only migrations | `migrations/NNNN_*.sql`, applied when a [`Catalog`] opens |
//! | typed rows | [`model`] |
//! | queries | [`Catalog`]: VMs, metadata and backups (`backups.rs`), jobs, schedules and retention (`jobs.rs`), leader leases ([`lease`]) |
//! | databases | SQLite (a file, the default) or PostgreSQL (a `postgresql://` URL), behind one small backend interface (`backend.rs`, `pg.rs`) |
//!
//! Invariants:
//! - **A backup row is a restorable full.** [`Catalog::insert_backup`] writes a backup, its
//!   disks and nothing else in one transaction, and the server calls it only after every
//!   disk is committed in the vault. There is no "partial" backup state to filter out.
//! - **Migrations only move forward.** Each file runs once, in order, inside a transaction,
//!   and is recorded in `schema_migrations`; a database newer than this build is refused.
//!   Processes opening one database at once are serialized (SQLite: the write lock taken at
//!   `BEGIN IMMEDIATE`; PostgreSQL: an advisory lock), so each migration is applied once.
//! - **One SQL text for both databases.** Every statement uses `$N` parameters (numbered in
//!   order of first use), standard types and no dialect-only syntax; the test suite runs
//!   every query on SQLite and on a real PostgreSQL.
//! - **SQLite: one [`Catalog`] per database file per process**; WAL mode lets other
//!   processes read (the CLI's `--json` inspection) while the server writes.
//! - **PostgreSQL: one connection per [`Catalog`]**, checked after [`POSTGRES_IDLE_CHECK`]
//!   idle and replaced when the server closed it; a connection lost during a statement is
//!   [`CatalogError::ConnectionLost`], never a silent retry (the statement may have been
//!   applied), and the next call reconnects. Several servers may share the database; a
//!   [`lease`] decides which one is active.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

mod backend;
mod backups;
mod jobs;
pub mod lease;
pub mod model;
mod pg;

use backend::{Backend, Exec, Sqlite, args};
pub use lease::Lease;
pub use model::*;
pub use pg::IDLE_CHECK as POSTGRES_IDLE_CHECK;

/// Catalog errors.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database")]
    Db(#[from] rusqlite::Error),
    /// PostgreSQL refused a statement or a connection. `code` is the SQLSTATE (`23505`, ...),
    /// empty when the client failed before the server answered.
    #[error("PostgreSQL: {message}")]
    Postgres { code: String, message: String },
    /// The connection to PostgreSQL broke during a statement (a server restart, a network
    /// failure): the statement may or may not have been applied. The next call reconnects.
    #[error(
        "lost the connection to PostgreSQL ({message}); the statement may or may not have \
         been applied"
    )]
    ConnectionLost { message: String },
    #[error("catalog location {0}")]
    BadUrl(String),
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
    (3, "leader", include_str!("../migrations/0003_leader.sql")),
];

/// Whether `location` names a PostgreSQL database (`postgresql://` or `postgres://`).
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgresql://") || location.starts_with("postgres://")
}

/// Applies the migrations the database lacks, each in its own transaction under the
/// backend's schema lock. Returns the versions applied.
fn migrate(db: &mut dyn Backend) -> Result<Vec<i64>> {
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    let lock = db.schema_lock();
    let mut applied = Vec::new();
    loop {
        let mut step = None;
        db.transaction(&mut |tx| {
            step = None;
            if let Some(lock) = lock {
                tx.execute(lock, &[])?;
            }
            tx.batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_ms BIGINT NOT NULL)",
            )?;
            let current = schema_version(tx)?;
            if current > known {
                return Err(CatalogError::TooNew {
                    found: current,
                    known,
                });
            }
            if let Some((version, name, sql)) = MIGRATIONS.iter().find(|m| m.0 > current) {
                tx.batch(sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
                    args![*version, *name, now_ms()],
                )?;
                step = Some(*version);
            }
            Ok(())
        })?;
        match step {
            Some(v) => applied.push(v),
            None => return Ok(applied),
        }
    }
}

fn schema_version(db: &mut dyn Exec) -> Result<i64> {
    match db.query_opt(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        &[],
    )? {
        Some(r) => r.int(0),
        None => Ok(0),
    }
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
    db: Mutex<Box<dyn Backend>>,
    /// Which database, for messages.
    describe: String,
    shared: bool,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("db", &self.describe)
            .finish_non_exhaustive()
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

impl Catalog {
    /// Opens (creating and migrating) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Self::sqlite(conn)
    }

    /// An in-memory SQLite catalog (tests).
    pub fn open_in_memory() -> Result<Self> {
        Self::sqlite(Connection::open_in_memory()?)
    }

    /// Opens (migrating) the PostgreSQL database at `url`:
    /// `postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?PARAM=VALUE&...]` (libpq's URL
    /// syntax; `host=/run/postgresql` for a Unix socket). The database must exist; the
    /// tables are created in it. No TLS: use it on loopback or a trusted network.
    pub fn open_url(url: &str) -> Result<Self> {
        if !is_postgres_url(url) {
            return Err(CatalogError::BadUrl(format!(
                "{url:?}: a postgresql:// URL, or a file path given as one"
            )));
        }
        Self::init(Box::new(pg::Postgres::connect(url)?))
    }

    fn sqlite(conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Self::init(Box::new(Sqlite(conn)))
    }

    fn init(mut db: Box<dyn Backend>) -> Result<Self> {
        migrate(db.as_mut())?;
        Ok(Self {
            describe: db.describe(),
            shared: db.shared(),
            db: Mutex::new(db),
        })
    }

    fn db(&self) -> MutexGuard<'_, Box<dyn Backend>> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether other processes may work on this catalog at the same time (PostgreSQL): they
    /// then take turns being active through a [`lease`]. An SQLite file has one server.
    pub fn shared(&self) -> bool {
        self.shared
    }

    /// Which database this is (`SQLite PATH`, `PostgreSQL HOST:PORT/DB`), for messages.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The schema version.
    pub fn schema_version(&self) -> Result<i64> {
        schema_version(self.db().as_mut())
    }
}
