//! The jobs this server runs: [`JobKind`] (a job's typed parameters, as the API submits them
//! and the job record keeps them), the flows that run them, registered with the
//! [`engine`](crate::engine) by kind, and how the server releases what a job holds.
//!
//! | kind | flow |
//! |---|---|
//! | `backup` | [`backup::BackupFlow`](crate::backup::BackupFlow) |
//! | `group_backup` | [`group::GroupFlow`](crate::group::GroupFlow) |
//! | `restore` | [`restore::RestoreFlow`](crate::restore::RestoreFlow) |
//! | `index` | [`files::IndexFlow`](crate::files::IndexFlow) |
//! | `prune` | [`schedule::PruneFlow`](crate::schedule::PruneFlow) |

use std::sync::Arc;

use cairn_catalog::{Catalog, Hold, JobRecord};

use crate::engine::{App, Engine, JobSpec};
use crate::{Result, Server, ServerError};

/// What a job does, with its parameters: the API's type, stored as the job's `params`.
pub use cairn_api::server::JobKind;

/// Checks a job's parameters and makes the job to submit.
pub fn spec(kind: JobKind) -> Result<JobSpec> {
    validate(&kind)?;
    Ok(JobSpec {
        kind: kind.name().into(),
        vms: kind.vms(),
        params: kind,
    })
}

/// The error of a flow handed another kind's parameters.
pub(crate) fn not_for(kind: &JobKind, flow: &str) -> ServerError {
    ServerError::Invalid(format!(
        "job parameters: a {} job handed to the {flow} flow",
        kind.name()
    ))
}

/// Refuses a job that cannot run.
fn validate(kind: &JobKind) -> Result<()> {
    match kind {
        JobKind::Backup { vms, .. } | JobKind::GroupBackup { vms, .. } => {
            if vms.is_empty() {
                return Err(ServerError::Invalid("no VM given".into()));
            }
            let mut seen = std::collections::BTreeSet::new();
            for v in vms {
                if !seen.insert(v) {
                    return Err(ServerError::Invalid(format!("VM {v} given twice")));
                }
            }
            Ok(())
        }
        JobKind::Restore(p) => crate::restore::validate(p),
        JobKind::Prune { .. } | JobKind::Index { .. } => Ok(()),
    }
}

/// The engine with every flow of this server registered.
pub(crate) fn engine(catalog: Arc<Catalog>, workers: usize) -> Engine<Server> {
    Engine::new(catalog, workers)
        .register(crate::backup::BackupFlow)
        .register(crate::group::GroupFlow)
        .register(crate::restore::RestoreFlow)
        .register(crate::files::IndexFlow)
        .register(crate::schedule::PruneFlow)
}

/// Accepts a job: validates it, refuses it when a VM is busy, records it queued.
pub fn submit(server: &Server, kind: JobKind) -> Result<JobRecord> {
    server.engine.submit(spec(kind)?)
}

/// Requests a job's cancellation.
pub fn cancel(server: &Server, id: &str) -> Result<JobRecord> {
    server.engine.cancel(id)
}

impl App for Server {
    fn engine(&self) -> &Engine<Self> {
        &self.engine
    }

    fn release(&self, hold: &Hold) -> Result<()> {
        release(self, hold)
    }

    fn active(&self) -> bool {
        self.leader.is_active()
    }

    fn describe(&self, h: &Hold) -> String {
        match h {
            Hold::VmSnapshot { vm, snapshot } => format!("VM snapshot {snapshot} of {vm}"),
            Hold::StorageSnapshot { agent, snapshot } => {
                format!("storage snapshot {snapshot} on {agent}")
            }
            Hold::SavedState { vm, name } => format!("saved state {name} of {vm}"),
            Hold::RestoredDisk {
                vm,
                agent,
                datastore,
                disk,
            } => format!("disk {datastore}/{disk} on {agent} restored for {vm}"),
            Hold::VaultSnapshot { snapshot } => {
                format!("vault snapshot {snapshot} of a pruned backup")
            }
        }
    }
}

