//! Full VM restore as a new VM, its disks restored into primary storage
//! (`docs/ARCHITECTURE.md`, "The flows").
//!
//! The catalog gives the backup's VM attributes and disk snapshots → each storage agent
//! writes its disks from the vault into its datastore as new files (vault → storage agent,
//! never through the server) → the new VM's attributes are the old ones with the new name,
//! the new disk paths and fresh MAC addresses → the host agent starts it (through the
//! manager) → optionally the server waits until the guest agent answers and reports what
//! the guest mounted.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cairn_api::host::VmSpec;
use cairn_api::server::{JobResult, RestoreDone, RestoredDisk};
use cairn_api::storage::{DiskRestoreRequest, RdmRestoreRequest, RestoreMode};
use cairn_catalog::{BackupDisk, Hold};

use crate::engine::Flow;
use crate::{JobCtx, JobKind, Result, Server, ServerError};

pub use cairn_api::server::RestoreParams;

/// Checks a restore request before it becomes a job.
pub(crate) fn validate(p: &RestoreParams) -> Result<()> {
    let n = &p.as_name;
    if !cairn_types::is_plain_name(n) {
        return Err(ServerError::Invalid(format!(
            "VM name {n:?}: letters, digits, '-', '_', '.'"
        )));
    }
    Ok(())
}

fn new_mac() -> String {
    let b: [u8; 3] = rand::random();
    // 52:54:00 is QEMU's locally administered prefix.
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// The `restore` job.
pub struct RestoreFlow;

impl Flow<Server> for RestoreFlow {
    fn kind(&self) -> &'static str {
        "restore"
    }

    fn run(&self, ctx: &JobCtx<'_>, params: &JobKind) -> Result<JobResult> {
        match params {
            JobKind::Restore(p) => run(ctx, p),
            other => Err(crate::jobs::not_for(other, self.kind())),
        }
    }
}

pub fn run(ctx: &JobCtx<'_>, p: &RestoreParams) -> Result<JobResult> {
    if p.over_existing {
        return run_over(ctx, p);
    }
    let started = Instant::now();
    let b = ctx.app.catalog.backup(&p.backup)?;
    check_name_free(ctx, &p.as_name)?;
    let host = p.host.clone().unwrap_or_else(|| b.host.clone());
    let mut spec: VmSpec = b.attributes.clone();
    let mut disks_out = Vec::new();
    for d in &b.disks {
        ctx.check_cancel()?;
        let path = restore_disk(ctx, p, d)?;
        for sd in spec.disks.iter_mut().filter(|sd| sd.id == d.disk) {
            sd.path = path.clone();
        }
        disks_out.push(RestoredDisk {
            disk: d.disk.clone(),
            path,
            snapshot: d.vault_snapshot.clone(),
        });
    }
    spec.name = p.as_name.clone();
    for n in &mut spec.nics {
        n.mac = new_mac();
    }
    let mut result = RestoreDone {
        vm: p.as_name.clone(),
        from_backup: b.id.clone(),
        host: host.clone(),
        disks: disks_out,
        attributes: spec.clone(),
        started: false,
        host_vm_id: None,
        guest: None,
        boot_ms: None,
        duration_ms: 0,
    };
    if p.start {
        ctx.check_cancel()?;
        start_vm(ctx, p, &host, &spec, &mut result)?;
    }
    result.duration_ms = started.elapsed().as_millis() as u64;
    // The restore stands: its disks are the new VM's (or the operator's, unstarted).
    for h in ctx.holds() {
        if matches!(h, Hold::RestoredDisk { .. }) {
            ctx.unhold(&h);
        }
    }
    Ok(JobResult::Restore(Box::new(result)))
}

/// Restores a backup over the disks of the shut-off VM `p.as_name`, in place: each disk of
/// the backup onto the VM's disk with the same id, writing only the regions that differ.
fn run_over(ctx: &JobCtx<'_>, p: &RestoreParams) -> Result<JobResult> {
    let started = Instant::now();
    let s = ctx.app;
    let b = s.catalog.backup(&p.backup)?;
    let vm = &p.as_name;
    let loc = s
        .manager
        .vm(vm)
        .map_err(ServerError::call(format!("locate VM {vm}")))?;
    if loc.state != cairn_api::manager::VmRunState::ShutOff {
        return Err(ServerError::Conflict(format!(
            "VM {vm} is {}: a restore over its disks needs it shut off",
            loc.state
        )));
    }
    // Check every disk before writing any.
    let mut plan = Vec::new();
    for d in &b.disks {
        let target = loc.disks.iter().find(|x| x.disk == d.disk).ok_or_else(|| {
            ServerError::Invalid(format!("VM {vm} has no disk {} to restore over", d.disk))
        })?;
        let (Some(agent), Some(datastore), Some(disk)) = (
            &target.storage_agent,
            &target.datastore,
            &target.datastore_disk,
        ) else {
            return Err(ServerError::Invalid(format!(
                "disk {} of VM {vm} ({}) is on no storage agent's datastore",
                d.disk,
                target.path.display()
            )));
        };
        if d.rdm.is_some() || target.format != d.format {
            return Err(ServerError::Invalid(format!(
                "disk {} of VM {vm} is {} and the backup's is {}{}: restore as a new VM instead",
                d.disk,
                target.format,
                d.format,
                if d.rdm.is_some() { " (a raw LUN)" } else { "" }
            )));
        }
        plan.push((d, agent, datastore, disk, target.path.clone()));
    }
    let mut disks_out = Vec::new();
    for (d, agent, datastore, disk, path) in plan {
        ctx.check_cancel()?;
        let t = Instant::now();
        let r = s
            .storage_agent(agent)?
            .restore(&DiskRestoreRequest {
                vault: s.config.vault.clone(),
                snapshot: d.vault_snapshot.clone(),
                datastore: datastore.clone(),
                disk: disk.clone(),
                format: d.format,
                mode: RestoreMode::Over,
            })
            .map_err(ServerError::call(format!("restore over disk {}", d.disk)))?;
        ctx.info(format!(
            "{vm}/{}: restored over {} ({} B written, {} ms)",
            d.disk,
            path.display(),
            r.bytes_written,
            t.elapsed().as_millis()
        ));
        disks_out.push(RestoredDisk {
            disk: d.disk.clone(),
            path,
            snapshot: d.vault_snapshot.clone(),
        });
    }
    Ok(JobResult::Restore(Box::new(RestoreDone {
        vm: vm.clone(),
        from_backup: b.id.clone(),
        host: loc.host.clone(),
        disks: disks_out,
        attributes: loc.spec.clone(),
        started: false,
        host_vm_id: Some(loc.host_vm_id),
        guest: None,
        boot_ms: None,
        duration_ms: started.elapsed().as_millis() as u64,
    })))
}

