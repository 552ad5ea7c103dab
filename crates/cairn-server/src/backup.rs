//! Full and incremental backup of one VM (`docs/ARCHITECTURE.md`, "The flows").
//!
//! 1. The manager says where the VM runs and which storage agent holds each disk.
//! 2. Through the manager, the host agent quiesces the guest and takes a **fleecing** VM
//!    snapshot (`since` = the previous backup's checkpoint): a point-in-time, read-only NBD
//!    export per disk, carrying the dirty bitmap when changes are known.
//! 3. The paired metadata snapshot: configuration, host resource usage and, unless
//!    disabled, the execution state, under the backup's timestamp id.
//! 4. Each storage agent reads its disks' exports and sends them to the vault, fingerprints
//!    first: with the bitmap for an incremental, else comparing with the parent's recipe
//!    (tracking lost falls back, never fails). RDM disks go with their LUN mapping.
//! 5. The VM snapshot is deleted (its lifetime recorded); the backup is recorded in one
//!    catalog transaction. Any failure releases the snapshot and records nothing.

use std::time::Instant;

use cairn_api::host::{
    Changes, CheckpointId, DiskSnapshot as VmDiskSnapshot, DiskSource as VmDiskSource, Quiesce,
    QuiescePolicy, SnapshotKind, SnapshotRequest, VmSnapshotId, VmSpec,
};
use cairn_api::manager::{DiskLocation, VmLocation, VmRunState};
use cairn_api::server::{
    BackupKind, BackupSummary, BackupsDone, DiskSummary, JobResult, RdmMapping, UsageSample,
};
use cairn_api::storage::{
    BackupJob, BackupRequest, BackupsRequest, DiskBackupOutcome, DiskKind, DiskSource,
};
use cairn_catalog::{BackupDisk, BackupRecord, Hold, MetadataSnapshot, new_id, now_ms};

use crate::jobs::JobCtx;
use crate::{Result, ServerError};

/// Backs up each VM in turn; the job fails at the first VM that fails.
pub fn run(ctx: &JobCtx<'_>, vms: &[String], full: bool) -> Result<JobResult> {
    let mut out = Vec::new();
    for vm in vms {
        ctx.check_cancel()?;
        let b = backup_vm(ctx, vm, full)?;
        out.push(summary(&b));
        crate::schedule::apply_retention(ctx, vm)?;
    }
    Ok(JobResult::Backup(BackupsDone { backups: out }))
}

/// What a job reports for one backup.
pub fn summary(b: &BackupRecord) -> BackupSummary {
    BackupSummary {
        backup: b.id.clone(),
        vm: b.vm.clone(),
        kind: b.kind,
        group: b.group_id.clone(),
        timestamp_id: b.timestamp_id.clone(),
        duration_ms: b.duration_ms,
        quiesce: b.quiesce,
        quiesce_window_ms: b.quiesce_window_ms,
        vm_snapshot_lifetime_ms: b.vm_snapshot_lifetime_ms,
        bytes_read: b.bytes_read,
        bytes_sent: b.bytes_sent,
        disks: b
            .disks
            .iter()
            .map(|d| DiskSummary {
                disk: d.disk.clone(),
                vault_snapshot: d.vault_snapshot.clone(),
                size: d.size,
                change_source: d.change_source,
                changed_bytes: d.changed_bytes,
                bytes_read: d.bytes_read,
                bytes_sent: d.bytes_sent,
            })
            .collect(),
    }
}

/// Locates a VM and checks that every disk is served by a storage agent.
pub fn locate(ctx: &JobCtx<'_>, vm: &str) -> Result<VmLocation> {
    let loc = ctx
        .server
        .manager
        .vm(vm)
        .map_err(ServerError::call(format!("locate VM {vm}")))?;
    if loc.state != VmRunState::Running {
        return Err(ServerError::Conflict(format!(
            "VM {vm} on host {} is {}",
            loc.host, loc.state
        )));
    }
    for d in &loc.disks {
        if d.storage_agent.is_none() {
            return Err(ServerError::Invalid(format!(
                "disk {} of VM {vm} ({}) is on no storage agent's datastore",
                d.disk,
                d.path.display()
            )));
        }
    }
    Ok(loc)
}

