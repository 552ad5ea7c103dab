//! The repository's read path: batched range reads of containers, and a pool of recently
//! decoded frames.
//!
//! Segments are packed into compression frames (up to `FRAME_TARGET_LEN` of plaintext), and
//! reading one segment decodes its whole frame. Readers that jump around, such as a file-system
//! parser following btrfs's scattered 16 KiB tree nodes, ask for neighbours packed in one frame
//! in separate calls; the pool keeps the last [`FRAME_POOL_BYTES`] of decoded frames so that
//! each frame is decoded once. Stored frames never change (a container is written once; repair
//! and GC write new containers), so the pool needs no invalidation, and every segment served
//! from it is still checked against its fingerprint.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use cairn_chunk::codec;
use cairn_types::{ContainerId, Digest};

use super::{Repository, container_key, segment_error};
use crate::error::{Result, VaultError};
use crate::index::Location;

/// Decoded frames kept for later reads (64 frames of the 256 KiB target).
pub(crate) const FRAME_POOL_BYTES: usize = 16 << 20;
/// Neighbouring blobs of one container at most this far apart are read with one range read.
const READ_GAP: u64 = 256 << 10;
/// The largest merged range read.
const READ_MAX: u64 = 32 << 20;

/// A stored blob as sent to a client: its location and its frame's stored bytes (`None`:
/// the previous blob's frame).
pub type RawBlob = (Location, Option<Vec<u8>>);

/// A frame: its container and the offset of its stored bytes.
type FrameKey = (ContainerId, u32);

/// Recently decoded frames, least recently used first out.
#[derive(Default)]
pub(crate) struct FramePool {
    inner: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    frames: VecDeque<(FrameKey, Arc<Vec<u8>>)>,
    bytes: usize,
}

impl std::fmt::Debug for FramePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.lock();
        f.debug_struct("FramePool")
            .field("frames", &p.frames.len())
            .field("bytes", &p.bytes)
            .finish()
    }
}

impl FramePool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: FrameKey) -> Option<Arc<Vec<u8>>> {
        let mut p = self.lock();
        let at = p.frames.iter().rposition(|(k, _)| *k == key)?;
        let hit = p.frames.remove(at).expect("found");
        let frame = Arc::clone(&hit.1);
        p.frames.push_back(hit);
        Some(frame)
    }

    fn put(&self, key: FrameKey, frame: Arc<Vec<u8>>) {
        let mut p = self.lock();
        if p.frames.iter().any(|(k, _)| *k == key) {
            return;
        }
        p.bytes += frame.len();
        p.frames.push_back((key, frame));
        while p.bytes > FRAME_POOL_BYTES {
            let Some((_, old)) = p.frames.pop_front() else {
                break;
            };
            p.bytes -= old.len();
        }
    }
}

impl Repository {
    /// Reads and verifies many blobs, in order, merging reads of neighbouring blobs of one
    /// container into one range read (restores read whole runs of a container at once).
    /// A frame is decoded once for a run of its members, and not again while the frame pool
    /// keeps it.
    pub fn read_many(&self, digests: &[Digest]) -> Result<Vec<Vec<u8>>> {
        let locs = self.locate_all(digests)?;
        let keys = self.key_ref();
        let fail = |i: usize, e| {
            self.note_damage(&digests[i], &locs[i]);
            segment_error(&digests[i], &locs[i], e)
        };
        let mut out = vec![Vec::new(); digests.len()];
        let mut todo = Vec::with_capacity(digests.len());
        for (i, loc) in locs.iter().enumerate() {
            let m = loc.member();
            let pooled = (!m.is_whole())
                .then(|| self.frames.get((loc.container, loc.offset)))
                .flatten();
            match pooled {
                Some(frame) => {
                    out[i] = codec::member_of(keys, &frame, m, &digests[i])
                        .map_err(|e| fail(i, e))?
                        .to_vec();
                }
                None => todo.push(i),
            }
        }
        let mut last: Option<(FrameKey, Arc<Vec<u8>>)> = None;
        self.for_each_stored(&locs, &todo, |i, loc, stored| {
            let (d, m) = (&digests[i], loc.member());
            if m.is_whole() {
                out[i] = codec::decode(keys, loc.codec, stored, m.raw_len as usize, d)
                    .map_err(|e| fail(i, e))?;
                return Ok(());
            }
            let key = (loc.container, loc.offset);
            let frame = match &last {
                Some((k, f)) if *k == key => Arc::clone(f),
                _ => {
                    let f = codec::decode_frame(keys, loc.codec, stored, m.frame_len as usize, d)
                        .map_err(|e| fail(i, e))?;
                    let f = Arc::new(f);
                    self.frames.put(key, Arc::clone(&f));
                    last = Some((key, Arc::clone(&f)));
                    f
                }
            };
            out[i] = codec::member_of(keys, &frame, m, d)
                .map_err(|e| fail(i, e))?
                .to_vec();
            Ok(())
        })?;
        Ok(out)
    }

    /// The stored (still encoded) frames of segments, with their locations, for sending to
    /// a client that verifies them itself; `None` where the frame is the previous one's.
    /// Reads like [`read_many`](Self::read_many).
    pub fn read_many_raw(&self, digests: &[Digest]) -> Result<Vec<RawBlob>> {
        self.read_raw_at(&self.locate_all(digests)?)
    }

