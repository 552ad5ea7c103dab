//! The repository: one object store holding containers, snapshot manifests, locks and the
//! config, plus the local index cache.
//!
//! ```text
//! config                         RepoConfig (JSON)
//! containers/<2 hex>/<32 hex>    containers (see cairn_chunk::container)
//! snapshots/<32 hex>.json        SnapshotManifest: a snapshot exists iff this exists
//! retention/, retention-policy.json  retention locks (see crate::retention)
//! locks/<16 hex>.json            RepoLock
//! repair/damaged.json            segment copies found damaged (see "Healing" below)
//! index/   (local directory)     the fingerprint index cache (see crate::index)
//! ```
//!
//! # Healing
//!
//! A segment copy that verify or a read finds damaged is *marked* (its digest and place, in
//! `repair/damaged.json`). Backups treat a marked copy as absent: the next backup that has the
//! segment's data uploads it again (an incremental reads the regions of its parent's marked
//! segments as changed), the index then names the new copy, and every older snapshot that
//! needs the segment reads the new one: it is healed. GC collects the damaged copy, which no
//! longer is the indexed one, and drops marks of containers that are gone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cairn_chunk::container::{self, Record};
use cairn_chunk::format::CONTAINER_FOOTER_LEN;
use cairn_chunk::recipe::Node;
use cairn_chunk::{ChunkerParams, Entry, Keys, codec};
use cairn_types::{ContainerId, Digest, SnapshotId};

use crate::error::{Result, VaultError};
use crate::index::{Index, Location};
use crate::keys::EncryptionConfig;
pub(crate) use crate::manifest::find_in;
use crate::manifest::{REPO_VERSION, RepoConfig, SnapshotManifest, now};
use crate::store::{Key, LocalStore, ObjectStore, StoreErrorKind};

mod condemned;
mod node_cache;
mod read;
mod snapshots;
use cairn_chunk::format::REPO_VERSION_ENCRYPTED;
pub use condemned::{Condemned, TOMBSTONE_KEEP};

/// An open repository. Cheap to share (`Arc`); all methods take `&self`.
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    config: RepoConfig,
    index: RwLock<Index>,
    cache_dir: PathBuf,
    damaged: RwLock<HashSet<Mark>>,
    /// Containers GC has condemned (readable, never reused) and deleted ([`condemned`]).
    verdicts: RwLock<condemned::Verdicts>,
    /// The keys of an encrypted repository, once unlocked (see [`crate::keys`]). A vault
    /// service never has them: it stores, checks and collects ciphertext.
    keys: std::sync::OnceLock<Arc<Keys>>,
    /// Recently decoded frames, shared by every read (see [`read`]).
    frames: read::FramePool,
}

/// What [`Repository::rebuild_index`] did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RebuildReport {
    /// Containers whose trailers were read.
    pub containers_read: usize,
    /// Containers with a damaged trailer whose segments the old index still knew (run
    /// `cairn repo repair` to rebuild their trailers).
    pub containers_salvaged: usize,
    pub segments_salvaged: usize,
    /// Containers with a damaged trailer and nothing to salvage.
    pub containers_skipped: usize,
}

/// A damaged copy of a segment: its digest and the frame it lies in.
pub type Mark = (Digest, ContainerId, u32);

fn damaged_key() -> Key {
    Key::new("repair/damaged.json").expect("valid key")
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("store", &self.store.location())
            .finish()
    }
}

/// zstd level of new repositories: frames of neighbouring segments at level 3 keep a
/// repository under restic's size on the benchmark corpus, level 1 does not (docs/BENCHMARKS.md).
/// Only first backups compress much: incrementals send little.
pub const DEFAULT_COMPRESSION: i32 = 3;

/// Options for a new repository.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub chunker: ChunkerParams,
    pub compression: i32,
    /// Encrypt the repository, its master key wrapped by this first key.
    pub encrypt: Option<FirstKey>,
}

/// The first wrapping of a new encrypted repository's master key.
#[derive(Clone, Debug)]
pub enum FirstKey {
    Passphrase(crate::keys::Secret, cairn_chunk::wrap::KdfParams),
    /// A new key file, written at this path.
    KeyFile(PathBuf),
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            chunker: ChunkerParams::default(),
            compression: DEFAULT_COMPRESSION,
            encrypt: None,
        }
    }
}

