//! The catalog on each database it runs on: every test runs against an SQLite file and
//! against a fresh database of a real PostgreSQL started for this test binary
//! ([`cairn_testing::pg::PgServer::shared`], stopped when the binary ends). Without
//! PostgreSQL the PostgreSQL half says loudly that it skipped, or fails under
//! `CAIRN_REQUIRE_POSTGRES=1`. The last tests are PostgreSQL's own: lost connections, a
//! server restart, a server that is down.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};

use cairn_api::host::{Quiesce, SnapshotKind};
use cairn_api::server::{BackupKind, JobKind, UsageSample};
use cairn_api::storage::ChangeSource;
use cairn_catalog::*;
use cairn_testing::pg::PgServer;
use cairn_types::DiskFormat;

/// A database to test the catalog on, with a raw handle to change rows behind its back.
enum Db {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        url: String,
    },
}

impl Db {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Db::Sqlite {
            path: dir.path().join("catalog.db"),
            _dir: dir,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "SQLite",
            Db::Postgres { .. } => "PostgreSQL",
        }
    }

    fn try_open(&self) -> Result<Catalog> {
        match self {
            Db::Sqlite { path, .. } => Catalog::open(path),
            Db::Postgres { url } => Catalog::open_url(url),
        }
    }

    fn open(&self) -> Catalog {
        self.try_open()
            .unwrap_or_else(|e| panic!("open {}: {e:?}", self.name()))
    }

    /// Runs `sql` (statements separated by `;`) directly on the database.
    fn raw(&self, sql: &str) {
        match self {
            Db::Sqlite { path, .. } => rusqlite::Connection::open(path)
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            Db::Postgres { url } => postgres::Client::connect(url, postgres::NoTls)
                .unwrap()
                .batch_execute(sql)
                .unwrap(),
        }
    }

    /// The first column of the first row `sql` answers, as text.
    fn raw_text(&self, sql: &str) -> String {
        match self {
            Db::Sqlite { path, .. } => rusqlite::Connection::open(path)
                .unwrap()
                .query_row(sql, [], |r| {
                    Ok(match r.get_ref(0)? {
                        rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                        v => v.as_str().unwrap().to_string(),
                    })
                })
                .unwrap(),
            Db::Postgres { url } => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                let rows = c.simple_query(sql).unwrap();
                rows.iter()
                    .find_map(|m| match m {
                        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                        _ => None,
                    })
                    .unwrap()
            }
        }
    }
}

/// An SQLite file, then a fresh database of the binary's PostgreSQL (unless skipped).
fn dbs(test: &str) -> Vec<Db> {
    let mut out = vec![Db::sqlite()];
    match PgServer::shared() {
        Some(pg) => out.push(Db::Postgres {
            url: pg.fresh_database(),
        }),
        None => eprintln!("SKIPPED: {test} on PostgreSQL (not installed)"),
    }
    out
}

/// Runs `test` on each database, saying which (a failure's output shows it).
fn on_each_db(name: &str, test: impl Fn(&Db)) {
    for db in dbs(name) {
        eprintln!("-- {name} on {}", db.name());
        test(&db);
    }
}

/// A fresh PostgreSQL database of the binary's server, or `None` (skipped, said loudly).
fn postgres_db(test: &str) -> Option<(&'static PgServer, Db)> {
    let Some(pg) = PgServer::shared() else {
        eprintln!("SKIPPED: {test} (PostgreSQL not installed)");
        return None;
    };
    Some((
        pg,
        Db::Postgres {
            url: pg.fresh_database(),
        },
    ))
}

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
    on_each_db("migrations_run_once_and_reopen", |db| {
        let c = db.open();
        assert_eq!(c.schema_version().unwrap(), MIGRATIONS.len() as i64);
        c.ensure_vm("web1").unwrap();
        drop(c);
        let c = db.open();
        assert_eq!(c.vms().unwrap()[0].name, "web1");
        assert_eq!(
            db.raw_text("SELECT COUNT(*) FROM schema_migrations"),
            MIGRATIONS.len().to_string()
        );
    });
}