/// The parent of each disk and the checkpoint to pass as `since`.
pub struct Parent {
    pub backup: Option<BackupRecord>,
    pub since: Option<CheckpointId>,
}

impl Parent {
    pub fn of(ctx: &JobCtx<'_>, loc: &VmLocation, full: bool) -> Result<Self> {
        if full {
            return Ok(Self {
                backup: None,
                since: None,
            });
        }
        let backup = ctx.server.catalog.latest_backup(&loc.name)?;
        // A checkpoint only means something to the host that made it.
        let since = backup
            .as_ref()
            .filter(|b| b.host == loc.host)
            .and_then(|b| b.checkpoint);
        Ok(Self { backup, since })
    }

    pub fn disk_snapshot(&self, disk: &str) -> Option<String> {
        self.backup.as_ref().and_then(|b| {
            b.disks
                .iter()
                .find(|d| d.disk == disk)
                .map(|d| d.vault_snapshot.clone())
        })
    }
}

/// Takes the paired metadata snapshot of `loc` under `ts`: the same timestamp id as the
/// backup it belongs to.
pub fn metadata(ctx: &JobCtx<'_>, loc: &VmLocation, ts: &str) -> Result<MetadataSnapshot> {
    let s = ctx.server;
    let usage = match s.manager.usage(&loc.name) {
        Ok(u) => UsageSample {
            host: loc.host.clone(),
            usage: Some(u),
            error: None,
        },
        Err(e) => {
            ctx.warn(format!("{}: resource usage unavailable: {e}", loc.name));
            UsageSample {
                host: loc.host.clone(),
                usage: None,
                error: Some(e.to_string()),
            }
        }
    };
    let mut state_reader = None;
    if s.config.save_state {
        let name = format!("cairn-{}-{ts}.state", loc.name);
        let hold = Hold::SavedState {
            vm: loc.name.clone(),
            name: format!("{}/{name}", loc.host),
        };
        ctx.hold(hold.clone())?;
        match s.manager.save_state(&loc.name, &name) {
            Ok(r) => {
                ctx.info(format!(
                    "{}: execution state saved ({} bytes, downtime {} ms)",
                    loc.name, r.bytes, r.downtime_ms
                ));
                state_reader = Some((
                    s.manager
                        .saved_state(&loc.host, &name)
                        .map_err(ServerError::call("fetch saved state"))?,
                    hold,
                    name,
                ));
            }
            Err(e) => {
                ctx.unhold(&hold);
                ctx.warn(format!("{}: execution state not saved: {e}", loc.name));
            }
        }
    }
    let config = attributes(loc);
    let m = match &mut state_reader {
        Some((r, _, _)) => s
            .meta
            .record(&s.catalog, &loc.name, ts, &config, usage, Some(r))?,
        None => s
            .meta
            .record(&s.catalog, &loc.name, ts, &config, usage, None)?,
    };
    if let Some((_, hold, name)) = state_reader {
        if let Err(e) = s.manager.delete_saved_state(&loc.host, &name) {
            ctx.warn(format!("saved state {name} left on host {}: {e}", loc.host));
        } else {
            ctx.unhold(&hold);
        }
    }
    ctx.info(format!(
        "{}: metadata snapshot {ts} (configuration {})",
        loc.name,
        if m.config_reused {
            "unchanged, reused"
        } else {
            "stored"
        }
    ));
    Ok(m)
}

/// The VM's attributes as the catalog and the metadata store keep them.
pub fn attributes(loc: &VmLocation) -> VmSpec {
    loc.spec.clone()
}

