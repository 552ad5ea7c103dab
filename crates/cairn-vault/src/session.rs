//! A backup session: the vault side of the fingerprint-first protocol.
//!
//! ```text
//! begin (shared lock) → lacking(digests)* → put_frame(frame)* → commit(root) → manifest visible
//! ```
//!
//! # Invariants
//!
//! - A blob is **durable** once the container holding it has been `put` to the store; it is
//!   **indexed** right after. A digest is reported as present only if it is indexed or sits in
//!   a container of this session (which `commit` makes durable before anything refers to it).
//! - `commit` seals and writes every open container, waits for the writer, checks that the
//!   tree below the root is complete (every new node's children exist), flushes the index and
//!   only then writes the manifest. A session dropped or killed before that leaves no
//!   snapshot; its durable containers are picked up by the next [`Repository::open`], so a
//!   retry does not send them again.
//! - Containers are written by one background thread, so chunking and hashing go on while a
//!   container is fsynced.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use cairn_chunk::container::ContainerBuilder;
use cairn_chunk::format::{BlobKind, CONTAINER_MAX_RECORDS, CONTAINER_TARGET_LEN};
use cairn_chunk::recipe::{Node, TreeRoot};
use cairn_chunk::{ChunkerParams, EncodedSegment, EntryKind};
use cairn_types::{ContainerId, Digest, SnapshotId};
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::error::{Result, VaultError};
use crate::lock::RepoLock;
use crate::manifest::{BackupStats, SnapshotManifest, now};
use crate::repo::{Repository, container_key, snapshot_key};

/// A data container at least this long is sealed early when the writer has nothing to do.
const EARLY_SEAL_LEN: usize = 4 << 20;

/// What a client says about the snapshot it commits.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CommitRequest {
    pub name: String,
    pub root: Option<TreeRoot>,
    pub chunker: Option<ChunkerParams>,
    pub parent: Option<SnapshotId>,
    /// Counters only the client knows (bytes read, segments, zero bytes, bytes sent).
    pub client_stats: BackupStats,
    pub labels: std::collections::BTreeMap<String, String>,
    /// A retention lock for the new snapshot (Unix seconds), raised to the repository's
    /// minimum when it has one ([`crate::retention`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_until: Option<u64>,
    /// Encrypted repository: the real name and labels, sealed by the client
    /// ([`crate::manifest::Private::seal`]); `name` is then their keyed tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
}

struct State {
    data: ContainerBuilder,
    tree: ContainerBuilder,
    in_flight: HashSet<Digest>,
    new_nodes: HashMap<Digest, Vec<u8>>,
    /// New sealed nodes (encrypted repository): their level and clear references, which is
    /// all a vault without the key sees of them.
    sealed_nodes: HashMap<Digest, (u8, Vec<Digest>)>,
    /// New sealed leaves whose data was all present when they were noted.
    checked_sealed: HashSet<Digest>,
    /// New leaves whose data was all present (indexed or in flight) when they were noted,
    /// with the bytes and entries each covers: `commit` need not look their data up again.
    /// (Present stays present: the session's shared lock keeps GC out, and a container the
    /// writer fails to write fails the commit.)
    checked_leaves: HashMap<Digest, (u64, u64)>,
    stats: BackupStats,
}

struct Shared {
    repo: Arc<Repository>,
    state: Mutex<State>,
    /// The background writer's failure: kind (out of space stays out of space) and message.
    error: Mutex<Option<(crate::store::StoreErrorKind, String, String)>>,
    stored: Mutex<u64>,
    /// Containers handed to the writer and not yet written.
    queued: std::sync::atomic::AtomicUsize,
    /// The buffer of the container stored last, for the next builder: a new container then
    /// fills memory that is already mapped rather than faulting in (and zeroing) up to
    /// 17 MiB of fresh pages.
    spare: Mutex<Option<Vec<u8>>>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A builder for the next container, on a spare buffer when there is one.
    fn builder(&self) -> ContainerBuilder {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        spare.map_or_else(ContainerBuilder::new, ContainerBuilder::with_buffer)
    }
}

/// An open backup session. See the module docs.
pub struct BackupSession {
    shared: Arc<Shared>,
    tx: Option<Sender<(ContainerId, ContainerBuilder)>>,
    writer: Option<JoinHandle<()>>,
    lock: Option<RepoLock>,
    started: Instant,
    /// When the session's lock was taken (Unix seconds): what GC compares with the time it
    /// condemned a container.
    began: u64,
}