pub(crate) fn container_key(id: &ContainerId) -> Key {
    let h = id.to_hex();
    Key::new(format!("containers/{}/{}", &h[..2], h)).expect("valid key")
}

pub(crate) fn snapshot_key(id: &SnapshotId) -> Key {
    Key::new(format!("snapshots/{id}.json")).expect("valid key")
}

fn config_key() -> Key {
    Key::new("config").expect("valid key")
}

/// A second copy of the config, written at init and by repair: one damaged byte in `config`
/// must not lose the repository (its id, chunker and compression are needed to read it).
fn config_copy_key() -> Key {
    Key::new("config.copy").expect("valid key")
}

impl Repository {
    /// Creates a repository in an empty store.
    pub fn init(
        store: Arc<dyn ObjectStore>,
        cache_dir: &Path,
        opts: &InitOptions,
    ) -> Result<Arc<Self>> {
        opts.chunker.validate().map_err(VaultError::Invalid)?;
        let keys = opts.encrypt.as_ref().map(|_| Arc::new(Keys::generate()));
        let config = RepoConfig {
            version: if keys.is_some() {
                REPO_VERSION_ENCRYPTED
            } else {
                REPO_VERSION
            },
            id: hex::encode(rand::random::<[u8; 16]>()),
            chunker: opts.chunker,
            compression: opts.compression,
            created: now(),
            encryption: keys.as_deref().map(EncryptionConfig::for_keys),
        };
        let body = serde_json::to_vec_pretty(&config).expect("config json");
        // A store that cannot refuse to overwrite (`put_new` is best effort there) is asked
        // first: neither the config nor its copy may be there.
        for k in [config_key(), config_copy_key()] {
            match store.size(&k) {
                Ok(_) => {
                    return Err(VaultError::Invalid(format!(
                        "{} already holds a repository",
                        store.location()
                    )));
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        store
            .put_new(&config_key(), &body)
            .map_err(|e| match e.kind {
                StoreErrorKind::AlreadyExists => {
                    VaultError::Invalid(format!("{} already holds a repository", store.location()))
                }
                _ => e.into(),
            })?;
        store.put(&config_copy_key(), &body)?;
        let repo = Self::open(store, cache_dir)?;
        if let (Some(keys), Some(first)) = (keys, &opts.encrypt) {
            repo.set_keys(keys);
            match first {
                FirstKey::Passphrase(p, kdf) => repo.add_passphrase(&p.0, *kdf)?,
                FirstKey::KeyFile(path) => repo.add_key_file(path)?,
            };
        }
        Ok(repo)
    }

    /// Reads and parses the config, falling back on its copy when it is damaged.
    pub(crate) fn read_config(store: &dyn ObjectStore) -> Result<RepoConfig> {
        let read = |key: &Key| -> Result<RepoConfig> {
            let raw = store.get(key).map_err(|e| match e.kind {
                StoreErrorKind::NotFound => {
                    VaultError::NotARepository(format!("no {key} in {}", store.location()))
                }
                _ => e.into(),
            })?;
            serde_json::from_slice(&raw)
                .map_err(|e| VaultError::NotARepository(format!("unreadable {key}: {e}")))
        };
        match read(&config_key()) {
            Ok(c) => Ok(c),
            Err(first) => match read(&config_copy_key()) {
                Ok(c) => {
                    tracing::warn!(
                        "{first}; using the config's copy (`cairn repo repair` restores it)"
                    );
                    Ok(c)
                }
                Err(_) => Err(first),
            },
        }
    }

    /// Checks that the config and its copy agree byte for byte (a repository without a copy,
    /// made before copies existed, is fine).
    pub fn check_config_copies(&self) -> Result<()> {
        let main = self.store.get(&config_key())?;
        let ok = serde_json::from_slice::<RepoConfig>(&main).is_ok_and(|c| c == self.config);
        if !ok {
            return Err(VaultError::Corrupt(
                "the config is damaged (its copy is in use; `cairn repo repair` rewrites it)"
                    .into(),
            ));
        }
        match self.store.get(&config_copy_key()) {
            Ok(copy) if copy != main => Err(VaultError::Corrupt(
                "the config and its copy differ (`cairn repo repair` rewrites both from the \
                 one in use)"
                    .into(),
            )),
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the config and its copy again from the one in use.
    pub fn rewrite_config(&self) -> Result<()> {
        let body = serde_json::to_vec_pretty(&self.config).expect("config json");
        self.store.put(&config_key(), &body)?;
        self.store.put(&config_copy_key(), &body)?;
        Ok(())
    }

    /// Opens a repository and brings the index up to date with the containers in the store.
    pub fn open(store: Arc<dyn ObjectStore>, cache_dir: &Path) -> Result<Arc<Self>> {
        let config = Self::read_config(store.as_ref())?;
        let encrypted = config.encryption.is_some();
        if !(config.version == REPO_VERSION && !encrypted
            || config.version == REPO_VERSION_ENCRYPTED && encrypted)
        {
            return Err(VaultError::NotARepository(format!(
                "unsupported repository version {}",
                config.version
            )));
        }
        let index = Index::open(&cache_dir.join("index"))?;
        let damaged = match store.get(&damaged_key()) {
            Ok(b) => serde_json::from_slice::<Vec<Mark>>(&b).unwrap_or_else(|e| {
                tracing::warn!("ignoring unreadable damage marks: {e}");
                Vec::new()
            }),
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let verdicts = condemned::load(store.as_ref())?;
        let repo = Arc::new(Self {
            store,
            config,
            index: RwLock::new(index),
            cache_dir: cache_dir.to_path_buf(),
            damaged: RwLock::new(damaged.into_iter().collect()),
            verdicts: RwLock::new(verdicts),
            keys: std::sync::OnceLock::new(),
            frames: read::FramePool::default(),
        });
        repo.sync_index()?;
        Ok(repo)
    }

    /// A repository in a local directory (index cache inside it).
    pub fn open_dir(dir: &Path) -> Result<Arc<Self>> {
        if !dir.join("config").exists() && !dir.join("config.copy").exists() {
            return Err(VaultError::NotARepository(format!(
                "{} has no config (run `cairn repo init`)",
                dir.display()
            )));
        }
        let store = Arc::new(LocalStore::open(dir)?);
        Self::open(store, dir)
    }

    /// Creates a repository in a local directory.
    pub fn init_dir(dir: &Path, opts: &InitOptions) -> Result<Arc<Self>> {
        let store = Arc::new(LocalStore::open(dir)?);
        Self::init(store, dir, opts)
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The keys of an encrypted repository, once [`unlock`](Self::unlock)ed.
    pub fn keys(&self) -> Option<&Arc<Keys>> {
        self.keys.get()
    }

    /// Is the repository encrypted (whether or not it is unlocked)?
    pub fn is_encrypted(&self) -> bool {
        self.config.encryption.is_some()
    }

    pub(crate) fn set_keys(&self, keys: Arc<Keys>) {
        let _ = self.keys.set(keys);
    }

    pub(crate) fn key_ref(&self) -> Option<&Keys> {
        self.keys.get().map(|k| &**k)
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    pub(crate) fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn index_mut(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Every container id in the store.
    pub fn list_containers(&self) -> Result<Vec<(ContainerId, u64)>> {
        Ok(self
            .list_containers_dated()?
            .into_iter()
            .map(|(c, size, _)| (c, size))
            .collect())
    }

    /// [`list_containers`](Self::list_containers) with the time each was written (Unix
    /// seconds), where the store says.
    pub fn list_containers_dated(&self) -> Result<Vec<(ContainerId, u64, Option<u64>)>> {
        Ok(self
            .store
            .list("containers")?
            .into_iter()
            .filter_map(|m| {
                let name = m.key.as_str().rsplit('/').next()?;
                Some((name.parse().ok()?, m.size, m.modified))
            })
            .collect())
    }

    /// Reads a container's trailer (footer first, then the records). A segment past 4 GiB
    /// is a format error: index entries hold u32 offsets.
    pub fn container_records(&self, id: &ContainerId) -> Result<Vec<Record>> {
        let key = container_key(id);
        let total = self.store.size(&key)?;
        let fmt = |source| VaultError::Format {
            container: *id,
            source,
        };
        if total < CONTAINER_FOOTER_LEN as u64 + 8 {
            return Err(fmt(cairn_chunk::FormatError {
                what: "container",
                reason: format!("only {total} bytes"),
            }));
        }
        let tail = self.store.get_range(
            &key,
            total - CONTAINER_FOOTER_LEN as u64,
            CONTAINER_FOOTER_LEN as u64,
        )?;
        let footer = container::parse_footer(&tail, total).map_err(fmt)?;
        let trailer = self
            .store
            .get_range(&key, footer.trailer_offset, footer.trailer_len())?;
        let recs = container::parse_trailer(&trailer, &footer).map_err(fmt)?;
        // The index addresses segments with u32 offsets; a longer container (hostile, or
        // not ours) is refused here rather than indexed at wrapped offsets.
        if let Some(r) = recs.iter().find(|r| u32::try_from(r.offset).is_err()) {
            return Err(fmt(cairn_chunk::FormatError {
                what: "container",
                reason: format!(
                    "segment {:?} at offset {}, past the 4 GiB the index addresses",
                    r.digest, r.offset
                ),
            }));
        }
        Ok(recs)
    }

    /// Adds containers no index run covers (left by interrupted backups) to the index.
    /// Returns how many were added. Unreadable containers are skipped with a warning.
    pub fn sync_index(&self) -> Result<usize> {
        let all: Vec<ContainerId> = self
            .list_containers()?
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        self.add_uncovered(&all)
    }

    /// Reads into the index the containers of `listed` that it does not cover.
    fn add_uncovered(&self, listed: &[ContainerId]) -> Result<usize> {
        let missing: Vec<ContainerId> = {
            let ix = self.index();
            listed.iter().filter(|c| !ix.covers(c)).copied().collect()
        };
        if missing.is_empty() {
            return Ok(0);
        }
        let mut added = 0;
        for c in &missing {
            match self.container_records(c) {
                Ok(recs) => {
                    // Checked with the index locked: a GC notes a container gone and drops
                    // it from the index in one step (its trailer may be read just before).
                    let mut ix = self.index_mut();
                    if !self.is_gone(c) {
                        ix.add_container(*c, &recs);
                        added += 1;
                    }
                }
                Err(e) => tracing::warn!("skipping unreadable container {c}: {e}"),
            }
        }
        self.index_mut().flush()?;
        Ok(added)
    }

    /// Brings the index in line with the containers the store holds now: adds those written
    /// by others (another process, another vault service on the same bucket) and forgets
    /// those deleted by another's GC, so that it never vouches for a segment that is gone.
    /// Called by every backup session once its lock is held (GC cannot run then), so what a
    /// session deduplicates against is what the store holds. Returns (added, forgotten).
    pub fn refresh_index(&self) -> Result<(usize, usize)> {
        self.reload_condemned()?;
        // Only containers covered before the listing can have vanished from it (one added
        // meanwhile was written after it).
        let covered: Vec<ContainerId> = self.index().covered().copied().collect();
        // One listing serves both directions.
        let listed: Vec<ContainerId> = self
            .list_containers()?
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        let present: HashSet<&ContainerId> = listed.iter().collect();
        let gone = self.gone();
        let vanished: HashSet<ContainerId> = covered
            .into_iter()
            .filter(|c| !present.contains(c) || gone.contains(c))
            .collect();
        if !vanished.is_empty() {
            tracing::info!(
                "{} containers of the index are gone from the store (collected elsewhere); \
                 forgetting them",
                vanished.len()
            );
            self.index_mut().rewrite(&vanished)?;
        }
        Ok((self.add_uncovered(&listed)?, vanished.len()))
    }

    /// Runs `f` on the index. When a run of it turns out damaged, the run is dropped, the
    /// containers it covered are read in again, and `f` runs again: a damaged index costs a
    /// rebuild, never a wrong answer.
    pub(crate) fn with_index<T>(&self, f: impl Fn(&Index) -> Result<T>) -> Result<T> {
        let mut attempts = 0;
        loop {
            let r = f(&self.index());
            match r {
                Err(VaultError::IndexDamaged { path, what }) if attempts < 8 => {
                    tracing::warn!("{path}: {what}: rebuilding it from the containers");
                    self.heal_index(&path)?;
                    attempts += 1;
                }
                r => return r,
            }
        }
    }

    /// Reads every page of the index. Runs that fail (now, or when they were opened) are
    /// dropped and rebuilt from the containers; returns the entries read and, for each run
    /// rebuilt, its path and what was wrong.
    pub fn check_index(&self) -> Result<(u64, Vec<(String, String)>)> {
        let mut rebuilt = self.index_mut().take_dropped();
        loop {
            let r = self.index().check_runs();
            match r {
                Ok(n) => return Ok((n, rebuilt)),
                Err(VaultError::IndexDamaged { path, what }) if rebuilt.len() < 64 => {
                    self.heal_index(&path)?;
                    self.index_mut().take_dropped(); // the one just noted
                    rebuilt.push((path, what));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops a damaged index run and reads the trailers of the containers it covered.
    pub fn heal_index(&self, run_path: &str) -> Result<()> {
        self.index_mut().drop_run(run_path)?;
        self.sync_index()?;
        Ok(())
    }

    /// Rebuilds the index from the containers' trailers. Entries of containers whose trailer
    /// cannot be read are kept from the old index where their segments still read back
    /// intact, so a rebuild never loses what a restore could still read. The caller holds
    /// the exclusive lock.
    pub fn rebuild_index(&self) -> Result<RebuildReport> {
        let old = match self.index().all_entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("old index unreadable, nothing to salvage from it: {e}");
                Vec::new()
            }
        };
        let mut rep = RebuildReport::default();
        let mut readable = Vec::new();
        let mut unreadable = HashSet::new();
        for (c, _) in self.list_containers()? {
            match self.container_records(&c) {
                Ok(recs) => readable.push((c, recs)),
                Err(e) => {
                    tracing::warn!("container {c}: {e}");
                    unreadable.insert(c);
                }
            }
        }
        let mut salvage: std::collections::HashMap<ContainerId, Vec<(Digest, Location)>> =
            std::collections::HashMap::new();
        for (d, l) in old {
            if unreadable.contains(&l.container) {
                salvage.entry(l.container).or_default().push((d, l));
            }
        }
        let mut ix = self.index_mut();
        ix.clear()?;
        for (c, recs) in &readable {
            ix.add_container(*c, recs);
            rep.containers_read += 1;
        }
        drop(ix);
        for c in unreadable {
            // One read of the container; each entry's frame is decoded and re-hashed.
            let data = self.store.get(&container_key(&c)).unwrap_or_default();
            let kept: Vec<(Digest, Location)> = salvage
                .remove(&c)
                .unwrap_or_default()
                .into_iter()
                .filter(|(d, l)| {
                    let at = l.offset as usize;
                    data.get(at..at + l.stored_len as usize)
                        .is_some_and(|b| decode_blob(self.key_ref(), d, l, b).is_ok())
                })
                .collect();
            if kept.is_empty() {
                rep.containers_skipped += 1;
            } else {
                rep.containers_salvaged += 1;
                rep.segments_salvaged += kept.len();
                self.index_mut().add_locations(c, &kept);
            }
        }
        self.index_mut().flush()?;
        Ok(rep)
    }

    /// Where a blob lies, if the vault has it.
    pub fn locate(&self, d: &Digest) -> Result<Option<Location>> {
        self.with_index(|ix| ix.get(d))
    }

    /// Where blobs that must exist lie (a reader's lookups): when the index lacks any, it is
    /// refreshed from the store once (another process or vault service may have written
    /// them since it was read), and what is still missing is an error.
    pub fn locate_stored(&self, digests: &[Digest]) -> Result<Vec<Location>> {
        let mut found = self.locate_many(digests)?;
        if found.iter().any(Option::is_none) {
            let (added, _) = self.refresh_index()?;
            if added > 0 {
                found = self.locate_many(digests)?;
            }
        }
        found
            .into_iter()
            .zip(digests)
            .map(|(l, d)| l.ok_or(VaultError::MissingSegment(*d)))
            .collect()
    }

    /// Locations of many blobs (see [`Index::get_many`]).
    pub fn locate_many(&self, digests: &[Digest]) -> Result<Vec<Option<Location>>> {
        self.with_index(|ix| ix.get_many(digests))
    }

    /// Locations of blobs that a backup may reuse: a copy marked damaged counts as absent,
    /// so the backup stores the segment again (healing every snapshot that needs it); so
    /// does a copy in a container GC has condemned.
    pub fn locate_reusable(&self, digests: &[Digest]) -> Result<Vec<Option<Location>>> {
        let mut locs = self.locate_kept(digests)?;
        let marks = self.damaged.read().unwrap_or_else(|p| p.into_inner());
        if !marks.is_empty() {
            for (d, l) in digests.iter().zip(&mut locs) {
                if l.is_some_and(|l| marks.contains(&(*d, l.container, l.offset))) {
                    *l = None;
                }
            }
        }
        Ok(locs)
    }

    /// Every copy marked damaged, with where the index now locates its segment: the marked
    /// copy itself (not healed yet), another copy (healed; the marked one is garbage), or
    /// nowhere.
    pub fn marks_located(&self) -> Result<Vec<(Mark, Option<Location>)>> {
        let marks: Vec<Mark> = self
            .damaged
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        let digests: Vec<Digest> = marks.iter().map(|m| m.0).collect();
        let locs = self.locate_many(&digests)?;
        Ok(marks.into_iter().zip(locs).collect())
    }

    /// Digests whose indexed copy is marked damaged.
    pub fn damaged_segments(&self) -> Result<Vec<Digest>> {
        Ok(self
            .marks_located()?
            .into_iter()
            .filter(|(m, l)| l.is_some_and(|l| (l.container, l.offset) == (m.1, m.2)))
            .map(|(m, _)| m.0)
            .collect())
    }

    /// Marks segment copies as damaged, and persists the marks.
    pub fn mark_damaged(&self, marks: &[(Digest, Location)]) -> Result<()> {
        self.update_marks(|set| set.extend(marks.iter().map(|(d, l)| (*d, l.container, l.offset))))
    }

    /// Drops the marks of containers not in `keep` (GC: the containers it deleted).
    pub fn drop_marks_outside(&self, keep: &HashSet<ContainerId>) -> Result<()> {
        self.update_marks(|set| set.retain(|m| keep.contains(&m.1)))
    }

    /// Changes the marks with `f`, persisting them when they changed.
    fn update_marks(&self, f: impl FnOnce(&mut HashSet<Mark>)) -> Result<()> {
        let body = {
            let mut set = self.damaged.write().unwrap_or_else(|p| p.into_inner());
            let mut changed = set.clone();
            f(&mut changed);
            if changed == *set {
                return Ok(());
            }
            *set = changed;
            let mut list: Vec<Mark> = set.iter().copied().collect();
            list.sort();
            serde_json::to_vec(&list).expect("marks json")
        };
        self.store.put(&damaged_key(), &body)?;
        Ok(())
    }

    /// Reads and verifies one blob.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let loc = self.locate_stored(std::slice::from_ref(d))?[0];
        if let Some(b) = self
            .cached_node(&loc)
            .and_then(|c| decode_blob(self.key_ref(), d, &loc, &c).ok())
        {
            return Ok(b);
        }
        let bytes = self.store.get_range(
            &container_key(&loc.container),
            u64::from(loc.offset),
            u64::from(loc.stored_len),
        )?;
        let b = decode_blob(self.key_ref(), d, &loc, &bytes)
            .inspect_err(|_| self.note_damage(d, &loc))?;
        self.cache_node(&loc, &bytes);
        Ok(b)
    }

    /// Marks a copy a read found damaged (best effort: the read fails either way).
    pub(crate) fn note_damage(&self, d: &Digest, loc: &Location) {
        if let Err(e) = self.mark_damaged(&[(*d, *loc)]) {
            tracing::warn!("could not mark segment {d:?} damaged: {e}");
        }
    }

    /// The level of a tree node and the digests it refers to (data segments at level 0,
    /// child nodes above). A sealed node's references are read from its clear header
    /// (checked against its keyless checksum): this needs no key.
    pub fn node_refs(&self, d: &Digest) -> Result<(u8, Vec<Digest>)> {
        let loc = self.locate_stored(std::slice::from_ref(d))?[0];
        if !loc.codec.is_sealed() {
            let n = self.read_node(d)?;
            return Ok((n.level(), n.refs()));
        }
        if let Some(h) = self
            .cached_node(&loc)
            .and_then(|c| cairn_chunk::crypto::check_sealed(&c).ok())
        {
            return Ok((h.level, h.refs));
        }
        let stored = self.store.get_range(
            &container_key(&loc.container),
            u64::from(loc.offset),
            u64::from(loc.stored_len),
        )?;
        let h = cairn_chunk::crypto::check_sealed(&stored).map_err(|source| {
            self.note_damage(d, &loc);
            VaultError::Format {
                container: loc.container,
                source,
            }
        })?;
        self.cache_node(&loc, &stored);
        Ok((h.level, h.refs))
    }

    /// Reads and parses a recipe tree node.
    pub fn read_node(&self, d: &Digest) -> Result<Node> {
        let b = self.read_blob(d)?;
        Node::decode(&b).map_err(|e| VaultError::Corrupt(format!("tree node {d:?}: {e}")))
    }

    /// Every entry of a snapshot's recipe, in order. Reads the tree level by level, each level
    /// with one batched read (tree nodes of a backup sit together in its tree containers).
    pub fn entries(&self, s: &SnapshotManifest) -> Result<Vec<Entry>> {
        Ok(self.entries_and_nodes(s)?.0)
    }

    /// [`entries`](Self::entries), plus the digests of every tree node read on the way.
    pub fn entries_and_nodes(&self, s: &SnapshotManifest) -> Result<(Vec<Entry>, Vec<Digest>)> {
        walk_recipe(s, |d| self.read_many(d))
    }

    /// Every blob digest a snapshot reaches (tree nodes and data), for GC marking.
    pub fn reachable(&self, s: &SnapshotManifest, into: &mut HashSet<Digest>) -> Result<()> {
        self.reachable_from(&s.root.digest, into)
    }

    /// Every blob digest the tree rooted at `root` reaches.
    pub fn reachable_from(&self, root: &Digest, into: &mut HashSet<Digest>) -> Result<()> {
        let mut stack = vec![*root];
        while let Some(d) = stack.pop() {
            if !into.insert(d) {
                continue; // a shared subtree already marked
            }
            match self.node_refs(&d)? {
                (0, data) => into.extend(data),
                (_, children) => stack.extend(children),
            }
        }
        Ok(())
    }

    /// Deletes a snapshot's manifest (its data stays until GC) and its expired retention
    /// locks; a snapshot under a retention lock is refused ([`crate::retention`]).
    pub fn forget(&self, id: &SnapshotId) -> Result<()> {
        self.check_unlocked(id)?;
        let key = snapshot_key(id);
        self.store.release(&key)?;
        self.store.delete(&key)?;
        self.drop_retention(id)
    }

    /// Deletes a damaged manifest, named by the id of its object.
    pub fn forget_damaged(&self, file_id: &str) -> Result<()> {
        let key = Key::new(format!("snapshots/{file_id}.json"))
            .map_err(|_| VaultError::Invalid(format!("{file_id:?} is not a snapshot id")))?;
        if let Ok(id) = file_id.parse::<SnapshotId>() {
            self.check_unlocked(&id)?;
            self.store.release(&key)?;
            self.store.delete(&key)?;
            return self.drop_retention(&id);
        }
        Ok(self.store.delete(&key)?)
    }
}

/// Reads a snapshot's recipe tree level by level, each level with one batched `read` (tree
/// nodes of a backup sit together in its tree containers): its entries, in order, and the
/// digests of every node read on the way.
pub(crate) fn walk_recipe(
    s: &SnapshotManifest,
    read: impl Fn(&[Digest]) -> Result<Vec<Vec<u8>>>,
) -> Result<(Vec<Entry>, Vec<Digest>)> {
    let mut nodes = Vec::new();
    let mut level_digests = vec![s.root.digest];
    let mut level = s.root.level;
    loop {
        let blobs = read(&level_digests)?;
        nodes.extend_from_slice(&level_digests);
        let mut next = Vec::new();
        let mut out = Vec::new();
        for (d, b) in level_digests.iter().zip(blobs) {
            let node = Node::decode(&b)
                .map_err(|e| VaultError::Corrupt(format!("tree node {d:?}: {e}")))?;
            if node.level() != level {
                return Err(VaultError::Corrupt(format!(
                    "tree node {d:?}: level {} where {level} was expected",
                    node.level()
                )));
            }
            match node {
                Node::Leaf(e) => out.extend(e),
                Node::Inner { children, .. } => next.extend(children.iter().map(|c| c.digest)),
            }
        }
        if level == 0 {
            if out.len() as u64 != s.root.entries {
                return Err(VaultError::Corrupt(format!(
                    "snapshot {}: recipe has {} entries, manifest says {}",
                    s.id,
                    out.len(),
                    s.root.entries
                )));
            }
            return Ok((out, nodes));
        }
        level_digests = next;
        level -= 1;
    }
}

/// Decodes one segment from its stored frame.
pub(crate) fn decode_blob(
    keys: Option<&Keys>,
    d: &Digest,
    loc: &Location,
    stored: &[u8],
) -> Result<Vec<u8>> {
    codec::decode_member(keys, loc.codec, stored, loc.member(), d)
        .map_err(|e| segment_error(d, loc, e))
}

pub(crate) fn segment_error(
    d: &Digest,
    loc: &Location,
    source: cairn_chunk::CodecError,
) -> VaultError {
    VaultError::Segment {
        digest: *d,
        container: loc.container,
        offset: loc.offset,
        source,
    }
}
