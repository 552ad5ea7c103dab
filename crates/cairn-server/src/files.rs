//! The file catalog: every file of every backup, searchable, restorable one at a time (also
//! straight back into primary storage).
//!
//! - **Indexing** runs as its own job (`index`) after a backup is recorded, off the backup's
//!   data path: for each disk the storage agent that holds it parses the disk image straight
//!   from the vault (`/v1/files/scan`) and returns the listing; the server stores it in the
//!   file index (`cairn-fileindex`, `STATE/files/`), sharing what is unchanged with the
//!   VM's previous indexed backup.
//! - **Paths** the API shows are `/<disk>/<volume>/<path in the volume>`, e.g.
//!   `/vda/p1/etc/hostname` (`whole` for an unpartitioned disk).
//! - **Restore** of a file asks the storage agent for its bytes (`/v1/files/read`), which
//!   fetches only the vault segments covering the file's extents and says how many bytes that
//!   was; a directory comes back as a tar stream. These are file contents handed to the
//!   operator, counted apart from disk data (`file_bytes`).

use std::sync::atomic::Ordering;

use std::sync::Arc;

use cairn_api::StorageAgentApi;
use cairn_api::server::{
    EntryKind, FileHit, FileInfo, FileRestoredInto, FileVersion, IndexDone, IndexedVolume,
    JobResult,
};
use cairn_api::storage::{FileEntry, FileRestoreRequest, ReadFileRequest, ScanRequest};
use cairn_catalog::{BackupDisk, BackupRecord};
use cairn_fileindex::{BackupMeta, FileIndex, FileKind, FileRecord, FindOptions, Pattern};

use crate::engine::Flow;
use crate::{JobCtx, JobKind, Result, Server, ServerError};

pub(crate) fn index_err(e: cairn_fileindex::IndexError) -> ServerError {
    ServerError::Failed(format!("file index: {e}"))
}

/// A file-system entry as the file index keeps it (the kind and the extents are the one
/// file model of `cairn-types`; the rest is renamed and narrowed).
pub fn to_record(e: FileEntry) -> FileRecord {
    FileRecord {
        path: e.path,
        kind: e.kind,
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime_ns: e.mtime,
        atime_ns: e.atime,
        ctime_ns: e.ctime,
        crtime_ns: e.crtime,
        nlink: e.nlink.map(u64::from),
        inode: Some(e.inode),
        attributes: e.fat_attributes.map(u32::from).or(e.ntfs_attributes),
        link_target: e.symlink_target,
        security: e.ntfs_security_id.map(|id| id.to_le_bytes().to_vec()),
        extents: e.extents,
        inline: e.inline_data,
        compressed: e.compressed,
    }
}

/// What the storage agent needs to read a file back (and restore its mode and mtime).
pub(crate) fn to_entry(r: &FileRecord) -> FileEntry {
    let mut e = FileEntry::new(r.path.clone(), FileKind::File, r.inode.unwrap_or(0));
    e.size = r.size;
    e.mode = r.mode;
    e.uid = r.uid;
    e.gid = r.gid;
    e.mtime = r.mtime_ns;
    e.extents = r.extents.clone();
    e.inline_data = r.inline.clone();
    e.compressed = r.compressed.clone();
    e
}

/// Queues the `index` job of a just-recorded backup, a follow-up of the backup's job (it
/// runs off the backup's data path).
pub fn queue_index(ctx: &JobCtx<'_>, backup: &str) {
    let index = JobKind::Index {
        backup: backup.into(),
    };
    match crate::jobs::spec(index).and_then(|spec| ctx.submit(spec)) {
        Ok(j) => ctx.info(format!("file catalog: index job {} queued", j.id)),
        Err(e) => ctx.warn(format!("file catalog: not indexed: {}", e.chain())),
    }
}

/// The `index` job.
pub struct IndexFlow;

impl Flow<Server> for IndexFlow {
    fn kind(&self) -> &'static str {
        "index"
    }

    fn run(&self, ctx: &JobCtx<'_>, params: &JobKind) -> Result<JobResult> {
        match params {
            JobKind::Index { backup } => index_backup(ctx, backup),
            other => Err(crate::jobs::not_for(other, self.kind())),
        }
    }
}

