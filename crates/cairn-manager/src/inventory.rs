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

use std::sync::Arc;

use cairn_api::host::VmInfo;
use cairn_api::storage::DatastoreInfo;
use cairn_api::{AgentConnector, HostAgentApi, HttpConnector, StorageAgentApi};
use cairn_http::ClientError;

pub use cairn_api::manager::{
    AgentKind, AgentRecord, DiskLocation, Registration, VmLocation, VmRunState,
};

use crate::{ManagerError, Result, now_ms};

/// The registry and the clients to reach agents.
pub struct Inventory {
    file: PathBuf,
    stale_after: Duration,
    agents: Mutex<BTreeMap<(AgentKind, String), AgentRecord>>,
    connector: Arc<dyn AgentConnector>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("file", &self.file)
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
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
            connector: Arc::new(HttpConnector),
        })
    }

    /// Reaches agents through `connector` instead of HTTPS (tests use a fake).
    pub fn with_connector(mut self, connector: Arc<dyn AgentConnector>) -> Self {
        self.connector = connector;
        self
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

    /// A client of a live host agent, and its registration (for error messages).
    pub fn host_agent(&self, name: &str) -> Result<(Arc<dyn HostAgentApi>, Registration)> {
        let a = self.agent(AgentKind::Host, name)?;
        let c = self
            .connector
            .host_agent(&a.registration)
            .map_err(|e| agent_error(&a.registration, e))?;
        Ok((c, a.registration))
    }

    /// Runs `call` on the host agent running `vm`, with the host's id of the VM.
    pub fn on_vm_host<T>(
        &self,
        vm: &str,
        call: impl FnOnce(&dyn HostAgentApi, cairn_api::host::VmId) -> cairn_api::CallResult<T>,
    ) -> Result<T> {
        let loc = self.vm(vm)?;
        let (host, reg) = self.host_agent(&loc.host)?;
        call(&*host, loc.host_vm_id).map_err(|e| agent_error(&reg, e))
    }

    /// The VMs of every live host, with their disks mapped to storage.
    pub fn vms(&self) -> Result<Vec<VmLocation>> {
        let storage = self.datastores();
        let mut out = Vec::new();
        for a in self.agents() {
            if a.registration.kind != AgentKind::Host || !a.is_live() {
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
                    if a.registration.kind == AgentKind::Host && !a.is_live() {
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
        let c = self
            .connector
            .host_agent(r)
            .map_err(|e| agent_error(r, e))?;
        c.vms().map_err(|e| agent_error(r, e))
    }

    /// Datastores of every live storage agent: (agent, datastore).
    pub fn datastores(&self) -> Vec<(String, DatastoreInfo)> {
        let mut out = Vec::new();
        for a in self.agents() {
            if a.registration.kind != AgentKind::Storage || !a.is_live() {
                continue;
            }
            let r = &a.registration;
            let got: Result<Vec<DatastoreInfo>> = self
                .connector
                .storage_agent(r)
                .and_then(|c: Arc<dyn StorageAgentApi>| c.datastores())
                .map_err(|e| agent_error(r, e));
            match got {
                Ok(list) => out.extend(list.into_iter().map(|d| (r.name.clone(), d))),
                Err(e) => tracing::warn!("storage agent {}: {e}", r.name),
            }
        }
        out
    }
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
    let disks = v
        .spec
        .disks
        .iter()
        .map(|d| {
            let path = canonical(&d.path);
            let mut loc = DiskLocation {
                disk: d.id.clone(),
                path: d.path.clone(),
                format: d.format,
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
                        loc.kind = Some(disk.kind);
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
        unprotected: v.unprotected.clone(),
        name: v.spec.name.clone(),
        host: host.into(),
        host_vm_id: v.handle.id,
        state: VmRunState::from(&v.state),
        spec: v.spec.clone(),
        disks,
        origin: v.handle.origin.clone(),
    }
}

#[cfg(test)]
mod tests {
    //! The VM map with the fake agents of `cairn-testing`: no QEMU, no network.

    use std::sync::Arc;

    use cairn_api::host::{DiskSpec, SnapshotKind, SnapshotRequest, VmInfo, VmSpec};
    use cairn_api::storage::DiskKind;
    use cairn_http::ErrorKind;
    use cairn_testing::{FakeAgents, FakeHost, FakeStorage, Fault, datastore, vm_info};
    use cairn_types::DiskFormat;

    use super::*;

    fn vm(name: &str, id: &str, disks: &[(&str, &str)]) -> VmInfo {
        let spec = VmSpec {
            domain_xml: None,
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            machine: "q35".into(),
            disks: disks.iter().map(|(d, p)| DiskSpec::qcow2(d, *p)).collect(),
            nics: vec![],
            boot: Default::default(),
            start_paused: false,
        };
        vm_info(spec, id)
    }

    fn register(inv: &Inventory, kind: AgentKind, name: &str) {
        inv.heartbeat(registration(kind, name)).unwrap();
    }

    fn registration(kind: AgentKind, name: &str) -> Registration {
        Registration {
            kind,
            name: name.into(),
            url: "https://127.0.0.1:1".into(),
            fingerprint: "ab".repeat(32),
            token: "t".into(),
        }
    }

    struct Fakes {
        host: Arc<FakeHost>,
        storage: Arc<FakeStorage>,
        agents: Arc<FakeAgents>,
    }

    /// Hosts `h1`, `h2` (the same fake, running `vms`) and storage agent `s1`.
    fn fakes(vms: Vec<VmInfo>) -> Fakes {
        let host = Arc::new(FakeHost::new(vms));
        let storage = Arc::new(FakeStorage::new(
            "s1",
            vec![datastore(&["vm1.qcow2", "luns/l0"])],
        ));
        let agents = Arc::new(
            FakeAgents::default()
                .host("h1", host.clone())
                .host("h2", host.clone())
                .storage(storage.clone()),
        );
        Fakes {
            host,
            storage,
            agents,
        }
    }

    fn inventory(dir: &Path, f: &Fakes) -> Inventory {
        Inventory::open(dir, Duration::from_secs(60))
            .unwrap()
            .with_connector(f.agents.clone())
    }

    #[test]
    fn vms_are_mapped_to_their_storage() {
        let d = tempfile::tempdir().unwrap();
        let f = fakes(vec![vm(
            "vm1",
            "8000000000000001",
            &[("vda", "/ds/vm1.qcow2"), ("vdb", "/elsewhere/x.qcow2")],
        )]);
        let inv = inventory(d.path(), &f);
        register(&inv, AgentKind::Host, "h1");
        register(&inv, AgentKind::Storage, "s1");
        let loc = inv.vm("vm1").unwrap();
        assert_eq!(loc.host, "h1");
        assert_eq!(loc.host_vm_id.to_string(), "8000000000000001");
        assert_eq!(loc.state, VmRunState::Running);
        let vda = &loc.disks[0];
        assert_eq!(vda.storage_agent.as_deref(), Some("s1"));
        assert_eq!(vda.datastore_disk.as_deref(), Some("vm1.qcow2"));
        assert_eq!(vda.kind, Some(DiskKind::Image));
        assert_eq!(vda.unit_reflink, Some(true));
        assert_eq!(vda.format, DiskFormat::Qcow2);
        // A disk no storage agent serves is located nowhere, not guessed.
        assert_eq!(loc.disks[1].storage_agent, None);
        // The answer keeps the shape the manager always served.
        let v = serde_json::to_value(&loc).unwrap();
        assert_eq!(v["state"], "running");
        assert_eq!(v["disks"][0]["format"], "qcow2");
        assert_eq!(v["disks"][0]["kind"], "image");
        assert_eq!(v["spec"]["name"], "vm1");
    }

    #[test]
    fn unknown_and_duplicate_vms_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let f = fakes(vec![vm("vm1", "8000000000000001", &[])]);
        let inv = inventory(d.path(), &f);
        register(&inv, AgentKind::Host, "h1");
        register(&inv, AgentKind::Host, "h2");
        assert!(matches!(inv.vm("nope"), Err(ManagerError::NotFound(_))));
        // Both fake hosts report vm1.
        let e = inv.vm("vm1").unwrap_err();
        assert!(matches!(e, ManagerError::Conflict(_)), "{e}");
        assert!(e.to_string().contains("h1, h2"), "{e}");
        assert_eq!(e.to_api().kind, ErrorKind::Conflict);
    }

    #[test]
    fn an_unreachable_host_is_skipped_and_named_on_relay() {
        let d = tempfile::tempdir().unwrap();
        let f = fakes(vec![vm("vm1", "8000000000000001", &[])]);
        f.agents.set_down("h1", true);
        let inv = inventory(d.path(), &f);
        register(&inv, AgentKind::Host, "h1");
        // Listing skips the host that does not answer.
        assert!(inv.vms().unwrap().is_empty());
        let e = inv.host_agent("h1").err().expect("a refused connection");
        assert_eq!(e.to_api().kind, ErrorKind::Internal);
        assert!(
            e.to_api().message.contains("host agent h1"),
            "{}",
            e.to_api()
        );
    }

    #[test]
    fn a_storage_agent_down_leaves_the_vm_listed_with_its_disks_unmapped() {
        let d = tempfile::tempdir().unwrap();
        let f = fakes(vec![vm(
            "vm1",
            "8000000000000001",
            &[("vda", "/ds/vm1.qcow2")],
        )]);
        f.storage.script.fail("datastores", Fault::Down);
        let inv = inventory(d.path(), &f);
        register(&inv, AgentKind::Host, "h1");
        register(&inv, AgentKind::Storage, "s1");
        let loc = inv.vm("vm1").unwrap();
        assert_eq!(loc.disks[0].storage_agent, None);
        assert_eq!(loc.disks[0].datastore, None);
    }

    #[test]
    fn a_relay_reaches_the_vms_host_with_its_id_and_names_the_host_on_failure() {
        let d = tempfile::tempdir().unwrap();
        let f = fakes(vec![vm("vm1", "8000000000000007", &[])]);
        let inv = inventory(d.path(), &f);
        register(&inv, AgentKind::Host, "h1");
        let req = SnapshotRequest {
            kind: Some(SnapshotKind::Overlay),
            ..Default::default()
        };
        let snap = inv.on_vm_host("vm1", |h, id| h.snapshot(id, &req)).unwrap();
        assert_eq!(snap.vm.to_string(), "8000000000000007");
        assert_eq!(snap.kind, SnapshotKind::Overlay);
        // The host's own error keeps its kind and names the host.
        f.host.script.fail(
            "snapshot",
            Fault::Api(ErrorKind::Conflict, "a snapshot exists".into()),
        );
        let e = inv
            .on_vm_host("vm1", |h, id| h.snapshot(id, &req))
            .unwrap_err()
            .to_api();
        assert_eq!(e.kind, ErrorKind::Conflict);
        assert!(e.message.contains("host agent h1"), "{e}");
        assert!(e.message.contains("a snapshot exists"), "{e}");
        // A host refusing the manager's token is the manager's fault, not the caller's.
        f.host.script.fail(
            "snapshot",
            Fault::Api(ErrorKind::Unauthorized, "bad token".into()),
        );
        let e = inv
            .on_vm_host("vm1", |h, id| h.snapshot(id, &req))
            .unwrap_err();
        assert_eq!(e.to_api().kind, ErrorKind::Internal);
        // An answer the manager cannot parse is named, not defaulted.
        f.host
            .script
            .fail("snapshot", Fault::UnknownVariant("hibernate".into()));
        let e = inv
            .on_vm_host("vm1", |h, id| h.snapshot(id, &req))
            .unwrap_err();
        assert!(
            cairn_http::chain(&e).contains("unknown variant `hibernate`"),
            "{e}"
        );
        // An unknown VM never reaches a host.
        let before = f.host.script.count("snapshot");
        assert!(matches!(
            inv.on_vm_host("nope", |h, id| h.snapshot(id, &req)),
            Err(ManagerError::NotFound(_))
        ));
        assert_eq!(f.host.script.count("snapshot"), before);
    }

    #[test]
    fn heartbeats_are_checked_before_they_are_recorded() {
        let d = tempfile::tempdir().unwrap();
        let inv = inventory(d.path(), &fakes(vec![]));
        let mut bad_name = registration(AgentKind::Host, "h1");
        bad_name.name = "../h1".into();
        let mut plain = registration(AgentKind::Host, "h1");
        plain.url = "http://127.0.0.1:1".into();
        let mut no_fp = registration(AgentKind::Host, "h1");
        no_fp.fingerprint = "xyz".into();
        for (r, msg) in [
            (bad_name, "agent name"),
            (plain, "https://HOST:PORT"),
            (no_fp, "agent fingerprint"),
        ] {
            let e = inv.heartbeat(r).unwrap_err();
            assert_eq!(e.to_api().kind, ErrorKind::BadRequest, "{e}");
            assert!(e.to_string().contains(msg), "{e}");
        }
        assert!(inv.agents().is_empty());
        assert!(!d.path().join("agents.json").exists());
    }

    #[test]
    fn a_restarted_manager_knows_its_agents_but_counts_them_stale_until_they_beat() {
        let d = tempfile::tempdir().unwrap();
        let f = fakes(vec![vm("vm1", "8000000000000001", &[])]);
        {
            let inv = inventory(d.path(), &f);
            register(&inv, AgentKind::Host, "h1");
        }
        // Restarted, with a window that the last heartbeat is outside of.
        let inv = Inventory::open(d.path(), Duration::ZERO)
            .unwrap()
            .with_connector(f.agents.clone());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(inv.agents().len(), 1);
        assert_eq!(inv.agents()[0].state, "stale");
        let e = inv.agent(AgentKind::Host, "h1").unwrap_err();
        assert!(matches!(e, ManagerError::Stale { .. }), "{e}");
        assert_eq!(e.to_api().kind, ErrorKind::Conflict);
        // Its VMs are unknown, and the answer says why.
        let e = inv.vm("vm1").unwrap_err();
        assert!(
            e.to_string().contains("host h1 stopped heartbeating"),
            "{e}"
        );
        assert_eq!(f.host.script.count("vms"), 0);
    }

    #[test]
    fn a_removed_agent_is_forgotten_durably() {
        let d = tempfile::tempdir().unwrap();
        let f = fakes(vec![]);
        let inv = inventory(d.path(), &f);
        register(&inv, AgentKind::Storage, "s1");
        register(&inv, AgentKind::Host, "h1");
        inv.remove(AgentKind::Storage, "s1").unwrap();
        assert!(matches!(
            inv.remove(AgentKind::Storage, "s1"),
            Err(ManagerError::NotFound(_))
        ));
        let again = inventory(d.path(), &f);
        let names: Vec<_> = again
            .agents()
            .into_iter()
            .map(|a| a.registration.name)
            .collect();
        assert_eq!(names, ["h1"]);
    }

    #[test]
    fn a_registry_that_does_not_parse_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let record = br#"[{"kind": "toaster", "name": "t1", "url": "https://t:1",
            "fingerprint": "ab", "token": "t", "registered_ms": 0, "last_seen_ms": 0}]"#;
        std::fs::write(d.path().join("agents.json"), record).unwrap();
        let e = Inventory::open(d.path(), Duration::from_secs(60)).unwrap_err();
        assert!(matches!(e, ManagerError::State { .. }), "{e}");
        assert!(e.to_string().contains("agents.json"), "{e}");
        assert!(e.to_string().contains("unknown variant `toaster`"), "{e}");
    }
}
