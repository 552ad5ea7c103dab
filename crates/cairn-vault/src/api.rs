//! The client-side view of a vault, the same for a local repository and a vault service.
//!
//! Backup and restore pipelines ([`crate::imager`]) talk only to [`Vault`] and
//! [`VaultSession`], so the storage agent can send to a remote vault with the code the CLI
//! uses on a local directory.

use std::sync::Arc;

use cairn_chunk::format::BlobKind;
use cairn_chunk::{EncodedSegment, Entry};
use cairn_types::{Digest, SnapshotId};

use crate::error::Result;
use crate::maint::{GcOptions, GcPlan, PruneOptions, PrunePlan, VerifyReport};
use crate::manifest::{RepoConfig, SnapshotManifest};
use crate::repo::Repository;
use crate::retention::{LockAnswer, RetentionPolicy, SnapshotLock};
use crate::session::{BackupSession, CommitRequest};

/// One frame to upload: one segment or several consecutive ones, encoded together.
#[derive(Clone, Debug)]
pub struct Upload {
    pub kind: BlobKind,
    /// Fingerprint and plaintext length of each segment, in the order of the plaintext.
    pub members: Vec<(Digest, u32)>,
    pub seg: EncodedSegment,
}

impl Upload {
    /// A frame of one segment.
    pub fn single(digest: Digest, kind: BlobKind, raw_len: u32, seg: EncodedSegment) -> Self {
        Self {
            kind,
            members: vec![(digest, raw_len)],
            seg,
        }
    }
}

/// What [`Vault::fetch_near`] returns: the required plaintexts in order, and the optional
/// ones found with their index into the optional list.
pub type Fetched = (Vec<Vec<u8>>, Vec<(usize, Vec<u8>)>);

/// Reads kept in flight against a vault behind a network: enough to hide a request's
/// latency and a slow server's per-stream rate (an S3 server on loopback read ~60 MiB/s per
/// stream and ~240 MiB/s with four, `examples/s3_read.rs`).
pub const REMOTE_READ_PARALLELISM: usize = 6;

/// An open backup on a vault.
pub trait VaultSession: Send + Sync {
    /// For each digest, true when the vault lacks it.
    fn lacking(&self, digests: &[Digest]) -> Result<Vec<bool>>;
    /// Stores blobs the vault lacks (ones it has are ignored).
    fn upload(&self, blobs: Vec<Upload>) -> Result<()>;
    /// Publishes the snapshot.
    fn commit(self: Box<Self>, req: CommitRequest) -> Result<SnapshotManifest>;
}

/// A vault: local repository or remote service.
pub trait Vault: Send + Sync {
    fn config(&self) -> Result<RepoConfig>;
    fn begin(&self, purpose: &str) -> Result<Box<dyn VaultSession>>;
    fn list(&self) -> Result<Vec<SnapshotManifest>>;
    fn find(&self, spec: &str) -> Result<SnapshotManifest>;
    fn entries(&self, s: &SnapshotManifest) -> Result<Vec<Entry>>;
    /// The entries and the digests of the snapshot's tree nodes (which the vault therefore
    /// has); the node list may be empty when the vault does not say.
    fn entries_and_nodes(&self, s: &SnapshotManifest) -> Result<(Vec<Entry>, Vec<Digest>)> {
        Ok((self.entries(s)?, Vec::new()))
    }
    /// Plaintext of data segments, verified against their digests, in order.
    fn fetch(&self, digests: &[Digest]) -> Result<Vec<Vec<u8>>>;
    /// [`fetch`](Self::fetch) of `required`, plus those of the `optional` segments that
    /// cost nothing more: packed in a frame that carries a required one. Returns the
    /// required plaintexts in order and the optional ones found, by index into `optional`,
    /// all verified. A reader that jumps around passes its recipe neighbours as optional and
    /// so gets the rest of each frame it pays for (a vault service sends whole frames).
    fn fetch_near(&self, required: &[Digest], optional: &[Digest]) -> Result<Fetched> {
        let _ = optional;
        Ok((self.fetch(required)?, Vec::new()))
    }
    fn verify(&self, read_data: bool) -> Result<VerifyReport>;
    fn prune(&self, opts: &PruneOptions, dry_run: bool) -> Result<PrunePlan>;
    fn gc(&self, opts: &GcOptions) -> Result<GcPlan>;
    /// Forgets snapshots (ids or unique prefixes); all or none. Data is freed by GC.
    fn forget(&self, specs: &[String]) -> Result<Vec<SnapshotId>>;
    /// Locks a snapshot until `until` (Unix seconds) or extends its lock; never shortens.
    fn lock(&self, spec: &str, until: u64) -> Result<LockAnswer>;
    /// Every snapshot's retention lock (expired ones included).
    fn locks(&self) -> Result<Vec<SnapshotLock>>;
    fn retention_policy(&self) -> Result<RetentionPolicy>;
    fn set_retention_policy(&self, p: &RetentionPolicy) -> Result<RetentionPolicy>;
    /// Segments whose stored copy is marked damaged: a backup that has their data reads and
    /// sends them again, healing every snapshot that needs them. Empty where the vault does
    /// not say.
    fn damaged_segments(&self) -> Result<Vec<Digest>> {
        Ok(Vec::new())
    }
    /// How many reads a reader should keep in flight: the cores for a vault on local
    /// files; more where each read waits on a network (an object store, a vault service).
    fn read_parallelism(&self) -> usize {
        REMOTE_READ_PARALLELISM
    }
    /// Bytes of disk data sent to / received from the vault over a network (0 when local).
    fn wire_bytes(&self) -> (u64, u64) {
        (0, 0)
    }
    fn location(&self) -> String;
    /// The keys of an encrypted repository, when this client has them: backups fingerprint
    /// and seal with them, reads open with them. `None` for a repository that is not
    /// encrypted (and for one whose key was not given: backups then refuse).
    fn keys(&self) -> Option<Arc<cairn_chunk::Keys>> {
        None
    }
}

