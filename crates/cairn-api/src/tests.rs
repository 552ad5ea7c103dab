//! Shapes on the wire: unknown fields and variants are refused with their name, and the
//! shapes other services and stored files already use still parse.

use serde::de::DeserializeOwned;

use crate::host::{Changes, SnapshotRequest, VmSnapshot, VmSpec};
use crate::manager::{AgentRecord, VmLocation};
use crate::storage::{BackupsRequest, DiskBackupOutcome, DiskSource, UnitSnapshotRequest};

fn refused<T: DeserializeOwned + std::fmt::Debug>(json: &str, named: &str) {
    let e = serde_json::from_str::<T>(json).expect_err(json);
    assert!(e.to_string().contains(named), "{e} should name {named}");
}

const SNAPSHOT: &str = r#"{
  "id": "8000000000000002", "vm": "8000000000000001", "kind": "fleecing",
  "quiesce": "guest_freeze", "quiesce_window_ms": 12, "checkpoint": "8000000000000003",
  "created_at_ms": 1,
  "disks": [{
    "disk": {"id": "vda", "node_name": "disk0",
             "backing": {"type": "image", "path": "/d/vm1.qcow2", "format": "qcow2"},
             "read_only": false},
    "size": 1048576,
    "source": {"type": "nbd", "socket": "/s/nbd.sock", "export": "vda"},
    "changes": {"type": "known", "bitmaps": ["cairn-8000000000000003"],
                "export_bitmap": "cxb", "meta_context": "qemu:dirty-bitmap:cxb",
                "dirty_bytes": 65536, "granularity": 65536}
  }]
}"#;

#[test]
fn a_vm_snapshot_parses_and_round_trips() {
    let s: VmSnapshot = serde_json::from_str(SNAPSHOT).unwrap();
    assert!(matches!(&s.disks[0].changes, Changes::Known(k) if k.meta_context.is_some()));
    let again: VmSnapshot = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
    assert_eq!(again, s);
}

