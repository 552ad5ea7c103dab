//! VM snapshots of libvirt domains: libvirt's pull-mode backup job for a running domain,
//! the disk files in place for a shut-off one, and the checkpoint chain between backups.
//!
//! A running domain's snapshot is one `virDomainBackupBegin`: libvirt starts an NBD server on a
//! unix socket in a private directory, exports each disk at the point in time the job began
//! (copy-before-write into a scratch image), and, in the same step, creates the checkpoint
//! `cairn-<id>` (a persistent bitmap on each qcow2 disk). The guest is quiesced only around
//! that call. Ending the job (`virDomainAbortJob`) drops the exports and the scratch images.
//!
//! Checkpoint hygiene: Cairn touches only checkpoints named with its own prefix. When a
//! snapshot is deleted, Cairn's checkpoints other than the one it read from and the one it made
//! are deleted; libvirt then merges their bitmaps into their parents, so other tools'
//! checkpoints (virtnbdbackup's) keep their meaning, and theirs never break Cairn's. A
//! checkpoint libvirt no longer knows is redefined from the XML kept when it was made; when
//! that fails, or the disk was resized, or libvirt refuses the incremental job, the disk is
//! read whole and the snapshot says why ([`Changes::Unknown`]): a lost chain never fails a
//! backup.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_api::host::{
    CHECKPOINT_PREFIX, DiskSnapshot, DiskSource, KnownChanges, Quiesce, QuiescePolicy,
    SnapshotKind, TEMP_PREFIX, UnknownReason, VmSnapshot,
};
use cairn_hypervisor::driver::{Changes, DriverError, SnapshotOptions};
use cairn_hypervisor::spec::{CheckpointId, VmId, VmSnapshotId};

use crate::driver::{Inner, failed, io_err, ms_since, vm_disks};
use crate::ffi::{self, Domain};
use crate::journal::Flight;
use crate::xml::{self, BackupDisk, DomainXml, XmlDisk};

/// Whose checkpoints Cairn's incrementals read the changes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CheckpointMode {
    /// Cairn makes its own `cairn-…` checkpoint with each backup. Tools that refuse
    /// checkpoints they did not make (virtnbdbackup 1.9) then refuse the domain.
    #[default]
    Own,
    /// Cairn makes no checkpoint: an incremental reads what changed since the newest checkpoint
    /// another tool had made before the parent backup (a superset of the changes), or the
    /// whole disk when there was none. For domains another checkpoint-based tool also backs up.
    Borrow,
}

/// Bitmap granularity libvirt uses for checkpoints it creates on qcow2 disks (QEMU's default).
const BITMAP_GRANULARITY: u64 = 64 * 1024;
/// The longest unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

fn now_ms() -> u64 {
    u64::try_from(cairn_types::now_ms()).unwrap_or(0)
}

fn libvirt_state(d: &Domain) -> Result<i32, DriverError> {
    Ok(d.state().map_err(failed("domain state"))?.0)
}

/// Takes a VM snapshot of domain `vm`.
pub fn snapshot(inner: &Inner, vm: VmId, o: &SnapshotOptions) -> Result<VmSnapshot, DriverError> {
    {
        let flights = inner.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = flights.values().find(|f| f.vm == vm) {
            return Err(DriverError::SnapshotInProgress { vm, snapshot: f.id });
        }
    }
    let conn = inner.conn()?;
    let dom = inner.domain(&conn, vm)?;
    let (uuid, live) = inner.live(&dom)?;
    let st = libvirt_state(&dom)?;
    let snap = if matches!(st, ffi::state::SHUTOFF | ffi::state::CRASHED) {
        offline(inner, vm, &uuid, &live, o)?
    } else if o.kind == SnapshotKind::Overlay {
        // A group snapshot: the guest held frozen while the storage unit is snapshotted.
        crate::hold::frozen(inner, &dom, vm, &uuid, &live, o)?
    } else {
        online(inner, &dom, vm, &uuid, &live, st, o)?
    };
    Ok(snap)
}

