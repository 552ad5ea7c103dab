//! Repository locks, kept as objects `locks/<id>.json` so they work on any store.
//!
//! | holder | kind | excludes |
//! |---|---|---|
//! | backup session | shared | exclusive locks |
//! | gc | gc | exclusive and gc locks |
//! | prune, forget, repair, index rebuild | exclusive | every other lock |
//!
//! GC runs beside backup sessions: it reads their locks ([`session_starts`]) to know which
//! sessions began before it condemned a container (see [`crate::maint::gc`]).
//!
//! Acquiring writes the lock first and then lists the others; if a conflicting lock exists,
//! the new lock is removed again and acquisition fails with [`VaultError::Locked`]. Two
//! racing acquirers may both back off; neither can both succeed. Locks release on drop.
//!
//! # Leases
//!
//! A held lock is a lease: its holder writes it again every [`LOCK_REFRESH`] (a thread per
//! lock), with the time in `refreshed`. A lock is stale, and removed by the next acquirer,
//! when its holder runs on this host and its process is gone, when it is this process's own
//! and no longer held (its release failed: the store was away), or when it was not refreshed
//! for [`LOCK_STALE`] — a holder on another host that crashed, or that lost the store while
//! releasing (a vault service sharing a bucket with others). [`LOCK_STALE`] is many refresh
//! periods, so a slow store or a clock a few minutes off never takes a live lock.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Result, VaultError};
use crate::manifest::now;
use crate::store::{Key, ObjectStore};

/// How often a held lock is written again.
pub const LOCK_REFRESH: Duration = Duration::from_secs(60);
/// A lock not refreshed for this long is stale, whoever holds it.
pub const LOCK_STALE: Duration = Duration::from_secs(15 * 60);

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct LockInfo {
    exclusive: bool,
    /// A GC's lock: shared with backup sessions, exclusive among GCs. Older builds read it
    /// as a session's.
    #[serde(default)]
    gc: bool,
    host: String,
    pid: u32,
    time: u64,
    purpose: String,
    /// When the holder last wrote it (Unix seconds); locks from before leases have none
    /// and count from `time`.
    #[serde(default)]
    refreshed: u64,
}