impl std::fmt::Debug for BackupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSession").finish()
    }
}

fn writer_loop(shared: Arc<Shared>, rx: Receiver<(ContainerId, ContainerBuilder)>) {
    for (id, builder) in rx {
        // After a failure, drain without writing.
        if shared.error.lock().map(|e| e.is_none()).unwrap_or(false) {
            let buf = write_container(&shared, id, builder);
            *shared.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(buf);
        }
        shared.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes one sealed container and indexes it, or records the failure for the session.
/// Returns the container's buffer, for reuse.
fn write_container(shared: &Shared, id: ContainerId, builder: ContainerBuilder) -> Vec<u8> {
    let (bytes, records) = builder.finish();
    match shared.repo.store().put(&container_key(&id), &bytes) {
        Ok(()) => {
            shared
                .repo
                .index_mut()
                .add_container_preferred(id, &records);
            *shared.stored.lock().unwrap_or_else(|p| p.into_inner()) += bytes.len() as u64;
            let mut st = shared.state();
            for r in &records {
                st.in_flight.remove(&r.digest);
            }
        }
        Err(e) => {
            let msg = if e.kind == crate::store::StoreErrorKind::NoSpace {
                format!("vault out of space while writing container {id}: {e}")
            } else {
                format!("writing container {id}: {e}")
            };
            *shared.error.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((e.kind, e.key.clone(), msg));
        }
    }
    bytes
}

impl BackupSession {
    /// Opens a session under a shared repository lock.
    pub fn begin(repo: Arc<Repository>, purpose: &str) -> Result<Self> {
        let lock = RepoLock::acquire(repo.store().clone(), false, purpose)?;
        // The index now matches the store, and the containers a GC condemned are known:
        // this session never builds on them, so a GC may delete them while it runs.
        repo.refresh_index()?;
        let shared = Arc::new(Shared {
            repo,
            state: Mutex::new(State {
                data: ContainerBuilder::new(),
                tree: ContainerBuilder::new(),
                in_flight: HashSet::new(),
                new_nodes: HashMap::new(),
                sealed_nodes: HashMap::new(),
                checked_sealed: HashSet::new(),
                checked_leaves: HashMap::new(),
                stats: BackupStats::default(),
            }),
            error: Mutex::new(None),
            stored: Mutex::new(0),
            queued: std::sync::atomic::AtomicUsize::new(0),
            spare: Mutex::new(None),
        });
        let (tx, rx) = bounded(2);
        let s2 = shared.clone();
        let writer = std::thread::Builder::new()
            .name("cairn-container-writer".into())
            .spawn(move || writer_loop(s2, rx))
            .map_err(|e| VaultError::io("thread", "spawn container writer", e))?;
        Ok(Self {
            shared,
            tx: Some(tx),
            writer: Some(writer),
            began: lock.since(),
            lock: Some(lock),
            started: Instant::now(),
        })
    }

    pub fn repo(&self) -> &Arc<Repository> {
        &self.shared.repo
    }

    fn check_error(&self) -> Result<()> {
        match &*self.shared.error.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((kind, key, m)) => Err(VaultError::Store(crate::store::StoreError::new(
                *kind,
                key,
                m.clone(),
            ))),
            None => Ok(()),
        }
    }

    /// For each digest, true when the vault lacks it.
    pub fn lacking(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        self.check_error()?;
        let in_flight: Vec<bool> = {
            let st = self.shared.state();
            digests.iter().map(|d| st.in_flight.contains(d)).collect()
        };
        let found = self.shared.repo.locate_reusable(digests)?;
        Ok(in_flight
            .into_iter()
            .zip(found)
            .map(|(f, l)| !f && l.is_none())
            .collect())
    }

    /// Stores a frame of segments (fingerprint and plaintext length of each, in order) unless
    /// the vault has every one of them; returns whether it was stored. A frame with some
    /// members the vault has is stored whole: those members then have two copies, both valid.
    /// The caller vouches for the fingerprints.
    pub fn put_frame(
        &self,
        kind: BlobKind,
        members: &[(Digest, u32)],
        seg: &EncodedSegment,
    ) -> Result<bool> {
        self.check_error()?;
        if members.is_empty() || seg.bytes.is_empty() {
            // Containers name a frame by its offset: an empty one would share its successor's.
            return Err(VaultError::Invalid("an empty frame".into()));
        }
        if members.len() > CONTAINER_MAX_RECORDS {
            return Err(VaultError::Invalid(format!(
                "a frame of {} segments (at most {CONTAINER_MAX_RECORDS})",
                members.len()
            )));
        }
        let digests: Vec<Digest> = members.iter().map(|m| m.0).collect();
        let indexed = self.shared.repo.locate_reusable(&digests)?;
        let mut sealed = Vec::new();
        {
            let mut st = self.shared.state();
            let new: Vec<u32> = members
                .iter()
                .zip(&indexed)
                .filter(|((d, _), l)| l.is_none() && !st.in_flight.contains(d))
                .map(|((_, n), _)| *n)
                .collect();
            if new.is_empty() {
                return Ok(false);
            }
            st.in_flight.extend(digests);
            let builder = match kind {
                BlobKind::Data => {
                    st.stats.bytes_new += new.iter().map(|&n| u64::from(n)).sum::<u64>();
                    st.stats.segments_new += new.len() as u64;
                    &mut st.data
                }
                BlobKind::Tree => &mut st.tree,
            };
            // A container holds at most CONTAINER_MAX_RECORDS segments (what readers accept),
            // however small they are.
            if !builder.has_room(members.len()) {
                sealed.push(std::mem::replace(builder, self.shared.builder()));
            }
            builder.push_frame(kind, members, seg);
            // Full containers are sealed; so is a smaller one when the writer is idle, so
            // that little is left to write (and fsync) at commit.
            if builder.len() >= CONTAINER_TARGET_LEN
                || (kind == BlobKind::Data
                    && builder.len() >= EARLY_SEAL_LEN
                    && self.shared.queued.load(Ordering::Relaxed) == 0)
            {
                sealed.push(std::mem::replace(builder, self.shared.builder()));
            }
        }
        for b in sealed {
            self.send(b)?;
        }
        Ok(true)
    }

    /// Like [`put_frame`](Self::put_frame), but first decodes the frame and checks every
    /// member's fingerprint: for frames from untrusted clients. A tree node is a frame of its
    /// own.
    pub fn put_verified(
        &self,
        kind: BlobKind,
        members: &[(Digest, u32)],
        seg: &EncodedSegment,
    ) -> Result<bool> {
        let reject = |e: String| VaultError::Invalid(format!("rejected upload: {e}"));
        let total: u64 = members.iter().map(|m| u64::from(m.1)).sum();
        let (first, _) = *members
            .first()
            .ok_or_else(|| reject("no segments".into()))?;
        let frame_len =
            u32::try_from(total).map_err(|_| reject(format!("frame of {total} bytes")))?;
        if seg.codec.is_sealed() != self.shared.repo.is_encrypted() {
            return Err(reject(format!(
                "a {} frame in {} repository",
                if seg.codec.is_sealed() {
                    "sealed"
                } else {
                    "clear"
                },
                if self.shared.repo.is_encrypted() {
                    "an encrypted"
                } else {
                    "a clear"
                }
            )));
        }
        if seg.codec.is_sealed() {
            // Without the key only the ciphertext's layout and checksum can be checked (the
            // client that sealed it checks its fingerprints on every read).
            let h =
                cairn_chunk::crypto::check_sealed(&seg.bytes).map_err(|e| reject(e.to_string()))?;
            match kind {
                BlobKind::Tree if members.len() != 1 => {
                    return Err(reject("a tree node must be a frame of its own".into()));
                }
                BlobKind::Tree => {
                    self.note_sealed(&[(first, h.level, h.refs)])?;
                }
                BlobKind::Data if !h.refs.is_empty() => {
                    return Err(reject("a data frame with references".into()));
                }
                BlobKind::Data => {}
            }
            return self.put_frame(kind, members, seg);
        }
        let plain = cairn_chunk::codec::decode_frame(
            None,
            seg.codec,
            &seg.bytes,
            frame_len as usize,
            &first,
        )
        .map_err(|e| reject(e.to_string()))?;
        let mut inner = 0;
        for &(d, n) in members {
            let m = cairn_chunk::Member {
                frame_len,
                inner,
                raw_len: n,
            };
            cairn_chunk::codec::member_of(None, &plain, m, &d)
                .map_err(|e| reject(e.to_string()))?;
            inner += n;
        }
        if kind == BlobKind::Tree {
            if members.len() != 1 {
                return Err(reject("a tree node must be a frame of its own".into()));
            }
            Node::decode(&plain)
                .map_err(|e| VaultError::Invalid(format!("rejected tree node {first:?}: {e}")))?;
            self.shared.state().new_nodes.insert(first, plain);
        }
        self.put_frame(kind, members, seg)
    }

    /// Records uploaded tree nodes (digest, encoded node, plaintext length) so that `commit`
    /// can check the tree below them. The data of new leaves is looked up now, while the
    /// backup is still running, rather than all at once at commit.
    pub fn note_nodes(&self, nodes: &[(Digest, &EncodedSegment, u32)]) -> Result<()> {
        if nodes.iter().any(|n| n.1.codec.is_sealed()) {
            let sealed = nodes
                .iter()
                .map(|&(d, seg, _)| {
                    let h = cairn_chunk::crypto::check_sealed(&seg.bytes)
                        .map_err(|e| VaultError::Invalid(format!("tree node {d:?}: {e}")))?;
                    Ok((d, h.level, h.refs))
                })
                .collect::<Result<Vec<_>>>()?;
            return self.note_sealed(&sealed);
        }
        let mut leaves: Vec<(Digest, u64, u64, std::ops::Range<usize>)> = Vec::new();
        let mut data: Vec<Digest> = Vec::new();
        let mut plains = Vec::with_capacity(nodes.len());
        for &(digest, seg, raw_len) in nodes {
            let plain =
                cairn_chunk::codec::decode(None, seg.codec, &seg.bytes, raw_len as usize, &digest)
                    .map_err(|e| VaultError::Invalid(format!("tree node {digest:?}: {e}")))?;
            // A node that does not decode is left to `commit`, which refuses it.
            if let Ok(Node::Leaf(es)) = Node::decode(&plain) {
                let from = data.len();
                data.extend(
                    es.iter()
                        .filter(|e| e.kind == EntryKind::Data)
                        .map(|e| e.digest),
                );
                let span = es.iter().map(|e| u64::from(e.len)).sum();
                leaves.push((digest, span, es.len() as u64, from..data.len()));
            }
            plains.push((digest, plain));
        }
        let in_flight: Vec<bool> = {
            let st = self.shared.state();
            data.iter().map(|d| st.in_flight.contains(d)).collect()
        };
        let present = present(&self.shared.repo, self.began, &data, &in_flight)?;
        let mut st = self.shared.state();
        for (digest, span, count, r) in leaves {
            if present[r].iter().all(|&p| p) {
                st.checked_leaves.insert(digest, (span, count));
            }
        }
        st.new_nodes.extend(plains);
        Ok(())
    }

    /// Records sealed tree nodes (digest, level, clear references); the data of new leaves is
    /// looked up now, as for clear ones.
    fn note_sealed(&self, nodes: &[(Digest, u8, Vec<Digest>)]) -> Result<()> {
        let data: Vec<Digest> = nodes
            .iter()
            .filter(|n| n.1 == 0)
            .flat_map(|n| n.2.iter().copied())
            .collect();
        let in_flight: Vec<bool> = {
            let st = self.shared.state();
            data.iter().map(|d| st.in_flight.contains(d)).collect()
        };
        let present = present(&self.shared.repo, self.began, &data, &in_flight)?;
        let mut at = 0;
        let mut st = self.shared.state();
        for (d, level, refs) in nodes {
            if *level == 0 {
                if present[at..at + refs.len()].iter().all(|&p| p) {
                    st.checked_sealed.insert(*d);
                }
                at += refs.len();
            }
            st.sealed_nodes.insert(*d, (*level, refs.clone()));
        }
        Ok(())
    }

    fn send(&self, b: ContainerBuilder) -> Result<()> {
        if b.is_empty() {
            return Ok(());
        }
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        self.tx
            .as_ref()
            .expect("open session")
            .send((ContainerId::random(), b))
            .map_err(|_| VaultError::Invalid("container writer stopped".into()))
    }

    /// Hands the open containers to the writer and closes its queue; [`Self::drain`] then
    /// waits for it.
    fn seal_all(&mut self) -> Result<()> {
        let (data, tree) = {
            let mut st = self.shared.state();
            (std::mem::take(&mut st.data), std::mem::take(&mut st.tree))
        };
        // Data before tree nodes: a node never becomes durable before what it refers to.
        self.send(data)?;
        self.send(tree)?;
        drop(self.tx.take());
        Ok(())
    }

    /// Waits until every container is durable (or the writer failed).
    fn drain(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        self.check_error()
    }

    /// Makes everything durable, checks the tree, and publishes the snapshot.
    pub fn commit(mut self, req: CommitRequest) -> Result<SnapshotManifest> {
        let root = req
            .root
            .ok_or_else(|| VaultError::Invalid("commit without a root".into()))?;
        if req.name.is_empty() || req.name.len() > 200 || req.name.chars().any(|c| c.is_control()) {
            return Err(VaultError::Invalid(
                "snapshot name must be 1..200 printable characters".into(),
            ));
        }
        let t0 = Instant::now();
        // The tree is checked while the writer makes the last containers durable: what it
        // still holds counts as present (in flight), and nothing is published unless it
        // then succeeds.
        self.seal_all()?;
        self.check_tree(&root)?;
        let t_check = t0.elapsed();
        self.drain()?;
        let t_drain = t0.elapsed();
        let index_bytes = self.shared.repo.index_mut().flush()?;
        tracing::debug!(
            "commit: tree checked {t_check:?}, containers durable {t_drain:?}, index flushed {:?}",
            t0.elapsed()
        );
        let st = self.shared.state();
        let mut stats = req.client_stats;
        stats.bytes_new = st.stats.bytes_new;
        stats.segments_new = st.stats.segments_new;
        stats.segments = stats.segments.max(root.entries);
        drop(st);
        let containers = *self.shared.stored.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = SnapshotManifest {
            id: SnapshotId::random(),
            name: req.name,
            created: now(),
            created_ms: crate::manifest::now_ms(),
            size: root.size,
            root,
            chunker: req.chunker.unwrap_or(self.shared.repo.config().chunker),
            parent: req.parent,
            stats,
            labels: req.labels,
            sealed: req.sealed,
            checksum: None,
        };
        m.stats.duration_ms = m
            .stats
            .duration_ms
            .max(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX));
        // The manifest's own size is part of what the repository grew by.
        let guess = m.to_stored().len() as u64 + 80;
        m.stats.bytes_stored = containers + index_bytes + guess;
        m.seal();
        let body = m.to_stored();
        // The lock is written before the manifest: a snapshot is never visible unlocked
        // when it should be locked (a lock object whose manifest never came is inert).
        let lock_until = self.shared.repo.lock_for_new(req.lock_until)?;
        if let Some(until) = lock_until {
            self.shared.repo.write_lock(&m.id, until)?;
        }
        cairn_types::fault::point("vault.commit.before_manifest");
        self.shared
            .repo
            .store()
            .put_new(&snapshot_key(&m.id), &body)?;
        if let Some(until) = lock_until {
            self.shared.repo.protect_new(&m.id, until);
        }
        if let Some(l) = self.lock.take() {
            l.release()?;
        }
        Ok(m)
    }

    /// Checks that every node this session added has all its children, down to data.
    fn check_tree(&self, root: &TreeRoot) -> Result<()> {
        let st = self.shared.state();
        let repo = &self.shared.repo;
        let began = self.began;
        let exists = |d: &Digest| -> Result<bool> {
            Ok(st.new_nodes.contains_key(d)
                || st.sealed_nodes.contains_key(d)
                || repo.locate_for_session(std::slice::from_ref(d), began)?[0].is_some())
        };
        if !exists(&root.digest)? {
            return Err(VaultError::Invalid(format!(
                "root node {:?} was never uploaded",
                root.digest
            )));
        }
        let t0 = Instant::now();
        let mut stack = vec![(root.digest, root.level, root.size, root.entries)];
        // Data referenced by new leaves, checked in one batch (most of it is the parent's).
        let mut leaf_data: Vec<Digest> = Vec::new();
        while let Some((d, level, span, count)) = stack.pop() {
            if let (0, Some(&got)) = (level, st.checked_leaves.get(&d)) {
                // A new leaf whose data was found when it was uploaded.
                if got != (span, count) {
                    return Err(VaultError::Invalid(format!(
                        "tree node {d:?} covers {} bytes / {} entries, parent says {span} / {count}",
                        got.0, got.1
                    )));
                }
                continue;
            }
            if let Some((got, refs)) = st.sealed_nodes.get(&d) {
                // Sealed: only the references can be checked without the key.
                if *got != level {
                    return Err(VaultError::Invalid(format!(
                        "tree node {d:?} has level {got}, expected {level}"
                    )));
                }
                if level == 0 {
                    if !st.checked_sealed.contains(&d) {
                        leaf_data.extend_from_slice(refs);
                    }
                    continue;
                }
                for c in refs {
                    if !exists(c)? {
                        return Err(VaultError::Invalid(format!(
                            "tree node {c:?} referenced but never uploaded"
                        )));
                    }
                    stack.push((*c, level - 1, span, count));
                }
                continue;
            }
            let Some(bytes) = st.new_nodes.get(&d) else {
                continue;
            }; // pre-existing: complete
            let node = Node::decode(bytes)
                .map_err(|e| VaultError::Invalid(format!("tree node {d:?}: {e}")))?;
            if node.level() != level {
                return Err(VaultError::Invalid(format!(
                    "tree node {d:?} has level {}, expected {level}",
                    node.level()
                )));
            }
            let (got_span, got_count) = match &node {
                Node::Leaf(es) => {
                    leaf_data.extend(
                        es.iter()
                            .filter(|e| e.kind == EntryKind::Data)
                            .map(|e| e.digest),
                    );
                    (
                        es.iter().map(|e| u64::from(e.len)).sum::<u64>(),
                        es.len() as u64,
                    )
                }
                Node::Inner { children, .. } => {
                    for c in children {
                        if !exists(&c.digest)? {
                            return Err(VaultError::Invalid(format!(
                                "tree node {:?} referenced but never uploaded",
                                c.digest
                            )));
                        }
                        stack.push((c.digest, level - 1, c.span_bytes, c.span_entries));
                    }
                    (
                        children.iter().map(|c| c.span_bytes).sum(),
                        children.iter().map(|c| c.span_entries).sum(),
                    )
                }
            };
            if got_span != span || got_count != count {
                return Err(VaultError::Invalid(format!(
                    "tree node {d:?} covers {got_span} bytes / {got_count} entries, parent says {span} / {count}"
                )));
            }
        }
        let walked = t0.elapsed();
        let in_flight: Vec<bool> = leaf_data.iter().map(|d| st.in_flight.contains(d)).collect();
        let present = present(repo, self.began, &leaf_data, &in_flight)?;
        tracing::debug!(
            "tree check: nodes walked in {walked:?}; {} segments referenced by leaves not checked on upload, looked up in {:?}",
            leaf_data.len(),
            t0.elapsed() - walked
        );
        if let Some((d, _)) = leaf_data.iter().zip(&present).find(|(_, p)| !**p) {
            return Err(VaultError::Invalid(format!(
                "segment {d:?} referenced but never uploaded"
            )));
        }
        Ok(())
    }
}

