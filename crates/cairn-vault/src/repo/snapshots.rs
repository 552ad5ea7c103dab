//! Snapshot manifests: listing them (a scan reads every one) and finding one by id, id
//! prefix or name (a whole id is read directly).

use cairn_types::SnapshotId;

use super::{Repository, snapshot_key};
use crate::error::{Result, VaultError};
use crate::manifest::{DamagedSnapshot, SnapshotManifest, find_in};

impl Repository {
    /// Every committed snapshot whose manifest is intact, oldest first. Damaged manifests are
    /// skipped with a warning (see [`scan_snapshots`](Self::scan_snapshots)).
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotManifest>> {
        let (good, damaged) = self.scan_snapshots()?;
        for d in &damaged {
            tracing::warn!("skipping damaged snapshot {}: {}", d.id, d.problem);
        }
        Ok(good)
    }

    /// Every manifest: the intact ones (oldest first) and the damaged ones.
    pub fn scan_snapshots(&self) -> Result<(Vec<SnapshotManifest>, Vec<DamagedSnapshot>)> {
        self.scan_snapshots_but(|_| false)
    }

    /// [`scan_snapshots`](Self::scan_snapshots) of the manifests whose ids `skip` does not
    /// name: those are listed but not read (GC's second mark reads only what is new).
    pub fn scan_snapshots_but(
        &self,
        skip: impl Fn(&str) -> bool,
    ) -> Result<(Vec<SnapshotManifest>, Vec<DamagedSnapshot>)> {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for m in self.store.list("snapshots")? {
            let Some(file_id) = m
                .key
                .as_str()
                .strip_prefix("snapshots/")
                .and_then(|k| k.strip_suffix(".json"))
            else {
                continue;
            };
            if skip(file_id) {
                continue;
            }
            let b = match self.store.get(&m.key) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue, // forgotten meanwhile
                Err(e) => return Err(e.into()),
            };
            match SnapshotManifest::parse_stored(file_id, &b) {
                Ok(mut s) => {
                    if let Some(k) = self.keys() {
                        s.open_private(k)
                            .map_err(|e| VaultError::Corrupt(format!("snapshot {file_id}: {e}")))?;
                    }
                    out.push(s)
                }
                Err(problem) => damaged.push(DamagedSnapshot::salvage(file_id, problem, &b)),
            }
        }
        out.sort_by(|a, b| {
            (a.created, a.created_ms, &a.name, a.id).cmp(&(b.created, b.created_ms, &b.name, b.id))
        });
        damaged.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((out, damaged))
    }

    /// Finds a snapshot by id, unique id prefix (at least 6 digits), or name (the newest with
    /// that name). A spec that is both a name and another snapshot's id prefix is ambiguous.
    pub fn find_snapshot(&self, spec: &str) -> Result<SnapshotManifest> {
        // A whole id is read directly: one request, however many snapshots there are (on an
        // object store, the scan is a GET per manifest). Missing or damaged: the scan below
        // decides, as it always did.
        if let Ok(id) = spec.parse::<SnapshotId>()
            && let Some(s) = self.read_snapshot(&id)?
        {
            return Ok(s);
        }
        let all = self.list_snapshots()?;
        find_in(&all, spec)
    }

    /// The manifest of snapshot `id` if it is stored and intact.
    fn read_snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotManifest>> {
        let b = match self.store.get(&snapshot_key(id)) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Ok(mut s) = SnapshotManifest::parse_stored(&id.to_string(), &b) else {
            return Ok(None);
        };
        if let Some(k) = self.keys() {
            s.open_private(k)
                .map_err(|e| VaultError::Corrupt(format!("snapshot {id}: {e}")))?;
        }
        Ok(Some(s))
    }
}