/// Indexes one recorded backup (the `index` job).
pub fn index_backup(ctx: &JobCtx<'_>, backup: &str) -> Result<JobResult> {
    let s = ctx.app;
    let b = s.catalog.backup(backup)?;
    let files = s.files()?;
    let indexed = files.backups();
    if indexed.iter().any(|x| b.id == x.backup_id) {
        return Ok(JobResult::Index(IndexDone {
            backup: b.id.to_string(),
            already_indexed: true,
            volumes: Vec::new(),
            files: 0,
            records_new: 0,
            records_shared: 0,
            bytes_written: 0,
        }));
    }
    let parent = indexed
        .into_iter()
        .filter(|x| x.vm == b.vm && x.created_ms <= b.created_ms)
        .max_by_key(|x| x.created_ms)
        .map(|x| x.backup_id);
    let mut volumes = Vec::new();
    let mut report = Vec::new();
    for d in b.disks.iter().filter(|d| d.rdm.is_none()) {
        let c = s.storage_agent(&d.storage_agent)?;
        let scan = c
            .scan_files(&ScanRequest {
                vault: s.config.vault.clone(),
                snapshot: d.vault_snapshot.clone(),
            })
            .map_err(ServerError::call(format!(
                "scan disk {} of {}",
                d.disk, b.id
            )))?;
        let volume_count = scan.volumes.len();
        for v in scan.volumes {
            let fs = format!("{:?}", v.partition.fs);
            if let Some(why) = v.not_indexed {
                ctx.warn(format!("{}/{}: not indexed: {why}", d.disk, v.volume));
                report.push(IndexedVolume {
                    disk: d.disk.clone(),
                    volume: v.volume,
                    files: 0,
                    complete: false,
                    fs,
                    not_indexed: Some(why),
                });
                continue;
            }
            let (volume, complete, errors, entries) = (v.volume, v.complete, v.errors, v.files);
            if !complete {
                ctx.warn(format!(
                    "{}/{volume}: partial listing: {}",
                    d.disk,
                    errors.join("; ")
                ));
            }
            report.push(IndexedVolume {
                disk: d.disk.clone(),
                volume: volume.clone(),
                files: entries.len() as u64,
                complete,
                fs,
                not_indexed: None,
            });
            volumes.push((
                d.disk.clone(),
                volume,
                entries.into_iter().map(to_record).collect::<Vec<_>>(),
            ));
        }
        ctx.info(format!(
            "{}: {} volume(s) parsed in {} ms, {} B of metadata read from the vault",
            d.disk, volume_count, scan.elapsed_ms, scan.read.bytes
        ));
    }
    if volumes.is_empty() {
        ctx.warn(format!(
            "backup {}: no volume could be indexed; its files cannot be searched",
            b.id
        ));
    }
    let added = files
        .add_backup(
            &BackupMeta {
                backup_id: b.id.to_string(),
                vm: b.vm.clone(),
                created_ms: b.created_ms,
                parent,
            },
            volumes,
        )
        .map_err(index_err)?;
    ctx.info(format!(
        "indexed {} files: {} new records, {} shared with the previous backup, {} B written",
        added.files, added.records_new, added.records_shared, added.bytes_written
    ));
    s.catalog.set_backup_volumes(b.id.as_ref(), &report)?;
    Ok(JobResult::Index(IndexDone {
        backup: b.id.to_string(),
        already_indexed: false,
        volumes: report,
        files: added.files,
        records_new: added.records_new,
        records_shared: added.records_shared,
        bytes_written: added.bytes_written,
    }))
}

/// Splits `/<disk>/<volume>/<path>` into its parts (the path part defaults to `/`).
pub fn split(path: &str) -> (Option<&str>, Option<&str>, String) {
    let mut it = path.trim_start_matches('/').splitn(3, '/');
    let disk = it.next().filter(|s| !s.is_empty());
    let volume = it.next().filter(|s| !s.is_empty());
    let rest = format!("/{}", it.next().unwrap_or("").trim_end_matches('/'));
    (disk, volume, rest)
}

fn file_info(disk: &str, volume: &str, r: &FileRecord) -> FileInfo {
    FileInfo {
        path: format!(
            "/{disk}/{volume}{}",
            if r.path == "/" { "" } else { r.path.as_str() }
        ),
        kind: r.kind.into(),
        files: None,
        size: Some(r.size),
        mode: r.mode,
        uid: r.uid,
        gid: r.gid,
        mtime_ns: r.mtime_ns,
        link_target: r.link_target.clone(),
        extents: Some(r.extents.len() as u64),
        not_indexed: None,
    }
}

/// A file found in the index.
pub(crate) struct Found {
    pub(crate) b: BackupRecord,
    pub(crate) disk: String,
    pub(crate) volume: String,
    pub(crate) r: FileRecord,
}

impl Server {
    /// The file index (opened at start).
    pub fn files(&self) -> Result<&FileIndex> {
        self.files
            .as_ref()
            .map_err(|e| ServerError::Failed(format!("file index unavailable: {e}")))
    }

