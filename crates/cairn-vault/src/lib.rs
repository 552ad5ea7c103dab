pub mod api;
pub mod error;
pub mod imager;
pub mod index;
pub mod lock;
pub mod maint;
pub mod manifest;
pub mod repo;
pub mod session;
pub mod store;

pub use api::{LocalVault, Upload, Vault, VaultSession};
pub use error::{Result, VaultError};
pub use manifest::{BackupStats, RepoConfig, SnapshotManifest};
pub use repo::{InitOptions, Repository};
pub use session::{BackupSession, CommitRequest};
