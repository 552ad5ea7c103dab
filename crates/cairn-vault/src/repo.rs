//! The repository: one object store holding containers, snapshot manifests, locks and the
//! config, plus the local index cache.
//!
//! ```text
//! config                         RepoConfig (JSON)
//! containers/<2 hex>/<32 hex>    containers (see cairn_chunk::container)
//! snapshots/<32 hex>.json        SnapshotManifest: a snapshot exists iff this exists
//! locks/<16 hex>.json            RepoLock
//! index/   (local directory)     the fingerprint index cache (see crate::index)
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cairn_chunk::container::{self, Record};
use cairn_chunk::format::CONTAINER_FOOTER_LEN;
use cairn_chunk::recipe::Node;
use cairn_chunk::{ChunkerParams, Entry, FrameCache, codec};
use cairn_types::{ContainerId, Digest, SnapshotId};

use crate::error::{Result, VaultError};
use crate::index::{Index, Location};
use crate::manifest::{REPO_VERSION, RepoConfig, SnapshotManifest, now};
use crate::store::{Key, LocalStore, ObjectStore, StoreErrorKind};

/// An open repository. Cheap to share (`Arc`); all methods take `&self`.
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    config: RepoConfig,
    index: RwLock<Index>,
    cache_dir: PathBuf,
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
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            chunker: ChunkerParams::default(),
            compression: DEFAULT_COMPRESSION,
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

impl Repository {
    /// Creates a repository in an empty store.
    pub fn init(
        store: Arc<dyn ObjectStore>,
        cache_dir: &Path,
        opts: &InitOptions,
    ) -> Result<Arc<Self>> {
        opts.chunker.validate().map_err(VaultError::Invalid)?;
        let config = RepoConfig {
            version: REPO_VERSION,
            id: hex::encode(rand::random::<[u8; 16]>()),
            chunker: opts.chunker,
            compression: opts.compression,
            created: now(),
        };
        let body = serde_json::to_vec_pretty(&config).expect("config json");
        store
            .put_new(&config_key(), &body)
            .map_err(|e| match e.kind {
                StoreErrorKind::AlreadyExists => {
                    VaultError::Invalid(format!("{} already holds a repository", store.location()))
                }
                _ => e.into(),
            })?;
        Self::open(store, cache_dir)
    }

    /// Opens a repository and brings the index up to date with the containers in the store.
    pub fn open(store: Arc<dyn ObjectStore>, cache_dir: &Path) -> Result<Arc<Self>> {
        let raw = store.get(&config_key()).map_err(|e| match e.kind {
            StoreErrorKind::NotFound => {
                VaultError::NotARepository(format!("no config in {}", store.location()))
            }
            _ => e.into(),
        })?;
        let config: RepoConfig = serde_json::from_slice(&raw)
            .map_err(|e| VaultError::NotARepository(format!("unreadable config: {e}")))?;
        if config.version != REPO_VERSION {
            return Err(VaultError::NotARepository(format!(
                "unsupported repository version {}",
                config.version
            )));
        }
        let index = Index::open(&cache_dir.join("index"))?;
        let repo = Arc::new(Self {
            store,
            config,
            index: RwLock::new(index),
            cache_dir: cache_dir.to_path_buf(),
        });
        repo.sync_index()?;
        Ok(repo)
    }

    /// A repository in a local directory (index cache inside it).
    pub fn open_dir(dir: &Path) -> Result<Arc<Self>> {
        if !dir.join("config").exists() {
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
            .store
            .list("containers")?
            .into_iter()
            .filter_map(|m| {
                let name = m.key.as_str().rsplit('/').next()?;
                Some((name.parse().ok()?, m.size))
            })
            .collect())
    }

