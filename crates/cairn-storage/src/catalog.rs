//! The agent's record of the snapshots it made on primary storage: one JSON file per
//! snapshot in `STATE/snapshots/ID.json`, written atomically (temporary name, fsync, rename,
//! fsync of the directory). A record is written after the snapshot exists and removed after
//! it is deleted, so a crash leaves at worst a record of a snapshot already gone, which
//! deleting again clears (providers' `delete` is idempotent).

use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};
use cairn_api::storage::UnitSnapshot;

/// Writes `value` as JSON to `path` durably ([`cairn_types::durable::write_atomic`]).
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StorageError::Parse {
        what: "record".into(),
        message: e.to_string(),
    })?;
    cairn_types::durable::write_atomic(path, &bytes).map_err(StorageError::io(path, "write"))
}

/// Snapshot records of one agent.
#[derive(Clone, Debug)]
pub struct SnapshotCatalog {
    dir: PathBuf,
}

fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(StorageError::Invalid(format!("snapshot id {id:?}")));
    }
    Ok(())
}

impl SnapshotCatalog {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("snapshots"),
        }
    }

    pub fn add(&self, s: &UnitSnapshot) -> Result<()> {
        check_id(&s.id)?;
        write_json_atomic(&self.dir.join(format!("{}.json", s.id)), s)
    }

    pub fn get(&self, id: &str) -> Result<UnitSnapshot> {
        check_id(id)?;
        let p = self.dir.join(format!("{id}.json"));
        let b = std::fs::read(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StorageError::NotFound(format!("snapshot {id}"))
            } else {
                StorageError::io(&p, "read")(e)
            }
        })?;
        serde_json::from_slice(&b).map_err(|e| StorageError::Parse {
            what: p.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn remove(&self, id: &str) -> Result<()> {
        check_id(id)?;
        match std::fs::remove_file(self.dir.join(format!("{id}.json"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StorageError::io(&self.dir, "remove")(e))
            }
            _ => Ok(()),
        }
    }

    /// All records, oldest first.
    pub fn list(&self) -> Result<Vec<UnitSnapshot>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(StorageError::io(&self.dir, "list")(e)),
        };
        for e in rd {
            let e = e.map_err(StorageError::io(&self.dir, "list"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                out.push(self.get(id)?);
            }
        }
        out.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(out)
    }
}
