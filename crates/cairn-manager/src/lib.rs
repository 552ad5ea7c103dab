//! `cairn manager`, the VM management server: it knows which host runs which VM and which
//! storage holds its disks, and relays the server's requests to the right host agent.
//!
//! ```text
//!  host agents ──heartbeat──►┐                ┌──► GET /v1/vms (inventory, map)
//!  storage agents ─heartbeat─►  manager ◄─────┤    POST /v1/vms/{vm}/snapshots (relay)
//!                            │  (registry)    └──► … server (control only)
//!                            └──► agents' own APIs, read on every request
//! ```
//!
//! | module | holds |
//! |---|---|
//! | [`inventory`] | registry, heartbeats, liveness, the VM → host → disks → datastore → unit map |
//! | [`service`] | the HTTPS API (`docs/MANAGER.md`) |
//!
//! Its API's types and its client ([`ManagerClient`], [`spawn_heartbeat`]) live in
//! `cairn-api`, so that callers do not link the manager.
//!
//! The manager never carries disk data: it relays control requests and their typed answers
//! only (and a saved execution state, which is VM memory, not disk data).

use std::path::PathBuf;

use cairn_http::{ApiError, ClientError, ErrorKind};

pub mod inventory;
pub mod service;

pub use cairn_api::{ManagerApi, ManagerClient, spawn_heartbeat};
pub use inventory::{
    AgentKind, AgentRecord, DiskLocation, Inventory, Registration, VmLocation, VmRunState,
};

/// Manager errors.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{kind} agent {name} stopped heartbeating {} s ago", silent_ms / 1000)]
    Stale {
        kind: &'static str,
        name: String,
        silent_ms: i64,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{kind} agent {name}")]
    Agent {
        kind: &'static str,
        name: String,
        #[source]
        source: Box<ClientError>,
    },
    #[error("manager state {}: {message}", path.display())]
    State { path: PathBuf, message: String },
}

pub type Result<T, E = ManagerError> = std::result::Result<T, E>;

impl ManagerError {
    /// The API error for this failure; an agent's own error keeps its kind.
    pub fn to_api(&self) -> ApiError {
        let kind = match self {
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Stale { .. } | Self::Conflict(_) => ErrorKind::Conflict,
            Self::Invalid(_) => ErrorKind::BadRequest,
            Self::Agent { source, .. } => match source.kind() {
                // The agent refusing our token is the manager's misconfiguration, not the
                // caller's: do not answer 401 to a caller whose token was fine.
                Some(ErrorKind::Unauthorized | ErrorKind::Forbidden) | None => ErrorKind::Internal,
                Some(k) => k,
            },
            Self::State { .. } => ErrorKind::Internal,
        };
        ApiError::new(kind, cairn_http::chain(self))
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        e.to_api()
    }
}

pub use cairn_types::now_ms;
