//! Adopting running QEMU processes Cairn did not start, through their QMP socket
//! (`cairn host-agent --qmp-socket PATH`).
//!
//! An adopted VM is a registry record with origin `VmOrigin::Adopted` kept in memory only
//! (never written to `STATE/vms/`): it is rediscovered from the configured sockets at every
//! agent start and whenever VMs are listed, so nothing about it outlives the agent but the
//! snapshot journal and checkpoints, which any VM has.
//! Its attributes and disks are read again before every snapshot (its owner may hot-plug or
//! rename disks) and whenever a disk could not be mapped.
//!
//! | what | from |
//! |---|---|
//! | id | FNV-1a of the socket's absolute path: the same across agent restarts |
//! | name | `query-name`, else the socket's file stem |
//! | vcpus / memory / machine | `query-cpus-fast` / `query-memory-size-summary` / `qom-get /machine type` |
//! | disks | `query-block` (device id from the qdev id, else the drive name; root node, file, format, read-only), checked against `query-named-block-nodes`; bus from the device's QOM type |
//! | PID | `SO_PEERCRED` of the QMP connection, with the process's start time |
//!
//! A disk that cannot be mapped (no node or device name, not a qcow2 or raw image on a file,
//! a name with Cairn's reserved prefix [`TEMP_PREFIX`]) is left out of the spec and listed in
//! the record's `unmapped` list: the VM is listed, its snapshots are refused with that reason.
//!
//! **Never stopped**: `stop_vm` refuses an adopted QEMU that runs, and nothing in the driver
//! signals its PID. When it goes away the VM shows as gone.
//!
//! QEMU's monitor serves one client at a time: give Cairn a monitor of its own
//! (`-qmp unix:/run/cairn-qmp/vm1.sock,server=on,wait=off` next to the one a manager uses).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cairn_api::host::VmOrigin;
use serde_json::{Value, json};

use crate::driver::DriverError;
use crate::qemu::QemuDriver;
use crate::qmp::{QmpClient, QmpError};
use crate::spec::{
    BootSpec, DiskBus, DiskFormat, DiskSpec, DiskSpecExt, SpecError, TEMP_PREFIX, VmId, VmSpec,
};
use crate::state::{VmDisk, VmRecord, now_ms};

/// Bound on connecting to a socket to adopt (a listing waits for it).
const ADOPT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// In a directory, `NAME.qga.sock` is the guest-agent socket of the VM behind `NAME.sock`.
const QGA_SUFFIX: &str = ".qga.sock";

/// One `--qmp-socket` argument: `PATH` or `PATH,qga=QGA_PATH`. `PATH` may be a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptSource {
    pub qmp: PathBuf,
    /// The guest agent's socket; without it the snapshot quiesce pauses the vCPUs.
    pub qga: Option<PathBuf>,
}

impl FromStr for AdoptSource {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let (qmp, qga) = match s.rsplit_once(",qga=") {
            Some((q, g)) => (q, Some(g)),
            None => (s, None),
        };
        if qmp.is_empty() || qga.is_some_and(str::is_empty) {
            return Err(SpecError(format!(
                "QMP socket {s:?}: expected PATH or PATH,qga=PATH"
            )));
        }
        Ok(Self {
            qmp: absolute(Path::new(qmp)),
            qga: qga.map(|g| absolute(Path::new(g))),
        })
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// The sockets behind the sources: a directory gives each socket in it (sorted), pairing
/// `NAME.sock` with `NAME.qga.sock` when that exists.
pub(crate) fn expand(sources: &[AdoptSource]) -> Vec<AdoptSource> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    for src in sources {
        if !src.qmp.is_dir() {
            out.push(src.clone());
            continue;
        }
        let mut socks: Vec<PathBuf> = std::fs::read_dir(&src.qmp)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
            .map(|e| e.path())
            .filter(|p| !p.to_string_lossy().ends_with(QGA_SUFFIX))
            .collect();
        socks.sort();
        for qmp in socks {
            let stem = qmp.file_stem().unwrap_or_default().to_string_lossy();
            let qga = qmp.with_file_name(format!("{stem}{QGA_SUFFIX}"));
            out.push(AdoptSource {
                qga: qga.exists().then_some(qga),
                qmp,
            });
        }
    }
    out
}

