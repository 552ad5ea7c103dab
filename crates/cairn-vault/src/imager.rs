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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_chunk::format::{BlobKind, FRAME_TARGET_LEN};
use cairn_chunk::recipe::{TreeBuilder, TreeRoot};
use cairn_chunk::{
    Chunker, ChunkerParams, EncodedSegment, Encoder, Entry, EntryKind, fingerprint, is_zero,
};
use cairn_types::{Digest, ExtentList, ReadAt, SnapshotId};

use crate::api::{Upload, Vault, VaultSession};
use crate::error::{Result, VaultError};
use crate::manifest::{BackupStats, SnapshotManifest};
use crate::session::CommitRequest;

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

/// An incremental's batches are smaller: its worker finishes soon after the walk does.
const INCREMENTAL_BATCH_BYTES: usize = 1 << 20;

/// A restore starts writeback after every this many bytes written.
const FLUSH_EVERY: u64 = 64 << 20;

/// How much an incremental reads at a time past a cut it cannot yet tell, beyond the end of
/// the parent (where there are no parent boundaries to aim for).
const READ_STEP: u64 = 16 << 10;

/// What the chunker must see past a cut to be sure of it (an aligned zero block may follow).
const LOOK_AHEAD: u64 = cairn_chunk::chunker::ZERO_BLOCK as u64;

/// The most an incremental reads with one call.
const MAX_READ: u64 = 1 << 20;

/// How far past a changed extent beyond the end of the parent an incremental asks the kernel
/// to read ahead.
const PREFETCH_PAST: u64 = 32 << 10;

fn source_err(e: std::io::Error, offset: u64) -> VaultError {
    VaultError::io(format!("source image at offset {offset}"), "read", e)
}

