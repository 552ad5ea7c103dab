//! Reading and pruning QEMU's block graph: named nodes with their bitmaps, exports, block jobs,
//! and [`sweep`], the idempotent teardown of our temporary objects.
//!
//! Temporary names are `cx<k>-<snapshot short id>-<disk index>` with `k` one of
//! `s` scratch node, `j` backup job, `e` export, `c` export-copy bitmap, `o` overlay node,
//! `k` commit job. Sweeping decides from what QEMU reports, not from error strings, so running it
//! twice, or on a half-built snapshot, is safe.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

use crate::driver::DriverError;
use crate::qmp::QmpClient;
use crate::spec::{TEMP_PREFIX, VmId};

/// A temporary object name of kind `k` for disk `i` of snapshot `short`.
pub(crate) fn temp_name(kind: char, short: &str, i: usize) -> String {
    format!("{TEMP_PREFIX}{kind}-{short}-{i}")
}

/// The kind letter of one of our temporary names, if it is one.
pub(crate) fn temp_kind(name: &str) -> Option<char> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let mut chars = rest.chars();
    let kind = chars.next()?;
    (chars.next() == Some('-')).then_some(kind)
}

/// Which temporary objects a sweep touches.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    /// Those of one snapshot (by short id).
    Snapshot(&'a str),
    /// Every temporary object (agent recovery).
    All,
}

impl Scope<'_> {
    pub fn matches(&self, name: &str, kind: char) -> bool {
        temp_kind(name) == Some(kind)
            && match self {
                Scope::All => true,
                Scope::Snapshot(short) => name
                    .get(4..)
                    .is_some_and(|rest| rest.starts_with(&format!("{short}-"))),
            }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    pub name: String,
    pub count: u64,
    pub granularity: u64,
    pub recording: bool,
    pub inconsistent: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub name: String,
    pub size: u64,
    pub bitmaps: Vec<Bitmap>,
}

#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub id: String,
    pub status: String,
    pub ready: bool,
}

/// Bound on one QMP exchange of the graph helpers.
pub(crate) struct Ctx<'a> {
    pub vm: VmId,
    pub qmp: &'a QmpClient,
    pub job_timeout: Duration,
}

impl Ctx<'_> {
    pub async fn exec(&self, cmd: &str, args: Value) -> Result<Value, DriverError> {
        let args = if args.is_null() { None } else { Some(args) };
        self.qmp
            .execute(cmd, args)
            .await
            .map_err(|source| DriverError::Qmp {
                vm: self.vm,
                source,
            })
    }

    pub async fn nodes(&self) -> Result<Vec<Node>, DriverError> {
        let v = self
            .exec("query-named-block-nodes", json!({"flat": true}))
            .await?;
        Ok(v.as_array()
            .map(|a| a.iter().filter_map(parse_node).collect())
            .unwrap_or_default())
    }

    pub async fn node(&self, name: &str) -> Result<Option<Node>, DriverError> {
        Ok(self.nodes().await?.into_iter().find(|n| n.name == name))
    }

    pub async fn export_ids(&self) -> Result<Vec<String>, DriverError> {
        let v = self.exec("query-block-exports", Value::Null).await?;
        Ok(strings(&v, "id"))
    }

    pub async fn jobs(&self) -> Result<Vec<Job>, DriverError> {
        let v = self.exec("query-block-jobs", Value::Null).await?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .map(|j| Job {
                        id: j["device"].as_str().unwrap_or_default().to_owned(),
                        status: j["status"].as_str().unwrap_or_default().to_owned(),
                        ready: j["ready"].as_bool().unwrap_or(false),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Polls until no job named `id` is listed.
    pub async fn wait_job_gone(&self, id: &str) -> Result<(), DriverError> {
        let deadline = Instant::now() + self.job_timeout;
        loop {
            if !self.jobs().await?.iter().any(|j| j.id == id) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    what: format!("block job {id} to end"),
                    after: self.job_timeout,
                });
            }
            sleep(Duration::from_millis(20)).await;
        }
    }
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e[key].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn parse_node(n: &Value) -> Option<Node> {
    let name = n["node-name"].as_str()?.to_owned();
    let bitmaps = n["dirty-bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some(Bitmap {
                        name: b["name"].as_str()?.to_owned(),
                        count: b["count"].as_u64().unwrap_or(0),
                        granularity: b["granularity"].as_u64().unwrap_or(0),
                        recording: b["recording"].as_bool().unwrap_or(false),
                        inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Node {
        name,
        size: n["image"]["virtual-size"].as_u64().unwrap_or(0),
        bitmaps,
    })
}

