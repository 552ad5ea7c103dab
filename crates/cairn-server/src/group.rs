//! The targeted group snapshot of a VM group (`docs/ARCHITECTURE.md`, "The flows"), from the
//! shared [`steps`]:
//!
//! 1. Each VM is quiesced and switched to an **overlay** VM snapshot: its disk files are
//!    frozen on the datastore.
//! 2. The storage units holding those files are found from the snapshot metadata (the
//!    manager's map disk → datastore → unit), and **one storage snapshot per unit** is taken
//!    (reflink clones where the unit can share extents, else a plain copy, reported as slow).
//! 3. As soon as the unit snapshots are confirmed, every VM snapshot is deleted (the overlay
//!    merged back): the VM-snapshot lifetime covers steps 1–3 only, not the backup.
//! 4. Every VM is then backed up from the unit snapshots, fingerprints first; the unit
//!    snapshots are deleted at the end (or on failure, by the engine).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use cairn_api::host::SnapshotKind;
use cairn_api::manager::VmLocation;
use cairn_api::server::{BackupSummary, GroupBackupDone, JobResult, VmSnapshotLifetime};
use cairn_api::storage::{DiskRef, DiskSource, UnitSnapshot, UnitSnapshotRequest};
use cairn_catalog::{BackupRecord, Hold, new_id};

use crate::engine::{App, Flow};
use crate::steps::{self, Backed, DiskJob, Parent, VmSnap, is_lun, rdm_source};
use crate::{JobCtx, JobKind, Result, Server, ServerError};

/// The `group_backup` job.
pub struct GroupFlow;

impl Flow<Server> for GroupFlow {
    fn kind(&self) -> &'static str {
        "group_backup"
    }

    fn run(&self, ctx: &JobCtx<'_>, params: &JobKind) -> Result<JobResult> {
        match params {
            JobKind::GroupBackup {
                vms,
                full,
                skip_unprotected,
            } => run(ctx, vms, *full, *skip_unprotected),
            other => Err(crate::jobs::not_for(other, self.kind())),
        }
    }
}

/// The VMs of the group, as located when the job started.
struct Group {
    id: String,
    locs: Vec<VmLocation>,
    parents: Vec<Parent>,
    created_ms: i64,
    started: Instant,
}

/// A VM snapshot, deleted once the unit snapshots are confirmed.
struct Snapped {
    snap: VmSnap,
    taken: Instant,
    /// (as the host agent measured it, as the server did), once released.
    lifetime: (i64, i64),
}

/// A disk's place in a unit snapshot: (VM index, disk index) → (snapshot id, index within).
type UnitOf = BTreeMap<(usize, usize), (String, usize)>;

pub fn run(ctx: &JobCtx<'_>, vms: &[String], full: bool, skip: bool) -> Result<JobResult> {
    let g = locate(ctx, vms, full, skip)?;
    let mut snaps = snapshot_vms(ctx, &g)?;
    let unit_started = Instant::now();
    let (unit_of, units) = snapshot_units(ctx, &g)?;
    let unit_ms = unit_started.elapsed().as_millis() as i64;
    release_vm_snapshots(ctx, &g, &mut snaps)?;
    ctx.check_cancel()?;
    let mut out = Vec::new();
    for (vi, snapped) in snaps.iter().enumerate() {
        let b = backup_from_units(ctx, &g, vi, snapped, &unit_of)?;
        out.push(steps::summary(&b));
    }
    release_units(ctx, &units);
    for vm in vms {
        crate::schedule::apply_retention(ctx, vm)?;
    }
    Ok(report(ctx, &g, &snaps, unit_ms, out))
}

fn locate(ctx: &JobCtx<'_>, vms: &[String], full: bool, skip: bool) -> Result<Group> {
    let (created_ms, started) = steps::clock();
    let id = new_id();
    let locs = vms
        .iter()
        .map(|v| steps::locate(ctx, v, skip))
        .collect::<Result<Vec<_>>>()?;
    let parents = locs
        .iter()
        .map(|l| Parent::of(ctx, l, full))
        .collect::<Result<Vec<_>>>()?;
    ctx.info(format!("group {id}: {} VMs", locs.len()));
    Ok(Group {
        id,
        locs,
        parents,
        created_ms,
        started,
    })
}

/// 1. An overlay VM snapshot of every VM (the base files freeze on the datastore).
fn snapshot_vms(ctx: &JobCtx<'_>, g: &Group) -> Result<Vec<Snapped>> {
    let mut snaps = Vec::new();
    for (loc, parent) in g.locs.iter().zip(&g.parents) {
        let taken = Instant::now();
        let snap = steps::snapshot_vm(ctx, loc, SnapshotKind::Overlay, parent.since)?;
        snaps.push(Snapped {
            snap,
            taken,
            lifetime: (0, 0),
        });
    }
    Ok(snaps)
}

