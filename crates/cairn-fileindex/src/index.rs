//! [`FileIndex`]: opening, adding backups and every query.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{IndexError, Result};
use crate::format::{LISTING_MAGIC, MAX_ID_LEN, PATHS_MAGIC, checksum, seal};
use crate::glob::Pattern;
use crate::listing::{ListingFile, MAX_CHAIN, VolumeListing, check_volume_name};
use crate::manifest::{
    BackupRef, Manifest, PackRef, is_data_file, listing_file, paths_file, records_file,
};
use crate::pack::{BlockCache, PackWriter, RecordPack};

/// Decoded record blocks kept in memory (all packs together).
const BLOCK_CACHE_BYTES: usize = 256 << 20;
use crate::paths::PathPack;
use crate::record::{self, FileRecord, TOMBSTONE, split_path};
use crate::store::{self, LOCK, ListingCache, MANIFEST, State};

/// What the caller knows about a backup being added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupMeta {
    /// Unique across the index.
    pub backup_id: String,
    pub vm: String,
    /// Creation time in milliseconds since the Unix epoch; orders a VM's versions.
    pub created_ms: i64,
    /// The previous backup of the same VM, if indexed.
    pub parent: Option<String>,
}

/// What `add_backup` stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddReport {
    pub files: u64,
    /// Records stored by this add.
    pub records_new: u64,
    /// Records that were already stored (unchanged files), costing only a listing entry.
    pub records_shared: u64,
    /// Directories the input implied but did not list, added as bare directory records.
    pub dirs_implied: u64,
    pub paths_new: u64,
    /// Bytes of all files written, manifest included.
    pub bytes_written: u64,
    /// Bytes of the new record pack (the new and changed files' metadata).
    pub record_bytes: u64,
    /// Bytes of the new path pack.
    pub path_bytes: u64,
    pub listing_bytes: u64,
}

/// One indexed backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub backup_id: String,
    pub vm: String,
    pub created_ms: i64,
    pub parent: Option<String>,
    pub files: u64,
    pub listing_bytes: u64,
}

/// One volume of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub disk: String,
    pub volume: String,
    pub files: u64,
}

/// Options of [`FileIndex::find`].
#[derive(Debug, Clone, Default)]
pub struct FindOptions {
    /// Only backups of this VM.
    pub vm: Option<String>,
    /// At most this many hits (0 = no limit).
    pub limit: usize,
}

/// A search result: one file in one backup. Strings are shared between hits, so large
/// result sets stay cheap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub backup_id: Arc<str>,
    pub vm: Arc<str>,
    pub created_ms: i64,
    pub disk: Arc<str>,
    pub volume: Arc<str>,
    /// Path within the volume.
    pub path: Arc<str>,
    pub kind: record::FileKind,
    pub size: u64,
    pub mtime_ns: Option<i64>,
}

/// One backup in which a file exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub backup_id: String,
    pub created_ms: i64,
    pub size: u64,
    pub mtime_ns: Option<i64>,
    /// The record differs from the previous version listed (always true for the first).
    pub changed: bool,
}

/// Totals of what the index holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub backups: u64,
    /// Listing entries over all backups.
    pub files: u64,
    pub paths: u64,
    pub records: u64,
    /// Bytes of the manifest and every file it names.
    pub bytes: u64,
}

/// The file index in one directory. See the crate docs for invariants.
#[derive(Debug)]
pub struct FileIndex {
    pub(crate) dir: PathBuf,
    _lock: File,
    pub(crate) state: RwLock<Arc<State>>,
    pub(crate) writer: Mutex<Writer>,
    pub(crate) listings: Mutex<ListingCache>,
}

/// State only the writer touches.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    /// Hash of each stored record's encoding → its id; built on the first add.
    pub(crate) hashes: Option<HashMap<[u8; 16], u32>>,
}

/// Removes the files of a failed add.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

