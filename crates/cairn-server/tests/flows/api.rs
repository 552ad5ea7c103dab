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

    // On SQLite the only server is active; there is no lease.
    let leader: cairn_api::server::LeaderStatus = c.http().get_json("/v1/leader").unwrap();
    assert!(leader.active && !leader.shared, "{leader:?}");
    assert_eq!((leader.holder, leader.expires_ms), (None, None));

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

/// The server's REST API on loopback with the scoped tokens `tokens` (admin: `the-admin`)
/// and an audit log in `state`.
struct Scoped {
    _rt: tokio::runtime::Runtime,
    url: String,
    fp: String,
}

impl Scoped {
    fn serve(
        s: &crate::Setup,
        state: &std::path::Path,
        tokens: &cairn_http::access::TokenFile,
    ) -> Self {
        use cairn_http::access::{Access, tokens_path};
        tokens.save(&tokens_path(state)).unwrap();
        let (id, fp) = cairn_http::tls::ensure_self_signed(&s.dir.path().join("tls"), &[]).unwrap();
        let tls = cairn_http::tls::server_config(&id).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let rule = cairn_server::service::access_rule();
        let access = Access::from_state("server", "the-admin", state, rule).unwrap();
        let (addr, _handle) = rt
            .block_on(cairn_server::service::serve_with(
                s.server.clone(),
                "127.0.0.1:0".parse().unwrap(),
                tls,
                std::sync::Arc::new(access),
            ))
            .unwrap();
        Self {
            _rt: rt,
            url: format!("https://{addr}"),
            fp,
        }
    }

    fn client(&self, token: &str) -> cairn_http::Client {
        cairn_http::Client::new(&self.url, token, &Trust::Fingerprint(self.fp.clone())).unwrap()
    }
}

/// Every role against every route of the REST API: allowed (any answer but 401/403: a bad
/// body is 400 after the check) or `403`, and every refusal in the audit log.
#[test]
fn each_scope_against_each_route() {
    use cairn_http::access::{Scope, TokenFile};
    let s = setup();
    let state = s.dir.path().join("server-state");
    std::fs::create_dir_all(&state).unwrap();
    let mut tokens = TokenFile::default();
    let roles = ["audit", "backup", "restore", "admin"];
    let secrets: Vec<String> = roles
        .iter()
        .map(|r| {
            let scope: Scope = format!("{r}:/server").parse().unwrap();
            tokens.add(&format!("{r}-user"), vec![scope]).unwrap()
        })
        .collect();
    let elsewhere = tokens
        .add("other", vec!["admin:/vault/x".parse().unwrap()])
        .unwrap();
    let served = Scoped::serve(&s, &state, &tokens);
    let client = |t: &str| served.client(t);
    let body = serde_json::json!({});
    type Call = fn(&cairn_http::Client, &serde_json::Value) -> Option<ErrorKind>;
    fn kind<T>(r: Result<T, cairn_http::ClientError>) -> Option<ErrorKind> {
        r.err().map(|e| e.kind().unwrap_or(ErrorKind::Unknown))
    }
    // (route, call, allowed for audit, backup, restore, admin)
    let matrix: Vec<(&str, Call, [bool; 4])> = vec![
        (
            "GET /v1/vms",
            |c, _| kind(c.get_json::<serde_json::Value>("/v1/vms")),
            [true; 4],
        ),
        (
            "GET /v1/backups",
            |c, _| kind(c.get_json::<serde_json::Value>("/v1/backups")),
            [true; 4],
        ),
        (
            "GET /v1/jobs",
            |c, _| kind(c.get_json::<serde_json::Value>("/v1/jobs")),
            [true; 4],
        ),
        (
            "GET /v1/stats",
            |c, _| kind(c.get_json::<serde_json::Value>("/v1/stats")),
            [true; 4],
        ),
        (
            "GET /v1/leader",
            |c, _| kind(c.get_json::<serde_json::Value>("/v1/leader")),
            [true; 4],
        ),
        (
            "GET /v1/files/content",
            |c, _| kind(c.get_bytes("/v1/files/content?backup=x&path=/a")),
            [false, false, true, true],
        ),
        (
            "POST /v1/backups",
            |c, b| kind(c.post_json::<_, serde_json::Value>("/v1/backups", b)),
            [false, true, false, true],
        ),
        (
            "POST /v1/restores",
            |c, b| kind(c.post_json::<_, serde_json::Value>("/v1/restores", b)),
            [false, false, true, true],
        ),
        (
            "POST /v1/files/restore",
            |c, b| kind(c.post_json::<_, serde_json::Value>("/v1/files/restore", b)),
            [false, false, true, true],
        ),
        (
            "POST /v1/jobs/x/cancel",
            |c, b| kind(c.post_json::<_, serde_json::Value>("/v1/jobs/x/cancel", b)),
            [false, true, true, true],
        ),
        (
            "POST /v1/prune",
            |c, b| kind(c.post_json::<_, serde_json::Value>("/v1/prune", b)),
            [false, false, false, true],
        ),
        (
            "PUT /v1/schedules/n",
            |c, b| kind(c.put_json::<_, serde_json::Value>("/v1/schedules/n", b)),
            [false, false, false, true],
        ),
        (
            "DELETE /v1/schedules/n",
            |c, _| kind(c.delete_json::<serde_json::Value>("/v1/schedules/n")),
            [false, false, false, true],
        ),
        (
            "PUT /v1/retention/vm9",
            |c, b| kind(c.put_json::<_, serde_json::Value>("/v1/retention/vm9", b)),
            [false, false, false, true],
        ),
    ];
    for (route, call, allowed) in &matrix {
        for (i, secret) in secrets.iter().enumerate() {
            let got = call(&client(secret), &body);
            let refused = matches!(got, Some(ErrorKind::Forbidden | ErrorKind::Unauthorized));
            assert_eq!(!refused, allowed[i], "{} on {route}: {got:?}", roles[i]);
            if refused {
                assert_eq!(got, Some(ErrorKind::Forbidden), "{} on {route}", roles[i]);
            }
        }
        // A token scoped elsewhere, a wrong one: refused everywhere.
        assert_eq!(
            call(&client(&elsewhere), &body),
            Some(ErrorKind::Forbidden),
            "{route}"
        );
        assert_eq!(
            call(&client("wrong"), &body),
            Some(ErrorKind::Unauthorized),
            "{route}"
        );
    }
    let log = std::fs::read_to_string(state.join("audit.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"caller\":\"backup-user\"")
            && l.contains("/v1/prune")
            && l.contains("403")),
        "{log}"
    );
    assert!(log.lines().any(|l| l.contains("\"status\":403")), "{log}");
}