/// Releases one held resource. A resource already gone counts as released.
pub fn release(server: &Server, h: &Hold) -> Result<()> {
    let gone = |e: &cairn_http::ClientError| e.kind() == Some(cairn_http::ErrorKind::NotFound);
    match h {
        Hold::VmSnapshot { vm, snapshot } => {
            // The host is wherever the VM is now; "host/snapshot" when recorded with a host.
            let (host, id) = match snapshot.split_once('/') {
                Some((h, i)) => (h.to_string(), i.to_string()),
                None => (
                    server
                        .manager
                        .vm(vm)
                        .map_err(ServerError::call(format!("locate {vm}")))?
                        .host,
                    snapshot.clone(),
                ),
            };
            let id = id
                .parse()
                .map_err(|e| ServerError::Invalid(format!("held VM snapshot {snapshot}: {e}")))?;
            match server.manager.delete_snapshot(&host, id) {
                Err(e) if !gone(&e) => Err(ServerError::call("delete VM snapshot")(e)),
                _ => Ok(()),
            }
        }
        Hold::StorageSnapshot { agent, snapshot } => {
            let c = server.storage_agent(agent)?;
            match c.delete_snapshot(snapshot) {
                Err(e) if !gone(&e) => Err(ServerError::call("delete storage snapshot")(e)),
                _ => Ok(()),
            }
        }
        Hold::SavedState { vm, name } => {
            let (host, name) = name
                .split_once('/')
                .map(|(h, n)| (h.to_string(), n.to_string()))
                .unwrap_or_else(|| (vm.clone(), name.clone()));
            match server.manager.delete_saved_state(&host, &name) {
                Err(e) if !gone(&e) => Err(ServerError::call("delete saved state")(e)),
                _ => Ok(()),
            }
        }
        Hold::RestoredDisk {
            vm,
            agent,
            datastore,
            disk,
        } => {
            // A VM that was defined owns its disks, whatever the job's answer was.
            match server.manager.vm(vm) {
                Ok(_) => return Ok(()),
                Err(e) if gone(&e) => {}
                Err(e) => return Err(ServerError::call(format!("look for VM {vm}"))(e)),
            }
            let req = cairn_api::storage::DiskRef {
                datastore: datastore.clone(),
                disk: disk.clone(),
            };
            match server.storage_agent(agent)?.discard_restored(&req) {
                Err(e) if !gone(&e) => Err(ServerError::call("discard restored disk")(e)),
                _ => Ok(()),
            }
        }
        Hold::VaultSnapshot { snapshot } => {
            // The prune did not get as far as the catalog: the backup stands, and its
            // snapshot with it.
            let named = server
                .catalog
                .backups(None)?
                .iter()
                .flat_map(|b| &b.disks)
                .any(|d| {
                    &d.vault_snapshot == snapshot
                        || d.rdm.as_ref().and_then(|r| r.mapping_snapshot.as_ref())
                            == Some(snapshot)
                });
            if named {
                return Ok(());
            }
            match crate::vault::open(&server.config.vault)?.forget(std::slice::from_ref(snapshot)) {
                Ok(_) | Err(cairn_vault::VaultError::SnapshotNotFound(_)) => Ok(()),
                Err(e) => Err(ServerError::Failed(format!("vault forget {snapshot}: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobKind;

    #[test]
    fn every_kind_has_a_flow_and_its_parameters_read_back() {
        let catalog = std::sync::Arc::new(cairn_catalog::Catalog::open_in_memory().unwrap());
        let engine = super::engine(catalog, 1);
        let kinds = [
            JobKind::Backup {
                vms: vec!["a".into()],
                full: true,
                skip_unprotected: false,
            },
            JobKind::GroupBackup {
                vms: vec!["a".into()],
                full: false,
                skip_unprotected: true,
            },
            JobKind::Index { backup: "b".into() },
            JobKind::Prune {
                vms: vec![],
                dry_run: true,
            },
        ];
        for k in kinds {
            let spec = super::spec(k.clone()).unwrap();
            assert!(engine.runs(&spec.kind), "{}", spec.kind);
            assert_eq!(spec.params, k);
        }
        assert!(engine.runs("restore"));
    }
}