fn canonical(p: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// 2. One storage snapshot per unit, per storage agent (raw LUNs are read in place).
fn snapshot_units(ctx: &JobCtx<'_>, g: &Group) -> Result<(UnitOf, Vec<Hold>)> {
    let mut per_agent: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    for (vi, loc) in g.locs.iter().enumerate() {
        for (di, d) in loc.disks.iter().enumerate() {
            if !is_lun(d) {
                per_agent
                    .entry(d.storage_agent.clone().unwrap_or_default())
                    .or_default()
                    .push((vi, di));
            }
        }
    }
    let mut unit_of = UnitOf::new();
    let mut holds = Vec::new();
    for (agent, disks) in &per_agent {
        let (units, provider) = snapshot_agent_units(ctx, g, agent, disks)?;
        for u in units {
            let hold = Hold::StorageSnapshot {
                agent: agent.clone(),
                snapshot: u.id.clone(),
            };
            ctx.hold(hold.clone())?;
            holds.push(hold);
            ctx.info(format!(
                "storage snapshot {} on {agent}: unit {}, {} disk(s), {provider}, window {} µs",
                u.id,
                u.unit.as_deref().unwrap_or("-"),
                u.disks.len(),
                u.window_us
            ));
            for (ui, ud) in u.disks.iter().enumerate() {
                let p = canonical(&ud.disk);
                for &(v, d) in disks {
                    if canonical(&g.locs[v].disks[d].path) == p {
                        unit_of.insert((v, d), (u.id.clone(), ui));
                    }
                }
            }
        }
    }
    Ok((unit_of, holds))
}

/// The unit snapshots of one storage agent's `disks` (VM index, disk index), and how they
/// were taken (`reflink` or `copy`).
fn snapshot_agent_units(
    ctx: &JobCtx<'_>,
    g: &Group,
    agent: &str,
    disks: &[(usize, usize)],
) -> Result<(Vec<UnitSnapshot>, &'static str)> {
    let c = ctx.app.storage_agent(agent)?;
    let reflink = disks
        .iter()
        .all(|&(v, d)| g.locs[v].disks[d].unit_reflink == Some(true));
    let provider = if reflink { "reflink" } else { "copy" };
    if !reflink {
        ctx.warn(format!(
            "storage agent {agent}: a unit cannot reflink: plain copies (slow, full space)"
        ));
    }
    let req = UnitSnapshotRequest {
        provider: provider.into(),
        tag: format!("{}{}", cairn_api::storage::JOB_SCOPED_TAG_PREFIX, g.id),
        disks: disks
            .iter()
            .map(|&(v, d)| DiskRef {
                datastore: g.locs[v].disks[d].datastore.clone().unwrap_or_default(),
                disk: g.locs[v].disks[d]
                    .datastore_disk
                    .clone()
                    .unwrap_or_default(),
            })
            .collect(),
    };
    let units = c.snapshot_units(&req).map_err(ServerError::call(format!(
        "storage agent {agent}: unit snapshot"
    )))?;
    Ok((units, provider))
}

/// 3. The unit snapshots are confirmed: every VM snapshot is released at once.
fn release_vm_snapshots(ctx: &JobCtx<'_>, g: &Group, snaps: &mut [Snapped]) -> Result<()> {
    for (s, loc) in snaps.iter_mut().zip(&g.locs) {
        let host_ms = steps::release_vm_snapshot(ctx, loc, &s.snap)?;
        s.lifetime = (host_ms, s.taken.elapsed().as_millis() as i64);
    }
    Ok(())
}

/// 4. One VM backed up from the unit snapshots.
fn backup_from_units(
    ctx: &JobCtx<'_>,
    g: &Group,
    vi: usize,
    snapped: &Snapped,
    unit_of: &UnitOf,
) -> Result<BackupRecord> {
    let (loc, parent) = (&g.locs[vi], &g.parents[vi]);
    let point = steps::begin(ctx, loc)?;
    let mut jobs = Vec::new();
    for (di, d) in loc.disks.iter().enumerate() {
        let source = match unit_of.get(&(vi, di)) {
            Some((snapshot, index)) => DiskSource::Snapshot {
                snapshot: snapshot.clone(),
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
            parent: parent.disk_snapshot(&d.disk),
        });
    }
    let disks = steps::send_disks(ctx, &loc.name, &point, &jobs)?;
    steps::finish(
        ctx,
        Backed {
            loc,
            point,
            parent,
            snap: &snapped.snap,
            vm_snapshot_lifetime_ms: snapped.lifetime.0,
            group_id: Some(g.id.clone()),
            created_ms: g.created_ms,
            started: g.started,
            disks,
        },
    )
}

/// The unit snapshots are no longer needed (one that cannot be deleted now stays held and
/// is released by the engine).
fn release_units(ctx: &JobCtx<'_>, units: &[Hold]) {
    for h in units {
        if let Err(e) = ctx.release(h) {
            ctx.warn(format!("{} kept: {}", ctx.app.describe(h), e.chain()));
        }
    }
}

fn report(
    ctx: &JobCtx<'_>,
    g: &Group,
    snaps: &[Snapped],
    unit_ms: i64,
    out: Vec<BackupSummary>,
) -> JobResult {
    let total_ms = g.started.elapsed().as_millis() as i64;
    ctx.info(format!(
        "group {}: {} VMs in {total_ms} ms; VM snapshot lifetimes {:?} ms",
        g.id,
        g.locs.len(),
        snaps.iter().map(|s| s.lifetime.0).collect::<Vec<_>>()
    ));
    JobResult::GroupBackup(GroupBackupDone {
        group: g.id.clone(),
        duration_ms: total_ms,
        unit_snapshot_ms: unit_ms,
        vm_snapshot_lifetimes_ms: g
            .locs
            .iter()
            .zip(snaps)
            .map(|(l, s)| VmSnapshotLifetime {
                vm: l.name.clone(),
                host_measured_ms: s.lifetime.0,
                server_measured_ms: s.lifetime.1,
            })
            .collect(),
        backups: out,
    })
}