#[test]
fn openers_at_once_apply_each_migration_once() {
    on_each_db("openers_at_once_apply_each_migration_once", |db| {
        let db = Arc::new(db);
        let start = Arc::new(Barrier::new(6));
        std::thread::scope(|s| {
            let openers: Vec<_> = (0..6)
                .map(|_| {
                    let (db, start) = (db.clone(), start.clone());
                    s.spawn(move || {
                        start.wait();
                        db.try_open().map(|c| c.schema_version())
                    })
                })
                .collect();
            for o in openers {
                let version = o.join().unwrap().unwrap().unwrap();
                assert_eq!(version, MIGRATIONS.len() as i64);
            }
        });
        assert_eq!(
            db.raw_text("SELECT COUNT(*) FROM schema_migrations"),
            MIGRATIONS.len().to_string()
        );
    });
}

#[test]
fn a_newer_database_is_refused() {
    on_each_db("a_newer_database_is_refused", |db| {
        drop(db.open());
        db.raw(
            "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (999, 'future', 0)",
        );
        let e = db.try_open().unwrap_err();
        assert!(matches!(e, CatalogError::TooNew { found: 999, .. }), "{e}");
    });
}

#[test]
fn backups_round_trip_and_are_atomic() {
    on_each_db("backups_round_trip_and_are_atomic", |db| {
        let c = db.open();
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
        // Several disks come back in order, with their backup only; a backup without disks
        // comes back with none.
        let mut two = backup("3123456789abcdef", "web1", "t1", 8);
        let mut vdb = two.disks[0].clone();
        vdb.disk = "vdb".into();
        vdb.rdm = Some(
            serde_json::from_value(serde_json::json!({"lun": null, "mapping_snapshot": "m1"}))
                .unwrap(),
        );
        two.disks.insert(0, vdb);
        c.insert_backup(&two).unwrap();
        two.disks.reverse();
        let mut none = backup("4123456789abcdef", "web1", "t1", 9);
        none.disks.clear();
        c.insert_backup(&none).unwrap();
        assert_eq!(c.backups(Some("web1")).unwrap(), [b.clone(), two, none]);
        assert!(c.backups(Some("db1")).unwrap().is_empty());
        let vms = c.vms().unwrap();
        assert_eq!((vms[0].backups, vms[0].last_backup_ms), (3, Some(9)));
        c.delete_backup("3123456789abcdef").unwrap();
        c.delete_backup("4123456789abcdef").unwrap();
        // What indexing found, the volumes it could not read included; replaced on re-index
        // and removed with the backup.
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
        assert!(matches!(
            c.delete_backup(&b.id),
            Err(CatalogError::NotFound(_))
        ));
        assert_eq!(c.backup_volumes(b.id.as_ref()).unwrap(), None);
        assert_eq!(c.orphan_metadata().unwrap(), [meta("t1", "web1")]);
        assert_eq!(c.last_config_digest("web1").unwrap().as_deref(), Some("c1"));
        assert!(c.config_in_use("c1").unwrap());
        c.delete_metadata(&tid("t1")).unwrap();
        assert!(!c.config_in_use("c1").unwrap());
    });
}

#[test]
fn metadata_round_trips() {
    on_each_db("metadata_round_trips", |db| {
        let c = db.open();
        c.ensure_vm("web1").unwrap();
        c.ensure_vm("web1").unwrap();
        let m = MetadataSnapshot {
            config_reused: true,
            state_file: Some("state-1".into()),
            state_bytes: Some(1 << 40),
            ..meta("t2", "web1")
        };
        c.insert_metadata(&m).unwrap();
        assert_eq!(c.metadata(&tid("t2")).unwrap(), m);
        assert!(matches!(
            c.metadata(&tid("t3")),
            Err(CatalogError::NotFound(_))
        ));
    });
}

fn job(id: &str, kind: &str, state: JobState) -> JobRecord {
    JobRecord {
        id: id.parse().unwrap(),
        kind: kind.into(),
        state,
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
    }
}

