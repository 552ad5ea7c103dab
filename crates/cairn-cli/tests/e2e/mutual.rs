//! Least privilege between the services, each in its own process: the server's CA issues the
//! vault and the manager their certificates, the agents join with single-use tokens, and every
//! call between services uses mutual TLS. An agent's certificate cannot register another
//! agent or call anything but its own heartbeat on the manager; a caller without a
//! certificate, with one from a foreign CA, an expired or a revoked one is refused, the
//! revoked one at once on a connection it already holds. (No guest is needed: the data path
//! over mutual TLS runs in `every_flow_with_each_role_in_its_own_process`.)

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_http::ca::{Ca, JoinRequest, ServiceId};
use cairn_http::tls::Identity;
use cairn_http::{Client, ClientError, Trust};
use serde_json::{Value, json};

use super::harness::{Cluster, Service};

fn status(r: Result<Value, ClientError>) -> u16 {
    match r {
        Err(ClientError::Api { status, .. }) => status,
        Err(e) => panic!("wanted an answer, got {e}"),
        Ok(v) => panic!("unexpected success: {v}"),
    }
}

/// The call never got an answer: the TLS handshake refused the caller's certificate.
fn handshake_refused(r: Result<Value, ClientError>, what: &str) {
    match r {
        Err(ClientError::Transport { .. }) => {}
        other => panic!("{what}: wanted a refused handshake, got {other:?}"),
    }
}

fn as_who(svc: &Service, me: Option<&Identity>) -> Client {
    let token = std::fs::read_to_string(svc.token_file()).unwrap();
    Client::with_identity(
        svc.url(),
        token.trim(),
        &Trust::Fingerprint(svc.fp().into()),
        me,
    )
    .unwrap()
}

fn joined(state: &Path) -> Identity {
    Identity {
        cert_path: state.join("identity/cert.pem"),
        key_path: state.join("identity/key.pem"),
    }
}

fn registration(s: &Service, kind: &str, name: &str) -> Value {
    json!({"kind": kind, "name": name, "url": s.url(), "fingerprint": s.fp(), "token": "x"})
}

