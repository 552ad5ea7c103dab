//! Snapshot providers: how a point-in-time, readable copy of disks is made on primary storage.
//!
//! # Contract of [`SnapshotProvider`]
//!
//! - **Consistent** means: every byte read from a [`DiskSnapshot`] is the disk's content at
//!   one instant, crash-consistent per disk. Application consistency comes from the host
//!   agent quiescing the guest (or the VM snapshot, whose frozen base is what we snapshot).
//!   [`Capabilities::group_instant`] says whether all disks of one call share that instant.
//! - **Cost** is data ([`Capabilities::cost`]): metadata-only providers take milliseconds
//!   whatever the disk size; a copy provider reads and writes every allocated byte.
//! - **Cleanup**: a snapshot lives until [`SnapshotProvider::delete`]; the agent keeps a
//!   record of each one ([`crate::catalog::SnapshotCatalog`]) and applies retention (keep N per disk), so a
//!   crashed agent does not leak snapshots it cannot list. `delete` is idempotent.
//!
//! | provider | snapshot of a disk | cost | group at one instant | change sources it enables |
//! |---|---|---|---|---|
//! | [`Qcow2Provider`] (frozen base) | the base left by the host agent's external overlay | none (recorded only) | yes (host agent's transaction) | OverlayMap |
//! | [`Qcow2Provider`] (internal) | `qemu-img snapshot -c`, read with `qemu-nbd -l` | metadata | no (per disk, VM offline) | PersistentBitmap |
//! | [`ReflinkProvider`] | `FICLONE` of every disk into `UNIT/.cairn-snapshots/ID/` | metadata (shared extents) | clones made back to back, window reported | ExtentMap |
//! | [`CopyProvider`] | sparse plain copy into `UNIT/.cairn-snapshots/ID/` | reads + writes all data: **slow** | no | none (RecipeCompare) |

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_types::ReadAt;

use crate::datastore::storage_unit;
use crate::error::{Result, StorageError};
use cairn_types::DiskFormat;

use crate::qemu::{self, NbdImage, NbdOpen, NbdRuntime, SnapshotOp};
use crate::tracker::ChangeSource;

/// Directory (at the root of a storage unit) holding reflink and copy snapshots.
pub const SNAPSHOT_DIR: &str = ".cairn-snapshots";
/// Prefix of internal qcow2 snapshot names made by the agent.
pub const INTERNAL_PREFIX: &str = "cairn-";

pub use cairn_api::storage::{
    Capabilities, DiskSnapshot, RetentionPlan, SnapshotCost, UnitSnapshot,
};

/// What the agent does with a [`DiskSnapshot`]: find one for a file, and open it for reading.
pub trait DiskSnapshotExt: Sized {
    /// Reads a disk in place (no snapshot): for frozen bases and offline disks.
    fn of_file(path: &Path) -> Result<Self>;
    /// Opens the guest view for reading: the file itself for raw, `qemu-nbd` (driven on
    /// `nbd`) otherwise.
    fn open(&self, nbd: &NbdRuntime) -> Result<Box<dyn ReadAt>>;
}

impl DiskSnapshotExt for DiskSnapshot {
    fn of_file(path: &Path) -> Result<Self> {
        std::fs::metadata(path).map_err(StorageError::io(path, "stat"))?;
        let info = qemu::img_info(path)?;
        Ok(Self {
            disk: path.to_path_buf(),
            image: path.to_path_buf(),
            format: info.format,
            internal: None,
            size: info.virtual_size,
        })
    }

    fn open(&self, nbd: &NbdRuntime) -> Result<Box<dyn ReadAt>> {
        if self.format == DiskFormat::Raw && self.internal.is_none() {
            let f = File::open(&self.image).map_err(StorageError::io(&self.image, "open"))?;
            return Ok(Box::new(f));
        }
        let nbd = NbdImage::open(
            nbd,
            &self.image,
            self.format,
            &NbdOpen {
                snapshot: self.internal.clone(),
                ..Default::default()
            },
        )?;
        Ok(Box::new(nbd))
    }
}