#[test]
fn jobs_events_and_cancel() {
    on_each_db("jobs_events_and_cancel", |db| {
        let c = db.open();
        let j = JobRecord {
            params: JobKind::Backup {
                skip_unprotected: false,
                vms: vec!["web1".into()],
                full: false,
            },
            vms: vec!["web1".into()],
            ..job("aaaa000000000001", "backup", JobState::Queued)
        };
        c.insert_job(&j).unwrap();
        assert!(c.start_job(&j.id).unwrap());
        assert!(!c.start_job(&j.id).unwrap(), "started once only");
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
        let running = c.jobs_in(JobState::Running).unwrap();
        assert_eq!((running[0].holds.len(), &running[0].params), (1, &j.params));
        assert!(running[0].started_ms.is_some());
        assert!(
            c.finished_jobs_holding().unwrap().is_empty(),
            "a running job's holds are its own"
        );
        assert!(c.request_cancel(&j.id).unwrap());
        assert!(c.cancel_requested(&j.id).unwrap());
        assert!(!c.cancel_requested("ffff000000000000").unwrap());
        c.set_job_state(&j.id, JobState::Failed, Some("boom"), None)
            .unwrap();
        let got = c.job("aaaa").unwrap();
        assert_eq!(got.state, JobState::Failed);
        assert_eq!(got.error.as_deref(), Some("boom"));
        assert!(got.finished_ms.is_some() && got.cancel_requested);
        assert!(!c.request_cancel(&j.id).unwrap());
        // A failed job that could not release its snapshot is found until the hold is gone.
        assert_eq!(c.finished_jobs_holding().unwrap().len(), 1);
        c.set_job_holds(&j.id, &[]).unwrap();
        assert!(c.finished_jobs_holding().unwrap().is_empty());
        // Newest first, at most `limit`; an ambiguous prefix is a conflict.
        c.insert_job(&job("aaaa000000000002", "prune", JobState::Queued))
            .unwrap();
        let ids: Vec<_> = c.jobs(10).unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(c.jobs(1).unwrap().len(), 1);
        assert!(matches!(c.job("aaaa"), Err(CatalogError::Conflict(_))));
        assert!(matches!(c.job("bbbb"), Err(CatalogError::NotFound(_))));
    });
}

#[test]
fn a_batch_of_events_is_appended_in_order_or_not_at_all() {
    on_each_db(
        "a_batch_of_events_is_appended_in_order_or_not_at_all",
        |db| {
            let c = db.open();
            c.insert_job(&job("aaaa000000000001", "prune", JobState::Running))
                .unwrap();
            c.insert_job(&job("bbbb000000000002", "prune", JobState::Running))
                .unwrap();
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
            // The catalog works on after the failed transaction.
            c.add_event("aaaa000000000001", "info", "after").unwrap();
            assert_eq!(c.events("aaaa000000000001").unwrap().len(), 4);
        },
    );
}

#[test]
fn schedules_and_retention() {
    on_each_db("schedules_and_retention", |db| {
        let c = db.open();
        let s = Schedule {
            name: "nightly".into(),
            vms: vec!["a".into(), "b".into()],
            group: true,
            every_s: 3600,
            next_ms: 10,
            enabled: true,
        };
        c.upsert_schedule(&s).unwrap();
        let changed = Schedule {
            every_s: 60,
            enabled: false,
            ..s.clone()
        };
        c.upsert_schedule(&changed).unwrap();
        assert_eq!(c.schedules().unwrap(), [changed]);
        c.delete_schedule("nightly").unwrap();
        assert!(c.delete_schedule("nightly").is_err());
        assert_eq!(c.retention("web1").unwrap(), None);
        let r = Retention {
            keep_last: Some(3),
            ..Default::default()
        };
        c.set_retention("*", &r).unwrap();
        assert_eq!(c.retention("web1").unwrap(), Some(r));
        let own = Retention {
            keep_daily: Some(7),
            keep_monthly: Some(12),
            ..Default::default()
        };
        c.set_retention("web1", &own).unwrap();
        assert_eq!(c.retention("web1").unwrap(), Some(own));
    });
}

