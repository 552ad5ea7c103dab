//! The REST API through [`ServerClient`]: every answer decodes as its `cairn_api::server`
//! type, and a body with a field the server does not know is refused naming it.

use cairn_api::server::{JobResult, PutSchedule, Retention, StartPrune, VmListState};
use cairn_api::{ServerApi, ServerClient};
use cairn_catalog::JobState;
use cairn_http::{ErrorKind, Trust};

use crate::{backup, setup};

#[test]
fn every_answer_decodes_typed() {
    let s = setup();
    let j = s.run(backup(&["vm1"]));
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    let (id, fp) = cairn_http::tls::ensure_self_signed(&s.dir.path().join("tls"), &[]).unwrap();
    let tls = cairn_http::tls::server_config(&id).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (addr, _handle) = rt
        .block_on(cairn_server::service::serve(
            s.server.clone(),
            "127.0.0.1:0".parse().unwrap(),
            tls,
            "t0ken".into(),
        ))
        .unwrap();
    let c =
        ServerClient::new(&format!("https://{addr}"), "t0ken", &Trust::Fingerprint(fp)).unwrap();

    let vms = c.vms().unwrap();
    let vm1 = vms.iter().find(|v| v.name == "vm1").unwrap();
    assert_eq!(vm1.state, VmListState::Running);
    assert_eq!(vm1.backups, 1);
    assert!(vm1.disks.as_ref().is_some_and(|d| d.len() == 1));

    let backups = c.backups(Some("vm1")).unwrap();
    assert_eq!(backups.len(), 1);
    assert!(
        backups[0].metadata.is_none(),
        "the list leaves metadata out"
    );
    let one = c.backup(&backups[0].id[..8]).unwrap();
    assert_eq!(
        one.metadata.as_ref().unwrap().timestamp_id,
        one.timestamp_id
    );

    let job = c.job(&j.id).unwrap();
    assert!(job.events.as_ref().is_some_and(|e| !e.is_empty()));
    let Some(JobResult::Backup(done)) = &job.result else {
        panic!("{:?}", job.result)
    };
    assert_eq!(done.backups[0].backup, one.id);
    assert!(c.jobs(10).unwrap().iter().all(|j| j.events.is_none()));

    let every = PutSchedule {
        vms: vec!["vm1".into()],
        every: "1d".into(),
        group: false,
        first_in_s: Some(3600),
    };
    assert_eq!(c.put_schedule("nightly", &every).unwrap().every_s, 86_400);
    assert_eq!(c.schedules().unwrap().len(), 1);
    assert_eq!(c.delete_schedule("nightly").unwrap().deleted, "nightly");

    assert_eq!(c.retention("*").unwrap(), None);
    let keep = Retention {
        keep_last: Some(3),
        ..Default::default()
    };
    assert_eq!(c.set_retention("*", &keep).unwrap(), keep);
    assert_eq!(c.retention("*").unwrap(), Some(keep));

    let prune = c
        .start_prune(&StartPrune {
            vms: vec!["vm1".into()],
            dry_run: true,
        })
        .unwrap();
    let prune = crate::wait(&s.server, &prune.id);
    assert!(
        matches!(prune.result, Some(JobResult::Prune(_))),
        "{prune:?}"
    );

    let stats = c.stats().unwrap();
    assert_eq!(stats.server_disk_bytes, 0);

    // A field the server does not know is refused with its name, not defaulted.
    let e = c
        .http()
        .put_json::<_, serde_json::Value>(
            "/v1/retention/vm1",
            &serde_json::json!({"keep_last": 1, "keep_hourly": 2}),
        )
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::BadRequest));
    assert!(e.to_string().contains("keep_hourly"), "{e}");
}
