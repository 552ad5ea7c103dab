//! Changed-block tracking: which checkpoint bitmaps describe a disk's changes since a given
//! checkpoint, and the upkeep of `checkpoints.json`.
//!
//! A disk takes part when it is a writable qcow2 image (only qcow2 stores persistent bitmaps).
//! Its checkpoints form a chain, oldest first; exactly the newest is recording. The changes since
//! checkpoint `C` are the union of `C` and every later bitmap of the chain. The answer is
//! [`Changes::Unknown`] whenever that union cannot be trusted in full; a bitmap QEMU reports
//! `inconsistent` (it died without storing it) is removed on sight.

use std::collections::HashSet;

use serde_json::json;

use crate::driver::{Changes, DriverError, KnownChanges, UnknownReason};
use crate::qemu::graph::Ctx;
use crate::spec::{CHECKPOINT_PREFIX, CheckpointId, DiskBacking, DiskFormat};
use crate::state::{CheckpointRecord, CheckpointStore, VmDisk, now_ms};

/// Granularity of new checkpoint bitmaps (one qcow2 cluster).
pub(crate) const GRANULARITY: u64 = 65536;

/// One disk's change-tracking situation before a snapshot.
#[derive(Debug, Clone)]
pub(crate) struct DiskCbt {
    /// Writable qcow2: a new checkpoint bitmap can be added.
    pub supported: bool,
    pub size: u64,
    pub changes: Changes,
    /// Bitmaps that are recording now (the transaction disables them).
    pub recording: Vec<String>,
}

/// The key of a disk in `checkpoints.json`.
pub(crate) fn disk_key(disk: &VmDisk) -> String {
    match &disk.backing {
        DiskBacking::Image { path, .. } | DiskBacking::RawDevice { path, .. } => {
            path.display().to_string()
        }
    }
}

pub(crate) fn supports_bitmaps(disk: &VmDisk) -> bool {
    !disk.read_only
        && matches!(
            disk.backing,
            DiskBacking::Image {
                format: DiskFormat::Qcow2,
                ..
            }
        )
}

/// Looks at one disk's bitmaps, removes inconsistent checkpoint bitmaps, forgets checkpoints
/// whose bitmap is gone, and decides what is known since `since`.
pub(crate) async fn analyze(
    ctx: &Ctx<'_>,
    store: &mut CheckpointStore,
    disk: &VmDisk,
    since: Option<CheckpointId>,
) -> Result<DiskCbt, DriverError> {
    let node = ctx
        .node(&disk.node_name)
        .await?
        .ok_or_else(|| DriverError::Failed {
            what: format!("finding block node {}", disk.node_name),
            reason: "not in query-named-block-nodes".into(),
        })?;
    let mut removed_inconsistent = HashSet::new();
    for b in &node.bitmaps {
        if b.inconsistent && b.name.starts_with(CHECKPOINT_PREFIX) {
            tracing::warn!(vm = %ctx.vm, disk = %disk.id, bitmap = %b.name,
                "checkpoint bitmap inconsistent (QEMU died without storing it): removing");
            ctx.exec(
                "block-dirty-bitmap-remove",
                json!({"node": disk.node_name, "name": b.name}),
            )
            .await?;
            removed_inconsistent.insert(b.name.clone());
        }
    }
    let present: Vec<_> = node
        .bitmaps
        .iter()
        .filter(|b| b.name.starts_with(CHECKPOINT_PREFIX) && !b.inconsistent)
        .collect();
    let key = disk_key(disk);
    let records = store.entry(key.clone()).or_default();
    records.retain(|r| present.iter().any(|b| b.name == r.id.bitmap_name()));
    if records.is_empty() {
        store.remove(&key);
    }
    let records = store.get(&key).cloned().unwrap_or_default();
    let supported = supports_bitmaps(disk);
    let recording = present
        .iter()
        .filter(|b| b.recording)
        .map(|b| b.name.clone())
        .collect();
    let unknown = |reason| Changes::Unknown { reason };
    let changes = match since {
        None => unknown(UnknownReason::NoPreviousCheckpoint),
        Some(_) if !supported => unknown(UnknownReason::BitmapMissing),
        Some(c) if removed_inconsistent.contains(&c.bitmap_name()) => {
            unknown(UnknownReason::BitmapInconsistent)
        }
        Some(c) => {
            let name = c.bitmap_name();
            match present.iter().find(|b| b.name == name) {
                None => unknown(UnknownReason::BitmapMissing),
                Some(first) => {
                    let chain: Option<Vec<String>> = match records.iter().position(|r| r.id == c) {
                        Some(i) if records[i].size != node.size => {
                            return Ok(DiskCbt {
                                supported,
                                size: node.size,
                                changes: unknown(UnknownReason::DiskResized),
                                recording,
                            });
                        }
                        Some(i) => Some(records[i..].iter().map(|r| r.id.bitmap_name()).collect()),
                        // Not in our records (state dir lost): only trustworthy when it is
                        // the one still recording.
                        None => first.recording.then(|| vec![name.clone()]),
                    };
                    match chain {
                        None => unknown(UnknownReason::BitmapMissing),
                        Some(chain) => {
                            let dirty = chain
                                .iter()
                                .filter_map(|n| present.iter().find(|b| &b.name == n))
                                .map(|b| b.count)
                                .sum();
                            Changes::Known(KnownChanges {
                                bitmaps: chain,
                                export_bitmap: None,
                                meta_context: None,
                                dirty_bytes: dirty,
                                granularity: first.granularity,
                            })
                        }
                    }
                }
            }
        }
    };
    Ok(DiskCbt {
        supported,
        size: node.size,
        changes,
        recording,
    })
}

/// Records a new checkpoint of `disk` and removes the oldest beyond `max` (bitmap and record).
pub(crate) async fn add_checkpoint(
    ctx: &Ctx<'_>,
    store: &mut CheckpointStore,
    disk: &VmDisk,
    id: CheckpointId,
    size: u64,
    max: usize,
) -> Result<(), DriverError> {
    let records = store.entry(disk_key(disk)).or_default();
    records.push(CheckpointRecord {
        id,
        size,
        created_at_ms: now_ms(),
    });
    let excess = records.len().saturating_sub(max.max(1));
    let old: Vec<CheckpointRecord> = records.drain(..excess).collect();
    for r in old {
        ctx.exec(
            "block-dirty-bitmap-remove",
            json!({"node": disk.node_name, "name": r.id.bitmap_name()}),
        )
        .await?;
    }
    Ok(())
}

impl crate::qemu::QemuDriver {
    /// Per disk id, the changes since `checkpoint`; inconsistent bitmaps are removed on the way.
    pub async fn changes_since(
        &self,
        vm: crate::spec::VmId,
        checkpoint: CheckpointId,
    ) -> Result<Vec<(String, Changes)>, DriverError> {
        let lock = self.vm_lock(vm);
        let _held = lock.lock().await;
        let rec = self.record(vm)?;
        let qmp = self.qmp(vm).await?;
        let ctx = Ctx {
            vm,
            qmp: &qmp,
            job_timeout: self.options.job_timeout,
        };
        let mut store = self.state.load_checkpoints()?;
        let mut out = Vec::new();
        for d in &rec.disks {
            let c = analyze(&ctx, &mut store, d, Some(checkpoint)).await?;
            out.push((d.id.clone(), c.changes));
        }
        self.state.save_checkpoints(&store)?;
        Ok(out)
    }
}
