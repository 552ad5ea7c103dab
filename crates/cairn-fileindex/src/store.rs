//! Durable file writes and the in-memory snapshot readers work on.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{IndexError, Result};
use crate::format::{LISTING_MAGIC, MANIFEST_MAGIC, MAX_BODY_RAW, PATHS_MAGIC, unseal};
use crate::listing::{ListingFile, VolumeListing};
use crate::manifest::{BackupRef, Manifest, listing_file, paths_file, records_file};
use crate::pack::{BlockCache, RecordPack};
use crate::paths::{PathPack, PathTable};
use crate::record::{self, FileRecord, Summary};

pub const MANIFEST: &str = "MANIFEST";
pub const LOCK: &str = "LOCK";

/// Writes `data` to `<name>.tmp` and fsyncs it; the caller renames and fsyncs the directory.
pub fn write_tmp(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf> {
    let tmp = dir.join(format!("{name}.tmp"));
    cairn_types::durable::write_synced(&tmp, data).map_err(|e| IndexError::io(&tmp, "write", e))?;
    Ok(tmp)
}

pub fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| IndexError::io(to, "rename", e))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    cairn_types::durable::sync_dir(dir).map_err(|e| IndexError::io(dir, "fsync directory", e))
}

/// Replaces the manifest durably: temp file, fsync, rename, directory fsync.
pub fn commit_manifest(dir: &Path, m: &Manifest) -> Result<u64> {
    let bytes = crate::format::seal(MANIFEST_MAGIC, &m.encode());
    let tmp = write_tmp(dir, MANIFEST, &bytes)?;
    rename(&tmp, &dir.join(MANIFEST))?;
    sync_dir(dir)?;
    Ok(bytes.len() as u64)
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let p = dir.join(name);
    let len = fs::metadata(&p)
        .map_err(|e| IndexError::io(&p, "stat", e))?
        .len();
    if len > MAX_BODY_RAW as u64 {
        return Err(IndexError::Corrupt {
            file: name.to_string(),
            offset: 0,
            reason: format!("file of {len} bytes exceeds the limit"),
        });
    }
    fs::read(&p).map_err(|e| IndexError::io(&p, "read", e))
}

/// Reads the manifest; `None` if the index has never been committed.
pub fn load_manifest(dir: &Path) -> Result<Option<Manifest>> {
    if !dir.join(MANIFEST).exists() {
        return Ok(None);
    }
    let data = read(dir, MANIFEST)?;
    let body = unseal(&data, MANIFEST_MAGIC).map_err(|e| e.in_file(MANIFEST))?;
    Manifest::decode(&body)
        .map(Some)
        .map_err(|e| e.in_file(MANIFEST))
}

/// Everything a query needs, immutable once published.
#[derive(Debug)]
pub struct State {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub paths: Arc<PathTable>,
    /// Sorted by first id.
    pub packs: Vec<Arc<RecordPack>>,
    pub blocks: Arc<BlockCache>,
}

