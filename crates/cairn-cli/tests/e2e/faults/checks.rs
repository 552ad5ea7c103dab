//! What the fault matrix checks after every row: the invariants, and the vault's view.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

pub fn vault_env(vault: &Service) -> Vec<(String, String)> {
    vec![
        (
            "CAIRN_TOKEN".into(),
            std::fs::read_to_string(vault.token_file())
                .unwrap()
                .trim()
                .to_string(),
        ),
        ("CAIRN_FINGERPRINT".into(), vault.fp().to_string()),
    ]
}

/// `cairn ARGS` with the vault's credentials; (success, stdout as JSON or Null).
pub fn vault_cli(vault: &Service, args: &[&str]) -> (bool, Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .envs(vault_env(vault))
        .output()
        .unwrap();
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
    )
}

pub fn storage_unit_snapshots(storage: &Service) -> usize {
    list_len(&storage.client(), "/v1/snapshots")
}

pub fn open_sessions(vault: &Service) -> u64 {
    let v: Value = vault.client().get_json("/v1/stats").unwrap();
    v["open_sessions"].as_u64().unwrap_or(0)
}

pub fn walk_files(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The invariants after a fault and the restart of every role; "ok" or what is broken.
pub fn check_invariants(
    c: &Cluster,
    repo: &std::path::Path,
    host_state: &std::path::Path,
    committed: &[String],
    steady_unit_snaps: usize,
) -> String {
    let mut broken = Vec::new();
    let s = c.server.client();
    // A release that failed while its peer was away is retried every few seconds; a VM
    // snapshot leaves the host agent's list when its deletion starts, its fleecing and
    // overlay files when the deletion ends.
    let scratch = || walk_files(&host_state.join("scratch"));
    let t0 = Instant::now();
    while (host_snapshots(&c.host) != 0 || !scratch().is_empty())
        && t0.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    if host_snapshots(&c.host) != 0 {
        broken.push("a VM snapshot is left".to_string());
    } else if !scratch().is_empty() {
        broken.push(format!("scratch files left: {:?}", scratch()));
    }
    let units = storage_unit_snapshots(&c.storage);
    if units > steady_unit_snaps {
        broken.push(format!(
            "{units} storage-unit snapshots (steady state {steady_unit_snaps})"
        ));
    }
    let now = backups(c);
    for id in committed {
        if !now.iter().any(|b| b["id"] == id.as_str()) {
            broken.push(format!("committed backup {id} is gone"));
        }
    }
    let url = c.vault.url().to_string();
    let (_, list) = vault_cli(&c.vault, &["image", "list", "--repo", &url, "--json"]);
    let snaps: Vec<&str> = list
        .as_array()
        .map(|l| l.iter().filter_map(|s| s["id"].as_str()).collect())
        .unwrap_or_default();
    // Every backup the catalog lists restores: none names a vault snapshot that is gone.
    for b in &now {
        for d in b["disks"].as_array().into_iter().flatten() {
            if let Some(v) = d["vault_snapshot"].as_str()
                && !snaps.contains(&v)
            {
                broken.push(format!(
                    "vault snapshot {v} of listed backup {} is gone",
                    b["id"]
                ));
            }
        }
    }
    let (ok, rep) = vault_cli(&c.vault, &["repo", "verify", &url, "--json"]);
    if !ok {
        broken.push(format!("vault does not verify: {}", rep["damage"]));
    }
    // A dead client's session ends with its lease; the next backup must not wait for it.
    let j = submit(&s, "/v1/backups", json!({"vms": ["vm1"]}));
    if j["state"] != "succeeded" {
        broken.push(format!("next backup: {}", j["error"]));
    }
    let t0 = Instant::now();
    while open_sessions(&c.vault) > 0 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(300));
    }
    if open_sessions(&c.vault) > 0 {
        broken.push("a vault session is still open".into());
    }
    // A session's lock goes a moment after the session itself.
    let locks = || -> Vec<String> {
        std::fs::read_dir(repo.join("locks"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    };
    let t0 = Instant::now();
    while !locks().is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(300));
    }
    let left = locks();
    if !left.is_empty() && open_sessions(&c.vault) == 0 {
        broken.push(format!("repository locks left: {left:?}"));
    }
    if broken.is_empty() {
        "ok".into()
    } else {
        broken.join("; ")
    }
}