/// The id of the VM behind `socket`: 64-bit FNV-1a of its path, top bit set (as random ids).
pub fn adopted_id(socket: &Path) -> VmId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in socket.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:016x}", h | 1 << 63)
        .parse()
        .expect("16 lowercase hex digits")
}

/// What QMP tells about a VM, as QEMU answered (parsed leniently by [`map_facts`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct QmpFacts {
    pub name: Value,
    pub cpus: Value,
    pub memory: Value,
    /// `qom-get /machine type`, e.g. `pc-q35-10.0-machine`.
    pub machine: Value,
    pub block: Value,
    pub nodes: Value,
    /// QOM type per device id (`virtio-blk-pci`, `scsi-hd`, ...).
    pub device_types: BTreeMap<String, String>,
}

/// A VM spec read from QMP, the disks as the driver addresses them, and the disks it could not
/// map (with the reason).
#[derive(Debug, Clone)]
pub(crate) struct Mapped {
    pub spec: VmSpec,
    pub disks: Vec<VmDisk>,
    pub unmapped: Vec<String>,
}

/// The device id in a `query-block` `qdev` field: the id itself, or the first component under
/// `/machine/peripheral/` (a virtio device's backend); `None` for an anonymous device.
fn qdev_id(qdev: &str) -> Option<&str> {
    if let Some(rest) = qdev.strip_prefix("/machine/peripheral/") {
        return rest.split('/').next().filter(|s| !s.is_empty());
    }
    (!qdev.is_empty() && !qdev.starts_with('/')).then_some(qdev)
}

