//! The job engine around the flows: a restart with holds outstanding, holds a finished job
//! could not release, prune, and two jobs on one VM.

use std::sync::{Arc, Mutex};

use cairn_catalog::{Catalog, Hold, JobRecord, JobResult, JobState, Retention};
use cairn_server::{JobKind, Server};
use cairn_testing::{FakeAgents, FakeManager, FakeStorage, Fault, datastore, vm_location};

use crate::{backup, config, failed, setup, wait};

/// A catalog in `dir` as a server left it when it died running a job that held a VM
/// snapshot and a storage snapshot; returns the job's id.
fn died_holding(dir: &std::path::Path) -> String {
    let state = dir.join("server");
    std::fs::create_dir_all(&state).unwrap();
    let catalog = Catalog::open(&state.join("catalog.db")).unwrap();
    let job = JobRecord {
        id: cairn_api::server::JobId::random(),
        kind: "group_backup".into(),
        state: JobState::Running,
        params: backup(&["vm1"]),
        vms: vec!["vm1".into()],
        created_ms: 1,
        started_ms: Some(2),
        finished_ms: None,
        error: None,
        result: None,
        holds: vec![
            Hold::VmSnapshot {
                vm: "vm1".into(),
                snapshot: "h1/80000000000000aa".into(),
            },
            Hold::StorageSnapshot {
                agent: "s1".into(),
                snapshot: "1700000000000-0001".into(),
            },
        ],
        cancel_requested: false,
        events: None,
    };
    catalog.insert_job(&job).unwrap();
    job.id.to_string()
}

fn fakes() -> (Arc<FakeManager>, Arc<FakeStorage>, Arc<FakeAgents>) {
    let manager = Arc::new(FakeManager::new(
        vec![vm_location("vm1", "h1", "s1", &["vda"])],
        &["s1"],
    ));
    let storage = Arc::new(FakeStorage::new("s1", vec![datastore(&["vm1-vda.qcow2"])]));
    let agents = Arc::new(FakeAgents::default().storage(storage.clone()));
    (manager, storage, agents)
}

#[test]
fn a_restart_fails_the_running_job_and_releases_each_hold_once() {
    let dir = tempfile::tempdir().unwrap();
    let id = died_holding(dir.path());
    let (manager, storage, agents) = fakes();
    let server = Server::start_with(config(dir.path()), manager.clone(), agents).unwrap();
    let j = server.catalog.job(&id).unwrap();
    failed(&j, &["the server stopped while the job ran"]);
    assert!(j.holds.is_empty(), "{:?}", j.holds);
    assert_eq!(
        *manager.deleted.lock().unwrap(),
        [("h1".to_string(), "80000000000000aa".parse().unwrap())]
    );
    assert_eq!(*storage.deleted.lock().unwrap(), ["1700000000000-0001"]);
}

#[test]
fn holds_a_restart_could_not_release_are_released_once_the_peers_are_back() {
    let dir = tempfile::tempdir().unwrap();
    let id = died_holding(dir.path());
    let (manager, storage, agents) = fakes();
    manager.script.fail("delete_snapshot", Fault::Down);
    agents.set_down("s1", true);
    let server = Server::start_with(config(dir.path()), manager.clone(), agents.clone()).unwrap();
    let j = server.catalog.job(&id).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.holds.len(), 2, "{:?}", j.holds);
    // Back: the next job releases them first.
    manager.script.heal("delete_snapshot");
    agents.set_down("s1", false);
    let next = cairn_server::jobs::submit(
        &server,
        JobKind::Prune {
            vms: vec![],
            dry_run: true,
        },
    )
    .unwrap();
    assert_eq!(wait(&server, &next.id).state, JobState::Succeeded);
    let j = server.catalog.job(&id).unwrap();
    assert!(j.holds.is_empty(), "{:?}", j.holds);
    assert_eq!(manager.deleted_ids().len(), 1);
    assert_eq!(storage.deleted.lock().unwrap().len(), 1);
    let events = server.catalog.events(&id).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("after the job ended")),
        "{events:?}"
    );
    // And not again.
    let again = cairn_server::jobs::submit(
        &server,
        JobKind::Prune {
            vms: vec![],
            dry_run: true,
        },
    )
    .unwrap();
    wait(&server, &again.id);
    assert_eq!(manager.deleted_ids().len(), 1);
    assert_eq!(storage.deleted.lock().unwrap().len(), 1);
}