/// A shut-off domain: its disks are read in place; nothing runs that could change them.
fn offline(
    inner: &Inner,
    vm: VmId,
    uuid: &str,
    live: &DomainXml,
    o: &SnapshotOptions,
) -> Result<VmSnapshot, DriverError> {
    let id = VmSnapshotId::random();
    let reason = match o.since {
        Some(_) => UnknownReason::BitmapMissing,
        None => UnknownReason::NoPreviousCheckpoint,
    };
    let mut disks = Vec::new();
    for d in vm_disks(live) {
        let (path, format) = match &d.backing {
            cairn_api::host::DiskBacking::Image { path, format } => (path.clone(), *format),
            cairn_api::host::DiskBacking::RawDevice { path, .. } => {
                (path.clone(), cairn_types::DiskFormat::Raw)
            }
        };
        let size = image_size(&path, format)?;
        disks.push(DiskSnapshot {
            disk: d,
            size,
            source: DiskSource::File {
                path,
                format: format.as_str().into(),
            },
            changes: Changes::Unknown { reason },
        });
    }
    let flight = Flight {
        id,
        vm,
        uuid: uuid.into(),
        dir: None,
        checkpoint: None,
        since: None,
        created_at_ms: now_ms(),
        frozen: false,
    };
    inner.hand_out(&flight);
    Ok(VmSnapshot {
        id,
        vm,
        kind: SnapshotKind::Fleecing,
        quiesce: Quiesce::None,
        quiesce_window_ms: 0,
        checkpoint: None,
        created_at_ms: flight.created_at_ms,
        disks,
    })
}

