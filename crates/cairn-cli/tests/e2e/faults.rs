//! The fault matrix: every role dies (SIGKILL, or a fault point that dies the same way) at a
//! phase of a backup or of GC, or loses its peer over the network; then it is restarted and
//! the invariants are checked:
//!
//! - the vault verifies (through the service, reading every segment);
//! - every backup committed before the fault is still listed and restores (its vault
//!   snapshots exist);
//! - nothing is left behind: no VM snapshot on the host, no open vault session, no lock, no
//!   more storage-unit snapshots than a clean backup keeps;
//! - the next backup succeeds.
//!
//! The suite prints the matrix (role × phase → outcome). Each row needs one backup of a tiny
//! guest, so the whole matrix runs in a few minutes; `CAIRN_FAULT_ROWS=a,b` runs only the rows
//! whose names contain one of the words.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

/// How a row makes its role fail.
enum Fault {
    /// Restart the role with `CAIRN_FAULT_POINT` set to this point.
    Point(&'static str),
    /// SIGKILL the role while the backup holds its VM snapshot.
    KillWhileHolding,
    /// Cut every connection between the storage agent and the vault while the backup runs.
    CutVaultLink,
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
    ]
}

/// A TCP relay the test controls: forwards to `target` until `cut` is set, which closes every
/// connection it carries and refuses new ones until cleared.
struct Relay {
    addr: String,
    cut: Arc<AtomicBool>,
}