/// Tokens scoped to single VMs (`ROLE:/server/vms/NAME`): they see only their VMs, their
/// backups and the jobs about them, act only on them, and reach nothing server-wide.
#[test]
fn tokens_scoped_to_one_vm() {
    use cairn_http::access::TokenFile;
    use serde_json::{Value, json};
    let s = setup();
    let b1 = s.run(backup(&["vm1"]));
    let b2 = s.run(backup(&["vm2"]));
    assert_eq!(b1.state, JobState::Succeeded, "{:?}", b1.error);
    assert_eq!(b2.state, JobState::Succeeded, "{:?}", b2.error);
    let state = s.dir.path().join("server-state");
    std::fs::create_dir_all(&state).unwrap();
    let mut tokens = TokenFile::default();
    let vm1_restore = tokens
        .add(
            "tenant-vm1",
            vec![
                "restore:/server/vms/vm1".parse().unwrap(),
                "audit:/server/vms/vm1".parse().unwrap(),
            ],
        )
        .unwrap();
    let vm2_backup = tokens
        .add("agent-vm2", vec!["backup:/server/vms/vm2".parse().unwrap()])
        .unwrap();
    let served = Scoped::serve(&s, &state, &tokens);
    let client = |t: &str| served.client(t);
    let forbidden = |r: Result<Value, cairn_http::ClientError>| {
        let e = r.expect_err("allowed");
        assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{e}");
        e.to_string()
    };
    let backup_of = |vm: &str| -> String {
        let all: Value = client("the-admin").get_json("/v1/backups").unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|b| b["vm"] == vm)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (bk1, bk2) = (backup_of("vm1"), backup_of("vm2"));
    let names = |v: Value, key: &str| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x[key].as_str().unwrap().to_string())
            .collect()
    };

    // The tenant of vm1: sees vm1 only, restores it, nothing of vm2, nothing server-wide.
    let t = client(&vm1_restore);
    assert_eq!(names(t.get_json("/v1/vms").unwrap(), "name"), ["vm1"]);
    assert_eq!(names(t.get_json("/v1/backups").unwrap(), "vm"), ["vm1"]);
    t.get_json::<Value>(&format!("/v1/backups/{bk1}")).unwrap();
    let e = forbidden(t.get_json(&format!("/v1/backups/{bk2}")));
    assert!(
        e.contains("tenant-vm1") && e.contains("/server/vms/vm2"),
        "{e}"
    );
    forbidden(t.post_json("/v1/restores", &json!({"backup": bk2, "as_name": "x"})));
    forbidden(t.post_json("/v1/backups", &json!({"vms": ["vm1"]})));
    forbidden(t.get_json("/v1/stats"));
    forbidden(t.get_json("/v1/schedules"));
    forbidden(t.post_json("/v1/prune", &json!({})));
    let e = t
        .get_bytes(&format!("/v1/files/content?backup={bk2}&path=/vda/whole/a"))
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{e}");
    let job: Value = t
        .post_json(
            "/v1/restores",
            &json!({"backup": bk1, "as_name": "vm1-copy"}),
        )
        .unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    // The restore's job is the tenant's (its backup is vm1's), the backups' jobs of vm2 not.
    let seen: Value = t.get_json(&format!("/v1/jobs/{job_id}")).unwrap();
    assert_eq!(seen["kind"], "restore");
    let jobs = t.get_json::<Value>("/v1/jobs").unwrap();
    let ids = names(jobs, "id");
    assert!(ids.contains(&job_id), "{ids:?}");
    assert!(!ids.contains(&b2.id.to_string()), "{ids:?}");
    forbidden(t.get_json(&format!("/v1/jobs/{}", b2.id)));
    // Over an existing VM it does not hold: refused.
    forbidden(t.post_json(
        "/v1/restores",
        &json!({"backup": bk1, "as_name": "vm2", "over_existing": true}),
    ));

    // A backup token for vm2: backs up vm2, not vm1 with it, and reads no file contents.
    let a = client(&vm2_backup);
    let j: Value = a
        .post_json("/v1/backups", &json!({"vms": ["vm2"]}))
        .unwrap();
    assert!(j["id"].is_string(), "{j}");
    forbidden(a.post_json("/v1/backups", &json!({"vms": ["vm2", "vm1"]})));
    let e = a
        .get_bytes(&format!("/v1/files/content?backup={bk2}&path=/vda/whole/a"))
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{e}");
    assert_eq!(names(a.get_json("/v1/backups").unwrap(), "vm")[0], "vm2");

    // Every refusal is in the audit log, by name.
    let log = std::fs::read_to_string(state.join("audit.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"caller\":\"tenant-vm1\"")
            && l.contains("\"method\":\"GET\"")
            && l.contains(&format!("/v1/backups/{bk2}"))
            && l.contains("\"status\":403")),
        "{log}"
    );
}
