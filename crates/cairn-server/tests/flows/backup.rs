//! Backup of one VM, step by step: locate → metadata snapshot → VM snapshot → send disks →
//! release → record. Each step's peer fails or answers nonsense; cancel arrives at each step.

use cairn_api::host::Quiesce;
use cairn_api::manager::VmRunState;
use cairn_api::server::BackupKind;
use cairn_api::storage::ChangeSource;
use cairn_api::storage::DiskSource;
use cairn_catalog::JobState;
use cairn_http::ErrorKind;
use cairn_server::JobKind;
use cairn_testing::Fault;

use crate::{backup, failed, setup, setup_with};

#[test]
fn a_backup_sends_typed_sources_and_records_the_answer() {
    let s = setup();
    let j = s.run(backup(&["vm1"]));
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    // The storage agent got the host agent's NBD export, with the bitmap as the change source
    // only when there is a checkpoint to compare with (none here: first backup).
    let reqs = s.storage.backups.lock().unwrap();
    let job = &reqs[0].disks[0];
    assert!(matches!(
        &job.source,
        DiskSource::Nbd { export, bitmap_context: None, .. } if export == "vda"
    ));
    assert_eq!(job.request.name, "vm/vm1/vda");
    assert_eq!(job.request.labels["vm"], "vm1");
    // Recorded, and the VM snapshot released exactly once.
    let b = s.server.catalog.latest_backup("vm1").unwrap().unwrap();
    assert_eq!(
        b.disks[0].vault_snapshot,
        "00000000000000000000000000000001"
    );
    assert_eq!(b.disks[0].change_source, ChangeSource::Full);
    assert_eq!(b.quiesce, Quiesce::GuestFreeze);
    assert_eq!(
        b.checkpoint.map(|c| c.to_string()).as_deref(),
        Some("8000000000000003")
    );
    assert_eq!(b.vm_snapshot_lifetime_ms, 42);
    assert_eq!(b.attributes.name, "vm1");
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert_eq!(s.manager.taken().len(), 1);
    assert!(j.holds.is_empty());
}

#[test]
fn an_incremental_passes_the_checkpoint_and_the_bitmap() {
    let s = setup();
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    let reqs = s.storage.backups.lock().unwrap();
    let job = &reqs[1].disks[0];
    assert!(matches!(
        &job.source,
        DiskSource::Nbd { bitmap_context: Some(c), .. } if c == "qemu:dirty-bitmap:cx"
    ));
    assert_eq!(
        job.request.parent.as_deref(),
        Some("00000000000000000000000000000001")
    );
    let snaps = s.manager.snapshots.lock().unwrap();
    assert_eq!(snaps[0].1.since, None);
    assert_eq!(
        snaps[1].1.since.map(|c| c.to_string()).as_deref(),
        Some("8000000000000003")
    );
}

#[test]
fn an_answer_the_server_cannot_parse_fails_the_job_naming_it_and_releases() {
    let s = setup();
    s.storage
        .script
        .fail("backups", Fault::UnknownVariant("maybe".into()));
    let j = s.run(backup(&["vm1"]));
    failed(&j, &["unknown variant `maybe`", "storage agent s1"]);
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert_eq!(s.manager.taken().len(), 1);
    assert!(s.server.catalog.latest_backup("vm1").unwrap().is_none());
    assert!(s.server.catalog.job(&j.id).unwrap().holds.is_empty());
}

#[test]
fn a_storage_agent_down_fails_the_job_and_releases() {
    let s = setup();
    s.agents.set_down("s1", true);
    let j = s.run(backup(&["vm1"]));
    failed(&j, &["storage agent s1", "connection refused"]);
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert_eq!(s.manager.taken().len(), 1);
    assert_eq!(s.backups_of("vm1"), 0);
}

#[test]
fn an_unknown_vm_fails_before_any_snapshot() {
    let s = setup();
    let j = s.run(backup(&["nope"]));
    failed(&j, &["VM nope not found"]);
    assert!(s.manager.taken().is_empty());
    assert!(s.storage.backups.lock().unwrap().is_empty());
}

#[test]
fn the_manager_down_at_locate_fails_naming_the_step_and_takes_nothing() {
    let s = setup();
    s.manager.script.fail("vm", Fault::Down);
    let j = s.run(backup(&["vm1"]));
    failed(&j, &["locate VM vm1", "connection refused"]);
    assert!(s.manager.taken().is_empty());
    assert_eq!(s.manager.script.count("delete_snapshot"), 0);
    assert_eq!(s.backups_of("vm1"), 0);
}

