//! Retention locks: snapshots nobody can forget before their time, whatever the credential.
//!
//! ```text
//! retention/<snapshot hex>/<until 16 hex>.json   RetentionLock: one object per lock or extension
//! retention-policy.json                          RetentionPolicy: the minimum lock of new snapshots
//! ```
//!
//! # Rules
//!
//! - A snapshot is *locked* while the latest `until` among its lock objects lies in the
//!   future. Lock objects are written once (`put_new`) and never replaced, so a lock is the
//!   maximum over them: extending one adds an object, and no write, however it races with
//!   another, can shorten it. A request for an earlier time than the current one is refused.
//! - A locked snapshot cannot be forgotten ([`Repository::forget`] refuses, prune keeps it and
//!   says so); its data is live, so GC keeps it; GC never repacks a container holding data of
//!   a locked snapshot (a store may hold the original immutable, see below).
//! - A repository's policy may require a minimum lock: every snapshot committed while it holds
//!   gets at least `now + min_lock_secs`.
//! - These rules live in the repository, below every API: an admin token, the vault service
//!   and the command line all meet the same refusal.
//! - **On the store**: the objects of a locked snapshot (its manifest, its lock objects and
//!   the containers holding its data) are also protected through [`ObjectStore::protect`]
//!   (a local directory: the immutable attribute when the vault runs as root; object storage:
//!   object lock where the bucket has it). The vault releases them only when it deletes
//!   them, which it does only once every lock on them has expired.
//!
//! [`ObjectStore::protect`]: crate::store::ObjectStore::protect

use std::collections::{BTreeMap, HashSet};

use cairn_types::{ContainerId, Digest, SnapshotId};

use crate::error::{Result, VaultError};
use crate::manifest::now;
use crate::repo::{Repository, container_key, snapshot_key};
use crate::store::Key;

/// One lock (or extension) of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetentionLock {
    pub snapshot: SnapshotId,
    /// Unix seconds: the snapshot cannot be forgotten before.
    pub until: u64,
    /// Unix seconds, when this lock object was written.
    pub set_at: u64,
}

/// The repository's rule for new snapshots (the contract's type).
pub use cairn_api::vault::{LockAnswer, RetentionPolicy, SnapshotLock};

/// What protecting a snapshot's objects on the store did: objects made immutable, and
/// those the store could not protect (no privilege, no support), for which the vault's own
/// rules still hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protection {
    pub protected: usize,
    pub unprotected: usize,
}

const PREFIX: &str = "retention/";

fn policy_key() -> Key {
    Key::new("retention-policy.json").expect("valid key")
}

fn lock_key(id: &SnapshotId, until: u64) -> Key {
    Key::new(format!("{PREFIX}{}/{until:016x}.json", id.to_hex())).expect("valid key")
}

/// A snapshot's lock, for messages and answers.
pub fn describe(until: u64) -> String {
    format!("{} (Unix time {until})", cairn_types::time::rfc3339(until))
}

impl Repository {
    /// The latest `until` of every snapshot that has a lock object (expired ones included).
    pub fn retention_locks(&self) -> Result<BTreeMap<SnapshotId, u64>> {
        let mut out = BTreeMap::new();
        for m in self.store().list(PREFIX)? {
            let Some((id, until)) = parse_lock_key(m.key.as_str()) else {
                tracing::warn!("ignoring unexpected retention object {}", m.key);
                continue;
            };
            let e = out.entry(id).or_insert(0);
            *e = until.max(*e);
        }
        Ok(out)
    }

    /// The lock of one snapshot (`None`: never locked).
    pub fn retention_of(&self, id: &SnapshotId) -> Result<Option<u64>> {
        let mut best = None;
        for m in self.store().list(&format!("{PREFIX}{}/", id.to_hex()))? {
            if let Some((_, until)) = parse_lock_key(m.key.as_str()) {
                best = best.max(Some(until));
            }
        }
        Ok(best)
    }

    /// Fails when `id` is locked now.
    pub fn check_unlocked(&self, id: &SnapshotId) -> Result<()> {
        match self.retention_of(id)? {
            Some(until) if until > now() => Err(VaultError::RetentionLocked {
                snapshot: id.to_string(),
                until,
            }),
            _ => Ok(()),
        }
    }

    /// [`Repository::lock_snapshot`] of a snapshot named by id, prefix or name, as the
    /// contract answers it.
    pub fn lock_spec(&self, spec: &str, until: u64) -> Result<LockAnswer> {
        let id = self.find_snapshot(spec)?.id;
        let (until, p) = self.lock_snapshot(&id, until)?;
        Ok(LockAnswer {
            lock: SnapshotLock {
                snapshot: id,
                until,
            },
            protected: p.protected,
            unprotected: p.unprotected,
        })
    }

    /// Every snapshot's lock (expired ones included), as the contract lists them.
    pub fn lock_list(&self) -> Result<Vec<SnapshotLock>> {
        Ok(self
            .retention_locks()?
            .into_iter()
            .map(|(snapshot, until)| SnapshotLock { snapshot, until })
            .collect())
    }

