//! The vault: Cairn's deduplicating backup store, and the service in front of it.
//!
//! A disk image is cut into segments (`cairn-chunk`); each segment is stored once, by its
//! BLAKE3 fingerprint, compressed into containers; a snapshot is a recipe tree naming the
//! segments in order, and a manifest naming the tree's root. Clients send fingerprints first
//! and only the segments the vault lacks.
//!
//! ```text
//!  Vault / VaultSession (api) ◄── imager (backup, restore), reader (random reads)
//!        │ LocalVault                 │ RemoteVault (remote) ──HTTPS──► service
//!        ▼                            ▼                                   │
//!  Repository (repo): config · containers/ · snapshots/ · locks/ ◄────────┘
//!        │ on an ObjectStore (store: local directory, …; one conformance suite)
//!        └─ index/: the fingerprint index, a local cache rebuilt from the containers
//! ```
//!
//! | module | holds |
//! |---|---|
//! | [`api`] | [`Vault`] and [`VaultSession`]: the one client view of a local repository and a vault service |
//! | [`imager`] | full and incremental backup of an image, and restore, against any [`Vault`] |
//! | [`reader`] | random reads of a snapshot ([`cairn_types::ReadAt`]), fetching only the segments a read covers |
//! | [`session`] | the vault side of a backup: lacking, upload, commit |
//! | [`repo`], [`manifest`], [`lock`] | the repository layout, its config and snapshot manifests, its locks |
//! | [`retention`] | retention locks: snapshots no credential can forget before their time |
//! | [`keys`] | an encrypted repository's wrapped keys, key files, unlocking |
//! | [`index`] | the fingerprint index: digest → container, offset, lengths, codec |
//! | [`store`] | object stores and their contract |
//! | [`maint`] | verify, prune, GC: planned first, printable, `dry_run` |
//! | [`service`], [`remote`], [`wire`] | the vault service, its client, its binary frames (`docs/PROTOCOL.md`) |
//!
//! # Invariants
//!
//! - **A snapshot exists exactly when its manifest exists**, and the manifest is written
//!   last: after every container it reaches is durable and the tree below its root is
//!   checked complete. A session killed before its commit leaves no snapshot; its durable
//!   containers stay, so a retry finds their segments present and does not send them again.
//! - **The index is a cache**: deleting it loses nothing; the next open rebuilds it from the
//!   containers' trailers.
//! - **Retention locks** hold for every caller: a locked snapshot cannot be forgotten, a
//!   lock can only be extended ([`retention`]).
//! - **Locks**: backup sessions share, GC, prune and index rebuilds exclude everything else
//!   (`locks/` objects, so they work on any store).
//! - **The service trusts no upload**: it decodes and re-hashes every blob before storing it.
//!   Formats and magic numbers live in `cairn-chunk`.
//! - On-disk format: `docs/FORMAT.md`; protocol: `docs/PROTOCOL.md`.

#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod api;
pub mod error;
pub mod imager;
pub mod index;
pub mod keys;
pub mod location;
pub mod lock;
pub mod maint;
pub mod manifest;
pub mod reader;
pub mod remote;
pub mod repo;
pub mod retention;
pub mod service;
pub mod session;
pub mod store;
pub mod wire;

pub use api::{Fetched, LocalVault, Upload, Vault, VaultSession};
pub use error::{Result, VaultError};
pub use keys::Credential;
pub use manifest::{BackupStats, RepoConfig, SnapshotManifest};
pub use repo::{FirstKey, InitOptions, RebuildReport, Repository};
pub use session::{BackupSession, CommitRequest};
