//! VM snapshots: quiesce, the QMP transaction, NBD exports or overlays, teardown and recovery.
//! The lifecycle and its failure cases are described in the crate docs.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::driver::{
    Changes, DiskSnapshot, DiskSource, DriverError, Quiesce, QuiescePolicy, SnapshotKind,
    SnapshotOptions, VmSnapshot,
};
use crate::qemu::QemuDriver;
use crate::qemu::cbt::{self, DiskCbt, GRANULARITY};
use crate::qemu::graph::{Ctx, Scope, sweep, temp_kind, temp_name};
use crate::qga::GuestAgent;
use crate::qmp::QmpClient;
use crate::spec::{CheckpointId, DiskBacking, VmId, VmSnapshotId};
use crate::state::{DiskPlan, JournalEntry, Phase, VmRecord, now_ms, remove_file};
use cairn_api::host::VmOrigin;

/// An undo-able quiesce. [`Quiesced::release`] thaws or resumes; if the future holding it is
/// dropped instead (cancellation), `Drop` does the same from a spawned task.
struct Quiesced {
    vm: VmId,
    mode: Quiesce,
    qga: Option<Arc<GuestAgent>>,
    qmp: Arc<QmpClient>,
    start: Instant,
    released: bool,
}

impl Quiesced {
    fn none(vm: VmId, qmp: Arc<QmpClient>) -> Self {
        Self {
            vm,
            mode: Quiesce::None,
            qga: None,
            qmp,
            start: Instant::now(),
            released: false,
        }
    }

    /// Undoes the quiesce; returns the window in ms.
    async fn release(mut self) -> Result<u64, DriverError> {
        self.released = true;
        let vm = self.vm;
        let res = match self.mode {
            Quiesce::GuestFreeze => {
                let qga = self.qga.as_ref().expect("freeze has an agent");
                // One retry: a thaw lost to a resync must not leave the guest frozen.
                match qga.fsfreeze_thaw().await {
                    Ok(_) => Ok(()),
                    Err(_) => qga.fsfreeze_thaw().await.map(drop),
                }
                .map_err(|source| DriverError::GuestAgent { vm, source })
            }
            Quiesce::Pause => self
                .qmp
                .execute("cont", None)
                .await
                .map(drop)
                .map_err(|source| DriverError::Qmp { vm, source }),
            Quiesce::None => Ok(()),
        };
        let window = self.start.elapsed().as_millis() as u64;
        res.map(|()| window)
    }
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        if self.released || self.mode == Quiesce::None {
            return;
        }
        tracing::error!(vm = %self.vm, mode = ?self.mode, "quiesce dropped unreleased: undoing");
        let (mode, qga, qmp) = (self.mode, self.qga.take(), Arc::clone(&self.qmp));
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                match (mode, qga) {
                    (Quiesce::GuestFreeze, Some(q)) => drop(q.fsfreeze_thaw().await),
                    _ => drop(qmp.execute("cont", None).await),
                }
            });
        }
    }
}

async fn quiesce(
    vm: VmId,
    qga: Arc<GuestAgent>,
    qmp: &Arc<QmpClient>,
    opts: &SnapshotOptions,
) -> Result<Quiesced, DriverError> {
    let qerr = |source| DriverError::Qmp { vm, source };
    if opts.quiesce == QuiescePolicy::None {
        return Ok(Quiesced::none(vm, Arc::clone(qmp)));
    }
    if opts.quiesce == QuiescePolicy::Auto {
        let t = opts.agent_timeout;
        let ping = tokio::time::timeout(t, qga.execute_with_timeout("guest-ping", None, t)).await;
        match ping {
            Ok(Ok(_)) => {
                // From here on the guest may be frozen even if the call fails: release thaws.
                let guard = Quiesced {
                    vm,
                    mode: Quiesce::GuestFreeze,
                    qga: Some(Arc::clone(&qga)),
                    qmp: Arc::clone(qmp),
                    start: Instant::now(),
                    released: false,
                };
                let frozen = qga
                    .execute_with_timeout("guest-fsfreeze-freeze", None, opts.freeze_timeout)
                    .await;
                match frozen.as_ref().map(|v| v.as_u64().unwrap_or(0)) {
                    Ok(n) if n > 0 => return Ok(guard),
                    Ok(_) => {
                        tracing::info!(%vm, "guest froze no file system: pausing instead");
                        guard.release().await?;
                    }
                    Err(e) => {
                        tracing::warn!(%vm, error = %e, "guest freeze failed: pausing instead");
                        guard.release().await?;
                    }
                }
            }
            Ok(Err(e)) => tracing::info!(%vm, error = %e, "no guest agent: pausing instead"),
            Err(_) => tracing::info!(%vm, "guest agent silent: pausing instead"),
        }
    }
    let status = qmp.execute("query-status", None).await.map_err(qerr)?;
    if !status["running"].as_bool().unwrap_or(false) {
        return Ok(Quiesced::none(vm, Arc::clone(qmp)));
    }
    let start = Instant::now();
    qmp.execute("stop", None).await.map_err(qerr)?;
    Ok(Quiesced {
        vm,
        mode: Quiesce::Pause,
        qga: None,
        qmp: Arc::clone(qmp),
        start,
        released: false,
    })
}

