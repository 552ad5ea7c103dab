//! The targeted group snapshot of a VM group (`docs/ARCHITECTURE.md`, "The flows").
//!
//! 1. Each VM is quiesced and switched to an **overlay** VM snapshot: its disk files are
//!    frozen on the datastore.
//! 2. The storage units holding those files are found from the snapshot metadata (the
//!    manager's map disk → datastore → unit), and **one storage snapshot per unit** is taken
//!    (reflink clones where the unit can share extents, else a plain copy, reported as slow).
//! 3. As soon as the unit snapshots are confirmed, every VM snapshot is deleted (the overlay
//!    merged back): the VM-snapshot lifetime covers steps 1–3 only, not the backup.
//! 4. Every VM is then backed up from the unit snapshots, fingerprints first; the unit
//!    snapshots are deleted at the end (or on failure).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use cairn_api::host::SnapshotKind;
use cairn_api::server::{BackupKind, GroupBackupDone, JobResult, VmSnapshotLifetime};
use cairn_api::storage::{DiskRef, DiskSource, UnitSnapshotRequest};
use cairn_catalog::{BackupRecord, Hold, new_id, now_ms};

use crate::backup::{self, DiskJob, Parent, VmSnap, is_lun, rdm_source};
use crate::jobs::JobCtx;
use crate::{Result, ServerError};