impl Relay {
    fn start(target: &str) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let (target, c) = (target.to_string(), cut.clone());
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the peer sees a reset
                }
                let Ok(up) = TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, conn),
                ] {
                    let c = c.clone();
                    from.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            if c.load(Ordering::SeqCst) {
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => {
                                    let _ = to.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        Self { addr, cut }
    }
}

fn vault_env(vault: &Service) -> Vec<(String, String)> {
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
fn vault_cli(vault: &Service, args: &[&str]) -> (bool, Value) {
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

fn storage_unit_snapshots(storage: &Service) -> usize {
    list_len(&storage.client(), "/v1/snapshots")
}

fn open_sessions(vault: &Service) -> u64 {
    let v: Value = vault.client().get_json("/v1/stats").unwrap();
    v["open_sessions"].as_u64().unwrap_or(0)
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
    let mut c = Cluster::start(t, &p("vault/repo"), true);
    // The server reaches the vault through a relay the test can cut; the storage agent gets
    // the vault's address from the server, so the relay sits between storage and vault.
    let relay = Relay::start(c.vault.url().trim_start_matches("https://"));
    let relay_url = format!("https://{}", relay.addr);
    let server_args = |c: &Cluster| -> Vec<String> {
        let mut a: Vec<String> = [
            "server",
            "--state-dir",
            &p("server"),
            "--listen",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        a.extend(c.manager.flags_for("manager"));
        a.extend([
            "--vault".into(),
            relay_url.clone(),
            "--vault-fingerprint".into(),
            c.vault.fp().into(),
            "--vault-token-file".into(),
            c.vault.token_file().into(),
        ]);
        a
    };
    c.server.stop();
    let args = server_args(&c);
    c.server = Service::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let m = c.manager.client();
    let spec = json!({
        "name": "vm1", "vcpus": 1, "memory_mib": 128,
        "disks": [{"id": "vda", "path": disk(t, "vm1"), "format": "qcow2"}],
        "boot": g.boot(),
    });
    let _: Value = m.post_json("/v1/hosts/h1/vms", &spec).unwrap();
    wait_guest(&m, "vm1");
    let j = submit(&c.server.client(), "/v1/backups", json!({"vms": ["vm1"]}));
    assert_eq!(j["state"], "succeeded", "{j}");
    let steady_unit_snaps = storage_unit_snapshots(&c.storage);

    let mut matrix: Vec<(String, String, String)> = Vec::new();
    for row in rows() {
        if !only.is_empty() && !only.iter().any(|w| row.name.contains(w.as_str())) {
            continue;
        }
        eprintln!("fault matrix: {}", row.name);
        let s = c.server.client();
        let committed: Vec<String> = s
            .get_json::<Value>("/v1/backups?vm=vm1")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        let outcome = run_row(&mut c, &row, &relay, &server_args, t);
        // Everything back up, faults disarmed: the row's role and the server start afresh
        // (a point that was not reached is still armed), any other dead role restarts.
        for role in [
            Role::Vault,
            Role::Storage,
            Role::Host,
            Role::Manager,
            Role::Server,
        ] {
            let alive = service(&mut c, role).client().get_bytes("/health").is_ok();
            if alive && role != row.role && role != Role::Server {
                continue;
            }
            restart_with(&mut c, role, &[], &server_args);
        }
        relay.cut.store(false, Ordering::SeqCst);
        if matches!(row.fault, Fault::KillQemu) {
            // The VM is started again on its disk, as an operator would.
            start_again(&c.manager.client(), "vm1", &spec);
        }
        if !wait_agents(&c.manager.client()) {
            eprintln!(
                "fault matrix: {} → {outcome}: agents never came back",
                row.name
            );
            matrix.push((
                row.name.to_string(),
                outcome,
                "agents never came back".into(),
            ));
            continue;
        }
        let s = c.server.client();
        // A killed server's jobs fail at restart; wait until nothing runs.
        let t0 = Instant::now();
        while s
            .get_json::<Value>("/v1/jobs")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["state"] == "running" || j["state"] == "queued")
        {
            assert!(t0.elapsed() < Duration::from_secs(120), "jobs never settle");
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut checks = check_invariants(&c, &t.join("vault/repo"), &committed, steady_unit_snaps);
        let partial: Vec<_> = walk_files(&t.join("ds"))
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".cairn-partial"))
            .collect();
        if !partial.is_empty() {
            checks = format!("{checks}; partial restores left: {partial:?}");
        }
        if row.flow == Flow::Restore {
            // The same restore again succeeds; then it is removed for the next rows.
            let j = restore_newest(&c);
            if j["state"] != "succeeded" {
                checks = format!("{checks}; restore again: {}", j["error"]);
            }
            let _ = c.manager.client().delete_json::<Value>("/v1/vms/vm1-r");
            for p in walk_files(&t.join("ds")) {
                if p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("vm1-r")
                {
                    std::fs::remove_file(p).unwrap();
                }
            }
        }
        eprintln!("fault matrix: {} → {outcome}: {checks}", row.name);
        matrix.push((row.name.to_string(), outcome, checks));
    }
    eprintln!("\nfault matrix (role: phase → outcome; checks after restart)");
    for (name, outcome, checks) in &matrix {
        eprintln!("  {name:<64} → {outcome:<28} {checks}");
    }
    let bad: Vec<_> = matrix.iter().filter(|r| r.2 != "ok").collect();
    assert!(bad.is_empty(), "rows with broken invariants: {bad:#?}");
}

fn service(c: &mut Cluster, role: Role) -> &mut Service {
    match role {
        Role::Vault => &mut c.vault,
        Role::Storage => &mut c.storage,
        Role::Host => &mut c.host,
        Role::Manager => &mut c.manager,
        Role::Server => &mut c.server,
    }
}

/// Runs one row's flow under its fault; returns what the flow's job (or command) ended as.
fn run_row(
    c: &mut Cluster,
    row: &Row,
    relay: &Relay,
    server_args: &dyn Fn(&Cluster) -> Vec<String>,
    t: &std::path::Path,
) -> String {
    match (&row.fault, row.flow) {
        (Fault::Point(point), Flow::Backup) => {
            restart_with(c, row.role, &[("CAIRN_FAULT_POINT", point)], server_args);
            if row.role != Role::Manager && row.role != Role::Server {
                assert!(wait_agents(&c.manager.client()), "agents never came back");
            }
            let body = if point.contains("unit_snapshot") {
                json!({"vms": ["vm1"], "group": true})
            } else {
                json!({"vms": ["vm1"]})
            };
            let j = submit(&c.server.client(), "/v1/backups", body);
            job_outcome(&j)
        }
        (Fault::Point(point), Flow::Restore) => {
            restart_with(c, row.role, &[("CAIRN_FAULT_POINT", point)], server_args);
            assert!(wait_agents(&c.manager.client()), "agents never came back");
            job_outcome(&restore_newest(c))
        }
        (Fault::Point(point), Flow::Gc) => {
            // Garbage first: a backup whose manifest is never written leaves unreferenced
            // containers behind.
            restart_with(
                c,
                Role::Vault,
                &[("CAIRN_FAULT_POINT", "vault.commit.before_manifest")],
                server_args,
            );
            let _ = submit(&c.server.client(), "/v1/backups", json!({"vms": ["vm1"]}));
            restart_with(c, Role::Vault, &[("CAIRN_FAULT_POINT", point)], server_args);
            let url = c.vault.url().to_string();
            let (ok, plan) = vault_cli(&c.vault, &["repo", "gc", &url, "--json"]);
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
            let (s, id) = held_backup(c, 4000, server_args);
            service(c, row.role).kill();
            if row.role == Role::Server {
                return "server killed mid-job".into();
            }
            job_outcome(&wait_job(&s, &id))
        }
        (Fault::KillQemu, _) => {
            let (s, id) = held_backup(c, 4000, server_args);
            kill_qemu(t, "vm1");
            job_outcome(&wait_job(&s, &id))
        }
        (Fault::CutVaultLink, _) => {
            let (s, id) = held_backup(c, 2000, server_args);
            relay.cut.store(true, Ordering::SeqCst);
            let out = job_outcome(&wait_job(&s, &id));
            relay.cut.store(false, Ordering::SeqCst);
            out
        }
    }
}

/// Starts a backup on a server that pauses `pause_ms` after the VM snapshot, and waits until
/// the job holds it; the server's client and the job id.
fn held_backup(
    c: &mut Cluster,
    pause_ms: u64,
    server_args: &dyn Fn(&Cluster) -> Vec<String>,
) -> (cairn_http::Client, String) {
    let pause = pause_ms.to_string();
    restart_with(
        c,
        Role::Server,
        &[("CAIRN_FAULT_PAUSE_AFTER_VM_SNAPSHOT_MS", &pause)],
        server_args,
    );
    let s = c.server.client();
    let j: Value = s
        .post_json("/v1/backups", &json!({"vms": ["vm1"]}))
        .unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    wait_hold(&s, &id);
    (s, id)
}

/// Restores vm1's newest backup as `vm1-r`, not started; the finished job.
fn restore_newest(c: &Cluster) -> Value {
    let s = c.server.client();
    let backups: Value = s.get_json("/v1/backups?vm=vm1").unwrap();
    let newest = backups.as_array().unwrap().last().unwrap(); // oldest first
    submit(
        &s,
        "/v1/restores",
        json!({"backup": newest["id"], "as_name": "vm1-r", "start": false}),
    )
}

fn walk_files(d: &std::path::Path) -> Vec<std::path::PathBuf> {
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

fn job_outcome(j: &Value) -> String {
    match j["state"].as_str() {
        Some("failed") => "job failed".into(),
        Some(s) => format!("job {s}"),
        None => "no job".into(),
    }
}

/// Restarts `role` with `env` (the server keeps its relay flags).
fn restart_with(
    c: &mut Cluster,
    role: Role,
    env: &[(&str, &str)],
    server_args: &dyn Fn(&Cluster) -> Vec<String>,
) {
    if role == Role::Server {
        c.server.stop();
        let a = server_args(c);
        c.server = Service::start_env(&a.iter().map(String::as_str).collect::<Vec<_>>(), env);
        return;
    }
    let svc = service(c, role);
    svc.stop();
    // The vault and the manager keep their addresses: peers were started with them.
    if matches!(role, Role::Vault | Role::Manager) {
        svc.restart_same_address(env);
    } else {
        svc.restart(env);
    }
}

/// The invariants after a fault and the restart of every role; "ok" or what is broken.
fn check_invariants(
    c: &Cluster,
    repo: &std::path::Path,
    committed: &[String],
    steady_unit_snaps: usize,
) -> String {
    let mut broken = Vec::new();
    let s = c.server.client();
    // A release that failed while its peer was away is retried every few seconds.
    let t0 = Instant::now();
    while host_snapshots(&c.host) != 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(500));
    }
    if host_snapshots(&c.host) != 0 {
        broken.push("a VM snapshot is left".to_string());
    }
    let units = storage_unit_snapshots(&c.storage);
    if units > steady_unit_snaps {
        broken.push(format!(
            "{units} storage-unit snapshots (steady state {steady_unit_snaps})"
        ));
    }
    let now: Vec<Value> = s
        .get_json::<Value>("/v1/backups?vm=vm1")
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
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
    for b in now
        .iter()
        .filter(|b| committed.contains(&b["id"].as_str().unwrap_or("").to_string()))
    {
        for d in b["disks"].as_array().into_iter().flatten() {
            if let Some(v) = d["vault_snapshot"].as_str()
                && !snaps.contains(&v)
            {
                broken.push(format!("vault snapshot {v} of a committed backup is gone"));
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
    let locks = std::fs::read_dir(repo.join("locks"))
        .map(|d| d.count())
        .unwrap_or(0);
    if locks > 0 && open_sessions(&c.vault) == 0 {
        broken.push(format!("{locks} repository locks left"));
    }
    if broken.is_empty() {
        "ok".into()
    } else {
        broken.join("; ")
    }
}