/// Which of `digests` are stored or on their way: flagged `in_flight` (handed to the writer,
/// not yet indexed) or found in `index` where a session begun at `began` may use them.
/// Callers read the flags first: the writer indexes a container before it forgets its
/// segments, so a segment is always in one or the other. Tens of thousands of lookups (an
/// incremental's leaves are mostly the parent's segments) use two threads.
fn present(
    repo: &Repository,
    began: u64,
    digests: &[Digest],
    in_flight: &[bool],
) -> Result<Vec<bool>> {
    let ask: Vec<Digest> = digests
        .iter()
        .zip(in_flight)
        .filter(|(_, f)| !**f)
        .map(|(d, _)| *d)
        .collect();
    let found = if ask.len() >= 16 << 10 {
        let (a, b) = ask.split_at(ask.len() / 2);
        std::thread::scope(|sc| -> Result<Vec<_>> {
            let second = sc.spawn(|| repo.locate_for_session(b, began));
            let mut found = repo.locate_for_session(a, began)?;
            found.extend(second.join().expect("index lookup thread")?);
            Ok(found)
        })?
    } else {
        repo.locate_for_session(&ask, began)?
    };
    let mut answers = found.iter();
    Ok(in_flight
        .iter()
        .map(|&f| f || answers.next().is_some_and(|l| l.is_some()))
        .collect())
}

impl Drop for BackupSession {
    fn drop(&mut self) {
        // An uncommitted session: let the writer finish what it has (durable, unreferenced
        // containers are reused by a retry and swept by GC), publish nothing.
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let _ = self.shared.repo.index_mut().flush();
    }
}