/// A local repository as a [`Vault`].
#[derive(Debug, Clone)]
pub struct LocalVault {
    pub repo: Arc<Repository>,
}

struct LocalSession(BackupSession);

impl VaultSession for LocalSession {
    fn lacking(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        self.0.lacking(digests)
    }

    fn upload(&self, blobs: Vec<Upload>) -> Result<()> {
        let mut nodes = Vec::new();
        for b in &blobs {
            self.0.put_frame(b.kind, &b.members, &b.seg)?;
            if let (BlobKind::Tree, [(d, n)]) = (b.kind, &b.members[..]) {
                nodes.push((*d, &b.seg, *n));
            }
        }
        if nodes.is_empty() {
            return Ok(());
        }
        self.0.note_nodes(&nodes)
    }

    fn commit(self: Box<Self>, req: CommitRequest) -> Result<SnapshotManifest> {
        self.0.commit(req)
    }
}

impl Vault for LocalVault {
    fn config(&self) -> Result<RepoConfig> {
        Ok(self.repo.config().clone())
    }

    fn read_parallelism(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        if self.repo.store().capabilities().local {
            cores.max(2)
        } else {
            cores.max(REMOTE_READ_PARALLELISM)
        }
    }

    fn begin(&self, purpose: &str) -> Result<Box<dyn VaultSession>> {
        Ok(Box::new(LocalSession(BackupSession::begin(
            self.repo.clone(),
            purpose,
        )?)))
    }

    fn list(&self) -> Result<Vec<SnapshotManifest>> {
        self.repo.list_snapshots()
    }

    fn find(&self, spec: &str) -> Result<SnapshotManifest> {
        self.repo.find_snapshot(spec)
    }

    fn entries(&self, s: &SnapshotManifest) -> Result<Vec<Entry>> {
        self.repo.entries(s)
    }

    fn entries_and_nodes(&self, s: &SnapshotManifest) -> Result<(Vec<Entry>, Vec<Digest>)> {
        self.repo.entries_and_nodes(s)
    }

    fn fetch(&self, digests: &[Digest]) -> Result<Vec<Vec<u8>>> {
        self.repo.read_many(digests)
    }

    fn verify(&self, read_data: bool) -> Result<VerifyReport> {
        crate::maint::verify(&self.repo, read_data)
    }

    fn prune(&self, opts: &PruneOptions, dry_run: bool) -> Result<PrunePlan> {
        crate::maint::prune(&self.repo, opts, dry_run)
    }

    fn gc(&self, opts: &GcOptions) -> Result<GcPlan> {
        crate::maint::gc(&self.repo, opts)
    }

    fn forget(&self, specs: &[String]) -> Result<Vec<SnapshotId>> {
        crate::maint::forget(&self.repo, specs)
    }

    fn damaged_segments(&self) -> Result<Vec<Digest>> {
        self.repo.damaged_segments()
    }

    fn lock(&self, spec: &str, until: u64) -> Result<LockAnswer> {
        self.repo.lock_spec(spec, until)
    }

    fn locks(&self) -> Result<Vec<SnapshotLock>> {
        self.repo.lock_list()
    }

    fn retention_policy(&self) -> Result<RetentionPolicy> {
        self.repo.retention_policy()
    }

    fn set_retention_policy(&self, p: &RetentionPolicy) -> Result<RetentionPolicy> {
        self.repo.set_retention_policy(p)?;
        Ok(*p)
    }

    fn location(&self) -> String {
        self.repo.store().location()
    }

    fn keys(&self) -> Option<Arc<cairn_chunk::Keys>> {
        self.repo.keys().cloned()
    }
}