/// Fills `buf` (already zeroed) from `source` at `off`, reading only the data ranges of a
/// sparse source: holes are not read at all.
fn read_sparse(source: &dyn ReadAt, buf: &mut [u8], off: u64) -> Result<()> {
    match source.data_ranges(off, buf.len() as u64) {
        Some(ranges) => {
            for r in ranges {
                let a = (r.offset - off) as usize;
                let b = (r.end() - off) as usize;
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
    let hash = |range: std::ops::Range<usize>| -> Vec<Entry> {
        range
            .map(|i| {
                let piece = &data[offsets[i]..offsets[i] + cuts[i]];
                let n = cuts[i] as u32;
                if is_zero(piece) {
                    Entry::zero(n)
                } else {
                    Entry::data(fingerprint(piece), n)
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
            let seg = enc.encode(plain);
            if seg.codec == cairn_chunk::Codec::Raw && f.len() > 1 {
                // Not worth compressing: each segment stands alone and reads alone.
                for &&(d, p, n) in f.iter() {
                    let seg = EncodedSegment::raw(&data[p..p + n]);
                    sent.fetch_add(seg.bytes.len() as u64, Ordering::Relaxed);
                    out.push(Upload::single(d, BlobKind::Data, n as u32, seg));
                }
                continue;
            }
            sent.fetch_add(seg.bytes.len() as u64, Ordering::Relaxed);
            out.push(Upload {
                kind: BlobKind::Data,
                members: f.iter().map(|(d, _, n)| (*d, *n as u32)).collect(),
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
            let h = sc.spawn(|| encode(&mut Encoder::new(level), b));
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

/// Builds the tree over `entries`, uploads the nodes the vault lacks, and returns the root.
fn upload_tree(
    session: &dyn VaultSession,
    entries: &[Entry],
    known: &std::collections::HashSet<Digest>,
) -> Result<TreeRoot> {
    let mut nodes: Vec<(Digest, Vec<u8>)> = Vec::new();
    // Nodes the parent already has need no question to the vault.
    let mut b = TreeBuilder::new(|d, bytes| {
        if !known.contains(&d) {
            nodes.push((d, bytes))
        }
    });
    let t0 = Instant::now();
    entries.iter().for_each(|&e| b.push(e));
    let root = b.finish();
    let built = t0.elapsed();
    let mut sizes = NodeBytes::default();
    upload_nodes(session, &mut Encoder::new(1), &nodes, &mut sizes)?;
    tracing::debug!(
        "tree: {} new nodes, {} bytes ({} stored); built in {built:?}, uploaded in {:?}",
        nodes.len(),
        sizes.raw,
        sizes.stored,
        t0.elapsed() - built
    );
    Ok(root)
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
                let seg = enc.encode(bytes);
                sizes.stored += seg.bytes.len();
                Upload::single(*d, BlobKind::Tree, bytes.len() as u32, seg)
            })
            .collect();
        if !ups.is_empty() {
            session.upload(ups)?;
        }
    }
    Ok(())
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
    let level = config.compression;
    let session = vault.begin(&format!("backup {}", opts.name))?;
    let sent = AtomicU64::new(0);
    let mut stats = BackupStats::default();
    let mut known_nodes = std::collections::HashSet::new();
    let (root, chunker) = match (&parent, &opts.changed) {
        (Some(p), Some(changed)) => {
            let chunker = p.chunker;
            let recipe = match &opts.parent_recipe {
                Some(r) if r.snapshot == p.id => r.clone(),
                _ => std::sync::Arc::new(ParentRecipe::read(vault, p)?),
            };
            tracing::debug!(
                "parent recipe read: {} entries, {} nodes, {:?}",
                recipe.entries.len(),
                recipe.nodes.len(),
                started.elapsed()
            );
            known_nodes.extend(recipe.nodes.iter().copied());
            let root = incremental(
                &*session,
                source,
                size,
                &recipe.entries,
                &known_nodes,
                changed,
                chunker,
                level,
                &sent,
                &mut stats,
                progress,
            )?;
            tracing::debug!("recipe tree uploaded: {:?}", started.elapsed());
            (root, chunker)
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
                level,
                opts.threads,
                &sent,
                &mut stats,
                progress,
            )?;
            stats.segments = entries.len() as u64;
            stats.zero_bytes = entries
                .iter()
                .filter(|e| e.kind == EntryKind::Zero)
                .map(|e| u64::from(e.len))
                .sum();
            tracing::debug!("segments done: {:?}", started.elapsed());
            let root = upload_tree(&*session, &entries, &known_nodes)?;
            tracing::debug!("recipe tree uploaded: {:?}", started.elapsed());
            (root, chunker)
        }
    };
    if root.size != size {
        return Err(VaultError::Invalid(format!(
            "recipe covers {} bytes, image has {size}",
            root.size
        )));
    }
    // Disk data this backup handed to the vault, as encoded (what crosses a network).
    stats.bytes_sent = sent.load(Ordering::Relaxed);
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let committed = session.commit(CommitRequest {
        name: opts.name.clone(),
        root: Some(root),
        chunker: Some(chunker),
        parent: parent.map(|p| p.id),
        client_stats: stats,
        labels: opts.labels.clone(),
    });
    tracing::debug!("committed: {:?}", started.elapsed());
    committed
}

#[allow(clippy::too_many_arguments)]
fn full(
    session: &dyn VaultSession,
    source: &dyn ReadAt,
    size: u64,
    params: ChunkerParams,
    level: i32,
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
                let n = want.min((size - off) as usize);
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
                let mut enc = Encoder::new(level);
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

#[allow(clippy::too_many_arguments)]
fn incremental(
    session: &dyn VaultSession,
    source: &dyn ReadAt,
    size: u64,
    parent: &[Entry],
    known_nodes: &std::collections::HashSet<Digest>,
    changed: &ExtentList,
    params: ChunkerParams,
    level: i32,
    sent: &AtomicU64,
    stats: &mut BackupStats,
    progress: &dyn Progress,
) -> Result<TreeRoot> {
    let chunker = Chunker::new(params);
    // Parent entry start offsets; ends[i] = starts[i + 1].
    let mut starts = Vec::with_capacity(parent.len() + 1);
    let mut acc = 0u64;
    for e in parent {
        starts.push(acc);
        acc += u64::from(e.len);
    }
    let psize = acc;
    starts.push(psize);
    // Everything past the smaller size changed too.
    let mut ext: Vec<cairn_types::Extent> = changed.clamp(size).iter().copied().collect();
    if size > psize {
        ext.push(cairn_types::Extent::new(psize, size - psize));
    } else if size < psize && size > 0 {
        ext.push(cairn_types::Extent::new(size - 1, 1));
    }
    let ext = ExtentList::from_unsorted(ext).clamp(size);
    let ext = ext.as_slice();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let walk_failed = std::sync::atomic::AtomicBool::new(false);
    source.expect_scattered_reads();
    std::thread::scope(|sc| -> Result<TreeRoot> {
        // Readahead hints for every region, from a helper thread: a hint blocks while the
        // kernel queues the reads, so the walk below starts at once and finds later regions
        // already in memory.
        {
            let (starts, stop) = (&starts, &stop);
            sc.spawn(move || {
                for x in ext {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let from = starts[first_affected(starts, x.offset)].min(x.offset);
                    // Through the second parent boundary after the change: the re-chunking
                    // realigns at the first in four regions of five and by the second in
                    // nineteen of twenty (the bench corpus, 8 KiB segments). Reading less
                    // matters: every byte read ahead is a page-cache page filled.
                    let j = starts.partition_point(|&s| s < x.end());
                    let to = match starts.get(j + 1) {
                        Some(&b) => b + LOOK_AHEAD,
                        None => x.end() + PREFETCH_PAST,
                    };
                    source.prefetch(from, to.min(size) - from);
                }
            });
        }
        // Batches go to a worker that hashes, dedups, compresses and uploads them while this
        // thread reads and cuts the next regions. The worker also builds the recipe tree as
        // entries become final (batches come in recipe order) and uploads finished nodes as
        // it goes, so that little of the tree is left when the walk ends.
        let (btx, brx) = crossbeam_channel::bounded::<Batch>(8);
        // Processed batches' buffers go back to the walk for reuse.
        let (spare_tx, spare_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
        let walk_failed = &walk_failed;
        let worker = sc.spawn(move || -> Result<(TreeRoot, RecipeCounts)> {
            let mut enc = Encoder::new(level);
            let mut node_enc = Encoder::new(1);
            let nodes = std::cell::RefCell::new(Vec::<(Digest, Vec<u8>)>::new());
            // Nodes the parent already has need no question to the vault.
            let mut tree = TreeBuilder::new(|d, bytes| {
                if !known_nodes.contains(&d) {
                    nodes.borrow_mut().push((d, bytes));
                }
            });
            let mut counts = RecipeCounts::default();
            let mut sizes = NodeBytes::default();
            for b in brx {
                let es = process_batch(session, &mut enc, &b.data, &b.cuts, sent, true)?;
                let _ = spare_tx.send(b.data);
                let mut new = es.into_iter();
                for piece in b.pieces {
                    match piece {
                        Piece::Parent(from, to) => {
                            counts.feed(&mut tree, parent[from..to].iter().copied())
                        }
                        Piece::New(n) => counts.feed(&mut tree, new.by_ref().take(n)),
                    }
                }
                if nodes.borrow().len() >= NODE_GROUP {
                    let group = std::mem::take(&mut *nodes.borrow_mut());
                    upload_nodes(session, &mut node_enc, &group, &mut sizes)?;
                }
            }
            if walk_failed.load(Ordering::Relaxed) {
                // The walk's error is the one reported; upload nothing more.
                return Err(VaultError::Invalid("walk failed".into()));
            }
            let t = Instant::now();
            let root = tree.finish();
            let last = nodes.take();
            upload_nodes(session, &mut node_enc, &last, &mut sizes)?;
            tracing::debug!(
                "tree: {} bytes of new nodes ({} stored), {} nodes left after the walk, uploaded in {:?}",
                sizes.raw,
                sizes.stored,
                last.len(),
                t.elapsed()
            );
            Ok((root, counts))
        });
        let walked = walk_changes(
            source, size, parent, &starts, ext, &chunker, &btx, &spare_rx, progress,
        );
        walk_failed.store(walked.is_err(), Ordering::Relaxed);
        drop(btx);
        stop.store(true, Ordering::Relaxed);
        let built = worker
            .join()
            .map_err(|_| VaultError::Invalid("backup worker panicked".into()));
        stats.bytes_read = walked?;
        let (root, counts) = built??;
        stats.segments = counts.segments;
        stats.zero_bytes = counts.zero_bytes;
        progress.update(size, size);
        Ok(root)
    })
}

/// Tree nodes an incremental's worker collects before it uploads them.
const NODE_GROUP: usize = 256;

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

/// A run of an incremental's recipe, in order: parent entries `from..to`, or the next `n` new
/// segments of the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Parent(usize, usize),
    New(usize),
}

/// The first parent entry a change at `offset` may have moved: the one holding `offset`, or
/// an earlier one ending at the aligned zero block that holds `offset`. A cut at an aligned
/// position depends on whether a zero block follows it (the chunker's only look-ahead), so a
/// change that makes or unmakes a zero block can move the cut just before that block.
fn first_affected(starts: &[u64], offset: u64) -> usize {
    let block = offset - offset % LOOK_AHEAD;
    // Entry i ends at starts[i + 1]: the first one ending at or after `block`.
    starts.partition_point(|&s| s < block).saturating_sub(1)
}

/// New segments of an incremental, and the part of the recipe they end: the parent entries
/// before and between them, in order.
struct Batch {
    data: Vec<u8>,
    cuts: Vec<usize>,
    pieces: Vec<Piece>,
}

impl Batch {
    /// An empty batch on `spare` (a processed batch's buffer) if there is one: reusing
    /// mapped memory spares the page faults of a fresh buffer per batch.
    fn new(spare: Option<Vec<u8>>) -> Self {
        let data = match spare {
            Some(mut d) => {
                d.clear();
                d
            }
            None => Vec::with_capacity(INCREMENTAL_BATCH_BYTES + (64 << 10)),
        };
        Self {
            data,
            cuts: Vec::new(),
            pieces: Vec::new(),
        }
    }

    /// Parent entry `i` comes next in the recipe.
    fn copy(&mut self, i: usize) {
        match self.pieces.last_mut() {
            Some(Piece::Parent(_, to)) if *to == i => *to += 1,
            _ => self.pieces.push(Piece::Parent(i, i + 1)),
        }
    }

    /// A new segment, `data`, comes next in the recipe.
    fn push(&mut self, data: &[u8]) {
        self.data.extend_from_slice(data);
        self.cuts.push(data.len());
        match self.pieces.last_mut() {
            Some(Piece::New(n)) => *n += 1,
            _ => self.pieces.push(Piece::New(1)),
        }
    }
}

/// The serial part of an incremental: reads and re-chunks each changed region until a cut
/// realigns with the parent, and sends the new segments to the worker in batches, each with
/// the parent entries that come before and between its segments in the recipe. Returns the
/// bytes read.
#[allow(clippy::too_many_arguments)]
fn walk_changes(
    source: &dyn ReadAt,
    size: u64,
    parent: &[Entry],
    starts: &[u64],
    ext: &[cairn_types::Extent],
    chunker: &Chunker,
    batches: &crossbeam_channel::Sender<Batch>,
    spare: &crossbeam_channel::Receiver<Vec<u8>>,
    progress: &dyn Progress,
) -> Result<u64> {
    let psize = *starts.last().expect("starts ends with the parent size");
    let is_boundary = |o: u64| starts.binary_search(&o).is_ok();
    let mut batch = Batch::new(None);
    let send = |batch: &mut Batch| -> Result<()> {
        if batch.pieces.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(batch, Batch::new(spare.try_recv().ok()));
        // A closed channel means the worker failed; the caller reports its error.
        batches
            .send(full)
            .map_err(|_| VaultError::Invalid("backup worker stopped".into()))
    };
    let mut pi = 0usize; // next parent entry to copy
    let mut pos = 0u64; // image offset covered so far (always a parent boundary or the end)
    let mut xi = 0usize;
    let mut read = 0u64;
    let mut buf: Vec<u8> = Vec::new(); // one region's bytes, reused
    let (walk_started, mut reading, mut waiting) = (Instant::now(), Duration::ZERO, Duration::ZERO);
    while xi < ext.len() && pos < size {
        let x = ext[xi];
        if x.end() <= pos {
            xi += 1;
            continue;
        }
        // Copy parent entries the change cannot have moved (see `first_affected`).
        let keep_before = x.offset - x.offset % LOOK_AHEAD;
        while pi < parent.len() && starts[pi + 1] < keep_before && starts[pi + 1] <= size {
            batch.copy(pi);
            pi += 1;
        }
        let start = if pi < parent.len() {
            starts[pi]
        } else {
            psize.min(size)
        };
        debug_assert!(start >= pos);
        // Re-chunk from `start` until a cut realigns with the parent past every change it met.
        let mut dirty_until = x.end();
        buf.clear();
        let mut buf_at = start; // image offset of buf[0]
        let mut cur = start;
        loop {
            // Read in small steps until the chunker can tell the next cut: most cuts need far
            // less than a whole window past `cur`.
            let have = buf_at + buf.len() as u64;
            let rel = (cur - buf_at) as usize;
            let cut = (have > cur)
                .then(|| chunker.cut_prefix(&buf[rel..], cur, have >= size))
                .flatten();
            let Some(c) = cut else {
                // Through the rest of the changed bytes and on to the next parent boundary
                // past them (where the re-chunking may realign), and the chunker's look-ahead
                // past that: one read, no more than the walk can use. At most MAX_READ at a
                // time.
                let from = dirty_until.max(have);
                let until = if from <= psize {
                    starts[starts.partition_point(|&s| s < from)] + LOOK_AHEAD
                } else {
                    have + READ_STEP
                };
                let want = until.saturating_sub(have).clamp(1, MAX_READ);
                let n = want.min(size - have) as usize;
                let old = buf.len();
                buf.resize(old + n, 0);
                let t = Instant::now();
                source
                    .read_exact_at(&mut buf[old..], have)
                    .map_err(|e| source_err(e, have))?;
                reading += t.elapsed();
                read += n as u64;
                continue;
            };
            batch.push(&buf[rel..rel + c]);
            cur += c as u64;
            while xi + 1 < ext.len() && ext[xi + 1].offset < cur {
                xi += 1;
                dirty_until = dirty_until.max(ext[xi].end());
            }
            if batch.data.len() >= INCREMENTAL_BATCH_BYTES {
                let t = Instant::now();
                send(&mut batch)?;
                waiting += t.elapsed();
            }
            // Drop consumed bytes now and then.
            if rel > (8 << 20) {
                buf.drain(..rel);
                buf_at += rel as u64;
            }
            if cur >= size || (cur >= dirty_until && cur <= psize && is_boundary(cur)) {
                break;
            }
        }
        pos = cur;
        progress.update(pos, size);
        // Skip parent entries the re-chunked region replaced.
        while pi < parent.len() && starts[pi] < pos {
            pi += 1;
        }
        xi += 1;
    }
    while pi < parent.len() && starts[pi + 1] <= size && pos < size {
        batch.copy(pi);
        pi += 1;
    }
    send(&mut batch)?;
    tracing::debug!(
        "walked {} changed regions in {:?}: {read} bytes read in {reading:?}, {waiting:?} waiting for the worker",
        ext.len(),
        walk_started.elapsed()
    );
    Ok(read)
}

/// Options of one restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub threads: usize,
}

/// Result of a restore.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreStats {
    pub snapshot: String,
    pub bytes: u64,
    pub bytes_written: u64,
    pub zero_bytes: u64,
    pub duration_ms: u64,
}

/// Restores snapshot `spec` to `output` (a file, created or replaced atomically; or a block
/// device, written in place). Anything else that exists at `output` (a directory, a
/// character device, a FIFO, a socket) is refused before anything is read: the atomic
/// replace would put a regular file in its place.
pub fn restore(
    vault: &dyn Vault,
    spec: &str,
    output: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    let started = Instant::now();
    let existing = std::fs::metadata(output).ok().map(|m| m.file_type());
    let is_dev = existing.is_some_and(|t| t.is_block_device());
    if existing.is_some_and(|t| !t.is_file() && !is_dev) {
        return Err(VaultError::Invalid(format!(
            "{} exists and is neither a regular file nor a block device: not replacing it",
            output.display()
        )));
    }
    let snap = vault.find(spec)?;
    let entries = vault.entries(&snap)?;
    let target: PathBuf = if is_dev {
        output.to_path_buf()
    } else {
        let name = output.file_name().ok_or_else(|| {
            VaultError::Invalid(format!("{} is not a file path", output.display()))
        })?;
        output.with_file_name(format!(".{}.cairn-partial", name.to_string_lossy()))
    };
    let io = |what| {
        let t = target.display().to_string();
        move |e| VaultError::io(t, what, e)
    };
    let file = if is_dev {
        OpenOptions::new()
            .write(true)
            .open(&target)
            .map_err(io("open"))?
    } else {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&target)
            .map_err(io("create"))?;
        f.set_len(snap.size).map_err(io("set length"))?;
        f
    };
    let result = restore_into(vault, &entries, &file, is_dev, snap.size, opts, progress);
    let (written, zeros) = match result {
        Ok(x) => x,
        Err(e) => {
            if !is_dev {
                let _ = std::fs::remove_file(&target);
            }
            return Err(e);
        }
    };
    file.sync_all().map_err(io("fsync"))?;
    if !is_dev {
        std::fs::rename(&target, output).map_err(io("rename"))?;
    }
    Ok(RestoreStats {
        snapshot: snap.id.to_string(),
        bytes: snap.size,
        bytes_written: written,
        zero_bytes: zeros,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

fn restore_into(
    vault: &dyn Vault,
    entries: &[Entry],
    file: &File,
    write_zeros: bool,
    size: u64,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    // Batches of (image offset, entry) with about BATCH_BYTES of data each.
    let mut batches: Vec<Vec<(u64, Entry)>> = vec![Vec::new()];
    let mut bytes = 0usize;
    let mut off = 0u64;
    let mut zeros = 0u64;
    for e in entries {
        if e.kind == EntryKind::Zero {
            zeros += u64::from(e.len);
            if write_zeros {
                batches.last_mut().expect("one batch").push((off, *e));
            }
        } else {
            if bytes >= 2 * BATCH_BYTES {
                batches.push(Vec::new());
                bytes = 0;
            }
            bytes += e.len as usize;
            batches.last_mut().expect("one batch").push((off, *e));
        }
        off += u64::from(e.len);
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2)
    } else {
        opts.threads
    };
    let next = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let error: Mutex<Option<VaultError>> = Mutex::new(None);
    // Writeback as the restore goes: a worker that carries `written` past a multiple of
    // FLUSH_EVERY wakes the flusher, so the final fsync that makes the image durable has
    // little left to wait for. The flusher ends when the last worker drops its sender.
    let flush_step = AtomicU64::new(0);
    let (wake, woken) = crossbeam_channel::bounded::<()>(1);
    std::thread::scope(|sc| {
        sc.spawn(move || {
            for () in woken {
                let _ = file.sync_data();
            }
        });
        for _ in 0..threads {
            let wake = wake.clone();
            let (next, written, error, flush_step, batches) =
                (&next, &written, &error, &flush_step, &batches);
            sc.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= batches.len() || error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        break;
                    }
                    if let Err(e) = restore_batch(vault, &batches[i], file, written) {
                        error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                    let w = written.load(Ordering::Relaxed);
                    let step = w / FLUSH_EVERY;
                    if flush_step.fetch_max(step, Ordering::Relaxed) < step {
                        let _ = wake.try_send(()); // a flush already pending covers this one
                    }
                    progress.update(w + zeros, size);
                }
            });
        }
        drop(wake);
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok((written.load(Ordering::Relaxed), zeros))
}

fn restore_batch(
    vault: &dyn Vault,
    batch: &[(u64, Entry)],
    file: &File,
    written: &AtomicU64,
) -> Result<()> {
    let digests: Vec<Digest> = batch
        .iter()
        .filter(|(_, e)| e.kind == EntryKind::Data)
        .map(|(_, e)| e.digest)
        .collect();
    let datas = vault.fetch(&digests).map_err(|e| {
        let (a, b) = (
            batch.first().map(|x| x.0).unwrap_or(0),
            batch.last().map(|x| x.0 + u64::from(x.1.len)).unwrap_or(0),
        );
        VaultError::Corrupt(format!("cannot restore image bytes {a}..{b}: {e}"))
    })?;
    let mut it = datas.into_iter();
    let zero = vec![0u8; 1 << 16];
    // Consecutive data segments are written with one call: fewer syscalls, less contention
    // on the output's inode lock between restore threads.
    let mut run: Vec<u8> = Vec::new();
    let mut run_at = 0u64;
    let flush = |run: &mut Vec<u8>, at: u64| -> Result<()> {
        if !run.is_empty() {
            file.write_all_at(run, at)
                .map_err(|err| VaultError::io(format!("output at offset {at}"), "write", err))?;
            written.fetch_add(run.len() as u64, Ordering::Relaxed);
            run.clear();
        }
        Ok(())
    };
    for (off, e) in batch {
        match e.kind {
            EntryKind::Data => {
                let data = it
                    .next()
                    .ok_or_else(|| VaultError::Corrupt("vault returned too few segments".into()))?;
                if data.len() != e.len as usize {
                    return Err(VaultError::Corrupt(format!(
                        "segment {:?} for image bytes {off}..{} has {} bytes",
                        e.digest,
                        off + u64::from(e.len),
                        data.len()
                    )));
                }
                if run_at + run.len() as u64 != *off {
                    flush(&mut run, run_at)?;
                    run_at = *off;
                }
                run.extend_from_slice(&data);
            }
            EntryKind::Zero => {
                flush(&mut run, run_at)?;
                let mut done = 0usize;
                while done < e.len as usize {
                    let n = (e.len as usize - done).min(zero.len());
                    file.write_all_at(&zero[..n], off + done as u64)
                        .map_err(|err| VaultError::io("output", "write", err))?;
                    done += n;
                }
            }
        }
    }
    flush(&mut run, run_at)?;
    Ok(())
}