/// The virtual size of an image file, from `qemu-img info` (qcow2) or its length (raw).
fn image_size(path: &Path, format: cairn_types::DiskFormat) -> Result<u64, DriverError> {
    if format == cairn_types::DiskFormat::Raw {
        use std::io::Seek;
        // The end of a block device or a file alike.
        let mut f = std::fs::File::open(path).map_err(io_err(path))?;
        return f.seek(std::io::SeekFrom::End(0)).map_err(io_err(path));
    }
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .map_err(io_err(path))?;
    if !out.status.success() {
        return Err(DriverError::Tool {
            program: "qemu-img info".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|source| DriverError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    v["virtual-size"].as_u64().ok_or_else(|| DriverError::Tool {
        program: "qemu-img info".into(),
        stderr: "no virtual-size".into(),
    })
}

/// Whether disk `d` can be read incrementally since Cairn's checkpoint `since`, and if not, why.
/// `since.libvirt` is the libvirt checkpoint to read from: Cairn's own, or the other tool's it
/// was anchored to ([`CheckpointMode::Borrow`]).
fn incremental_since(
    inner: &Inner,
    dom: &Domain,
    uuid: &str,
    since: &Since,
    d: &XmlDisk,
) -> Result<(), UnknownReason> {
    if !d.has_bitmaps() {
        return Err(UnknownReason::BitmapMissing);
    }
    if since.borrowed {
        // Another tool's checkpoint: never redefined by Cairn.
        dom.checkpoint(&since.libvirt)
            .map_err(|_| UnknownReason::BitmapMissing)?;
    } else {
        ensure_checkpoint(inner, dom, uuid, &since.libvirt)?;
    }
    if let Some(sizes) = inner.journal.checkpoint_sizes(uuid, &since.cairn) {
        let now = dom.disk_capacity(&d.target).ok();
        match (sizes.get(&d.target), now) {
            (Some(then), Some(now)) if *then != now => return Err(UnknownReason::DiskResized),
            (None, _) => return Err(UnknownReason::BitmapMissing),
            _ => {}
        }
    }
    Ok(())
}

/// A `since` checkpoint as Cairn names it and as libvirt knows it.
#[derive(Debug, Clone)]
struct Since {
    /// `cairn-<id>`: the journal's key.
    cairn: String,
    /// The libvirt checkpoint whose bitmaps hold the changes.
    libvirt: String,
    borrowed: bool,
}

fn resolve_since(inner: &Inner, uuid: &str, c: CheckpointId) -> Since {
    let cairn = c.bitmap_name();
    match inner.journal.anchor(uuid, &cairn) {
        Some(libvirt) => Since {
            cairn,
            libvirt,
            borrowed: true,
        },
        None => Since {
            libvirt: cairn.clone(),
            cairn,
            borrowed: false,
        },
    }
}

/// The newest checkpoint of the domain (any tool's), by creation time.
fn newest_checkpoint(dom: &Domain) -> Option<String> {
    let list = dom.checkpoints().ok()?;
    list.iter()
        .filter_map(|c| {
            let x = c.xml(ffi::CHECKPOINT_XML_NO_DOMAIN).ok()?;
            Some((xml::creation_time(&x)?, c.name().ok()?))
        })
        .max()
        .map(|(_, name)| name)
}

/// Makes sure libvirt knows checkpoint `name`, redefining it from its kept XML when it lost it.
fn ensure_checkpoint(
    inner: &Inner,
    dom: &Domain,
    uuid: &str,
    name: &str,
) -> Result<(), UnknownReason> {
    match dom.checkpoint(name) {
        Ok(_) => return Ok(()),
        Err(e) if e.code == ffi::ERR_NO_DOMAIN_CHECKPOINT => {}
        Err(e) => {
            tracing::warn!("checkpoint {name} of {uuid}: {e}");
            return Err(UnknownReason::BitmapMissing);
        }
    }
    let Some(saved) = inner.journal.checkpoint_xml(uuid, name) else {
        return Err(UnknownReason::BitmapMissing);
    };
    let flags = ffi::CHECKPOINT_REDEFINE | ffi::CHECKPOINT_REDEFINE_VALIDATE;
    match dom.create_checkpoint(&saved, flags) {
        Ok(_) => {
            tracing::info!("libvirt had lost checkpoint {name} of {uuid}: redefined it");
            Ok(())
        }
        Err(e) => {
            tracing::warn!("checkpoint {name} of {uuid} cannot be redefined: {e}");
            inner.journal.drop_checkpoint(uuid, name);
            Err(UnknownReason::BitmapInconsistent)
        }
    }
}

/// The private directory of one backup job: owned by the user QEMU runs as (it creates the
/// socket there), closed to everyone else.
fn job_dir(inner: &Inner, id: VmSnapshotId, live: &DomainXml) -> Result<PathBuf, DriverError> {
    let dir = inner.scratch_dir.join(format!("{TEMP_PREFIX}-{id}"));
    let socket = dir.join("nbd.sock");
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(DriverError::Failed {
            what: "libvirt backup job".into(),
            reason: format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes: choose a shorter --scratch-dir",
                socket.display()
            ),
        });
    }
    std::fs::create_dir(&dir).map_err(io_err(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
    if let Some((uid, gid)) = live.dac_label {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(io_err(&dir))?;
    }
    Ok(dir)
}

/// Undoes a quiesce; errors are logged (the snapshot stands, the guest must not stay frozen).
enum Undo {
    Nothing,
    Thaw,
    Resume,
}

fn quiesce(dom: &Domain, st: i32, o: &SnapshotOptions) -> (Quiesce, Undo) {
    let cpus_running = matches!(st, ffi::state::RUNNING | ffi::state::BLOCKED);
    let pause = || match cpus_running && dom.suspend().is_ok() {
        true => (Quiesce::Pause, Undo::Resume),
        false => (Quiesce::None, Undo::Nothing),
    };
    match o.quiesce {
        QuiescePolicy::None => (Quiesce::None, Undo::Nothing),
        QuiescePolicy::PauseOnly => pause(),
        QuiescePolicy::Auto if !cpus_running => (Quiesce::None, Undo::Nothing),
        QuiescePolicy::Auto => {
            if freeze_through_agent(dom, o).is_ok() {
                (Quiesce::GuestFreeze, Undo::Thaw)
            } else {
                tracing::info!("guest agent did not freeze the file systems: pausing instead");
                pause()
            }
        }
    }
}

/// Freezes the guest's file systems through its agent: a ping bounded by `agent_timeout`,
/// then the freeze bounded by `freeze_timeout`; libvirt's agent timeout is reset after.
pub(crate) fn freeze_through_agent(
    dom: &Domain,
    o: &SnapshotOptions,
) -> Result<(), crate::ffi::LibvirtError> {
    let secs = |d: Duration| i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX);
    let r = dom
        .set_agent_timeout(secs(o.agent_timeout))
        .and_then(|()| dom.agent_ping())
        .and_then(|()| dom.set_agent_timeout(secs(o.freeze_timeout)))
        .and_then(|()| dom.fs_freeze().map(|_| ()));
    let _ = dom.set_agent_timeout(-1);
    r
}

fn undo(dom: &Domain, u: Undo) {
    let r = match u {
        Undo::Nothing => Ok(()),
        Undo::Thaw => dom.fs_thaw(),
        Undo::Resume => dom.resume(),
    };
    if let Err(e) = r {
        tracing::error!("could not undo the quiesce: {e}");
    }
}

/// A running (or paused) domain: one pull-mode backup job and its checkpoint.
fn online(
    inner: &Inner,
    dom: &Domain,
    vm: VmId,
    uuid: &str,
    live: &DomainXml,
    st: i32,
    o: &SnapshotOptions,
) -> Result<VmSnapshot, DriverError> {
    let id = VmSnapshotId::random();
    let targets: Vec<String> = live.disks.iter().map(|d| d.target.clone()).collect();
    let disks: Vec<&XmlDisk> = live.protectable().filter(|d| d.path().is_some()).collect();
    let since = o.since.map(|c| resolve_since(inner, uuid, c));
    // Per disk: read incrementally, or whole and why.
    let mut plan: Vec<(&XmlDisk, Result<String, UnknownReason>)> = Vec::new();
    for d in &disks {
        let how = match &since {
            None => Err(UnknownReason::NoPreviousCheckpoint),
            Some(s) => incremental_since(inner, dom, uuid, s, d).map(|()| s.libvirt.clone()),
        };
        plan.push((d, how));
    }
    let dirty = since
        .as_ref()
        .and_then(|s| dom.checkpoint(&s.libvirt).ok())
        .and_then(|c| {
            c.xml(ffi::CHECKPOINT_XML_SIZE | ffi::CHECKPOINT_XML_NO_DOMAIN)
                .ok()
        })
        .map(|x| xml::checkpoint_sizes(&x))
        .unwrap_or_default();
    let bitmap_disks: Vec<String> = disks
        .iter()
        .filter(|d| d.has_bitmaps())
        .map(|d| d.target.clone())
        .collect();
    let checkpoint = (!bitmap_disks.is_empty()).then(CheckpointId::random);
    // Borrowing, Cairn's checkpoint is only a name for the newest one another tool made.
    let anchor = match inner.mode {
        CheckpointMode::Own => None,
        CheckpointMode::Borrow => newest_checkpoint(dom),
    };
    let checkpoint = match inner.mode {
        CheckpointMode::Own => checkpoint,
        CheckpointMode::Borrow => checkpoint.filter(|_| anchor.is_some()),
    };
    let created = match inner.mode {
        CheckpointMode::Own => checkpoint,
        CheckpointMode::Borrow => None,
    };
    let dir = job_dir(inner, id, live)?;
    let flight = Flight {
        id,
        vm,
        uuid: uuid.into(),
        dir: Some(dir.clone()),
        checkpoint: checkpoint.map(|c| c.bitmap_name()),
        since: since.as_ref().map(|s| s.cairn.clone()),
        created_at_ms: now_ms(),
        frozen: false,
    };
    inner.journal.record(&flight)?;
    let result = begin(dom, st, o, &dir, &plan, &targets, created, &bitmap_disks);
    let (quiesce, window, plan) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            let _ = inner.journal.forget(&flight);
            return Err(e);
        }
    };
    if let Some(name) = &flight.checkpoint {
        keep_checkpoint(inner, dom, uuid, name, anchor.as_deref(), &bitmap_disks);
    }
    let socket = dir.join("nbd.sock");
    let mut out = Vec::new();
    let vm_disks = vm_disks(live);
    for (d, how) in &plan {
        let Some(disk) = vm_disks.iter().find(|v| v.id == d.target).cloned() else {
            continue;
        };
        let size = dom
            .disk_capacity(&d.target)
            .map_err(failed(format!("size of disk {}", d.target)))?;
        let changes = match how {
            Ok(name) => Changes::Known(KnownChanges {
                bitmaps: vec![name.clone()],
                export_bitmap: Some(export_bitmap(&d.target)),
                meta_context: Some(format!("qemu:dirty-bitmap:{}", export_bitmap(&d.target))),
                dirty_bytes: dirty
                    .iter()
                    .find(|(t, _)| t == &d.target)
                    .map_or(size, |(_, n)| *n),
                granularity: BITMAP_GRANULARITY,
            }),
            Err(reason) => Changes::Unknown { reason: *reason },
        };
        out.push(DiskSnapshot {
            disk,
            size,
            source: DiskSource::Nbd {
                socket: socket.clone(),
                export: d.target.clone(),
            },
            changes,
        });
    }
    inner.hand_out(&flight);
    Ok(VmSnapshot {
        id,
        vm,
        kind: SnapshotKind::Fleecing,
        quiesce,
        quiesce_window_ms: window,
        checkpoint,
        created_at_ms: flight.created_at_ms,
        disks: out,
    })
}

