//! The control calls between Cairn's services: one request and one answer type per call, and
//! a typed client per service behind a small trait.
//!
//! ```text
//!  cairn CLI ──► server ──► manager ──► host agent        (VM snapshots, state, usage)
//!                  │            └─────► storage agent     (datastores, for the VM map)
//!                  └──────────────────► storage agent ──► vault   (disk data, not here)
//! ```
//!
//! | module | the API of | used by |
//! |---|---|---|
//! | [`host`] | the host agent (`cairn-hypervisor`): VM attributes, VMs, VM snapshots, changes, state, usage, guest | the host agent (answers), the manager (relays), the server |
//! | [`storage`] | the storage agent (`cairn-storage`): datastores, unit snapshots, disk backups, restores, raw LUN mappings, file scans and reads | the storage agent (answers), the manager (datastores), the server |
//! | [`manager`] | the manager (`cairn-manager`): registrations, the VM map | the manager (answers), agents (heartbeats), the server |
//! | [`server`] | the backup server (`cairn-server`): request bodies and every answer — catalog records (backups, jobs, schedules, retention), job parameters and results, file listings | the server and the catalog (records), the CLI |
//! | [`vault`] | the vault service's control calls (`cairn-vault`): sessions, leases, counters, verify, prune, GC, forget | the vault service (answers), `cairn_vault::RemoteVault` (the storage agent, the server, the CLI) |
//! | [`client`] | [`HostAgentApi`], [`StorageAgentApi`], [`ManagerApi`], [`ServerApi`] and their HTTPS clients; [`AgentConnector`] | the manager, the server, the CLI |
//!
//! # Contracts
//!
//! - **One shape per concept.** A type here is what both ends of a hop use; a service crate
//!   re-exports it rather than defining its own. Shared vocabulary (`DiskFormat`, ids, extents)
//!   lives in `cairn-types`; the file model (`FileEntry`, partitions) in `cairn-fs`.
//! - **Unknown is an error.** Every struct refuses fields it does not know
//!   (`deny_unknown_fields`; the one exception, [`manager::AgentRecord`], says why) and every
//!   enum is tagged, so an unknown variant fails with serde's "unknown variant `x`, expected
//!   one of ..." and an unknown field with "unknown field `x`". The clients report either as
//!   [`cairn_http::ClientError::Decode`] with the URL; the services answer `400`.
//! - **No `serde_json::Value` between services.** Free-form JSON stays inside a service.
//! - This crate does no I/O but HTTP in the clients and starts no runtime: every call blocks.

pub mod client;
pub mod host;
pub mod manager;
pub mod server;
pub mod storage;
pub mod vault;

pub use client::{
    AgentConnector, CallResult, HostAgentApi, HostAgentClient, HttpConnector, ManagerApi,
    ManagerClient, ServerApi, ServerClient, StorageAgentApi, StorageAgentClient, spawn_heartbeat,
};

#[cfg(test)]
mod tests;