#[test]
fn mutual_tls_join_tokens_agent_bounds_and_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    std::fs::create_dir_all(t.join("ds")).unwrap();
    let c = Cluster::start_encrypted(
        t,
        &t.join("vault").display().to_string(),
        false,
        &t.join("vault.key"),
    );

    // Both agents joined and registered over mutual TLS; the server reaches the storage
    // agent with its own certificate.
    let m = c.manager.client();
    let t0 = Instant::now();
    loop {
        let agents: Value = m.get_json("/v1/agents").unwrap();
        let live = agents
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "live")
            .count();
        if live == 2 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "agents: {agents}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let stats: Value = c.server.client().get_json("/v1/stats").unwrap();
    assert!(stats.to_string().contains("s1"), "{stats}");
    for (state, id) in [("host", "host/h1"), ("storage", "storage/s1")] {
        let cert = std::fs::read(joined(&t.join(state)).cert_path).unwrap();
        let der = cairn_http::tls::first_cert_der(&mut cert.as_slice()).unwrap();
        let peer = cairn_http::mtls::PeerCert::parse(&der).unwrap();
        assert_eq!(peer.common_name, id);
    }

    // Join tokens: single use, bound to their identity, expiring.
    let server_state = t.join("server");
    let ca = Ca::open_or_create(&server_state.join("ca")).unwrap();
    let anon = Client::with_identity(
        c.server.url(),
        "",
        &Trust::Fingerprint(c.server.fp().into()),
        None,
    )
    .unwrap();
    let (_, public_key) = cairn_http::ca::new_join_key().unwrap();
    let (secret, _) = ca
        .join_token(
            &ServiceId::new("storage", "s2").unwrap(),
            Duration::from_secs(60),
        )
        .unwrap();
    let req = JoinRequest {
        token: secret,
        public_key,
        hosts: vec![],
    };
    let first: Value = anon.post_json("/v1/join", &req).unwrap();
    assert_eq!(first["id"], json!({"role": "storage", "name": "s2"}));
    assert_eq!(status(anon.post_json("/v1/join", &req)), 401, "replayed");
    let (short, _) = ca
        .join_token(
            &ServiceId::new("host", "h9").unwrap(),
            Duration::from_millis(1),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let late = JoinRequest {
        token: short,
        ..req.clone()
    };
    assert_eq!(status(anon.post_json("/v1/join", &late)), 401, "expired");
    let forged = JoinRequest {
        token: "cairn-join-00".into(),
        ..req.clone()
    };
    assert_eq!(status(anon.post_json("/v1/join", &forged)), 401, "unknown");
    let audit = std::fs::read_to_string(server_state.join("audit.log")).unwrap();
    assert!(
        audit.matches("/v1/join").count() >= 4,
        "joins audited: {audit}"
    );

    // The storage agent's own certificate (what an intruder on it holds).
    let s1 = joined(&t.join("storage"));
    let intruder = as_who(&c.manager, Some(&s1));
    let _: Value = intruder
        .post_json("/v1/agents", &registration(&c.storage, "storage", "s1"))
        .unwrap();
    for (kind, name) in [("storage", "rogue"), ("host", "h1"), ("host", "s1")] {
        assert_eq!(
            status(intruder.post_json("/v1/agents", &registration(&c.storage, kind, name))),
            403,
            "registering {kind}/{name} with s1's certificate"
        );
    }
    assert_eq!(status(intruder.get_json("/v1/agents")), 403, "credentials");
    assert_eq!(
        status(intruder.post_json("/v1/vms/vm1/guest/exec", &json!({"shell": "true"}))),
        403,
        "relay to a host"
    );
    assert_eq!(
        status(intruder.delete_json("/v1/agents/host/h1")),
        403,
        "remove an agent"
    );
    // A storage agent's certificate does not call host agents or other storage agents.
    assert_eq!(status(as_who(&c.host, Some(&s1)).get_json("/v1/vms")), 403);
    assert_eq!(
        status(as_who(&c.storage, Some(&s1)).get_json("/v1/datastores")),
        403
    );
    let manager_audit = std::fs::read_to_string(t.join("manager/audit.log")).unwrap();
    assert!(
        manager_audit.contains(r#""peer":"storage/s1""#) && manager_audit.contains("403"),
        "refused registration audited with the certificate: {manager_audit}"
    );

    // No certificate, a foreign CA's, an expired one: no handshake with any service.
    let foreign = Ca::open_or_create(&t.join("foreign-ca")).unwrap();
    let fake = foreign
        .issue(&ServiceId::new("operator", "e2e").unwrap(), &[], None)
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let old = ca
        .issue(
            &ServiceId::new("operator", "old").unwrap(),
            &[],
            Some((now - 2 * 86_400_000, now - 86_400_000)),
        )
        .unwrap();
    let write = |name: &str, p: &cairn_http::ca::IssuedPair| {
        let d = t.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cert.pem"), &p.cert_pem).unwrap();
        std::fs::write(d.join("key.pem"), &p.key_pem).unwrap();
        Identity {
            cert_path: d.join("cert.pem"),
            key_path: d.join("key.pem"),
        }
    };
    let fake = write("fake", &fake);
    let old = write("old", &old);
    for (svc, probe) in [
        (&c.manager, "/v1/agents"),
        (&c.host, "/v1/vms"),
        (&c.storage, "/v1/datastores"),
        (&c.vault, "/v1/snapshots"),
    ] {
        handshake_refused(as_who(svc, None).get_json(probe), "no certificate");
        handshake_refused(as_who(svc, Some(&fake)).get_json(probe), "foreign CA");
        handshake_refused(as_who(svc, Some(&old)).get_json(probe), "expired");
    }

    // Revocation: refused at once on the connection already open (the manager reads the
    // CA's list), and within the refresh interval by a joined agent on another "machine".
    let doomed = Cluster::issue(t, "operator/doomed");
    let on_manager = as_who(&c.manager, Some(&doomed));
    let on_storage = as_who(&c.storage, Some(&doomed));
    let _: Value = on_manager.get_json("/v1/agents").unwrap();
    let _: Value = on_storage.get_json("/v1/datastores").unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["ca", "revoke", "--state-dir"])
        .arg(&server_state)
        .arg("operator/doomed")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(status(on_manager.get_json("/v1/agents")), 403, "at once");
    handshake_refused(
        as_who(&c.manager, Some(&doomed)).get_json("/v1/agents"),
        "revoked, new connection",
    );
    let t0 = Instant::now();
    loop {
        match on_storage.get_json::<Value>("/v1/datastores") {
            Err(ClientError::Api { status: 403, .. }) | Err(ClientError::Transport { .. }) => {
                break;
            }
            r => assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the storage agent still takes a revoked certificate: {r:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "storage agent refused the revoked certificate {:.1} s after revocation",
        t0.elapsed().as_secs_f64()
    );
    // The operator's CLI presents its certificate with --client-cert/--client-key.
    let img = t.join("disk.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let me = c.vault.me.clone().unwrap();
    let backup = |with_cert: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"));
        cmd.env("CAIRN_FINGERPRINT", c.vault.fp())
            .args(["--token-file", c.vault.token_file()])
            .arg("--key-file")
            .arg(t.join("vault.key"));
        if with_cert {
            cmd.arg("--client-cert")
                .arg(&me.cert_path)
                .arg("--client-key")
                .arg(&me.key_path);
        }
        cmd.args(["image", "backup", "--repo", c.vault.url(), "--name", "cli"])
            .arg(&img)
            .output()
            .unwrap()
    };
    let refused = backup(false);
    assert!(!refused.status.success(), "a CLI without a certificate");
    let done = backup(true);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    // The operator's own certificate still works everywhere.
    let _: Value = c.storage.client().get_json("/v1/datastores").unwrap();
    let _: Value = m.get_json("/v1/agents").unwrap();
}
