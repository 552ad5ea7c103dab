//! Prune: forget snapshots that no retention rule keeps. Rules apply per snapshot name (one
//! disk's history); a snapshot is kept when any rule keeps it. Data is freed by GC afterwards.

use std::collections::{BTreeMap, BTreeSet};

use cairn_types::SnapshotId;

use crate::error::Result;
use crate::repo::Repository;

/// Retention rules (the contract's type: a prune through the service carries them).
pub use cairn_api::vault::PruneOptions;

/// What prune keeps and forgets.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PrunePlan {
    pub keep: Vec<(SnapshotId, String, u64)>,
    pub forget: Vec<(SnapshotId, String, u64)>,
    /// Snapshots the rules would forget but a retention lock keeps, with the lock's end.
    #[serde(default)]
    pub locked: Vec<(SnapshotId, String, u64)>,
    pub executed: bool,
}

fn days(t: u64) -> i64 {
    // Below 2^48: the sign bit is clear.
    (t / 86_400).cast_signed()
}

/// Civil (year, month) of a day count since 1970-01-01.
fn year_month(day: i64) -> (i64, u32) {
    let (y, m, _) = cairn_types::time::civil_from_days(day);
    (y, m)
}

/// Which of a history's points the rules keep. `times` are creation times in seconds since
/// the Unix epoch, **newest first**; all-zero rules keep nothing (callers treat that as
/// "no policy"). Shared with the backup server's retention of whole backups.
pub fn keep_mask(times: &[u64], opts: &PruneOptions) -> Vec<bool> {
    let mut keep = vec![false; times.len()];
    keep.iter_mut().take(opts.keep_last).for_each(|k| *k = true);
    let mut bucket = |n: usize, key: &dyn Fn(u64) -> i64| {
        let mut seen = BTreeSet::new();
        for (i, t) in times.iter().enumerate() {
            if seen.len() >= n {
                break;
            }
            if seen.insert(key(*t)) {
                keep[i] = true;
            }
        }
    };
    bucket(opts.keep_daily, &|t| days(t));
    bucket(opts.keep_weekly, &|t| (days(t) + 3).div_euclid(7));
    bucket(opts.keep_monthly, &|t| {
        let (y, m) = year_month(days(t));
        y * 12 + i64::from(m)
    });
    keep
}

/// Plans (and unless `dry_run`, executes) a prune.
pub fn prune(repo: &Repository, opts: &PruneOptions, dry_run: bool) -> Result<PrunePlan> {
    let all = repo.list_snapshots()?;
    let mut by_name: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for s in &all {
        by_name.entry(s.name.as_str()).or_default().push(s);
    }
    let nothing = opts.keep_last + opts.keep_daily + opts.keep_weekly + opts.keep_monthly == 0;
    let mut plan = PrunePlan::default();
    let t = crate::manifest::now();
    let locks = repo.retention_locks()?;
    for (_, mut snaps) in by_name {
        snaps.sort_by_key(|s| std::cmp::Reverse((s.created, s.created_ms, s.id))); // newest first
        let times: Vec<u64> = snaps.iter().map(|s| s.created).collect();
        let keep = keep_mask(&times, opts);
        for (s, kept) in snaps.into_iter().zip(keep) {
            let row = (s.id, s.name.clone(), s.created);
            if nothing || kept {
                plan.keep.push(row);
            } else if let Some(&until) = locks.get(&s.id).filter(|&&u| u > t) {
                plan.keep.push(row.clone());
                plan.locked.push((row.0, row.1, until));
            } else {
                plan.forget.push(row);
            }
        }
    }
    if !dry_run && !plan.forget.is_empty() {
        let _lock = crate::lock::RepoLock::acquire(repo.store().clone(), true, "prune")?;
        for (id, _, _) in &plan.forget {
            repo.forget(id)?;
        }
        plan.executed = true;
    }
    Ok(plan)
}

/// Forgets the snapshots `specs` (ids or unique prefixes; a damaged manifest by its whole
/// id) under the exclusive lock; an unknown snapshot fails the call before anything is
/// forgotten. Data is freed by GC.
pub fn forget(repo: &Repository, specs: &[String]) -> Result<Vec<SnapshotId>> {
    let _lock = crate::lock::RepoLock::acquire(repo.store().clone(), true, "forget")?;
    let (good, damaged) = repo.scan_snapshots()?;
    enum Target {
        Good(SnapshotId),
        Damaged(String),
    }
    let targets = specs
        .iter()
        .map(|spec| match crate::repo::find_in(&good, spec) {
            Ok(m) => Ok(Target::Good(m.id)),
            Err(e) => damaged
                .iter()
                .find(|d| d.id == spec.to_ascii_lowercase())
                .map(|d| Target::Damaged(d.id.clone()))
                .ok_or(e),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut ids = Vec::new();
    for t in targets {
        match t {
            Target::Good(id) => {
                repo.forget(&id)?;
                ids.push(id);
                if ids.len() == 1 {
                    cairn_types::fault::point("vault.forget.after_first");
                }
            }
            Target::Damaged(file_id) => {
                repo.forget_damaged(&file_id)?;
                if let Ok(id) = file_id.parse() {
                    ids.push(id);
                }
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_months() {
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(31), (1970, 2));
        assert_eq!(year_month(20_000), (2024, 10));
    }
}
