//! The driver adopting a QEMU it did not start (no guest OS): a legacy `-drive` disk whose
//! block node QEMU named itself (`#block…`) next to a `-blockdev` one, fleecing snapshots
//! with checkpoint bitmaps, a refused stop, a restarted driver finding the same VM and its
//! checkpoint, and the QEMU going away.

use std::path::Path;
use std::time::Duration;

use cairn_hypervisor::{
    AdoptSource, Changes, DiskSource, DriverError, QemuCommand, QemuDriver, QemuDriverOptions,
    QuiescePolicy, SnapshotKind, SnapshotOptions, VmId, VmOrigin, VmSnapshot, VmState, adopted_id,
};

use crate::common::{have, have_qemu_system, make_qcow2, qcow2_blockdev, run};

fn driver(state: &Path, socket: &Path) -> QemuDriver {
    let options = QemuDriverOptions {
        adopt: vec![AdoptSource {
            qmp: socket.to_owned(),
            qga: None,
        }],
        ..QemuDriverOptions::default()
    };
    QemuDriver::open(state, options).unwrap()
}

fn nbd_uri(s: &VmSnapshot, disk: usize) -> String {
    match &s.disks[disk].source {
        DiskSource::Nbd { socket, export } => {
            format!("nbd+unix:///{export}?socket={}", socket.display())
        }
        other => panic!("not an NBD source: {other:?}"),
    }
}

fn reads(uri: &str, check: &str) -> bool {
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", uri, "-c", check])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("Pattern verification failed") && text.contains("read ")
}

async fn write(d: &QemuDriver, vm: VmId, device: &str, pattern: u8, offset: &str) {
    let out = d
        .qmp(vm)
        .await
        .unwrap()
        .hmp(&format!(
            "qemu-io -d {device}/virtio-backend \"write -P 0x{pattern:02x} {offset} 64k\""
        ))
        .await
        .unwrap();
    assert!(!out.contains("rror"), "{out}");
}

fn since(c: Option<cairn_hypervisor::CheckpointId>) -> SnapshotOptions {
    SnapshotOptions {
        kind: SnapshotKind::Fleecing,
        quiesce: QuiescePolicy::Auto,
        since: c,
        agent_timeout: Duration::from_millis(300),
        ..SnapshotOptions::default()
    }
}

#[tokio::test]
async fn a_foreign_qemu_is_adopted_snapshotted_and_never_stopped() {
    let name = "a_foreign_qemu_is_adopted_snapshotted_and_never_stopped";
    if !have_qemu_system(name) || !have("qemu-io", "qemu-utils", name) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.qcow2"), tmp.path().join("b.qcow2"));
    make_qcow2(&a, "16M");
    make_qcow2(&b, "16M");
    run(std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 1M"])
        .arg(&a));
    let cmd = QemuCommand::system()
        .unwrap()
        .args(["-S", "-M", "pc", "-m", "64", "-name", "foreign"])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=drive0,format=qcow2",
            a.display()
        ))
        .args(["-device", "virtio-blk-pci,id=vda,drive=drive0"])
        .args(["-blockdev", &qcow2_blockdev("data1", &b)])
        .args(["-device", "virtio-blk-pci,id=vdb,drive=data1"]);
    let socket = cmd.qmp_socket();
    let mut qemu = cmd.spawn().unwrap();
    let state = tmp.path().join("state");
    let d = driver(&state, &socket);
    let t0 = tokio::time::Instant::now();
    let vm = loop {
        if let Some(v) = d.list_vms().await.unwrap().into_iter().next() {
            break v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{}",
            qemu.read_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = vm.handle.id;
    assert_eq!(id, adopted_id(&socket));
    assert_eq!(
        vm.handle.origin,
        VmOrigin::Adopted {
            qmp_socket: socket.clone()
        }
    );
    assert_eq!(vm.handle.pid, qemu.pid());
    let ids: Vec<&str> = vm.handle.disks.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["vda", "vdb"]);
    assert!(vm.handle.disks[0].node_name.starts_with('#'), "{vm:?}");
    assert_eq!(vm.spec.disks[1].path, b);
    vm.spec.validate().unwrap();

    // Full, then incremental: the bitmap on QEMU's own #block node records exactly the write.
    let s1 = d.snapshot(id, &since(None)).await.unwrap();
    assert!(reads(&nbd_uri(&s1, 0), "read -P 0x11 0 1M"));
    d.delete_snapshot(&s1).await.unwrap();
    write(&d, id, "vda", 0x22, "4M").await;
    write(&d, id, "vdb", 0x33, "8M").await;
    let s2 = d.snapshot(id, &since(s1.checkpoint)).await.unwrap();
    for disk in &s2.disks {
        let Changes::Known(k) = &disk.changes else {
            panic!("{:?}", disk.changes)
        };
        assert_eq!(k.dirty_bytes, 65536, "{k:?}");
    }
    assert!(reads(&nbd_uri(&s2, 0), "read -P 0x22 4M 64k"));
    assert!(reads(&nbd_uri(&s2, 1), "read -P 0x33 8M 64k"));

    // Never stopped.
    let e = d.stop_vm(id, Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(e, DriverError::Refused { .. }), "{e}");

    // A new driver (agent restart) with the snapshot left in flight: recovered in the live
    // QEMU, same id, and the checkpoint still serves an incremental.
    drop(d);
    let d = driver(&state, &socket);
    assert_eq!(d.recover().await.unwrap(), 1);
    let vms = d.list_vms().await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].handle.id, id);
    assert!(vms[0].handle.disks[0].node_name.starts_with('#'));
    write(&d, id, "vda", 0x44, "12M").await;
    let s3 = d.snapshot(id, &since(s2.checkpoint)).await.unwrap();
    assert!(matches!(&s3.disks[0].changes, Changes::Known(k) if k.dirty_bytes == 65536));
    d.delete_snapshot(&s3).await.unwrap();
    assert!(qemu.try_wait().unwrap().is_none(), "QEMU must still run");

    // A disk hot-plugged by the VM's owner is in the next snapshot.
    let c = tmp.path().join("c.qcow2");
    make_qcow2(&c, "16M");
    let q = d.qmp(id).await.unwrap();
    q.execute(
        "blockdev-add",
        Some(serde_json::from_str(&qcow2_blockdev("data2", &c)).unwrap()),
    )
    .await
    .unwrap();
    q.execute(
        "device_add",
        Some(serde_json::json!({"driver": "virtio-blk-pci", "id": "vdc", "drive": "data2"})),
    )
    .await
    .unwrap();
    let s4 = d.snapshot(id, &since(s3.checkpoint)).await.unwrap();
    let ids: Vec<&str> = s4.disks.iter().map(|x| x.disk.id.as_str()).collect();
    assert_eq!(ids, ["vda", "vdb", "vdc"]);
    assert!(matches!(&s4.disks[2].changes, Changes::Unknown { .. }));
    d.delete_snapshot(&s4).await.unwrap();

    // Gone: listed as gone, then forgotten without a signal to anything.
    qemu.kill().unwrap();
    let vms = d.list_vms().await.unwrap();
    assert_eq!(vms[0].state, VmState::Gone);
    d.stop_vm(id, Duration::from_secs(1)).await.unwrap();
    assert!(d.list_vms().await.unwrap().is_empty());
}
