//! Backup calls: the vault a call names, and each disk's source — an agent snapshot, a disk
//! in place, a host agent's NBD export (whose dirty bitmap becomes the first change hint) or
//! a raw LUN — resolved and backed up. [`crate::service`] only turns `POST /v1/backups` into
//! [`StorageAgent::run_backup_jobs`].

use std::path::PathBuf;

use cairn_api::storage::{BackupJob, ChangeHint, DiskSnapshot, DiskSource, VaultTarget};
use cairn_types::DiskFormat;
use cairn_vault::Vault;

use crate::agent::{BackupResult, StorageAgent};
use crate::error::{Result, StorageError};
use crate::provider::DiskSnapshotExt;
use crate::qemu::NbdImage;

/// Connecting to the vault a request names.
pub trait VaultTargetExt {
    /// Connects to the vault: a vault service (`https://`, token and fingerprint required) or
    /// a local repository directory (an absolute path).
    /// An encrypted repository is unlocked with `key_file` (the agent's `--vault-key-file`).
    fn open(&self, key_file: Option<&std::path::Path>) -> Result<Box<dyn Vault>>;
}

impl VaultTargetExt for VaultTarget {
    fn open(&self, key_file: Option<&std::path::Path>) -> Result<Box<dyn Vault>> {
        let cred = key_file
            .map(cairn_vault::Credential::read_key_file)
            .transpose()?;
        if self.url.starts_with("https://") {
            let token = self
                .token
                .as_deref()
                .ok_or_else(|| StorageError::Invalid("vault token missing".into()))?;
            let fp = self
                .fingerprint
                .clone()
                .ok_or_else(|| StorageError::Invalid("vault fingerprint missing".into()))?;
            let mut v = cairn_vault::remote::RemoteVault::connect(
                &self.url,
                token,
                &cairn_http::Trust::Fingerprint(fp),
            )?;
            if let Some(c) = &cred {
                v.unlock(c)?;
            }
            return Ok(Box::new(v));
        }
        let dir = PathBuf::from(self.url.strip_prefix("file://").unwrap_or(&self.url));
        let s3 = cairn_vault::location::is_s3(&self.url);
        if !s3 && !dir.is_absolute() {
            return Err(StorageError::Invalid(format!(
                "vault url {:?}: https://..., s3://... or an absolute path",
                self.url
            )));
        }
        let repo = cairn_vault::Repository::open_location(&dir)?;
        if let Some(c) = &cred {
            repo.unlock(c)?;
        }
        Ok(Box::new(cairn_vault::LocalVault { repo }))
    }
}

impl StorageAgent {
    fn resolve_source(&self, s: &DiskSource) -> Result<DiskSnapshot> {
        match s {
            DiskSource::Snapshot { snapshot, index } => {
                let u = self.get_snapshot(snapshot)?;
                u.disks.get(*index).cloned().ok_or_else(|| {
                    StorageError::NotFound(format!("disk {index} of snapshot {snapshot}"))
                })
            }
            DiskSource::InPlace { datastore, disk } => {
                DiskSnapshot::of_file(&self.disk_path(datastore, disk)?)
            }
            DiskSource::Nbd { .. } | DiskSource::Rdm { .. } => {
                Err(StorageError::Invalid("not a storage snapshot".into()))
            }
        }
    }

    /// Backs up one disk of a backup call.
    fn run_backup_job(&self, vault: &VaultTarget, job: &BackupJob) -> Result<BackupResult> {
        let v = vault.open(self.config().vault_key_file.as_deref())?;
        match &job.source {
            DiskSource::Nbd {
                socket,
                export,
                bitmap_context,
            } => {
                let img = NbdImage::connect(self.nbd(), socket, export, bitmap_context.as_deref())?;
                let mut req = job.request.clone();
                if bitmap_context.is_some() && req.parent.is_some() {
                    match img.dirty_extents() {
                        Ok(extents) => req.hints.insert(0, ChangeHint::Hypervisor { extents }),
                        Err(e) => tracing::warn!("{}: dirty bitmap unreadable: {e}", req.name),
                    }
                }
                let snap = DiskSnapshot {
                    disk: PathBuf::from(format!("nbd:{export}")),
                    image: img_path(socket, export),
                    format: DiskFormat::Raw,
                    internal: None,
                    size: img.size(),
                };
                self.backup_source(&*v, &snap, &img, &req)
            }
            DiskSource::Rdm { datastore, disk } => {
                let r = self.backup_rdm(&*v, datastore, disk, &job.request)?;
                Ok(r.data)
            }
            DiskSource::Snapshot { snapshot, index } => {
                // A unit snapshot's clone: with the disk's last clone as the previous point,
                // FIEMAP tells what changed (see `lastclone`).
                let u = self.get_snapshot(snapshot)?;
                let snap = u.disks.get(*index).cloned().ok_or_else(|| {
                    StorageError::NotFound(format!("disk {index} of snapshot {snapshot}"))
                })?;
                let mut req = job.request.clone();
                if let Some(h) = crate::lastclone::hint(&u, &snap, req.parent.as_deref()) {
                    req.hints.insert(0, h);
                }
                let r = self.backup_disk(&*v, &snap, &req)?;
                crate::lastclone::keep(&u, &snap, &r.manifest.id.to_string());
                Ok(r)
            }
            s => {
                let snap = self.resolve_source(s)?;
                self.backup_disk(&*v, &snap, &job.request)
            }
        }
    }

    /// Runs backup jobs, each with its own connection to `vault`, at most `parallel` at once.
    pub fn run_backup_jobs(
        &self,
        vault: &VaultTarget,
        jobs: &[BackupJob],
        parallel: usize,
    ) -> Vec<Result<BackupResult>> {
        crate::agent::parallel_map(jobs, parallel, |job| self.run_backup_job(vault, job))
    }
}

fn img_path(socket: &std::path::Path, export: &str) -> PathBuf {
    PathBuf::from(format!("nbd+unix:///{export}?socket={}", socket.display()))
}