#[test]
fn a_vm_that_is_not_running_or_has_a_disk_on_no_storage_agent_is_refused_before_any_snapshot() {
    let s = setup();
    let mut gone = cairn_testing::vm_location("vm1", "h1", "s1", &["vda"]);
    gone.state = VmRunState::Unresponsive;
    let mut stray = cairn_testing::vm_location("vm2", "h1", "s1", &["vda"]);
    stray.disks[0].storage_agent = None;
    s.manager.set_vms(vec![gone, stray]);
    failed(
        &s.run(backup(&["vm1"])),
        &["VM vm1 on host h1 is unresponsive"],
    );
    failed(
        &s.run(backup(&["vm2"])),
        &["VM vm2", "vda", "on no storage agent"],
    );
    assert!(s.manager.taken().is_empty());
    assert_eq!(s.manager.script.count("usage"), 0, "no metadata snapshot");
}

#[test]
fn the_host_agent_down_at_the_vm_snapshot_fails_and_holds_nothing() {
    let s = setup();
    s.manager.script.fail("snapshot", Fault::Down);
    let j = s.run(backup(&["vm1"]));
    failed(&j, &["snapshot VM vm1", "connection refused"]);
    assert!(j.holds.is_empty());
    assert_eq!(s.manager.script.count("delete_snapshot"), 0);
    assert!(s.storage.backups.lock().unwrap().is_empty());
    assert_eq!(s.backups_of("vm1"), 0);
}

#[test]
fn a_vm_snapshot_answer_with_an_unknown_variant_fails_naming_it() {
    let s = setup();
    s.manager
        .script
        .fail("snapshot", Fault::UnknownVariant("hibernate".into()));
    let j = s.run(backup(&["vm1"]));
    failed(&j, &["snapshot VM vm1", "unknown variant `hibernate`"]);
    assert!(s.storage.backups.lock().unwrap().is_empty());
    assert_eq!(s.backups_of("vm1"), 0);
}

#[test]
fn usage_unavailable_is_a_warning_and_the_backup_stands() {
    let s = setup();
    s.manager.script.fail("usage", Fault::Down);
    let j = s.run(backup(&["vm1"]));
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert!(s.logged(&j, "vm1: resource usage unavailable"));
    assert_eq!(s.backups_of("vm1"), 1);
}

#[test]
fn a_saved_state_that_cannot_be_fetched_fails_the_metadata_step_and_is_deleted_once() {
    let s = setup_with(|c| c.save_state = true);
    s.manager.script.fail("saved_state", Fault::Down);
    let j = s.run(backup(&["vm1"]));
    failed(&j, &["fetch saved state", "connection refused"]);
    // Held before it was saved, released by the failure path exactly once, on its host.
    let deleted = s.manager.deleted_states.lock().unwrap().clone();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0].0, "h1");
    assert!(deleted[0].1.starts_with("cairn-vm1-"), "{deleted:?}");
    // The metadata snapshot comes first: no VM snapshot was taken.
    assert!(s.manager.taken().is_empty());
    assert!(j.holds.is_empty());
    assert_eq!(s.backups_of("vm1"), 0);
}

#[test]
fn a_state_that_cannot_be_saved_is_a_warning_and_nothing_is_held() {
    let s = setup_with(|c| c.save_state = true);
    s.manager.script.fail(
        "save_state",
        Fault::Api(ErrorKind::Conflict, "migration".into()),
    );
    let j = s.run(backup(&["vm1"]));
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert!(s.logged(&j, "execution state not saved"));
    assert_eq!(s.manager.script.count("delete_saved_state"), 0);
    assert!(j.holds.is_empty());
}

#[test]
fn a_disk_the_storage_agent_fails_fails_the_job_naming_the_disk() {
    let s = setup();
    s.storage
        .failing_disks
        .lock()
        .unwrap()
        .insert("vm/vm2/vdb".into());
    let j = s.run(backup(&["vm2"]));
    failed(&j, &["disk vdb of vm2 on storage agent s1: vault full"]);
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert_eq!(s.backups_of("vm2"), 0);
}

