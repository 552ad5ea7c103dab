//! Repository locks, kept as objects `locks/<id>.json` so they work on any store.
//!
//! | holder | kind | excludes |
//! |---|---|---|
//! | backup session | shared | exclusive locks |
//! | gc, prune, index rebuild | exclusive | every other lock |
//!
//! Acquiring writes the lock first and then lists the others; if a conflicting lock exists,
//! the new lock is removed again and acquisition fails with [`VaultError::Locked`]. Two
//! racing acquirers may both back off; neither can both succeed. A lock whose holder runs on
//! this host and whose process is gone is stale and removed. Locks release on drop.

use std::sync::Arc;

use crate::error::{Result, VaultError};
use crate::manifest::now;
use crate::store::{Key, ObjectStore};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct LockInfo {
    exclusive: bool,
    host: String,
    pid: u32,
    time: u64,
    purpose: String,
}

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct RepoLock {
    store: Arc<dyn ObjectStore>,
    key: Key,
    released: bool,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl RepoLock {
    /// Takes a lock; fails at once if a conflicting lock is held.
    pub fn acquire(store: Arc<dyn ObjectStore>, exclusive: bool, purpose: &str) -> Result<Self> {
        let info = LockInfo {
            exclusive,
            host: hostname(),
            pid: std::process::id(),
            time: now(),
            purpose: purpose.into(),
        };
        let key = Key::new(format!("locks/{:016x}.json", rand::random::<u64>()))?;
        store.put(&key, &serde_json::to_vec(&info).expect("lock json"))?;
        let lock = Self {
            store: store.clone(),
            key,
            released: false,
        };
        for m in store.list("locks")? {
            if m.key == lock.key {
                continue;
            }
            let other: LockInfo = match store
                .get(&m.key)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(o) => o,
                None => continue, // vanished or unreadable: not a lock we must respect
            };
            if other.host == info.host && !pid_alive(other.pid) {
                tracing::info!(
                    "removing stale lock {} of dead process {}",
                    m.key,
                    other.pid
                );
                let _ = store.delete(&m.key);
                continue;
            }
            if exclusive || other.exclusive {
                let msg = format!(
                    "{} lock held by pid {} on {} since {} for {}",
                    if other.exclusive { "an exclusive" } else { "a" },
                    other.pid,
                    other.host,
                    other.time,
                    other.purpose
                );
                drop(lock);
                return Err(VaultError::Locked(msg));
            }
        }
        Ok(lock)
    }

    /// Releases the lock now, reporting failure.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        Ok(self.store.delete(&self.key)?)
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.store.delete(&self.key);
        }
    }
}
