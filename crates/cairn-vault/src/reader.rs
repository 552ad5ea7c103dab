//! Random reads of a snapshot: the recipe's entries with their offsets, and a binary search
//! to find the segments covering a range. Implements [`ReadAt`], so file-system parsers can
//! read a backed-up disk without restoring it.
//!
//! Works over any [`Vault`] (a local repository or a vault service). Only the segments that
//! cover a read are fetched, in one batch per read; a bounded cache (default 64 MiB, oldest
//! out first) keeps recently read segments so a parser's many small reads of the same metadata
//! block cost one fetch. [`SnapshotReader::stats`] counts what was fetched, which is how the
//! file catalog proves a single-file restore read only the file's segments. A reader made
//! [`with_neighbours`](SnapshotReader::with_neighbours) also takes, on each fetch, the recipe
//! neighbours that share a frame with what it fetched ([`Vault::fetch_near`]); they are
//! counted too.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cairn_chunk::{Entry, EntryKind};
use cairn_types::{Digest, ReadAt};

use crate::api::{LocalVault, Vault};
use crate::error::Result;
use crate::manifest::SnapshotManifest;
use crate::repo::Repository;

/// What a reader fetched from the vault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadStats {
    /// Segments fetched (cache misses).
    pub segments: u64,
    /// Plaintext bytes of those segments.
    pub bytes: u64,
}

#[derive(Default)]
struct Cache {
    map: HashMap<usize, Arc<Vec<u8>>>,
    order: VecDeque<usize>,
    bytes: usize,
}