#[test]
fn a_vm_snapshot_that_cannot_be_released_is_kept_as_a_hold_and_nothing_is_recorded() {
    let s = setup();
    s.manager.script.fail("delete_snapshot", Fault::Down);
    let j = s.run(backup(&["vm1"]));
    failed(&j, &["delete VM snapshot of vm1", "connection refused"]);
    // Sent, but not recorded: a backup is recorded only once its snapshot is released.
    assert_eq!(s.storage.backups.lock().unwrap().len(), 1);
    assert_eq!(s.backups_of("vm1"), 0);
    let taken = s.manager.taken();
    assert_eq!(
        j.holds,
        [cairn_catalog::Hold::VmSnapshot {
            vm: "vm1".into(),
            snapshot: format!("h1/{}", taken[0]),
        }]
    );
    assert!(s.logged(&j, "could not release VM snapshot"));
    assert!(s.manager.deleted_ids().is_empty());
}

#[test]
fn cancel_while_locating_or_snapshotting_stops_before_sending_and_releases_once() {
    for call in ["vm", "snapshot"] {
        let s = setup();
        s.cancel_on(&s.manager.script, call);
        let j = s.run(backup(&["vm1"]));
        assert_eq!(j.state, JobState::Cancelled, "{call}: {:?}", j.error);
        assert_eq!(j.error.as_deref(), Some("cancelled"));
        assert_eq!(s.manager.taken().len(), 1, "{call}");
        assert_eq!(s.manager.deleted_ids(), s.manager.taken(), "{call}");
        assert!(s.storage.backups.lock().unwrap().is_empty(), "{call}");
        assert!(j.holds.is_empty());
        assert_eq!(s.backups_of("vm1"), 0);
    }
}

#[test]
fn cancel_while_sending_keeps_the_sent_vm_and_stops_before_the_next() {
    let s = setup();
    s.cancel_on(&s.storage.script, "backups");
    let j = s.run(backup(&["vm1", "vm2"]));
    assert_eq!(j.state, JobState::Cancelled, "{:?}", j.error);
    // vm1's disks were in the vault already: recorded, its snapshot released once.
    assert_eq!(s.backups_of("vm1"), 1);
    assert_eq!(s.backups_of("vm2"), 0);
    assert_eq!(s.manager.taken().len(), 1);
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
}

#[test]
fn cancel_while_releasing_is_too_late_and_the_backup_stands() {
    let s = setup();
    s.cancel_on(&s.manager.script, "delete_snapshot");
    let j = s.run(backup(&["vm1"]));
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert_eq!(s.backups_of("vm1"), 1);
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
}

#[test]
fn a_job_cancelled_while_queued_never_runs() {
    let s = setup();
    let server = std::sync::Arc::downgrade(&s.server);
    let second = std::sync::Arc::new(std::sync::Mutex::new(None));
    let slot = second.clone();
    // While the first job locates its VM, a second is queued behind it and cancelled.
    s.manager.script.on("vm", move || {
        let (Some(server), mut slot) = (server.upgrade(), slot.lock().unwrap()) else {
            return;
        };
        if slot.is_none() {
            let j = cairn_server::jobs::submit(&server, backup(&["vm2"])).unwrap();
            cairn_server::jobs::cancel(&server, &j.id).unwrap();
            *slot = Some(j.id);
        }
    });
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    let id = second.lock().unwrap().clone().unwrap();
    let j = s.wait(&id);
    assert_eq!(j.state, JobState::Cancelled);
    assert!(!s.logged(&j, "started"));
    let snaps = s.manager.snapshots.lock().unwrap();
    assert!(snaps.iter().all(|(vm, _, _)| vm == "vm1"), "{snaps:?}");
    assert_eq!(s.backups_of("vm2"), 0);
}

#[test]
fn a_full_backup_ignores_the_previous_checkpoint() {
    let s = setup();
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);
    let j = s.run(JobKind::Backup {
        skip_unprotected: false,
        vms: vec!["vm1".into()],
        full: true,
    });
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    let snaps = s.manager.snapshots.lock().unwrap();
    assert_eq!(snaps[1].1.since, None);
    let reqs = s.storage.backups.lock().unwrap();
    assert_eq!(reqs[1].disks[0].request.parent, None);
    let b = s.server.catalog.latest_backup("vm1").unwrap().unwrap();
    assert_eq!(b.kind, BackupKind::Full);
}
