//! Schedules and retention.
//!
//! A schedule backs up its VMs every interval (`30m`, `6h`, `1d`; at least 1 minute); the
//! scheduler wakes every second, submits due jobs (a VM still busy skips that round, logged)
//! and moves `next_ms` forward. Retention (keep-last/daily/weekly/monthly, the vault's own
//! rules via [`cairn_vault::maint::keep_mask`]) runs after each backup and as a `prune` job:
//! the plan is computed from the catalog, then each forgotten backup's vault snapshots are
//! forgotten first and its catalog rows and metadata removed after. The newest backup of a
//! VM is always kept.

use std::sync::Arc;
use std::time::Duration;

use cairn_api::server::{BackupId, JobResult, PruneDone, PrunePlan};
use cairn_catalog::{Hold, Retention, Schedule, now_ms};
use cairn_vault::maint::PruneOptions;

use crate::engine::Flow;
use crate::jobs::submit;
use crate::{JobCtx, JobKind, Result, Server, ServerError};

/// Parses `90s`, `30m`, `6h`, `1d` (or bare seconds) into seconds; at least 60.
pub fn parse_every(s: &str) -> Result<i64> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: i64 = num
        .parse()
        .map_err(|_| ServerError::Invalid(format!("interval {s:?}: like 30m, 6h or 1d")))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(ServerError::Invalid(format!(
                "interval {s:?}: unit s, m, h or d"
            )));
        }
    };
    let secs = n
        .checked_mul(mult)
        .filter(|v| *v <= 366 * 86_400)
        .ok_or_else(|| ServerError::Invalid(format!("interval {s:?} is too long")))?;
    if secs < 60 {
        return Err(ServerError::Invalid(format!(
            "interval {s:?}: at least 1 minute"
        )));
    }
    Ok(secs)
}

/// Validates and stores a schedule; the first run is `first_in_s` (default: one interval)
/// from now.
pub fn put_schedule(
    server: &Server,
    name: &str,
    vms: Vec<String>,
    group: bool,
    every: &str,
    first_in_s: Option<i64>,
) -> Result<Schedule> {
    if !cairn_types::is_plain_name(name) {
        return Err(ServerError::Invalid(format!("schedule name {name:?}")));
    }
    if vms.is_empty() {
        return Err(ServerError::Invalid(
            "a schedule needs at least one VM".into(),
        ));
    }
    let every_s = parse_every(every)?;
    let first = match first_in_s {
        Some(f) if !(0..=every_s).contains(&f) => {
            return Err(ServerError::Invalid(format!(
                "first_in_s {f}: between 0 and the interval"
            )));
        }
        Some(f) => f,
        None => every_s,
    };
    let s = Schedule {
        name: name.into(),
        vms,
        group,
        every_s,
        next_ms: now_ms() + first * 1000,
        enabled: true,
    };
    server.catalog.upsert_schedule(&s)?;
    Ok(s)
}

pub(crate) fn start_scheduler(server: &Arc<Server>) {
    let s = Arc::clone(server);
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                if !s.leader.is_active() {
                    continue;
                }
                let Ok(list) = s.catalog.schedules() else {
                    continue;
                };
                let now = now_ms();
                for mut sc in list.into_iter().filter(|x| x.enabled && x.next_ms <= now) {
                    let kind = if sc.group {
                        JobKind::GroupBackup {
                            vms: sc.vms.clone(),
                            full: false,
                            skip_unprotected: false,
                        }
                    } else {
                        JobKind::Backup {
                            vms: sc.vms.clone(),
                            full: false,
                            skip_unprotected: false,
                        }
                    };
                    match submit(&s, kind) {
                        Ok(j) => tracing::info!("schedule {}: job {}", sc.name, j.id),
                        Err(e) => tracing::warn!("schedule {}: skipped: {}", sc.name, e.chain()),
                    }
                    while sc.next_ms <= now {
                        sc.next_ms += sc.every_s * 1000;
                    }
                    let _ = s.catalog.upsert_schedule(&sc);
                }
            }
        })
        .expect("spawn scheduler");
}

fn prune_options(r: &Retention) -> PruneOptions {
    let n = |v: Option<i64>| v.unwrap_or(0).max(0) as usize;
    PruneOptions {
        keep_last: n(r.keep_last),
        keep_daily: n(r.keep_daily),
        keep_weekly: n(r.keep_weekly),
        keep_monthly: n(r.keep_monthly),
    }
}

