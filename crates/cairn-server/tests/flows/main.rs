//! The server's flows against the fakes of `cairn-testing` behind the `cairn-api` traits: no
//! QEMU, no network, seconds. Each test runs jobs on a fresh server and checks what it
//! recorded and released, and the error it reported.
//!
//! | module | covers |
//! |---|---|
//! | `backup` | backup: each peer down or answering nonsense at each step, cancel at each step |
//! | `group` | targeted group snapshot: the same, with unit snapshots |
//! | `restore` | full VM restore |
//! | `engine` | restart recovery, leftover holds, prune, admission, how many catalog writes a backup's log takes |
//! | `leader` | a server on PostgreSQL that loses its database, and so its lease, and gets both back |

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_api::storage::VaultTarget;
use cairn_catalog::{JobEvent, JobRecord, JobState};
use cairn_server::{JobKind, Server, ServerConfig};
use cairn_testing::{FakeAgents, FakeManager, FakeStorage, Script, datastore, vm_location};

mod api;
mod backup;
mod engine;
mod group;
mod leader;
mod restore;

/// A server with the fakes it talks to: `vm1` (disk `vda`) and `vm2` (`vda`, `vdb`) running
/// on host `h1`, their disks on storage agent `s1`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub server: Arc<Server>,
    pub manager: Arc<FakeManager>,
    pub storage: Arc<FakeStorage>,
    pub agents: Arc<FakeAgents>,
}

pub fn config(dir: &Path) -> ServerConfig {
    ServerConfig {
        catalog: None,
        state_dir: dir.join("server"),
        metadata_dir: None,
        vault: VaultTarget {
            url: dir.join("vault").display().to_string(),
            token: None,
            fingerprint: None,
        },
        max_jobs: 1,
        save_state: false,
    }
}

pub fn setup() -> Setup {
    setup_with(|_| {})
}

/// [`setup`] with the server's configuration changed by `f`.
pub fn setup_with(f: impl FnOnce(&mut ServerConfig)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let manager = Arc::new(FakeManager::new(
        vec![
            vm_location("vm1", "h1", "s1", &["vda"]),
            vm_location("vm2", "h1", "s1", &["vda", "vdb"]),
        ],
        &["s1"],
    ));
    let storage = Arc::new(FakeStorage::new(
        "s1",
        vec![datastore(&[
            "vm1-vda.qcow2",
            "vm2-vda.qcow2",
            "vm2-vdb.qcow2",
        ])],
    ));
    let agents = Arc::new(FakeAgents::default().storage(storage.clone()));
    let mut cfg = config(dir.path());
    f(&mut cfg);
    let server = Server::start_with(cfg, manager.clone(), agents.clone()).unwrap();
    Setup {
        dir,
        server,
        manager,
        storage,
        agents,
    }
}

impl Setup {
    /// Submits `kind` and waits until it is finished.
    pub fn run(&self, kind: JobKind) -> JobRecord {
        let id = cairn_server::jobs::submit(&self.server, kind).unwrap().id;
        self.wait(&id)
    }

    pub fn wait(&self, id: &str) -> JobRecord {
        wait(&self.server, id)
    }

    /// Every line the job logged.
    pub fn events(&self, job: &JobRecord) -> Vec<JobEvent> {
        self.server.catalog.events(&job.id).unwrap()
    }

    pub fn logged(&self, job: &JobRecord, needle: &str) -> bool {
        self.events(job).iter().any(|e| e.message.contains(needle))
    }

    /// Cancels every running job when `call` reaches the fake scripted by `script`.
    pub fn cancel_on(&self, script: &Script, call: &'static str) {
        let server = Arc::downgrade(&self.server);
        script.on(call, move || {
            let Some(server) = server.upgrade() else {
                return;
            };
            for j in server.catalog.jobs_in(JobState::Running).unwrap() {
                let _ = cairn_server::jobs::cancel(&server, &j.id);
            }
        });
    }

    /// The number of backups the catalog holds of `vm`.
    pub fn backups_of(&self, vm: &str) -> usize {
        self.server.catalog.backups(Some(vm)).unwrap().len()
    }
}

pub fn wait(server: &Server, id: &str) -> JobRecord {
    let t = Instant::now();
    loop {
        let j = server.catalog.job(id).unwrap();
        if matches!(
            j.state,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        ) {
            return j;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "job {id} hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn backup(vms: &[&str]) -> JobKind {
    JobKind::Backup {
        skip_unprotected: false,
        vms: vms.iter().map(|v| v.to_string()).collect(),
        full: false,
    }
}

pub fn group(vms: &[&str]) -> JobKind {
    JobKind::GroupBackup {
        skip_unprotected: false,
        vms: vms.iter().map(|v| v.to_string()).collect(),
        full: false,
    }
}

/// Asserts the job failed with an error containing each of `needles`; returns the error.
#[track_caller]
pub fn failed(j: &JobRecord, needles: &[&str]) -> String {
    assert_eq!(j.state, JobState::Failed, "{:?}", j.error);
    let e = j.error.clone().unwrap_or_default();
    for n in needles {
        assert!(e.contains(n), "{e:?} lacks {n:?}");
    }
    e
}
