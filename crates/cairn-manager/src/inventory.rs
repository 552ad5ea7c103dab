//! Agents, heartbeats and the inventory map VM → host → disks → datastore → storage unit.
//!
//! Invariants:
//! - An agent is known by `(kind, name)`. Registering again (every heartbeat does) replaces
//!   its address and credentials and refreshes `last_seen`; the registry is written durably
//!   (`STATE/agents.json`) so a restarted manager still knows where its agents are, but an
//!   agent counts as **live** only after a heartbeat to *this* process or within
//!   `stale_after` of the last one it recorded.
//! - A VM is known by its name, fleet-wide. Two hosts reporting the same name is a conflict
//!   reported on lookup, never resolved by guessing.
//! - The inventory is read from the agents on each request (hosts: `/v1/vms`, storage:
//!   `/v1/datastores`); nothing here is a cache that can go stale silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use cairn_http::{Client, ClientError, Trust};
use cairn_hypervisor::VmInfo;
use cairn_storage::{DatastoreInfo, DiskKind};
use serde::{Deserialize, Serialize};

use crate::{ManagerError, Result, now_ms};

/// What an agent is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentKind {
    Host,
    Storage,
}

impl AgentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Storage => "storage",
        }
    }
}

/// An agent's registration (its heartbeat carries the same).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub kind: AgentKind,
    /// Unique per kind: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// `https://HOST:PORT` of the agent's API.
    pub url: String,
    /// SHA-256 of the agent's certificate (hex).
    pub fingerprint: String,
    /// The bearer token of the agent's API (the manager and the server call it).
    pub token: String,
}

/// A registered agent and its liveness.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentRecord {
    #[serde(flatten)]
    pub registration: Registration,
    pub registered_ms: i64,
    pub last_seen_ms: i64,
    /// Filled in answers: `live` or `stale`.
    #[serde(default)]
    pub state: String,
}

/// Where one disk of a VM lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLocation {
    /// The VM's device id (`vda`).
    pub disk: String,
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Set for a raw LUN (raw device mapping).
    pub lun: Option<String>,
    /// The storage agent, datastore and disk id holding it; `None` when no storage agent
    /// serves the path.
    pub storage_agent: Option<String>,
    pub datastore: Option<String>,
    pub datastore_disk: Option<String>,
    /// `image` or `lun`.
    pub kind: Option<String>,
    /// The storage unit (file system) and whether it can reflink.
    pub unit: Option<String>,
    pub unit_reflink: Option<bool>,
}

/// Where a VM runs and what it is made of.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmLocation {
    pub name: String,
    pub host: String,
    /// The host agent's id of the VM.
    pub host_vm_id: String,
    /// `running`, `unresponsive` or `gone`.
    pub state: String,
    /// The VM's configuration (`VmSpec`).
    pub spec: serde_json::Value,
    pub disks: Vec<DiskLocation>,
}

/// The registry and the clients to reach agents.
#[derive(Debug)]
pub struct Inventory {
    file: PathBuf,
    stale_after: Duration,
    agents: Mutex<BTreeMap<(AgentKind, String), AgentRecord>>,
}

