//! `cairn server`, the backup application server: it plans backups and restores, records
//! them in the catalog, and **never touches disk data**. It talks to the manager and the
//! storage agents only through `cairn-api`'s clients ([`ManagerApi`], [`StorageAgentApi`]).
//!
//! ```text
//!   REST API ─► jobs ─────► engine ─────────────► flows: backup, group, restore, index, prune
//!              (JobKind)    queue, workers,         │ steps ─┬─► manager ─► host agents (snapshots)
//!                           holds, log, cancel      │        ├─► storage agents ─► vault (disk data)
//!                             │                     │        └─► metadata store (config, state, usage)
//!                             └─► catalog ◄─────────┘   (SQLite or PostgreSQL)
//! ```
//!
//! | module | holds |
//! |---|---|
//! | [`engine`] | the job engine, knowing no flow: persisted jobs, queue, workers, per-VM exclusion, holds, cancel, batched job logs, restart recovery; flows plug in through [`engine::Flow`] |
//! | [`jobs`] | the server's jobs: [`JobKind`] (typed parameters), the flows registered by kind, how a hold is released |
//! | [`steps`] | the backup steps every backup flow shares: locate, metadata snapshot, VM snapshot, send disks, release, record |
//! | [`backup`] | full and incremental backup of one VM (fleecing) |
//! | [`group`] | the targeted group snapshot of a VM group |
//! | [`restore`] | full VM restore as a new VM |
//! | [`files`] | the file catalog: the `index` flow, browsing, single-file restore |
//! | [`meta`] | the metadata store (paired metadata snapshots) |
//! | [`schedule`] | schedules and retention |
//! | [`leader`] | which server is active when several share a PostgreSQL catalog: the lease, takeover, standby |
//! | [`service`] | the REST API (`docs/openapi.yaml`) |
//!
//! Invariants:
//! - **No disk data here.** The server sends control requests to the manager and the
//!   storage agents and reads their typed answers; disk bytes go storage agent ↔ vault. The
//!   server's own counter of disk-data bytes ([`Server::disk_bytes`]) stays 0 and is reported
//!   next to the agents' counters.
//! - **A job that fails releases what it holds.** Every VM snapshot, storage snapshot and
//!   saved state is recorded in the job's `holds` (durably, in the catalog) *before* it is
//!   acquired and removed once released; failure, cancel, and a server restart release what
//!   is left.
//! - **A backup is recorded only once every disk is committed** in the vault, in one
//!   catalog transaction.
//! - **One active server per catalog.** The catalog is `STATE/catalog.db` (SQLite, one
//!   server) or, with [`ServerConfig::catalog`] (`cairn server --catalog postgresql://...`),
//!   a PostgreSQL database that several servers share: only the holder of the catalog's
//!   lease runs jobs and schedules and accepts changes; the others are standbys that answer
//!   reads, refuse changes with `503`, and take over when the lease lapses ([`leader`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use cairn_api::manager::AgentKind;
use cairn_api::server::{DataPath, StorageAgentStats};
use cairn_api::storage::VaultTarget;
use cairn_api::{AgentConnector, HttpConnector, ManagerApi, StorageAgentApi};
use cairn_catalog::{Catalog, CatalogError};
use cairn_http::{ApiError, ClientError, ErrorKind};

pub mod backup;
pub mod engine;
pub mod files;
pub mod group;
mod guest_restore;
pub mod jobs;
pub mod leader;
pub mod meta;
pub mod restore;
pub mod schedule;
pub mod scope;
pub mod service;
pub mod steps;
mod vault;

pub use jobs::JobKind;

/// The context of one of this server's jobs.
pub type JobCtx<'a> = engine::JobCtx<'a, Server>;

/// Server errors.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The caller's token has no scope on the VM (see [`scope`]).
    #[error("{0}")]
    Forbidden(String),
    /// The certificate authority could not be opened or created.
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("catalog")]
    Catalog(#[from] CatalogError),
    /// A call to another service failed.
    #[error("{what}")]
    Call {
        what: String,
        #[source]
        source: Box<ClientError>,
    },
    /// A storage agent reported a failed disk.
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;

impl ServerError {
    /// Wraps a client error with what was being done.
    pub fn call(what: impl Into<String>) -> impl FnOnce(ClientError) -> ServerError {
        let what = what.into();
        move |e| ServerError::Call {
            what,
            source: Box::new(e),
        }
    }

    /// The whole error chain on one line.
    pub fn chain(&self) -> String {
        cairn_http::chain(self)
    }

    pub fn to_api(&self) -> ApiError {
        let kind = match self {
            Self::NotFound(_) | Self::Catalog(CatalogError::NotFound(_)) => ErrorKind::NotFound,
            Self::Conflict(_) | Self::Catalog(CatalogError::Conflict(_)) => ErrorKind::Conflict,
            Self::Invalid(_) => ErrorKind::BadRequest,
            Self::Forbidden(_) => ErrorKind::Forbidden,
            Self::Call { source, .. } => match source.kind() {
                Some(k @ (ErrorKind::NotFound | ErrorKind::Conflict | ErrorKind::BadRequest)) => k,
                Some(ErrorKind::InsufficientStorage) => ErrorKind::InsufficientStorage,
                _ => ErrorKind::Internal,
            },
            _ => ErrorKind::Internal,
        };
        ApiError::new(kind, self.chain())
    }
}

/// How the server is set up.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `catalog.db` (unless `catalog` is set), `metadata/` (the metadata store unless
    /// `metadata_dir` is set), the certificate authority, the file index.
    pub state_dir: PathBuf,
    /// The catalog: `None` is the SQLite file `STATE/catalog.db`; a `postgresql://` URL is a
    /// PostgreSQL database, which several servers may share (one is active: [`leader`]).
    pub catalog: Option<String>,
    /// The metadata store (paired metadata snapshots), apart from the vault.
    pub metadata_dir: Option<PathBuf>,
    /// The vault every backup goes to, as handed to storage agents.
    pub vault: VaultTarget,
    /// Jobs run at once (default 2).
    pub max_jobs: usize,
    /// Save the VM's execution state into each metadata snapshot.
    pub save_state: bool,
}

