//! Random reads of a snapshot: the recipe's entries with their offsets, and a binary search
//! to find the segments covering a range. Implements [`ReadAt`], so file-system parsers can
//! read a backed-up disk without restoring it.

use std::sync::Arc;

use cairn_chunk::{Entry, EntryKind};
use cairn_types::{Digest, ReadAt};

use crate::error::Result;
use crate::manifest::SnapshotManifest;
use crate::repo::Repository;

/// A readable snapshot.
#[derive(Debug)]
pub struct SnapshotReader {
    repo: Arc<Repository>,
    entries: Vec<Entry>,
    /// starts[i] = image offset of entries[i]; starts[len] = size.
    starts: Vec<u64>,
}

impl SnapshotReader {
    pub fn open(repo: Arc<Repository>, m: &SnapshotManifest) -> Result<Self> {
        let entries = repo.entries(m)?;
        let mut starts = Vec::with_capacity(entries.len() + 1);
        let mut acc = 0;
        for e in &entries {
            starts.push(acc);
            acc += u64::from(e.len);
        }
        starts.push(acc);
        Ok(Self {
            repo,
            entries,
            starts,
        })
    }

    pub fn size(&self) -> u64 {
        *self.starts.last().expect("at least one start")
    }

    /// Reads `[offset, offset + len)`, clamped to the image size; reads only the segments
    /// that cover it.
    pub fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        let first = self.starts.partition_point(|&s| s <= offset) - 1;
        let mut last = first;
        while self.starts[last + 1] < end {
            last += 1;
        }
        let digests: Vec<Digest> = self.entries[first..=last]
            .iter()
            .filter(|e| e.kind == EntryKind::Data)
            .map(|e| e.digest)
            .collect();
        let mut datas = self.repo.read_many(&digests)?.into_iter();
        let mut out = Vec::with_capacity((end - offset) as usize);
        for i in first..=last {
            let e = &self.entries[i];
            let (s, t) = (self.starts[i], self.starts[i + 1]);
            let (a, b) = (offset.max(s) - s, end.min(t) - s);
            match e.kind {
                EntryKind::Zero => out.resize(out.len() + (b - a) as usize, 0),
                EntryKind::Data => {
                    let d = datas.next().expect("one per data entry");
                    out.extend_from_slice(&d[a as usize..b as usize]);
                }
            }
        }
        Ok(out)
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