/// A readable snapshot.
pub struct SnapshotReader {
    vault: Arc<dyn Vault>,
    entries: Vec<Entry>,
    /// starts[i] = image offset of entries[i]; starts[len] = size.
    starts: Vec<u64>,
    cache: Mutex<Cache>,
    cache_limit: usize,
    /// Recipe neighbours offered as optional on each fetch (see `with_neighbours`).
    neighbours: usize,
    fetched_segments: AtomicU64,
    fetched_bytes: AtomicU64,
}

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl SnapshotReader {
    /// A reader of a snapshot in a local repository.
    pub fn open(repo: Arc<Repository>, m: &SnapshotManifest) -> Result<Self> {
        Self::over(Arc::new(LocalVault { repo }), m)
    }

    /// A reader of a snapshot of any vault.
    pub fn over(vault: Arc<dyn Vault>, m: &SnapshotManifest) -> Result<Self> {
        let entries = vault.entries(m)?;
        let mut starts = Vec::with_capacity(entries.len() + 1);
        let mut acc = 0;
        for e in &entries {
            starts.push(acc);
            acc += u64::from(e.len);
        }
        starts.push(acc);
        Ok(Self {
            vault,
            entries,
            starts,
            cache: Mutex::new(Cache::default()),
            cache_limit: 64 << 20,
            neighbours: 0,
            fetched_segments: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
        })
    }

    /// Sets the segment cache's size (0 turns it off).
    pub fn with_cache_limit(mut self, bytes: usize) -> Self {
        self.cache_limit = bytes;
        self
    }

    /// On every fetch, also offers up to `n` recipe neighbours after the read and `n / 2`
    /// before it as optional ([`Vault::fetch_near`]): those packed in a frame the fetch pays
    /// for anyway come back and are cached. For parsers that jump around (a file-system scan
    /// through a vault service, which sends whole frames); they cost no extra transfer.
    pub fn with_neighbours(mut self, n: usize) -> Self {
        self.neighbours = n;
        self
    }

    pub fn size(&self) -> u64 {
        *self.starts.last().expect("at least one start")
    }

    /// Segments and bytes fetched from the vault so far.
    pub fn stats(&self) -> ReadStats {
        ReadStats {
            segments: self.fetched_segments.load(Ordering::Relaxed),
            bytes: self.fetched_bytes.load(Ordering::Relaxed),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `[offset, offset + len)`, clamped to the image size; fetches only the segments
    /// that cover it and are not cached.
    pub fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        let want = usize::try_from(end - offset).map_err(|_| {
            crate::error::VaultError::Invalid(format!(
                "a read of {} bytes does not fit in memory",
                end - offset
            ))
        })?;
        let first = self.starts.partition_point(|&s| s <= offset) - 1;
        let mut last = first;
        while self.starts[last + 1] < end {
            last += 1;
        }
        let mut have: HashMap<usize, Arc<Vec<u8>>> = HashMap::new();
        let mut missing: Vec<usize> = Vec::new();
        {
            let cache = self.cache();
            for i in first..=last {
                if self.entries[i].kind != EntryKind::Data {
                    continue;
                }
                match cache.map.get(&i) {
                    Some(d) => {
                        have.insert(i, Arc::clone(d));
                    }
                    None => missing.push(i),
                }
            }
        }
        if !missing.is_empty() {
            let digests: Vec<Digest> = missing.iter().map(|&i| self.entries[i].digest).collect();
            let near = self.neighbours_of(first, last);
            let near_digests: Vec<Digest> = near.iter().map(|&i| self.entries[i].digest).collect();
            let (datas, extra) = self.vault.fetch_near(&digests, &near_digests)?;
            let mut cache = self.cache();
            for (i, d) in missing.into_iter().zip(datas) {
                have.insert(i, self.keep(&mut cache, i, d));
            }
            for (k, d) in extra {
                if let Some(&i) = near.get(k) {
                    self.keep(&mut cache, i, d);
                }
            }
        }
        let mut out = Vec::with_capacity(want);
        for i in first..=last {
            let e = &self.entries[i];
            let (s, t) = (self.starts[i], self.starts[i + 1]);
            // Offsets into one entry, whose length is a u32.
            #[allow(clippy::cast_possible_truncation)]
            let (a, b) = ((offset.max(s) - s) as usize, (end.min(t) - s) as usize);
            match e.kind {
                EntryKind::Zero => out.resize(out.len() + (b - a), 0),
                EntryKind::Data => {
                    let d = have.get(&i).expect("fetched or cached");
                    let slice = d.get(a..b).ok_or_else(|| {
                        crate::error::VaultError::Corrupt(format!(
                            "segment {} is {} bytes, the recipe says {}",
                            e.digest,
                            d.len(),
                            e.len
                        ))
                    })?;
                    out.extend_from_slice(slice);
                }
            }
        }
        Ok(out)
    }
}

impl SnapshotReader {
    /// Counts a fetched segment and caches it (within the limit).
    fn keep(&self, cache: &mut Cache, i: usize, d: Vec<u8>) -> Arc<Vec<u8>> {
        self.fetched_segments.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes
            .fetch_add(d.len() as u64, Ordering::Relaxed);
        let d = Arc::new(d);
        if self.cache_limit > 0 && !cache.map.contains_key(&i) {
            cache.bytes += d.len();
            cache.map.insert(i, Arc::clone(&d));
            cache.order.push_back(i);
            while cache.bytes > self.cache_limit {
                let Some(old) = cache.order.pop_front() else {
                    break;
                };
                if let Some(x) = cache.map.remove(&old) {
                    cache.bytes -= x.len();
                }
            }
        }
        d
    }

    /// Data entries around `first..=last` that are not cached, for `fetch_near`.
    fn neighbours_of(&self, first: usize, last: usize) -> Vec<usize> {
        if self.neighbours == 0 || self.cache_limit == 0 {
            return Vec::new();
        }
        let cache = self.cache();
        let wanted =
            |i: &usize| self.entries[*i].kind == EntryKind::Data && !cache.map.contains_key(i);
        let after = (last + 1..self.entries.len())
            .take(self.neighbours)
            .filter(wanted);
        let before = (first.saturating_sub(self.neighbours / 2)..first).filter(wanted);
        after.chain(before).collect()
    }
}

impl ReadAt for SnapshotReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let data = self
            .read_range(offset, buf.len() as u64)
            .map_err(std::io::Error::other)?;
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(SnapshotReader::size(self))
    }
}
