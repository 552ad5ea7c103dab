//! The file catalog's data side: the storage agent parses a backed-up disk
//! image straight from the vault, and reads single files from it, so the backup server gets
//! file listings and files but never disk images.
//!
//! - [`StorageAgent::scan_files`]: partition table and every file of every volume, each with
//!   its extents as byte ranges of the disk image. Reads go through a [`SnapshotReader`]:
//!   only the segments holding file-system metadata are fetched.
//! - [`StorageAgent::read_file`]: one file's bytes, fetching only the segments that cover its
//!   extents; the returned [`ReadStats`] prove it.
//!
//! A volume is named `whole` on an unpartitioned disk, `pN` (the partition's index)
//! otherwise, and `VG-LV` for an LVM logical volume. A volume that holds nothing readable
//! (encrypted, swap, a thin LV, unknown contents) is listed with the reason and no files. A
//! damaged file system yields a partial listing with its errors, never a panic.

use std::io::Write;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use cairn_fs::{DiskLayout, FileEntry, Limits, Partition, PartitionType, TableKind};
use cairn_vault::Vault;
use cairn_vault::reader::{ReadStats, SnapshotReader};

use crate::agent::StorageAgent;
use crate::error::{Result, StorageError};

pub use cairn_api::storage::{ScanResult, ScannedVolume};

/// The volume name of a partition: `whole`, `pN`, or `VG-LV` for an LVM logical volume
/// (dashes inside either name doubled, as device-mapper names it: `rhel-root`).
pub fn volume_name(layout: &DiskLayout, p: &Partition) -> String {
    if let PartitionType::LogicalVolume { vg, lv, .. } = &p.part_type {
        format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
    } else if layout.table == TableKind::None {
        "whole".into()
    } else {
        format!("p{}", p.index)
    }
}

/// Recipe neighbours a scan offers on each fetch ([`SnapshotReader::with_neighbours`]).
const SCAN_NEIGHBOURS: usize = 8;

fn fs_error(what: &str) -> impl FnOnce(cairn_fs::Error) -> StorageError + '_ {
    move |e| StorageError::Invalid(format!("{what}: {e}"))
}

impl StorageAgent {
    fn snapshot_reader(&self, vault: Arc<dyn Vault>, snapshot: &str) -> Result<SnapshotReader> {
        let m = vault.find(snapshot)?;
        Ok(SnapshotReader::over(vault, &m)?)
    }

    /// Lists every file of every volume of `snapshot`.
    pub fn scan_files(&self, vault: Arc<dyn Vault>, snapshot: &str) -> Result<ScanResult> {
        let started = Instant::now();
        // A scan jumps between metadata blocks: the rest of each frame comes along.
        let reader = self
            .snapshot_reader(vault, snapshot)?
            .with_neighbours(SCAN_NEIGHBOURS);
        let layout = cairn_fs::scan(&reader).map_err(fs_error(snapshot))?;
        let limits = Limits::default();
        let mut volumes = Vec::new();
        for p in &layout.partitions {
            let volume = volume_name(&layout, p);
            if !p.readable() {
                // Named with the reason, never silently skipped; an LVM physical volume
                // whose logical volumes were found is covered by them.
                if let Some(why) = p.not_indexed_reason() {
                    volumes.push(ScannedVolume {
                        volume,
                        partition: p.clone(),
                        complete: false,
                        errors: Vec::new(),
                        files: Vec::new(),
                        not_indexed: Some(why),
                    });
                }
                continue;
            }
            let mut files = Vec::new();
            let (complete, errors) = match cairn_fs::walk(&reader, p, &limits, |e| {
                files.push(e);
                ControlFlow::Continue(())
            }) {
                Ok(r) => (
                    r.errors.is_empty() && r.errors_dropped == 0,
                    r.errors.iter().map(|e| format!("{e:?}")).collect(),
                ),
                Err(e) => (false, vec![e.to_string()]),
            };
            volumes.push(ScannedVolume {
                volume,
                partition: p.clone(),
                complete,
                errors,
                files,
                not_indexed: None,
            });
        }
        let read = reader.stats();
        self.counters
            .received
            .fetch_add(read.bytes, Ordering::Relaxed);
        Ok(ScanResult {
            snapshot: snapshot.into(),
            layout,
            volumes,
            read: cairn_api::storage::ReadStats {
                segments: read.segments,
                bytes: read.bytes,
            },
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Restore into primary storage: writes one file of `snapshot` into this agent's storage — the datastore
    /// `datastore` at the relative path `dest` (which must not exist) — with its mode and
    /// modification time. Data goes vault → here only; returns what was fetched.
    pub fn restore_file_into(
        &self,
        vault: Arc<dyn Vault>,
        snapshot: &str,
        entry: &FileEntry,
        datastore: &str,
        dest: &str,
    ) -> Result<(std::path::PathBuf, ReadStats)> {
        let ds = self.datastore(datastore)?;
        let target = ds.path.join(crate::datastore::check_relative(dest)?);
        if target.exists() {
            return Err(StorageError::Invalid(format!(
                "{} exists",
                target.display()
            )));
        }
        let dir = target.parent().unwrap_or(&ds.path).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(StorageError::io(&dir, "create"))?;
        let tmp = dir.join(format!(".cairn-restore-{}", std::process::id()));
        let r = (|| -> Result<ReadStats> {
            let mut f = std::fs::File::create(&tmp).map_err(StorageError::io(&tmp, "create"))?;
            let stats = self.read_file(vault, snapshot, entry, &mut f)?;
            if let Some(mode) = entry.mode {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(StorageError::io(&tmp, "chmod"))?;
            }
            if let Some(ns) = entry.mtime {
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
                f.set_modified(t)
                    .map_err(StorageError::io(&tmp, "set mtime"))?;
            }
            f.sync_all().map_err(StorageError::io(&tmp, "fsync"))?;
            std::fs::rename(&tmp, &target).map_err(StorageError::io(&target, "rename"))?;
            cairn_types::durable::sync_dir(&dir).map_err(StorageError::io(&dir, "fsync"))?;
            self.counters
                .disk_written
                .fetch_add(entry.size, Ordering::Relaxed);
            Ok(stats)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok((target, r?))
    }

    /// Writes the content of `entry` (as listed by a scan of `snapshot`) to `out`, fetching
    /// only the segments covering its extents.
    pub fn read_file(
        &self,
        vault: Arc<dyn Vault>,
        snapshot: &str,
        entry: &FileEntry,
        out: &mut dyn Write,
    ) -> Result<ReadStats> {
        // No cache: every segment is read once anyway, and the counters stay exact.
        let reader = self.snapshot_reader(vault, snapshot)?.with_cache_limit(0);
        cairn_fs::copy_file(&reader, entry, out).map_err(fs_error(&entry.path))?;
        let read = reader.stats();
        self.counters
            .received
            .fetch_add(read.bytes, Ordering::Relaxed);
        Ok(read)
    }
}