/// Refuses a new name a VM already has.
fn check_name_free(ctx: &JobCtx<'_>, name: &str) -> Result<()> {
    match ctx.app.manager.vm(name) {
        Ok(_) => Err(ServerError::Conflict(format!(
            "a VM named {name} already exists"
        ))),
        Err(e) if e.kind() == Some(cairn_http::ErrorKind::NotFound) => Ok(()),
        Err(e) => Err(ServerError::call("check the new VM name")(e)),
    }
}

/// Writes disk `d` of backup `b` from the vault as a new file (or LUN) in its datastore;
/// returns where the datastore keeps it.
fn restore_disk(ctx: &JobCtx<'_>, p: &RestoreParams, d: &BackupDisk) -> Result<PathBuf> {
    let s = ctx.app;
    let c = s.storage_agent(&d.storage_agent)?;
    let t = Instant::now();
    let (new_id, rep) = if let Some(rdm) = &d.rdm {
        let id = format!("luns/{}-{}", p.as_name, d.disk);
        let r = c
            .restore_rdm(&RdmRestoreRequest {
                vault: s.config.vault.clone(),
                snapshot: d.vault_snapshot.clone(),
                datastore: d.datastore.clone(),
                disk: id.clone(),
            })
            .map_err(ServerError::call(format!("restore RDM disk {}", d.disk)))?;
        ctx.info(format!(
            "{}: RDM mapping {} recreated",
            d.disk,
            rdm.mapping_snapshot.as_deref().unwrap_or("(unnamed)")
        ));
        (id, r.report)
    } else {
        let format = d.format;
        let id = format!("{}-{}.{format}", p.as_name, d.disk);
        // Held until the job ends: a failed restore takes its disks away again.
        ctx.hold(Hold::RestoredDisk {
            vm: p.as_name.clone(),
            agent: d.storage_agent.clone(),
            datastore: d.datastore.clone(),
            disk: id.clone(),
        })?;
        let r = c
            .restore(&DiskRestoreRequest {
                vault: s.config.vault.clone(),
                snapshot: d.vault_snapshot.clone(),
                datastore: d.datastore.clone(),
                disk: id.clone(),
                format,
                mode: RestoreMode::New,
            })
            .map_err(ServerError::call(format!("restore disk {}", d.disk)))?;
        (id, r)
    };
    // Where the datastore keeps it, for the VM's configuration.
    let dss = c
        .datastores()
        .map_err(ServerError::call("list datastores"))?;
    let ds_path = dss
        .iter()
        .find(|x| x.name == d.datastore)
        .map(|x| &x.path)
        .ok_or_else(|| ServerError::NotFound(format!("datastore {}", d.datastore)))?;
    let path = ds_path.join(&new_id);
    ctx.info(format!(
        "{}: restored to {} ({} B fetched, {} ms; storage agent {} ms: fetch {} ms and write {} ms \
         summed over its threads, finish {} ms)",
        d.disk,
        path.display(),
        rep.bytes_fetched,
        t.elapsed().as_millis(),
        rep.duration_ms,
        rep.fetch_ms,
        rep.write_ms,
        rep.finish_ms
    ));
    Ok(path)
}

/// Starts the new VM on `host` and, when asked, waits for its guest agent.
fn start_vm(
    ctx: &JobCtx<'_>,
    p: &RestoreParams,
    host: &str,
    spec: &VmSpec,
    result: &mut RestoreDone,
) -> Result<()> {
    let info = ctx
        .app
        .manager
        .provision(host, spec)
        .map_err(ServerError::call(format!(
            "start VM {} on {host}",
            p.as_name
        )))?;
    ctx.info(format!("{}: started on {host}", p.as_name));
    result.started = true;
    result.host_vm_id = Some(info.handle.id);
    if p.wait_boot_s == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(p.wait_boot_s);
    let boot = Instant::now();
    loop {
        ctx.check_cancel()?;
        let g = ctx.app.manager.guest(&p.as_name, 2000).ok();
        if let Some(g) = g.filter(|g| g.agent) {
            ctx.info(format!(
                "{}: guest agent answered after {} ms",
                p.as_name,
                boot.elapsed().as_millis()
            ));
            result.guest = Some(g);
            result.boot_ms = Some(boot.elapsed().as_millis() as u64);
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ServerError::Failed(format!(
                "{}: the guest agent did not answer within {} s",
                p.as_name, p.wait_boot_s
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