fn is_qemu_name(s: &str) -> bool {
    s.len() <= 31
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn bus_of(qom_type: Option<&str>) -> DiskBus {
    match qom_type {
        Some(t) if t.starts_with("scsi-") => DiskBus::VirtioScsi,
        Some(t) if t.starts_with("ide-") => DiskBus::Ide,
        _ => DiskBus::VirtioBlk,
    }
}

/// Builds the spec of an adopted VM from QMP's answers. Never fails: what cannot be mapped is
/// named in [`Mapped::unmapped`].
pub(crate) fn map_facts(f: &QmpFacts, socket: &Path) -> Mapped {
    let stem = socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "qemu".into());
    let name = f.name["name"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .unwrap_or(stem);
    // Names end up in job messages, restore names and paths: plain characters only.
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let vcpus = f.cpus.as_array().map_or(1, |a| a.len().max(1));
    let memory = f.memory["base-memory"].as_u64().unwrap_or(0)
        + f.memory["plugged-memory"].as_u64().unwrap_or(0);
    let machine = f.machine.as_str().map(|t| t.trim_end_matches("-machine"));
    let machine = machine
        .filter(|m| is_qemu_name(m))
        .unwrap_or("q35")
        .to_owned();
    let known_nodes: Vec<&str> = f
        .nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str())
        .collect();

    let mut disks = Vec::new();
    let mut specs = Vec::new();
    let mut unmapped = Vec::new();
    for b in f.block.as_array().into_iter().flatten() {
        // An empty drive (CD-ROM without medium) has nothing to back up.
        let Some(ins) = b.get("inserted").filter(|v| v.is_object()) else {
            continue;
        };
        let device = b["device"].as_str().unwrap_or_default();
        let node = ins["node-name"].as_str().unwrap_or_default();
        let id = qdev_id(b["qdev"].as_str().unwrap_or_default())
            .or((!device.is_empty()).then_some(device))
            .unwrap_or(node);
        let label = if id.is_empty() { "(unnamed)" } else { id };
        let drv = ins["drv"].as_str().unwrap_or_default();
        let file = ins["file"].as_str().unwrap_or_default();
        let problem = if node.is_empty() {
            Some("no block node name".to_owned())
        } else if !is_qemu_name(id) {
            Some(format!("no usable device id (node {node})"))
        } else if node.starts_with(TEMP_PREFIX) || id.starts_with(TEMP_PREFIX) {
            Some(format!(
                "node {node} or device {id} starts with Cairn's reserved prefix {TEMP_PREFIX:?} \
                 (a snapshot may be in flight; otherwise rename it)"
            ))
        } else if !known_nodes.is_empty() && !known_nodes.contains(&node) {
            Some(format!("node {node} is not in query-named-block-nodes"))
        } else if !matches!(drv, "qcow2" | "raw") {
            Some(format!(
                "node {node} is a {drv:?} node; only qcow2 and raw images can be backed up"
            ))
        } else if !file.starts_with('/') {
            Some(format!("image {file:?} is not a local file"))
        } else if specs.iter().any(|s: &DiskSpec| s.id == id) {
            Some("device id used twice".to_owned())
        } else {
            None
        };
        if let Some(p) = problem {
            unmapped.push(format!("disk {label}: {p}"));
            continue;
        }
        let format = if drv == "qcow2" {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        };
        let read_only = ins["ro"].as_bool().unwrap_or(false);
        let mut d = DiskSpec::qcow2(id, file);
        d.format = format;
        d.read_only = read_only;
        d.bus = bus_of(f.device_types.get(id).map(String::as_str));
        d.node_name = Some(node.to_owned());
        disks.push(VmDisk {
            id: id.to_owned(),
            node_name: node.to_owned(),
            backing: d.backing(),
            read_only,
        });
        specs.push(d);
    }
    // The spec keeps QEMU's node names only when a restore can use them all (auto-generated
    // `#block…` names cannot be given back to QEMU); otherwise the defaults `disk<N>`.
    if specs.iter().any(|d| {
        d.node_name
            .as_deref()
            .is_none_or(|n| !is_qemu_name(n) || n.len() > 26)
    }) {
        for d in &mut specs {
            d.node_name = None;
        }
    }
    Mapped {
        spec: VmSpec {
            name,
            vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
            memory_mib: (memory >> 20).max(16),
            machine,
            disks: specs,
            nics: Vec::new(),
            boot: BootSpec::Firmware,
            start_paused: false,
            domain_xml: None,
        },
        disks,
        unmapped,
    }
}

/// Asks QEMU everything [`map_facts`] needs. The optional parts (machine type, device types)
/// are left empty when QEMU does not answer them.
pub(crate) async fn read_facts(q: &QmpClient) -> Result<QmpFacts, QmpError> {
    let qom_type = |path: String| async move {
        q.execute("qom-get", Some(json!({"path": path, "property": "type"})))
            .await
            .ok()
    };
    let mut f = QmpFacts {
        name: q.execute("query-name", None).await?,
        cpus: q.execute("query-cpus-fast", None).await?,
        memory: q.execute("query-memory-size-summary", None).await?,
        machine: qom_type("/machine".into()).await.unwrap_or_default(),
        block: q.execute("query-block", None).await?,
        nodes: q
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .await?,
        device_types: BTreeMap::new(),
    };
    let ids: Vec<String> = f
        .block
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| qdev_id(b["qdev"].as_str().unwrap_or_default()).map(str::to_owned))
        .collect();
    for id in ids {
        if let Some(Value::String(t)) = qom_type(format!("/machine/peripheral/{id}")).await {
            f.device_types.insert(id, t);
        }
    }
    Ok(f)
}

