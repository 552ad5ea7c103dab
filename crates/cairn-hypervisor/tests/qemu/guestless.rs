//! The fast tier: QEMU with no guest (`-S`, prelaunch) or `qemu-storage-daemon`, answering QMP
//! in a fraction of a second.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_hypervisor::{
    GuestAgent, QemuCommand, QemuProcess, QgaError, QgaOptions, QmpClient, QmpError, QmpErrorClass,
};
use serde_json::{Value, json};

use crate::common::{have, have_qemu_system, make_qcow2, qcow2_blockdev, run, start};

/// HMP `qemu-io -d` wants the qdev that owns the block backend: for virtio-blk-pci that is the
/// proxy's `virtio-backend` child, not the proxy itself.
const QEMU_IO_DEVICE: &str = "vda/virtio-backend";

/// A paused (`-S`) VM with one qcow2 disk `disk0` on a virtio-blk device `vda`.
async fn paused_vm(disk: &Path) -> (QemuProcess, QmpClient) {
    make_qcow2(disk, "64M");
    let cmd = QemuCommand::system()
        .unwrap()
        .args(["-S", "-m", "128", "-blockdev"])
        .arg(qcow2_blockdev("disk0", disk))
        .args(["-device", "virtio-blk-pci,id=vda,drive=disk0"]);
    start(cmd).await
}

fn node_names(nodes: &Value) -> Vec<String> {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
        .collect()
}

/// The node name at the root of device `vda`.
async fn root_node(qmp: &QmpClient) -> String {
    let blocks = qmp.execute("query-block", None).await.unwrap();
    let vda = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains("vda")))
        .unwrap_or_else(|| panic!("no vda in {blocks}"));
    vda["inserted"]["node-name"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn status_and_block_queries() {
    if !have_qemu_system("status_and_block_queries") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (_proc, qmp) = paused_vm(&tmp.path().join("disk.qcow2")).await;
    eprintln!("QMP ready after {:?}", started.elapsed());
    let v = &qmp.greeting().version;
    assert!(v.major >= 7, "QEMU {v:?}");

    let status = qmp.query_status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.status, "prelaunch");

    assert_eq!(root_node(&qmp).await, "disk0");
    let nodes = qmp.execute("query-named-block-nodes", None).await.unwrap();
    assert!(node_names(&nodes).contains(&"disk0".to_owned()), "{nodes}");
}

#[tokio::test]
async fn events_are_buffered_until_waited_for() {
    if !have_qemu_system("events_are_buffered_until_waited_for") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_proc, qmp) = paused_vm(&tmp.path().join("disk.qcow2")).await;
    qmp.execute("cont", None).await.unwrap();
    qmp.execute("stop", None).await.unwrap();
    // Both events arrived before anyone waited; they must still be there, in order.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resume = qmp
        .wait_event("RESUME", |_| true, Duration::from_secs(5))
        .await
        .unwrap();
    let stop = qmp
        .wait_event("STOP", |_| true, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(resume.timestamp_us <= stop.timestamp_us);
    // Consumed: a second wait times out, typed.
    let err = qmp
        .wait_event("STOP", |_| true, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
}

#[tokio::test]
async fn snapshot_then_commit_back() {
    if !have_qemu_system("snapshot_then_commit_back") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.qcow2");
    let overlay = tmp.path().join("overlay.qcow2");
    let (mut proc, qmp) = paused_vm(&disk).await;

    let t = Instant::now();
    qmp.execute(
        "blockdev-snapshot-sync",
        Some(json!({
            "node-name": "disk0",
            "snapshot-file": overlay,
            "snapshot-node-name": "overlay0",
            "format": "qcow2",
        })),
    )
    .await
    .unwrap();
    eprintln!("external snapshot took {:?}", t.elapsed());
    assert_eq!(root_node(&qmp).await, "overlay0");

    // A write lands in the overlay; the base stays the point-in-time image.
    let out = qmp
        .hmp(&format!(
            r#"qemu-io -d {QEMU_IO_DEVICE} "write -P 0xaa 1M 64k""#
        ))
        .await
        .unwrap();
    assert!(!out.contains("rror"), "qemu-io: {out}");

    qmp.execute(
        "block-commit",
        Some(json!({"job-id": "commit0", "device": "overlay0"})),
    )
    .await
    .unwrap();
    let is_ours = |e: &cairn_hypervisor::QmpEvent| e.data["device"] == "commit0";
    qmp.wait_event("BLOCK_JOB_READY", is_ours, Duration::from_secs(30))
        .await
        .unwrap();
    qmp.execute("job-complete", Some(json!({"id": "commit0"})))
        .await
        .unwrap();
    let done = qmp
        .wait_event("BLOCK_JOB_COMPLETED", is_ours, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(done.data.get("error").is_none(), "{:?}", done.data);
    assert_eq!(root_node(&qmp).await, "disk0");

    // After a clean quit the base holds the write.
    proc.quit(&qmp, Duration::from_secs(10)).await.unwrap();
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0xaa 1M 64k"])
        .arg(&disk));
    assert!(!out.contains("fail"), "{out}");
}

#[tokio::test]
async fn persistent_dirty_bitmap_counts_writes() {
    if !have_qemu_system("persistent_dirty_bitmap_counts_writes") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.qcow2");
    let (mut proc, qmp) = paused_vm(&disk).await;
    qmp.execute(
        "block-dirty-bitmap-add",
        Some(json!({"node": "disk0", "name": "cbt0", "persistent": true,
                    "granularity": 65536})),
    )
    .await
    .unwrap();
    for write in [r#""write -P 0xaa 4M 64k""#, r#""write -P 0x55 8M 128k""#] {
        let out = qmp
            .hmp(&format!("qemu-io -d {QEMU_IO_DEVICE} {write}"))
            .await
            .unwrap();
        assert!(!out.contains("rror"), "qemu-io: {out}");
    }

    let blocks = qmp.execute("query-block", None).await.unwrap();
    let bitmaps = &blocks[0]["inserted"]["dirty-bitmaps"];
    let cbt = bitmaps
        .as_array()
        .and_then(|a| a.iter().find(|b| b["name"] == "cbt0"))
        .unwrap_or_else(|| panic!("no cbt0 in {blocks}"));
    assert_eq!(cbt["count"], 3 * 65536, "{cbt}");
    assert_eq!(cbt["persistent"], true);

    // A clean quit stores the bitmap in the image.
    proc.quit(&qmp, Duration::from_secs(10)).await.unwrap();
    let info: Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)))
    .unwrap();
    let stored = &info["format-specific"]["data"]["bitmaps"];
    assert!(
        stored
            .as_array()
            .is_some_and(|a| a.iter().any(|b| b["name"] == "cbt0")),
        "{info}"
    );
}

