//! Full and incremental backup of one VM (`docs/ARCHITECTURE.md`, "The flows"), from the
//! shared [`steps`]:
//!
//! 1. The manager says where the VM runs and which storage agent holds each disk.
//! 2. The paired metadata snapshot: configuration, host resource usage and, unless
//!    disabled, the execution state, under the backup's timestamp id. It comes first: QEMU
//!    cannot save state while the fleecing copy-before-write job runs, and the VM snapshot
//!    then lives as short as possible.
//! 3. Through the manager, the host agent quiesces the guest and takes a **fleecing** VM
//!    snapshot (`since` = the previous backup's checkpoint): a point-in-time, read-only NBD
//!    export per disk, carrying the dirty bitmap when changes are known.
//! 4. Each storage agent reads its disks' exports and sends them to the vault, fingerprints
//!    first: with the bitmap for an incremental, else comparing with the parent's recipe
//!    (tracking lost falls back, never fails). RDM disks go with their LUN mapping.
//! 5. The VM snapshot is deleted (its lifetime recorded); the backup is recorded in one
//!    catalog transaction. Any failure releases the snapshot and records nothing.

use std::time::{Duration, Instant};

use cairn_api::host::{Changes, DiskSource as VmDiskSource, SnapshotKind};
use cairn_api::manager::{DiskLocation, VmLocation};
use cairn_api::server::{BackupsDone, JobResult};
use cairn_api::storage::DiskSource;
use cairn_catalog::BackupRecord;

use crate::engine::Flow;
use crate::steps::{self, Backed, DiskJob, Parent, VmSnap};
use crate::{JobCtx, JobKind, Result, Server, ServerError};

/// The `backup` job.
pub struct BackupFlow;

impl Flow<Server> for BackupFlow {
    fn kind(&self) -> &'static str {
        "backup"
    }

    fn run(&self, ctx: &JobCtx<'_>, params: &JobKind) -> Result<JobResult> {
        match params {
            JobKind::Backup {
                vms,
                full,
                skip_unprotected,
            } => run(ctx, vms, *full, *skip_unprotected),
            other => Err(crate::jobs::not_for(other, self.kind())),
        }
    }
}

/// Backs up each VM in turn; the job fails at the first VM that fails.
pub fn run(ctx: &JobCtx<'_>, vms: &[String], full: bool, skip: bool) -> Result<JobResult> {
    let mut out = Vec::new();
    for vm in vms {
        ctx.check_cancel()?;
        let b = backup_vm(ctx, vm, full, skip)?;
        out.push(steps::summary(&b));
        crate::schedule::apply_retention(ctx, vm)?;
    }
    Ok(JobResult::Backup(BackupsDone { backups: out }))
}

fn backup_vm(ctx: &JobCtx<'_>, vm: &str, full: bool, skip: bool) -> Result<BackupRecord> {
    let (created_ms, started) = steps::clock();
    let loc = steps::locate(ctx, vm, skip)?;
    let parent = Parent::of(ctx, &loc, full)?;
    let point = steps::begin(ctx, &loc)?;
    let snap = steps::snapshot_vm(ctx, &loc, SnapshotKind::Fleecing, parent.since)?;
    fault_pause(ctx)?;
    ctx.check_cancel()?;
    let jobs = disk_jobs(ctx, &loc, &snap, &parent)?;
    let disks = steps::send_disks(ctx, vm, &point, &jobs)?;
    let lifetime = steps::release_vm_snapshot(ctx, &loc, &snap)?;
    steps::finish(
        ctx,
        Backed {
            loc: &loc,
            point,
            parent: &parent,
            snap: &snap,
            vm_snapshot_lifetime_ms: lifetime,
            group_id: None,
            created_ms,
            started,
            disks,
        },
    )
}

/// Each disk read from the fleecing snapshot's export (a raw LUN in place).
fn disk_jobs<'a>(
    ctx: &JobCtx<'_>,
    loc: &'a VmLocation,
    snap: &VmSnap,
    parent: &Parent,
) -> Result<Vec<DiskJob<'a>>> {
    let mut jobs = Vec::new();
    for d in &loc.disks {
        let source = if steps::is_lun(d) {
            steps::rdm_source(d)
        } else {
            nbd_source(ctx, &loc.name, d, snap, parent)?
        };
        jobs.push(DiskJob {
            loc: d,
            source,
            parent: parent.disk_snapshot(&d.disk),
        });
    }
    Ok(jobs)
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
    let (socket, export) = match &sd.source {
        VmDiskSource::Nbd { socket, export } => (socket, export),
        // A shut-off VM: the storage agent reads the disk in place, comparing with the parent.
        VmDiskSource::File { .. } => {
            let (Some(datastore), Some(disk)) = (&d.datastore, &d.datastore_disk) else {
                return Err(ServerError::Failed(format!(
                    "disk {}: no datastore serves {}",
                    d.disk,
                    d.path.display()
                )));
            };
            return Ok(DiskSource::InPlace {
                datastore: datastore.clone(),
                disk: disk.clone(),
            });
        }
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
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        ctx.check_cancel()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
