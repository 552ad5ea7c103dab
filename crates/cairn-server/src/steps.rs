//! The steps of a backup, written once for every backup flow: [`backup`](crate::backup)
//! (one VM at a time, a fleecing VM snapshot) and [`group`](crate::group) (one storage
//! snapshot per unit under overlay VM snapshots) differ only in how each disk gets a
//! consistent point to read from.
//!
//! | step | function | holds |
//! |---|---|---|
//! | where the VM and its disks are | [`locate`], [`Parent::of`] | — |
//! | the paired metadata snapshot, under a new backup id | [`begin`] | the saved state, until stored |
//! | a VM snapshot | [`snapshot_vm`] | the VM snapshot, recorded right after creation |
//! | the disks sent to the vault by their storage agents | [`send_disks`] | — |
//! | the VM snapshot released | [`release_vm_snapshot`] | — |
//! | the backup recorded in one catalog transaction, its file indexing queued | [`finish`] | — |
//!
//! Invariant: [`finish`] is the only step that writes a backup row, and a flow calls it only
//! after [`send_disks`] returned every disk committed in the vault.

use std::collections::BTreeMap;
use std::time::Instant;

use cairn_api::host::{
    CheckpointId, DiskSnapshot as VmDiskSnapshot, Quiesce, QuiescePolicy, SnapshotKind,
    SnapshotRequest, VmSnapshotId, VmSpec,
};
use cairn_api::manager::{DiskLocation, VmLocation, VmRunState};
use cairn_api::server::{
    BackupId, BackupKind, BackupSummary, DiskSummary, RdmMapping, UsageSample,
};
use cairn_api::storage::{
    BackupJob, BackupRequest, BackupsRequest, DiskBackup, DiskBackupOutcome, DiskKind, DiskSource,
};
use cairn_catalog::{BackupDisk, BackupRecord, Hold, MetadataSnapshot, now_ms};

use crate::{JobCtx, Result, ServerError};

/// Locates a VM and checks that it runs (or is a shut-off domain) and that Cairn can read
/// every disk. A disk it cannot read (the host's reasons, or on no storage agent's datastore)
/// refuses the VM, naming each disk and why; with `skip`, those disks are left out with a
/// warning and the rest is backed up.
pub fn locate(ctx: &JobCtx<'_>, vm: &str, skip: bool) -> Result<VmLocation> {
    let mut loc = ctx
        .app
        .manager
        .vm(vm)
        .map_err(ServerError::call(format!("locate VM {vm}")))?;
    // A shut-off (libvirt) VM is backed up from its disks in place.
    if !matches!(loc.state, VmRunState::Running | VmRunState::ShutOff) {
        return Err(ServerError::Conflict(format!(
            "VM {vm} on host {} is {}",
            loc.host, loc.state
        )));
    }
    let unprotected = loc.unprotected_disks();
    if unprotected.is_empty() {
        return Ok(loc);
    }
    let list = unprotected
        .iter()
        .map(|u| format!("{} ({})", u.disk, u.reason))
        .collect::<Vec<_>>()
        .join("; ");
    if !skip {
        return Err(ServerError::Invalid(format!(
            "VM {vm}: Cairn cannot back up disk(s) {list}; back up the others with skip_unprotected (cairn backup --skip-unprotected)"
        )));
    }
    for u in &unprotected {
        ctx.warn(format!("{vm}/{}: not backed up: {}", u.disk, u.reason));
    }
    loc.disks.retain(|d| d.storage_agent.is_some());
    // The stored attributes list only what the backup holds: a restored VM must never point at
    // the original's disk.
    let kept: Vec<String> = loc.disks.iter().map(|d| d.disk.clone()).collect();
    loc.spec.disks.retain(|d| kept.contains(&d.id));
    if loc.disks.is_empty() {
        return Err(ServerError::Invalid(format!(
            "VM {vm}: no disk Cairn can back up ({list})"
        )));
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
        let backup = ctx.app.catalog.latest_backup(&loc.name)?;
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

    /// Incremental when there is a parent, else full.
    pub fn backup_kind(&self) -> BackupKind {
        if self.backup.is_some() {
            BackupKind::Incremental
        } else {
            BackupKind::Full
        }
    }
}

/// One backup in the making: its id and its metadata snapshot's timestamp id.
pub struct BackupPoint {
    pub id: BackupId,
    pub meta: MetadataSnapshot,
}

/// Starts the backup of `loc`: a new id and the paired metadata snapshot under a new
/// timestamp id (the same the backup will carry).
pub fn begin(ctx: &JobCtx<'_>, loc: &VmLocation) -> Result<BackupPoint> {
    let ts = crate::meta::timestamp_id();
    let id = BackupId::random();
    let meta = metadata(ctx, loc, &ts)?;
    Ok(BackupPoint { id, meta })
}

/// A saved execution state, held until it is in the metadata store.
struct SavedState {
    reader: Box<dyn std::io::Read + Send + Sync>,
    hold: Hold,
    name: String,
}

/// Saves the VM's execution state on its host (when configured); `None` when it could not
/// be saved (logged: the backup goes on without it).
fn save_state(ctx: &JobCtx<'_>, loc: &VmLocation, ts: &str) -> Result<Option<SavedState>> {
    let s = ctx.app;
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
            let reader = s
                .manager
                .saved_state(&loc.host, &name)
                .map_err(ServerError::call("fetch saved state"))?;
            Ok(Some(SavedState { reader, hold, name }))
        }
        Err(e) => {
            ctx.unhold(&hold);
            ctx.warn(format!("{}: execution state not saved: {e}", loc.name));
            Ok(None)
        }
    }
}

