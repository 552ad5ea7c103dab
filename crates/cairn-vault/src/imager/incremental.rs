//! The incremental backup: re-chunks only the changed regions against the parent's recipe
//! (see the module docs of [`super`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_chunk::recipe::TreeRoot;
use cairn_chunk::{Chunker, ChunkerParams, Entry};
use cairn_types::{Digest, ExtentList, ReadAt};

use super::{NodeBytes, Progress, RecipeCounts, process_batch, source_err, upload_nodes};
use crate::api::VaultSession;
use crate::error::{Result, VaultError};
use crate::manifest::BackupStats;

/// An incremental's batches are smaller: its worker finishes soon after the walk does.
const INCREMENTAL_BATCH_BYTES: usize = 1 << 20;

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

#[allow(clippy::too_many_arguments)]
pub(super) fn incremental(
    session: &dyn VaultSession,
    source: &dyn ReadAt,
    size: u64,
    parent: &[Entry],
    known_nodes: &std::collections::HashSet<Digest>,
    changed: &ExtentList,
    params: ChunkerParams,
    coding: &super::Coding,
    sent: &AtomicU64,
    stats: &mut BackupStats,
    progress: &dyn Progress,
) -> Result<(TreeRoot, RecipeCounts)> {
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
    std::thread::scope(|sc| -> Result<(TreeRoot, RecipeCounts)> {
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
            let mut enc = coding.encoder();
            let mut node_enc = coding.node_encoder();
            let nodes = std::cell::RefCell::new(Vec::<(Digest, Vec<u8>)>::new());
            // Nodes the parent already has need no question to the vault.
            let mut tree = coding.tree(|d, bytes| {
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
        let built = built??;
        progress.update(size, size);
        Ok(built)
    })
}

/// Tree nodes an incremental's worker collects before it uploads them.
const NODE_GROUP: usize = 256;

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
        // Copy parent entries the change cannot have moved.
        let first = first_affected(starts, x.offset);
        while pi < first && starts[pi + 1] <= size {
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
            // Used only when have > cur: then cur lies within buf.
            #[allow(clippy::cast_possible_truncation)]
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
