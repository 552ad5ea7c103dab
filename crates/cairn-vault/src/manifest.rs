//! Repository configuration and snapshot manifests (JSON objects in the store).
//!
//! A snapshot exists exactly when its manifest `snapshots/<id>.json` exists; the manifest is
//! written last, after every blob it reaches is durable.

use std::collections::BTreeMap;

use cairn_chunk::ChunkerParams;
use cairn_chunk::recipe::TreeRoot;
use cairn_types::SnapshotId;

/// Version of the repository layout.
pub const REPO_VERSION: u32 = 1;

/// The `config` object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepoConfig {
    pub version: u32,
    pub id: String,
    /// Default segmentation for new backups.
    pub chunker: ChunkerParams,
    /// zstd level for segments (0 = off).
    pub compression: i32,
    pub created: u64,
}

/// Counters of one backup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupStats {
    /// Bytes read from the source image.
    pub bytes_read: u64,
    /// Logical bytes of data segments the vault lacked.
    pub bytes_new: u64,
    /// Bytes the repository grew by (containers, index, manifest).
    pub bytes_stored: u64,
    /// Bytes of disk data handed to the vault, as encoded segments: what crosses the network
    /// to a vault service (the same figure for a local repository).
    pub bytes_sent: u64,
    pub segments: u64,
    pub segments_new: u64,
    pub zero_bytes: u64,
    pub duration_ms: u64,
}

/// A committed backup of one disk image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotManifest {
    pub id: SnapshotId,
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix milliseconds: orders snapshots made within one second.
    #[serde(default)]
    pub created_ms: u64,
    pub size: u64,
    pub root: TreeRoot,
    pub chunker: ChunkerParams,
    #[serde(default)]
    pub parent: Option<SnapshotId>,
    #[serde(default)]
    pub stats: BackupStats,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// [`cairn_types::now_ms`], unsigned as stored here.
pub(crate) fn now_ms() -> u64 {
    u64::try_from(cairn_types::now_ms()).unwrap_or(0)
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