/// Takes the paired metadata snapshot of `loc` under `ts`: configuration, resource usage
/// and (unless disabled) execution state.
fn metadata(ctx: &JobCtx<'_>, loc: &VmLocation, ts: &str) -> Result<MetadataSnapshot> {
    let s = ctx.app;
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
    let mut state = match s.config.save_state {
        true => save_state(ctx, loc, ts)?,
        false => None,
    };
    let config = attributes(loc);
    let reader = state
        .as_mut()
        .map(|st| &mut st.reader as &mut dyn std::io::Read);
    let m = s
        .meta
        .record(&s.catalog, &loc.name, ts, &config, usage, reader)?;
    if let Some(st) = state {
        if let Err(e) = s.manager.delete_saved_state(&loc.host, &st.name) {
            let name = &st.name;
            ctx.warn(format!("saved state {name} left on host {}: {e}", loc.host));
        } else {
            ctx.unhold(&st.hold);
        }
    }
    let config = match m.config_reused {
        true => "unchanged, reused",
        false => "stored",
    };
    ctx.info(format!(
        "{}: metadata snapshot {ts} (configuration {config})",
        loc.name
    ));
    Ok(m)
}

/// The VM's attributes as the catalog and the metadata store keep them.
pub fn attributes(loc: &VmLocation) -> VmSpec {
    loc.spec.clone()
}