/// One disk to send: where to read it and what to call it.
pub struct DiskJob<'a> {
    pub loc: &'a DiskLocation,
    pub source: DiskSource,
    pub parent: Option<String>,
}

/// The storage agent's source for a raw LUN disk: read in place with its mapping.
pub fn rdm_source(d: &DiskLocation) -> DiskSource {
    DiskSource::Rdm {
        datastore: d.datastore.clone().unwrap_or_default(),
        disk: d.datastore_disk.clone().unwrap_or_default(),
    }
}

/// Whether the disk is a raw LUN (backed up with its mapping).
pub fn is_lun(d: &DiskLocation) -> bool {
    d.kind == Some(DiskKind::Lun)
}

/// Asks each storage agent to send its disks to the vault; returns the disks in order.
pub fn send_disks(
    ctx: &JobCtx<'_>,
    vm: &str,
    backup_id: &str,
    ts: &str,
    jobs: &[DiskJob<'_>],
) -> Result<Vec<BackupDisk>> {
    let s = ctx.server;
    let mut by_agent: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, j) in jobs.iter().enumerate() {
        by_agent
            .entry(j.loc.storage_agent.as_deref().unwrap_or_default())
            .or_default()
            .push(i);
    }
    let mut out: Vec<Option<BackupDisk>> = vec![None; jobs.len()];
    for (agent, idx) in by_agent {
        let c = s.storage_agent(agent)?;
        let disks: Vec<BackupJob> = idx
            .iter()
            .map(|&i| {
                let j = &jobs[i];
                let labels = [
                    ("vm", vm),
                    ("disk", j.loc.disk.as_str()),
                    ("backup", backup_id),
                    ("timestamp_id", ts),
                    ("job", ctx.id.as_str()),
                ];
                BackupJob {
                    source: j.source.clone(),
                    request: BackupRequest {
                        name: format!("vm/{vm}/{}", j.loc.disk),
                        parent: j.parent.clone(),
                        labels: labels
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    },
                }
            })
            .collect();
        let t = Instant::now();
        let answers = c
            .backups(&BackupsRequest {
                vault: s.config.vault.clone(),
                disks,
                parallel: 0,
            })
            .map_err(ServerError::call(format!("storage agent {agent}: backup")))?;
        if answers.len() != idx.len() {
            return Err(ServerError::Failed(format!(
                "storage agent {agent} answered {} results for {} disks",
                answers.len(),
                idx.len()
            )));
        }
        for (&i, a) in idx.iter().zip(answers) {
            let j = &jobs[i];
            let r = match a {
                DiskBackupOutcome::Ok(r) => r,
                DiskBackupOutcome::Error(e) => {
                    return Err(ServerError::Failed(format!(
                        "disk {} of {vm} on storage agent {agent}: {}",
                        j.loc.disk, e.message
                    )));
                }
            };
            let m = &r.manifest;
            // The raw LUN mapping: the LUN's identity as the agent labelled it.
            let rdm = m.labels.get("rdm_lun").map(|lun| RdmMapping {
                lun: serde_json::from_str(lun)
                    .inspect_err(|e| {
                        ctx.warn(format!("{vm}/{}: LUN label: {e}", j.loc.disk));
                    })
                    .ok(),
                mapping_snapshot: m.labels.get("rdm_map_snapshot").cloned(),
            });
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            let disk = BackupDisk {
                disk: j.loc.disk.clone(),
                vault_snapshot: m.id.to_string(),
                size: n(m.size),
                format: j.loc.format,
                storage_agent: agent.to_string(),
                datastore: j.loc.datastore.clone().unwrap_or_default(),
                datastore_disk: j.loc.datastore_disk.clone().unwrap_or_default(),
                change_source: r.change_source,
                changed_bytes: n(r.changed_bytes),
                bytes_read: n(r.bytes_read),
                bytes_sent: n(r.bytes_sent),
                rdm,
            };
            if !r.fallbacks.is_empty() {
                let f = &r.fallbacks;
                ctx.warn(format!(
                    "{vm}/{}: change tracking fell back: {f:?}",
                    disk.disk
                ));
            }
            ctx.info(format!(
                "{vm}/{}: {} via {}; read {} B, sent {} B, snapshot {} ({} ms)",
                disk.disk,
                if j.parent.is_some() {
                    "incremental"
                } else {
                    "full"
                },
                disk.change_source,
                disk.bytes_read,
                disk.bytes_sent,
                disk.vault_snapshot,
                t.elapsed().as_millis()
            ));
            out[i] = Some(disk);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// A VM snapshot a flow holds.
pub struct VmSnap {
    pub id: VmSnapshotId,
    /// How the guest was quiesced.
    pub quiesce: Quiesce,
    pub quiesce_window_ms: i64,
    /// The checkpoint it started.
    pub checkpoint: Option<CheckpointId>,
    pub disks: Vec<VmDiskSnapshot>,
    pub hold: Hold,
}

/// Takes a VM snapshot through the manager, holding it for the job.
pub fn snapshot_vm(
    ctx: &JobCtx<'_>,
    loc: &VmLocation,
    kind: SnapshotKind,
    since: Option<CheckpointId>,
) -> Result<VmSnap> {
    let r = ctx
        .server
        .manager
        .snapshot(
            &loc.name,
            &SnapshotRequest {
                kind: Some(kind),
                quiesce: QuiescePolicy::Auto,
                since,
                agent_timeout_ms: Some(1500),
                freeze_timeout_ms: None,
            },
        )
        .map_err(ServerError::call(format!("snapshot VM {}", loc.name)))?;
    let id = r.id;
    let hold = Hold::VmSnapshot {
        vm: loc.name.clone(),
        snapshot: format!("{}/{id}", loc.host),
    };
    // Recorded right after creation: the host agent's journal covers the gap before.
    ctx.hold(hold.clone())?;
    let s = VmSnap {
        id,
        quiesce: r.quiesce,
        quiesce_window_ms: i64::try_from(r.quiesce_window_ms).unwrap_or(i64::MAX),
        checkpoint: r.checkpoint,
        disks: r.disks,
        hold,
    };
    ctx.info(format!(
        "{}: {} VM snapshot {} ({}, guest held {} ms)",
        loc.name,
        kind.as_str(),
        s.id,
        s.quiesce,
        s.quiesce_window_ms
    ));
    Ok(s)
}

/// Deletes a VM snapshot; returns the lifetime the host agent measured.
pub fn release_vm_snapshot(ctx: &JobCtx<'_>, loc: &VmLocation, snap: &VmSnap) -> Result<i64> {
    let r = ctx
        .server
        .manager
        .delete_snapshot(&loc.host, snap.id)
        .map_err(ServerError::call(format!(
            "delete VM snapshot of {}",
            loc.name
        )))?;
    ctx.unhold(&snap.hold);
    let lifetime = i64::try_from(r.lifetime_ms).unwrap_or(i64::MAX);
    ctx.info(format!(
        "{}: VM snapshot {} deleted, lifetime {lifetime} ms",
        loc.name, snap.id
    ));
    Ok(lifetime)
}

/// Test hook: `CAIRN_FAULT_PAUSE_AFTER_VM_SNAPSHOT_MS` holds a backup right after its VM
/// snapshot was taken (cancellable), so tests can kill or cancel a job that holds one.
fn fault_pause(ctx: &JobCtx<'_>) -> Result<()> {
    let Some(ms) = std::env::var("CAIRN_FAULT_PAUSE_AFTER_VM_SNAPSHOT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return Ok(());
    };
    ctx.warn(format!(
        "fault injection: pausing {ms} ms while holding the VM snapshot"
    ));
    let until = Instant::now() + std::time::Duration::from_millis(ms);
    while Instant::now() < until {
        ctx.check_cancel()?;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

/// The storage agent's source for disk `d` of a fleecing snapshot: its NBD export, with the
/// dirty bitmap as the first change hint when the snapshot knows the changes since `since`.
fn nbd_source(
    ctx: &JobCtx<'_>,
    vm: &str,
    d: &DiskLocation,
    snap: &VmSnap,
    parent: &Parent,
) -> Result<DiskSource> {
    let sd = snap
        .disks
        .iter()
        .find(|x| x.disk.id == d.disk)
        .ok_or_else(|| ServerError::Failed(format!("the VM snapshot lacks disk {}", d.disk)))?;
    let VmDiskSource::Nbd { socket, export } = &sd.source else {
        return Err(ServerError::Failed(format!(
            "disk {}: expected an NBD export, got {:?}",
            d.disk, sd.source
        )));
    };
    let bitmap_context = match &sd.changes {
        Changes::Known(k) if parent.since.is_some() => k.meta_context.clone(),
        _ => None,
    };
    if parent.backup.is_some()
        && let Changes::Unknown { reason } = &sd.changes
    {
        ctx.warn(format!(
            "{vm}/{}: changed blocks unknown ({}): the storage agent compares the disk with the previous backup",
            d.disk,
            reason.as_str()
        ));
    }
    Ok(DiskSource::Nbd {
        socket: socket.clone(),
        export: export.clone(),
        bitmap_context,
    })
}

fn backup_vm(ctx: &JobCtx<'_>, vm: &str, full: bool) -> Result<BackupRecord> {
    let started = Instant::now();
    let created_ms = now_ms();
    let loc = locate(ctx, vm)?;
    let parent = Parent::of(ctx, &loc, full)?;
    // The metadata snapshot first: QEMU cannot migrate (save state) while the fleecing
    // copy-before-write job runs, and the VM snapshot then lives as short as possible.
    let ts = crate::meta::timestamp_id();
    let backup_id = new_id();
    let meta = metadata(ctx, &loc, &ts)?;
    let snap = snapshot_vm(ctx, &loc, SnapshotKind::Fleecing, parent.since)?;
    fault_pause(ctx)?;
    ctx.check_cancel()?;
    let mut jobs = Vec::new();
    for d in &loc.disks {
        let source = if is_lun(d) {
            rdm_source(d)
        } else {
            nbd_source(ctx, vm, d, &snap, &parent)?
        };
        jobs.push(DiskJob {
            loc: d,
            source,
            parent: parent.disk_snapshot(&d.disk),
        });
    }
    let disks = send_disks(ctx, vm, &backup_id, &ts, &jobs)?;
    let lifetime = release_vm_snapshot(ctx, &loc, &snap)?;
    let b = BackupRecord {
        id: backup_id,
        vm: vm.into(),
        job_id: ctx.id.clone(),
        kind: if parent.backup.is_some() {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        },
        group_id: None,
        timestamp_id: meta.timestamp_id.clone(),
        created_ms,
        duration_ms: started.elapsed().as_millis() as i64,
        host: loc.host.clone(),
        checkpoint: snap.checkpoint,
        snapshot_kind: SnapshotKind::Fleecing,
        quiesce: snap.quiesce,
        quiesce_window_ms: snap.quiesce_window_ms,
        vm_snapshot_lifetime_ms: lifetime,
        bytes_read: disks.iter().map(|d| d.bytes_read).sum(),
        bytes_sent: disks.iter().map(|d| d.bytes_sent).sum(),
        attributes: attributes(&loc),
        disks,
        metadata: None,
    };
    ctx.server.catalog.insert_backup(&b)?;
    crate::files::queue_index(ctx, &b.id);
    ctx.info(format!(
        "{vm}: {} backup {} recorded in {} ms",
        b.kind, b.id, b.duration_ms
    ));
    Ok(b)
}