/// Plans and (unless `dry_run`) applies the retention of one VM; returns the plan.
fn retain(ctx: &JobCtx<'_>, vm: &str, dry_run: bool) -> Result<PrunePlan> {
    let s = ctx.app;
    let Some(policy) = s.catalog.retention(vm)? else {
        return Ok(PrunePlan {
            vm: vm.to_string(),
            policy: None,
            forget: Vec::new(),
            dry_run,
        });
    };
    let opts = prune_options(&policy);
    let mut backups = s.catalog.backups(Some(vm))?;
    backups.reverse(); // newest first
    let times: Vec<u64> = backups
        .iter()
        .map(|b| (b.created_ms / 1000) as u64)
        .collect();
    let mut keep = cairn_vault::maint::keep_mask(&times, &opts);
    if let Some(k) = keep.first_mut() {
        *k = true; // never the newest
    }
    let forget: Vec<_> = backups
        .iter()
        .zip(&keep)
        .filter(|(_, k)| !**k)
        .map(|(b, _)| b)
        .collect();
    let ids: Vec<BackupId> = forget.iter().map(|b| b.id.clone()).collect();
    if !dry_run && !forget.is_empty() {
        let vault = crate::vault::open(&s.config.vault)?;
        for b in &forget {
            let mut snaps: Vec<String> = b.disks.iter().map(|d| d.vault_snapshot.clone()).collect();
            snaps.extend(
                b.disks
                    .iter()
                    .filter_map(|d| d.rdm.as_ref().and_then(|r| r.mapping_snapshot.clone())),
            );
            // The catalog forgets the backup first, the vault second: a backup the catalog
            // lists is always restorable. The snapshots are held by the job in between, so
            // a server that dies there forgets them at its next start.
            let holds: Vec<Hold> = snaps
                .iter()
                .map(|snapshot| Hold::VaultSnapshot {
                    snapshot: snapshot.clone(),
                })
                .collect();
            for h in &holds {
                ctx.hold(h.clone())?;
            }
            s.catalog.delete_backup(&b.id)?;
            if let Ok(files) = s.files()
                && files.backups().iter().any(|x| b.id == x.backup_id)
                && let Err(e) = files.remove_backup(&b.id)
            {
                ctx.warn(format!("backup {}: file catalog entry kept: {e}", b.id));
            }
            if let Ok(m) = s.catalog.metadata(&b.timestamp_id) {
                s.meta.remove(&s.catalog, &m)?;
            }
            cairn_types::fault::point("server.prune.before_forget");
            match vault.forget(&snaps) {
                Ok(_) => {}
                Err(cairn_vault::VaultError::SnapshotNotFound(_)) => {
                    ctx.warn(format!(
                        "backup {}: some vault snapshots were already gone",
                        b.id
                    ));
                    for one in &snaps {
                        let _ = vault.forget(std::slice::from_ref(one));
                    }
                }
                Err(e) => return Err(ServerError::Failed(format!("vault forget: {e}"))),
            }
            for h in &holds {
                ctx.unhold(h);
            }
            ctx.info(format!("{vm}: backup {} pruned", b.id));
        }
    }
    Ok(PrunePlan {
        vm: vm.to_string(),
        policy: Some(policy),
        forget: ids,
        dry_run,
    })
}

/// Applies retention after a backup (errors are logged, not fatal: the backup stands).
pub fn apply_retention(ctx: &JobCtx<'_>, vm: &str) -> Result<()> {
    if let Err(e) = retain(ctx, vm, false) {
        ctx.warn(format!("{vm}: retention not applied: {}", e.chain()));
    }
    Ok(())
}

/// The `prune` job.
pub struct PruneFlow;

impl Flow<Server> for PruneFlow {
    fn kind(&self) -> &'static str {
        "prune"
    }

    fn run(&self, ctx: &JobCtx<'_>, params: &JobKind) -> Result<JobResult> {
        match params {
            JobKind::Prune { vms, dry_run } => prune(ctx, vms, *dry_run),
            other => Err(crate::jobs::not_for(other, self.kind())),
        }
    }
}

/// Plans and (unless `dry_run`) applies the retention of `vms` (all VMs when empty).
pub fn prune(ctx: &JobCtx<'_>, vms: &[String], dry_run: bool) -> Result<JobResult> {
    let vms: Vec<String> = if vms.is_empty() {
        ctx.app.catalog.vms()?.into_iter().map(|v| v.name).collect()
    } else {
        vms.to_vec()
    };
    let plans = vms
        .iter()
        .map(|v| retain(ctx, v, dry_run))
        .collect::<Result<Vec<_>>>()?;
    Ok(JobResult::Prune(PruneDone { plans }))
}

#[cfg(test)]
mod tests {
    use super::parse_every;

    #[test]
    fn intervals() {
        assert_eq!(parse_every("30m").unwrap(), 1800);
        assert_eq!(parse_every("6h").unwrap(), 21_600);
        assert_eq!(parse_every("120").unwrap(), 120);
        for bad in ["", "10s", "5x", "h", "-1h", "99999999999999d", "400d"] {
            assert!(parse_every(bad).is_err(), "{bad}");
        }
    }
}
