//! The metadata store of paired metadata snapshots: each backup point's configuration, execution state and
//! host resource usage, kept apart from the vault (its own directory), found by the same
//! timestamp id as the backup (the storage snapshot).
//!
//! ```text
//! METADATA/
//!   configs/<blake3>.json              one file per distinct configuration (shared)
//!   snapshots/<vm>/<timestamp_id>.json  {timestamp_id, vm, created_ms, config_digest, usage, state_file}
//!   states/<vm>/<timestamp_id>.state    saved execution state (QEMU migration stream)
//! ```
//!
//! Every file is written durably (temp, fsync, rename, fsync dir) before the catalog row
//! that names it; a configuration identical to one already stored is not written again
//! (`config_reused`).

use std::io::Read;
use std::path::{Path, PathBuf};

use cairn_api::host::VmSpec;
use cairn_api::server::{TimestampId, UsageSample};
use cairn_catalog::{Catalog, MetadataSnapshot, now_ms};

use crate::{Result, ServerError};

/// The metadata store directory.
#[derive(Debug)]
pub struct MetadataStore {
    dir: PathBuf,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + use<> {
    let path = path.to_path_buf();
    move |source| ServerError::Io { what, path, source }
}

/// A timestamp id: milliseconds since the epoch and 4 random hex digits (sortable, unique).
pub fn timestamp_id() -> TimestampId {
    TimestampId::new(u64::try_from(now_ms()).unwrap_or(0), rand::random())
}

fn safe(name: &str) -> Result<&str> {
    if !cairn_types::is_plain_name(name) {
        return Err(ServerError::Invalid(format!("name {name:?}")));
    }
    Ok(name)
}

impl MetadataStore {
    pub fn open(dir: &Path) -> Result<Self> {
        for sub in ["configs", "snapshots", "states"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores one metadata snapshot and records it in the catalog. `state` streams the
    /// execution state when one was saved.
    pub fn record(
        &self,
        catalog: &Catalog,
        vm: &str,
        timestamp_id: &str,
        config: &VmSpec,
        usage: UsageSample,
        state: Option<&mut dyn Read>,
    ) -> Result<MetadataSnapshot> {
        let vm = safe(vm)?;
        let ts = safe(timestamp_id)?;
        // Through a JSON value (keys sorted), as earlier servers wrote it: an unchanged
        // configuration keeps its digest across upgrades.
        let config_bytes = serde_json::to_value(config)
            .and_then(|v| serde_json::to_vec_pretty(&v))
            .map_err(|e| ServerError::Invalid(format!("configuration: {e}")))?;
        let digest = blake3::hash(&config_bytes).to_hex().to_string();
        let config_path = self.dir.join("configs").join(format!("{digest}.json"));
        let config_reused = catalog.last_config_digest(vm)?.as_deref() == Some(digest.as_str())
            && config_path.exists();
        if !config_path.exists() {
            cairn_types::durable::write_atomic(&config_path, &config_bytes)
                .map_err(io("write", &config_path))?;
        }
        let (state_file, state_bytes) = match state {
            None => (None, None),
            Some(r) => {
                let rel = format!("states/{vm}/{ts}.state");
                let path = self.dir.join(&rel);
                let n = cairn_types::durable::write_atomic_from(&path, r)
                    .map_err(io("write", &path))?;
                (Some(rel), Some(i64::try_from(n).unwrap_or(i64::MAX)))
            }
        };
        let m = MetadataSnapshot {
            timestamp_id: ts
                .parse()
                .map_err(|e| ServerError::Invalid(format!("metadata snapshot: {e}")))?,
            vm: vm.into(),
            created_ms: now_ms(),
            config_digest: digest,
            config_reused,
            state_file,
            state_bytes,
            usage,
        };
        let snap_path = self
            .dir
            .join("snapshots")
            .join(vm)
            .join(format!("{ts}.json"));
        let bytes = serde_json::to_vec_pretty(&m).unwrap_or_default();
        cairn_types::durable::write_atomic(&snap_path, &bytes).map_err(io("write", &snap_path))?;
        catalog.ensure_vm(vm)?;
        catalog.insert_metadata(&m)?;
        Ok(m)
    }

    /// The configuration stored under `digest`.
    pub fn config(&self, digest: &str) -> Result<VmSpec> {
        let p = self
            .dir
            .join("configs")
            .join(format!("{}.json", safe(digest)?));
        let b = std::fs::read(&p).map_err(io("read", &p))?;
        serde_json::from_slice(&b)
            .map_err(|e| ServerError::Invalid(format!("{}: {e}", p.display())))
    }

    /// Removes a metadata snapshot (its files, its row, and its configuration when no other
    /// snapshot uses it).
    pub fn remove(&self, catalog: &Catalog, m: &MetadataSnapshot) -> Result<()> {
        let vm = safe(&m.vm)?;
        let ts = safe(&m.timestamp_id)?;
        catalog.delete_metadata(ts)?;
        let _ = std::fs::remove_file(
            self.dir
                .join("snapshots")
                .join(vm)
                .join(format!("{ts}.json")),
        );
        if let Some(s) = &m.state_file {
            let _ = std::fs::remove_file(self.dir.join(s));
        }
        if !catalog.config_in_use(&m.config_digest)? {
            let _ = std::fs::remove_file(
                self.dir
                    .join("configs")
                    .join(format!("{}.json", safe(&m.config_digest)?)),
            );
        }
        Ok(())
    }
}
