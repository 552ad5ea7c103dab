//! Containers that GC has condemned: found dead, and deleted only once no backup session
//! can still be using them ([`crate::maint::gc`]).
//!
//! A condemned container stays readable (restores and the recipe walk of a backup that
//! references it find it), but no backup session deduplicates against it: a segment whose
//! only copy lies there counts as absent, and the session stores it again. The set lives in
//! the store (`gc/condemned.json`), so every vault service on the same store learns it when
//! a session begins, and each entry carries the time it was condemned: GC deletes it only
//! when every session that might have seen the container as reusable has ended.
//!
//! Deleted containers stay in the record as tombstones for [`TOMBSTONE_KEEP`]: an index
//! that read one of them while it was being deleted (a listing taken just before, a
//! listing that lags) drops it again and never vouches for its segments.

use std::collections::{HashMap, HashSet};

use cairn_types::{ContainerId, Digest};

use super::Repository;
use crate::error::Result;
use crate::index::Location;
use crate::maint::gc::GC_CLOCK_MARGIN;
use crate::manifest::now;
use crate::store::{Key, ObjectStore};

/// Condemned containers and when each was condemned (Unix seconds).
pub type Condemned = HashMap<ContainerId, u64>;

/// How long a deleted container is remembered as such (seconds).
pub const TOMBSTONE_KEEP: u64 = 30 * 86_400;

/// The condemned containers, and the deleted ones with the time they were deleted.
#[derive(Clone, Debug, Default)]
pub(crate) struct Verdicts {
    condemned: Condemned,
    gone: HashMap<ContainerId, u64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    container: ContainerId,
    since: u64,
    /// When it was deleted: a tombstone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deleted: Option<u64>,
}

fn condemned_key() -> Key {
    Key::new("gc/condemned.json").expect("valid key")
}

/// Reads the record; a missing object is an empty one. An unreadable one is an error: it
/// would otherwise make condemned containers reusable again.
pub(crate) fn load(store: &dyn ObjectStore) -> Result<Verdicts> {
    let list: Vec<Entry> = match store.get(&condemned_key()) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| crate::error::VaultError::Corrupt(format!("gc/condemned.json: {e}")))?,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut v = Verdicts::default();
    for e in list {
        match e.deleted {
            Some(t) => v.gone.insert(e.container, t),
            None => v.condemned.insert(e.container, e.since),
        };
    }
    Ok(v)
}

impl Repository {
    fn verdicts(&self) -> std::sync::RwLockReadGuard<'_, Verdicts> {
        self.verdicts.read().unwrap_or_else(|p| p.into_inner())
    }

    fn verdicts_mut(&self) -> std::sync::RwLockWriteGuard<'_, Verdicts> {
        self.verdicts.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The condemned containers as this repository last read or wrote them.
    pub fn condemned(&self) -> Condemned {
        self.verdicts().condemned.clone()
    }

    /// Was this container deleted by a GC (as far as this repository knows)?
    pub(crate) fn is_gone(&self, c: &ContainerId) -> bool {
        self.verdicts().gone.contains_key(c)
    }

    /// The deleted containers this repository knows of.
    pub(crate) fn gone(&self) -> HashSet<ContainerId> {
        self.verdicts().gone.keys().copied().collect()
    }

    /// Reads the record again from the store (a GC elsewhere may have changed it). Deleted
    /// containers known here stay known.
    pub(crate) fn reload_condemned(&self) -> Result<()> {
        let read = load(self.store.as_ref())?;
        let mut v = self.verdicts_mut();
        v.condemned = read.condemned;
        v.gone.extend(read.gone);
        Ok(())
    }

    /// Notes containers as deleted (GC, just before it deletes them; called with the index
    /// locked, so that no concurrent refresh adds them back).
    pub(crate) fn note_gone(&self, cs: &HashSet<ContainerId>) {
        let t = now();
        let mut v = self.verdicts_mut();
        for c in cs {
            v.condemned.remove(c);
            v.gone.insert(*c, t);
        }
    }

    /// Replaces the condemned set and writes the record (with the tombstones younger than
    /// [`TOMBSTONE_KEEP`]). Memory first, so that sessions of this process stop reusing a
    /// newly condemned container even if the write fails (they then only store more).
    pub(crate) fn set_condemned(&self, set: Condemned) -> Result<()> {
        let body = {
            let mut v = self.verdicts_mut();
            v.condemned = set;
            let t = now();
            v.gone.retain(|_, d| t.saturating_sub(*d) < TOMBSTONE_KEEP);
            let mut list: Vec<Entry> = v
                .condemned
                .iter()
                .map(|(c, s)| Entry {
                    container: *c,
                    since: *s,
                    deleted: None,
                })
                .chain(v.gone.iter().map(|(c, d)| Entry {
                    container: *c,
                    since: *d,
                    deleted: Some(*d),
                }))
                .collect();
            list.sort_by_key(|e| e.container);
            serde_json::to_vec(&list).expect("condemned json")
        };
        self.store.put(&condemned_key(), &body)?;
        Ok(())
    }

    /// Clears the locations that lie in deleted containers or in condemned ones; with
    /// `session_began`, only in those condemned before that session could have seen them
    /// (the others stay until the session ends: GC waits for it, see [`GC_CLOCK_MARGIN`]).
    pub(crate) fn drop_condemned(&self, locs: &mut [Option<Location>], session_began: Option<u64>) {
        let v = self.verdicts();
        if v.condemned.is_empty() && v.gone.is_empty() {
            return;
        }
        let dropped = |since: u64| session_began.is_none_or(|b| since + GC_CLOCK_MARGIN < b);
        for l in locs {
            if l.is_some_and(|l| {
                v.gone.contains_key(&l.container)
                    || v.condemned.get(&l.container).is_some_and(|&s| dropped(s))
            }) {
                *l = None;
            }
        }
    }

    /// Locations of blobs that a backup session begun at `session_began` (Unix seconds)
    /// may reference: none in a container condemned before it began.
    pub fn locate_for_session(
        &self,
        digests: &[Digest],
        session_began: u64,
    ) -> Result<Vec<Option<Location>>> {
        let mut locs = self.locate_many(digests)?;
        self.drop_condemned(&mut locs, Some(session_began));
        Ok(locs)
    }

    /// Locations of blobs outside every condemned container.
    pub(crate) fn locate_kept(&self, digests: &[Digest]) -> Result<Vec<Option<Location>>> {
        let mut locs = self.locate_many(digests)?;
        self.drop_condemned(&mut locs, None);
        Ok(locs)
    }
}