#[test]
fn leases_have_one_holder_until_they_lapse() {
    on_each_db("leases_have_one_holder_until_they_lapse", |db| {
        let c = db.open();
        assert_eq!(c.lease("server").unwrap(), None);
        assert!(c.acquire_lease("server", "a", 1_000, 10_000).unwrap());
        assert!(!c.acquire_lease("server", "b", 5_000, 10_000).unwrap());
        // A renewal moves the expiry, not the start.
        assert!(c.acquire_lease("server", "a", 5_000, 10_000).unwrap());
        let held = Lease {
            name: "server".into(),
            holder: "a".into(),
            since_ms: 1_000,
            expires_ms: 15_000,
        };
        assert_eq!(c.lease("server").unwrap(), Some(held));
        assert!(!c.acquire_lease("server", "b", 14_999, 10_000).unwrap());
        assert!(c.acquire_lease("server", "b", 15_000, 10_000).unwrap());
        assert!(!c.acquire_lease("server", "a", 15_001, 10_000).unwrap());
        let l = c.lease("server").unwrap().unwrap();
        assert_eq!((l.holder.as_str(), l.since_ms), ("b", 15_000));
        // Leases of other names are their own.
        assert!(c.acquire_lease("other", "a", 15_001, 10_000).unwrap());
        assert!(!c.release_lease("server", "a").unwrap());
        assert!(c.release_lease("server", "b").unwrap());
        assert!(c.acquire_lease("server", "a", 15_002, 10_000).unwrap());
    });
}

#[test]
fn contenders_at_once_get_one_lease() {
    on_each_db("contenders_at_once_get_one_lease", |db| {
        drop(db.open());
        let start = Barrier::new(6);
        let won: Vec<bool> = std::thread::scope(|s| {
            let contenders: Vec<_> = (0..6)
                .map(|i| {
                    let (c, start) = (db.open(), &start);
                    s.spawn(move || {
                        start.wait();
                        c.acquire_lease("server", &format!("holder-{i}"), 1_000, 10_000)
                            .unwrap()
                    })
                })
                .collect();
            contenders.into_iter().map(|c| c.join().unwrap()).collect()
        });
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    });
}

/// A job as the server records it, finished with `result`.
fn prune_job(c: &Catalog, id: &str, result: &JobResult) {
    c.insert_job(&JobRecord {
        created_ms: 1,
        ..job(id, "prune", JobState::Queued)
    })
    .unwrap();
    c.set_job_state(id, JobState::Succeeded, None, Some(result))
        .unwrap();
}