impl Inventory {
    /// Opens the registry in `state_dir`.
    pub fn open(state_dir: &Path, stale_after: Duration) -> Result<Self> {
        let file = state_dir.join("agents.json");
        let agents = match std::fs::read(&file) {
            Ok(b) => {
                let list: Vec<AgentRecord> =
                    serde_json::from_slice(&b).map_err(|e| ManagerError::State {
                        path: file.clone(),
                        message: e.to_string(),
                    })?;
                list.into_iter()
                    .map(|a| ((a.registration.kind, a.registration.name.clone()), a))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(ManagerError::State {
                    path: file,
                    message: e.to_string(),
                });
            }
        };
        Ok(Self {
            file,
            stale_after,
            agents: Mutex::new(agents),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(AgentKind, String), AgentRecord>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, agents: &BTreeMap<(AgentKind, String), AgentRecord>) -> Result<()> {
        let list: Vec<&AgentRecord> = agents.values().collect();
        let bytes = serde_json::to_vec_pretty(&list).map_err(|e| ManagerError::State {
            path: self.file.clone(),
            message: e.to_string(),
        })?;
        cairn_types::durable::write_atomic(&self.file, &bytes).map_err(|e| ManagerError::State {
            path: self.file.clone(),
            message: e.to_string(),
        })
    }

    /// Registers an agent or records its heartbeat.
    pub fn heartbeat(&self, r: Registration) -> Result<AgentRecord> {
        if !cairn_types::is_plain_name(&r.name) {
            return Err(ManagerError::Invalid(format!(
                "agent name {:?}: letters, digits, '-', '_', '.'",
                r.name
            )));
        }
        if !r.url.starts_with("https://") {
            return Err(ManagerError::Invalid(format!(
                "agent url {:?}: https://HOST:PORT",
                r.url
            )));
        }
        cairn_http::tls::parse_fingerprint(&r.fingerprint)
            .map_err(|e| ManagerError::Invalid(format!("agent fingerprint: {e}")))?;
        let now = now_ms();
        let mut agents = self.lock();
        let key = (r.kind, r.name.clone());
        let changed = agents.get(&key).map(|a| &a.registration) != Some(&r);
        let rec = agents
            .entry(key)
            .and_modify(|a| {
                a.registration = r.clone();
                a.last_seen_ms = now;
            })
            .or_insert_with(|| AgentRecord {
                registration: r.clone(),
                registered_ms: now,
                last_seen_ms: now,
                state: String::new(),
            })
            .clone();
        // Heartbeats that change nothing are not written to disk.
        if changed {
            self.persist(&agents)?;
        }
        Ok(self.with_state(rec))
    }

    fn with_state(&self, mut a: AgentRecord) -> AgentRecord {
        a.state = if self.is_live(&a) { "live" } else { "stale" }.into();
        a
    }

    fn is_live(&self, a: &AgentRecord) -> bool {
        now_ms() - a.last_seen_ms <= self.stale_after.as_millis() as i64
    }

    /// Forgets an agent.
    pub fn remove(&self, kind: AgentKind, name: &str) -> Result<()> {
        let mut agents = self.lock();
        if agents.remove(&(kind, name.to_string())).is_none() {
            return Err(ManagerError::NotFound(format!(
                "{} agent {name}",
                kind.as_str()
            )));
        }
        self.persist(&agents)
    }

    /// Every agent, with its state.
    pub fn agents(&self) -> Vec<AgentRecord> {
        let list: Vec<AgentRecord> = self.lock().values().cloned().collect();
        list.into_iter().map(|a| self.with_state(a)).collect()
    }

    /// One agent; `Stale` when it stopped heartbeating.
    pub fn agent(&self, kind: AgentKind, name: &str) -> Result<AgentRecord> {
        let a = self
            .lock()
            .get(&(kind, name.to_string()))
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(format!("{} agent {name}", kind.as_str())))?;
        if !self.is_live(&a) {
            return Err(ManagerError::Stale {
                kind: kind.as_str(),
                name: name.into(),
                silent_ms: now_ms() - a.last_seen_ms,
            });
        }
        Ok(self.with_state(a))
    }

    /// A client for a live agent.
    pub fn client(&self, kind: AgentKind, name: &str) -> Result<Client> {
        let a = self.agent(kind, name)?;
        client_for(&a.registration)
    }

    /// The VMs of every live host, with their disks mapped to storage.
    pub fn vms(&self) -> Result<Vec<VmLocation>> {
        let storage = self.datastores();
        let mut out = Vec::new();
        for a in self.agents() {
            if a.registration.kind != AgentKind::Host || a.state != "live" {
                continue;
            }
            match self.host_vms(&a.registration) {
                Ok(vms) => out.extend(
                    vms.into_iter()
                        .map(|v| locate(&a.registration.name, v, &storage)),
                ),
                Err(e) => tracing::warn!("host {}: {e}", a.registration.name),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// One VM by name. Unknown → `NotFound`; on a host that stopped heartbeating → `Stale`;
    /// reported by two hosts → `Conflict`.
    pub fn vm(&self, name: &str) -> Result<VmLocation> {
        let mut found: Vec<VmLocation> =
            self.vms()?.into_iter().filter(|v| v.name == name).collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => {
                // Is it on a stale host? Say so rather than "unknown".
                for a in self.agents() {
                    if a.registration.kind == AgentKind::Host && a.state != "live" {
                        return Err(ManagerError::NotFound(format!(
                            "VM {name} (host {} stopped heartbeating {} s ago; its VMs are unknown)",
                            a.registration.name,
                            (now_ms() - a.last_seen_ms) / 1000
                        )));
                    }
                }
                Err(ManagerError::NotFound(format!("VM {name}")))
            }
            n => Err(ManagerError::Conflict(format!(
                "VM name {name} is reported by {n} hosts: {}",
                found
                    .iter()
                    .map(|v| v.host.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    fn host_vms(&self, r: &Registration) -> Result<Vec<VmInfo>> {
        let c = client_for(r)?;
        c.get_json("/v1/vms").map_err(|e| agent_error(r, e))
    }

    /// Datastores of every live storage agent: (agent, datastore).
    pub fn datastores(&self) -> Vec<(String, DatastoreInfo)> {
        let mut out = Vec::new();
        for a in self.agents() {
            if a.registration.kind != AgentKind::Storage || a.state != "live" {
                continue;
            }
            let r = &a.registration;
            let got: Result<Vec<DatastoreInfo>> = client_for(r)
                .and_then(|c| c.get_json("/v1/datastores").map_err(|e| agent_error(r, e)));
            match got {
                Ok(list) => out.extend(list.into_iter().map(|d| (r.name.clone(), d))),
                Err(e) => tracing::warn!("storage agent {}: {e}", r.name),
            }
        }
        out
    }
}

/// A client for an agent's API, trusting its certificate by fingerprint.
pub fn client_for(r: &Registration) -> Result<Client> {
    Client::new(&r.url, &r.token, &Trust::Fingerprint(r.fingerprint.clone()))
        .map_err(|e| agent_error(r, e))
}

/// Maps an agent's failure to a manager error naming the agent.
pub fn agent_error(r: &Registration, e: ClientError) -> ManagerError {
    ManagerError::Agent {
        kind: r.kind.as_str(),
        name: r.name.clone(),
        source: Box::new(e),
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn locate(host: &str, v: VmInfo, storage: &[(String, DatastoreInfo)]) -> VmLocation {
    let state = serde_json::to_value(&v.state)
        .ok()
        .and_then(|s| s.get("state").and_then(|x| x.as_str()).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let disks = v
        .spec
        .disks
        .iter()
        .map(|d| {
            let path = canonical(&d.path);
            let mut loc = DiskLocation {
                disk: d.id.clone(),
                path: d.path.clone(),
                format: d.format.as_str().into(),
                lun: d.lun.clone(),
                storage_agent: None,
                datastore: None,
                datastore_disk: None,
                kind: None,
                unit: None,
                unit_reflink: None,
            };
            'found: for (agent, ds) in storage {
                for disk in &ds.disks {
                    if canonical(&disk.path) == path {
                        loc.storage_agent = Some(agent.clone());
                        loc.datastore = Some(ds.name.clone());
                        loc.datastore_disk = Some(disk.id.clone());
                        loc.kind = Some(
                            match disk.kind {
                                DiskKind::Image => "image",
                                DiskKind::Lun => "lun",
                            }
                            .into(),
                        );
                        loc.unit = Some(ds.unit.id.clone());
                        loc.unit_reflink = Some(ds.unit.reflink_capable);
                        break 'found;
                    }
                }
            }
            loc
        })
        .collect();
    VmLocation {
        name: v.spec.name.clone(),
        host: host.into(),
        host_vm_id: v.handle.id.to_string(),
        state,
        spec: serde_json::to_value(&v.spec).unwrap_or_default(),
        disks,
    }
}
