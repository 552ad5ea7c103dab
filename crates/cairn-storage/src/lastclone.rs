//! The previous point of each disk backed up from a reflink unit snapshot, kept for the next
//! backup's FIEMAP diff (the `ExtentMap` change hint).
//!
//! A group backup reads each disk from a unit snapshot (a reflink clone) that is deleted when
//! the job ends. After a disk's backup from such a clone succeeds, the agent reflinks the clone
//! once more into `UNIT/.cairn-snapshots/last/<key>.img` (`key`: a digest of the live disk's
//! path) and records beside it (`<key>.json`) the vault snapshot it holds. The next backup of
//! that disk from a unit snapshot whose parent is that very vault snapshot gets
//! `ExtentMap { previous: last clone }` as its first hint: the extents not shared between the
//! two clones are what changed (mapped through the L1/L2 tables for qcow2), so an idle disk is
//! read hardly at all. The clone shares every extent with the disk until the disk changes.
//!
//! Anything off (no record, another parent, a failed clone) only means no hint: the tracker
//! then compares with the parent's recipe, as before. The files may be deleted at any time.

use std::path::{Path, PathBuf};

use cairn_api::storage::{ChangeHint, DiskSnapshot, UnitSnapshot};
use serde::{Deserialize, Serialize};

/// Where the last clones of a unit snapshot's unit live, when the snapshot is a reflink one.
fn last_dir(u: &UnitSnapshot) -> Option<PathBuf> {
    if u.provider != "reflink" {
        return None;
    }
    Some(u.dir.as_ref()?.parent()?.join("last"))
}

fn key(disk: &Path) -> String {
    let d = blake3::hash(disk.as_os_str().as_encoded_bytes());
    d.to_hex()[..32].to_string()
}

#[derive(Serialize, Deserialize)]
struct Record {
    disk: PathBuf,
    vault_snapshot: String,
}

/// The hint for backing up `snap` (a disk of `u`) with vault parent `parent`, if the last clone
/// holds exactly that parent.
pub fn hint(u: &UnitSnapshot, snap: &DiskSnapshot, parent: Option<&str>) -> Option<ChangeHint> {
    let dir = last_dir(u)?;
    let k = key(&snap.disk);
    let rec: Record =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{k}.json"))).ok()?).ok()?;
    let img = dir.join(format!("{k}.img"));
    (Some(rec.vault_snapshot.as_str()) == parent && rec.disk == snap.disk && img.exists())
        .then_some(ChangeHint::ExtentMap { previous: img })
}

/// Keeps `snap`'s clone as the last point of its disk, holding vault snapshot `vault_snapshot`.
pub fn keep(u: &UnitSnapshot, snap: &DiskSnapshot, vault_snapshot: &str) {
    let Some(dir) = last_dir(u) else { return };
    if let Err(e) = keep_in(&dir, snap, vault_snapshot) {
        tracing::warn!(
            "{}: previous point for the next FIEMAP diff not kept: {e}",
            snap.disk.display()
        );
    }
}

fn keep_in(dir: &Path, snap: &DiskSnapshot, vault_snapshot: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let k = key(&snap.disk);
    let (img, json) = (dir.join(format!("{k}.img")), dir.join(format!("{k}.json")));
    // The record goes first: a crash between the two leaves a record naming a parent the
    // image does not hold only if the rename below happened, so drop it before replacing.
    let _ = std::fs::remove_file(&json);
    let tmp = dir.join(format!(".tmp-{k}.img"));
    let src = std::fs::File::open(&snap.image)?;
    let dst = std::fs::File::create(&tmp)?;
    if let Err(e) = crate::sys::ficlone(&src, &dst) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &img)?;
    let rec = Record {
        disk: snap.disk.clone(),
        vault_snapshot: vault_snapshot.to_owned(),
    };
    let bytes = serde_json::to_vec(&rec).map_err(std::io::Error::other)?;
    cairn_types::durable::write_atomic(&json, &bytes)
}
