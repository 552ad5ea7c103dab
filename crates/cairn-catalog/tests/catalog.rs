//! The catalog against SQLite files: migrations, atomic backups, jobs, schedules, retention.

use cairn_api::host::{Quiesce, SnapshotKind};
use cairn_api::server::{BackupKind, JobKind, UsageSample};
use cairn_api::storage::ChangeSource;
use cairn_catalog::*;
use cairn_types::DiskFormat;

/// A timestamp id per short test name.
fn tid(ts: &str) -> TimestampId {
    let chance = ts
        .bytes()
        .fold(0u16, |a, b| a.wrapping_mul(31).wrapping_add(u16::from(b)));
    TimestampId::new(1_700_000_000_000, chance)
}

fn backup(id: &str, vm: &str, ts: &str, created: i64) -> BackupRecord {
    BackupRecord {
        id: id.parse().unwrap(),
        vm: vm.into(),
        job_id: "00000000000000a1".parse().unwrap(),
        kind: BackupKind::Full,
        group_id: None,
        timestamp_id: tid(ts),
        created_ms: created,
        duration_ms: 10,
        host: "h1".into(),
        checkpoint: Some("00000000000000aa".parse().unwrap()),
        snapshot_kind: SnapshotKind::Fleecing,
        quiesce: Quiesce::GuestFreeze,
        quiesce_window_ms: 50,
        vm_snapshot_lifetime_ms: 900,
        bytes_read: 100,
        bytes_sent: 10,
        attributes: serde_json::from_value(serde_json::json!({"name": vm, "memory_mib": 64}))
            .unwrap(),
        disks: vec![BackupDisk {
            disk: "vda".into(),
            vault_snapshot: "abcd".into(),
            size: 1 << 20,
            format: DiskFormat::Qcow2,
            storage_agent: "s1".into(),
            datastore: "ds1".into(),
            datastore_disk: format!("{vm}.qcow2"),
            change_source: ChangeSource::Full,
            changed_bytes: 1 << 20,
            bytes_read: 100,
            bytes_sent: 10,
            rdm: None,
        }],
        metadata: None,
        volumes: None,
    }
}

fn meta(ts: &str, vm: &str) -> MetadataSnapshot {
    MetadataSnapshot {
        timestamp_id: tid(ts),
        vm: vm.into(),
        created_ms: 1,
        config_digest: "c1".into(),
        config_reused: false,
        state_file: None,
        state_bytes: None,
        usage: UsageSample {
            host: "h1".into(),
            usage: None,
            error: Some("host agent down".into()),
        },
    }
}

#[test]
fn migrations_run_once_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    let c = Catalog::open(&path).unwrap();
    assert_eq!(c.schema_version().unwrap(), MIGRATIONS.len() as i64);
    c.ensure_vm("web1").unwrap();
    drop(c);
    let c = Catalog::open(&path).unwrap();
    assert_eq!(c.vms().unwrap()[0].name, "web1");
}

#[test]
fn a_newer_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    drop(Catalog::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (999, 'future', 0)",
        [],
    )
    .unwrap();
    drop(conn);
    let e = Catalog::open(&path).unwrap_err();
    assert!(matches!(e, CatalogError::TooNew { found: 999, .. }), "{e}");
}

