//! The host agent service over HTTPS against real QEMU without a guest: the whole VM and
//! snapshot lifecycle through `cairn_http::Client`, and the error statuses.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use cairn_http::{Client, ErrorKind, Trust};
use cairn_hypervisor::service::{
    ChangesReport, DeletedSnapshot, HostAgentService, SAVED_STATE_DIR, serve,
};
use cairn_hypervisor::{
    Changes, DiskSource, DiskSpec, QemuDriver, QemuDriverOptions, Quiesce, ResourceUsage,
    SavedState, SnapshotKind, VmInfo, VmSnapshot, VmSpec, VmState,
};
use serde_json::{Value, json};

use crate::common::{VmReaper, have, have_qemu_system, make_qcow2, run};

const TOKEN: &str = "test-token-0123456789";

/// A service on 127.0.0.1:0 over a fresh driver on `state`, after `recover()` cleared
/// `recovered` snapshots (as `cairn host-agent` does); returns its client and the task.
async fn start(
    state: &Path,
    tls_dir: &Path,
    recovered: usize,
) -> (Client, String, tokio::task::JoinHandle<()>) {
    let driver = Arc::new(QemuDriver::open(state, QemuDriverOptions::default()).unwrap());
    assert_eq!(driver.recover().await.unwrap(), recovered);
    let service = HostAgentService::qemu(driver);
    let (identity, fingerprint) = cairn_http::tls::ensure_self_signed(tls_dir, &[]).unwrap();
    let tls = cairn_http::tls::server_config(&identity).unwrap();
    let (addr, task) = serve(service, "127.0.0.1:0".parse().unwrap(), tls, TOKEN.into())
        .await
        .unwrap();
    let url = format!("https://{addr}");
    let client = Client::new(&url, TOKEN, &Trust::Fingerprint(fingerprint.clone())).unwrap();
    (client, fingerprint, task)
}

fn spec(disk: &Path) -> VmSpec {
    VmSpec {
        domain_xml: None,
        name: "agent-test".into(),
        vcpus: 1,
        memory_mib: 128,
        machine: "q35".into(),
        disks: vec![DiskSpec::qcow2("vda", disk)],
        nics: vec![],
        boot: Default::default(),
        // Running vCPUs (firmware, no OS) so a pause quiesce really pauses.
        start_paused: false,
    }
}

fn kind_of(e: cairn_http::ClientError) -> (u16, ErrorKind, String) {
    match e {
        cairn_http::ClientError::Api { status, api, .. } => (status, api.kind, api.message),
        other => panic!("expected an API error, got {other}"),
    }
}

fn nbd_uri(s: &VmSnapshot) -> String {
    match &s.disks[0].source {
        DiskSource::Nbd { socket, export } => {
            format!("nbd+unix:///{export}?socket={}", socket.display())
        }
        other => panic!("not an NBD source: {other:?}"),
    }
}