async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<(), DriverError> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("qemu-img")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| DriverError::Timeout {
        what: "qemu-img".into(),
        after: Duration::from_secs(60),
    })?
    .map_err(|source| DriverError::Io {
        path: "qemu-img".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(DriverError::Tool {
            program: "qemu-img".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn action(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

impl QemuDriver {
    /// Takes a consistent point-in-time snapshot; see [`crate::HypervisorDriver::snapshot`].
    pub async fn snapshot(
        &self,
        vm: VmId,
        opts: &SnapshotOptions,
    ) -> Result<VmSnapshot, DriverError> {
        let lock = self.vm_lock(vm);
        let _held = lock.lock().await;
        let mut rec = self.record(vm)?;
        if let Some(j) = self.state.load_journal()?.iter().find(|j| j.vm == vm) {
            return Err(DriverError::SnapshotInProgress {
                vm,
                snapshot: j.snapshot,
            });
        }
        if rec.origin != VmOrigin::Cairn {
            // Its owner may have added, removed or renamed disks since we adopted it.
            rec = self.remap_adopted(vm).await?;
        }
        if !rec.unmapped.is_empty() {
            return Err(DriverError::Refused {
                vm,
                reason: format!("cannot snapshot: {}", rec.unmapped.join("; ")),
            });
        }
        let qmp = self.qmp(vm).await?;
        let ctx = Ctx {
            vm,
            qmp: &qmp,
            job_timeout: self.options.job_timeout,
        };
        let id = VmSnapshotId::random();
        let short = id.short();
        let scratch = opts
            .scratch_dir
            .clone()
            .unwrap_or_else(|| self.state.scratch_dir());

        let mut store = self.state.load_checkpoints()?;
        let mut cbts = Vec::new();
        for d in &rec.disks {
            cbts.push(cbt::analyze(&ctx, &mut store, d, opts.since).await?);
        }
        self.state.save_checkpoints(&store)?;
        let checkpoint = cbts.iter().any(|c| c.supported).then(CheckpointId::random);

        let disks = rec
            .disks
            .iter()
            .zip(&cbts)
            .enumerate()
            .map(|(i, (d, c))| {
                let fleece = opts.kind == SnapshotKind::Fleecing;
                let overlay = opts.kind == SnapshotKind::Overlay && !d.read_only;
                let tracked = c.supported && checkpoint.is_some();
                DiskPlan {
                    disk_id: d.id.clone(),
                    node: d.node_name.clone(),
                    path: match &d.backing {
                        DiskBacking::Image { path, .. } | DiskBacking::RawDevice { path, .. } => {
                            path.clone()
                        }
                    },
                    scratch_node: fleece.then(|| temp_name('s', &short, i)),
                    scratch_file: fleece.then(|| scratch.join(format!("{vm}-{short}-{i}.qcow2"))),
                    job: fleece.then(|| temp_name('j', &short, i)),
                    export_id: fleece.then(|| temp_name('e', &short, i)),
                    export_name: fleece.then(|| d.id.clone()),
                    overlay_node: overlay.then(|| temp_name('o', &short, i)),
                    overlay_file: overlay
                        .then(|| scratch.join(format!("{vm}-{short}-{i}.overlay.qcow2"))),
                    new_bitmap: tracked.then(|| checkpoint.expect("tracked").bitmap_name()),
                    copy_bitmap: (fleece && c.changes.is_known())
                        .then(|| temp_name('c', &short, i)),
                    disabled: if tracked { c.recording.clone() } else { vec![] },
                }
            })
            .collect();
        let mut journal = JournalEntry {
            snapshot: id,
            vm,
            kind: opts.kind,
            phase: Phase::Creating,
            checkpoint,
            created_at_ms: now_ms(),
            nbd_started: false,
            disks,
        };
        // Durable before QEMU sees the first object.
        self.state.save_journal(&journal)?;
        match self
            .build(&ctx, &qmp, &rec, &mut journal, cbts, opts, &mut store)
            .await
        {
            Ok(s) => Ok(s),
            Err(e) => {
                tracing::warn!(%vm, snapshot = %id, error = %e, "snapshot failed: cleaning up");
                match self.teardown(Some(&ctx), &journal).await {
                    Ok(()) => self.state.remove_journal(id)?,
                    Err(ce) => tracing::error!(%vm, snapshot = %id, error = %ce,
                        "cleanup of failed snapshot incomplete; recover() will retry"),
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn build(
        &self,
        ctx: &Ctx<'_>,
        qmp: &Arc<QmpClient>,
        rec: &VmRecord,
        journal: &mut JournalEntry,
        cbts: Vec<DiskCbt>,
        opts: &SnapshotOptions,
        store: &mut crate::state::CheckpointStore,
    ) -> Result<VmSnapshot, DriverError> {
        let vm = rec.id;
        // 1. Scratch images and their nodes (fleecing).
        for (p, c) in journal.disks.iter().zip(&cbts) {
            let (Some(node), Some(file)) = (&p.scratch_node, &p.scratch_file) else {
                continue;
            };
            qemu_img(&[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                file.as_os_str(),
                c.size.to_string().as_ref(),
            ])
            .await?;
            ctx.exec(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": node, "backing": p.node,
                       "file": {"driver": "file", "filename": file}}),
            )
            .await?;
        }
        // 2. One transaction for all disks: consistent across disks.
        let mut actions = Vec::new();
        for (p, c) in journal.disks.iter().zip(&cbts) {
            if let Some(new) = &p.new_bitmap {
                actions.push(action(
                    "block-dirty-bitmap-add",
                    json!({"node": p.node, "name": new, "persistent": true,
                           "granularity": GRANULARITY}),
                ));
            }
            if let (Some(copy), Changes::Known(k)) = (&p.copy_bitmap, &c.changes) {
                actions.push(action(
                    "block-dirty-bitmap-add",
                    json!({"node": p.node, "name": copy, "persistent": false,
                           "disabled": true, "granularity": k.granularity}),
                ));
                actions.push(action(
                    "block-dirty-bitmap-merge",
                    json!({"node": p.node, "target": copy, "bitmaps": k.bitmaps}),
                ));
            }
            for old in &p.disabled {
                actions.push(action(
                    "block-dirty-bitmap-disable",
                    json!({"node": p.node, "name": old}),
                ));
            }
            if let (Some(scratch), Some(job)) = (&p.scratch_node, &p.job) {
                actions.push(action(
                    "blockdev-backup",
                    json!({"device": p.node, "target": scratch, "sync": "none", "job-id": job}),
                ));
            }
            if let (Some(node), Some(file)) = (&p.overlay_node, &p.overlay_file) {
                actions.push(action(
                    "blockdev-snapshot-sync",
                    json!({"node-name": p.node, "snapshot-file": file,
                           "snapshot-node-name": node, "format": "qcow2"}),
                ));
            }
        }
        let quiesced = quiesce(vm, self.guest_agent(vm)?, qmp, opts).await?;
        let mode = quiesced.mode;
        let tx = if actions.is_empty() {
            Ok(Value::Null)
        } else {
            ctx.exec("transaction", json!({"actions": actions})).await
        };
        journal.created_at_ms = now_ms();
        let window = quiesced.release().await;
        tx?;
        let window = window?;
        tracing::info!(%vm, ?mode, window_ms = window, "snapshot taken");

        // 3. NBD exports (fleecing).
        let nbd_socket = self.state.vm_dir(vm).join("nbd.sock");
        if opts.kind == SnapshotKind::Fleecing && !journal.disks.is_empty() {
            // A server we did not start (ours is stopped with our last export) would serve on
            // another socket than we report: refuse.
            ctx.exec(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": nbd_socket}}}),
            )
            .await?;
            journal.nbd_started = true;
            self.state.save_journal(journal)?;
            for p in &journal.disks {
                let mut args = json!({"type": "nbd", "id": p.export_id, "node-name": p.scratch_node,
                    "name": p.export_name, "writable": false});
                if let Some(copy) = &p.copy_bitmap {
                    args["bitmaps"] = json!([copy]);
                }
                ctx.exec("block-export-add", args).await?;
            }
        }
        // 4. Describe it; commit the checkpoint.
        let nodes = ctx.nodes().await?;
        let mut disks = Vec::new();
        for ((p, c), d) in journal.disks.iter().zip(cbts).zip(&rec.disks) {
            let mut changes = c.changes;
            if let (Changes::Known(k), Some(copy)) = (&mut changes, &p.copy_bitmap) {
                k.dirty_bytes = nodes
                    .iter()
                    .find(|n| n.name == p.node)
                    .and_then(|n| n.bitmaps.iter().find(|b| &b.name == copy))
                    .map(|b| b.count)
                    .unwrap_or(k.dirty_bytes);
                k.export_bitmap = Some(copy.clone());
                k.meta_context = Some(format!("qemu:dirty-bitmap:{copy}"));
            }
            let source = match (&p.export_name, &d.backing) {
                (Some(export), _) => DiskSource::Nbd {
                    socket: nbd_socket.clone(),
                    export: export.clone(),
                },
                (None, DiskBacking::Image { path, format }) => DiskSource::File {
                    path: path.clone(),
                    format: format.as_str().into(),
                },
                (None, DiskBacking::RawDevice { path, .. }) => DiskSource::File {
                    path: path.clone(),
                    format: rec
                        .spec
                        .disks
                        .iter()
                        .find(|s| s.id == d.id)
                        .map_or("raw".to_owned(), |s| s.format.as_str().to_owned()),
                },
            };
            disks.push(DiskSnapshot {
                disk: d.clone(),
                size: c.size,
                source,
                changes,
            });
        }
        journal.phase = Phase::Active;
        self.state.save_journal(journal)?;
        if let Some(cp) = journal.checkpoint {
            for (p, (d, s)) in journal.disks.iter().zip(rec.disks.iter().zip(&disks)) {
                if p.new_bitmap.is_some() {
                    let max = self.options.max_checkpoints;
                    if let Err(e) = cbt::add_checkpoint(ctx, store, d, cp, s.size, max).await {
                        tracing::warn!(%vm, error = %e, "pruning old checkpoints");
                    }
                }
            }
            self.state.save_checkpoints(store)?;
        }
        Ok(VmSnapshot {
            id: journal.snapshot,
            vm,
            kind: journal.kind,
            quiesce: mode,
            quiesce_window_ms: window,
            checkpoint: journal.checkpoint,
            created_at_ms: journal.created_at_ms,
            disks,
        })
    }

    /// Releases a snapshot; returns its lifetime in ms.
    pub async fn delete_snapshot(&self, snapshot: &VmSnapshot) -> Result<u64, DriverError> {
        let lock = self.vm_lock(snapshot.vm);
        let _held = lock.lock().await;
        let journal = self
            .state
            .load_journal()?
            .into_iter()
            .find(|j| j.snapshot == snapshot.id)
            .ok_or(DriverError::UnknownSnapshot(snapshot.id))?;
        self.clear_entry(&journal).await?;
        Ok(now_ms().saturating_sub(journal.created_at_ms))
    }

    /// Tears one journal entry down (online when the VM runs, offline otherwise) and drops it.
    async fn clear_entry(&self, journal: &JournalEntry) -> Result<(), DriverError> {
        match self.qmp(journal.vm).await {
            Ok(qmp) => {
                let ctx = Ctx {
                    vm: journal.vm,
                    qmp: &qmp,
                    job_timeout: self.options.job_timeout,
                };
                self.teardown(Some(&ctx), journal).await?;
            }
            Err(DriverError::NotRunning(_) | DriverError::UnknownVm(_)) => {
                self.teardown(None, journal).await?;
            }
            Err(e) => return Err(e),
        }
        self.state.remove_journal(journal.snapshot)
    }

    /// Removes every QEMU object and file of a snapshot. With no QMP (VM gone), only files:
    /// overlays are committed offline with `qemu-img commit` so no guest write is lost.
    async fn teardown(&self, ctx: Option<&Ctx<'_>>, j: &JournalEntry) -> Result<(), DriverError> {
        let short = j.snapshot.short();
        if let Some(ctx) = ctx {
            let swept = sweep(ctx, Scope::Snapshot(&short), j.nbd_started).await?;
            tracing::debug!(vm = %j.vm, snapshot = %j.snapshot, ?swept, "swept");
            let nodes = ctx.nodes().await?;
            for p in &j.disks {
                if let Some(o) = &p.overlay_node
                    && nodes.iter().any(|n| &n.name == o)
                {
                    commit_overlay(ctx, o, &p.node).await?;
                }
            }
            if j.phase == Phase::Creating {
                rollback_checkpoint(ctx, j).await?;
            }
        } else {
            for p in &j.disks {
                if let Some(f) = p.overlay_file.as_ref().filter(|f| f.exists()) {
                    qemu_img(&["commit".as_ref(), "-q".as_ref(), f.as_os_str()]).await?;
                }
            }
        }
        for p in &j.disks {
            for f in [&p.scratch_file, &p.overlay_file].into_iter().flatten() {
                remove_file(f)?;
            }
        }
        Ok(())
    }

    /// At agent start: clears every journal entry, then sweeps whatever carries our prefix in
    /// every running VM. Returns the number of journal entries cleared.
    ///
    /// Adopted QEMU processes are found first (their snapshots are cleared online) and read
    /// again at the end (a disk seen mid-snapshot maps once the snapshot is gone). They are
    /// only ever cleaned of our objects, never stopped; one that does not answer is skipped.
    pub async fn recover(&self) -> Result<usize, DriverError> {
        self.refresh_adopted().await;
        let mut cleared = 0;
        for j in self.state.load_journal()? {
            let lock = self.vm_lock(j.vm);
            let _held = lock.lock().await;
            tracing::info!(vm = %j.vm, snapshot = %j.snapshot, phase = ?j.phase,
                "recovering snapshot left in flight");
            self.clear_entry(&j).await?;
            cleared += 1;
        }
        let vms: Vec<VmId> = self
            .vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for vm in vms {
            let lock = self.vm_lock(vm);
            let _held = lock.lock().await;
            let adopted = self.record(vm).is_ok_and(|r| r.origin != VmOrigin::Cairn);
            let qmp = match self.qmp(vm).await {
                Ok(q) => q,
                Err(DriverError::NotRunning(_)) => continue,
                Err(e) if adopted => {
                    tracing::warn!(%vm, error = %e, "adopted QEMU not swept");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let ctx = Ctx {
                vm,
                qmp: &qmp,
                job_timeout: self.options.job_timeout,
            };
            match sweep_all(&ctx).await {
                Ok(()) => {}
                // A QEMU we only adopted must not keep the agent from starting.
                Err(e) if adopted => tracing::warn!(%vm, error = %e, "sweeping adopted QEMU"),
                Err(e) => return Err(e),
            }
        }
        self.refresh_adopted().await;
        Ok(cleared)
    }

    /// Tears down snapshots of one VM (before stopping it).
    pub(crate) async fn recover_vm(&self, vm: VmId) -> Result<(), DriverError> {
        for j in self
            .state
            .load_journal()?
            .into_iter()
            .filter(|j| j.vm == vm)
        {
            let lock = self.vm_lock(vm);
            let _held = lock.lock().await;
            self.clear_entry(&j).await?;
        }
        Ok(())
    }
}

/// Removes every temporary object of ours from one VM; commits overlays nobody remembers into
/// whatever they sit on.
async fn sweep_all(ctx: &Ctx<'_>) -> Result<(), DriverError> {
    sweep(ctx, Scope::All, true).await?;
    let raw = ctx
        .exec("query-named-block-nodes", json!({"flat": true}))
        .await?;
    for n in raw.as_array().into_iter().flatten() {
        let name = n["node-name"].as_str().unwrap_or_default();
        let base = n["image"]["backing-image"].is_object();
        if temp_kind(name) == Some('o')
            && base
            && let Some(base_node) = backing_node(&raw, n)
        {
            commit_overlay(ctx, name, &base_node).await?;
        }
    }
    Ok(())
}

/// The node name below `node` in its backing chain (by file name), when QEMU names one.
fn backing_node(all: &Value, node: &Value) -> Option<String> {
    let file = node["image"]["backing-image"]["filename"].as_str()?;
    all.as_array()?
        .iter()
        .find(|n| {
            n["file"].as_str() == Some(file)
                && temp_kind(n["node-name"].as_str().unwrap_or("cxx-")).is_none()
        })
        .and_then(|n| n["node-name"].as_str().map(str::to_owned))
}

/// Active commit of `overlay` into `base`: `block-commit` → ready → `job-complete` → completed.
async fn commit_overlay(ctx: &Ctx<'_>, overlay: &str, base: &str) -> Result<(), DriverError> {
    let job = overlay.replacen("cxo-", "cxk-", 1);
    if !ctx.jobs().await?.iter().any(|j| j.id == job) {
        ctx.exec(
            "block-commit",
            json!({"job-id": job, "device": overlay, "base-node": base}),
        )
        .await?;
    }
    let deadline = Instant::now() + ctx.job_timeout;
    loop {
        match ctx.jobs().await?.into_iter().find(|j| j.id == job) {
            Some(j) if j.ready => break,
            Some(_) => {}
            None => {
                return Err(DriverError::Failed {
                    what: format!("committing {overlay}"),
                    reason: job_error(ctx, &job).await,
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(DriverError::Timeout {
                what: format!("commit job {job} to become ready"),
                after: ctx.job_timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctx.exec("job-complete", json!({"id": job})).await?;
    let done = ctx
        .qmp
        .wait_event(
            "BLOCK_JOB_COMPLETED",
            |e| e.data["device"] == job.as_str(),
            ctx.job_timeout,
        )
        .await
        .map_err(|source| DriverError::Qmp { vm: ctx.vm, source })?;
    if let Some(err) = done.data["error"].as_str() {
        return Err(DriverError::Failed {
            what: format!("committing {overlay}"),
            reason: err.to_owned(),
        });
    }
    Ok(())
}

async fn job_error(ctx: &Ctx<'_>, job: &str) -> String {
    let ev = ctx
        .qmp
        .wait_event(
            "BLOCK_JOB_COMPLETED",
            |e| e.data["device"] == job,
            Duration::from_millis(500),
        )
        .await;
    match ev {
        Ok(e) => e.data["error"]
            .as_str()
            .unwrap_or("job ended before it was ready")
            .to_owned(),
        Err(_) => "job vanished".to_owned(),
    }
}

/// Undoes the checkpoint part of a transaction whose snapshot never reached the caller: the new
/// bitmap's bits go back into the ones it replaced, those record again, the new one goes.
async fn rollback_checkpoint(ctx: &Ctx<'_>, j: &JournalEntry) -> Result<(), DriverError> {
    for p in &j.disks {
        let Some(new) = &p.new_bitmap else { continue };
        let Some(node) = ctx.node(&p.node).await? else {
            continue;
        };
        let has_new = node.bitmaps.iter().any(|b| &b.name == new);
        for old in &p.disabled {
            let Some(b) = node.bitmaps.iter().find(|b| &b.name == old) else {
                continue;
            };
            if has_new {
                ctx.exec(
                    "block-dirty-bitmap-merge",
                    json!({"node": p.node, "target": old, "bitmaps": [new]}),
                )
                .await?;
            }
            if !b.recording {
                ctx.exec(
                    "block-dirty-bitmap-enable",
                    json!({"node": p.node, "name": old}),
                )
                .await?;
            }
        }
        if has_new {
            ctx.exec(
                "block-dirty-bitmap-remove",
                json!({"node": p.node, "name": new}),
            )
            .await?;
        }
    }
    Ok(())
}