#[test]
fn backups_round_trip_and_are_atomic() {
    let c = Catalog::open_in_memory().unwrap();
    c.ensure_vm("web1").unwrap();
    c.insert_metadata(&meta("t1", "web1")).unwrap();
    let b = backup("0123456789abcdef", "web1", "t1", 5);
    c.insert_backup(&b).unwrap();
    assert_eq!(c.backup("0123").unwrap(), b);
    assert_eq!(c.latest_backup("web1").unwrap().unwrap(), b);
    // A duplicate disk makes the whole insert fail: no half-recorded backup.
    let mut bad = backup("1123456789abcdef", "web1", "t1", 6);
    bad.disks.push(bad.disks[0].clone());
    assert!(c.insert_backup(&bad).is_err());
    assert!(matches!(c.backup("1123"), Err(CatalogError::NotFound(_))));
    assert_eq!(c.backups(None).unwrap().len(), 1);
    // A backup of an unknown metadata snapshot is refused (foreign key).
    assert!(
        c.insert_backup(&backup("2123456789abcdef", "web1", "nope", 7))
            .is_err()
    );
    // What indexing found, the volumes it could not read included; replaced on re-index and
    // removed with the backup.
    assert_eq!(c.backup_volumes(b.id.as_ref()).unwrap(), None);
    let luks = IndexedVolume {
        disk: "vdb".into(),
        volume: "p2".into(),
        files: 0,
        complete: false,
        fs: "Luks".into(),
        not_indexed: Some("LUKS encrypted volume (no key)".into()),
    };
    c.set_backup_volumes(b.id.as_ref(), &[]).unwrap();
    c.set_backup_volumes(b.id.as_ref(), std::slice::from_ref(&luks))
        .unwrap();
    assert_eq!(c.backup_volumes(b.id.as_ref()).unwrap(), Some(vec![luks]));
    c.delete_backup(&b.id).unwrap();
    assert_eq!(c.backup_volumes(b.id.as_ref()).unwrap(), None);
    assert_eq!(c.orphan_metadata().unwrap().len(), 1);
}

#[test]
fn jobs_events_and_cancel() {
    let c = Catalog::open_in_memory().unwrap();
    let j = JobRecord {
        id: "aaaa000000000001".parse().unwrap(),
        kind: "backup".into(),
        state: JobState::Queued,
        params: JobKind::Backup {
            skip_unprotected: false,
            vms: vec!["web1".into()],
            full: false,
        },
        vms: vec!["web1".into()],
        created_ms: now_ms(),
        started_ms: None,
        finished_ms: None,
        error: None,
        result: None,
        holds: vec![],
        cancel_requested: false,
        events: None,
    };
    c.insert_job(&j).unwrap();
    c.set_job_state(&j.id, JobState::Running, None, None)
        .unwrap();
    c.set_job_holds(
        &j.id,
        &[Hold::VmSnapshot {
            vm: "web1".into(),
            snapshot: "s".into(),
        }],
    )
    .unwrap();
    c.add_event(&j.id, "info", "one").unwrap();
    c.add_event(&j.id, "info", "two").unwrap();
    assert_eq!(c.events(&j.id).unwrap()[1].seq, 2);
    assert_eq!(c.jobs_in(JobState::Running).unwrap()[0].holds.len(), 1);
    assert!(
        c.finished_jobs_holding().unwrap().is_empty(),
        "a running job's holds are its own"
    );
    assert!(c.request_cancel(&j.id).unwrap());
    assert!(c.cancel_requested(&j.id).unwrap());
    c.set_job_state(&j.id, JobState::Failed, Some("boom"), None)
        .unwrap();
    let got = c.job("aaaa").unwrap();
    assert_eq!(got.state, JobState::Failed);
    assert_eq!(got.error.as_deref(), Some("boom"));
    assert!(got.finished_ms.is_some());
    assert!(!c.request_cancel(&j.id).unwrap());
    // A failed job that could not release its snapshot is found until the hold is gone.
    assert_eq!(c.finished_jobs_holding().unwrap().len(), 1);
    c.set_job_holds(&j.id, &[]).unwrap();
    assert!(c.finished_jobs_holding().unwrap().is_empty());
}