/// Takes, and cleans up, snapshots of disks. See the module docs for the contract.
pub trait SnapshotProvider: Send + Sync {
    fn capabilities(&self) -> Capabilities;
    /// Snapshots all `disks` in one call.
    fn snapshot(&self, disks: &[PathBuf], tag: &str) -> Result<UnitSnapshot>;
    /// Removes the snapshot; succeeds if it is already gone.
    fn delete(&self, snap: &UnitSnapshot) -> Result<()>;
}

/// [`cairn_types::now_ms`], unsigned as stored here.
fn now_ms() -> u64 {
    u64::try_from(cairn_types::now_ms()).unwrap_or(0)
}

fn new_id() -> String {
    format!(
        "{:013}-{}",
        now_ms(),
        hex::encode(rand::random::<[u8; 3]>())
    )
}

/// Which qcow2 snapshots [`Qcow2Provider`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Qcow2Mode {
    /// The disks given are frozen bases under an external overlay made by the host agent;
    /// the provider only records them (the host agent merges the overlay later).
    FrozenBase,
    /// Internal snapshots (`qemu-img snapshot -c`); the image must not be open read-write.
    Internal,
}

/// qcow2 snapshots: frozen bases or internal snapshots; also persistent bitmaps.
#[derive(Clone, Debug)]
pub struct Qcow2Provider {
    pub mode: Qcow2Mode,
}

impl Qcow2Provider {
    /// Adds a persistent dirty bitmap (tracking starts now).
    pub fn add_bitmap(disk: &Path, name: &str) -> Result<()> {
        qemu::img_bitmap(disk, "add", name)
    }

    /// Removes a bitmap (the only thing to do with an inconsistent one).
    pub fn remove_bitmap(disk: &Path, name: &str) -> Result<()> {
        qemu::img_bitmap(disk, "remove", name)
    }

    /// Clears a bitmap after a successful backup: tracking restarts from this point.
    pub fn clear_bitmap(disk: &Path, name: &str) -> Result<()> {
        qemu::img_bitmap(disk, "clear", name)
    }
}

impl SnapshotProvider for Qcow2Provider {
    fn capabilities(&self) -> Capabilities {
        match self.mode {
            Qcow2Mode::FrozenBase => Capabilities {
                provider: "qcow2-frozen-base".into(),
                per_unit: false,
                cost: SnapshotCost::Metadata,
                group_instant: true,
                formats: vec![DiskFormat::Qcow2, DiskFormat::Raw],
                change_sources: vec![ChangeSource::OverlayMap, ChangeSource::HypervisorBitmap],
                uses_full_space: false,
                note: "the host agent's external snapshot froze the base; nothing to copy".into(),
            },
            Qcow2Mode::Internal => Capabilities {
                provider: "qcow2-internal".into(),
                per_unit: false,
                cost: SnapshotCost::Metadata,
                group_instant: false,
                formats: vec![DiskFormat::Qcow2],
                change_sources: vec![ChangeSource::PersistentBitmap],
                uses_full_space: false,
                note: "qemu-img snapshot -c; the image must not be in use read-write".into(),
            },
        }
    }

    fn snapshot(&self, disks: &[PathBuf], tag: &str) -> Result<UnitSnapshot> {
        let id = new_id();
        let started = Instant::now();
        let mut out = Vec::with_capacity(disks.len());
        for d in disks {
            let info = qemu::img_info(d)?;
            let internal = match self.mode {
                Qcow2Mode::FrozenBase => None,
                Qcow2Mode::Internal => {
                    if info.format != DiskFormat::Qcow2 {
                        return Err(StorageError::Unsupported {
                            provider: "qcow2-internal",
                            message: format!(
                                "{} is {}, not qcow2",
                                d.display(),
                                info.format.as_str()
                            ),
                        });
                    }
                    let name = format!("{INTERNAL_PREFIX}{id}");
                    qemu::img_snapshot(d, SnapshotOp::Create, &name)?;
                    Some(name)
                }
            };
            out.push(DiskSnapshot {
                disk: d.clone(),
                image: d.clone(),
                format: info.format,
                internal,
                size: info.virtual_size,
            });
        }
        Ok(UnitSnapshot {
            id,
            provider: self.capabilities().provider,
            tag: tag.to_string(),
            created_ms: now_ms(),
            unit: None,
            dir: None,
            window_us: started.elapsed().as_micros() as u64,
            disks: out,
        })
    }