/// What a sweep removed, for logs and tests.
#[derive(Debug, Default)]
pub(crate) struct Swept {
    pub exports: usize,
    pub jobs: usize,
    pub nodes: usize,
    pub bitmaps: usize,
}

/// Removes our fleecing objects in `scope`: exports, backup jobs, scratch nodes, export-copy
/// bitmaps, and (when `stop_nbd`) the NBD server once no export is left. Overlays are not touched (they hold the
/// guest's writes and must be committed, see `snapshot.rs`).
pub(crate) async fn sweep(
    ctx: &Ctx<'_>,
    scope: Scope<'_>,
    stop_nbd: bool,
) -> Result<Swept, DriverError> {
    let mut out = Swept::default();
    for id in ctx.export_ids().await? {
        if !scope.matches(&id, 'e') {
            continue;
        }
        ctx.exec("block-export-del", json!({"id": id, "mode": "hard"}))
            .await?;
        let wait = ctx
            .qmp
            .wait_event(
                "BLOCK_EXPORT_DELETED",
                |e| e.data["id"] == id.as_str(),
                ctx.job_timeout,
            )
            .await;
        if let Err(e) = wait {
            // The event may have been consumed by an earlier, interrupted sweep: trust the query.
            if ctx.export_ids().await?.contains(&id) {
                return Err(DriverError::Qmp {
                    vm: ctx.vm,
                    source: e,
                });
            }
        }
        out.exports += 1;
    }
    for job in ctx.jobs().await? {
        if !scope.matches(&job.id, 'j') {
            continue;
        }
        if !matches!(job.status.as_str(), "concluded" | "aborting" | "null") {
            ctx.exec("block-job-cancel", json!({"device": job.id, "force": true}))
                .await?;
        }
        ctx.wait_job_gone(&job.id).await?;
        out.jobs += 1;
    }
    let nodes = ctx.nodes().await?;
    for n in &nodes {
        if scope.matches(&n.name, 's') {
            ctx.exec("blockdev-del", json!({"node-name": n.name}))
                .await?;
            out.nodes += 1;
        }
    }
    for n in &nodes {
        for b in &n.bitmaps {
            if scope.matches(&b.name, 'c') {
                ctx.exec(
                    "block-dirty-bitmap-remove",
                    json!({"node": n.name, "name": b.name}),
                )
                .await?;
                out.bitmaps += 1;
            }
        }
    }
    if stop_nbd && ctx.export_ids().await?.is_empty() {
        // Not running is fine: nothing to stop.
        let _ = ctx.qmp.execute("nbd-server-stop", None).await;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_scoped() {
        let n = temp_name('s', "0123abcd", 2);
        assert_eq!(n, "cxs-0123abcd-2");
        assert!(n.len() <= 31);
        assert_eq!(temp_kind(&n), Some('s'));
        assert!(Scope::Snapshot("0123abcd").matches(&n, 's'));
        assert!(!Scope::Snapshot("0123abce").matches(&n, 's'));
        assert!(!Scope::Snapshot("0123abcd").matches(&n, 'e'));
        assert!(Scope::All.matches(&n, 's'));
        assert_eq!(temp_kind("disk0"), None);
        assert_eq!(temp_kind("cairn-0123"), None);
    }
}