/// The files of the restored VM `vm1-r` in the datastore (its disks, whole or partial).
fn restored_files(t: &std::path::Path) -> Vec<std::path::PathBuf> {
    walk_files(&t.join("ds"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vm1-r")
        })
        .collect()
}

/// Removes `vm1-r` (the VM, if defined, and its disks) for the next rows.
fn remove_restored(c: &Cluster, t: &std::path::Path) {
    let _ = c.manager.client().delete_json::<Value>("/v1/vms/vm1-r");
    for p in restored_files(t) {
        let _ = std::fs::remove_file(p);
    }
}

/// After a restore row: a restore that failed took its disks away (at once, or once its
/// peers were back); the same restore then succeeds. Problems found, if any.
pub fn check_restore(c: &Cluster, t: &std::path::Path, outcome: &str) -> Vec<String> {
    let mut broken = Vec::new();
    if outcome != "job succeeded" {
        let t0 = Instant::now();
        while !restored_files(t).is_empty() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(300));
        }
        let vm_defined = c
            .manager
            .client()
            .get_json::<Value>("/v1/vms/vm1-r")
            .is_ok();
        let left = restored_files(t);
        if !left.is_empty() && !vm_defined {
            broken.push(format!("a failed restore left its disks: {left:?}"));
        }
    }
    remove_restored(c, t);
    let j = restore_newest(c, false);
    if j["state"] != "succeeded" {
        broken.push(format!("restore again: {}", j["error"]));
    }
    remove_restored(c, t);
    broken
}

/// After a prune row: the vault snapshots of the backups it pruned leave the vault (at
/// once, or once the server or the vault is back). Problems found, if any.
pub fn check_pruned(c: &Cluster, before: &[Value], kept: &[String]) -> Vec<String> {
    let now: Vec<String> = backups(c)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    let mut broken: Vec<String> = kept
        .iter()
        .filter(|k| !now.contains(k))
        .map(|k| format!("the newest backup {k} was pruned"))
        .collect();
    let pruned: Vec<String> = before
        .iter()
        .filter(|b| !now.contains(&b["id"].as_str().unwrap().to_string()))
        .flat_map(|b| b["disks"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d["vault_snapshot"].as_str().map(str::to_string))
        .collect();
    if pruned.is_empty() {
        broken.push("the prune forgot nothing".into());
    }
    let url = c.vault.url().to_string();
    let t0 = Instant::now();
    loop {
        let (_, list) = vault_cli(&c.vault, &["image", "list", "--repo", &url, "--json"]);
        let left: Vec<String> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["id"].as_str().map(str::to_string))
            .filter(|id| pruned.contains(id))
            .collect();
        if left.is_empty() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            broken.push(format!("vault snapshots of pruned backups left: {left:?}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    broken
}

/// vm1's backups as the server lists them, oldest first.
pub fn backups(c: &Cluster) -> Vec<Value> {
    c.server
        .client()
        .get_json::<Value>("/v1/backups?vm=vm1")
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The body of a restore of vm1's newest backup as `vm1-r`.
pub fn restore_body(c: &Cluster, start: bool) -> Value {
    let newest = backups(c).pop().unwrap();
    json!({"backup": newest["id"], "as_name": "vm1-r", "start": start})
}

/// Restores vm1's newest backup as `vm1-r`; the finished job.
pub fn restore_newest(c: &Cluster, start: bool) -> Value {
    submit(&c.server.client(), "/v1/restores", restore_body(c, start))
}