#[test]
fn a_batch_of_events_is_appended_in_order_or_not_at_all() {
    let c = Catalog::open_in_memory().unwrap();
    let job = |id: &str| JobRecord {
        id: id.parse().unwrap(),
        kind: "prune".into(),
        state: JobState::Running,
        params: JobKind::Prune {
            vms: vec![],
            dry_run: true,
        },
        vms: vec![],
        created_ms: now_ms(),
        started_ms: None,
        finished_ms: None,
        error: None,
        result: None,
        holds: vec![],
        cancel_requested: false,
        events: None,
    };
    c.insert_job(&job("aaaa000000000001")).unwrap();
    c.insert_job(&job("bbbb000000000002")).unwrap();
    c.add_event("aaaa000000000001", "info", "first").unwrap();
    let line = |job: &str, at_ms: i64, message: &str| NewEvent {
        job: job.into(),
        at_ms,
        level: "info".into(),
        message: message.into(),
    };
    c.add_events(&[
        line("aaaa000000000001", 5, "a2"),
        line("bbbb000000000002", 6, "b1"),
        line("aaaa000000000001", 7, "a3"),
    ])
    .unwrap();
    let a = c.events("aaaa000000000001").unwrap();
    let got: Vec<_> = a.iter().map(|e| (e.seq, e.message.as_str())).collect();
    assert_eq!(got, [(1, "first"), (2, "a2"), (3, "a3")]);
    assert_eq!(a[2].at_ms, 7, "the time the line was logged, not written");
    assert_eq!(c.events("bbbb000000000002").unwrap().len(), 1);
    // A line of an unknown job fails the whole batch.
    assert!(
        c.add_events(&[
            line("aaaa000000000001", 8, "a4"),
            line("cccc000000000003", 9, "c1"),
        ])
        .is_err()
    );
    assert_eq!(c.events("aaaa000000000001").unwrap().len(), 3);
    c.add_events(&[]).unwrap();
}

#[test]
fn schedules_and_retention() {
    let c = Catalog::open_in_memory().unwrap();
    let s = Schedule {
        name: "nightly".into(),
        vms: vec!["a".into(), "b".into()],
        group: true,
        every_s: 3600,
        next_ms: 10,
        enabled: true,
    };
    c.upsert_schedule(&s).unwrap();
    c.upsert_schedule(&Schedule {
        every_s: 60,
        ..s.clone()
    })
    .unwrap();
    assert_eq!(c.schedules().unwrap()[0].every_s, 60);
    c.delete_schedule("nightly").unwrap();
    assert!(c.delete_schedule("nightly").is_err());
    assert_eq!(c.retention("web1").unwrap(), None);
    let r = Retention {
        keep_last: Some(3),
        ..Default::default()
    };
    c.set_retention("*", &r).unwrap();
    assert_eq!(c.retention("web1").unwrap(), Some(r));
}

/// A job as the server records it, finished with `result`.
fn prune_job(c: &Catalog, id: &str, result: &JobResult) {
    c.insert_job(&JobRecord {
        id: id.parse().unwrap(),
        kind: "prune".into(),
        state: JobState::Queued,
        params: JobKind::Prune {
            vms: vec![],
            dry_run: true,
        },
        vms: vec![],
        created_ms: 1,
        started_ms: None,
        finished_ms: None,
        error: None,
        result: None,
        holds: vec![],
        cancel_requested: false,
        events: None,
    })
    .unwrap();
    c.set_job_state(id, JobState::Succeeded, None, Some(result))
        .unwrap();
}

#[test]
fn job_params_and_results_are_typed_and_old_rows_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    let c = Catalog::open(&path).unwrap();
    let result = JobResult::Prune(cairn_api::server::PruneDone {
        plans: vec![cairn_api::server::PrunePlan {
            vm: "web1".into(),
            policy: None,
            forget: vec![],
            dry_run: true,
        }],
    });
    prune_job(&c, "bbbb000000000001", &result);
    assert_eq!(c.job("bbbb").unwrap().result, Some(result));
    let raw = rusqlite::Connection::open(&path).unwrap();
    let set = |params: &str, result: &str| {
        raw.execute(
            "UPDATE jobs SET params = $1, result = $2 WHERE id = 'bbbb000000000001'",
            [params, result],
        )
        .unwrap();
    };
    // Written by an earlier server: the result without its `kind`.
    set(
        r#"{"kind": "prune", "vms": [], "dry_run": true}"#,
        r#"{"plans": [{"vm": "web1", "policy": null, "forget": []}]}"#,
    );
    let j = c.job("bbbb").unwrap();
    let Some(JobResult::Prune(p)) = j.result else {
        panic!("{:?}", j.result)
    };
    assert_eq!(p.plans[0].vm, "web1");
    // Unknown fields and variants are named, never defaulted.
    set(
        r#"{"kind": "prune", "vms": []}"#,
        r#"{"plans": [], "colour": 1}"#,
    );
    let e = c.job("bbbb").unwrap_err().to_string();
    assert!(e.contains("colour"), "{e}");
    set(r#"{"kind": "defrag"}"#, "null");
    let e = c.job("bbbb").unwrap_err().to_string();
    assert!(e.contains("defrag"), "{e}");
}

