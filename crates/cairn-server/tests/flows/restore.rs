//! Full VM restore: the new name is free → each disk restored by its storage agent → the VM
//! started through the manager.

use cairn_catalog::JobState;
use cairn_server::JobKind;
use cairn_server::restore::RestoreParams;
use cairn_testing::Fault;
use cairn_testing::vm_location;

use crate::{Setup, backup, failed, setup};

/// A setup with one recorded backup of `vm2`; returns it with the backup's id.
fn backed_up() -> (Setup, String) {
    let s = setup();
    let j = s.run(backup(&["vm2"]));
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    let id = s.server.catalog.latest_backup("vm2").unwrap().unwrap().id;
    (s, id.to_string())
}

fn restore(backup: &str, as_name: &str, wait_boot_s: u64) -> JobKind {
    JobKind::Restore(RestoreParams {
        over_existing: false,
        backup: backup.into(),
        as_name: as_name.into(),
        host: None,
        start: true,
        wait_boot_s,
    })
}

#[test]
fn a_restore_writes_each_disk_and_starts_the_vm_under_its_new_name() {
    let (s, id) = backed_up();
    let j = s.run(restore(&id, "vm9", 1));
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    let restores = s.storage.restores.lock().unwrap().clone();
    assert_eq!(
        restores.iter().map(|r| r.disk.as_str()).collect::<Vec<_>>(),
        ["vm9-vda.qcow2", "vm9-vdb.qcow2"]
    );
    let started = s.manager.provisioned.lock().unwrap().clone();
    assert_eq!(started.len(), 1);
    let (host, spec) = &started[0];
    assert_eq!(host, "h1");
    assert_eq!(spec.name, "vm9");
    assert_eq!(
        spec.disks[1].path,
        std::path::PathBuf::from("/ds/vm9-vdb.qcow2")
    );
    assert!(s.storage.discarded.lock().unwrap().is_empty());
    let Some(cairn_catalog::JobResult::Restore(r)) = j.result else {
        panic!("{:?}", j.result)
    };
    assert!(r.started);
    assert!(r.guest.is_some_and(|g| g.agent));
}

#[test]
fn a_restore_onto_an_existing_name_is_refused_before_any_disk() {
    let (s, id) = backed_up();
    let j = s.run(restore(&id, "vm1", 0));
    failed(&j, &["a VM named vm1 already exists"]);
    assert!(s.storage.restores.lock().unwrap().is_empty());
    assert!(s.manager.provisioned.lock().unwrap().is_empty());
}

#[test]
fn the_manager_down_at_the_name_check_fails_naming_it() {
    let (s, id) = backed_up();
    s.manager.script.fail("vm", Fault::Down);
    let j = s.run(restore(&id, "vm9", 0));
    failed(&j, &["check the new VM name", "connection refused"]);
    assert!(s.storage.restores.lock().unwrap().is_empty());
}

#[test]
fn the_storage_agent_down_at_restore_starts_no_vm() {
    let (s, id) = backed_up();
    s.storage.script.fail("restore", Fault::Down);
    let j = s.run(restore(&id, "vm9", 0));
    failed(&j, &["restore disk vda", "connection refused"]);
    assert!(s.manager.provisioned.lock().unwrap().is_empty());
}

#[test]
fn the_host_refusing_to_start_the_vm_fails_naming_host_and_vm() {
    let (s, id) = backed_up();
    s.manager.script.fail(
        "provision",
        Fault::Api(cairn_http::ErrorKind::Conflict, "no memory".into()),
    );
    let j = s.run(restore(&id, "vm9", 0));
    failed(&j, &["start VM vm9 on h1", "no memory"]);
    assert_eq!(s.storage.restores.lock().unwrap().len(), 2);
    // No VM came of it: the restored disks are taken away again.
    assert_eq!(discarded(&s), ["vm9-vda.qcow2", "vm9-vdb.qcow2"]);
    assert!(s.server.catalog.job(&j.id).unwrap().holds.is_empty());
}

fn discarded(s: &Setup) -> Vec<String> {
    let d = s.storage.discarded.lock().unwrap();
    d.iter().map(|d| d.disk.clone()).collect()
}

#[test]
fn a_failed_start_keeps_the_disks_of_a_vm_that_was_defined_anyway() {
    let (s, id) = backed_up();
    // The start call fails, but the VM exists (the host defined it before the answer was
    // lost): the VM owns its disks.
    let m = s.manager.clone();
    s.manager.script.on("provision", move || {
        m.set_vms(vec![vm_location("vm9", "h1", "s1", &["vda", "vdb"])])
    });
    s.manager.script.fail(
        "provision",
        Fault::Api(cairn_http::ErrorKind::Internal, "lost the answer".into()),
    );
    let j = s.run(restore(&id, "vm9", 0));
    failed(&j, &["start VM vm9 on h1", "lost the answer"]);
    assert!(discarded(&s).is_empty());
    assert!(s.server.catalog.job(&j.id).unwrap().holds.is_empty());
}

#[test]
fn cancel_during_a_disk_restore_stops_before_the_next_disk_and_the_start() {
    let (s, id) = backed_up();
    s.cancel_on(&s.storage.script, "restore");
    let j = s.run(restore(&id, "vm9", 0));
    assert_eq!(j.state, JobState::Cancelled, "{:?}", j.error);
    assert_eq!(s.storage.restores.lock().unwrap().len(), 1);
    assert_eq!(discarded(&s), ["vm9-vda.qcow2"]);
    assert!(s.manager.provisioned.lock().unwrap().is_empty());
}

#[test]
fn an_unknown_backup_fails_without_calling_anyone() {
    let s = setup();
    let j = s.run(restore("ffffffff", "vm9", 0));
    failed(&j, &["not found"]);
    assert_eq!(s.manager.script.count("vm"), 0);
    assert!(s.storage.restores.lock().unwrap().is_empty());
}
