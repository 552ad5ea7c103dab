//! Backup and restore of disk images against any [`Vault`]: the client side of the
//! fingerprint-first protocol, used by the CLI and the storage agent.
//!
//! **Full backup**: a reader thread cuts the image into segments; worker threads fingerprint
//! them, ask the vault which it lacks, compress only those and upload them; the main thread
//! puts the entries in order, builds the recipe tree and commits.
//!
//! **Incremental backup** (`parent` + changed extents): only the changed extents are read, each
//! widened to the parent's segment boundary before it and re-chunked until a cut point falls
//! back on one of the parent's boundaries; every other entry is the parent's. The result is a
//! synthetic full: a complete recipe that shares all unchanged tree nodes with the parent.
//! Three threads share the work: a helper hints readahead of every region up front (scattered
//! reads are latency-bound), the walk reads each region only as far as the chunker needs
//! ([`Chunker::cut_prefix`]) and cuts it, and a worker hashes, dedups, compresses and uploads
//! the new segments in batches while the walk goes on.
//!
//! **Restore**: the recipe is split into batches that worker threads fetch (verified against
//! their digests) and write with positional writes; zero entries are left as holes. The output
//! is written under a temporary name and renamed only when complete, so a failed restore never
//! leaves a plausible-looking wrong image.
//!
//! This file holds the shared parts and the full backup; `incremental.rs` the walk of changed
//! regions, `restore.rs` the restore.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cairn_chunk::format::{BlobKind, FRAME_TARGET_LEN};
use cairn_chunk::recipe::Node;
use cairn_chunk::recipe::{TreeBuilder, TreeRoot};
use cairn_chunk::{
    Chunker, ChunkerParams, EncodedSegment, Encoder, Entry, EntryKind, Keys, fingerprint_with,
    is_zero,
};
use cairn_types::{Digest, Extent, ExtentList, ReadAt, SnapshotId};

use crate::api::{Upload, Vault, VaultSession};
use crate::error::{Result, VaultError};
use crate::manifest::{BackupStats, SnapshotManifest};
use crate::session::CommitRequest;

mod incremental;
mod restore;

use incremental::incremental;

pub use restore::{PARTIAL_SUFFIX, RestoreOptions, RestoreStats, partial_path, restore};

/// How a backup encodes what it uploads: the repository's zstd level and, for an encrypted
/// repository, the keys that fingerprint and seal (the vault never sees them).
#[derive(Clone, Debug)]
pub(crate) struct Coding {
    pub level: i32,
    pub keys: Option<std::sync::Arc<Keys>>,
}

impl Coding {
    /// An encoder for data frames.
    pub fn encoder(&self) -> Encoder {
        Encoder::sealing(self.level, self.keys.clone())
    }

    /// An encoder for tree nodes (level 1: they are small and compress well).
    pub fn node_encoder(&self) -> Encoder {
        Encoder::sealing(1, self.keys.clone())
    }

    /// A tree builder whose node digests are this repository's fingerprints.
    pub fn tree<F: FnMut(Digest, Vec<u8>)>(&self, sink: F) -> TreeBuilder<F> {
        TreeBuilder::keyed(self.keys.clone(), sink)
    }
}

/// Progress reports; implementations must be cheap (called per batch).
pub trait Progress: Send + Sync {
    /// `done` of `total` bytes processed.
    fn update(&self, done: u64, total: u64);
}

/// No progress reporting.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _: u64, _: u64) {}
}

/// Options of one image backup (shared by CLI, API and config).
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub name: String,
    /// Snapshot spec (id, prefix or name) of the parent.
    pub parent: Option<String>,
    /// Regions that may differ from the parent; requires `parent`.
    pub changed: Option<ExtentList>,
    /// The parent's recipe, when the caller has already read it (the storage agent reads it
    /// while it asks the change tracker). Used only if it is the recipe of `parent`.
    pub parent_recipe: Option<std::sync::Arc<ParentRecipe>>,
    /// Overrides the repository's default segmentation (full backups only).
    pub chunker: Option<ChunkerParams>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// A retention lock for the snapshot (Unix seconds; see [`crate::retention`]).
    pub lock_until: Option<u64>,
}