fn canonical(p: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

pub fn run(ctx: &JobCtx<'_>, vms: &[String], full: bool) -> Result<JobResult> {
    let started = Instant::now();
    let created_ms = now_ms();
    let group_id = new_id();
    let s = ctx.server;
    let locs = vms
        .iter()
        .map(|v| backup::locate(ctx, v))
        .collect::<Result<Vec<_>>>()?;
    let parents = locs
        .iter()
        .map(|l| Parent::of(ctx, l, full))
        .collect::<Result<Vec<_>>>()?;
    ctx.info(format!("group {group_id}: {} VMs", locs.len()));

    // 1. VM snapshots (overlay: the base files freeze on the datastore).
    let mut snaps: Vec<(VmSnap, Instant)> = Vec::new();
    for (loc, parent) in locs.iter().zip(&parents) {
        let t = Instant::now();
        let snap = backup::snapshot_vm(ctx, loc, SnapshotKind::Overlay, parent.since)?;
        snaps.push((snap, t));
    }

    // 2. One storage snapshot per unit, per storage agent.
    let mut per_agent: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    for (vi, loc) in locs.iter().enumerate() {
        for (di, d) in loc.disks.iter().enumerate() {
            if is_lun(d) {
                continue; // raw LUNs are read in place (see backup::run)
            }
            per_agent
                .entry(d.storage_agent.clone().unwrap_or_default())
                .or_default()
                .push((vi, di));
        }
    }
    // (vm index, disk index) → (agent, unit snapshot id, index within it)
    let mut unit_of: BTreeMap<(usize, usize), (String, String, usize)> = BTreeMap::new();
    let mut unit_snaps = Vec::new();
    let unit_started = Instant::now();
    for (agent, disks) in &per_agent {
        let c = s.storage_agent(agent)?;
        let reflink = disks
            .iter()
            .all(|&(v, d)| locs[v].disks[d].unit_reflink == Some(true));
        let provider = if reflink { "reflink" } else { "copy" };
        if !reflink {
            ctx.warn(format!(
                "storage agent {agent}: a unit cannot reflink: plain copies (slow, full space)"
            ));
        }
        let req = UnitSnapshotRequest {
            provider: provider.into(),
            tag: format!("{}{group_id}", cairn_api::storage::JOB_SCOPED_TAG_PREFIX),
            disks: disks
                .iter()
                .map(|&(v, d)| DiskRef {
                    datastore: locs[v].disks[d].datastore.clone().unwrap_or_default(),
                    disk: locs[v].disks[d].datastore_disk.clone().unwrap_or_default(),
                })
                .collect(),
        };
        let answer = c.snapshot_units(&req).map_err(ServerError::call(format!(
            "storage agent {agent}: unit snapshot"
        )))?;
        for u in answer {
            let id = u.id.clone();
            ctx.hold(Hold::StorageSnapshot {
                agent: agent.clone(),
                snapshot: id.clone(),
            })?;
            ctx.info(format!(
                "storage snapshot {id} on {agent}: unit {}, {} disk(s), {provider}, window {} µs",
                u.unit.as_deref().unwrap_or("-"),
                u.disks.len(),
                u.window_us
            ));
            for (ui, ud) in u.disks.iter().enumerate() {
                let p = canonical(&ud.disk);
                for &(v, d) in disks {
                    if canonical(&locs[v].disks[d].path) == p {
                        unit_of.insert((v, d), (agent.clone(), id.clone(), ui));
                    }
                }
            }
            unit_snaps.push((agent.clone(), id));
        }
    }
    let unit_ms = unit_started.elapsed().as_millis() as i64;

    // 3. Unit snapshots confirmed: release every VM snapshot at once.
    let mut lifetimes = Vec::new();
    for ((snap, t), loc) in snaps.iter().zip(&locs) {
        let host_ms = backup::release_vm_snapshot(ctx, loc, snap)?;
        lifetimes.push((host_ms, t.elapsed().as_millis() as i64));
    }
    ctx.check_cancel()?;

    // 4. Back up every VM from the unit snapshots.
    let mut out = Vec::new();
    for (vi, loc) in locs.iter().enumerate() {
        let ts = crate::meta::timestamp_id();
        let backup_id = new_id();
        let meta = backup::metadata(ctx, loc, &ts)?;
        let mut jobs = Vec::new();
        for (di, d) in loc.disks.iter().enumerate() {
            let source = match unit_of.get(&(vi, di)) {
                Some((_, snap, index)) => DiskSource::Snapshot {
                    snapshot: snap.clone(),
                    index: *index,
                },
                None if is_lun(d) => rdm_source(d),
                None => {
                    return Err(ServerError::Failed(format!(
                        "disk {} of {} is in no storage snapshot",
                        d.disk, loc.name
                    )));
                }
            };
            jobs.push(DiskJob {
                loc: d,
                source,
                parent: parents[vi].disk_snapshot(&d.disk),
            });
        }
        let disks = backup::send_disks(ctx, &loc.name, &backup_id, &ts, &jobs)?;
        let snap = &snaps[vi].0;
        let b = BackupRecord {
            id: backup_id,
            vm: loc.name.clone(),
            job_id: ctx.id.clone(),
            kind: if parents[vi].backup.is_some() {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            group_id: Some(group_id.clone()),
            timestamp_id: meta.timestamp_id.clone(),
            created_ms,
            duration_ms: started.elapsed().as_millis() as i64,
            host: loc.host.clone(),
            checkpoint: snap.checkpoint,
            snapshot_kind: SnapshotKind::Overlay,
            quiesce: snap.quiesce,
            quiesce_window_ms: snap.quiesce_window_ms,
            vm_snapshot_lifetime_ms: lifetimes[vi].0,
            bytes_read: disks.iter().map(|d| d.bytes_read).sum(),
            bytes_sent: disks.iter().map(|d| d.bytes_sent).sum(),
            attributes: backup::attributes(loc),
            disks,
            metadata: None,
        };
        s.catalog.insert_backup(&b)?;
        crate::files::queue_index(ctx, &b.id);
        out.push(backup::summary(&b));
    }

    // Unit snapshots are no longer needed.
    for (agent, id) in &unit_snaps {
        let h = Hold::StorageSnapshot {
            agent: agent.clone(),
            snapshot: id.clone(),
        };
        match crate::jobs::release(s, &h) {
            Ok(()) => ctx.unhold(&h),
            Err(e) => ctx.warn(format!(
                "storage snapshot {id} on {agent} kept: {}",
                e.chain()
            )),
        }
    }
    for vm in vms {
        crate::schedule::apply_retention(ctx, vm)?;
    }
    let total_ms = started.elapsed().as_millis() as i64;
    ctx.info(format!(
        "group {group_id}: {} VMs in {total_ms} ms; VM snapshot lifetimes {:?} ms",
        locs.len(),
        lifetimes.iter().map(|l| l.0).collect::<Vec<_>>()
    ));
    Ok(JobResult::GroupBackup(GroupBackupDone {
        group: group_id,
        duration_ms: total_ms,
        unit_snapshot_ms: unit_ms,
        vm_snapshot_lifetimes_ms: locs
            .iter()
            .zip(&lifetimes)
            .map(|(l, t)| VmSnapshotLifetime {
                vm: l.name.clone(),
                host_measured_ms: t.0,
                server_measured_ms: t.1,
            })
            .collect(),
        backups: out,
    }))
}