fn export_bitmap(target: &str) -> String {
    format!("{TEMP_PREFIX}-{target}")
}

type Plan<'a> = Vec<(&'a XmlDisk, Result<String, UnknownReason>)>;

/// Quiesces, begins the job, undoes the quiesce. When libvirt refuses the incremental job
/// (a bitmap it lists is gone or inconsistent), begins a full one instead.
#[allow(clippy::too_many_arguments)]
fn begin<'a>(
    dom: &Domain,
    st: i32,
    o: &SnapshotOptions,
    dir: &Path,
    plan: &Plan<'a>,
    targets: &[String],
    checkpoint: Option<CheckpointId>,
    bitmap_disks: &[String],
) -> Result<(Quiesce, u64, Plan<'a>), DriverError> {
    let socket = dir.join("nbd.sock");
    let job = |plan: &Plan<'_>| {
        let disks: Vec<BackupDisk> = plan
            .iter()
            .map(|(d, how)| BackupDisk {
                target: d.target.clone(),
                incremental: how.as_ref().ok().cloned(),
                scratch: dir.join(format!("{}.qcow2", d.target)),
                export_bitmap: export_bitmap(&d.target),
            })
            .collect();
        xml::backup_xml(&socket, &disks, targets)
    };
    let cp_xml = checkpoint.map(|c| xml::checkpoint_xml(&c.bitmap_name(), bitmap_disks, targets));
    let started = Instant::now();
    let (q, u) = quiesce(dom, st, o);
    let mut r = dom.backup_begin(&job(plan), cp_xml.as_deref());
    let mut plan = plan.clone();
    if let Err(e) = &r
        && plan.iter().any(|(_, how)| how.is_ok())
    {
        tracing::warn!(
            "libvirt refused the incremental backup job ({e}): reading every disk whole"
        );
        for (_, how) in plan.iter_mut() {
            if how.is_ok() {
                *how = Err(UnknownReason::BitmapInconsistent);
            }
        }
        r = dom.backup_begin(&job(&plan), cp_xml.as_deref());
    }
    undo(dom, u);
    let window = ms_since(started);
    r.map_err(failed("begin the backup job"))?;
    Ok((q, window, plan))
}