/// A snapshot's recipe as an incremental needs it: its entries and the digests of its tree
/// nodes (nodes the vault therefore has).
#[derive(Debug)]
pub struct ParentRecipe {
    pub snapshot: SnapshotId,
    pub entries: Vec<Entry>,
    pub nodes: Vec<Digest>,
}

impl ParentRecipe {
    /// Reads the recipe of `parent` from `vault`.
    pub fn read(vault: &dyn Vault, parent: &SnapshotManifest) -> Result<Self> {
        let (entries, nodes) = vault.entries_and_nodes(parent)?;
        Ok(Self {
            snapshot: parent.id,
            entries,
            nodes,
        })
    }
}

const BATCH_BYTES: usize = 4 << 20;

fn source_err(e: std::io::Error, offset: u64) -> VaultError {
    VaultError::io(format!("source image at offset {offset}"), "read", e)
}

/// The length of a segment or tree node as a recipe and upload carry it.
fn seg_len(n: usize) -> u32 {
    #[allow(clippy::cast_possible_truncation)] // at most the chunker's max (a u32) or a tree node
    let n32 = n as u32;
    n32
}

/// Fills `buf` (already zeroed) from `source` at `off`, reading only the data ranges of a
/// sparse source: holes are not read at all.
fn read_sparse(source: &dyn ReadAt, buf: &mut [u8], off: u64) -> Result<()> {
    match source.data_ranges(off, buf.len() as u64) {
        Some(ranges) => {
            for r in ranges {
                // data_ranges returns ranges within [off, off + buf.len()): indexes into buf.
                #[allow(clippy::cast_possible_truncation)]
                let (a, b) = ((r.offset - off) as usize, (r.end() - off) as usize);
                source
                    .read_exact_at(&mut buf[a..b], r.offset)
                    .map_err(|e| source_err(e, r.offset))?;
            }
            Ok(())
        }
        None => source
            .read_exact_at(buf, off)
            .map_err(|e| source_err(e, off)),
    }
}

