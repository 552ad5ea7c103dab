//! Raw LUN mappings (raw device mappings): a VM disk that is a raw LUN rather than an image.
//!
//! A LUN is either a block device (used whole) or a "LUN-like" file in the datastore's
//! `luns/` directory. Resolving a virtual disk id gives an [`RdmMapping`]: the LUN's
//! identifier and the extents it occupies on its device (for a file: its FIEMAP physical
//! extents; for a block device: one extent covering it). The mapping is kept as the mapping
//! file `luns/NAME.rdm.json` next to the LUN.
//!
//! A backup carries all three parts: the **data** (snapshot `NAME`, labels `rdm_lun` and
//! `rdm_map_snapshot`), the **identifier** and the **mapping** (a small snapshot
//! `NAME.rdm-map` holding the mapping file). A restore writes the data onto a new LUN (a new
//! file in `luns/`, or a given block device), resolves the new LUN's extents and writes its
//! mapping file, recording which backup and which original LUN it came from.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use cairn_chunk::EntryKind;
use cairn_types::ReadAt;
use cairn_vault::Vault;
use cairn_vault::imager::{self, BackupOptions, NoProgress};

use crate::agent::{BackupRequest, BackupResult, StorageAgent};
use crate::catalog::write_json_atomic;
use crate::datastore::{DatastoreConfig, check_relative};
use crate::error::{Result, StorageError};
use crate::provider::DiskSnapshot;
use crate::restore::{RestoreMode, RestoreRequest};
use crate::sys::PhysExtent;
use cairn_types::DiskFormat;

/// Version of the mapping file.
pub const RDM_MAP_VERSION: u32 = 1;
/// Suffix of mapping files in `luns/`.
pub const RDM_MAP_SUFFIX: &str = ".rdm.json";
/// Suffix of the mapping snapshot's name in the vault.
pub const RDM_MAP_SNAPSHOT_SUFFIX: &str = ".rdm-map";

pub use cairn_api::storage::{LunId, LunKind, RdmMapping, RdmRestore, RestoredFrom};

fn dev_id(dev: u64) -> String {
    format!("dev:{}:{}", libc::major(dev), libc::minor(dev))
}

/// Path of the LUN for `disk_id` in a datastore (`luns/NAME`, or an absolute device path).
pub fn lun_path(ds: &DatastoreConfig, disk_id: &str) -> Result<PathBuf> {
    if disk_id.starts_with("/dev/") {
        return Ok(PathBuf::from(disk_id));
    }
    let rel = check_relative(disk_id)?;
    if !disk_id.starts_with("luns/") {
        return Err(StorageError::Invalid(format!(
            "{disk_id:?} is not a LUN (expected luns/NAME or /dev/...)"
        )));
    }
    Ok(ds.path.join(rel))
}

/// Where the mapping file of `lun` lives.
pub fn mapping_file(ds: &DatastoreConfig, lun: &Path) -> PathBuf {
    let name = lun
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lun".into());
    ds.path.join("luns").join(format!("{name}{RDM_MAP_SUFFIX}"))
}

/// Resolves a LUN to its mapping (does not write the mapping file).
pub fn resolve_path(disk_id: &str, path: &Path) -> Result<RdmMapping> {
    // Follow a symlink in luns/ to the device.
    let md = std::fs::metadata(path).map_err(StorageError::io(path, "stat"))?;
    let f = File::open(path).map_err(StorageError::io(path, "open"))?;
    let size = ReadAt::size(&f).map_err(StorageError::io(path, "size"))?;
    let (lun, extents) = if md.file_type().is_block_device() {
        let lun = LunId {
            kind: LunKind::BlockDevice,
            path: path.to_path_buf(),
            device: dev_id(md.rdev()),
            inode: None,
            size,
        };
        (
            lun,
            vec![PhysExtent {
                logical: 0,
                physical: 0,
                len: size,
                flags: 0,
            }],
        )
    } else if md.is_file() {
        let map = crate::sys::fiemap(&f).map_err(StorageError::io(path, "FIEMAP"))?;
        let lun = LunId {
            kind: LunKind::File,
            path: path.to_path_buf(),
            device: dev_id(md.dev()),
            inode: Some(md.ino()),
            size,
        };
        (lun, map)
    } else {
        return Err(StorageError::Invalid(format!(
            "{} is neither a file nor a block device",
            path.display()
        )));
    };
    Ok(RdmMapping {
        version: RDM_MAP_VERSION,
        disk_id: disk_id.to_string(),
        lun,
        extents,
        restored_from: None,
    })
}

/// Resolves the virtual disk `disk_id` of datastore `ds` and writes its mapping file.
pub fn resolve(ds: &DatastoreConfig, disk_id: &str) -> Result<RdmMapping> {
    let path = lun_path(ds, disk_id)?;
    let m = resolve_path(disk_id, &path)?;
    write_json_atomic(&mapping_file(ds, &path), &m)?;
    Ok(m)
}

/// An RDM backup: the data snapshot and the mapping snapshot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RdmBackup {
    pub data: BackupResult,
    pub mapping_snapshot: String,
    pub mapping: RdmMapping,
}