    /// Locks `id` until `until` (Unix seconds) or extends its lock; a time earlier than the
    /// current lock is refused. Returns the lock now in force and what the store protected.
    pub fn lock_snapshot(&self, id: &SnapshotId, until: u64) -> Result<(u64, Protection)> {
        let manifest = self.store().get(&snapshot_key(id)).map_err(|e| {
            if e.is_not_found() {
                VaultError::SnapshotNotFound(id.to_string())
            } else {
                e.into()
            }
        })?;
        drop(manifest);
        if let Some(current) = self.retention_of(id)? {
            if until < current {
                return Err(VaultError::RetentionShortened {
                    snapshot: id.to_string(),
                    until: current,
                    asked: until,
                });
            }
            if until == current {
                return Ok((current, self.protect_snapshot(id, until)?));
            }
        }
        self.write_lock(id, until)?;
        Ok((until, self.protect_snapshot(id, until)?))
    }

    /// Writes one lock object (once: an existing one for the same time is kept).
    pub(crate) fn write_lock(&self, id: &SnapshotId, until: u64) -> Result<()> {
        let lock = RetentionLock {
            snapshot: *id,
            until,
            set_at: now(),
        };
        let bytes = serde_json::to_vec(&lock).expect("lock json");
        match self.store().put_new(&lock_key(id, until), &bytes) {
            Ok(()) => Ok(()),
            Err(e) if e.kind == crate::store::StoreErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Protects a locked snapshot's manifest, lock objects and containers on the store.
    fn protect_snapshot(&self, id: &SnapshotId, until: u64) -> Result<Protection> {
        let s = self
            .list_snapshots()?
            .into_iter()
            .find(|s| s.id == *id)
            .ok_or_else(|| VaultError::SnapshotNotFound(id.to_string()))?;
        let mut keys = vec![snapshot_key(id)];
        keys.extend(
            self.store()
                .list(&format!("{PREFIX}{}/", id.to_hex()))?
                .into_iter()
                .map(|m| m.key),
        );
        let mut live = HashSet::new();
        self.reachable(&s, &mut live)?;
        keys.extend(self.containers_of(&live)?.iter().map(container_key));
        let mut p = Protection::default();
        for k in &keys {
            if self.store().protect(k, until)? {
                p.protected += 1;
            } else {
                p.unprotected += 1;
            }
        }
        Ok(p)
    }

    /// The containers where the index locates `digests`.
    pub(crate) fn containers_of(&self, digests: &HashSet<Digest>) -> Result<HashSet<ContainerId>> {
        let all: Vec<Digest> = digests.iter().copied().collect();
        Ok(self
            .locate_many(&all)?
            .into_iter()
            .flatten()
            .map(|l| l.container)
            .collect())
    }

    /// Containers holding data of snapshots locked now: GC never repacks them.
    pub(crate) fn locked_containers(&self) -> Result<HashSet<ContainerId>> {
        let t = now();
        let locked: HashSet<SnapshotId> = self
            .retention_locks()?
            .into_iter()
            .filter(|&(_, until)| until > t)
            .map(|(id, _)| id)
            .collect();
        if locked.is_empty() {
            return Ok(HashSet::new());
        }
        let mut live = HashSet::new();
        for s in self
            .list_snapshots()?
            .iter()
            .filter(|s| locked.contains(&s.id))
        {
            self.reachable(s, &mut live)?;
        }
        self.containers_of(&live)
    }

    /// Removes the lock objects of a snapshot being forgotten (its locks have expired).
    pub(crate) fn drop_retention(&self, id: &SnapshotId) -> Result<()> {
        for m in self.store().list(&format!("{PREFIX}{}/", id.to_hex()))? {
            self.store().release(&m.key)?;
            self.store().delete(&m.key)?;
        }
        Ok(())
    }

    /// The repository's retention policy (the default when none was set).
    pub fn retention_policy(&self) -> Result<RetentionPolicy> {
        match self.store().get(&policy_key()) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                VaultError::Corrupt(format!("retention-policy.json is not a policy: {e}"))
            }),
            Err(e) if e.is_not_found() => Ok(RetentionPolicy::default()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn set_retention_policy(&self, p: &RetentionPolicy) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(p).expect("policy json");
        Ok(self.store().put(&policy_key(), &bytes)?)
    }

    /// The lock a new snapshot gets: the one asked for, raised to the policy's minimum.
    pub fn lock_for_new(&self, asked: Option<u64>) -> Result<Option<u64>> {
        let min = self.retention_policy()?.min_lock_secs;
        Ok(asked.max((min > 0).then(|| now() + min)))
    }

    /// Protects a snapshot just committed with lock `until` on the store; a failure is
    /// logged (the vault's rules hold the lock whatever the store does).
    pub(crate) fn protect_new(&self, id: &SnapshotId, until: u64) {
        match self.protect_snapshot(id, until) {
            Ok(p) => tracing::debug!(
                "snapshot {id}: {} objects protected, {} not",
                p.protected,
                p.unprotected
            ),
            Err(e) => tracing::warn!("snapshot {id}: protecting its objects: {e}"),
        }
    }
}

fn parse_lock_key(key: &str) -> Option<(SnapshotId, u64)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, file) = rest.split_once('/')?;
    let until = file.strip_suffix(".json")?;
    Some((id.parse().ok()?, u64::from_str_radix(until, 16).ok()?))
}