/// Hashes, dedups against the vault, compresses and uploads one batch; returns its entries.
fn process_batch(
    session: &dyn VaultSession,
    enc: &mut Encoder,
    data: &[u8],
    cuts: &[usize],
    sent: &AtomicU64,
    split: bool,
) -> Result<Vec<Entry>> {
    // Segment i spans data[offsets[i]..offsets[i] + cuts[i]].
    let offsets: Vec<usize> = cuts
        .iter()
        .scan(0usize, |p, &n| {
            let at = *p;
            *p += n;
            Some(at)
        })
        .collect();
    let keys = enc.keys().cloned();
    let hash = |range: std::ops::Range<usize>| -> Vec<Entry> {
        range
            .map(|i| {
                let piece = &data[offsets[i]..offsets[i] + cuts[i]];
                #[allow(clippy::cast_possible_truncation)] // at most the chunker's max, a u32
                let n = cuts[i] as u32;
                if is_zero(piece) {
                    Entry::zero(n)
                } else {
                    Entry::data(fingerprint_with(keys.as_deref(), piece), n)
                }
            })
            .collect()
    };
    let entries: Vec<Entry> = if split && cuts.len() >= 64 {
        // A helper thread hashes half: for callers whose batches are not already parallel.
        let mid = cuts.len() / 2;
        std::thread::scope(|sc| {
            let h = sc.spawn(|| hash(mid..cuts.len()));
            let mut first = hash(0..mid);
            first.extend(h.join().expect("hashing thread"));
            first
        })
    } else {
        hash(0..cuts.len())
    };
    let mut want: Vec<(Digest, usize, usize)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut pos = 0;
    for (e, &n) in entries.iter().zip(cuts) {
        if e.kind == EntryKind::Data && seen.insert(e.digest) {
            want.push((e.digest, pos, n));
        }
        pos += n;
    }
    if want.is_empty() {
        return Ok(entries);
    }
    let digests: Vec<Digest> = want.iter().map(|w| w.0).collect();
    let lacking = session.lacking(&digests)?;
    let todo: Vec<&(Digest, usize, usize)> = want
        .iter()
        .zip(lacking)
        .filter(|(_, l)| *l)
        .map(|(w, _)| w)
        .collect();
    // Neighbouring new segments are compressed together, up to FRAME_TARGET_LEN each.
    let mut frames: Vec<&[&(Digest, usize, usize)]> = Vec::new();
    let mut rest = &todo[..];
    while !rest.is_empty() {
        let mut len = 0;
        let k = rest
            .iter()
            .position(|w| {
                len += w.2;
                len >= FRAME_TARGET_LEN
            })
            .map_or(rest.len(), |i| i + 1);
        let (f, r) = rest.split_at(k);
        frames.push(f);
        rest = r;
    }
    let encode = |enc: &mut Encoder, part: &[&[&(Digest, usize, usize)]]| -> Vec<Upload> {
        let mut out = Vec::with_capacity(part.len());
        let mut scratch = Vec::new();
        for f in part {
            let (first, last) = (f[0], f[f.len() - 1]);
            let contiguous = f.windows(2).all(|w| w[0].1 + w[0].2 == w[1].1);
            let plain: &[u8] = if contiguous {
                &data[first.1..last.1 + last.2]
            } else {
                scratch.clear();
                f.iter()
                    .for_each(|(_, p, n)| scratch.extend_from_slice(&data[*p..*p + *n]));
                &scratch
            };
            // Compressed first and sealed only once kept: an incompressible frame is split
            // into its segments, and sealing it whole would be wasted work.
            let seg = enc.compress(plain);
            if !seg.codec.is_compressed() && f.len() > 1 {
                // Not worth compressing: each segment stands alone and reads alone.
                for &&(d, p, n) in f.iter() {
                    let seg = match &keys {
                        None => EncodedSegment::raw(&data[p..p + n]),
                        Some(k) => EncodedSegment {
                            codec: cairn_chunk::Codec::SealedRaw,
                            bytes: k.seal_frame(&data[p..p + n], 0, &[]),
                        },
                    };
                    sent.fetch_add(seg.bytes.len() as u64, Ordering::Relaxed);
                    out.push(Upload::single(d, BlobKind::Data, seg_len(n), seg));
                }
                continue;
            }
            let seg = enc.seal(seg, 0, &[]);
            sent.fetch_add(seg.bytes.len() as u64, Ordering::Relaxed);
            out.push(Upload {
                kind: BlobKind::Data,
                members: f.iter().map(|(d, _, n)| (*d, seg_len(*n))).collect(),
                seg,
            });
        }
        out
    };
    let uploads: Vec<Upload> = if split && frames.len() >= 4 {
        // A helper thread compresses half: for callers whose batches are not already parallel.
        let (a, b) = frames.split_at(frames.len() / 2);
        let level = enc.level();
        std::thread::scope(|sc| {
            let h = sc.spawn(|| encode(&mut Encoder::sealing(level, keys.clone()), b));
            let mut first = encode(enc, a);
            first.extend(h.join().expect("encoder thread"));
            first
        })
    } else {
        encode(enc, &frames)
    };
    if !uploads.is_empty() {
        session.upload(uploads)?;
    }
    Ok(entries)
}

/// Builds the tree over `entries`, uploads the nodes the vault lacks, and returns the root
/// and the recipe's counts.
fn upload_tree(
    session: &dyn VaultSession,
    coding: &Coding,
    entries: &[Entry],
) -> Result<(TreeRoot, RecipeCounts)> {
    let mut nodes: Vec<(Digest, Vec<u8>)> = Vec::new();
    let mut b = coding.tree(|d, bytes| nodes.push((d, bytes)));
    let t0 = Instant::now();
    let mut counts = RecipeCounts::default();
    counts.feed(&mut b, entries.iter().copied());
    let root = b.finish();
    let built = t0.elapsed();
    let mut sizes = NodeBytes::default();
    upload_nodes(session, &mut coding.node_encoder(), &nodes, &mut sizes)?;
    tracing::debug!(
        "tree: {} new nodes, {} bytes ({} stored); built in {built:?}, uploaded in {:?}",
        nodes.len(),
        sizes.raw,
        sizes.stored,
        t0.elapsed() - built
    );
    Ok((root, counts))
}

/// Plaintext and stored bytes of the tree nodes a backup uploaded.
#[derive(Default)]
struct NodeBytes {
    raw: usize,
    stored: usize,
}