impl State {
    /// Loads every pack the manifest names and checks it against the manifest.
    pub fn load(dir: &Path, manifest: Manifest, blocks: Arc<BlockCache>) -> Result<Self> {
        let mut paths = PathTable::new();
        for p in &manifest.path_packs {
            let name = paths_file(p.seq);
            let data = read(dir, &name)?;
            let body = unseal(&data, PATHS_MAGIC).map_err(|e| e.in_file(&name))?;
            let pack = PathPack::decode(&body).map_err(|e| e.in_file(&name))?;
            if pack.first_id != p.first_id || pack.entries.len() != p.count as usize {
                return Err(corrupt(&name, "path ids differ from the manifest"));
            }
            paths.extend(&pack).map_err(|e| corrupt(&name, e))?;
        }
        if paths.next_id() > manifest.next_path_id {
            return Err(corrupt(MANIFEST, "path packs exceed the next path id"));
        }
        while paths.next_id() < manifest.next_path_id {
            paths.push_dead();
        }
        let mut packs = Vec::with_capacity(manifest.record_packs.len());
        for p in &manifest.record_packs {
            let pack = RecordPack::open(&dir.join(records_file(p.seq)), p.seq, &blocks)?;
            if pack.layout.first_id != p.first_id || pack.layout.count != p.count {
                return Err(corrupt(pack.name(), "record ids differ from the manifest"));
            }
            packs.push(Arc::new(pack));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            paths: Arc::new(paths),
            packs,
            blocks,
        })
    }

    fn pack_of(&self, id: u32) -> Option<&Arc<RecordPack>> {
        let i = self.packs.partition_point(|p| p.layout.first_id <= id);
        let p = self.packs.get(i.checked_sub(1)?)?;
        p.contains(id).then_some(p)
    }

    /// The encoded bytes of record `id`, handed to `f`.
    pub fn with_record<T>(
        &self,
        id: u32,
        f: impl FnOnce(&[u8]) -> Result<T, crate::error::DecodeError>,
    ) -> Result<T> {
        let pack = self.pack_of(id).ok_or_else(|| {
            corrupt(
                MANIFEST,
                format!("a listing refers to record {id}, which no pack holds"),
            )
        })?;
        let (block, i) = pack.block_of(id)?;
        let bytes = block
            .get(i)
            .ok_or_else(|| corrupt(pack.name(), format!("record {id} missing from its block")))?;
        f(bytes).map_err(|e| corrupt(pack.name(), format!("record {id}: {}", e.reason)))
    }

    pub fn record(&self, id: u32, path: String) -> Result<FileRecord> {
        self.with_record(id, |b| record::decode(b, path))
    }

    pub fn summary(&self, id: u32) -> Result<Summary> {
        self.with_record(id, record::decode_summary)
    }

    /// Reads one listing file and checks it against the manifest entry of its backup.
    pub fn read_listing_file(&self, b: &BackupRef) -> Result<ListingFile> {
        let name = listing_file(b.listing_seq);
        let data = read(&self.dir, &name)?;
        let body = unseal(&data, LISTING_MAGIC).map_err(|e| e.in_file(&name))?;
        let file = ListingFile::decode(&body).map_err(|e| e.in_file(&name))?;
        if file.delta != b.base.is_some() {
            return Err(corrupt(
                &name,
                "kind (full or delta) differs from the manifest",
            ));
        }
        Ok(file)
    }

    /// Checks a resolved listing against the manifest and the id ranges.
    pub fn check_listing(&self, b: &BackupRef, vols: &[VolumeListing]) -> Result<()> {
        let name = listing_file(b.listing_seq);
        let mut files = 0u64;
        for v in vols {
            files += v.entries.len() as u64;
            for &(p, r) in &v.entries {
                if !self.paths.is_live(p) || r >= self.manifest.next_record_id {
                    return Err(corrupt(
                        &name,
                        format!("entry ({p}, {r}) refers to an unknown id"),
                    ));
                }
            }
        }
        if files != b.files {
            return Err(corrupt(&name, "file count differs from the manifest"));
        }
        Ok(())
    }
}

pub fn corrupt(file: &str, reason: impl Into<String>) -> IndexError {
    IndexError::Corrupt {
        file: file.to_string(),
        offset: 0,
        reason: reason.into(),
    }
}

/// Decoded listings by listing sequence number, bounded by a budget of entries.
#[derive(Debug, Default)]
pub struct ListingCache {
    map: HashMap<u64, Arc<Vec<VolumeListing>>>,
    entries: usize,
}

/// Listing entries kept decoded (8 bytes each: 64 MiB).
const CACHE_ENTRIES: usize = 8 << 20;

impl ListingCache {
    pub fn get(&self, seq: u64) -> Option<Arc<Vec<VolumeListing>>> {
        self.map.get(&seq).cloned()
    }

    pub fn insert(&mut self, seq: u64, l: Arc<Vec<VolumeListing>>) {
        let n: usize = l.iter().map(|v| v.entries.len()).sum();
        if self.entries + n > CACHE_ENTRIES {
            self.map.clear();
            self.entries = 0;
        }
        if self.map.insert(seq, l).is_none() {
            self.entries += n;
        }
    }

    pub fn remove(&mut self, seq: u64) {
        if let Some(l) = self.map.remove(&seq) {
            self.entries -= l.iter().map(|v| v.entries.len()).sum::<usize>();
        }
    }
}