    fn delete(&self, snap: &UnitSnapshot) -> Result<()> {
        for d in &snap.disks {
            if let Some(name) = &d.internal {
                let present = qemu::img_info(&d.image)
                    .map(|i| i.snapshots.iter().any(|s| &s.name == name))
                    .unwrap_or(false);
                if present {
                    qemu::img_snapshot(&d.image, SnapshotOp::Delete, name)?;
                }
            }
        }
        Ok(())
    }
}

/// Where the snapshot of `disk` goes inside `dir` (the unit-relative path is kept).
fn snapshot_path(dir: &Path, mount: &Path, disk: &Path) -> PathBuf {
    let rel = disk.strip_prefix(mount).unwrap_or(disk);
    let rel: PathBuf = rel
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    dir.join(rel)
}

/// Checks that all disks are on one unit and returns (canonical disks, unit).
fn one_unit(disks: &[PathBuf]) -> Result<(Vec<PathBuf>, crate::datastore::StorageUnit)> {
    let first = disks
        .first()
        .ok_or_else(|| StorageError::Invalid("no disks to snapshot".into()))?;
    let unit = storage_unit(first)?;
    let mut canon = Vec::with_capacity(disks.len());
    for d in disks {
        let u = storage_unit(d)?;
        if u.id != unit.id {
            return Err(StorageError::Invalid(format!(
                "{} is on unit {}, {} on unit {}: one snapshot per unit",
                first.display(),
                unit.id,
                d.display(),
                u.id
            )));
        }
        canon.push(d.canonicalize().map_err(StorageError::io(d, "resolve"))?);
    }
    Ok((canon, unit))
}

fn write_record(dir: &Path, snap: &UnitSnapshot) -> Result<()> {
    crate::catalog::write_json_atomic(&dir.join("snapshot.json"), snap)
}

/// Storage-unit snapshots by reflink clones (for the targeted group snapshot), on XFS, btrfs and other file systems
/// with shared extents. Each clone is atomic for its file (FICLONE holds the inode locks);
/// the clones of one call are made back to back with all sources already open, and the
/// window between the first and the last is reported in [`UnitSnapshot::window_us`] — the
/// guests are quiesced or VM-snapshotted by the host agent during that window (the targeted group snapshot).
#[derive(Clone, Debug, Default)]
pub struct ReflinkProvider;

impl ReflinkProvider {
    /// Whether `dir` supports reflinks (clones a probe file).
    pub fn probe(dir: &Path) -> bool {
        let a = dir.join(format!(
            ".cairn-probe-{}",
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let b = a.with_extension("clone");
        let ok = (|| -> std::io::Result<()> {
            // FICLONE needs the source open for reading.
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&a)?;
            f.write_all(&[1u8; 4096])?;
            f.sync_all()?;
            let g = File::create(&b)?;
            crate::sys::ficlone(&f, &g)
        })()
        .is_ok();
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        ok
    }
}

impl SnapshotProvider for ReflinkProvider {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            provider: "reflink".into(),
            per_unit: true,
            cost: SnapshotCost::Metadata,
            group_instant: false,
            formats: vec![DiskFormat::Raw, DiskFormat::Qcow2],
            change_sources: vec![ChangeSource::ExtentMap],
            uses_full_space: false,
            note: "FICLONE into UNIT/.cairn-snapshots; changes from FIEMAP (raw disks)".into(),
        }
    }

    fn snapshot(&self, disks: &[PathBuf], tag: &str) -> Result<UnitSnapshot> {
        let (disks, unit) = one_unit(disks)?;
        let id = new_id();
        let dir = unit.mount_point.join(SNAPSHOT_DIR).join(&id);
        std::fs::create_dir_all(&dir).map_err(StorageError::io(&dir, "create"))?;
        let fail = |e: StorageError| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        // Open every source and create every destination first, then clone back to back.
        let mut pairs = Vec::with_capacity(disks.len());
        for d in &disks {
            let info = qemu::img_info(d).map_err(fail)?;
            if info.backing_file.is_some() {
                return Err(fail(StorageError::Unsupported {
                    provider: "reflink",
                    message: format!(
                        "{} has a backing file; clone its chain by hand",
                        d.display()
                    ),
                }));
            }
            let dst = snapshot_path(&dir, &unit.mount_point, d);
            if let Some(p) = dst.parent() {
                std::fs::create_dir_all(p).map_err(|e| fail(StorageError::io(p, "create")(e)))?;
            }
            let src = File::open(d).map_err(|e| fail(StorageError::io(d, "open")(e)))?;
            let out = File::create(&dst).map_err(|e| fail(StorageError::io(&dst, "create")(e)))?;
            pairs.push((d.clone(), src, dst, out, info));
        }
        let started = Instant::now();
        for (d, src, dst, out, _) in &pairs {
            crate::sys::ficlone(src, out).map_err(|e| {
                fail(match e.raw_os_error() {
                    Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) => {
                        StorageError::Unsupported {
                            provider: "reflink",
                            message: format!(
                                "cannot clone {} to {}: {e} (no reflink on this unit)",
                                d.display(),
                                dst.display()
                            ),
                        }
                    }
                    _ => StorageError::io(dst, "clone")(e),
                })
            })?;
        }
        let window_us = started.elapsed().as_micros() as u64;
        let snap = UnitSnapshot {
            id,
            provider: "reflink".into(),
            tag: tag.to_string(),
            created_ms: now_ms(),
            unit: Some(unit.id.clone()),
            dir: Some(dir.clone()),
            window_us,
            disks: pairs
                .iter()
                .map(|(d, _, dst, _, info)| DiskSnapshot {
                    disk: d.clone(),
                    image: dst.clone(),
                    format: info.format,
                    internal: None,
                    size: info.virtual_size,
                })
                .collect(),
        };
        for (_, _, dst, out, _) in &pairs {
            out.sync_all()
                .map_err(|e| fail(StorageError::io(dst, "fsync")(e)))?;
        }
        write_record(&dir, &snap).map_err(fail)?;
        Ok(snap)
    }

    fn delete(&self, snap: &UnitSnapshot) -> Result<()> {
        remove_snapshot_dir(snap)
    }
}