    /// `ls`: volumes of a backup, or a directory's entries.
    pub fn files_ls(&self, backup: &str, path: &str) -> Result<Vec<FileInfo>> {
        let b = self.catalog.backup(backup)?;
        let files = self.files()?;
        let (disk, volume, rest) = split(path);
        let (Some(disk), Some(volume)) = (disk, volume) else {
            let vols = files.volumes(&b.id).map_err(index_err)?;
            let volume = |disk: &str, volume: &str, files, not_indexed| FileInfo {
                path: format!("/{disk}/{volume}"),
                kind: EntryKind::Volume,
                files,
                size: None,
                mode: None,
                uid: None,
                gid: None,
                mtime_ns: None,
                link_target: None,
                extents: None,
                not_indexed,
            };
            let mut out: Vec<FileInfo> = vols
                .iter()
                .filter(|v| disk.is_none_or(|d| d == v.disk))
                .map(|v| volume(&v.disk, &v.volume, Some(v.files), None))
                .collect();
            // The volumes that were found but not indexed, with the reason.
            let skipped = self
                .catalog
                .backup_volumes(b.id.as_ref())?
                .unwrap_or_default();
            out.extend(
                skipped
                    .into_iter()
                    .filter(|v| disk.is_none_or(|d| d == v.disk))
                    .filter_map(|v| {
                        let why = v.not_indexed?;
                        Some(volume(&v.disk, &v.volume, None, Some(why)))
                    }),
            );
            return Ok(out);
        };
        let list = files.list(&b.id, disk, volume, &rest).map_err(index_err)?;
        Ok(list.iter().map(|r| file_info(disk, volume, r)).collect())
    }

    /// `find`: files matching a glob or substring across all backups.
    pub fn files_find(
        &self,
        pattern: &str,
        vm: Option<String>,
        limit: usize,
        icase: bool,
    ) -> Result<Vec<FileHit>> {
        let mut p = Pattern::new(pattern)
            .map_err(|e| ServerError::Invalid(format!("pattern {pattern:?}: {e}")))?;
        if icase {
            p = p.case_insensitive();
        }
        let hits = self
            .files()?
            .find(&p, &FindOptions { vm, limit })
            .map_err(index_err)?;
        Ok(hits
            .iter()
            .map(|h| FileHit {
                backup: h.backup_id.to_string(),
                vm: h.vm.to_string(),
                created_ms: h.created_ms,
                path: format!("/{}/{}{}", h.disk, h.volume, h.path),
                kind: h.kind.into(),
                size: h.size,
                mtime_ns: h.mtime_ns,
            })
            .collect())
    }

    /// `versions`: one file across a VM's backups.
    pub fn files_versions(&self, vm: &str, path: &str) -> Result<Vec<FileVersion>> {
        let (Some(disk), Some(volume), rest) = split(path) else {
            return Err(ServerError::Invalid(format!(
                "path {path:?}: /<disk>/<volume>/<path>"
            )));
        };
        let v = self
            .files()?
            .versions(vm, disk, volume, &rest)
            .map_err(index_err)?;
        Ok(v.into_iter()
            .map(|x| FileVersion {
                backup: x.backup_id,
                created_ms: x.created_ms,
                size: x.size,
                mtime_ns: x.mtime_ns,
                changed: x.changed,
            })
            .collect())
    }

    /// The backup and the indexed record at `/<disk>/<volume>/<path>`.
    pub(crate) fn find_file(&self, backup: &str, path: &str) -> Result<Found> {
        let b = self.catalog.backup(backup)?;
        let (Some(disk), Some(volume), rest) = split(path) else {
            return Err(ServerError::Invalid(format!(
                "path {path:?}: /<disk>/<volume>/<path>"
            )));
        };
        let r = self
            .files()?
            .get(&b.id, disk, volume, &rest)
            .map_err(index_err)?
            .ok_or_else(|| ServerError::NotFound(format!("{path} in backup {}", b.id)))?;
        Ok(Found {
            disk: disk.to_string(),
            volume: volume.to_string(),
            b,
            r,
        })
    }