/// Uploads the tree nodes among `nodes` that the vault lacks.
fn upload_nodes(
    session: &dyn VaultSession,
    enc: &mut Encoder,
    nodes: &[(Digest, Vec<u8>)],
    sizes: &mut NodeBytes,
) -> Result<()> {
    for chunk in nodes.chunks(4096) {
        let digests: Vec<Digest> = chunk.iter().map(|n| n.0).collect();
        let lacking = session.lacking(&digests)?;
        let ups: Vec<Upload> = chunk
            .iter()
            .zip(lacking)
            .filter(|(_, l)| *l)
            .map(|((d, bytes), _)| {
                sizes.raw += bytes.len();
                let seg = if enc.keys().is_some() {
                    // A sealed node carries its references in the clear (for GC).
                    let n = Node::decode(bytes).expect("a node this backup built");
                    enc.encode_with_refs(bytes, n.level(), &n.refs())
                } else {
                    enc.encode(bytes)
                };
                sizes.stored += seg.bytes.len();
                Upload::single(*d, BlobKind::Tree, seg_len(bytes.len()), seg)
            })
            .collect();
        if !ups.is_empty() {
            session.upload(ups)?;
        }
    }
    Ok(())
}

/// How many of the parent's unchanged segments an incremental reads back to check that the
/// parent is a backup of this source.
const PARENT_SPOT_CHECKS: usize = 8;

/// Checks a parent against the source: up to [`PARENT_SPOT_CHECKS`] of its segments, spread
/// over the disk and outside the changed extents, must read back with their fingerprints.
/// `Ok(Err(why))` when they do not.
fn parent_fits(
    keys: Option<&Keys>,
    source: &dyn ReadAt,
    size: u64,
    parent: &[Entry],
    changed: &ExtentList,
) -> Result<std::result::Result<(), String>> {
    let mut candidates = Vec::new();
    let mut at = 0u64;
    let mut ext = changed.iter().peekable();
    for e in parent {
        let end = at + u64::from(e.len);
        while ext.peek().is_some_and(|x| x.end() <= at) {
            ext.next();
        }
        let touched = ext.peek().is_some_and(|x| x.offset < end);
        if !touched && end <= size && e.len > 0 {
            candidates.push((at, *e));
        }
        at = end;
    }
    let n = candidates.len();
    let mut buf = Vec::new();
    for k in 0..PARENT_SPOT_CHECKS.min(n) {
        let (off, e) = candidates[k * n / PARENT_SPOT_CHECKS.min(n)];
        buf.resize(e.len as usize, 0);
        source
            .read_exact_at(&mut buf, off)
            .map_err(|e| source_err(e, off))?;
        let same = match e.kind {
            EntryKind::Zero => buf.iter().all(|&b| b == 0),
            EntryKind::Data => fingerprint_with(keys, &buf) == e.digest,
        };
        if !same {
            return Ok(Err(format!(
                "its {} bytes at offset {off} differ from the image, outside the changed extents",
                e.len
            )));
        }
    }
    Ok(Ok(()))
}

/// The changed extents, plus the parent's segments whose stored copy is marked damaged: an
/// incremental reads them again, so the vault stores them again and heals every snapshot
/// that needs them.
fn with_damaged(vault: &dyn Vault, parent: &[Entry], changed: &ExtentList) -> Result<ExtentList> {
    let damaged: std::collections::HashSet<Digest> =
        vault.damaged_segments()?.into_iter().collect();
    if damaged.is_empty() {
        return Ok(changed.clone());
    }
    let mut ext: Vec<Extent> = changed.iter().copied().collect();
    let mut at = 0u64;
    for e in parent {
        if e.kind == EntryKind::Data && damaged.contains(&e.digest) {
            ext.push(Extent::new(at, u64::from(e.len)));
        }
        at += u64::from(e.len);
    }
    Ok(ExtentList::from_unsorted(ext))
}

