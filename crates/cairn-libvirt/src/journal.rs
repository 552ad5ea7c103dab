//! What the driver keeps on disk (`STATE/libvirt/`):
//!
//! - `flights/<snapshot id>.json`: each backup job in flight, written before libvirt starts it
//!   and removed after it ended, so a restarted agent ends jobs a killed one left
//!   (the driver's `recover`).
//! - `checkpoints/<domain uuid>/<name>.xml`: each checkpoint's XML as libvirt described it
//!   right after creating it, so a checkpoint libvirt lost (a transient domain, lost libvirt
//!   state) can be redefined; `<name>.sizes.json`: each disk's size then, so a resized disk is
//!   never read incrementally.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_hypervisor::driver::DriverError;
use serde::{Deserialize, Serialize};

use crate::driver::io_err;

/// One backup job in flight (or an offline snapshot, which has no job).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Flight {
    pub id: cairn_hypervisor::spec::VmSnapshotId,
    pub vm: cairn_hypervisor::spec::VmId,
    pub uuid: String,
    /// The job's private directory (NBD socket, scratch images); `None` offline.
    pub dir: Option<PathBuf>,
    /// The checkpoint the job created.
    pub checkpoint: Option<String>,
    /// The checkpoint it read the changes since.
    pub since: Option<String>,
    pub created_at_ms: u64,
    /// A group snapshot: the guest's file systems are frozen until the snapshot is deleted.
    #[serde(default)]
    pub frozen: bool,
}

#[derive(Debug)]
pub struct Journal {
    flights: PathBuf,
    checkpoints: PathBuf,
}

fn corrupt(path: &Path) -> impl FnOnce(serde_json::Error) -> DriverError + '_ {
    move |source| DriverError::Corrupt {
        path: path.to_path_buf(),
        source,
    }
}

impl Journal {
    pub fn open(base: &Path) -> Result<Self, DriverError> {
        let j = Self {
            flights: base.join("flights"),
            checkpoints: base.join("checkpoints"),
        };
        for d in [&j.flights, &j.checkpoints] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(j)
    }

    fn flight_path(&self, f: &Flight) -> PathBuf {
        self.flights.join(format!("{}.json", f.id))
    }

    pub fn record(&self, f: &Flight) -> Result<(), DriverError> {
        let path = self.flight_path(f);
        let bytes = serde_json::to_vec_pretty(f).map_err(corrupt(&path))?;
        cairn_types::durable::write_atomic(&path, &bytes).map_err(io_err(&path))
    }

    pub fn forget(&self, f: &Flight) -> Result<(), DriverError> {
        let path = self.flight_path(f);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Every recorded flight; a file that does not parse is reported, not skipped silently.
    pub fn flights(&self) -> Result<Vec<Flight>, DriverError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.flights).map_err(io_err(&self.flights))?;
        for entry in rd {
            let path = entry.map_err(io_err(&self.flights))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            out.push(serde_json::from_slice(&bytes).map_err(corrupt(&path))?);
        }
        Ok(out)
    }

    fn checkpoint_file(&self, uuid: &str, name: &str, ext: &str) -> Option<PathBuf> {
        let plain = |s: &str| cairn_types::is_plain_name(s);
        (plain(uuid) && plain(name))
            .then(|| self.checkpoints.join(uuid).join(format!("{name}.{ext}")))
    }

    /// Keeps a checkpoint's XML and its disks' sizes.
    pub fn save_checkpoint(
        &self,
        uuid: &str,
        name: &str,
        xml: &str,
        sizes: &BTreeMap<String, u64>,
    ) -> Result<(), DriverError> {
        let (Some(x), Some(s)) = (
            self.checkpoint_file(uuid, name, "xml"),
            self.checkpoint_file(uuid, name, "sizes.json"),
        ) else {
            return Ok(());
        };
        if let Some(dir) = x.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let bytes = serde_json::to_vec(sizes).map_err(corrupt(&s))?;
        cairn_types::durable::write_atomic(&s, &bytes).map_err(io_err(&s))?;
        cairn_types::durable::write_atomic(&x, xml.as_bytes()).map_err(io_err(&x))
    }

    /// A kept checkpoint XML, if there is one.
    pub fn checkpoint_xml(&self, uuid: &str, name: &str) -> Option<String> {
        std::fs::read_to_string(self.checkpoint_file(uuid, name, "xml")?).ok()
    }

    /// The disk sizes kept with a checkpoint.
    pub fn checkpoint_sizes(&self, uuid: &str, name: &str) -> Option<BTreeMap<String, u64>> {
        let bytes = std::fs::read(self.checkpoint_file(uuid, name, "sizes.json")?).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records that Cairn's checkpoint `name` stands for another tool's checkpoint `anchor`.
    pub fn save_anchor(
        &self,
        uuid: &str,
        name: &str,
        anchor: &str,
        sizes: &BTreeMap<String, u64>,
    ) -> Result<(), DriverError> {
        let (Some(a), Some(s)) = (
            self.checkpoint_file(uuid, name, "anchor"),
            self.checkpoint_file(uuid, name, "sizes.json"),
        ) else {
            return Ok(());
        };
        if let Some(dir) = a.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let bytes = serde_json::to_vec(sizes).map_err(corrupt(&s))?;
        cairn_types::durable::write_atomic(&s, &bytes).map_err(io_err(&s))?;
        cairn_types::durable::write_atomic(&a, anchor.as_bytes()).map_err(io_err(&a))
    }

    /// The other tool's checkpoint Cairn's checkpoint `name` stands for, if it is borrowed.
    pub fn anchor(&self, uuid: &str, name: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.checkpoint_file(uuid, name, "anchor")?).ok()?;
        Some(text.trim().to_owned()).filter(|t| !t.is_empty())
    }

    /// Drops the anchors of a domain other than `keep`.
    pub fn prune_anchors(&self, uuid: &str, keep: &[&str]) {
        if !cairn_types::is_plain_name(uuid) {
            return;
        }
        let dir = self.checkpoints.join(uuid);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".anchor")
                && !keep.contains(&name)
            {
                self.drop_checkpoint(uuid, name);
            }
        }
    }

    /// Drops a checkpoint's kept files (after it was deleted).
    pub fn drop_checkpoint(&self, uuid: &str, name: &str) {
        for ext in ["xml", "sizes.json", "anchor"] {
            if let Some(p) = self.checkpoint_file(uuid, name, ext) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