impl FileIndex {
    /// Opens the index in `dir`, creating it if missing, and takes its lock.
    ///
    /// Files left by an interrupted add or removal are deleted here.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, "create directory", e))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| IndexError::io(&lock_path, "open", e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(IndexError::Locked(dir.into())),
            Err(fs::TryLockError::Error(e)) => return Err(IndexError::io(&lock_path, "lock", e)),
        }
        let manifest = store::load_manifest(dir)?.unwrap_or_else(Manifest::empty);
        let state = State::load(dir, manifest, Arc::new(BlockCache::new(BLOCK_CACHE_BYTES)))?;
        let index = Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            state: RwLock::new(Arc::new(state)),
            writer: Mutex::new(Writer::default()),
            listings: Mutex::new(ListingCache::default()),
        };
        index.remove_unreferenced()?;
        Ok(index)
    }

    /// The directory of the index.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes data files the manifest does not name (leftovers of interrupted work).
    pub(crate) fn remove_unreferenced(&self) -> Result<usize> {
        let live = self.snapshot().manifest.files();
        let mut n = 0;
        let rd = fs::read_dir(&self.dir).map_err(|e| IndexError::io(&self.dir, "list", e))?;
        for ent in rd {
            let ent = ent.map_err(|e| IndexError::io(&self.dir, "list", e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if (is_data_file(&name) && !live.contains(&name)) || name == "MANIFEST.tmp" {
                fs::remove_file(ent.path()).map_err(|e| IndexError::io(ent.path(), "remove", e))?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub(crate) fn snapshot(&self) -> Arc<State> {
        self.state.read().expect("state lock").clone()
    }

    /// Adds one backup's listing; see [`FileIndex::try_add_backup`].
    pub fn add_backup<V, I>(&self, meta: &BackupMeta, volumes: V) -> Result<AddReport>
    where
        V: IntoIterator<Item = (String, String, I)>,
        I: IntoIterator<Item = FileRecord>,
    {
        self.try_add_backup(
            meta,
            volumes.into_iter().map(|(d, v, files)| {
                (
                    d,
                    v,
                    files.into_iter().map(Ok::<_, std::convert::Infallible>),
                )
            }),
        )
    }

    /// Adds one backup: `(disk, volume, files)` per volume, files in any order.
    ///
    /// Records equal to one already stored (by any backup) are shared. The backup becomes
    /// visible atomically once everything is durable; if this fails — including when the
    /// record source yields an error — nothing is visible and the same call can be retried.
    pub fn try_add_backup<V, I, E>(&self, meta: &BackupMeta, volumes: V) -> Result<AddReport>
    where
        V: IntoIterator<Item = (String, String, I)>,
        I: IntoIterator<Item = Result<FileRecord, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    {
        let mut writer = self.writer.lock().expect("writer lock");
        let st = self.snapshot();
        check_meta(&st.manifest, meta)?;
        let hashes = match &mut writer.hashes {
            Some(h) => h,
            slot => slot.insert(record_hashes(&st)?),
        };

        let seq = st.manifest.next_seq;
        let (rec_seq, paths_seq, listing_seq) = (seq, seq + 1, seq + 2);
        let mut cleanup = Cleanup(Vec::new());
        let mut report = AddReport::default();
        let mut table = Cow::Borrowed(&*st.paths);
        let mut new_paths: Vec<(u32, String)> = Vec::new();
        let mut pending: HashMap<[u8; 16], u32> = HashMap::new();
        let mut pack: Option<PackWriter> = None;
        let mut enc = crate::format::Writer::default();
        let mut volumes_out: Vec<VolumeListing> = Vec::new();

        // Returns the record id for an encoded record, storing it if new.
        let mut store_record =
            |bytes: &[u8], pack: &mut Option<PackWriter>, report: &mut AddReport| -> Result<u32> {
                let h = checksum(bytes);
                if let Some(&id) = hashes.get(&h).or_else(|| pending.get(&h)) {
                    report.records_shared += 1;
                    return Ok(id);
                }
                if pack.is_none() {
                    let tmp = self.dir.join(format!("{}.tmp", records_file(rec_seq)));
                    cleanup.0.push(tmp.clone());
                    *pack = Some(PackWriter::create(&tmp, st.manifest.next_record_id)?);
                }
                let id = pack.as_mut().expect("created above").push(bytes)?;
                pending.insert(h, id);
                report.records_new += 1;
                Ok(id)
            };

        for (disk, volume, files) in volumes {
            check_volume_name(&disk)
                .and(check_volume_name(&volume))
                .map_err(IndexError::Invalid)?;
            if volumes_out
                .iter()
                .any(|v| v.disk == disk && v.volume == volume)
            {
                return Err(IndexError::invalid(format!(
                    "volume {disk}/{volume} given twice"
                )));
            }
            let mut entries: Vec<(u32, u32)> = Vec::new();
            for rec in files {
                let rec = rec.map_err(|e| IndexError::Source(e.into()))?;
                let components = split_path(&rec.path).map_err(IndexError::Invalid)?;
                let pid = match table.lookup(&rec.path) {
                    Some(id) => id,
                    None => table
                        .to_mut()
                        .resolve_or_insert(&rec.path, &components, &mut new_paths)
                        .map_err(IndexError::Invalid)?,
                };
                enc.buf.clear();
                record::encode(&rec, &mut enc).map_err(IndexError::Invalid)?;
                let rid = store_record(&enc.buf, &mut pack, &mut report)?;
                entries.push((pid, rid));
            }
            entries.sort_unstable();
            if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(IndexError::invalid(format!(
                    "{disk}/{volume}: path {} given twice",
                    table.path(w[0].0)
                )));
            }
            // Every listed path's parent is listed too, so `list` can walk down the tree.
            let mut implied = HashSet::new();
            for &(pid, _) in &entries {
                let mut p = pid;
                while let Some(parent) = table.parent(p) {
                    if parent == 0
                        || entries.binary_search_by_key(&parent, |e| e.0).is_ok()
                        || implied.contains(&parent)
                    {
                        break;
                    }
                    implied.insert(parent);
                    p = parent;
                }
            }
            if !implied.is_empty() {
                enc.buf.clear();
                record::encode(&FileRecord::dir(""), &mut enc).map_err(IndexError::Invalid)?;
                for parent in implied {
                    let rid = store_record(&enc.buf, &mut pack, &mut report)?;
                    entries.push((parent, rid));
                    report.dirs_implied += 1;
                }
                entries.sort_unstable();
            }
            report.files += entries.len() as u64;
            volumes_out.push(VolumeListing {
                disk,
                volume,
                entries,
            });
        }

        // Write everything under temporary names, then rename into place.
        let mut renames = Vec::new();
        let mut new_packs = Vec::new();
        let mut manifest = st.manifest.clone();
        if let Some(w) = pack {
            let count = w.count();
            report.record_bytes = w.finish()?;
            report.bytes_written += report.record_bytes;
            let tmp = self.dir.join(format!("{}.tmp", records_file(rec_seq)));
            renames.push((tmp, self.dir.join(records_file(rec_seq))));
            manifest.record_packs.push(PackRef {
                seq: rec_seq,
                first_id: st.manifest.next_record_id,
                count,
            });
            manifest.next_record_id += count;
            new_packs.push(rec_seq);
        }
        if !new_paths.is_empty() {
            let first_id = st.manifest.next_path_id;
            let bytes = seal(
                PATHS_MAGIC,
                &PathPack {
                    first_id,
                    entries: new_paths,
                }
                .encode(),
            );
            report.paths_new = (table.next_id() - first_id) as u64;
            report.path_bytes = bytes.len() as u64;
            report.bytes_written += bytes.len() as u64;
            let tmp = store::write_tmp(&self.dir, &paths_file(paths_seq), &bytes)?;
            cleanup.0.push(tmp.clone());
            renames.push((tmp, self.dir.join(paths_file(paths_seq))));
            manifest.path_packs.push(PackRef {
                seq: paths_seq,
                first_id,
                count: report.paths_new as u32,
            });
            manifest.next_path_id = table.next_id();
        }
        // A delta from the parent's listing when the chain stays short and the delta small.
        let mut file = ListingFile::full(&volumes_out);
        let mut base_seq = None;
        if let Some(p) = meta.parent.as_deref().and_then(|p| st.manifest.backup(p)) {
            let depth = st
                .manifest
                .chain_len(p)
                .map_err(|e| store::corrupt(MANIFEST, e))?;
            if depth < MAX_CHAIN {
                let delta = ListingFile::delta(&self.listing_of(&st, p)?, &volumes_out);
                if delta.items() as u64 <= report.files / 4 {
                    (file, base_seq) = (delta, Some(p.listing_seq));
                }
            }
        }
        let bytes = seal(LISTING_MAGIC, &file.encode());
        report.listing_bytes = bytes.len() as u64;
        report.bytes_written += bytes.len() as u64;
        let tmp = store::write_tmp(&self.dir, &listing_file(listing_seq), &bytes)?;
        cleanup.0.push(tmp.clone());
        renames.push((tmp, self.dir.join(listing_file(listing_seq))));
        for (from, to) in &renames {
            store::rename(from, to)?;
            cleanup.0.push(to.clone());
        }
        store::sync_dir(&self.dir)?;

        let mut packs = st.packs.clone();
        for s in new_packs {
            packs.push(Arc::new(RecordPack::open(
                &self.dir.join(records_file(s)),
                s,
                &st.blocks,
            )?));
        }
        manifest.generation += 1;
        manifest.next_seq = seq + 3;
        manifest.backups.push(BackupRef {
            backup_id: meta.backup_id.clone(),
            vm: meta.vm.clone(),
            created_ms: meta.created_ms,
            parent: meta.parent.clone(),
            listing_seq,
            base: base_seq,
            files: report.files,
            listing_bytes: report.listing_bytes,
        });
        report.bytes_written += store::commit_manifest(&self.dir, &manifest)?;
        // Committed: from here on nothing may fail.
        cleanup.0.clear();
        hashes.extend(pending);
        let paths = match table {
            Cow::Borrowed(_) => st.paths.clone(),
            Cow::Owned(t) => Arc::new(t),
        };
        let next = State {
            dir: self.dir.clone(),
            manifest,
            paths,
            packs,
            blocks: st.blocks.clone(),
        };
        self.listings
            .lock()
            .expect("cache lock")
            .insert(listing_seq, Arc::new(volumes_out));
        *self.state.write().expect("state lock") = Arc::new(next);
        Ok(report)
    }

    /// Every indexed backup, by VM and creation time.
    pub fn backups(&self) -> Vec<BackupInfo> {
        let st = self.snapshot();
        let mut v: Vec<BackupInfo> = st.manifest.backups.iter().map(info).collect();
        v.sort_by(|a, b| {
            (&a.vm, a.created_ms, &a.backup_id).cmp(&(&b.vm, b.created_ms, &b.backup_id))
        });
        v
    }

    /// Totals, including the bytes on disk.
    pub fn stats(&self) -> Result<IndexStats> {
        let st = self.snapshot();
        let mut bytes = fs::metadata(self.dir.join(MANIFEST)).map_or(0, |m| m.len());
        for name in st.manifest.files() {
            let p = self.dir.join(&name);
            bytes += fs::metadata(&p)
                .map_err(|e| IndexError::io(&p, "stat", e))?
                .len();
        }
        let mut paths = 0;
        st.paths.for_each(false, |_, _| paths += 1);
        Ok(IndexStats {
            backups: st.manifest.backups.len() as u64,
            files: st.manifest.backups.iter().map(|b| b.files).sum(),
            paths: paths - 1,
            records: st
                .manifest
                .record_packs
                .iter()
                .map(|p| u64::from(p.count))
                .sum(),
            bytes,
        })
    }

    pub(crate) fn listing(
        &self,
        st: &State,
        backup_id: &str,
    ) -> Result<(BackupRef, Arc<Vec<VolumeListing>>)> {
        let b = st
            .manifest
            .backup(backup_id)
            .ok_or_else(|| IndexError::NotFound(backup_id.to_string()))?
            .clone();
        let l = self.listing_of(st, &b)?;
        Ok((b, l))
    }

    /// The resolved listing of `b`: cached, or read with its chain of bases (each listing
    /// on the way is cached too).
    pub(crate) fn listing_of(&self, st: &State, b: &BackupRef) -> Result<Arc<Vec<VolumeListing>>> {
        let cached = |seq| self.listings.lock().expect("cache lock").get(seq);
        if let Some(l) = cached(b.listing_seq) {
            return Ok(l);
        }
        let mut chain = vec![b];
        let mut resolved: Arc<Vec<VolumeListing>> = Arc::new(Vec::new());
        while let Some(seq) = chain[chain.len() - 1].base {
            if let Some(l) = cached(seq) {
                resolved = l;
                break;
            }
            // The manifest's chains were checked when it was decoded.
            let base = st
                .manifest
                .by_listing(seq)
                .ok_or_else(|| store::corrupt(MANIFEST, format!("missing base listing {seq}")))?;
            chain.push(base);
        }
        for r in chain.iter().rev() {
            let file = st.read_listing_file(r)?;
            let vols = file
                .resolve(&resolved)
                .map_err(|e| store::corrupt(&listing_file(r.listing_seq), e))?;
            st.check_listing(r, &vols)?;
            resolved = Arc::new(vols);
            self.listings
                .lock()
                .expect("cache lock")
                .insert(r.listing_seq, resolved.clone());
        }
        Ok(resolved)
    }

    /// The volumes of a backup.
    pub fn volumes(&self, backup_id: &str) -> Result<Vec<VolumeInfo>> {
        let st = self.snapshot();
        let (_, l) = self.listing(&st, backup_id)?;
        Ok(l.iter()
            .map(|v| VolumeInfo {
                disk: v.disk.clone(),
                volume: v.volume.clone(),
                files: v.entries.len() as u64,
            })
            .collect())
    }

    fn volume<'a>(
        l: &'a [VolumeListing],
        backup_id: &str,
        disk: &str,
        volume: &str,
    ) -> Result<&'a VolumeListing> {
        l.iter()
            .find(|v| v.disk == disk && v.volume == volume)
            .ok_or_else(|| {
                IndexError::invalid(format!(
                    "backup {backup_id:?} has no volume {disk}/{volume}"
                ))
            })
    }

    /// One file, or `None` if the backup's volume does not hold `path`. The volume root `/`
    /// always exists (as a bare directory if the input did not list it).
    pub fn get(
        &self,
        backup_id: &str,
        disk: &str,
        volume: &str,
        path: &str,
    ) -> Result<Option<FileRecord>> {
        let st = self.snapshot();
        let (_, l) = self.listing(&st, backup_id)?;
        let vol = Self::volume(&l, backup_id, disk, volume)?;
        let Some(pid) = st.paths.lookup(path) else {
            return Ok(None);
        };
        match vol.record_of(pid) {
            Some(rid) => st.record(rid, path.to_string()).map(Some),
            None if pid == 0 => Ok(Some(FileRecord::dir("/"))),
            None => Ok(None),
        }
    }

    /// The children of directory `path` in one volume of a backup, sorted by name; empty if
    /// the directory does not exist there.
    pub fn list(
        &self,
        backup_id: &str,
        disk: &str,
        volume: &str,
        path: &str,
    ) -> Result<Vec<FileRecord>> {
        let st = self.snapshot();
        let (_, l) = self.listing(&st, backup_id)?;
        let vol = Self::volume(&l, backup_id, disk, volume)?;
        let Some(pid) = st.paths.lookup(path) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for &child in st.paths.children(pid) {
            if let Some(rid) = vol.record_of(child) {
                out.push(st.record(rid, st.paths.path(child).to_string())?);
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Everything at or below `prefix` in one volume of a backup, in path order (parents
    /// before children), decoded as the iterator advances.
    pub fn walk(&self, backup_id: &str, disk: &str, volume: &str, prefix: &str) -> Result<Walk> {
        let st = self.snapshot();
        let (_, l) = self.listing(&st, backup_id)?;
        let vol = Self::volume(&l, backup_id, disk, volume)?;
        let mut items: Vec<(u32, u32)> = match st.paths.lookup(prefix) {
            None => Vec::new(),
            Some(top) => vol
                .entries
                .iter()
                .copied()
                .filter(|&(p, _)| st.paths.is_under(p, top))
                .collect(),
        };
        let order = st.paths.rank();
        items.sort_unstable_by_key(|&(p, _)| order[p as usize]);
        Ok(Walk::new(st, items))
    }

    /// Files whose path matches `pattern` in every backup (of `opts.vm`, if given), newest
    /// backup first, then by disk, volume and path.
    pub fn find(&self, pattern: &Pattern, opts: &FindOptions) -> Result<Vec<Hit>> {
        let st = self.snapshot();
        // Match every distinct path once, then rank the matches in path order so that the
        // per-volume sort below compares integers.
        let mut matched: Vec<u32> = Vec::new();
        st.paths.for_each(pattern.is_case_insensitive(), |id, p| {
            if pattern.matches(p) {
                matched.push(id);
            }
        });
        let mut hits = Vec::new();
        if matched.is_empty() {
            return Ok(hits);
        }
        let order = st.paths.rank();
        matched.sort_unstable_by_key(|&id| order[id as usize]);
        let mut rank = vec![u32::MAX; st.paths.next_id() as usize];
        for (i, &id) in matched.iter().enumerate() {
            rank[id as usize] = i as u32;
        }
        let mut path_strs: Vec<Option<Arc<str>>> = vec![None; matched.len()];
        let mut records: Vec<u32> = Vec::new();

        let mut backups: Vec<&BackupRef> = st
            .manifest
            .backups
            .iter()
            .filter(|b| opts.vm.as_ref().is_none_or(|vm| *vm == b.vm))
            .collect();
        backups.sort_by(|a, b| (b.created_ms, &a.backup_id).cmp(&(a.created_ms, &b.backup_id)));
        let limit = if opts.limit == 0 {
            usize::MAX
        } else {
            opts.limit
        };
        let mut found: Vec<(u32, u32)> = Vec::new();
        'scan: for b in backups {
            let l = self.listing_of(&st, b)?;
            let mut vols: Vec<&VolumeListing> = l.iter().collect();
            vols.sort_by(|x, y| (&x.disk, &x.volume).cmp(&(&y.disk, &y.volume)));
            let (backup_id, vm): (Arc<str>, Arc<str>) =
                (b.backup_id.as_str().into(), b.vm.as_str().into());
            for v in vols {
                found.clear();
                // Few matches: look each up (already in path order). Many: one pass over
                // the listing.
                if matched.len() * 24 < v.entries.len() {
                    found.extend(
                        matched
                            .iter()
                            .enumerate()
                            .filter_map(|(k, &id)| v.record_of(id).map(|r| (k as u32, r))),
                    );
                } else {
                    found.extend(v.entries.iter().filter_map(|&(p, r)| {
                        let k = rank[p as usize];
                        (k != u32::MAX).then_some((k, r))
                    }));
                    found.sort_unstable();
                }
                if found.is_empty() {
                    continue;
                }
                let (disk, volume): (Arc<str>, Arc<str>) =
                    (v.disk.as_str().into(), v.volume.as_str().into());
                for &(k, r) in &found {
                    if hits.len() >= limit {
                        break 'scan;
                    }
                    records.push(r);
                    let path = path_strs[k as usize]
                        .get_or_insert_with(|| st.paths.path(matched[k as usize]).into())
                        .clone();
                    hits.push(Hit {
                        backup_id: backup_id.clone(),
                        vm: vm.clone(),
                        created_ms: b.created_ms,
                        disk: disk.clone(),
                        volume: volume.clone(),
                        path,
                        kind: record::FileKind::Other,
                        size: 0,
                        mtime_ns: None,
                    });
                }
            }
        }
        // Fill in sizes and times reading each record once, in id order (which is block
        // order), so large result sets do not hop between blocks.
        let mut order: Vec<usize> = (0..hits.len()).collect();
        order.sort_unstable_by_key(|&i| records[i]);
        let mut last: Option<(u32, record::Summary)> = None;
        for i in order {
            let r = records[i];
            let s = match last {
                Some((lr, s)) if lr == r => s,
                _ => st.summary(r)?,
            };
            last = Some((r, s));
            let h = &mut hits[i];
            (h.kind, h.size, h.mtime_ns) = (s.kind, s.size, s.mtime_ns);
        }
        Ok(hits)
    }

    /// Every backup of `vm` holding `path` in `disk`/`volume`, oldest first.
    pub fn versions(&self, vm: &str, disk: &str, volume: &str, path: &str) -> Result<Vec<Version>> {
        let st = self.snapshot();
        let mut out = Vec::new();
        let Some(pid) = st.paths.lookup(path) else {
            return Ok(out);
        };
        let mut backups: Vec<&BackupRef> =
            st.manifest.backups.iter().filter(|b| b.vm == vm).collect();
        backups.sort_by(|a, b| (a.created_ms, &a.backup_id).cmp(&(b.created_ms, &b.backup_id)));
        let mut prev = None;
        for b in backups {
            let l = self.listing_of(&st, b)?;
            let Some(v) = l.iter().find(|v| v.disk == disk && v.volume == volume) else {
                continue;
            };
            let Some(rid) = v.record_of(pid) else {
                continue;
            };
            let s = st.summary(rid)?;
            out.push(Version {
                backup_id: b.backup_id.clone(),
                created_ms: b.created_ms,
                size: s.size,
                mtime_ns: s.mtime_ns,
                changed: prev != Some(rid),
            });
            prev = Some(rid);
        }
        Ok(out)
    }
}

/// The iterator [`FileIndex::walk`] returns.
#[derive(Debug)]
pub struct Walk {
    state: Arc<State>,
    /// `(path id, record id)` in path order.
    items: Vec<(u32, u32)>,
    pos: usize,
    /// Decoded records of the current chunk, in path order.
    ready: std::collections::VecDeque<Result<FileRecord>>,
}

/// Records decoded together, in record-id (block) order, then handed out in path order.
const WALK_CHUNK: usize = 4096;

impl Walk {
    fn new(state: Arc<State>, items: Vec<(u32, u32)>) -> Self {
        Self {
            state,
            items,
            pos: 0,
            ready: std::collections::VecDeque::new(),
        }
    }

    fn fill(&mut self) {
        let end = (self.pos + WALK_CHUNK).min(self.items.len());
        let chunk = &self.items[self.pos..end];
        let mut order: Vec<usize> = (0..chunk.len()).collect();
        order.sort_unstable_by_key(|&i| chunk[i].1);
        let mut out: Vec<Option<Result<FileRecord>>> = (0..chunk.len()).map(|_| None).collect();
        for i in order {
            let (p, r) = chunk[i];
            out[i] = Some(self.state.record(r, self.state.paths.path(p).to_string()));
        }
        self.ready.extend(out.into_iter().flatten());
        self.pos = end;
    }
}

impl Iterator for Walk {
    type Item = Result<FileRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ready.is_empty() && self.pos < self.items.len() {
            self.fill();
        }
        self.ready.pop_front()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.ready.len() + self.items.len() - self.pos;
        (n, Some(n))
    }
}

fn info(b: &BackupRef) -> BackupInfo {
    BackupInfo {
        backup_id: b.backup_id.clone(),
        vm: b.vm.clone(),
        created_ms: b.created_ms,
        parent: b.parent.clone(),
        files: b.files,
        listing_bytes: b.listing_bytes,
    }
}

fn check_meta(m: &Manifest, meta: &BackupMeta) -> Result<()> {
    for (what, s) in [("backup id", &meta.backup_id), ("vm", &meta.vm)] {
        if s.is_empty() || s.len() > MAX_ID_LEN {
            return Err(IndexError::invalid(format!(
                "{what} must have 1 to {MAX_ID_LEN} bytes"
            )));
        }
    }
    if m.backup(&meta.backup_id).is_some() {
        return Err(IndexError::invalid(format!(
            "backup {:?} is already indexed",
            meta.backup_id
        )));
    }
    if let Some(p) = &meta.parent {
        match m.backup(p) {
            None => {
                return Err(IndexError::invalid(format!(
                    "parent backup {p:?} is not indexed"
                )));
            }
            Some(b) if b.vm != meta.vm => {
                return Err(IndexError::invalid(format!(
                    "parent backup {p:?} belongs to VM {:?}",
                    b.vm
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Hashes every live stored record (done once per open, on the first add).
pub(crate) fn record_hashes(st: &State) -> Result<HashMap<[u8; 16], u32>> {
    let mut out = HashMap::new();
    for pack in &st.packs {
        for (b, e) in pack.layout.blocks.iter().enumerate() {
            let block = pack.block(b)?;
            for i in 0..e.count {
                let bytes = block.get(i as usize).unwrap_or(&[TOMBSTONE]);
                if bytes != [TOMBSTONE] {
                    out.insert(checksum(bytes), pack.layout.first_id + e.first_index + i);
                }
            }
        }
    }
    Ok(out)
}
