//! The storage agent's backup logic: pick a change source, check it, and send a disk
//! snapshot straight to a vault.
//!
//! ```text
//! hints (in order) ──► changed_extents ──► cross-check? ──► imager::backup(parent, changed)
//!        │ error / mismatch                                      ▲
//!        └──────────────► next hint … ──► RecipeCompare ─────────┘ (parent, no changed: dedup)
//! ```
//!
//! A backup never fails because change tracking failed: the fallbacks and their reasons are
//! recorded in the result and in the snapshot's labels (`change_source`,
//! `change_fallbacks`). Interrupted backups resume for free: the vault keeps the durable
//! containers of an uncommitted session, so a retry finds those segments present and does
//! not send them again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use cairn_api::storage::JOB_SCOPED_TAG_PREFIX;
use cairn_types::ReadAt;
use cairn_vault::imager::{self, BackupOptions, NoProgress, ParentRecipe};
use cairn_vault::{SnapshotManifest, Vault};

use crate::catalog::SnapshotCatalog;
use crate::datastore::{DatastoreConfig, DatastoreInfo, list_datastore};
use crate::error::{Result, StorageError};
use crate::provider::{
    DiskSnapshot, DiskSnapshotExt, RetentionPlan, SnapshotProvider, UnitSnapshot, plan_retention,
    provider_for,
};
use crate::qemu::NbdRuntime;
use crate::tracker::{ChangeSource, changed_extents, cross_check};

/// Configuration of a storage agent.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AgentConfig {
    pub datastores: Vec<DatastoreConfig>,
    /// Where snapshot records live.
    pub state_dir: PathBuf,
    /// Disks backed up at once by [`StorageAgent::backup_disks`] (0 = 2).
    #[serde(default)]
    pub parallel: usize,
    /// A key file that opens encrypted repositories this agent backs up to and restores
    /// from (the agent seals and opens; vault services only store ciphertext).
    #[serde(default)]
    pub vault_key_file: Option<PathBuf>,
}

/// Byte counters of disk data (since the agent started).
#[derive(Debug, Default)]
pub struct AgentCounters {
    /// Read from disks and snapshots for backups and comparisons.
    pub disk_read: AtomicU64,
    /// Sent to vaults (wire bytes for a remote vault; new segment bytes for a local one).
    pub sent: AtomicU64,
    /// Received from vaults by restores.
    pub received: AtomicU64,
    /// Written to disks by restores.
    pub disk_written: AtomicU64,
}

pub use cairn_api::storage::{AgentStats, BackupRequest};

/// What a disk backup did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BackupResult {
    pub manifest: SnapshotManifest,
    pub change_source: ChangeSource,
    /// Bytes the tracker reported changed (the disk size for full and recipe compare).
    pub changed_bytes: u64,
    /// Bytes read from the disk snapshot (including a cross-check).
    pub bytes_read: u64,
    /// Encoded disk-data bytes handed to the vault (what crosses the network to a vault
    /// service).
    pub bytes_sent: u64,
    /// Hints that were skipped, with the reason.
    pub fallbacks: Vec<String>,
}

impl BackupResult {
    /// The answer of `POST /v1/backups` for this disk: the manifest reduced to what callers
    /// record (id, name, size, parent, labels).
    pub fn to_wire(&self) -> cairn_api::storage::DiskBackup {
        let m = &self.manifest;
        cairn_api::storage::DiskBackup {
            manifest: cairn_api::storage::VaultSnapshot {
                id: m.id,
                name: m.name.clone(),
                created_ms: m.created_ms,
                size: m.size,
                parent: m.parent,
                labels: m.labels.clone(),
            },
            change_source: self.change_source,
            changed_bytes: self.changed_bytes,
            bytes_read: self.bytes_read,
            bytes_sent: self.bytes_sent,
            fallbacks: self.fallbacks.clone(),
        }
    }
}

/// The storage agent (library side; [`crate::service`] puts HTTP in front).
#[derive(Debug)]
pub struct StorageAgent {
    config: AgentConfig,
    catalog: SnapshotCatalog,
    nbd: NbdRuntime,
    pub counters: AgentCounters,
}