    /// Reads a container's trailer (footer first, then the records).
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
        container::parse_trailer(&trailer, &footer).map_err(fmt)
    }

    /// Adds containers no index run covers (left by interrupted backups) to the index.
    /// Returns how many were added. Unreadable containers are skipped with a warning.
    pub fn sync_index(&self) -> Result<usize> {
        let all = self.list_containers()?;
        let missing: Vec<ContainerId> = {
            let ix = self.index();
            all.iter()
                .map(|(c, _)| *c)
                .filter(|c| !ix.covers(c))
                .collect()
        };
        if missing.is_empty() {
            return Ok(0);
        }
        let mut added = 0;
        for c in &missing {
            match self.container_records(c) {
                Ok(recs) => {
                    self.index_mut().add_container(*c, &recs);
                    added += 1;
                }
                Err(e) => tracing::warn!("skipping unreadable container {c}: {e}"),
            }
        }
        self.index_mut().flush()?;
        Ok(added)
    }

    /// Where a blob lies, if the vault has it.
    pub fn locate(&self, d: &Digest) -> Result<Option<Location>> {
        self.index().get(d)
    }

    /// Reads and verifies one blob.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let loc = self.locate(d)?.ok_or(VaultError::MissingSegment(*d))?;
        let bytes = self.store.get_range(
            &container_key(&loc.container),
            u64::from(loc.offset),
            u64::from(loc.stored_len),
        )?;
        decode_blob(d, &loc, &bytes)
    }

    /// Reads and verifies many blobs, in order, merging reads of neighbouring blobs of one
    /// container into one range read (restores read whole runs of a container at once).
    /// Each frame is decoded once for a run of its members.
    pub fn read_many(&self, digests: &[Digest]) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(digests.len());
        let mut frames = FrameCache::new();
        self.for_each_stored(digests, |i, loc, stored| {
            let plain = frames
                .member(
                    (loc.container, loc.offset),
                    loc.codec,
                    stored,
                    loc.member(),
                    &digests[i],
                )
                .map_err(|e| segment_error(&digests[i], loc, e))?;
            out.push(plain);
            Ok(())
        })?;
        Ok(out)
    }

    /// The stored (still encoded) frames of segments, with their locations, for sending to
    /// a client that verifies them itself; `None` where the frame is the previous one's.
    /// Reads like [`read_many`](Self::read_many).
    pub fn read_many_raw(&self, digests: &[Digest]) -> Result<Vec<(Location, Option<Vec<u8>>)>> {
        let mut out: Vec<(Location, Option<Vec<u8>>)> = Vec::with_capacity(digests.len());
        self.for_each_stored(digests, |_, loc, stored| {
            let same = out.last().is_some_and(|(l, _)| {
                (l.container, l.offset) == (loc.container, loc.offset) && !loc.member().is_whole()
            });
            out.push((*loc, (!same).then(|| stored.to_vec())));
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f(i, location, stored bytes)` for every digest, in order, reading neighbouring
    /// blobs of one container (at most 256 KiB apart, 32 MiB per read) with one range read.
    fn for_each_stored(
        &self,
        digests: &[Digest],
        mut f: impl FnMut(usize, &Location, &[u8]) -> Result<()>,
    ) -> Result<()> {
        const GAP: u64 = 256 << 10;
        const MAX_READ: u64 = 32 << 20;
        let locs: Vec<Location> = self
            .index()
            .get_many(digests)?
            .into_iter()
            .zip(digests)
            .map(|(l, d)| l.ok_or(VaultError::MissingSegment(*d)))
            .collect::<Result<_>>()?;
        let mut i = 0;
        while i < locs.len() {
            let first = locs[i];
            let start = u64::from(first.offset);
            let mut end = start + u64::from(first.stored_len);
            let mut j = i + 1;
            while j < locs.len()
                && locs[j].container == first.container
                && u64::from(locs[j].offset) >= start
                && u64::from(locs[j].offset) <= end + GAP
                && u64::from(locs[j].offset) + u64::from(locs[j].stored_len) - start <= MAX_READ
            {
                end = end.max(u64::from(locs[j].offset) + u64::from(locs[j].stored_len));
                j += 1;
            }
            let buf = self
                .store
                .get_range(&container_key(&first.container), start, end - start)?;
            for (k, loc) in locs.iter().enumerate().take(j).skip(i) {
                let o = (u64::from(loc.offset) - start) as usize;
                f(k, loc, &buf[o..o + loc.stored_len as usize])?;
            }
            i = j;
        }
        Ok(())
    }

    /// Reads and parses a recipe tree node.
    pub fn read_node(&self, d: &Digest) -> Result<Node> {
        let b = self.read_blob(d)?;
        Node::decode(&b).map_err(|e| VaultError::Corrupt(format!("tree node {d:?}: {e}")))
    }

    /// Every committed snapshot, oldest first. Unreadable manifests are reported as errors.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotManifest>> {
        let mut out = Vec::new();
        for m in self.store.list("snapshots")? {
            if !m.key.as_str().ends_with(".json") {
                continue;
            }
            let b = self.store.get(&m.key)?;
            let s: SnapshotManifest = serde_json::from_slice(&b)
                .map_err(|e| VaultError::Corrupt(format!("manifest {}: {e}", m.key)))?;
            out.push(s);
        }
        out.sort_by(|a, b| {
            (a.created, a.created_ms, &a.name, a.id).cmp(&(b.created, b.created_ms, &b.name, b.id))
        });
        Ok(out)
    }

    /// Finds a snapshot by id, unique id prefix (at least 6 digits), or name (the newest with
    /// that name).
    pub fn find_snapshot(&self, spec: &str) -> Result<SnapshotManifest> {
        let all = self.list_snapshots()?;
        find_in(&all, spec)
    }

    /// Every entry of a snapshot's recipe, in order. Reads the tree level by level, each level
    /// with one batched read (tree nodes of a backup sit together in its tree containers).
    pub fn entries(&self, s: &SnapshotManifest) -> Result<Vec<Entry>> {
        Ok(self.entries_and_nodes(s)?.0)
    }

    /// [`entries`](Self::entries), plus the digests of every tree node read on the way.
    pub fn entries_and_nodes(&self, s: &SnapshotManifest) -> Result<(Vec<Entry>, Vec<Digest>)> {
        let mut nodes = Vec::new();
        let mut level_digests = vec![s.root.digest];
        let mut level = s.root.level;
        loop {
            let blobs = self.read_many(&level_digests)?;
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

    /// Every blob digest a snapshot reaches (tree nodes and data), for GC marking.
    pub fn reachable(&self, s: &SnapshotManifest, into: &mut HashSet<Digest>) -> Result<()> {
        let mut stack = vec![s.root.digest];
        while let Some(d) = stack.pop() {
            if !into.insert(d) {
                continue; // a shared subtree already marked
            }
            match self.read_node(&d)? {
                Node::Leaf(es) => {
                    for e in es {
                        if e.kind == cairn_chunk::EntryKind::Data {
                            into.insert(e.digest);
                        }
                    }
                }
                Node::Inner { children, .. } => stack.extend(children.iter().map(|c| c.digest)),
            }
        }
        Ok(())
    }

    /// Deletes a snapshot's manifest (its data stays until GC).
    pub fn forget(&self, id: &SnapshotId) -> Result<()> {
        Ok(self.store.delete(&snapshot_key(id))?)
    }
}

/// Decodes one segment from its stored frame.
pub(crate) fn decode_blob(d: &Digest, loc: &Location, stored: &[u8]) -> Result<Vec<u8>> {
    codec::decode_member(loc.codec, stored, loc.member(), d).map_err(|e| segment_error(d, loc, e))
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

pub(crate) fn find_in(all: &[SnapshotManifest], spec: &str) -> Result<SnapshotManifest> {
    if let Ok(id) = spec.parse::<SnapshotId>()
        && let Some(s) = all.iter().find(|s| s.id == id)
    {
        return Ok(s.clone());
    }
    if let Some(s) = all.iter().rev().find(|s| s.name == spec) {
        return Ok(s.clone());
    }
    if spec.len() >= 6 && spec.chars().all(|c| c.is_ascii_hexdigit()) {
        let hits: Vec<_> = all
            .iter()
            .filter(|s| s.id.to_hex().starts_with(&spec.to_ascii_lowercase()))
            .collect();
        match hits.len() {
            1 => return Ok(hits[0].clone()),
            n if n > 1 => {
                return Err(VaultError::Invalid(format!(
                    "snapshot prefix {spec:?} is ambiguous ({n} matches)"
                )));
            }
            _ => {}
        }
    }
    Err(VaultError::SnapshotNotFound(spec.to_string()))
}
