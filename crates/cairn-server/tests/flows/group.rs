//! The targeted group snapshot: VM snapshots → one unit snapshot per storage agent → VM
//! snapshots released → each VM sent from the unit snapshot → unit snapshots released.

use cairn_api::storage::DiskSource;
use cairn_catalog::JobState;
use cairn_testing::Fault;

use crate::{failed, group, setup};

#[test]
fn a_group_backup_sends_every_vm_from_one_unit_snapshot() {
    let s = setup();
    let j = s.run(group(&["vm1", "vm2"]));
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    // One unit snapshot of the three disks, reflink, released once at the end.
    let units = s.storage.unit_snapshots.lock().unwrap().clone();
    assert_eq!(units.len(), 1);
    assert_eq!(units[0].provider, "reflink");
    assert_eq!(units[0].disks.len(), 3);
    assert_eq!(s.storage.deleted.lock().unwrap().len(), 1);
    // Every VM snapshot was an overlay, released once, before any disk was sent.
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert_eq!(s.manager.taken().len(), 2);
    let calls = s.manager.script.calls();
    let last_delete = calls.iter().rposition(|c| *c == "delete_snapshot").unwrap();
    let first_snapshot = calls.iter().position(|c| *c == "snapshot").unwrap();
    assert!(first_snapshot < last_delete);
    let reqs = s.storage.backups.lock().unwrap();
    assert_eq!(reqs.len(), 2);
    for r in reqs.iter() {
        for d in &r.disks {
            assert!(
                matches!(&d.source, DiskSource::Snapshot { .. }),
                "{:?}",
                d.source
            );
        }
    }
    let b1 = s.server.catalog.latest_backup("vm1").unwrap().unwrap();
    let b2 = s.server.catalog.latest_backup("vm2").unwrap().unwrap();
    assert!(b1.group_id.is_some());
    assert_eq!(b1.group_id, b2.group_id);
    assert_eq!(b1.snapshot_kind, cairn_api::host::SnapshotKind::Overlay);
    assert!(j.holds.is_empty());
}

#[test]
fn the_second_vm_snapshot_failing_releases_the_first_once() {
    let s = setup();
    // The first snapshot succeeds; the hook breaks the host agent before the second.
    let manager = std::sync::Arc::downgrade(&s.manager);
    s.manager.script.on("snapshot", move || {
        if let Some(m) = manager.upgrade()
            && m.script.count("snapshot") == 2
        {
            m.script.fail("snapshot", Fault::Down);
        }
    });
    let j = s.run(group(&["vm1", "vm2"]));
    failed(&j, &["snapshot VM vm2", "connection refused"]);
    assert_eq!(s.manager.taken().len(), 1);
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert!(s.storage.unit_snapshots.lock().unwrap().is_empty());
    assert_eq!(s.backups_of("vm1") + s.backups_of("vm2"), 0);
}

#[test]
fn the_storage_agent_down_at_the_unit_snapshot_releases_every_vm_snapshot_once() {
    let s = setup();
    s.agents.set_down("s1", true);
    let j = s.run(group(&["vm1", "vm2"]));
    failed(&j, &["storage agent s1", "connection refused"]);
    assert_eq!(s.manager.taken().len(), 2);
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert!(j.holds.is_empty());
    assert_eq!(s.backups_of("vm1") + s.backups_of("vm2"), 0);
}

#[test]
fn a_unit_snapshot_answer_with_an_unknown_variant_fails_naming_it() {
    let s = setup();
    s.storage
        .script
        .fail("snapshot_units", Fault::UnknownVariant("zfs".into()));
    let j = s.run(group(&["vm1", "vm2"]));
    failed(
        &j,
        &["storage agent s1: unit snapshot", "unknown variant `zfs`"],
    );
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert_eq!(s.backups_of("vm1") + s.backups_of("vm2"), 0);
}

#[test]
fn sending_failing_releases_the_unit_snapshot_once_and_records_nothing() {
    let s = setup();
    s.storage.script.fail("backups", Fault::Down);
    let j = s.run(group(&["vm1", "vm2"]));
    failed(&j, &["storage agent s1: backup", "connection refused"]);
    // The VM snapshots were released at step 3 already, and not again.
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert_eq!(s.storage.deleted.lock().unwrap().len(), 1);
    assert!(j.holds.is_empty());
    assert!(s.logged(&j, "released storage snapshot"));
    assert_eq!(s.backups_of("vm1") + s.backups_of("vm2"), 0);
}

#[test]
fn cancel_during_the_unit_snapshot_releases_everything_before_sending() {
    let s = setup();
    s.cancel_on(&s.storage.script, "snapshot_units");
    let j = s.run(group(&["vm1", "vm2"]));
    assert_eq!(j.state, JobState::Cancelled, "{:?}", j.error);
    assert_eq!(s.manager.deleted_ids(), s.manager.taken());
    assert_eq!(s.storage.deleted.lock().unwrap().len(), 1);
    assert!(s.storage.backups.lock().unwrap().is_empty());
    assert!(j.holds.is_empty());
}

#[test]
fn a_vm_snapshot_that_cannot_be_released_fails_the_group_and_stays_held() {
    let s = setup();
    s.manager.script.fail("delete_snapshot", Fault::Down);
    let j = s.run(group(&["vm1"]));
    failed(&j, &["delete VM snapshot of vm1"]);
    // The unit snapshot is released; the VM snapshot waits for the manager.
    assert_eq!(s.storage.deleted.lock().unwrap().len(), 1);
    assert_eq!(j.holds.len(), 1, "{:?}", j.holds);
    assert!(matches!(
        &j.holds[0],
        cairn_catalog::Hold::VmSnapshot { vm, .. } if vm == "vm1"
    ));
    assert!(s.storage.backups.lock().unwrap().is_empty());
}
