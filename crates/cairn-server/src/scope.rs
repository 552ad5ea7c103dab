//! Per-VM scopes on the server's REST API.
//!
//! Every VM is an object of its own, `/server/vms/NAME`, below `/server`. A token scoped to
//! `/server` (or `/`) works on every VM as before; a token scoped to one VM, for example
//! `restore:/server/vms/web1` (a tenant who may restore only its own VM), reaches the routes
//! that work on VMs and there:
//!
//! | route | needs, on each VM it touches |
//! |---|---|
//! | `GET /v1/vms`, `/v1/backups`, `/v1/jobs`, `/v1/files/find` | any role; the answer lists only the VMs the token sees |
//! | `GET /v1/backups/{id}`, `/v1/jobs/{id}`, `/v1/files`, `/v1/files/versions` | any role on the backup's or job's VM |
//! | `POST /v1/backups` | `backup` on every VM named |
//! | `POST /v1/restores` | `restore` on the backup's VM; with `over_existing`, on the target VM too |
//! | `GET /v1/files/content`, `POST /v1/files/restore` | `restore` on the backup's VM |
//! | `POST /v1/files/restore-guest` | `restore` on the backup's VM and on the VM written into |
//! | `POST /v1/jobs/{id}/cancel` | `backup` or `restore` on the job's VM |
//!
//! The other routes (prune, schedules, retention rules, stats) need a scope on `/server`.
//! A job a restore started counts as its backup's VM's too, so a tenant can follow it. Jobs
//! without VMs (prune, catalog indexing) need `/server`.

use cairn_api::server::JobRecord;
use cairn_http::access::{Caller, Role};

use crate::jobs::JobKind;
use crate::{Result, Server, ServerError};

/// The object of the VM collection.
pub const VMS: &str = "/server/vms";

/// Reading: any role.
pub const READ: &[Role] = &[Role::Audit, Role::Backup, Role::Restore];

/// The object of one VM.
pub fn vm_object(vm: &str) -> String {
    format!("{VMS}/{vm}")
}

/// May `caller` see `vm`?
pub fn sees(caller: &Caller, vm: &str) -> bool {
    caller.may(READ, &vm_object(vm))
}

/// `Ok` when `caller` has one of `roles` on `vm`, else a `403` naming both.
pub fn check(caller: &Caller, roles: &[Role], vm: &str) -> Result<()> {
    let object = vm_object(vm);
    if caller.may(roles, &object) {
        return Ok(());
    }
    Err(ServerError::Forbidden(
        caller.refuse(roles, &object).message,
    ))
}

/// The VM a backup belongs to.
pub fn backup_vm(s: &Server, backup: &str) -> Result<String> {
    Ok(s.catalog.backup(backup)?.vm)
}

/// `check` on the VM of `backup`.
pub fn check_backup(s: &Server, caller: &Caller, roles: &[Role], backup: &str) -> Result<()> {
    check(caller, roles, &backup_vm(s, backup)?)
}

/// The VMs a job concerns: those it works on, and for a restore the backup's VM.
fn job_vms(s: &Server, j: &JobRecord) -> Vec<String> {
    let mut vms = j.vms.clone();
    if let JobKind::Restore(p) = &j.params
        && let Ok(vm) = backup_vm(s, &p.backup)
    {
        vms.push(vm);
    }
    vms
}

/// May `caller` act with one of `roles` on job `j`? A job without VMs needs `/server`.
pub fn may_job(s: &Server, caller: &Caller, roles: &[Role], j: &JobRecord) -> bool {
    let vms = job_vms(s, j);
    if vms.is_empty() {
        return caller.may(roles, "/server");
    }
    vms.iter().any(|vm| caller.may(roles, &vm_object(vm)))
}

/// `may_job`, as a `403` when not.
pub fn check_job(s: &Server, caller: &Caller, roles: &[Role], j: &JobRecord) -> Result<()> {
    if may_job(s, caller, roles, j) {
        return Ok(());
    }
    Err(ServerError::Forbidden(
        caller.refuse(roles, &format!("job {}", j.id)).message,
    ))
}