fn remove_snapshot_dir(snap: &UnitSnapshot) -> Result<()> {
    if let Some(dir) = &snap.dir {
        // Only ever remove a directory of ours.
        if dir
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n == SNAPSHOT_DIR)
            != Some(true)
        {
            return Err(StorageError::Invalid(format!(
                "{} is not a snapshot directory",
                dir.display()
            )));
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(dir, "remove")(e)),
        }
    }
    Ok(())
}

/// The fallback when the unit has no reflinks: a sparse plain copy of each disk. Slow (reads
/// and writes every allocated byte) and not at one instant: use it only with the VMs paused
/// or VM-snapshotted.
#[derive(Clone, Debug, Default)]
pub struct CopyProvider;

/// Copies `src` to `dst` block by block, leaving holes where the source reads zero.
/// Never uses `copy_file_range` (which may share extents): this is a real copy.
fn sparse_copy(src: &Path, dst: &Path) -> Result<u64> {
    let s = File::open(src).map_err(StorageError::io(src, "open"))?;
    let d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(StorageError::io(dst, "create"))?;
    let size = ReadAt::size(&s).map_err(StorageError::io(src, "size"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut written = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        FileExt::read_exact_at(&s, &mut buf[..n], off).map_err(StorageError::io(src, "read"))?;
        if !cairn_chunk::is_zero(&buf[..n]) {
            d.write_all_at(&buf[..n], off)
                .map_err(StorageError::io(dst, "write"))?;
            written += n as u64;
        }
        off += n as u64;
    }
    d.set_len(size)
        .map_err(StorageError::io(dst, "set length"))?;
    d.sync_all().map_err(StorageError::io(dst, "fsync"))?;
    Ok(written)
}

impl SnapshotProvider for CopyProvider {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            provider: "copy".into(),
            per_unit: true,
            cost: SnapshotCost::CopiesData,
            group_instant: false,
            formats: vec![DiskFormat::Raw, DiskFormat::Qcow2],
            change_sources: vec![],
            uses_full_space: true,
            note: "slow: copies every allocated byte; incrementals use RecipeCompare".into(),
        }
    }

    fn snapshot(&self, disks: &[PathBuf], tag: &str) -> Result<UnitSnapshot> {
        let (disks, unit) = one_unit(disks)?;
        let id = new_id();
        let dir = unit.mount_point.join(SNAPSHOT_DIR).join(&id);
        std::fs::create_dir_all(&dir).map_err(StorageError::io(&dir, "create"))?;
        let started = Instant::now();
        let mut out = Vec::new();
        for d in &disks {
            let info = qemu::img_info(d)?;
            let dst = snapshot_path(&dir, &unit.mount_point, d);
            if let Some(p) = dst.parent() {
                std::fs::create_dir_all(p).map_err(StorageError::io(p, "create"))?;
            }
            if let Err(e) = sparse_copy(d, &dst) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            out.push(DiskSnapshot {
                disk: d.clone(),
                image: dst,
                format: info.format,
                internal: None,
                size: info.virtual_size,
            });
        }
        let snap = UnitSnapshot {
            id,
            provider: "copy".into(),
            tag: tag.to_string(),
            created_ms: now_ms(),
            unit: Some(unit.id),
            dir: Some(dir.clone()),
            window_us: started.elapsed().as_micros() as u64,
            disks: out,
        };
        write_record(&dir, &snap)?;
        Ok(snap)
    }

    fn delete(&self, snap: &UnitSnapshot) -> Result<()> {
        remove_snapshot_dir(snap)
    }
}