    /// [`read_many_raw`](Self::read_many_raw) of `required`, plus the `optional` digests
    /// packed in a frame that a required one is in (see [`crate::Vault::fetch_near`]). Each
    /// answer names its index in `required ++ optional`; answers of one frame are adjacent,
    /// so each frame is sent once.
    pub fn read_near_raw(
        &self,
        required: &[Digest],
        optional: &[Digest],
    ) -> Result<Vec<(usize, RawBlob)>> {
        let req = self.locate_all(required)?;
        let frames: std::collections::HashSet<FrameKey> = req
            .iter()
            .filter(|l| !l.member().is_whole())
            .map(|l| (l.container, l.offset))
            .collect();
        let mut picked: Vec<(usize, Location)> = req.into_iter().enumerate().collect();
        for (i, l) in self.locate_many(optional)?.into_iter().enumerate() {
            if let Some(l) = l.filter(|l| frames.contains(&(l.container, l.offset))) {
                picked.push((required.len() + i, l));
            }
        }
        // Frames in container order; a frame's members together.
        picked.sort_by_key(|(i, l)| (l.container, l.offset, *i));
        let locs: Vec<Location> = picked.iter().map(|p| p.1).collect();
        let raw = self.read_raw_at(&locs)?;
        Ok(picked.into_iter().map(|p| p.0).zip(raw).collect())
    }

    /// The stored frames at `locs`, in order; `None` where the frame is the previous one's.
    fn read_raw_at(&self, locs: &[Location]) -> Result<Vec<RawBlob>> {
        let all: Vec<usize> = (0..locs.len()).collect();
        let mut out: Vec<RawBlob> = Vec::with_capacity(locs.len());
        self.for_each_stored(locs, &all, |_, loc, stored| {
            let same = out.last().is_some_and(|(l, _)| {
                (l.container, l.offset) == (loc.container, loc.offset) && !loc.member().is_whole()
            });
            out.push((*loc, (!same).then(|| stored.to_vec())));
            Ok(())
        })?;
        Ok(out)
    }

    /// Where every blob lies; a missing one is an error.
    fn locate_all(&self, digests: &[Digest]) -> Result<Vec<Location>> {
        self.locate_stored(digests)
    }

    /// Calls `f(i, locs[i], stored bytes)` for every `i` of `order`, in that order, reading
    /// neighbouring blobs of one container (at most `READ_GAP` apart, `READ_MAX` per read) with
    /// one range read.
    fn for_each_stored(
        &self,
        locs: &[Location],
        order: &[usize],
        mut f: impl FnMut(usize, &Location, &[u8]) -> Result<()>,
    ) -> Result<()> {
        // Tree nodes kept on local disk first (node_cache).
        let mut rest = Vec::with_capacity(order.len());
        for &k in order {
            match self.cached_node(&locs[k]) {
                Some(stored) => f(k, &locs[k], &stored)?,
                None => rest.push(k),
            }
        }
        let order = &rest[..];
        let mut i = 0;
        while i < order.len() {
            let first = locs[order[i]];
            let start = u64::from(first.offset);
            let mut end = start + u64::from(first.stored_len);
            let mut j = i + 1;
            while let Some(next) = order.get(j).map(|&k| &locs[k]) {
                let (at, len) = (u64::from(next.offset), u64::from(next.stored_len));
                if next.container != first.container
                    || at < start
                    || at > end + READ_GAP
                    || at + len - start > READ_MAX
                {
                    break;
                }
                end = end.max(at + len);
                j += 1;
            }
            let buf = self
                .store
                .get_range(&container_key(&first.container), start, end - start)?;
            for &k in &order[i..j] {
                let loc = &locs[k];
                let o = u64::from(loc.offset) - start;
                let piece = usize::try_from(o)
                    .ok()
                    .and_then(|o| buf.get(o..)?.get(..loc.stored_len as usize))
                    .ok_or_else(|| {
                        VaultError::Corrupt(format!(
                            "container {}: a read of {} bytes at {start} returned {}",
                            first.container,
                            end - start,
                            buf.len()
                        ))
                    })?;
                f(k, loc, piece)?;
                self.cache_node(loc, piece);
            }
            i = j;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> FrameKey {
        (ContainerId::from_slice(&[1; 16]).expect("16"), n)
    }

    #[test]
    fn the_pool_keeps_recent_frames_within_its_budget() {
        let pool = FramePool::default();
        let frame = || Arc::new(vec![0u8; 1 << 20]);
        for n in 0..20 {
            pool.put(key(n), frame());
        }
        // 16 MiB of 1 MiB frames: the first four are gone.
        assert!(pool.get(key(3)).is_none());
        assert!(pool.get(key(4)).is_some());
        // A hit is used recently: the next frame out is 5, not 4.
        pool.put(key(20), frame());
        assert!(pool.get(key(5)).is_none());
        assert!(pool.get(key(4)).is_some());
        assert_eq!(pool.lock().bytes, FRAME_POOL_BYTES);
        // Putting a frame twice keeps one copy.
        pool.put(key(4), frame());
        assert_eq!(pool.lock().frames.len(), 16);
    }
}
