//! The fault matrix: every role dies (SIGKILL, or a fault point that dies the same way) at a
//! phase of a backup, a restore, a prune or GC, loses its peer over the network, or finds the
//! datastore full; then it is restarted and the invariants are checked:
//!
//! - the vault verifies (through the service, reading every segment);
//! - every backup committed before the fault is still listed (a prune keeps the newest), and
//!   every listed backup restores (its vault snapshots exist); a pruned backup's snapshots
//!   leave the vault;
//! - a failed restore leaves no disk (partial or whole) in the datastore, and the same restore
//!   then succeeds;
//! - nothing is left behind: no VM snapshot on the host, no open vault session, no lock, no
//!   more storage-unit snapshots than a clean backup keeps;
//! - the next backup succeeds.
//!
//! The suite prints the matrix (role × phase → outcome). Each row needs one backup of a tiny
//! guest, so the whole matrix runs in a few minutes; `CAIRN_FAULT_ROWS=a,b` runs only the rows
//! whose names contain one of the words, `CAIRN_FAULT_ROUNDS=N` runs it N times over (the
//! longer form, outside CI).

mod checks;
mod relay;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;
use checks::*;
use relay::Relay;

/// How a row makes its role fail.
enum Fault {
    /// Restart the role with `CAIRN_FAULT_POINT` set to this point.
    Point(&'static str),
    /// SIGKILL the role while the backup holds its VM snapshot.
    KillWhileHolding,
    /// Cut every connection between the storage agent and the vault while the backup runs.
    CutVaultLink,
    /// Cut every connection between the server and the manager while the backup holds the
    /// VM snapshot (its release then waits for the link).
    CutManagerLink,
    /// SIGKILL the role while the storage agent stands after the first batch of a restore
    /// (a restore that starts the VM when the role is the manager or a host agent).
    KillMidRestore,
    /// Fill the datastore to its last MiB, run the flow, free the space.
    FullDatastore,
    /// SIGKILL the VM's QEMU while the backup holds its VM snapshot; the VM is then started
    /// again on its disk (its dirty bitmap comes back inconsistent).
    KillQemu,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Vault,
    Storage,
    Host,
    Manager,
    Server,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    Backup,
    Gc,
    /// Restore the newest backup as a new VM `vm1-r` (not started).
    Restore,
    /// `keep_last: 1` for vm1, then a prune job.
    Prune,
}

struct Row {
    name: &'static str,
    role: Role,
    fault: Fault,
    flow: Flow,
}

fn rows() -> Vec<Row> {
    use Fault::*;
    use Role::*;
    let r = |name, role, fault, flow| Row {
        name,
        role,
        fault,
        flow,
    };
    vec![
        r(
            "vault: killed while the backup holds the VM snapshot",
            Vault,
            KillWhileHolding,
            Flow::Backup,
        ),
        r(
            "vault: dies before writing the manifest",
            Vault,
            Point("vault.commit.before_manifest"),
            Flow::Backup,
        ),
        r(
            "vault: GC dies after writing repacked containers",
            Vault,
            Point("vault.gc.after_repack"),
            Flow::Gc,
        ),
        r(
            "vault: GC dies after rewriting the index",
            Vault,
            Point("vault.gc.after_index"),
            Flow::Gc,
        ),
        r(
            "storage agent: killed while the backup holds the VM snapshot",
            Storage,
            KillWhileHolding,
            Flow::Backup,
        ),
        r(
            "storage agent: dies after the storage-unit snapshot",
            Storage,
            Point("storage.backup.after_unit_snapshot"),
            Flow::Backup,
        ),
        r(
            "storage agent: dies with every segment sent, before commit",
            Storage,
            Point("storage.backup.before_commit"),
            Flow::Backup,
        ),
        r(
            "storage agent: link to the vault cut mid-backup",
            Storage,
            CutVaultLink,
            Flow::Backup,
        ),
        r(
            "host agent: dies after the VM snapshot, before answering",
            Host,
            Point("host.snapshot.after_snapshot"),
            Flow::Backup,
        ),
        r(
            "host agent: killed while the backup holds the VM snapshot",
            Host,
            KillWhileHolding,
            Flow::Backup,
        ),
        r(
            "manager: killed while the backup holds the VM snapshot",
            Manager,
            KillWhileHolding,
            Flow::Backup,
        ),
        r(
            "server: killed while the backup holds the VM snapshot",
            Server,
            KillWhileHolding,
            Flow::Backup,
        ),
        r(
            "storage agent: dies during a restore, before the disk is complete",
            Storage,
            Point("storage.restore.before_rename"),
            Flow::Restore,
        ),
        r(
            "QEMU: killed while the backup holds the VM snapshot",
            Host,
            KillQemu,
            Flow::Backup,
        ),
        r(
            "server: link to the manager cut while the backup holds the VM snapshot",
            Server,
            CutManagerLink,
            Flow::Backup,
        ),
        r(
            "vault: killed while a restore reads from it",
            Vault,
            KillMidRestore,
            Flow::Restore,
        ),
        r(
            "server: killed during a restore",
            Server,
            KillMidRestore,
            Flow::Restore,
        ),
        r(
            "manager: killed during a restore that starts the VM",
            Manager,
            KillMidRestore,
            Flow::Restore,
        ),
        r(
            "host agent: killed during a restore that starts the VM",
            Host,
            KillMidRestore,
            Flow::Restore,
        ),
        r(
            "storage agent: datastore full during a restore",
            Storage,
            FullDatastore,
            Flow::Restore,
        ),
        r(
            "storage agent: datastore full during a backup",
            Storage,
            FullDatastore,
            Flow::Backup,
        ),
        // Prunes last: each leaves vm1 with its newest backup only.
        r(
            "server: dies during a prune, between catalog and vault",
            Server,
            Point("server.prune.before_forget"),
            Flow::Prune,
        ),
        r(
            "vault: dies during a prune, after forgetting a snapshot",
            Vault,
            Point("vault.forget.after_first"),
            Flow::Prune,
        ),
    ]
}

/// Waits (up to a minute) until the manager sees the VM running on its host again (after an
/// agent or the manager restarted).
fn wait_agents(m: &cairn_http::Client) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        let ok = m
            .get_json::<Value>("/v1/vms/vm1")
            .is_ok_and(|v| v["state"] == "running");
        if ok {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

/// What the matrix runs on: the cluster, its relays, and how the server is started.
struct Bench<'a> {
    c: Cluster,
    t: &'a std::path::Path,
    /// Between the storage agent (and the server) and the vault.
    vault_relay: Relay,
    /// Between the server and the manager.
    manager_relay: Relay,
    spec: Value,
    /// The datastore is a tmpfs the matrix can fill (root only).
    small_ds: bool,
}

impl Bench<'_> {
    fn server_args(&self) -> Vec<String> {
        let p = |s: &str| self.t.join(s).display().to_string();
        let mut a: Vec<String> = [
            "server",
            "--state-dir",
            &p("server"),
            "--listen",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        for (role, relay, svc) in [
            ("manager", &self.manager_relay, &self.c.manager),
            ("vault", &self.vault_relay, &self.c.vault),
        ] {
            a.extend([
                format!("--{role}"),
                format!("https://{}", relay.addr),
                format!("--{role}-fingerprint"),
                svc.fp().into(),
                format!("--{role}-token-file"),
                svc.token_file().into(),
            ]);
        }
        a
    }

    fn svc(&mut self, role: Role) -> &mut Service {
        match role {
            Role::Vault => &mut self.c.vault,
            Role::Storage => &mut self.c.storage,
            Role::Host => &mut self.c.host,
            Role::Manager => &mut self.c.manager,
            Role::Server => &mut self.c.server,
        }
    }

    /// Restarts `role` with `env` (the server keeps its relay flags).
    fn restart_with(&mut self, role: Role, env: &[(&str, &str)]) {
        if role == Role::Server {
            self.c.server.stop();
            let a = self.server_args();
            self.c.server =
                Service::start_env(&a.iter().map(String::as_str).collect::<Vec<_>>(), env);
            return;
        }
        let svc = self.svc(role);
        svc.stop();
        // The vault and the manager keep their addresses: peers were started with them.
        if matches!(role, Role::Vault | Role::Manager) {
            svc.restart_same_address(env);
        } else {
            svc.restart(env);
        }
    }
}

#[test]
fn fault_matrix() {
    let Some(g) = guest_test() else { return };
    let only: Vec<String> = std::env::var("CAIRN_FAULT_ROWS")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let t = g.tmp.path();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds")).unwrap();
    std::fs::create_dir_all(t.join("vault")).unwrap();
    // The datastore on a small tmpfs, to fill up in the full-datastore rows.
    let small = small_tmpfs(&t.join("ds"), "160m", "the full-datastore rows");
    let small_ds = small.is_some();
    let c = Cluster::start(t, &p("vault/repo"), true);
    // The server reaches the vault and the manager through relays the test can cut; the
    // storage agent gets the vault's address from the server, so that relay also sits
    // between storage and vault.
    let vault_relay = Relay::start(c.vault.url().trim_start_matches("https://"));
    let manager_relay = Relay::start(c.manager.url().trim_start_matches("https://"));
    let spec = json!({
        "name": "vm1", "vcpus": 1, "memory_mib": 128,
        "disks": [{"id": "vda", "path": disk(t, "vm1"), "format": "qcow2"}],
        "boot": g.boot(),
    });
    let mut b = Bench {
        c,
        t,
        vault_relay,
        manager_relay,
        spec,
        small_ds,
    };
    b.restart_with(Role::Server, &[]);
    let m = b.c.manager.client();
    let _: Value = m.post_json("/v1/hosts/h1/vms", &b.spec).unwrap();
    let _reaper = VmReaper(t.join("host"));
    wait_guest(&m, "vm1");
    // Enough data that a restore fetches it in several batches.
    guest_exec(&m, "vm1", "head -c 12582912 /dev/urandom > /mnt/big; sync");
    let j = submit(&b.c.server.client(), "/v1/backups", json!({"vms": ["vm1"]}));
    assert_eq!(j["state"], "succeeded", "{j}");
    let steady_unit_snaps = storage_unit_snapshots(&b.c.storage);

    // `CAIRN_FAULT_ROUNDS=N` runs the whole matrix N times (outside CI: each round meets the
    // repository, the catalog and the agents as the rounds before left them).
    let rounds: usize = std::env::var("CAIRN_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut matrix: Vec<(String, String, String)> = Vec::new();
    for (round, row) in (0..rounds).flat_map(|r| rows().into_iter().map(move |row| (r, row))) {
        if !only.is_empty() && !only.iter().any(|w| row.name.contains(w.as_str())) {
            continue;
        }
        if matches!(row.fault, Fault::FullDatastore) && !b.small_ds {
            matrix.push((
                row.name.into(),
                "SKIPPED".into(),
                "no tmpfs (not root)".into(),
            ));
            continue;
        }
        let name = if rounds > 1 {
            format!("{} (round {})", row.name, round + 1)
        } else {
            row.name.to_string()
        };
        eprintln!("fault matrix: {name}");
        if row.flow == Flow::Prune {
            // Two more backups, so that the prune forgets several.
            let s = b.c.server.client();
            for _ in 0..2 {
                let _ = submit(&s, "/v1/backups", json!({"vms": ["vm1"]}));
            }
            let _: Value = s
                .put_json("/v1/retention/vm1", &json!({"keep_last": 1}))
                .unwrap();
        }
        let before: Vec<Value> = backups(&b.c);
        let mut committed: Vec<String> = before
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        let outcome = run_row(&mut b, &row);
        b.vault_relay.cut.store(false, Ordering::SeqCst);
        b.manager_relay.cut.store(false, Ordering::SeqCst);
        // Everything back up, faults disarmed: the row's role and the server start afresh
        // (a point or pause that was not reached is still armed), any other dead role
        // restarts.
        for role in [
            Role::Vault,
            Role::Storage,
            Role::Host,
            Role::Manager,
            Role::Server,
        ] {
            let alive = b.svc(role).client().get_bytes("/health").is_ok();
            if alive && role != row.role && role != Role::Server {
                continue;
            }
            b.restart_with(role, &[]);
        }
        if matches!(row.fault, Fault::KillQemu) {
            // The VM is started again on its disk, as an operator would.
            start_again(&b.c.manager.client(), "vm1", &b.spec);
        }
        if !wait_agents(&b.c.manager.client()) {
            eprintln!("fault matrix: {name} → {outcome}: agents never came back");
            matrix.push((name, outcome, "agents never came back".into()));
            continue;
        }
        let s = b.c.server.client();
        // A killed server's jobs fail at restart; wait until nothing runs.
        let t0 = Instant::now();
        while jobs_running(&s) {
            assert!(t0.elapsed() < Duration::from_secs(120), "jobs never settle");
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut extra = Vec::new();
        if outcome.contains("without saying") {
            extra.push(outcome.clone());
        }
        if row.flow == Flow::Prune {
            // Retention stays off for the rows after this one; the prune keeps the newest.
            let _: Value = s
                .put_json("/v1/retention/vm1", &json!({"keep_last": 100000}))
                .unwrap();
            committed = committed.split_off(committed.len().saturating_sub(1));
            extra.extend(check_pruned(&b.c, &before, &committed));
        }
        if row.flow == Flow::Restore {
            extra.extend(check_restore(&b.c, t, &outcome));
        }
        let partial: Vec<_> = walk_files(&t.join("ds"))
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".cairn-partial"))
            .collect();
        if !partial.is_empty() {
            extra.push(format!("partial restores left: {partial:?}"));
        }
        let mut checks = check_invariants(
            &b.c,
            &t.join("vault/repo"),
            &t.join("host"),
            &committed,
            steady_unit_snaps,
        );
        if !extra.is_empty() {
            if checks == "ok" {
                checks = extra.join("; ");
            } else {
                checks = format!("{checks}; {}", extra.join("; "));
            }
        }
        eprintln!("fault matrix: {name} → {outcome}: {checks}");
        matrix.push((name, outcome, checks));
    }
    eprintln!("\nfault matrix (role: phase → outcome; checks after restart)");
    for (name, outcome, checks) in &matrix {
        eprintln!("  {name:<72} → {outcome:<28} {checks}");
    }
    let bad: Vec<_> = matrix
        .iter()
        .filter(|r| r.2 != "ok" && r.1 != "SKIPPED")
        .collect();
    assert!(bad.is_empty(), "rows with broken invariants: {bad:#?}");
}

fn jobs_running(s: &cairn_http::Client) -> bool {
    s.get_json::<Value>("/v1/jobs")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["state"] == "running" || j["state"] == "queued")
}