/// A VM snapshot a flow holds.
pub struct VmSnap {
    pub id: VmSnapshotId,
    pub kind: SnapshotKind,
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
    let request = SnapshotRequest {
        kind: Some(kind),
        quiesce: QuiescePolicy::Auto,
        since,
        agent_timeout_ms: Some(1500),
        freeze_timeout_ms: None,
    };
    let r = ctx
        .app
        .manager
        .snapshot(&loc.name, &request)
        .map_err(ServerError::call(format!("snapshot VM {}", loc.name)))?;
    let hold = Hold::VmSnapshot {
        vm: loc.name.clone(),
        snapshot: format!("{}/{}", loc.host, r.id),
    };
    // Recorded right after creation: the host agent's journal covers the gap before.
    ctx.hold(hold.clone())?;
    let s = VmSnap {
        id: r.id,
        kind,
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
        .app
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
    point: &BackupPoint,
    jobs: &[DiskJob<'_>],
) -> Result<Vec<BackupDisk>> {
    let mut by_agent: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, j) in jobs.iter().enumerate() {
        by_agent
            .entry(j.loc.storage_agent.as_deref().unwrap_or_default())
            .or_default()
            .push(i);
    }
    let mut out: Vec<Option<BackupDisk>> = vec![None; jobs.len()];
    for (agent, idx) in by_agent {
        let mine: Vec<&DiskJob<'_>> = idx.iter().map(|&i| &jobs[i]).collect();
        let disks = send_to_agent(ctx, vm, point, agent, &mine)?;
        for (i, d) in idx.into_iter().zip(disks) {
            out[i] = Some(d);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// One storage agent's part of [`send_disks`]: one request for all its disks.
fn send_to_agent(
    ctx: &JobCtx<'_>,
    vm: &str,
    point: &BackupPoint,
    agent: &str,
    jobs: &[&DiskJob<'_>],
) -> Result<Vec<BackupDisk>> {
    let s = ctx.app;
    let c = s.storage_agent(agent)?;
    let disks = jobs.iter().map(|j| backup_job(ctx, vm, point, j)).collect();
    let t = Instant::now();
    let answers = c
        .backups(&BackupsRequest {
            vault: s.config.vault.clone(),
            disks,
            parallel: 0,
        })
        .map_err(ServerError::call(format!("storage agent {agent}: backup")))?;
    if answers.len() != jobs.len() {
        return Err(ServerError::Failed(format!(
            "storage agent {agent} answered {} results for {} disks",
            answers.len(),
            jobs.len()
        )));
    }
    let mut out = Vec::new();
    for (j, a) in jobs.iter().zip(answers) {
        let r = match a {
            DiskBackupOutcome::Ok(r) => r,
            DiskBackupOutcome::Error(e) => {
                return Err(ServerError::Failed(format!(
                    "disk {} of {vm} on storage agent {agent}: {}",
                    j.loc.disk, e.message
                )));
            }
        };
        let disk = backup_disk(agent, j, &r);
        log_disk(ctx, vm, j, &r, &disk, t);
        out.push(disk);
    }
    Ok(out)
}

/// What a storage agent is asked for one disk: its source, its name in the vault, its
/// parent, and labels that tie it to the backup.
fn backup_job(ctx: &JobCtx<'_>, vm: &str, point: &BackupPoint, j: &DiskJob<'_>) -> BackupJob {
    let labels = [
        ("vm", vm),
        ("disk", j.loc.disk.as_str()),
        ("backup", point.id.as_str()),
        ("timestamp_id", point.meta.timestamp_id.as_str()),
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
}

/// A disk as the catalog records it, from the storage agent's answer.
fn backup_disk(agent: &str, j: &DiskJob<'_>, r: &DiskBackup) -> BackupDisk {
    let m = &r.manifest;
    // The raw LUN mapping: the LUN's identity as the agent labelled it.
    let rdm = m.labels.get("rdm_lun").map(|lun| RdmMapping {
        lun: serde_json::from_str(lun).ok(),
        mapping_snapshot: m.labels.get("rdm_map_snapshot").cloned(),
    });
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    BackupDisk {
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
    }
}

fn log_disk(
    ctx: &JobCtx<'_>,
    vm: &str,
    j: &DiskJob<'_>,
    r: &DiskBackup,
    disk: &BackupDisk,
    started: Instant,
) {
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
        started.elapsed().as_millis()
    ));
}

/// What a flow got for one VM, to record.
pub struct Backed<'a> {
    pub loc: &'a VmLocation,
    pub point: BackupPoint,
    pub parent: &'a Parent,
    pub snap: &'a VmSnap,
    pub vm_snapshot_lifetime_ms: i64,
    pub group_id: Option<String>,
    /// When the flow started (`created_ms`, `duration_ms` count from it).
    pub created_ms: i64,
    pub started: Instant,
    /// Every disk, committed in the vault.
    pub disks: Vec<BackupDisk>,
}

/// Records the backup in one catalog transaction and queues its file indexing.
pub fn finish(ctx: &JobCtx<'_>, b: Backed<'_>) -> Result<BackupRecord> {
    let vm = &b.loc.name;
    let r = BackupRecord {
        id: b.point.id,
        vm: vm.clone(),
        job_id: ctx.id.clone(),
        kind: b.parent.backup_kind(),
        group_id: b.group_id,
        timestamp_id: b.point.meta.timestamp_id,
        created_ms: b.created_ms,
        duration_ms: b.started.elapsed().as_millis() as i64,
        host: b.loc.host.clone(),
        checkpoint: b.snap.checkpoint,
        snapshot_kind: b.snap.kind,
        quiesce: b.snap.quiesce,
        quiesce_window_ms: b.snap.quiesce_window_ms,
        vm_snapshot_lifetime_ms: b.vm_snapshot_lifetime_ms,
        bytes_read: b.disks.iter().map(|d| d.bytes_read).sum(),
        bytes_sent: b.disks.iter().map(|d| d.bytes_sent).sum(),
        attributes: attributes(b.loc),
        disks: b.disks,
        metadata: None,
        volumes: None,
    };
    ctx.app.catalog.insert_backup(&r)?;
    crate::files::queue_index(ctx, &r.id);
    ctx.info(format!(
        "{vm}: {} backup {} recorded in {} ms",
        r.kind, r.id, r.duration_ms
    ));
    Ok(r)
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

/// When a flow started, for [`Backed::created_ms`] and [`Backed::started`].
pub fn clock() -> (i64, Instant) {
    (now_ms(), Instant::now())
}