/// Keeps the new checkpoint's XML (or, borrowing, the name of the other tool's checkpoint it
/// stands for) and its disks' sizes, for a later redefine or resize check.
fn keep_checkpoint(
    inner: &Inner,
    dom: &Domain,
    uuid: &str,
    name: &str,
    anchor: Option<&str>,
    disks: &[String],
) {
    let sizes: BTreeMap<String, u64> = disks
        .iter()
        .filter_map(|t| Some((t.clone(), dom.disk_capacity(t).ok()?)))
        .collect();
    let kept = match anchor {
        Some(a) => inner.journal.save_anchor(uuid, name, a, &sizes),
        None => match dom.checkpoint(name).and_then(|c| c.xml(0)) {
            Ok(x) => inner.journal.save_checkpoint(uuid, name, &x, &sizes),
            Err(e) => {
                tracing::warn!("checkpoint {name} of {uuid}: {e}");
                return;
            }
        },
    };
    if let Err(e) = kept {
        tracing::warn!("checkpoint {name} of {uuid} not kept: {e}");
    }
}

/// Ends a snapshot: the backup job, its directory, and Cairn's checkpoints it no longer needs.
pub fn delete(inner: &Inner, snap: &VmSnapshot) -> Result<u64, DriverError> {
    let flight = inner
        .flights
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&snap.id)
        .ok_or(DriverError::UnknownSnapshot(snap.id))?;
    let result = end_flight(inner, &flight);
    if let Err(e) = &result {
        // Keep it, so a retry (or recover) can finish the teardown.
        inner
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(flight.id, flight.clone());
        tracing::warn!("snapshot {}: {e}", flight.id);
    }
    result?;
    Ok(now_ms().saturating_sub(flight.created_at_ms))
}