#[test]
fn a_catalog_written_with_the_old_strings_reads_typed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    let c = Catalog::open(&path).unwrap();
    c.ensure_vm("web1").unwrap();
    c.insert_metadata(&meta("ts1", "web1")).unwrap();
    c.insert_backup(&backup("aaaa000000000001", "web1", "ts1", 1))
        .unwrap();
    // The rows exactly as servers before the typed model wrote them.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        r#"UPDATE backups SET kind = 'incremental', snapshot_kind = 'overlay', quiesce = 'pause',
               attributes = '{"boot":{"type":"firmware"},"disks":[],"machine":"q35","memory_mib":64,"name":"web1","nics":[],"start_paused":false,"vcpus":2}';
           UPDATE backup_disks SET format = 'raw', change_source = 'recipe_compare',
               rdm = '{"lun":null,"mapping_snapshot":"m1"}';
           UPDATE metadata_snapshots SET usage = '{"host":"h1","usage":null,"error":"down"}';"#,
    )
    .unwrap();
    let b = c.backup("aaaa").unwrap();
    assert_eq!(b.kind, BackupKind::Incremental);
    assert_eq!(b.snapshot_kind, SnapshotKind::Overlay);
    assert_eq!(b.quiesce, Quiesce::Pause);
    assert_eq!(
        (b.attributes.name.as_str(), b.attributes.vcpus),
        ("web1", 2)
    );
    let d = &b.disks[0];
    assert_eq!(d.format, DiskFormat::Raw);
    assert_eq!(d.change_source, ChangeSource::RecipeCompare);
    assert_eq!(
        d.rdm.as_ref().unwrap().mapping_snapshot.as_deref(),
        Some("m1")
    );
    assert_eq!(
        c.metadata(&tid("ts1")).unwrap().usage.error.as_deref(),
        Some("down")
    );
    // Strings are written back as they were.
    let again = BackupRecord {
        id: "aaaa000000000002".parse().unwrap(),
        ..b.clone()
    };
    c.insert_backup(&again).unwrap();
    let kind: String = raw
        .query_row(
            "SELECT kind FROM backups WHERE id = 'aaaa000000000002'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kind, "incremental");
}

#[test]
fn an_unknown_stored_name_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    let c = Catalog::open(&path).unwrap();
    c.ensure_vm("web1").unwrap();
    c.insert_metadata(&meta("ts1", "web1")).unwrap();
    c.insert_backup(&backup("aaaa000000000001", "web1", "ts1", 1))
        .unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE backups SET kind = 'differential'", [])
        .unwrap();
    let e = c.backup("aaaa").unwrap_err().to_string();
    assert!(
        e.contains("backup kind") && e.contains("differential"),
        "{e}"
    );
    raw.execute("UPDATE backups SET kind = 'full', checkpoint = 'cp-7'", [])
        .unwrap();
    let e = c.backup("aaaa").unwrap_err().to_string();
    assert!(e.contains("checkpoint") && e.contains("cp-7"), "{e}");
    raw.execute("UPDATE backups SET checkpoint = NULL", [])
        .unwrap();
    raw.execute("UPDATE backup_disks SET change_source = 'telepathy'", [])
        .unwrap();
    let e = c.backups(None).unwrap_err().to_string();
    assert!(e.contains("telepathy"), "{e}");
    raw.execute(
        "UPDATE backup_disks SET change_source = 'full', rdm = '{\"lun\":null,\"wwn\":1}'",
        [],
    )
    .unwrap();
    let e = c.backup("aaaa").unwrap_err().to_string();
    assert!(e.contains("wwn"), "{e}");
}