#[test]
fn unknown_fields_are_named() {
    refused::<VmSnapshot>(
        &SNAPSHOT.replacen("\"kind\"", "\"colour\": 1, \"kind\"", 1),
        "colour",
    );
    // Inside an internally tagged variant, too.
    refused::<VmSnapshot>(
        &SNAPSHOT.replace("\"export\": \"vda\"", "\"export\": \"vda\", \"tls\": 1"),
        "tls",
    );
    refused::<VmSnapshot>(
        &SNAPSHOT.replace(
            "\"granularity\": 65536",
            "\"granularity\": 65536, \"age\": 2",
        ),
        "age",
    );
    refused::<SnapshotRequest>(r#"{"scratch_dir": "/etc"}"#, "scratch_dir");
    refused::<VmSpec>(r#"{"name": "a", "memory_mib": 64, "gpu": true}"#, "gpu");
    refused::<UnitSnapshotRequest>(r#"{"provider": "copy", "disks": [], "when": 1}"#, "when");
    refused::<DiskBackupOutcome>(r#"{"ok": {"extra": 1}}"#, "extra");
}

#[test]
fn unknown_variants_are_named() {
    refused::<VmSnapshot>(
        &SNAPSHOT.replace("\"type\": \"nbd\"", "\"type\": \"iscsi\""),
        "iscsi",
    );
    refused::<VmSnapshot>(&SNAPSHOT.replace("guest_freeze", "hibernate"), "hibernate");
    refused::<DiskSource>(r#"{"kind": "tape", "datastore": "d", "disk": "x"}"#, "tape");
    refused::<DiskBackupOutcome>(r#"{"maybe": {}}"#, "maybe");
    refused::<VmLocation>(
        r#"{"name": "vm1", "host": "h1", "host_vm_id": "8000000000000001", "state": "asleep",
            "spec": {"name": "vm1", "memory_mib": 64}, "disks": []}"#,
        "asleep",
    );
}

#[test]
fn backup_request_shape_is_the_documented_one() {
    let r: BackupsRequest = serde_json::from_str(
        r#"{"vault": {"url": "/v"}, "disks": [
            {"source": {"kind": "nbd", "socket": "/s", "export": "vda", "bitmap_context": null},
             "request": {"name": "vm/vm1/vda", "parent": null, "labels": {"vm": "vm1"}}},
            {"source": {"kind": "rdm", "datastore": "ds", "disk": "luns/l0"},
             "request": {"name": "vm/vm1/vdb"}}]}"#,
    )
    .unwrap();
    assert_eq!(r.disks.len(), 2);
    assert_eq!(r.parallel, 0);
    assert!(matches!(r.disks[1].source, DiskSource::Rdm { .. }));
}

#[test]
fn agent_records_keep_their_stored_shape() {
    // `agents.json` written by earlier managers: `state` empty.
    let a: AgentRecord = serde_json::from_str(
        r#"{"kind": "host", "name": "h1", "url": "https://127.0.0.1:1", "fingerprint": "ab",
            "token": "t", "registered_ms": 1, "last_seen_ms": 2, "state": ""}"#,
    )
    .unwrap();
    assert!(!a.is_live());
    let v = serde_json::to_value(&a).unwrap();
    assert_eq!(v["name"], "h1");
    assert_eq!(v["kind"], "host");
}

#[test]
fn enum_names_match_the_wire() {
    use crate::host::{Quiesce, SnapshotKind, UnknownReason};
    let wire = |v: serde_json::Value| v.as_str().unwrap().to_string();
    for q in [Quiesce::GuestFreeze, Quiesce::Pause, Quiesce::None] {
        assert_eq!(wire(serde_json::to_value(q).unwrap()), q.as_str());
    }
    for k in [SnapshotKind::Fleecing, SnapshotKind::Overlay] {
        assert_eq!(wire(serde_json::to_value(k).unwrap()), k.as_str());
    }
    for r in [
        UnknownReason::BitmapMissing,
        UnknownReason::BitmapInconsistent,
        UnknownReason::DiskResized,
        UnknownReason::NoPreviousCheckpoint,
    ] {
        assert_eq!(wire(serde_json::to_value(r).unwrap()), r.as_str());
    }
    // The catalog stores these by `as_str` and reads them back by their serde names.
    use crate::server::BackupKind;
    use crate::storage::ChangeSource;
    for k in [BackupKind::Full, BackupKind::Incremental] {
        assert_eq!(wire(serde_json::to_value(k).unwrap()), k.as_str());
    }
    for c in [
        ChangeSource::Full,
        ChangeSource::OverlayMap,
        ChangeSource::ExtentMap,
        ChangeSource::PersistentBitmap,
        ChangeSource::HypervisorBitmap,
        ChangeSource::RecipeCompare,
    ] {
        assert_eq!(wire(serde_json::to_value(c).unwrap()), c.as_str());
    }
    for f in [cairn_types::DiskFormat::Raw, cairn_types::DiskFormat::Qcow2] {
        assert_eq!(wire(serde_json::to_value(f).unwrap()), f.as_str());
    }
    for s in [
        crate::manager::VmRunState::Running,
        crate::manager::VmRunState::Unresponsive,
        crate::manager::VmRunState::Gone,
    ] {
        assert_eq!(wire(serde_json::to_value(s).unwrap()), s.as_str());
    }
}

const JOB: &str = r#"{
  "id": "8d93906d8466fb99", "kind": "prune", "state": "succeeded",
  "params": {"kind": "prune", "vms": [], "dry_run": true}, "vms": [],
  "created_ms": 1, "started_ms": 2, "finished_ms": 3, "error": null,
  "result": {"kind": "prune", "plans": [{"vm": "vm1", "policy": null, "forget": [], "dry_run": true}]},
  "holds": [], "cancel_requested": false,
  "events": [{"seq": 1, "at_ms": 1, "level": "info", "message": "queued"}]
}"#;

#[test]
fn server_answers_are_typed_and_refuse_the_unknown() {
    use crate::server::{JobRecord, JobResult, VmEntry};
    let j: JobRecord = serde_json::from_str(JOB).unwrap();
    assert!(matches!(&j.result, Some(JobResult::Prune(p)) if p.plans[0].dry_run));
    let again: JobRecord = serde_json::from_value(serde_json::to_value(&j).unwrap()).unwrap();
    assert_eq!(again, j);
    refused::<JobRecord>(
        &JOB.replacen("\"vms\": []", "\"vms\": [], \"owner\": 1", 1),
        "owner",
    );
    refused::<JobRecord>(
        &JOB.replace("\"forget\": []", "\"forget\": [], \"why\": 1"),
        "why",
    );
    refused::<JobRecord>(
        &JOB.replace(
            "\"kind\": \"prune\", \"plans\"",
            "\"kind\": \"defrag\", \"plans\"",
        ),
        "defrag",
    );
    refused::<JobRecord>(&JOB.replace("succeeded", "paused"), "paused");
    refused::<VmEntry>(
        r#"{"name": "vm1", "host": null, "state": "hiding", "backups": 0, "last_backup_ms": null}"#,
        "hiding",
    );
}

#[test]
fn timestamp_ids_parse_only_their_shape() {
    use crate::server::TimestampId;
    let t = TimestampId::new(1_700_000_000_123, 0xbeef);
    assert_eq!(t.as_str(), "1700000000123-beef");
    assert_eq!(t.as_str().parse::<TimestampId>().unwrap(), t);
    let again: TimestampId = serde_json::from_value(serde_json::to_value(&t).unwrap()).unwrap();
    assert_eq!(again, t);
    for bad in [
        "ts1",
        "1700000000123-BEEF",
        "1700000000123_beef",
        "170000000012-beeef",
    ] {
        refused::<TimestampId>(&format!("\"{bad}\""), bad);
    }
}
