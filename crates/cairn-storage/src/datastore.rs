//! Datastores, their disks, and the storage units that hold them.
//!
//! A **datastore** is a directory of VM disk images (qcow2 and raw files) plus, in its `luns/`
//! subdirectory, raw LUNs used as raw device mappings (files, or symlinks to block devices).
//! A **storage unit** is the file system (volume) a datastore lives on, identified by its
//! device id, mount point and type; a storage-unit snapshot (targeted group snapshot) covers every disk on
//! one unit. Several datastores may share a unit.
//!
//! Listing never opens an image for writing: formats and sizes come from
//! `qemu-img info -U` (shared lock), so running VMs are not disturbed. Hidden entries
//! (snapshot directories such as `.cairn-snapshots`) are not disks.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Result, StorageError};
use cairn_types::DiskFormat;

use crate::qemu;

/// Where a datastore is (configuration).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatastoreConfig {
    pub name: String,
    pub path: PathBuf,
}

pub use cairn_api::storage::{DatastoreInfo, DiskInfo, DiskKind, StorageUnit};

fn unescape_mount(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(mount point, fs type)` of the mount holding `path` (already canonical).
fn mount_of(path: &Path) -> Result<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(StorageError::io("/proc/self/mountinfo", "read"))?;
    let mut best: Option<(PathBuf, String)> = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < 5 || dash + 1 >= f.len() {
            continue;
        }
        let mp = PathBuf::from(unescape_mount(f[4]));
        if path.starts_with(&mp) {
            let longer = best
                .as_ref()
                .map(|(b, _)| mp.components().count() >= b.components().count())
                .unwrap_or(true);
            if longer {
                best = Some((mp, f[dash + 1].to_string()));
            }
        }
    }
    best.ok_or_else(|| StorageError::NotFound(format!("mount holding {}", path.display())))
}

/// The storage unit holding `path`.
pub fn storage_unit(path: &Path) -> Result<StorageUnit> {
    let canon = path
        .canonicalize()
        .map_err(StorageError::io(path, "resolve"))?;
    let md = std::fs::metadata(&canon).map_err(StorageError::io(&canon, "stat"))?;
    let dev = md.dev();
    let (mount_point, fs_type) = mount_of(&canon)?;
    let fs_magic = crate::sys::fs_magic(&canon).map_err(StorageError::io(&canon, "statfs"))?;
    Ok(StorageUnit {
        id: format!("dev:{}:{}", libc::major(dev), libc::minor(dev)),
        device: dev,
        mount_point,
        reflink_capable: matches!(fs_type.as_str(), "xfs" | "btrfs" | "ocfs2" | "bcachefs"),
        fs_type,
        fs_magic,
    })
}

/// Rejects ids that would leave the datastore (`..`, absolute paths).
pub fn check_relative(id: &str) -> Result<&Path> {
    let p = Path::new(id);
    if id.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(StorageError::Invalid(format!(
            "disk id {id:?} must be a relative path inside the datastore"
        )));
    }
    Ok(p)
}

/// Describes one disk (image or LUN) at `path`.
pub fn disk_info(ds_path: &Path, path: &Path) -> Result<DiskInfo> {
    let id = path
        .strip_prefix(ds_path)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned();
    let md = std::fs::metadata(path).map_err(StorageError::io(path, "stat"))?;
    let is_lun = id.starts_with("luns/") || md.file_type().is_block_device();
    if md.file_type().is_block_device() {
        let size = cairn_types::ReadAt::size(
            &std::fs::File::open(path).map_err(StorageError::io(path, "open"))?,
        )
        .map_err(StorageError::io(path, "size"))?;
        return Ok(DiskInfo {
            id,
            path: path.to_path_buf(),
            kind: DiskKind::Lun,
            format: DiskFormat::Raw,
            virtual_size: size,
            actual_size: size,
            backing_file: None,
            bitmaps: Vec::new(),
            unit: format!("dev:{}:{}", libc::major(md.rdev()), libc::minor(md.rdev())),
        });
    }
    let info = if is_lun {
        // A LUN is raw by definition: never probe (its content may look like anything).
        qemu::ImageInfo {
            format: DiskFormat::Raw,
            virtual_size: md.len(),
            actual_size: md.blocks() * 512,
            backing_file: None,
            bitmaps: Vec::new(),
            snapshots: Vec::new(),
        }
    } else {
        qemu::img_info(path)?
    };
    let unit = storage_unit(path)?;
    Ok(DiskInfo {
        id,
        path: path.to_path_buf(),
        kind: if is_lun {
            DiskKind::Lun
        } else {
            DiskKind::Image
        },
        format: info.format,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
        backing_file: info.backing_file,
        bitmaps: info.bitmaps.into_iter().map(|b| b.name).collect(),
        unit: unit.id,
    })
}

fn is_image_name(name: &str) -> bool {
    [".qcow2", ".raw", ".img"].iter().any(|e| name.ends_with(e))
}

/// Lists a datastore: its unit and disks (images at the top level, LUNs under `luns/`).
pub fn list_datastore(cfg: &DatastoreConfig) -> Result<DatastoreInfo> {
    let unit = storage_unit(&cfg.path)?;
    let mut disks = Vec::new();
    let mut names: Vec<PathBuf> = Vec::new();
    for e in std::fs::read_dir(&cfg.path).map_err(StorageError::io(&cfg.path, "list"))? {
        let e = e.map_err(StorageError::io(&cfg.path, "list"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let ft = e.file_type().map_err(StorageError::io(e.path(), "stat"))?;
        if ft.is_file() && is_image_name(&name) {
            names.push(e.path());
        }
    }
    let luns = cfg.path.join("luns");
    if luns.is_dir() {
        for e in std::fs::read_dir(&luns).map_err(StorageError::io(&luns, "list"))? {
            let e = e.map_err(StorageError::io(&luns, "list"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".rdm.json") {
                continue;
            }
            names.push(e.path());
        }
    }
    names.sort();
    for p in names {
        disks.push(disk_info(&cfg.path, &p)?);
    }
    Ok(DatastoreInfo {
        name: cfg.name.clone(),
        path: cfg.path.clone(),
        unit,
        disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/x\\"), "/x\\");
    }

    #[test]
    fn ids_stay_inside() {
        assert!(check_relative("vm.qcow2").is_ok());
        assert!(check_relative("luns/l0").is_ok());
        assert!(check_relative("../etc/passwd").is_err());
        assert!(check_relative("/etc/passwd").is_err());
        assert!(check_relative("").is_err());
    }

    #[test]
    fn unit_of_tmp_is_found() {
        let d = tempfile::tempdir().unwrap();
        let u = storage_unit(d.path()).unwrap();
        assert!(!u.fs_type.is_empty());
        assert!(d.path().canonicalize().unwrap().starts_with(&u.mount_point));
    }
}