#[tokio::test]
async fn unknown_command_and_bad_arguments_are_typed_errors() {
    if !have_qemu_system("unknown_command_and_bad_arguments_are_typed_errors") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_proc, qmp) = paused_vm(&tmp.path().join("disk.qcow2")).await;
    let err = qmp
        .execute("cairn-no-such-command", None)
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some(&QmpErrorClass::CommandNotFound), "{err}");
    let err = qmp
        .execute(
            "block-dirty-bitmap-add",
            Some(json!({"node": "nope", "name": "x"})),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Command { .. }), "{err}");
    // The connection stays usable.
    qmp.query_status().await.unwrap();
}

#[tokio::test]
async fn qemu_killed_mid_wait_is_disconnected_not_a_hang() {
    if !have_qemu_system("qemu_killed_mid_wait_is_disconnected_not_a_hang") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut proc, qmp) = paused_vm(&tmp.path().join("disk.qcow2")).await;
    let t = Instant::now();
    let (res, _) = tokio::join!(
        qmp.wait_event("CAIRN_NEVER", |_| true, Duration::from_secs(30)),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            proc.kill().unwrap();
        }
    );
    let err = res.unwrap_err();
    assert!(err.is_disconnected(), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    eprintln!("wait failed {:?} after start: {err}", t.elapsed());
    let err = qmp.execute("query-status", None).await.unwrap_err();
    assert!(err.is_disconnected(), "{err}");
}

fn signal(proc: &QemuProcess, sig: &str) {
    run(Command::new("kill").args([sig, &proc.pid().to_string()]));
}

#[tokio::test]
async fn qemu_killed_mid_command_and_late_replies() {
    if !have_qemu_system("qemu_killed_mid_command_and_late_replies") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut proc, qmp) = paused_vm(&tmp.path().join("disk.qcow2")).await;

    // A stopped QEMU cannot answer: the command times out, typed.
    signal(&proc, "-STOP");
    let err = qmp
        .execute_with_timeout("query-status", None, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // Once it runs again, its late reply must not be taken for the next command's.
    signal(&proc, "-CONT");
    let v = qmp.execute("query-name", None).await.unwrap();
    assert!(
        v.get("status").is_none(),
        "late query-status reply leaked: {v}"
    );

    // Killed while a command is in flight: Disconnected, promptly.
    signal(&proc, "-STOP");
    let t = Instant::now();
    let (res, _) = tokio::join!(
        qmp.execute_with_timeout("query-status", None, Duration::from_secs(30)),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            proc.kill().unwrap();
        }
    );
    let err = res.unwrap_err();
    assert!(err.is_disconnected(), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn silent_guest_agent_times_out() {
    if !have_qemu_system("silent_guest_agent_times_out") {
        return;
    }
    // The agent's channel exists, but the guest never runs (-S): nobody answers.
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "16M");
    let cmd = QemuCommand::system().unwrap();
    let qga_sock = cmd.dir().join("qga.sock");
    let cmd = cmd
        .args([
            "-S",
            "-m",
            "128",
            "-device",
            "virtio-serial-pci",
            "-chardev",
        ])
        .arg(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            qga_sock.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    let (_proc, _qmp) = start(cmd).await;
    let qga = GuestAgent::new(
        &qga_sock,
        QgaOptions {
            sync_timeout: Duration::from_millis(300),
            ..QgaOptions::default()
        },
    );
    let t = Instant::now();
    let err = qga.wait_ready(Duration::from_secs(1)).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let err = qga
        .execute_with_timeout("guest-ping", None, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(err, QgaError::Timeout { .. }), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn storage_daemon_answers_qmp() {
    if !have(
        "qemu-storage-daemon",
        "qemu-utils",
        "storage_daemon_answers_qmp",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "16M");
    let cmd = QemuCommand::storage_daemon()
        .unwrap()
        .arg("--blockdev")
        .arg(qcow2_blockdev("sd0", &disk));
    let (_proc, qmp) = start(cmd).await;
    let nodes = qmp.execute("query-named-block-nodes", None).await.unwrap();
    assert!(node_names(&nodes).contains(&"sd0".to_owned()), "{nodes}");
}
