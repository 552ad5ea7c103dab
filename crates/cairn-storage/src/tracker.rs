//! The disk change tracker: which byte ranges of a disk snapshot may differ from the parent
//! backup, and a cross-check that the answer can be trusted.
//!
//! A tracker may over-report (a range marked changed that is not costs a little reading) but
//! must never under-report (a missed change would silently corrupt the synthetic full).
//! Every source below only over-reports when its preconditions hold; the cross-check samples
//! ranges a source called unchanged and compares them with the parent's recipe, to catch
//! preconditions that did not hold (a stale bitmap, the wrong previous clone, a buggy host).

use std::fs::File;
use std::path::Path;

use cairn_chunk::{Entry, EntryKind, Keys, fingerprint_with, is_zero};
use cairn_types::{Extent, ExtentList, ReadAt};
use rand::SeedableRng;

use crate::error::{Result, StorageError};
use cairn_api::storage::DiskSnapshot;
use cairn_types::DiskFormat;

use crate::qemu::{self, NbdImage, NbdOpen, NbdRuntime};
use crate::sys::{PhysExtent, flags};

pub use cairn_api::storage::{ChangeHint, ChangeSource, CrossCheck};

/// The tracker's answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeSet {
    pub extents: ExtentList,
    pub source: ChangeSource,
}

fn tracking(source_kind: ChangeSource, message: impl Into<String>) -> StorageError {
    StorageError::Tracking {
        source_kind,
        message: message.into(),
    }
}

/// The changed extents of `current` according to `hint`. An error means the hint is unusable
/// (lost bitmap, no reflinks, wrong format); callers fall back to another source. A
/// persistent bitmap is read over NBD on `nbd`.
pub fn changed_extents(
    nbd: &NbdRuntime,
    current: &DiskSnapshot,
    hint: &ChangeHint,
) -> Result<ChangeSet> {
    let source = hint.source();
    let extents = match hint {
        ChangeHint::Overlay { overlay } => {
            let info = qemu::img_info(overlay).map_err(|e| tracking(source, e.to_string()))?;
            if info.format != DiskFormat::Qcow2 || info.backing_file.is_none() {
                return Err(tracking(
                    source,
                    format!(
                        "{} is not an overlay (qcow2 with a backing file)",
                        overlay.display()
                    ),
                ));
            }
            qemu::overlay_extents(overlay).map_err(|e| tracking(source, e.to_string()))?
        }
        ChangeHint::ExtentMap { previous } => {
            if current.internal.is_some() {
                return Err(tracking(
                    source,
                    "extent maps describe files: not an internal qcow2 snapshot",
                ));
            }
            match current.format {
                DiskFormat::Raw => extent_map_changes(previous, &current.image, current.size),
                DiskFormat::Qcow2 => qcow2_extent_map_changes(previous, &current.image),
            }
            .map_err(|e| tracking(source, cairn_http::chain(&e)))?
        }
        ChangeHint::PersistentBitmap { image, bitmap } => persistent_bitmap(nbd, image, bitmap)?,
        ChangeHint::Hypervisor { extents } => extents.clone(),
    };
    Ok(ChangeSet {
        extents: extents.clamp(current.size),
        source,
    })
}

/// Reads a persistent bitmap's dirty extents; a missing or inconsistent bitmap is an error.
pub fn persistent_bitmap(nbd: &NbdRuntime, image: &Path, bitmap: &str) -> Result<ExtentList> {
    let source = ChangeSource::PersistentBitmap;
    let info = qemu::img_info(image).map_err(|e| tracking(source, e.to_string()))?;
    let b = info
        .bitmaps
        .iter()
        .find(|b| b.name == bitmap)
        .ok_or_else(|| {
            tracking(
                source,
                format!("bitmap {bitmap:?} is lost from {}", image.display()),
            )
        })?;
    if !b.is_consistent() {
        return Err(tracking(
            source,
            format!(
                "bitmap {bitmap:?} of {} is inconsistent (QEMU stopped uncleanly)",
                image.display()
            ),
        ));
    }
    let nbd = NbdImage::open(
        nbd,
        image,
        info.format,
        &NbdOpen {
            bitmap: Some(bitmap.to_string()),
            ..Default::default()
        },
    )
    .map_err(|e| tracking(source, e.to_string()))?;
    nbd.dirty_extents()
        .map_err(|e| tracking(source, e.to_string()))
}

/// The FIEMAP diff of two files: every range not backed by the same physical extent in both.
/// Reads no data. Both files must be on the same file system.
pub fn extent_map_changes(previous: &Path, current: &Path, size: u64) -> Result<ExtentList> {
    let open = |p: &Path| File::open(p).map_err(StorageError::io(p, "open"));
    let (pf, cf) = (open(previous)?, open(current)?);
    use std::os::unix::fs::MetadataExt;
    let dev = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| m.dev())
            .map_err(StorageError::io(p, "stat"))
    };
    if dev(&pf, previous)? != dev(&cf, current)? {
        return Err(StorageError::Invalid(format!(
            "{} and {} are on different file systems",
            previous.display(),
            current.display()
        )));
    }
    let pm = crate::sys::fiemap(&pf).map_err(StorageError::io(previous, "FIEMAP"))?;
    let cm = crate::sys::fiemap(&cf).map_err(StorageError::io(current, "FIEMAP"))?;
    Ok(diff_extent_maps(&pm, &cm, size))
}