impl QemuDriver {
    /// Adopts the QEMU processes behind the configured sockets: new ones are added, known ones
    /// that still run are kept as they are (re-read only when a disk could not be mapped),
    /// known ones that went away stay listed as gone. Never fails: a socket that does not
    /// answer is logged and skipped.
    pub async fn refresh_adopted(&self) {
        if self.options.adopt.is_empty() {
            return;
        }
        for src in expand(&self.options.adopt) {
            let id = adopted_id(&src.qmp);
            let known = self
                .vms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned();
            if let Some(rec) = &known {
                if rec.origin == VmOrigin::Cairn {
                    tracing::warn!(vm = %id, socket = %src.qmp.display(),
                        "adopted socket's id is one of Cairn's own VMs: skipped");
                    continue;
                }
                if rec.unmapped.is_empty() && self.is_alive(rec) {
                    continue;
                }
            }
            // A snapshot in progress changes the block graph: look again next time.
            let lock = self.vm_lock(id);
            let Ok(_held) = lock.try_lock() else { continue };
            match self.adopt_one(id, &src).await {
                Ok(rec) => {
                    if known.as_ref().is_none_or(|k| k.pid != rec.pid) {
                        tracing::info!(vm = %id, name = %rec.spec.name, pid = rec.pid,
                            socket = %src.qmp.display(), disks = rec.disks.len(),
                            unmapped = ?rec.unmapped, "adopted QEMU");
                    }
                }
                Err(e) => tracing::debug!(vm = %id, socket = %src.qmp.display(), error = %e,
                    "QMP socket not adopted"),
            }
        }
    }

    /// Reads an adopted VM's disks and attributes again (before a snapshot).
    pub(crate) async fn remap_adopted(&self, vm: VmId) -> Result<VmRecord, DriverError> {
        let rec = self.record(vm)?;
        if !self.is_alive(&rec) {
            return Err(DriverError::NotRunning(vm));
        }
        let src = AdoptSource {
            qmp: rec.qmp_socket.clone(),
            qga: (!rec.qga_socket.as_os_str().is_empty()).then(|| rec.qga_socket.clone()),
        };
        self.adopt_one(vm, &src).await
    }

    async fn adopt_one(&self, id: VmId, src: &AdoptSource) -> Result<VmRecord, DriverError> {
        let qerr = |source| DriverError::Qmp { vm: id, source };
        // The monitor serves one client: reuse our open connection when there is one.
        let cached = self
            .conns
            .lock()
            .await
            .get(&id)
            .filter(|c| c.closed_reason().is_none())
            .cloned();
        let client = match cached {
            Some(c) => c,
            None => {
                let mut opts = self.options.qmp.clone();
                opts.connect_timeout = opts.connect_timeout.min(ADOPT_CONNECT_TIMEOUT);
                Arc::new(QmpClient::connect(&src.qmp, opts).await.map_err(qerr)?)
            }
        };
        let facts = read_facts(&client).await.map_err(qerr)?;
        let mapped = map_facts(&facts, &src.qmp);
        let pid = client.peer_pid().unwrap_or(0);
        let known = self
            .vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned();
        // Holds the NBD socket of fleecing snapshots; no vm.json: adopted VMs are not recorded.
        let dir = self.state.vm_dir(id);
        std::fs::create_dir_all(&dir).map_err(|source| DriverError::Io {
            path: dir.clone(),
            source,
        })?;
        let rec = VmRecord {
            id,
            spec: mapped.spec,
            pid,
            qmp_socket: src.qmp.clone(),
            qga_socket: src.qga.clone().unwrap_or_default(),
            started_at_ms: known
                .filter(|k| k.pid == pid)
                .map_or_else(now_ms, |k| k.started_at_ms),
            disks: mapped.disks,
            origin: VmOrigin::Adopted {
                qmp_socket: src.qmp.clone(),
            },
            unmapped: mapped.unmapped,
            pid_start: super::pid_start(pid),
        };
        self.conns.lock().await.insert(id, client);
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, rec.clone());
        Ok(rec)
    }
}

#[cfg(test)]
#[path = "adopt_tests.rs"]
mod tests;
