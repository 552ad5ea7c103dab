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
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{App, Engine, JobSpec};
use crate::{Result, Server, ServerError};

/// What a job does, with its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum JobKind {
    /// One backup per VM (full, or incremental when a previous backup exists).
    Backup {
        vms: Vec<String>,
        #[serde(default)]
        full: bool,
    },
    /// One targeted group snapshot of all VMs, then a backup of each.
    GroupBackup {
        vms: Vec<String>,
        #[serde(default)]
        full: bool,
    },
    /// A backup restored as a new VM.
    Restore(crate::restore::RestoreParams),
    /// Parses a recorded backup's disks into the file catalog.
    Index { backup: String },
    /// Applies the retention policy of the VMs (all VMs when empty).
    Prune {
        #[serde(default)]
        vms: Vec<String>,
        #[serde(default)]
        dry_run: bool,
    },
}

impl JobKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Backup { .. } => "backup",
            Self::GroupBackup { .. } => "group_backup",
            Self::Restore(_) => "restore",
            Self::Prune { .. } => "prune",
            Self::Index { .. } => "index",
        }
    }

    /// VMs the job works on (exclusive while it is unfinished).
    pub fn vms(&self) -> Vec<String> {
        match self {
            Self::Backup { vms, .. } | Self::GroupBackup { vms, .. } => vms.clone(),
            Self::Restore(p) => vec![p.as_name.clone()],
            Self::Prune { .. } | Self::Index { .. } => Vec::new(),
        }
    }

    /// Checks the parameters and makes the job to submit.
    pub fn spec(&self) -> Result<JobSpec> {
        self.validate()?;
        Ok(JobSpec {
            kind: self.name().into(),
            params: serde_json::to_value(self)
                .map_err(|e| ServerError::Invalid(format!("job parameters: {e}")))?,
            vms: self.vms(),
        })
    }

    /// The parameters a job record keeps, read back.
    pub fn from_params(params: &Value) -> Result<Self> {
        serde_json::from_value(params.clone())
            .map_err(|e| ServerError::Invalid(format!("job parameters: {e}")))
    }

    /// The error of a flow handed another kind's parameters.
    pub(crate) fn not_for(&self, flow: &str) -> ServerError {
        ServerError::Invalid(format!(
            "job parameters: a {} job handed to the {flow} flow",
            self.name()
        ))
    }

    fn validate(&self) -> Result<()> {
        match self {
            Self::Backup { vms, .. } | Self::GroupBackup { vms, .. } => {
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
            Self::Restore(p) => crate::restore::validate(p),
            Self::Prune { .. } | Self::Index { .. } => Ok(()),
        }
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
    server.engine.submit(kind.spec()?)
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
                        || d.rdm.as_ref().and_then(|r| r.get("mapping_snapshot"))
                            == Some(&serde_json::Value::from(snapshot.as_str()))
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
            },
            JobKind::GroupBackup {
                vms: vec!["a".into()],
                full: false,
            },
            JobKind::Index { backup: "b".into() },
            JobKind::Prune {
                vms: vec![],
                dry_run: true,
            },
        ];
        for k in kinds {
            let spec = k.spec().unwrap();
            assert!(engine.runs(&spec.kind), "{}", spec.kind);
            assert_eq!(JobKind::from_params(&spec.params).unwrap(), k);
        }
        assert!(engine.runs("restore"));
    }
}