fn end_flight(inner: &Inner, f: &Flight) -> Result<(), DriverError> {
    if f.frozen {
        let conn = inner.conn()?;
        match conn.domain_by_uuid(&f.uuid) {
            Ok(dom) => crate::hold::thaw(&dom)?,
            Err(e) if e.code == ffi::ERR_NO_DOMAIN => {}
            Err(e) => return Err(failed("look up the domain")(e)),
        }
        return inner.journal.forget(f);
    }
    let Some(dir) = &f.dir else {
        return Ok(());
    };
    let conn = inner.conn()?;
    match conn.domain_by_uuid(&f.uuid) {
        Ok(dom) => {
            end_job(&dom, dir)?;
            prune_checkpoints(inner, &dom, f);
        }
        Err(e) if e.code == ffi::ERR_NO_DOMAIN => {}
        Err(e) => return Err(failed("look up the domain")(e)),
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    inner.journal.forget(f)
}

/// Aborts the domain's backup job if it is the one using `dir`.
fn end_job(dom: &Domain, dir: &Path) -> Result<(), DriverError> {
    match dom.backup_xml() {
        Ok(x) if x.contains(&*dir.to_string_lossy()) => match dom.abort_job() {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.code,
                    ffi::ERR_OPERATION_INVALID | ffi::ERR_NO_DOMAIN_BACKUP
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(failed("end the backup job")(e)),
        },
        // Another tool's job, or none: nothing of ours runs.
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.code,
                ffi::ERR_OPERATION_INVALID | ffi::ERR_NO_DOMAIN_BACKUP
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(failed("read the backup job")(e)),
    }
}

/// Deletes Cairn's checkpoints (and anchors) other than the two a snapshot involved.
fn prune_checkpoints(inner: &Inner, dom: &Domain, f: &Flight) {
    let keep: Vec<&str> = [&f.checkpoint, &f.since]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    inner.journal.prune_anchors(&f.uuid, &keep);
    let Ok(list) = dom.checkpoints() else {
        return;
    };
    for c in list {
        let Ok(name) = c.name() else { continue };
        let ours = name.starts_with(CHECKPOINT_PREFIX);
        let keep = Some(&name) == f.checkpoint.as_ref() || Some(&name) == f.since.as_ref();
        if !ours || keep {
            continue;
        }
        // A running domain whose checkpoint lost its bitmap (an image edited offline) can
        // only drop the checkpoint's metadata; a shut-off domain's wait for the next backup.
        let deleted = c.delete(0).or_else(|e| match dom.is_active() {
            Ok(true) => c
                .delete(ffi::CHECKPOINT_DELETE_METADATA_ONLY)
                .map_err(|_| e),
            _ => Err(e),
        });
        match deleted {
            Ok(()) => inner.journal.drop_checkpoint(&f.uuid, &name),
            Err(e) => tracing::info!("checkpoint {name} of {} kept for now: {e}", f.uuid),
        }
    }
}

/// Per disk, what changed since `checkpoint`.
pub fn changes_since(
    inner: &Inner,
    vm: VmId,
    checkpoint: CheckpointId,
) -> Result<Vec<(String, Changes)>, DriverError> {
    let conn = inner.conn()?;
    let dom = inner.domain(&conn, vm)?;
    let (uuid, live) = inner.live(&dom)?;
    let since = resolve_since(inner, &uuid, checkpoint);
    let sizes = dom
        .checkpoint(&since.libvirt)
        .and_then(|c| c.xml(ffi::CHECKPOINT_XML_SIZE | ffi::CHECKPOINT_XML_NO_DOMAIN))
        .map(|x| xml::checkpoint_sizes(&x))
        .unwrap_or_default();
    let mut out = Vec::new();
    for d in live.protectable().filter(|d| d.path().is_some()) {
        let changes = match incremental_since(inner, &dom, &uuid, &since, d) {
            Ok(()) => Changes::Known(KnownChanges {
                bitmaps: vec![since.libvirt.clone()],
                export_bitmap: None,
                meta_context: None,
                dirty_bytes: sizes
                    .iter()
                    .find(|(t, _)| t == &d.target)
                    .map_or(0, |(_, n)| *n),
                granularity: BITMAP_GRANULARITY,
            }),
            Err(reason) => Changes::Unknown { reason },
        };
        out.push((d.target.clone(), changes));
    }
    Ok(out)
}

/// Ends every backup job a previous agent left, and removes their directories.
pub fn recover(inner: &Inner) -> Result<usize, DriverError> {
    let mut cleared = 0;
    for f in inner.journal.flights()? {
        match end_flight(inner, &f) {
            Ok(()) => cleared += 1,
            Err(e) => tracing::warn!("leftover backup job {}: {e}", f.id),
        }
    }
    Ok(cleared)
}