/// Reads a whole (small) snapshot into memory.
fn read_snapshot(vault: &dyn Vault, spec: &str, limit: u64) -> Result<Vec<u8>> {
    let m = vault.find(spec)?;
    if m.size > limit {
        return Err(StorageError::Invalid(format!(
            "snapshot {spec} has {} bytes, more than {limit}",
            m.size
        )));
    }
    let entries = vault.entries(&m)?;
    let digests: Vec<_> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Data)
        .map(|e| e.digest)
        .collect();
    let mut datas = vault.fetch(&digests)?.into_iter();
    let mut out = Vec::with_capacity(m.size as usize);
    for e in entries {
        match e.kind {
            EntryKind::Zero => out.resize(out.len() + e.len as usize, 0),
            EntryKind::Data => {
                out.extend(datas.next().ok_or_else(|| {
                    StorageError::Invalid("vault returned too few segments".into())
                })?)
            }
        }
    }
    Ok(out)
}

impl StorageAgent {
    /// Backs up the RDM disk `disk_id` of datastore `datastore`: mapping file, mapping
    /// snapshot (`NAME.rdm-map`) and data snapshot (`req.name`).
    pub fn backup_rdm(
        &self,
        vault: &dyn Vault,
        datastore: &str,
        disk_id: &str,
        req: &BackupRequest,
    ) -> Result<RdmBackup> {
        let ds = self.datastore(datastore)?.clone();
        let mapping = resolve(&ds, disk_id)?;
        let json = serde_json::to_vec_pretty(&mapping).map_err(|e| StorageError::Parse {
            what: "mapping".into(),
            message: e.to_string(),
        })?;
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("kind".into(), "rdm-map".into());
        labels.insert("rdm_disk".into(), disk_id.to_string());
        let map_snap = imager::backup(
            vault,
            &json,
            &BackupOptions {
                name: format!("{}{RDM_MAP_SNAPSHOT_SUFFIX}", req.name),
                labels,
                threads: 1,
                ..Default::default()
            },
            &NoProgress,
        )?;
        let mut req = req.clone();
        req.labels.insert("kind".into(), "rdm".into());
        req.labels.insert("rdm_disk".into(), disk_id.to_string());
        req.labels.insert(
            "rdm_lun".into(),
            serde_json::to_string(&mapping.lun).map_err(|e| StorageError::Parse {
                what: "lun".into(),
                message: e.to_string(),
            })?,
        );
        req.labels
            .insert("rdm_map_snapshot".into(), map_snap.id.to_string());
        let snap = DiskSnapshot {
            disk: mapping.lun.path.clone(),
            image: mapping.lun.path.clone(),
            format: DiskFormat::Raw,
            internal: None,
            size: mapping.lun.size,
        };
        let data = self.backup_disk(vault, &snap, &req)?;
        Ok(RdmBackup {
            data,
            mapping_snapshot: map_snap.id.to_string(),
            mapping,
        })
    }

    /// Restores an RDM backup onto a new LUN `new_disk_id` (`luns/NAME`, created; or an
    /// existing block device `/dev/...`, overwritten) and writes the new mapping file.
    pub fn restore_rdm(
        &self,
        vault: &dyn Vault,
        datastore: &str,
        snapshot: &str,
        new_disk_id: &str,
    ) -> Result<RdmRestore> {
        let ds = self.datastore(datastore)?.clone();
        let data = vault.find(snapshot)?;
        if data.labels.get("kind").map(String::as_str) != Some("rdm") {
            return Err(StorageError::Invalid(format!(
                "snapshot {snapshot} is not an RDM backup"
            )));
        }
        let map_id = data.labels.get("rdm_map_snapshot").ok_or_else(|| {
            StorageError::Invalid(format!("snapshot {snapshot} lacks its mapping"))
        })?;
        let bytes = read_snapshot(vault, map_id, 64 << 20)?;
        let original: RdmMapping =
            serde_json::from_slice(&bytes).map_err(|e| StorageError::Parse {
                what: format!("mapping snapshot {map_id}"),
                message: e.to_string(),
            })?;
        let target = lun_path(&ds, new_disk_id)?;
        if let Some(p) = target
            .parent()
            .filter(|_| !new_disk_id.starts_with("/dev/"))
        {
            std::fs::create_dir_all(p).map_err(StorageError::io(p, "create"))?;
        }
        let report = self.restore(
            vault,
            &RestoreRequest {
                snapshot: data.id.to_string(),
                target: target.clone(),
                format: DiskFormat::Raw,
                mode: RestoreMode::New,
            },
        )?;
        let mut mapping = resolve_path(new_disk_id, &target)?;
        mapping.restored_from = Some(RestoredFrom {
            snapshot: data.id.to_string(),
            lun: original.lun.clone(),
        });
        let mapping_file = mapping_file(&ds, &target);
        write_json_atomic(&mapping_file, &mapping)?;
        Ok(RdmRestore {
            report,
            original,
            mapping,
            mapping_file,
        })
    }
}