/// Backs up `source` into `vault`.
pub fn backup(
    vault: &dyn Vault,
    source: &dyn ReadAt,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<SnapshotManifest> {
    let started = Instant::now();
    let size = source.size().map_err(|e| source_err(e, 0))?;
    let parent = match &opts.parent {
        Some(p) => Some(vault.find(p)?),
        None => None,
    };
    if opts.changed.is_some() && parent.is_none() {
        return Err(VaultError::Invalid("--changed needs --parent".into()));
    }
    // One config read (a request to a remote vault) serves the whole backup.
    let config = vault.config()?;
    let keys = vault.keys();
    if config.encryption.is_some() && keys.is_none() {
        return Err(VaultError::KeyNeeded(config.id.clone()));
    }
    let coding = Coding {
        level: config.compression,
        keys: keys.clone(),
    };
    let session = vault.begin(&format!("backup {}", opts.name))?;
    let sent = AtomicU64::new(0);
    let mut stats = BackupStats::default();
    if let (Some(p), Some(_)) = (&parent, &opts.changed)
        && p.name != opts.name
    {
        return Err(VaultError::Invalid(format!(
            "parent {} is a backup of {:?}, not of {:?}: changes listed against another \
             disk's backup would make a wrong backup (give a parent of the same disk, or no \
             --changed for a full read)",
            p.id, p.name, opts.name
        )));
    }
    // An incremental trusts its parent for every byte outside the changed extents: the
    // parent's recipe is read first and spot-checked against the source.
    let incremental_plan = match (&parent, &opts.changed) {
        (Some(p), Some(changed)) => {
            let recipe = match &opts.parent_recipe {
                Some(r) if r.snapshot == p.id => r.clone(),
                _ => std::sync::Arc::new(ParentRecipe::read(vault, p)?),
            };
            match parent_fits(keys.as_deref(), source, size, &recipe.entries, changed)? {
                Ok(()) => {
                    let changed = with_damaged(vault, &recipe.entries, changed)?;
                    Some((p, recipe, changed))
                }
                Err(why) => {
                    tracing::warn!(
                        "parent {} does not fit this image ({why}): reading the whole image",
                        p.id
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let (root, counts, chunker) = match incremental_plan {
        Some((p, recipe, changed)) => {
            let changed = &changed;
            let chunker = p.chunker; // Nodes the parent has need no question to the vault.
            let known_nodes = recipe.nodes.iter().copied().collect();
            let (root, counts) = incremental(
                &*session,
                source,
                size,
                &recipe.entries,
                &known_nodes,
                changed,
                chunker,
                &coding,
                &sent,
                &mut stats,
                progress,
            )?;
            tracing::debug!("recipe tree uploaded: {:?}", started.elapsed());
            (root, counts, chunker)
        }
        _ => {
            let chunker = opts
                .chunker
                .or(parent.as_ref().map(|p| p.chunker))
                .unwrap_or(config.chunker);
            chunker.validate().map_err(VaultError::Invalid)?;
            let entries = full(
                &*session,
                source,
                size,
                chunker,
                &coding,
                opts.threads,
                &sent,
                &mut stats,
                progress,
            )?;
            tracing::debug!("segments done: {:?}", started.elapsed());
            let (root, counts) = upload_tree(&*session, &coding, &entries)?;
            tracing::debug!("recipe tree uploaded: {:?}", started.elapsed());
            (root, counts, chunker)
        }
    };
    stats.segments = counts.segments;
    stats.zero_bytes = counts.zero_bytes;
    if root.size != size {
        return Err(VaultError::Invalid(format!(
            "recipe covers {} bytes, image has {size}",
            root.size
        )));
    }
    // Disk data this backup handed to the vault, as encoded (what crosses a network).
    stats.bytes_sent = sent.load(Ordering::Relaxed);
    stats.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    cairn_types::fault::point("storage.backup.before_commit");
    // An encrypted repository stores the name and labels sealed, and a keyed tag of the
    // name in their place (prune groups a disk's snapshots by it).
    let (name, labels, sealed) = match &keys {
        None => (opts.name.clone(), opts.labels.clone(), None),
        Some(k) => {
            let (tag, sealed) =
                crate::manifest::Private::seal(k, &opts.name, &opts.labels, &root.digest);
            (tag, Default::default(), Some(sealed))
        }
    };
    let committed = session.commit(CommitRequest {
        name,
        root: Some(root),
        chunker: Some(chunker),
        parent: parent.map(|p| p.id),
        client_stats: stats,
        labels,
        sealed,
        lock_until: opts.lock_until,
    });
    let committed = match (committed, &keys) {
        (Ok(mut m), Some(k)) => m
            .open_private(k)
            .map(|()| m)
            .map_err(|e| VaultError::Corrupt(format!("the committed manifest: {e}"))),
        (c, _) => c,
    };
    tracing::debug!("committed: {:?}", started.elapsed());
    committed
}

#[allow(clippy::too_many_arguments)]
fn full(
    session: &dyn VaultSession,
    source: &dyn ReadAt,
    size: u64,
    params: ChunkerParams,
    coding: &Coding,
    threads: usize,
    sent: &AtomicU64,
    stats: &mut BackupStats,
    progress: &dyn Progress,
) -> Result<Vec<Entry>> {
    let chunker = Chunker::new(params);
    let threads = if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    } else {
        threads
    };
    let (btx, brx) = crossbeam_channel::bounded::<(usize, Vec<u8>, Vec<usize>)>(threads * 2);
    let (rtx, rrx) = crossbeam_channel::unbounded::<(usize, Result<Vec<Entry>>)>();
    let done = AtomicU64::new(0);
    let (pool_tx, pool_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    std::thread::scope(|sc| -> Result<Vec<Entry>> {
        // Reader: cut the image into batches of whole segments.
        let reader = sc.spawn(move || -> Result<u64> {
            let window = chunker.window();
            // Buffers come back from the workers: no fresh pages to fault in per batch.
            let take = || {
                pool_rx
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(BATCH_BYTES + window))
            };
            let mut buf: Vec<u8> = take();
            let mut off = 0u64;
            let mut seq = 0;
            loop {
                let want = (BATCH_BYTES + window).saturating_sub(buf.len());
                let n = usize::try_from(size - off).map_or(want, |rest| want.min(rest));
                let start = buf.len();
                buf.resize(start + n, 0);
                read_sparse(source, &mut buf[start..], off)?;
                off += n as u64;
                let eof = off == size;
                let buf_abs = off - buf.len() as u64;
                let mut cuts = Vec::new();
                let mut pos = 0;
                while pos < buf.len()
                    && (eof || buf.len() - pos >= window)
                    && (pos < BATCH_BYTES || eof)
                {
                    let c = chunker.cut(&buf[pos..], buf_abs + pos as u64);
                    cuts.push(c);
                    pos += c;
                }
                let mut next = take();
                next.clear();
                next.extend_from_slice(&buf[pos..]);
                buf.truncate(pos);
                if !cuts.is_empty() {
                    if btx
                        .send((seq, std::mem::replace(&mut buf, next), cuts))
                        .is_err()
                    {
                        break;
                    }
                    seq += 1;
                } else {
                    buf = next;
                }
                if eof && buf.is_empty() {
                    break;
                }
            }
            drop(btx);
            Ok(off)
        });
        for _ in 0..threads {
            let brx = brx.clone();
            let rtx = rtx.clone();
            let pool_tx = pool_tx.clone();
            let done = &done;
            sc.spawn(move || {
                let mut enc = coding.encoder();
                for (seq, data, cuts) in brx {
                    let r = process_batch(session, &mut enc, &data, &cuts, sent, false);
                    let len = data.len() as u64;
                    let _ = pool_tx.send(data);
                    let failed = r.is_err();
                    progress.update(done.fetch_add(len, Ordering::Relaxed) + len, size);
                    if rtx.send((seq, r)).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(rtx);
        drop(brx);
        let mut pending: HashMap<usize, Vec<Entry>> = HashMap::new();
        let mut next = 0;
        let mut out = Vec::new();
        let mut err = None;
        for (seq, r) in rrx {
            match r {
                Ok(e) => {
                    pending.insert(seq, e);
                    while let Some(e) = pending.remove(&next) {
                        out.extend(e);
                        next += 1;
                    }
                }
                Err(e) => {
                    err.get_or_insert(e);
                    break;
                }
            }
        }
        let read = reader
            .join()
            .map_err(|_| VaultError::Invalid("reader thread panicked".into()))?;
        if let Some(e) = err {
            return Err(e);
        }
        stats.bytes_read = read?;
        Ok(out)
    })
}

/// Segment counts of a recipe, taken as its tree is built.
#[derive(Default)]
struct RecipeCounts {
    segments: u64,
    zero_bytes: u64,
}

impl RecipeCounts {
    fn feed<F: FnMut(Digest, Vec<u8>)>(
        &mut self,
        tree: &mut TreeBuilder<F>,
        entries: impl Iterator<Item = Entry>,
    ) {
        for e in entries {
            self.segments += 1;
            if e.kind == EntryKind::Zero {
                self.zero_bytes += u64::from(e.len);
            }
            tree.push(e);
        }
    }
}