/// The backup server.
pub struct Server {
    pub config: ServerConfig,
    pub catalog: Arc<Catalog>,
    pub manager: Arc<dyn ManagerApi>,
    /// Makes clients of the storage agents the manager names.
    pub agents: Arc<dyn AgentConnector>,
    pub meta: meta::MetadataStore,
    /// Runs the jobs; knows the flows only by kind.
    pub engine: engine::Engine<Server>,
    /// Disk-data bytes this process sent or received: by design always 0.
    pub disk_bytes: AtomicU64,
    /// Bytes of single files restored through this server (file contents, not disk data).
    pub file_bytes: AtomicU64,
    /// The file catalog's index (`STATE/files`); an error when it could not be opened.
    pub files: std::result::Result<cairn_fileindex::FileIndex, String>,
    /// The certificate authority of the deployment (`STATE/ca`): issues each agent its
    /// certificate for a join token ([`cairn_http::ca`]).
    pub ca: Arc<cairn_http::ca::Ca>,
    /// Whether this server is the active one ([`leader`]).
    pub leader: leader::Leadership,
    /// The workers and the scheduler start once, when the server first becomes active.
    workers_started: std::sync::Once,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("state_dir", &self.config.state_dir)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the catalog and the metadata store; once active ([`leader`]: at once on SQLite),
    /// recovers jobs a previous process left and starts the workers and the scheduler.
    pub fn start(config: ServerConfig, manager: impl ManagerApi + 'static) -> Result<Arc<Self>> {
        Self::start_with(config, Arc::new(manager), Arc::new(HttpConnector))
    }

    /// [`Server::start`] with the manager and the storage agents reached through the given
    /// clients (tests pass fakes).
    pub fn start_with(
        config: ServerConfig,
        manager: Arc<dyn ManagerApi>,
        agents: Arc<dyn AgentConnector>,
    ) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| ServerError::Io {
            what: "create",
            path: config.state_dir.clone(),
            source,
        })?;
        let open = || match &config.catalog {
            Some(url) => Catalog::open_url(url),
            None => Catalog::open(&config.state_dir.join("catalog.db")),
        };
        let catalog = Arc::new(open()?);
        // Lease renewals on a connection of their own: never queued behind a job's statements.
        let lease_catalog = catalog.shared().then(open).transpose()?;
        let meta_dir = config
            .metadata_dir
            .clone()
            .unwrap_or_else(|| config.state_dir.join("metadata"));
        let files = cairn_fileindex::FileIndex::open(&config.state_dir.join("files"))
            .map_err(|e| e.to_string());
        if let Err(e) = &files {
            tracing::error!("file index: {e}; file catalog disabled");
        }
        let ca = cairn_http::ca::Ca::open_or_create(&config.state_dir.join("ca"))
            .map_err(|e| ServerError::Ca(e.to_string()))?;
        let leader = leader::Leadership::new(&catalog);
        let server = Arc::new(Self {
            ca: Arc::new(ca),
            files,
            file_bytes: AtomicU64::new(0),
            meta: meta::MetadataStore::open(&meta_dir)?,
            engine: jobs::engine(catalog.clone(), config.max_jobs.max(1)),
            config,
            catalog,
            manager,
            agents,
            disk_bytes: AtomicU64::new(0),
            leader,
            workers_started: std::sync::Once::new(),
        });
        match lease_catalog {
            Some(c) => leader::start(&server, c)?,
            None => leader::activate(&server)?,
        }
        Ok(server)
    }

    /// A client of a live storage agent, through the manager's registry.
    pub fn storage_agent(&self, name: &str) -> Result<Arc<dyn StorageAgentApi>> {
        let a = self
            .manager
            .agent(AgentKind::Storage, name)
            .map_err(ServerError::call(format!("storage agent {name}")))?;
        self.agents
            .storage_agent(&a.registration)
            .map_err(ServerError::call(format!("storage agent {name}")))
    }

    /// Disk-data counters of every service, for the data-path proof.
    pub fn data_path(&self) -> DataPath {
        let mut storage_agents = Vec::new();
        if let Ok(list) = self.manager.agents() {
            for a in list
                .iter()
                .filter(|a| a.registration.kind == AgentKind::Storage)
            {
                let stats = self
                    .storage_agent(&a.registration.name)
                    .ok()
                    .and_then(|c| c.stats().ok());
                storage_agents.push(StorageAgentStats {
                    name: a.registration.name.clone(),
                    stats,
                });
            }
        }
        DataPath {
            server_disk_bytes: self.disk_bytes.load(std::sync::atomic::Ordering::Relaxed),
            server_file_restore_bytes: self.file_bytes.load(std::sync::atomic::Ordering::Relaxed),
            storage_agents,
        }
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        e.to_api()
    }
}