/// Runs one row's flow under its fault; returns what the flow's job (or command) ended as.
fn run_row(b: &mut Bench<'_>, row: &Row) -> String {
    match (&row.fault, row.flow) {
        (Fault::Point(point), Flow::Backup) => {
            b.restart_with(row.role, &[("CAIRN_FAULT_POINT", point)]);
            if row.role != Role::Manager && row.role != Role::Server {
                assert!(wait_agents(&b.c.manager.client()), "agents never came back");
            }
            let body = if point.contains("unit_snapshot") {
                json!({"vms": ["vm1"], "group": true})
            } else {
                json!({"vms": ["vm1"]})
            };
            job_outcome(&submit(&b.c.server.client(), "/v1/backups", body))
        }
        (Fault::Point(point), Flow::Restore) => {
            b.restart_with(row.role, &[("CAIRN_FAULT_POINT", point)]);
            assert!(wait_agents(&b.c.manager.client()), "agents never came back");
            job_outcome(&restore_newest(&b.c, false))
        }
        (Fault::Point(point), Flow::Prune) => {
            b.restart_with(row.role, &[("CAIRN_FAULT_POINT", point)]);
            let s = b.c.server.client();
            let Ok(j) = s.post_json::<_, Value>("/v1/prune", &json!({"vms": ["vm1"]})) else {
                return "prune refused".into();
            };
            let id = j["id"].as_str().unwrap().to_string();
            if row.role == Role::Server {
                let t0 = Instant::now();
                while s.get_bytes("/health").is_ok() && t0.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                return "server died mid-job".into();
            }
            job_outcome(&wait_job(&s, &id))
        }
        (Fault::Point(point), Flow::Gc) => {
            // Garbage first: a backup whose manifest is never written leaves unreferenced
            // containers behind.
            b.restart_with(
                Role::Vault,
                &[("CAIRN_FAULT_POINT", "vault.commit.before_manifest")],
            );
            let _ = submit(&b.c.server.client(), "/v1/backups", json!({"vms": ["vm1"]}));
            b.restart_with(Role::Vault, &[("CAIRN_FAULT_POINT", point)]);
            let url = b.c.vault.url().to_string();
            let (ok, plan) = vault_cli(&b.c.vault, &["repo", "gc", &url, "--json"]);
            if ok {
                format!(
                    "gc completed ({} deleted)",
                    plan["delete"].as_array().map_or(0, |d| d.len())
                )
            } else {
                "gc died".into()
            }
        }
        (Fault::KillWhileHolding, _) => {
            let (s, id) = held_backup(b, 4000);
            b.svc(row.role).kill();
            if row.role == Role::Server {
                return "server killed mid-job".into();
            }
            job_outcome(&wait_job(&s, &id))
        }
        (Fault::KillQemu, _) => {
            let (s, id) = held_backup(b, 4000);
            kill_qemu(b.t, "vm1");
            job_outcome(&wait_job(&s, &id))
        }
        (Fault::CutVaultLink, _) => {
            let (s, id) = held_backup(b, 2000);
            b.vault_relay.cut.store(true, Ordering::SeqCst);
            let out = job_outcome(&wait_job(&s, &id));
            b.vault_relay.cut.store(false, Ordering::SeqCst);
            out
        }
        (Fault::CutManagerLink, _) => {
            let (s, id) = held_backup(b, 2000);
            b.manager_relay.cut.store(true, Ordering::SeqCst);
            let out = job_outcome(&wait_job(&s, &id));
            b.manager_relay.cut.store(false, Ordering::SeqCst);
            out
        }
        (Fault::KillMidRestore, _) => {
            b.restart_with(
                Role::Storage,
                &[(
                    "CAIRN_FAULT_PAUSE",
                    "storage.restore.after_first_batch:5000",
                )],
            );
            assert!(wait_agents(&b.c.manager.client()), "agents never came back");
            let start = matches!(row.role, Role::Manager | Role::Host);
            let s = b.c.server.client();
            let j: Value = s
                .post_json("/v1/restores", &restore_body(&b.c, start))
                .unwrap();
            let id = j["id"].as_str().unwrap().to_string();
            // The storage agent stands after its first batch while the partial disk exists.
            let t0 = Instant::now();
            while !walk_files(&b.t.join("ds"))
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".cairn-partial"))
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "restore never began"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(300));
            b.svc(row.role).kill();
            if row.role == Role::Server {
                return "server killed mid-job".into();
            }
            job_outcome(&wait_job(&s, &id))
        }
        (Fault::FullDatastore, flow) => {
            let filler = b.t.join("ds").join("filler");
            fill(&b.t.join("ds"), &filler);
            let out = if flow == Flow::Restore {
                let j = restore_newest(&b.c, false);
                // The storage agent says why: the datastore is full (507), not an internal error.
                let why = j["error"].as_str().unwrap_or("");
                if j["state"] == "failed" && !why.contains("insufficient_storage") {
                    format!("job failed without saying the datastore is full: {why}")
                } else {
                    job_outcome(&j)
                }
            } else {
                job_outcome(&submit(
                    &b.c.server.client(),
                    "/v1/backups",
                    json!({"vms": ["vm1"]}),
                ))
            };
            std::fs::remove_file(&filler).unwrap();
            out
        }
    }
}

/// Fills the file system of `dir` with `filler` to its last MiB.
fn fill(dir: &std::path::Path, filler: &std::path::Path) {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    let avail: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap();
    let len = avail.saturating_sub(1 << 20);
    assert!(
        Command::new("fallocate")
            .args(["-l", &len.to_string()])
            .arg(filler)
            .status()
            .unwrap()
            .success()
    );
}

/// Starts a backup on a server that pauses `pause_ms` after the VM snapshot, and waits until
/// the job holds it; the server's client and the job id.
fn held_backup(b: &mut Bench<'_>, pause_ms: u64) -> (cairn_http::Client, String) {
    let pause = pause_ms.to_string();
    b.restart_with(
        Role::Server,
        &[("CAIRN_FAULT_PAUSE_AFTER_VM_SNAPSHOT_MS", &pause)],
    );
    let s = b.c.server.client();
    let j: Value = s
        .post_json("/v1/backups", &json!({"vms": ["vm1"]}))
        .unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    wait_hold(&s, &id);
    (s, id)
}

fn job_outcome(j: &Value) -> String {
    match j["state"].as_str() {
        Some("failed") => "job failed".into(),
        Some(s) => format!("job {s}"),
        None => "no job".into(),
    }
}