/// The client calls, blocking; run on a plain thread.
fn exercise(c: &Client, fingerprint: &str, disk: &Path, state: &Path) {
    // Health needs no token; everything else does.
    let anon = Client::new(c.base(), "wrong", &Trust::Fingerprint(fingerprint.into())).unwrap();
    let h: Value = anon.get_json("/health").unwrap();
    assert_eq!(h["status"], "ok");
    let (status, kind, _) = kind_of(anon.get_json::<Value>("/v1/vms").unwrap_err());
    assert_eq!((status, kind), (401, ErrorKind::Unauthorized));
    let (status, _, _) = kind_of(
        anon.post_json::<_, Value>("/v1/vms", &spec(disk))
            .unwrap_err(),
    );
    assert_eq!(status, 401);
    assert!(c.get_json::<Vec<VmInfo>>("/v1/vms").unwrap().is_empty());

    // Malformed requests: 400 with a JSON error, nothing started.
    let (status, kind, msg) = kind_of(
        c.post_bytes::<Value>("/v1/vms", b"{\"name\": ")
            .unwrap_err(),
    );
    assert_eq!((status, kind), (400, ErrorKind::BadRequest), "{msg}");
    let mut bad = spec(disk);
    bad.disks[0].node_name = Some("cxmine".into());
    let (status, _, msg) = kind_of(c.post_json::<_, Value>("/v1/vms", &bad).unwrap_err());
    assert_eq!(status, 400, "invalid spec: {msg}");
    assert!(c.get_json::<Vec<VmInfo>>("/v1/vms").unwrap().is_empty());

    // Unknown or malformed ids.
    let ghost = "8000000000000001";
    for path in [
        format!("/v1/vms/{ghost}"),
        format!("/v1/vms/{ghost}/usage"),
        format!("/v1/vms/{ghost}/changes?since={ghost}"),
        format!("/v1/snapshots/{ghost}"),
    ] {
        let (status, kind, msg) = kind_of(c.get_json::<Value>(&path).unwrap_err());
        assert_eq!((status, kind), (404, ErrorKind::NotFound), "{path}: {msg}");
    }
    let (status, _, _) = kind_of(
        c.post_json::<_, Value>(&format!("/v1/vms/{ghost}/snapshots"), &json!({}))
            .unwrap_err(),
    );
    assert_eq!(status, 404);
    let (status, _, _) = kind_of(
        c.delete_json::<Value>(&format!("/v1/vms/{ghost}"))
            .unwrap_err(),
    );
    assert_eq!(status, 404);
    let (status, _, _) = kind_of(c.get_json::<Value>("/v1/vms/not-an-id").unwrap_err());
    assert_eq!(status, 400);

    // Start, list, status.
    let info: VmInfo = c.post_json("/v1/vms", &spec(disk)).unwrap();
    let vm = info.handle.id;
    assert!(
        matches!(&info.state, VmState::Running { .. }),
        "{:?}",
        info.state
    );
    let list: Vec<VmInfo> = c.get_json("/v1/vms").unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].handle.id, vm);
    assert_eq!(list[0].spec, spec(disk));
    let st: VmInfo = c.get_json(&format!("/v1/vms/{vm}")).unwrap();
    assert_eq!(
        st.state,
        VmState::Running {
            status: "running".into(),
            cpus_running: true
        }
    );

    // A fleecing snapshot, paused for its window (no guest agent).
    let snaps = format!("/v1/vms/{vm}/snapshots");
    let (status, _, msg) = kind_of(
        c.post_json::<_, Value>(&snaps, &json!({"kind": "fleecing", "bogus": 1}))
            .unwrap_err(),
    );
    assert_eq!(status, 400, "unknown field: {msg}");
    let s1: VmSnapshot = c
        .post_json(
            &snaps,
            &json!({"kind": "fleecing", "quiesce": "pause_only"}),
        )
        .unwrap();
    assert_eq!(s1.vm, vm);
    assert_eq!(s1.kind, SnapshotKind::Fleecing);
    assert_eq!(s1.quiesce, Quiesce::Pause);
    assert!(s1.quiesce_window_ms < 5000, "{}", s1.quiesce_window_ms);
    let cp = s1.checkpoint.expect("a first checkpoint");
    eprintln!(
        "MEASURED host-agent snapshot: quiesce {:?}, window {} ms",
        s1.quiesce, s1.quiesce_window_ms
    );
    let inflight: Vec<VmSnapshot> = c.get_json("/v1/snapshots").unwrap();
    assert_eq!(inflight, vec![s1.clone()]);

    // The export answers, read-only, with the disk's size and its (zero) contents.
    let uri = nbd_uri(&s1);
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 16 << 20, "{info}");
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", &uri, "-c", "read -P 0 0 1M"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("read 1048576/1048576"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One snapshot per VM at a time.
    let (status, kind, _) = kind_of(c.post_json::<_, Value>(&snaps, &json!({})).unwrap_err());
    assert_eq!((status, kind), (409, ErrorKind::Conflict));

    let del: DeletedSnapshot = c.delete_json(&format!("/v1/snapshots/{}", s1.id)).unwrap();
    assert_eq!((del.snapshot, del.vm), (s1.id, vm));
    assert!(del.lifetime_ms > 0 && del.lifetime_ms < 60_000, "{del:?}");
    eprintln!(
        "MEASURED host-agent snapshot lifetime {} ms",
        del.lifetime_ms
    );
    let (status, _, _) = kind_of(
        c.delete_json::<Value>(&format!("/v1/snapshots/{}", s1.id))
            .unwrap_err(),
    );
    assert_eq!(status, 404, "second delete");
    let gone = Command::new("qemu-img")
        .args(["info", &uri])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "export still answers after delete");
    assert_eq!(std::fs::read_dir(state.join("journal")).unwrap().count(), 0);

    // Changes since the checkpoint: known (firmware without a disk to boot writes nothing).
    let ch: ChangesReport = c
        .get_json(&format!("/v1/vms/{vm}/changes?since={cp}"))
        .unwrap();
    assert_eq!(ch.disks.len(), 1);
    assert_eq!(ch.disks[0].disk, "vda");
    assert!(ch.disks[0].changes.is_known(), "{:?}", ch.disks[0].changes);
    for q in ["", "?since=", "?since=xyz"] {
        let (status, _, msg) = kind_of(
            c.get_json::<Value>(&format!("/v1/vms/{vm}/changes{q}"))
                .unwrap_err(),
        );
        assert_eq!(status, 400, "{q}: {msg}");
    }
    let unknown: ChangesReport = c
        .get_json(&format!("/v1/vms/{vm}/changes?since=8000000000000002"))
        .unwrap();
    assert!(!unknown.disks[0].changes.is_known());

    // An incremental snapshot since that checkpoint.
    let s2: VmSnapshot = c
        .post_json(&snaps, &json!({"quiesce": "pause_only", "since": cp}))
        .unwrap();
    match &s2.disks[0].changes {
        Changes::Known(k) => assert!(k.export_bitmap.is_some(), "{k:?}"),
        other => panic!("incremental changes unknown: {other:?}"),
    }
    let del2: DeletedSnapshot = c.delete_json(&format!("/v1/snapshots/{}", s2.id)).unwrap();
    eprintln!(
        "MEASURED host-agent incremental snapshot: window {} ms, lifetime {} ms",
        s2.quiesce_window_ms, del2.lifetime_ms
    );

    // Usage and execution state.
    let u: ResourceUsage = c.get_json(&format!("/v1/vms/{vm}/usage")).unwrap();
    assert_eq!(u.memory_bytes, 128 << 20);
    assert_eq!(u.vcpus.len(), 1);
    let state_path = format!("/v1/vms/{vm}/state");
    for name in ["../escape", ".hidden", "a/b", ""] {
        let (status, _, _) = kind_of(
            c.post_json::<_, Value>(&state_path, &json!({ "name": name }))
                .unwrap_err(),
        );
        assert_eq!(status, 400, "{name:?}");
    }
    let saved: SavedState = c
        .post_json(&state_path, &json!({"name": "agent-test.state"}))
        .unwrap();
    assert_eq!(
        saved.path,
        state.join(SAVED_STATE_DIR).join("agent-test.state")
    );
    assert!(saved.bytes > 100_000, "{saved:?}");
    assert_eq!(std::fs::metadata(&saved.path).unwrap().len(), saved.bytes);
    eprintln!(
        "MEASURED host-agent save state: {} bytes in {} ms, downtime {} ms",
        saved.bytes, saved.total_ms, saved.downtime_ms
    );
    let (status, _, _) = kind_of(
        c.post_json::<_, Value>(&state_path, &json!({"name": "agent-test.state"}))
            .unwrap_err(),
    );
    assert_eq!(status, 409, "existing state file");
    let dflt: SavedState = c.post_bytes(&state_path, b"").unwrap();
    assert!(dflt.path.starts_with(state.join(SAVED_STATE_DIR)));
    let st: VmInfo = c.get_json(&format!("/v1/vms/{vm}")).unwrap();
    assert!(
        matches!(
            &st.state,
            VmState::Running {
                cpus_running: true,
                ..
            }
        ),
        "{:?}",
        st.state
    );

    // Recover with nothing in flight; a snapshot left open is torn down by stop.
    let r: Value = c.post_json("/v1/recover", &json!({})).unwrap();
    assert_eq!(r["cleared"], 0);
    let s3: VmSnapshot = c
        .post_json(&snaps, &json!({"quiesce": "none", "kind": "overlay"}))
        .unwrap();
    assert_eq!(s3.quiesce, Quiesce::None);
    let stopped: Value = c
        .delete_json(&format!("/v1/vms/{vm}?timeout_ms=10000"))
        .unwrap();
    assert_eq!(stopped["stopped"], vm.to_string());
    assert!(c.get_json::<Vec<VmInfo>>("/v1/vms").unwrap().is_empty());
    assert!(
        c.get_json::<Vec<VmSnapshot>>("/v1/snapshots")
            .unwrap()
            .is_empty()
    );
    assert_eq!(std::fs::read_dir(state.join("journal")).unwrap().count(), 0);
    let (status, _, _) = kind_of(c.get_json::<Value>(&format!("/v1/vms/{vm}")).unwrap_err());
    assert_eq!(status, 404, "stopped VM is forgotten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_agent_service_over_https() {
    let test = "host_agent_service_over_https";
    if !have_qemu_system(test) || !have("qemu-io", "qemu-utils", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _reaper = VmReaper(state.clone());
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "16M");
    let (client, fingerprint, task) = start(&state, &tmp.path().join("tls"), 0).await;
    let state2 = state.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        exercise(&client, &fingerprint, &disk, &state2);
    })
    .await;
    task.abort();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// An agent that goes away with a snapshot open: the VM keeps running, the next agent on the
