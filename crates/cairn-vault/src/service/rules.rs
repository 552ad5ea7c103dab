//! Who may call which route of the vault service.

use std::sync::Arc;

use axum::http::Method;
use cairn_http::access::{Need, Role, Rule};

/// What each route needs, on the object `/vault/<repository id>` (see the module docs):
/// `audit` reads lists, states and reports, `backup` writes sessions and reads recipes (an
/// incremental needs its parent's) and may ask for a lock on the snapshot it commits, `restore` reads data and recipes;
/// forget, prune, GC, the retention policy and locks on existing snapshots need `admin`
/// (a lock pins storage: a backup client must not pin what it did not write).
pub fn access_rule(repo_id: &str) -> Rule {
    use Role::{Audit, Backup, Restore};
    let object = format!("/vault/{repo_id}");
    Arc::new(move |m: &Method, path: &str| {
        let p: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (roles, quiet): (&'static [Role], bool) = match (m.as_str(), &p[..]) {
            (
                "GET",
                [
                    "v1",
                    "config" | "stats" | "snapshots" | "damaged" | "locks" | "retention",
                ],
            )
            | ("GET", ["v1", "snapshots", _]) => (&[Audit, Backup, Restore], false),
            ("GET", ["v1", "snapshots", _, "entries"]) => (&[Backup, Restore], false),
            ("GET", ["v1", "snapshots", _, "data"]) | ("POST", ["v1", "fetch" | "fetch-near"]) => {
                (&[Restore], false)
            }
            ("POST", ["v1", "sessions"])
            | ("POST", ["v1", "sessions", _, "commit"])
            | ("DELETE", ["v1", "sessions", _]) => (&[Backup], false),
            ("POST", ["v1", "sessions", _, "keepalive" | "lacking" | "blobs"]) => (&[Backup], true),
            ("POST", ["v1", "verify"]) => (&[Audit], false),
            _ => (&[], false),
        };
        Need {
            quiet,
            ..Need::on(roles, object.clone())
        }
    })
}
