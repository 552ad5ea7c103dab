//! VMs, metadata snapshots, backups and what indexing found on their disks.

use crate::backend::{Row, Value, args};
use crate::{
    BackupDisk, BackupRecord, Catalog, CatalogError, IndexedVolume, MetadataSnapshot, Result,
    VmSummary, from_json, json, named, now_ms,
};

/// Column lists, kept next to the row readers that depend on their order.
const BACKUP_COLS: &str = "id, vm, job_id, kind, group_id, timestamp_id, created_ms, duration_ms, \
    host, checkpoint, snapshot_kind, quiesce, quiesce_window_ms, vm_snapshot_lifetime_ms, \
    bytes_read, bytes_sent, attributes";
const DISK_COLS: &str = "backup_id, disk, vault_snapshot, size, format, storage_agent, datastore, \
    datastore_disk, change_source, changed_bytes, bytes_read, bytes_sent, rdm";
const METADATA_COLS: &str = "timestamp_id, vm, created_ms, config_digest, config_reused, \
    state_file, state_bytes, usage";

fn backup_row(r: &Row) -> Result<BackupRecord> {
    Ok(BackupRecord {
        id: named("backup id", r.text(0)?)?,
        vm: r.text(1)?.into(),
        job_id: named("job id", r.text(2)?)?,
        kind: named("backup kind", r.text(3)?)?,
        group_id: r.opt_text(4)?.map(Into::into),
        timestamp_id: named("timestamp id", r.text(5)?)?,
        created_ms: r.int(6)?,
        duration_ms: r.int(7)?,
        host: r.text(8)?.into(),
        checkpoint: r.opt_text(9)?.map(|c| named("checkpoint", c)).transpose()?,
        snapshot_kind: named("snapshot kind", r.text(10)?)?,
        quiesce: named("quiesce", r.text(11)?)?,
        quiesce_window_ms: r.int(12)?,
        vm_snapshot_lifetime_ms: r.int(13)?,
        bytes_read: r.int(14)?,
        bytes_sent: r.int(15)?,
        attributes: from_json("attributes", r.text(16)?)?,
        disks: Vec::new(),
        metadata: None,
        volumes: None,
    })
}

/// Where a backup row's disk columns start, in a query of backups joined with their disks.
const DISK_AT: usize = 17;

/// The disk whose [`DISK_COLS`] start at column `at`.
fn disk_row(r: &Row, at: usize) -> Result<BackupDisk> {
    Ok(BackupDisk {
        disk: r.text(at + 1)?.into(),
        vault_snapshot: r.text(at + 2)?.into(),
        size: r.int(at + 3)?,
        format: named("disk format", r.text(at + 4)?)?,
        storage_agent: r.text(at + 5)?.into(),
        datastore: r.text(at + 6)?.into(),
        datastore_disk: r.text(at + 7)?.into(),
        change_source: named("change source", r.text(at + 8)?)?,
        changed_bytes: r.int(at + 9)?,
        bytes_read: r.int(at + 10)?,
        bytes_sent: r.int(at + 11)?,
        rdm: r
            .opt_text(at + 12)?
            .map(|s| from_json("rdm", s))
            .transpose()?,
    })
}

fn metadata_row(r: &Row) -> Result<MetadataSnapshot> {
    Ok(MetadataSnapshot {
        timestamp_id: named("timestamp id", r.text(0)?)?,
        vm: r.text(1)?.into(),
        created_ms: r.int(2)?,
        config_digest: r.text(3)?.into(),
        config_reused: r.flag(4)?,
        state_file: r.opt_text(5)?.map(Into::into),
        state_bytes: r.opt_int(6)?,
        usage: from_json("usage", r.text(7)?)?,
    })
}

impl Catalog {
    // ---- VMs and metadata snapshots -------------------------------------------------------

    /// Records a VM name (idempotent).
    pub fn ensure_vm(&self, name: &str) -> Result<()> {
        self.db().execute(
            "INSERT INTO vms (name, created_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            args![name, now_ms()],
        )?;
        Ok(())
    }