    /// Disk `disk` of backup `b` and a client of the storage agent that holds it.
    pub(crate) fn disk_source<'b>(
        &self,
        b: &'b BackupRecord,
        disk: &str,
    ) -> Result<(&'b BackupDisk, Arc<dyn StorageAgentApi>)> {
        let d = b
            .disks
            .iter()
            .find(|d| d.disk == disk)
            .ok_or_else(|| ServerError::NotFound(format!("disk {disk} in backup {}", b.id)))?;
        Ok((d, self.storage_agent(&d.storage_agent)?))
    }

    /// Reads one regular file through the storage agent `c`: (bytes, vault bytes fetched).
    fn read_one(
        &self,
        c: &dyn StorageAgentApi,
        d: &BackupDisk,
        r: &FileRecord,
    ) -> Result<(Vec<u8>, u64)> {
        let (data, stats) = c
            .read_file(&ReadFileRequest {
                vault: self.config.vault.clone(),
                snapshot: d.vault_snapshot.clone(),
                entry: to_entry(r),
            })
            .map_err(ServerError::call(format!("read {}", r.path)))?;
        let fetched = stats.bytes;
        self.file_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok((data, fetched))
    }

    /// Restores one file into primary storage — a datastore of a storage agent (by
    /// default the one holding the backed-up disk) at `dest` — without the bytes passing
    /// through this server.
    pub fn files_restore_into(
        &self,
        backup: &str,
        path: &str,
        storage_agent: Option<&str>,
        datastore: Option<&str>,
        dest: &str,
    ) -> Result<FileRestoredInto> {
        let Found { b, disk, volume, r } = self.find_file(backup, path)?;
        if r.kind != FileKind::File {
            return Err(ServerError::Invalid(format!(
                "{path} is not a regular file"
            )));
        }
        let d = b
            .disks
            .iter()
            .find(|d| d.disk == disk)
            .ok_or_else(|| ServerError::NotFound(format!("disk {disk} in backup {}", b.id)))?;
        let agent = storage_agent.unwrap_or(&d.storage_agent);
        let c = self.storage_agent(agent)?;
        let entry = to_entry(&r);
        let restored = c
            .restore_file(&FileRestoreRequest {
                vault: self.config.vault.clone(),
                snapshot: d.vault_snapshot.clone(),
                entry,
                datastore: datastore.unwrap_or(&d.datastore).to_string(),
                dest: dest.to_string(),
            })
            .map_err(ServerError::call(format!("restore {path} into {agent}")))?;
        Ok(FileRestoredInto {
            path: restored.path,
            bytes: restored.bytes,
            vault_bytes_read: restored.vault_bytes_read,
            vault_segments_read: restored.vault_segments_read,
            storage_agent: agent.to_string(),
            file: file_info(&disk, &volume, &r),
        })
    }

    /// A file's bytes, or a directory as a tar stream: (body, is_tar, the file, vault bytes
    /// fetched).
    pub fn files_content(
        &self,
        backup: &str,
        path: &str,
    ) -> Result<(Vec<u8>, bool, FileInfo, u64)> {
        let Found { b, disk, volume, r } = self.find_file(backup, path)?;
        let files = self.files()?;
        let (d, c) = self.disk_source(&b, &disk)?;
        let rest = r.path.clone();
        match r.kind {
            FileKind::File => {
                let (data, fetched) = self.read_one(&*c, d, &r)?;
                Ok((data, false, file_info(&disk, &volume, &r), fetched))
            }
            FileKind::Dir => {
                let mut tar = tar::Builder::new(Vec::new());
                let mut fetched = 0;
                let base = rest
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_string();
                let strip = rest.len() - base.len();
                for item in files
                    .walk(&b.id, &disk, &volume, &rest)
                    .map_err(index_err)?
                {
                    let f = item.map_err(index_err)?;
                    let name = f.path.get(strip..).unwrap_or("").trim_start_matches('/');
                    let name = if name.is_empty() { "." } else { name };
                    let mut h = tar::Header::new_gnu();
                    h.set_mode(f.mode.unwrap_or(0o644) & 0o7777);
                    h.set_uid(f.uid.unwrap_or(0).into());
                    h.set_gid(f.gid.unwrap_or(0).into());
                    h.set_mtime(f.mtime_ns.map_or(0, |t| (t.max(0) / 1_000_000_000) as u64));
                    let io = |e: std::io::Error| ServerError::Failed(format!("tar: {e}"));
                    match f.kind {
                        FileKind::Dir => {
                            h.set_entry_type(tar::EntryType::Directory);
                            h.set_size(0);
                            tar.append_data(&mut h, name, std::io::empty())
                                .map_err(io)?;
                        }
                        FileKind::Symlink => {
                            h.set_entry_type(tar::EntryType::Symlink);
                            h.set_size(0);
                            tar.append_link(&mut h, name, f.link_target.as_deref().unwrap_or(""))
                                .map_err(io)?;
                        }
                        FileKind::File => {
                            let (data, n) = self.read_one(&*c, d, &f)?;
                            fetched += n;
                            h.set_entry_type(tar::EntryType::Regular);
                            h.set_size(data.len() as u64);
                            tar.append_data(&mut h, name, &data[..]).map_err(io)?;
                        }
                        FileKind::Other => {}
                    }
                }
                let body = tar
                    .into_inner()
                    .map_err(|e| ServerError::Failed(format!("tar: {e}")))?;
                Ok((body, true, file_info(&disk, &volume, &r), fetched))
            }
            _ => Err(ServerError::Invalid(format!(
                "{path} is not a file or directory"
            ))),
        }
    }
}