impl StorageAgent {
    /// An agent whose NBD connections (qcow2 snapshots, bitmaps, restores, host agents'
    /// exports) run on `nbd`, a runtime the binary built ([`NbdRuntime::builder`]).
    pub fn new(config: AgentConfig, nbd: NbdRuntime) -> Self {
        let catalog = SnapshotCatalog::new(&config.state_dir);
        Self {
            config,
            catalog,
            nbd,
            counters: AgentCounters::default(),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The runtime NBD connections run on.
    pub fn nbd(&self) -> &NbdRuntime {
        &self.nbd
    }

    pub fn stats(&self) -> AgentStats {
        let c = &self.counters;
        AgentStats {
            disk_bytes_read: c.disk_read.load(Ordering::Relaxed),
            bytes_sent: c.sent.load(Ordering::Relaxed),
            bytes_received: c.received.load(Ordering::Relaxed),
            disk_bytes_written: c.disk_written.load(Ordering::Relaxed),
        }
    }

    /// The configured datastore named `name`.
    pub fn datastore(&self, name: &str) -> Result<&DatastoreConfig> {
        self.config
            .datastores
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| StorageError::NotFound(format!("datastore {name:?}")))
    }

    /// Every datastore with its unit and disks.
    pub fn list_datastores(&self) -> Result<Vec<DatastoreInfo>> {
        self.config.datastores.iter().map(list_datastore).collect()
    }

    /// Resolves `datastore/disk-id` to a path inside the datastore.
    pub fn disk_path(&self, datastore: &str, disk: &str) -> Result<PathBuf> {
        let ds = self.datastore(datastore)?;
        Ok(ds.path.join(crate::datastore::check_relative(disk)?))
    }

    /// Takes a snapshot of `disks` with `provider` and records it.
    pub fn snapshot(
        &self,
        provider: &dyn SnapshotProvider,
        disks: &[PathBuf],
        tag: &str,
    ) -> Result<UnitSnapshot> {
        let s = provider.snapshot(disks, tag)?;
        if let Err(e) = self.catalog.add(&s) {
            let _ = provider.delete(&s);
            return Err(e);
        }
        cairn_types::fault::point("storage.backup.after_unit_snapshot");
        Ok(s)
    }

    /// Deletes the job-scoped snapshots (tag [`JOB_SCOPED_TAG_PREFIX`]) a previous run of
    /// this agent left: the job that took one cannot use it after the agent restarted (its
    /// reads failed with the agent), and when the agent died before answering, the job never
    /// learned the snapshot's id to release it. Called at start-up; returns how many it
    /// deleted.
    pub fn remove_orphaned_job_snapshots(&self) -> Result<usize> {
        let mut n = 0;
        for s in self.catalog.list()? {
            if s.tag.starts_with(JOB_SCOPED_TAG_PREFIX) {
                self.delete_snapshot(&s.id)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes the partial files of restores a previous run of this agent left in its
    /// datastores (a restore writes under a partial name and renames when complete; no
    /// restore runs at start-up). Returns how many it deleted.
    pub fn remove_partial_restores(&self) -> Result<usize> {
        let mut n = 0;
        let mut stack: Vec<PathBuf> = self
            .config
            .datastores
            .iter()
            .map(|d| d.path.clone())
            .collect();
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for ent in rd.flatten() {
                let Ok(ft) = ent.file_type() else { continue };
                let name = ent.file_name().to_string_lossy().into_owned();
                if ft.is_dir() {
                    stack.push(ent.path());
                } else if ft.is_file()
                    && name.starts_with('.')
                    && name.ends_with(cairn_vault::imager::PARTIAL_SUFFIX)
                {
                    std::fs::remove_file(ent.path())
                        .map_err(StorageError::io(&ent.path(), "remove partial restore"))?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Snapshots on primary storage made by this agent, oldest first.
    pub fn list_snapshots(&self) -> Result<Vec<UnitSnapshot>> {
        self.catalog.list()
    }

    pub fn get_snapshot(&self, id: &str) -> Result<UnitSnapshot> {
        self.catalog.get(id)
    }

    /// Deletes a snapshot (idempotent) and its record.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        let s = self.catalog.get(id)?;
        provider_for(&s.provider)?.delete(&s)?;
        self.catalog.remove(id)
    }

    /// Keeps the newest `keep` snapshots per disk; with `dry_run` only returns the plan.
    pub fn apply_retention(&self, keep: usize, dry_run: bool) -> Result<RetentionPlan> {
        let plan = plan_retention(&self.catalog.list()?, keep);
        if !dry_run {
            for id in &plan.delete {
                self.delete_snapshot(id)?;
            }
        }
        Ok(plan)
    }

    /// Backs up one disk snapshot. See the module docs for the choice of change source.
    pub fn backup_disk(
        &self,
        vault: &dyn Vault,
        snap: &DiskSnapshot,
        req: &BackupRequest,
    ) -> Result<BackupResult> {
        let reader = snap.open(&self.nbd)?;
        self.backup_source(vault, snap, &*reader, req)
    }

    /// As [`Self::backup_disk`], reading from an already open `reader` of `snap`.
    pub fn backup_source(
        &self,
        vault: &dyn Vault,
        snap: &DiskSnapshot,
        reader: &dyn ReadAt,
        req: &BackupRequest,
    ) -> Result<BackupResult> {
        let started = std::time::Instant::now();
        let size = reader
            .size()
            .map_err(StorageError::io(&snap.image, "size"))?;
        let mut fallbacks = Vec::new();
        let mut check_read = 0u64;
        let parent = match &req.parent {
            None => None,
            Some(p) => match vault.find(p) {
                Ok(m) => Some(m),
                Err(cairn_vault::VaultError::SnapshotNotFound(_)) => {
                    fallbacks.push(format!("parent {p:?} not in the vault: full backup"));
                    None
                }
                Err(e) => return Err(e.into()),
            },
        };
        // The parent's recipe is read while the tracker works (both take a few milliseconds;
        // an incremental needs both).
        let mut recipe: Option<std::sync::Arc<ParentRecipe>> = None;
        let (source, changed) = match &parent {
            None => (ChangeSource::Full, None),
            Some(pm) => std::thread::scope(|sc| -> Result<_> {
                // Hints are tried only if there are some; without, no recipe is needed.
                let mut reading = (!req.hints.is_empty()).then(|| {
                    sc.spawn(|| {
                        ParentRecipe::read(vault, pm)
                            .map(std::sync::Arc::new)
                            .map_err(Box::new)
                    })
                });
                // Waits for the reader once; later calls find the recipe already there.
                let mut wait = |recipe: &mut Option<std::sync::Arc<ParentRecipe>>| -> Result<()> {
                    if let Some(h) = reading.take() {
                        let r = h.join().map_err(|_| {
                            cairn_vault::VaultError::Invalid("parent recipe reader panicked".into())
                        })?;
                        *recipe = Some(r.map_err(|e| StorageError::from(*e))?);
                    }
                    Ok(())
                };
                let mut chosen = None;
                for hint in &req.hints {
                    let set = match changed_extents(&self.nbd, snap, hint) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("{}: {e}", req.name);
                            fallbacks.push(e.to_string());
                            continue;
                        }
                    };
                    if let Some(cc) = &req.cross_check {
                        wait(&mut recipe)?;
                        let entries = &recipe.as_ref().expect("read while there are hints").entries;
                        match cross_check(vault.keys().as_deref(), reader, entries, &set, cc) {
                            Ok(r) => check_read += r.bytes,
                            Err(e @ StorageError::TrackingMismatch { .. }) => {
                                tracing::warn!("{}: {e}", req.name);
                                fallbacks.push(e.to_string());
                                continue;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    chosen = Some(set);
                    break;
                }
                wait(&mut recipe)?;
                Ok(match chosen {
                    Some(set) => (set.source, Some(set.extents)),
                    None => (ChangeSource::RecipeCompare, None),
                })
            })?,
        };
        let changed_bytes = changed.as_ref().map(|c| c.total_bytes()).unwrap_or(size);
        let mut labels = req.labels.clone();
        labels.insert("change_source".into(), source.as_str().into());
        if source == ChangeSource::ExtentMap && snap.format == cairn_types::DiskFormat::Qcow2 {
            // Host extents mapped to guest offsets through the clones' L1/L2 tables.
            labels.insert("change_mapping".into(), "qcow2_tables".into());
        }
        labels.insert("changed_bytes".into(), changed_bytes.to_string());
        if !fallbacks.is_empty() {
            labels.insert("change_fallbacks".into(), fallbacks.join(" | "));
        }
        labels.insert("disk".into(), snap.disk.display().to_string());
        let opts = BackupOptions {
            name: req.name.clone(),
            parent: parent.as_ref().map(|p| p.id.to_string()),
            changed,
            parent_recipe: recipe,
            chunker: None,
            labels,
            threads: req.threads,
            // The repository's minimum lock applies at commit (cairn_vault::retention).
            lock_until: None,
        };
        tracing::debug!(
            "{}: change source {} chosen in {:?}",
            req.name,
            source.as_str(),
            started.elapsed()
        );
        let manifest = imager::backup(vault, reader, &opts, &NoProgress)?;
        // Encoded disk data handed to the vault by this backup (exact even when backups
        // share one vault connection).
        let bytes_sent = manifest.stats.bytes_sent;
        let bytes_read = manifest.stats.bytes_read + check_read;
        self.counters
            .disk_read
            .fetch_add(bytes_read, Ordering::Relaxed);
        self.counters.sent.fetch_add(bytes_sent, Ordering::Relaxed);
        Ok(BackupResult {
            manifest,
            change_source: source,
            changed_bytes,
            bytes_read,
            bytes_sent,
            fallbacks,
        })
    }

    /// Backs up several disks, at most `config.parallel` (default 2) at once. Results are in
    /// the order of `jobs`; one disk's failure does not stop the others.
    pub fn backup_disks(
        &self,
        vault: &dyn Vault,
        jobs: &[(DiskSnapshot, BackupRequest)],
    ) -> Vec<Result<BackupResult>> {
        let parallel = if self.config.parallel == 0 {
            2
        } else {
            self.config.parallel
        };
        parallel_map(jobs, parallel, |(snap, req)| {
            self.backup_disk(vault, snap, req)
        })
    }

    /// The targeted group snapshot: groups `disks` by storage unit and takes one snapshot per unit (providers
    /// without units, such as qcow2, take one snapshot of all disks).
    pub fn snapshot_units(
        &self,
        provider: &dyn SnapshotProvider,
        disks: &[PathBuf],
        tag: &str,
    ) -> Result<Vec<UnitSnapshot>> {
        if !provider.capabilities().per_unit {
            return Ok(vec![self.snapshot(provider, disks, tag)?]);
        }
        let mut groups: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for d in disks {
            groups
                .entry(crate::datastore::storage_unit(d)?.id)
                .or_default()
                .push(d.clone());
        }
        let mut out = Vec::with_capacity(groups.len());
        for group in groups.values() {
            match self.snapshot(provider, group, tag) {
                Ok(s) => out.push(s),
                Err(e) => {
                    // All or nothing: drop the units already snapshotted.
                    for s in &out {
                        let _ = self.delete_snapshot(&s.id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }
}

/// Runs `f` over `items` on at most `parallel` threads; results keep the order of `items`.
pub(crate) fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    parallel: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|sc| {
        for _ in 0..parallel.max(1).min(items.len()) {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every item ran: a worker panic would have propagated"))
        .collect()
}

/// Opens a datastore-relative disk for reading without a snapshot (offline disks, frozen
/// bases): a shortcut for `DiskSnapshot::of_file`.
pub fn disk_in_place(path: &Path) -> Result<DiskSnapshot> {
    DiskSnapshot::of_file(path)
}