/// The provider that made `snap`, by its recorded name.
pub fn provider_for(name: &str) -> Result<Box<dyn SnapshotProvider>> {
    Ok(match name {
        "reflink" => Box::new(ReflinkProvider),
        "copy" => Box::new(CopyProvider),
        "qcow2-internal" => Box::new(Qcow2Provider {
            mode: Qcow2Mode::Internal,
        }),
        "qcow2-frozen-base" => Box::new(Qcow2Provider {
            mode: Qcow2Mode::FrozenBase,
        }),
        other => {
            return Err(StorageError::Invalid(format!(
                "unknown snapshot provider {other:?}"
            )));
        }
    })
}

/// Keeps the newest `keep` snapshots of every disk; a snapshot of several disks is deleted
/// only when it is beyond `keep` for all of them.
pub fn plan_retention(snaps: &[UnitSnapshot], keep: usize) -> RetentionPlan {
    let mut per_disk: BTreeMap<&Path, Vec<&UnitSnapshot>> = BTreeMap::new();
    for s in snaps {
        for d in &s.disks {
            per_disk.entry(d.disk.as_path()).or_default().push(s);
        }
    }
    let mut needed: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for list in per_disk.values_mut() {
        list.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        for s in list.iter().take(keep) {
            needed.insert(&s.id);
        }
    }
    let mut plan = RetentionPlan {
        keep,
        ..Default::default()
    };
    for s in snaps {
        if needed.contains(s.id.as_str()) {
            plan.kept.push(s.id.clone());
        } else {
            plan.delete.push(s.id.clone());
        }
    }
    plan
}

/// Every provider this agent has, in the order `GET /v1/providers` lists them.
pub fn all_providers() -> Vec<Box<dyn SnapshotProvider>> {
    vec![
        Box::new(Qcow2Provider {
            mode: Qcow2Mode::FrozenBase,
        }),
        Box::new(Qcow2Provider {
            mode: Qcow2Mode::Internal,
        }),
        Box::new(ReflinkProvider),
        Box::new(CopyProvider),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, t: u64, disks: &[&str]) -> UnitSnapshot {
        UnitSnapshot {
            id: id.into(),
            provider: "copy".into(),
            tag: String::new(),
            created_ms: t,
            unit: None,
            dir: None,
            window_us: 0,
            disks: disks
                .iter()
                .map(|d| DiskSnapshot {
                    disk: d.into(),
                    image: d.into(),
                    format: DiskFormat::Raw,
                    internal: None,
                    size: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn retention_keeps_n_per_disk() {
        let s = vec![
            snap("a", 1, &["x", "y"]),
            snap("b", 2, &["x"]),
            snap("c", 3, &["x"]),
            snap("d", 4, &["y"]),
        ];
        let p = plan_retention(&s, 2);
        // x keeps c, b; y keeps d, a.
        assert_eq!(p.delete, Vec::<String>::new());
        let p = plan_retention(&s, 1);
        assert_eq!(p.delete, vec!["a".to_string(), "b".to_string()]);
    }
}