/// The FIEMAP diff of two reflink clones of one qcow2 image, mapped to guest offsets through
/// their L1/L2 tables ([`crate::qcow2`]). Reads the headers and tables only; refuses images
/// whose tables cannot be compared (backing file, resized, ...).
pub fn qcow2_extent_map_changes(previous: &Path, current: &Path) -> Result<ExtentList> {
    let open = |p: &Path| File::open(p).map_err(StorageError::io(p, "open"));
    let (pf, cf) = (open(previous)?, open(current)?);
    let len = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| m.len())
            .map_err(StorageError::io(p, "stat"))
    };
    let host_len = len(&pf, previous)?.max(len(&cf, current)?);
    let host = extent_map_changes(previous, current, host_len)?;
    crate::qcow2::changed_guest_extents(&pf, &cf, &host).map_err(|source| StorageError::Qcow2 {
        path: current.to_path_buf(),
        source,
    })
}

fn covering(map: &[PhysExtent], at: u64) -> Option<&PhysExtent> {
    let i = map.partition_point(|e| e.logical <= at);
    if i == 0 {
        return None;
    }
    let e = &map[i - 1];
    (at < e.end()).then_some(e)
}

/// Pure part of [`extent_map_changes`]: ranges of `[0, size)` where the two maps do not
/// point at the same physical bytes (holes in both count as unchanged).
pub fn diff_extent_maps(prev: &[PhysExtent], cur: &[PhysExtent], size: u64) -> ExtentList {
    let mut prev = prev.to_vec();
    let mut cur = cur.to_vec();
    prev.sort_by_key(|e| e.logical);
    cur.sort_by_key(|e| e.logical);
    let mut cuts: Vec<u64> = vec![0, size];
    for e in prev.iter().chain(cur.iter()) {
        cuts.push(e.logical.min(size));
        cuts.push(e.end().min(size));
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut changed = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a >= b {
            continue;
        }
        let same = match (covering(&prev, a), covering(&cur, a)) {
            (None, None) => true,
            (Some(p), Some(c)) => {
                p.flags & flags::UNSTABLE == 0
                    && c.flags & flags::UNSTABLE == 0
                    && (p.flags & flags::UNWRITTEN) == (c.flags & flags::UNWRITTEN)
                    && p.physical.checked_add(a - p.logical)
                        == c.physical.checked_add(a - c.logical)
            }
            _ => false,
        };
        if !same {
            changed.push(Extent::new(a, b - a));
        }
    }
    ExtentList::from_unsorted(changed)
}

/// What a cross-check verified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CrossCheckReport {
    pub regions: u64,
    pub bytes: u64,
}

/// Samples parent segments lying wholly outside `set.extents`, reads them from `disk` and
/// compares their fingerprints with the parent's recipe entries (no data is fetched from the
/// vault). A mismatch is [`StorageError::TrackingMismatch`].
/// `keys` are an encrypted repository's (its fingerprints are keyed).
pub fn cross_check(
    keys: Option<&Keys>,
    disk: &dyn ReadAt,
    parent: &[Entry],
    set: &ChangeSet,
    opts: &CrossCheck,
) -> Result<CrossCheckReport> {
    let size = disk
        .size()
        .map_err(StorageError::io("disk snapshot", "size"))?;
    let ext = set.extents.as_slice();
    let mut candidates: Vec<(u64, Entry)> = Vec::new();
    let mut off = 0u64;
    let mut xi = 0usize;
    for e in parent {
        let end = off + u64::from(e.len);
        while xi < ext.len() && ext[xi].end() <= off {
            xi += 1;
        }
        let touches = xi < ext.len() && ext[xi].offset < end;
        if !touches && end <= size {
            candidates.push((off, *e));
        }
        off = end;
    }
    let n = opts.samples.min(candidates.len());
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut picks: Vec<usize> = rand::seq::index::sample(&mut rng, candidates.len(), n).into_vec();
    picks.sort_unstable();
    let mut report = CrossCheckReport::default();
    let mut buf = Vec::new();
    for i in picks {
        let (off, e) = candidates[i];
        buf.resize(e.len as usize, 0);
        disk.read_exact_at(&mut buf, off)
            .map_err(StorageError::io(format!("disk snapshot at {off}"), "read"))?;
        let same = match e.kind {
            EntryKind::Zero => is_zero(&buf),
            EntryKind::Data => fingerprint_with(keys, &buf) == e.digest,
        };
        if !same {
            return Err(StorageError::TrackingMismatch {
                source_kind: set.source,
                offset: off,
                len: u64::from(e.len),
            });
        }
        report.regions += 1;
        report.bytes += u64::from(e.len);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pe(logical: u64, physical: u64, len: u64) -> PhysExtent {
        PhysExtent {
            logical,
            physical,
            len,
            flags: flags::SHARED,
        }
    }

    #[test]
    fn diff_finds_cow_and_holes() {
        let prev = vec![pe(0, 1000, 100)];
        // A write at 40..50 was copied-on-write elsewhere; the file grew a new extent at 200.
        let cur = vec![
            pe(0, 1000, 40),
            pe(40, 5000, 10),
            pe(50, 1050, 50),
            pe(200, 9000, 20),
        ];
        let d = diff_extent_maps(&prev, &cur, 300);
        assert_eq!(d.as_slice(), &[Extent::new(40, 10), Extent::new(200, 20)]);
    }

    #[test]
    fn diff_treats_unstable_as_changed() {
        let mut p = pe(0, 1000, 100);
        p.flags |= flags::DELALLOC;
        let d = diff_extent_maps(&[p], &[pe(0, 1000, 100)], 100);
        assert_eq!(d.as_slice(), &[Extent::new(0, 100)]);
        assert!(diff_extent_maps(&[], &[], 100).is_empty());
    }
}