impl LockInfo {
    fn last_seen(&self) -> u64 {
        self.refreshed.max(self.time)
    }
}

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct RepoLock {
    store: Arc<dyn ObjectStore>,
    key: Key,
    since: u64,
    released: bool,
    /// Tells the refresher to stop (set, then notified).
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The keys of the locks this process holds now: a lock object of this process that is not
/// among them is an orphan of a failed release.
static HELD: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn held() -> std::sync::MutexGuard<'static, Vec<String>> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl RepoLock {
    /// Takes a lock; fails at once if a conflicting lock is held.
    pub fn acquire(store: Arc<dyn ObjectStore>, exclusive: bool, purpose: &str) -> Result<Self> {
        Self::acquire_with(store, exclusive, false, purpose, LOCK_REFRESH, LOCK_STALE)
    }

    /// Takes a GC's lock: beside backup sessions, never beside another GC or an exclusive
    /// lock.
    pub fn acquire_gc(store: Arc<dyn ObjectStore>) -> Result<Self> {
        Self::acquire_with(store, false, true, "gc", LOCK_REFRESH, LOCK_STALE)
    }

    /// When the lock was taken (Unix seconds, this host's clock).
    pub fn since(&self) -> u64 {
        self.since
    }

    fn acquire_with(
        store: Arc<dyn ObjectStore>,
        exclusive: bool,
        gc: bool,
        purpose: &str,
        refresh: Duration,
        stale: Duration,
    ) -> Result<Self> {
        let t = now();
        let info = LockInfo {
            exclusive,
            gc,
            host: hostname(),
            pid: std::process::id(),
            time: t,
            purpose: purpose.into(),
            refreshed: t,
        };
        let key = Key::new(format!("locks/{:016x}.json", rand::random::<u64>()))?;
        // Held before it is written: another lock of this process taken meanwhile would
        // otherwise see it as an orphan of a failed release, and remove it.
        held().push(key.to_string());
        if let Err(e) = store.put(&key, &serde_json::to_vec(&info).expect("lock json")) {
            held().retain(|k| *k != key.to_string());
            return Err(e.into());
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let refresher = {
            let (store, key, stop) = (store.clone(), key.clone(), stop.clone());
            std::thread::Builder::new()
                .name("cairn-lock-lease".into())
                .spawn(move || refresh_loop(&*store, &key, info, &stop, refresh))
                .map_err(|e| VaultError::io("thread", "spawn lock refresher", e))?
        };
        let lock = Self {
            store: store.clone(),
            key,
            since: t,
            released: false,
            stop,
            refresher: Some(refresher),
        };
        for (key, other) in others(&*store, &lock.key)? {
            if let Some(why) = stale_because(&key, &other, stale) {
                if other.host == hostname() {
                    tracing::info!("removing stale lock {key} of process {} ({why})", other.pid);
                } else {
                    tracing::warn!(
                        "removing stale lock {key} of pid {} on {} ({}): {why}",
                        other.pid,
                        other.host,
                        other.purpose
                    );
                }
                let _ = store.delete(&key);
                continue;
            }
            if exclusive || other.exclusive || gc && other.gc {
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
        self.stop_refresher();
        self.released = true;
        Ok(self.store.delete(&self.key)?)
    }

    fn stop_refresher(&mut self) {
        let key = self.key.to_string();
        held().retain(|k| *k != key);
        let (flag, cv) = &*self.stop;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(h) = self.refresher.take() {
            let _ = h.join();
        }
    }
}

/// Every lock in the store but `ours` that can be read (one that vanished or cannot be read
/// is not a lock anyone must respect).
fn others(store: &dyn ObjectStore, ours: &Key) -> Result<Vec<(Key, LockInfo)>> {
    Ok(store
        .list("locks")?
        .into_iter()
        .filter(|m| m.key != *ours)
        .filter_map(|m| {
            let info = serde_json::from_slice(&store.get(&m.key).ok()?).ok()?;
            Some((m.key, info))
        })
        .collect())
}

/// Why a lock no longer holds, if it does not: its holder on this host is gone, it is this
/// process's own and no longer held (its release failed), or nobody refreshed it for `stale`.
fn stale_because(key: &Key, info: &LockInfo, stale: Duration) -> Option<String> {
    if info.host == hostname() {
        if info.pid == std::process::id() && !held().contains(&key.to_string()) {
            return Some("released, not deleted".into());
        }
        if !pid_alive(info.pid) {
            return Some("its process is gone".into());
        }
    }
    (now().saturating_sub(info.last_seen()) > stale.as_secs())
        .then(|| format!("not refreshed since {}", info.last_seen()))
}

/// When each backup session that holds a lock now began (Unix seconds, its host's clock).
/// Stale locks are left to the next acquirer and not counted.
pub fn session_starts(store: &dyn ObjectStore) -> Result<Vec<u64>> {
    let none = Key::new("locks/none")?;
    Ok(others(store, &none)?
        .into_iter()
        .filter(|(k, i)| !i.exclusive && !i.gc && stale_because(k, i, LOCK_STALE).is_none())
        .map(|(_, i)| i.time)
        .collect())
}

/// Writes the lock again every `every` until told to stop. A failed write is retried at
/// the next tick: the lease lapses only after [`LOCK_STALE`] without one.
fn refresh_loop(
    store: &dyn ObjectStore,
    key: &Key,
    mut info: LockInfo,
    stop: &(Mutex<bool>, Condvar),
    every: Duration,
) {
    let (flag, cv) = stop;
    let mut stopped = flag.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let (guard, _) = cv
            .wait_timeout_while(stopped, every, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        stopped = guard;
        if *stopped {
            return;
        }
        info.refreshed = now();
        if let Err(e) = store.put(key, &serde_json::to_vec(&info).expect("lock json")) {
            tracing::warn!("could not refresh lock {key}: {e}");
        }
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        self.stop_refresher();
        if !self.released {
            let _ = self.store.delete(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn foreign(store: &dyn ObjectStore, exclusive: bool, age: u64) {
        let t = now() - age;
        let info = LockInfo {
            exclusive,
            gc: false,
            host: "another-host".into(),
            pid: 1,
            time: t,
            purpose: "backup elsewhere".into(),
            refreshed: t,
        };
        store
            .put(
                &Key::new("locks/00000000000000ff.json").unwrap(),
                &serde_json::to_vec(&info).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn a_lease_not_refreshed_lapses_and_a_held_one_is_refreshed() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        // Another host's exclusive lock, refreshed a minute ago: it holds.
        foreign(&*store, true, 60);
        let e = RepoLock::acquire(store.clone(), false, "backup").unwrap_err();
        assert!(matches!(e, VaultError::Locked(_)), "{e}");
        // The same, silent for longer than LOCK_STALE: removed, and the lock is taken.
        foreign(&*store, true, LOCK_STALE.as_secs() + 60);
        let held = RepoLock::acquire(store.clone(), false, "backup").unwrap();
        assert_eq!(
            store.list("locks").unwrap().len(),
            1,
            "the stale lock is gone"
        );
        drop(held);
        assert!(store.list("locks").unwrap().is_empty(), "released on drop");

        // A lock of this very process that it no longer holds (its release failed while the
        // store was away) is an orphan: removed.
        let t = now();
        let orphan = LockInfo {
            exclusive: true,
            gc: false,
            host: hostname(),
            pid: std::process::id(),
            time: t,
            purpose: "gc".into(),
            refreshed: t,
        };
        store
            .put(
                &Key::new("locks/00000000000000aa.json").unwrap(),
                &serde_json::to_vec(&orphan).unwrap(),
            )
            .unwrap();
        let l = RepoLock::acquire(store.clone(), true, "gc").expect("the orphan does not hold");
        drop(l);
        assert!(store.list("locks").unwrap().is_empty());

        // A held lock is written again while held, and the writes stop when it is released.
        let l = RepoLock::acquire_with(
            store.clone(),
            true,
            false,
            "gc",
            Duration::from_millis(20),
            LOCK_STALE,
        )
        .unwrap();
        let read = || -> LockInfo { serde_json::from_slice(&store.get(&l.key).unwrap()).unwrap() };
        let first = read();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(read().refreshed > first.refreshed, "refreshed while held");
        let key = l.key.clone();
        l.release().unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            store.get(&key).is_err(),
            "no refresh brings it back after release"
        );
    }

    #[test]
    fn gc_runs_beside_sessions_never_beside_another_gc_or_an_exclusive_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let session = RepoLock::acquire(store.clone(), false, "backup").unwrap();
        let gc = RepoLock::acquire_gc(store.clone()).expect("gc beside a session");
        assert_eq!(session_starts(&*store).unwrap(), vec![session.since()]);
        let second = RepoLock::acquire_gc(store.clone()).unwrap_err();
        assert!(matches!(second, VaultError::Locked(_)), "{second}");
        let prune = RepoLock::acquire(store.clone(), true, "prune").unwrap_err();
        assert!(matches!(prune, VaultError::Locked(_)), "{prune}");
        let another = RepoLock::acquire(store.clone(), false, "backup").expect("beside gc");
        assert_eq!(session_starts(&*store).unwrap().len(), 2);
        drop((session, another));
        assert!(session_starts(&*store).unwrap().is_empty());
        // A session of another host silent for longer than LOCK_STALE no longer counts.
        foreign(&*store, false, LOCK_STALE.as_secs() + 60);
        assert!(session_starts(&*store).unwrap().is_empty());
        drop(gc);
    }
}
