//! The manager's API: agent registrations and heartbeats, and the map VM → host → disks →
//! datastore → storage unit (`docs/MANAGER.md` has the route table). The manager relays
//! snapshot, state, usage and guest calls to a VM's host agent with the host agent's own
//! types ([`crate::host`]).

use std::path::PathBuf;

use cairn_types::DiskFormat;
use serde::{Deserialize, Serialize};

use crate::host::{VmId, VmSpec};
use crate::storage::DiskKind;

/// What an agent is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

impl std::fmt::Display for AgentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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

/// A registered agent and its liveness. (`registration` is flattened, so unknown fields are
/// not refused here; [`Registration`] refuses them on the heartbeat.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    #[serde(flatten)]
    pub registration: Registration,
    pub registered_ms: i64,
    pub last_seen_ms: i64,
    /// Filled in answers: `live` or `stale`.
    #[serde(default)]
    pub state: String,
}

impl AgentRecord {
    /// Whether the manager counted the agent live when it answered.
    pub fn is_live(&self) -> bool {
        self.state == "live"
    }
}

/// Where one disk of a VM lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskLocation {
    /// The VM's device id (`vda`).
    pub disk: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    /// Set for a raw LUN (raw LUN mapping).
    pub lun: Option<String>,
    /// The storage agent, datastore and disk id holding it; `None` when no storage agent
    /// serves the path.
    pub storage_agent: Option<String>,
    pub datastore: Option<String>,
    pub datastore_disk: Option<String>,
    pub kind: Option<DiskKind>,
    /// The storage unit (file system) and whether it can reflink.
    pub unit: Option<String>,
    pub unit_reflink: Option<bool>,
}

/// A VM's run state as the manager reports it (the host agent's [`crate::host::VmState`]
/// without its details).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    Running,
    Unresponsive,
    Gone,
    /// Defined but not running (a shut-off libvirt domain).
    ShutOff,
}

impl VmRunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Unresponsive => "unresponsive",
            Self::Gone => "gone",
            Self::ShutOff => "shut_off",
        }
    }
}

impl std::fmt::Display for VmRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&crate::host::VmState> for VmRunState {
    fn from(s: &crate::host::VmState) -> Self {
        match s {
            crate::host::VmState::Running { .. } => Self::Running,
            crate::host::VmState::Unresponsive { .. } => Self::Unresponsive,
            crate::host::VmState::Gone => Self::Gone,
            crate::host::VmState::ShutOff => Self::ShutOff,
        }
    }
}

/// Where a VM runs and what it is made of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmLocation {
    pub name: String,
    pub host: String,
    /// The host agent's id of the VM.
    pub host_vm_id: VmId,
    pub state: VmRunState,
    /// The VM's configuration.
    pub spec: VmSpec,
    pub disks: Vec<DiskLocation>,
    /// Who started the VM: Cairn, libvirt, or someone else's QEMU adopted over QMP.
    #[serde(default)]
    pub origin: crate::host::VmOrigin,
    /// Disks a backup cannot read, and why (the host's reasons, and disks on no storage
    /// agent's datastore).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unprotected: Vec<crate::host::UnprotectedDisk>,
}

impl VmLocation {
    /// Every disk a backup cannot read, and why: the host's reasons, then each disk on no
    /// storage agent's datastore.
    pub fn unprotected_disks(&self) -> Vec<crate::host::UnprotectedDisk> {
        let mut out = self.unprotected.clone();
        for d in self.disks.iter().filter(|d| d.storage_agent.is_none()) {
            out.push(crate::host::UnprotectedDisk {
                disk: d.disk.clone(),
                reason: format!("{} is on no storage agent's datastore", d.path.display()),
            });
        }
        out
    }
}

/// Answer of `DELETE /v1/agents/{kind}/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovedAgent {
    pub removed: String,
}