    /// VMs with at least one record, with their backup counts and newest backup.
    pub fn vms(&self) -> Result<Vec<VmSummary>> {
        self.db()
            .query(
                "SELECT v.name, COUNT(b.id), MAX(b.created_ms) FROM vms v
                 LEFT JOIN backups b ON b.vm = v.name GROUP BY v.name ORDER BY v.name",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(VmSummary {
                    name: r.text(0)?.into(),
                    backups: r.int(1)?,
                    last_backup_ms: r.opt_int(2)?,
                })
            })
            .collect()
    }

    pub fn insert_metadata(&self, m: &MetadataSnapshot) -> Result<()> {
        self.db().execute(
            &format!(
                "INSERT INTO metadata_snapshots ({METADATA_COLS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ),
            args![
                m.timestamp_id.as_str(),
                &m.vm,
                m.created_ms,
                &m.config_digest,
                m.config_reused,
                m.state_file.as_deref(),
                m.state_bytes,
                json(&m.usage)
            ],
        )?;
        Ok(())
    }

    pub fn metadata(&self, timestamp_id: &str) -> Result<MetadataSnapshot> {
        let row = self
            .db()
            .query_opt(
                &format!("SELECT {METADATA_COLS} FROM metadata_snapshots WHERE timestamp_id = $1"),
                args![timestamp_id],
            )?
            .ok_or_else(|| CatalogError::NotFound(format!("metadata snapshot {timestamp_id}")))?;
        metadata_row(&row)
    }

    /// The configuration digest of the VM's newest metadata snapshot.
    pub fn last_config_digest(&self, vm: &str) -> Result<Option<String>> {
        self.db()
            .query_opt(
                "SELECT config_digest FROM metadata_snapshots WHERE vm = $1
                 ORDER BY created_ms DESC LIMIT 1",
                args![vm],
            )?
            .map(|r| Ok(r.text(0)?.to_string()))
            .transpose()
    }

    /// Metadata snapshots no backup refers to (left by failed jobs or pruned backups).
    pub fn orphan_metadata(&self) -> Result<Vec<MetadataSnapshot>> {
        self.db()
            .query(
                &format!(
                    "SELECT {METADATA_COLS} FROM metadata_snapshots m WHERE NOT EXISTS
                     (SELECT 1 FROM backups b WHERE b.timestamp_id = m.timestamp_id)"
                ),
                &[],
            )?
            .iter()
            .map(metadata_row)
            .collect()
    }

    pub fn delete_metadata(&self, timestamp_id: &str) -> Result<()> {
        self.db().execute(
            "DELETE FROM metadata_snapshots WHERE timestamp_id = $1",
            args![timestamp_id],
        )?;
        Ok(())
    }

    /// Whether any metadata snapshot still uses configuration `digest`.
    pub fn config_in_use(&self, digest: &str) -> Result<bool> {
        Ok(self
            .db()
            .query_opt(
                "SELECT 1 FROM metadata_snapshots WHERE config_digest = $1 LIMIT 1",
                args![digest],
            )?
            .is_some())
    }

    // ---- backups ---------------------------------------------------------------------------

    /// Records a committed backup and its disks, atomically.
    pub fn insert_backup(&self, b: &BackupRecord) -> Result<()> {
        let backup = args![
            b.id.as_str(),
            &b.vm,
            b.job_id.as_str(),
            b.kind.as_str(),
            b.group_id.as_deref(),
            b.timestamp_id.as_str(),
            b.created_ms,
            b.duration_ms,
            &b.host,
            b.checkpoint.map(|c| c.to_string()),
            b.snapshot_kind.as_str(),
            b.quiesce.as_str(),
            b.quiesce_window_ms,
            b.vm_snapshot_lifetime_ms,
            b.bytes_read,
            b.bytes_sent,
            json(&b.attributes)
        ];
        let disks: Vec<Vec<Value>> = b
            .disks
            .iter()
            .map(|d| {
                args![
                    b.id.as_str(),
                    &d.disk,
                    &d.vault_snapshot,
                    d.size,
                    d.format.as_str(),
                    &d.storage_agent,
                    &d.datastore,
                    &d.datastore_disk,
                    d.change_source.as_str(),
                    d.changed_bytes,
                    d.bytes_read,
                    d.bytes_sent,
                    d.rdm.as_ref().map(json)
                ]
                .to_vec()
            })
            .collect();
        self.db().transaction(&mut |tx| {
            tx.execute(
                &format!(
                    "INSERT INTO backups ({BACKUP_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                     $9, $10, $11, $12, $13, $14, $15, $16, $17)"
                ),
                backup,
            )?;
            for d in &disks {
                tx.execute(
                    &format!(
                        "INSERT INTO backup_disks ({DISK_COLS}) VALUES ($1, $2, $3, $4, $5, $6,
                         $7, $8, $9, $10, $11, $12, $13)"
                    ),
                    d,
                )?;
            }
            Ok(())
        })
    }

    /// Backups matching `cond` (on `backups b`), oldest first, with their disks: one query,
    /// so a backup is never read without its disks.
    fn backups_where(&self, cond: &str, args: &[Value]) -> Result<Vec<BackupRecord>> {
        let qualified = |table: &str, cols: &str| {
            cols.split(", ")
                .map(|c| format!("{table}.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rows = self.db().query(
            &format!(
                "SELECT {}, {} FROM backups b LEFT JOIN backup_disks d ON d.backup_id = b.id
                 {cond} ORDER BY b.created_ms, b.id, d.disk",
                qualified("b", BACKUP_COLS),
                qualified("d", DISK_COLS)
            ),
            args,
        )?;
        let mut out: Vec<BackupRecord> = Vec::new();
        for r in &rows {
            let id = r.text(0)?;
            if out.last().is_none_or(|b| b.id.as_str() != id) {
                out.push(backup_row(r)?);
            }
            if r.opt_text(DISK_AT)?.is_some()
                && let Some(b) = out.last_mut()
            {
                b.disks.push(disk_row(r, DISK_AT)?);
            }
        }
        Ok(out)
    }

    /// Backups, oldest first; of one VM when `vm` is given.
    pub fn backups(&self, vm: Option<&str>) -> Result<Vec<BackupRecord>> {
        match vm {
            Some(vm) => self.backups_where("WHERE b.vm = $1", args![vm]),
            None => self.backups_where("", &[]),
        }
    }

    /// A backup by id or unique id prefix (at least 4 digits).
    pub fn backup(&self, spec: &str) -> Result<BackupRecord> {
        if spec.len() < 4 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CatalogError::NotFound(format!("backup {spec:?}")));
        }
        let pattern = format!("{}%", spec.to_ascii_lowercase());
        let mut found = self.backups_where("WHERE b.id LIKE $1", args![pattern])?;
        match found.len() {
            0 => Err(CatalogError::NotFound(format!("backup {spec}"))),
            1 => Ok(found.remove(0)),
            n => Err(CatalogError::Conflict(format!(
                "backup prefix {spec} matches {n} backups"
            ))),
        }
    }

    /// The newest backup of `vm`.
    pub fn latest_backup(&self, vm: &str) -> Result<Option<BackupRecord>> {
        Ok(self.backups(Some(vm))?.pop())
    }

    /// Removes a backup record (its vault snapshots are the caller's to prune).
    pub fn delete_backup(&self, id: &str) -> Result<()> {
        self.db().transaction(&mut |tx| {
            let n = tx.execute("DELETE FROM backups WHERE id = $1", args![id])?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!("backup {id}")));
            }
            tx.execute("DELETE FROM backup_volumes WHERE backup_id = $1", args![id])?;
            Ok(())
        })
    }

    /// Records what indexing found on the disks of backup `id` (replaces an earlier record).
    pub fn set_backup_volumes(&self, id: &str, volumes: &[IndexedVolume]) -> Result<()> {
        self.db().execute(
            "INSERT INTO backup_volumes (backup_id, indexed_ms, volumes) VALUES ($1, $2, $3)
             ON CONFLICT (backup_id) DO UPDATE SET indexed_ms = excluded.indexed_ms,
                volumes = excluded.volumes",
            args![id, now_ms(), json(&volumes)],
        )?;
        Ok(())
    }

    /// What indexing found on the disks of backup `id`; `None` before it was indexed.
    pub fn backup_volumes(&self, id: &str) -> Result<Option<Vec<IndexedVolume>>> {
        self.db()
            .query_opt(
                "SELECT volumes FROM backup_volumes WHERE backup_id = $1",
                args![id],
            )?
            .map(|r| from_json("backup volumes", r.text(0)?))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_columns_follow_the_backup_columns() {
        assert_eq!(super::BACKUP_COLS.split(", ").count(), super::DISK_AT);
    }
}