#[test]
fn a_finished_backup_whose_release_failed_is_released_by_the_next_job() {
    let s = setup();
    s.manager.script.fail("delete_snapshot", Fault::Down);
    let j = s.run(backup(&["vm1"]));
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.holds.len(), 1);
    s.manager.script.heal("delete_snapshot");
    let next = s.run(JobKind::Prune {
        vms: vec![],
        dry_run: true,
    });
    assert_eq!(next.state, JobState::Succeeded, "{:?}", next.error);
    assert!(s.server.catalog.job(&j.id).unwrap().holds.is_empty());
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert!(s.logged(&j, "released VM snapshot"));
}

#[test]
fn a_restart_removes_the_metadata_snapshot_of_a_backup_that_failed() {
    let s = setup();
    s.manager.script.fail("snapshot", Fault::Down);
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Failed);
    // The metadata snapshot comes before the VM snapshot; the failed backup leaves it
    // behind until the next start.
    assert_eq!(s.server.catalog.orphan_metadata().unwrap().len(), 1);
    let again =
        Server::start_with(config(s.dir.path()), s.manager.clone(), s.agents.clone()).unwrap();
    assert!(again.catalog.orphan_metadata().unwrap().is_empty());
}

#[test]
fn prune_plans_by_the_policy_and_a_dry_run_forgets_nothing() {
    let s = setup();
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    s.server
        .catalog
        .set_retention(
            "vm1",
            &Retention {
                keep_last: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    let j = s.run(JobKind::Prune {
        vms: vec!["vm1".into()],
        dry_run: true,
    });
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    let oldest = &s.server.catalog.backups(Some("vm1")).unwrap()[0].id;
    let Some(JobResult::Prune(p)) = j.result else {
        panic!("{:?}", j.result)
    };
    assert_eq!(p.plans[0].forget.as_slice(), std::slice::from_ref(oldest));
    assert!(p.plans[0].dry_run);
    assert_eq!(s.backups_of("vm1"), 2);
}

#[test]
fn prune_with_the_vault_unreachable_fails_naming_it_and_keeps_every_backup() {
    let s = setup();
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    s.server
        .catalog
        .set_retention(
            "vm1",
            &Retention {
                keep_last: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    let j = s.run(JobKind::Prune {
        vms: vec![],
        dry_run: false,
    });
    failed(&j, &["vault", "no config"]);
    assert_eq!(s.backups_of("vm1"), 2);
}

#[test]
fn prune_without_a_policy_plans_nothing() {
    let s = setup();
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    let j = s.run(JobKind::Prune {
        vms: vec!["vm1".into()],
        dry_run: false,
    });
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    let Some(JobResult::Prune(p)) = j.result else {
        panic!("{:?}", j.result)
    };
    assert!(p.plans[0].policy.is_none());
    assert_eq!(s.backups_of("vm1"), 1);
}

#[test]
fn a_second_job_on_a_busy_vm_is_refused() {
    let s = setup();
    let server = Arc::downgrade(&s.server);
    let refused = Arc::new(Mutex::new(None));
    let slot = refused.clone();
    s.manager.script.on("snapshot", move || {
        if let Some(server) = server.upgrade() {
            let e = cairn_server::jobs::submit(&server, backup(&["vm2", "vm1"])).unwrap_err();
            *slot.lock().unwrap() = Some(e.to_string());
        }
    });
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    let e = refused.lock().unwrap().clone().unwrap();
    assert!(e.contains("VM vm1 is busy with backup job"), "{e}");
    // Finished: the VM is free again.
    s.manager.script.on("snapshot", || {});
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
}

#[test]
fn invalid_jobs_are_refused_at_submission() {
    let s = setup();
    for (kind, msg) in [
        (backup(&[]), "no VM given"),
        (backup(&["vm1", "vm1"]), "VM vm1 given twice"),
    ] {
        let e = cairn_server::jobs::submit(&s.server, kind).unwrap_err();
        assert!(e.to_string().contains(msg), "{e}");
    }
    assert!(s.server.catalog.jobs(10).unwrap().is_empty());
}

#[test]
fn a_backups_log_is_written_in_far_fewer_catalog_writes_than_lines() {
    let s = setup();
    for (kind, what) in [
        (backup(&["vm1"]), "backup"),
        (crate::group(&["vm1", "vm2"]), "group"),
    ] {
        let (writes, _) = s.server.engine.event_writes();
        let j = s.run(kind);
        let (after, _) = s.server.engine.event_writes();
        assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
        // Before batching each line was one catalog write.
        let lines = s.events(&j).len() as u64;
        eprintln!(
            "{what}: {lines} log lines, {} catalog writes",
            after - writes
        );
        // A write per step boundary and at the end, and one per 500 ms tick if the timer
        // falls inside the job.
        assert!(
            after - writes <= lines / 2 + 1,
            "{what}: {lines} lines, {} writes",
            after - writes
        );
    }
}
