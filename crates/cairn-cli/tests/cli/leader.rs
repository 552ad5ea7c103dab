//! Two `cairn server` processes on one PostgreSQL catalog (`--catalog postgresql://...`):
//! one is active, the other on standby answers reads and refuses changes with 503; the
//! active one is killed (SIGKILL) in the middle of a job, and the standby takes over within
//! seconds, fails that job as a restart does and runs new ones. Then a clean stop hands the
//! lease over at once.
//!
//! The job in flight is a backup whose manager never answers (a listener that accepts and
//! stays silent): it waits in its first step, so it is still `running` when its server dies.
//! No QEMU, no agents.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_http::{Client, ClientError, Trust};
use cairn_testing::pg::PgServer;
use serde_json::{Value, json};

use super::{CAIRN, s};

/// A `cairn server`, killed when dropped; its log in `DIR/NAME.log`.
struct ServerProcess {
    child: Child,
    client: Client,
    log: std::path::PathBuf,
}

impl ServerProcess {
    fn start(dir: &Path, name: &str, catalog: &str, manager_port: u16) -> Self {
        let log = dir.join(format!("{name}.log"));
        let token_file = dir.join("manager.token");
        std::fs::write(&token_file, "silent").unwrap();
        let mut child = Command::new(CAIRN)
            .args(["server", "--state-dir", s(&dir.join(name))])
            .args(["--listen", "127.0.0.1:0", "--catalog", catalog])
            .args(["--manager", &format!("https://127.0.0.1:{manager_port}")])
            .args(["--manager-fingerprint", &"ab".repeat(32)])
            .args(["--manager-token-file", s(&token_file)])
            .args(["--vault", s(&dir.join("vault")), "--unencrypted-vault"])
            .env("CAIRN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "server {name} said {line:?} ({e}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let token = std::fs::read_to_string(v["token_file"].as_str().unwrap()).unwrap();
        let client = Client::new(
            v["listen"].as_str().unwrap(),
            token.trim(),
            &Trust::Fingerprint(v["fingerprint"].as_str().unwrap().into()),
        )
        .unwrap();
        Self { child, client, log }
    }

    fn leader(&self) -> Value {
        self.client.get_json("/v1/leader").unwrap()
    }

    fn job(&self, id: &str) -> Value {
        self.client.get_json(&format!("/v1/jobs/{id}")).unwrap()
    }

    /// Polls `what` of this server until `done` says yes; panics with the server's log after
    /// `limit`. The time it took.
    fn wait(&self, what: &str, limit: Duration, done: impl Fn(&Self) -> bool) -> Duration {
        let t0 = Instant::now();
        while !done(self) {
            assert!(
                t0.elapsed() < limit,
                "{what}: not after {limit:?}; server log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t0.elapsed()
    }

    fn sigterm(&mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A manager that accepts connections and never answers.
fn silent_manager() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().flatten() {
            held.push(c);
        }
    });
    port
}

fn refusal(r: Result<Value, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, api, .. }) => (status, api.message),
        other => panic!("expected a refusal: {other:?}"),
    }
}

#[test]
fn a_standby_server_takes_over_when_the_active_one_is_killed() {
    let Some(pg) = PgServer::start() else {
        return;
    };
    let catalog = pg.fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let manager = silent_manager();
    let a = ServerProcess::start(dir.path(), "a", &catalog, manager);
    let b = ServerProcess::start(dir.path(), "b", &catalog, manager);

    // One active, one on standby, both naming the holder.
    let (la, lb) = (a.leader(), b.leader());
    assert_eq!(
        (&la["active"], &lb["active"]),
        (&json!(true), &json!(false))
    );
    assert_eq!(la["holder"], la["me"]);
    assert_eq!(lb["holder"], la["me"]);
    // The same through the CLI, as an operator asks.
    let cli = |name: &str, json: bool| {
        let conn = dir.path().join(name).join("connection.json");
        let mut c = Command::new(CAIRN);
        c.args(["leader", "--connect", s(&conn)]);
        if json {
            c.arg("--json");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let said: Value = serde_json::from_str(&cli("b", true)).unwrap();
    assert_eq!(
        (&said["active"], &said["holder"]),
        (&json!(false), &la["me"])
    );
    let human = cli("b", false);
    assert!(
        human.starts_with("standby") && human.contains("held by"),
        "{human}"
    );
    let prune = json!({ "dry_run": true });
    let (status, message) = refusal(b.client.post_json("/v1/prune", &prune));
    assert_eq!(status, 503);
    let holder = la["me"].as_str().unwrap();
    assert_eq!(message, format!("standby: the active server is {holder}"));

    // A job in flight on the active server; the standby reads it from the shared catalog.
    let job: Value = a
        .client
        .post_json("/v1/backups", &json!({ "vms": ["web1"] }))
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    a.wait("the backup runs", Duration::from_secs(20), |a| {
        a.job(&id)["state"] == "running"
    });
    assert_eq!(b.job(&id)["state"], "running");

    drop(a); // SIGKILL
    let took = b.wait("the standby takes over", Duration::from_secs(20), |b| {
        b.leader()["active"] == true
    });
    eprintln!("the standby took over {took:?} after the active server was killed");
    b.wait(
        "the killed server's job is failed",
        Duration::from_secs(10),
        |b| b.job(&id)["state"] == "failed",
    );
    let failed = b.job(&id);
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("the server stopped while the job ran")),
        "{failed}"
    );
    // The new active server runs new jobs.
    let j: Value = b.client.post_json("/v1/prune", &prune).unwrap();
    let pruned = j["id"].as_str().unwrap().to_string();
    b.wait(
        "a job on the new active server",
        Duration::from_secs(20),
        |b| b.job(&pruned)["state"] == "succeeded",
    );
    let jobs: Value = b.client.get_json("/v1/jobs").unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 2, "{jobs}");

    // The killed server comes back as a standby; a clean stop of the active one hands the
    // lease over at the standby's next attempt, without waiting for it to lapse.
    let mut b = b;
    let a = ServerProcess::start(dir.path(), "a", &catalog, manager);
    let la = a.leader();
    assert_eq!(la["active"], false);
    assert_eq!(la["holder"], b.leader()["me"]);
    b.sigterm();
    let took = a.wait(
        "the handover after a clean stop",
        Duration::from_secs(8),
        |a| a.leader()["active"] == true,
    );
    eprintln!("the standby took over {took:?} after the active server stopped cleanly");
    let j: Value = a.client.post_json("/v1/prune", &prune).unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    a.wait("a job after the handover", Duration::from_secs(20), |a| {
        a.job(&id)["state"] == "succeeded"
    });
}