#[test]
fn job_params_and_results_are_typed_and_old_rows_still_read() {
    on_each_db(
        "job_params_and_results_are_typed_and_old_rows_still_read",
        |db| {
            let c = db.open();
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
            let set = |params: &str, result: &str| {
                db.raw(&format!(
                    "UPDATE jobs SET params = '{params}', result = '{result}'
                 WHERE id = 'bbbb000000000001'"
                ));
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
            db.raw("UPDATE jobs SET state = 'paused'");
            let e = c.jobs(10).unwrap_err().to_string();
            assert!(e.contains("paused"), "{e}");
        },
    );
}

#[test]
fn a_catalog_written_with_the_old_strings_reads_typed() {
    on_each_db("a_catalog_written_with_the_old_strings_reads_typed", |db| {
        let c = db.open();
        c.ensure_vm("web1").unwrap();
        c.insert_metadata(&meta("ts1", "web1")).unwrap();
        c.insert_backup(&backup("aaaa000000000001", "web1", "ts1", 1))
            .unwrap();
        // The rows exactly as servers before the typed model wrote them.
        db.raw(
            r#"UPDATE backups SET kind = 'incremental', snapshot_kind = 'overlay', quiesce = 'pause',
               attributes = '{"boot":{"type":"firmware"},"disks":[],"machine":"q35","memory_mib":64,"name":"web1","nics":[],"start_paused":false,"vcpus":2}';
           UPDATE backup_disks SET format = 'raw', change_source = 'recipe_compare',
               rdm = '{"lun":null,"mapping_snapshot":"m1"}';
           UPDATE metadata_snapshots SET usage = '{"host":"h1","usage":null,"error":"down"}';"#,
        );
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
        assert_eq!(
            db.raw_text("SELECT kind FROM backups WHERE id = 'aaaa000000000002'"),
            "incremental"
        );
    });
}

#[test]
fn an_unknown_stored_name_is_an_error_naming_it() {
    on_each_db("an_unknown_stored_name_is_an_error_naming_it", |db| {
        let c = db.open();
        c.ensure_vm("web1").unwrap();
        c.insert_metadata(&meta("ts1", "web1")).unwrap();
        c.insert_backup(&backup("aaaa000000000001", "web1", "ts1", 1))
            .unwrap();
        db.raw("UPDATE backups SET kind = 'differential'");
        let e = c.backup("aaaa").unwrap_err().to_string();
        assert!(
            e.contains("backup kind") && e.contains("differential"),
            "{e}"
        );
        db.raw("UPDATE backups SET kind = 'full', checkpoint = 'cp-7'");
        let e = c.backup("aaaa").unwrap_err().to_string();
        assert!(e.contains("checkpoint") && e.contains("cp-7"), "{e}");
        db.raw("UPDATE backups SET checkpoint = NULL");
        db.raw("UPDATE backup_disks SET change_source = 'telepathy'");
        let e = c.backups(None).unwrap_err().to_string();
        assert!(e.contains("telepathy"), "{e}");
        db.raw("UPDATE backup_disks SET change_source = 'full', rdm = '{\"lun\":null,\"wwn\":1}'");
        let e = c.backup("aaaa").unwrap_err().to_string();
        assert!(e.contains("wwn"), "{e}");
    });
}

// ---- PostgreSQL only ------------------------------------------------------------------------

/// The PID of the server process behind each connection to `db` but the asking one.
fn backends(pg: &PgServer, db: &str) -> Vec<String> {
    pg.psql(
        "postgres",
        &format!(
            "SELECT pid FROM pg_stat_activity WHERE datname = '{db}' \
             AND pid <> pg_backend_pid()"
        ),
    )
    .unwrap()
    .lines()
    .map(str::to_string)
    .collect()
}

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

#[test]
fn a_connection_closed_while_idle_is_replaced_unnoticed() {
    let Some((pg, db)) = postgres_db("a_connection_closed_while_idle_is_replaced_unnoticed") else {
        return;
    };
    let Db::Postgres { url } = &db else {
        unreachable!()
    };
    let c = db.open();
    c.ensure_vm("web1").unwrap();
    let before = backends(pg, db_name(url));
    assert_eq!(before.len(), 1, "{before:?}");
    // What an administrator (or a restarting pooler) does to an idle connection.
    pg.psql(
        "postgres",
        &format!("SELECT pg_terminate_backend({})", before[0]),
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    while backends(pg, db_name(url)) == before {
        assert!(t0.elapsed().as_secs() < 10, "the backend did not go");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Idle long enough to be checked before the next statement.
    std::thread::sleep(POSTGRES_IDLE_CHECK);
    assert_eq!(c.vms().unwrap()[0].name, "web1");
    c.ensure_vm("web2").unwrap();
    assert_eq!(c.vms().unwrap().len(), 2);
}

#[test]
fn a_connection_lost_during_a_statement_is_a_clear_error_then_reconnects() {
    let Some((pg, db)) =
        postgres_db("a_connection_lost_during_a_statement_is_a_clear_error_then_reconnects")
    else {
        return;
    };
    let Db::Postgres { url } = &db else {
        unreachable!()
    };
    let c = db.open();
    // Another session locks the table, so the catalog's statement waits on the server
    // until its connection is terminated under it.
    let mut locker = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE vms IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    std::thread::scope(|s| {
        let waiting = s.spawn(|| c.ensure_vm("web1"));
        let name = db_name(url);
        let blocked = || {
            pg.psql(
                "postgres",
                &format!(
                    "SELECT pid FROM pg_stat_activity WHERE datname = '{name}' \
                     AND wait_event_type = 'Lock'"
                ),
            )
            .unwrap()
        };
        let t0 = std::time::Instant::now();
        let mut pid = blocked();
        while pid.is_empty() {
            assert!(t0.elapsed().as_secs() < 10, "the statement never waited");
            std::thread::sleep(std::time::Duration::from_millis(10));
            pid = blocked();
        }
        pg.psql("postgres", &format!("SELECT pg_terminate_backend({pid})"))
            .unwrap();
        let e = waiting.join().unwrap().unwrap_err();
        assert!(matches!(e, CatalogError::ConnectionLost { .. }), "{e:?}");
        assert!(e.to_string().contains("may or may not"), "{e}");
    });
    tx.rollback().unwrap();
    c.ensure_vm("web1").unwrap();
    assert_eq!(c.vms().unwrap().len(), 1);
}

#[test]
fn a_server_restart_mid_job_is_transparent_and_a_stopped_server_a_clear_error() {
    let test = "a_server_restart_mid_job_is_transparent_and_a_stopped_server_a_clear_error";
    // A server of its own: this one is restarted and stopped.
    let Some(mut pg) = PgServer::start() else {
        eprintln!("SKIPPED: {test} (PostgreSQL not installed)");
        return;
    };
    let url = pg.fresh_database();
    let c = Catalog::open_url(&url).unwrap();
    let j = job("aaaa000000000001", "prune", JobState::Queued);
    c.insert_job(&j).unwrap();
    c.set_job_state(&j.id, JobState::Running, None, None)
        .unwrap();
    c.add_event(&j.id, "info", "before").unwrap();
    pg.restart();
    std::thread::sleep(POSTGRES_IDLE_CHECK);
    c.add_event(&j.id, "info", "after").unwrap();
    c.set_job_state(&j.id, JobState::Succeeded, None, None)
        .unwrap();
    let got = c.job(&j.id).unwrap();
    assert_eq!(got.state, JobState::Succeeded);
    let lines: Vec<_> = c
        .events(&j.id)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.message))
        .collect();
    assert_eq!(lines, [(1, "before".into()), (2, "after".into())]);
    drop(pg);
    for _ in 0..2 {
        let e = c.jobs(10).unwrap_err();
        assert!(
            e.to_string().contains("cannot connect to 127.0.0.1"),
            "{e:?}"
        );
    }
    let e = Catalog::open_url(&url).unwrap_err();
    assert!(matches!(e, CatalogError::Postgres { .. }), "{e:?}");
}

#[test]
fn postgres_refuses_what_it_cannot_store_and_bad_urls() {
    let Some((_pg, db)) = postgres_db("postgres_refuses_what_it_cannot_store_and_bad_urls") else {
        return;
    };
    let c = db.open();
    // The retention counts are INTEGER (32-bit on PostgreSQL): refused, never truncated.
    let huge = Retention {
        keep_last: Some(1 << 40),
        ..Default::default()
    };
    let e = c.set_retention("*", &huge).unwrap_err();
    assert!(matches!(e, CatalogError::Postgres { .. }), "{e:?}");
    assert_eq!(c.retention("web1").unwrap(), None);
    for bad in [
        "postgresql://cairn@127.0.0.1:notaport/x",
        "/var/lib/catalog.db",
    ] {
        let e = Catalog::open_url(bad).unwrap_err();
        assert!(matches!(e, CatalogError::BadUrl(_)), "{bad}: {e:?}");
    }
    let e = Catalog::open_url("postgresql://cairn:secret@127.0.0.1:notaport/x").unwrap_err();
    assert!(!e.to_string().contains("secret"), "{e}");
}