/// same state directory adopts it and its `recover()` tears the snapshot down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_adopts_the_vm_and_recovers_the_open_snapshot() {
    let test = "restarted_agent_adopts_the_vm_and_recovers_the_open_snapshot";
    if !have_qemu_system(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _reaper = VmReaper(state.clone());
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "16M");
    let tls = tmp.path().join("tls");

    let (c1, _, task1) = start(&state, &tls, 0).await;
    let mut s = spec(&disk);
    s.start_paused = true;
    let (vm, snap) = tokio::task::spawn_blocking(move || {
        let info: VmInfo = c1.post_json("/v1/vms", &s).unwrap();
        let vm = info.handle.id;
        let snap: VmSnapshot = c1
            .post_json(
                &format!("/v1/vms/{vm}/snapshots"),
                &json!({"quiesce": "pause_only"}),
            )
            .unwrap();
        (vm, snap)
    })
    .await
    .unwrap();
    assert_eq!(snap.quiesce, Quiesce::None, "vCPUs never ran");
    // The agent dies: its service, driver and QMP connection go away, QEMU does not.
    task1.abort();
    let _ = task1.await;
    assert_eq!(std::fs::read_dir(state.join("journal")).unwrap().count(), 1);

    let t = std::time::Instant::now();
    let (c2, _, task2) = start(&state, &tls, 1).await;
    eprintln!(
        "MEASURED host-agent restart (open driver, recover 1 snapshot, bind): {} ms",
        t.elapsed().as_millis()
    );
    let outcome = tokio::task::spawn_blocking(move || {
        let list: Vec<VmInfo> = c2.get_json("/v1/vms").unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].handle.id, vm);
        assert!(
            matches!(&list[0].state, VmState::Running { status, .. } if status == "prelaunch"),
            "{:?}",
            list[0].state
        );
        assert!(
            c2.get_json::<Vec<VmSnapshot>>("/v1/snapshots")
                .unwrap()
                .is_empty()
        );
        let (status, _, _) = kind_of(
            c2.delete_json::<Value>(&format!("/v1/snapshots/{}", snap.id))
                .unwrap_err(),
        );
        assert_eq!(status, 404, "recovered snapshot is gone");
        // The export went with it; a new snapshot may start.
        let gone = Command::new("qemu-img")
            .args(["info", &nbd_uri(&snap)])
            .output()
            .unwrap();
        assert!(!gone.status.success(), "export survived recovery");
        let again: VmSnapshot = c2
            .post_json(
                &format!("/v1/vms/{vm}/snapshots"),
                &json!({"quiesce": "pause_only"}),
            )
            .unwrap();
        let _: DeletedSnapshot = c2
            .delete_json(&format!("/v1/snapshots/{}", again.id))
            .unwrap();
        let _: Value = c2.delete_json(&format!("/v1/vms/{vm}")).unwrap();
    })
    .await;
    task2.abort();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    assert_eq!(std::fs::read_dir(state.join("journal")).unwrap().count(), 0);
}
