//! QMP answers → the adopted VM's spec, and the driver over a fake QEMU peer on a unix socket:
//! adopted, listed with its origin, never stopped, snapshots refused for unmapped disks.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::*;
use crate::driver::SnapshotOptions;
use crate::qemu::QemuDriverOptions;
use crate::spec::DiskBacking;

fn inserted(node: &str, drv: &str, file: &str, ro: bool) -> Value {
    json!({"node-name": node, "drv": drv, "file": file, "ro": ro, "encrypted": false,
           "image": {"virtual-size": 1 << 20, "filename": file, "format": drv}})
}

fn block() -> Value {
    json!([
        {"device": "", "qdev": "/machine/peripheral/vda/virtio-backend", "type": "unknown",
         "inserted": inserted("disk0", "qcow2", "/ds/a.qcow2", false)},
        {"device": "drive1", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
         "inserted": inserted("#block123", "raw", "/ds/b.raw", true)},
        {"device": "cd0", "qdev": "cdrom0", "removable": true},
    ])
}

fn nodes(names: &[&str]) -> Value {
    Value::Array(
        names
            .iter()
            .map(|n| json!({"node-name": n, "drv": "qcow2"}))
            .collect(),
    )
}

fn facts() -> QmpFacts {
    QmpFacts {
        name: json!({"name": "web 1"}),
        cpus: json!([{"cpu-index": 0}, {"cpu-index": 1}]),
        memory: json!({"base-memory": 256u64 << 20}),
        machine: json!("pc-q35-10.0-machine"),
        block: block(),
        nodes: nodes(&["disk0", "disk0-file", "#block123", "#block045"]),
        device_types: [("vda".to_owned(), "virtio-blk-pci".to_owned())].into(),
    }
}

#[test]
fn qmp_answers_map_to_a_spec() {
    let m = map_facts(&facts(), Path::new("/run/q/web.sock"));
    assert!(m.unmapped.is_empty(), "{:?}", m.unmapped);
    assert_eq!(m.spec.name, "web-1");
    assert_eq!((m.spec.vcpus, m.spec.memory_mib), (2, 256));
    assert_eq!(m.spec.machine, "pc-q35-10.0");
    assert_eq!(m.spec.boot, BootSpec::Firmware);
    assert!(!m.spec.start_paused && m.spec.nics.is_empty());
    let ids: Vec<&str> = m.spec.disks.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["vda", "drive1"], "the empty CD drive is skipped");
    let (a, b) = (&m.spec.disks[0], &m.spec.disks[1]);
    assert_eq!(
        (a.format, a.read_only, a.bus),
        (DiskFormat::Qcow2, false, DiskBus::VirtioBlk)
    );
    assert_eq!((b.format, b.read_only), (DiskFormat::Raw, true));
    // An auto-generated node name cannot go into a restored VM's spec: defaults for all.
    assert!(m.spec.disks.iter().all(|d| d.node_name.is_none()));
    m.spec.validate().expect("a restore can start it");
    assert_eq!(
        m.disks[1].node_name, "#block123",
        "the driver uses QEMU's name"
    );
    assert_eq!(
        m.disks[0].backing,
        DiskBacking::Image {
            path: "/ds/a.qcow2".into(),
            format: DiskFormat::Qcow2
        }
    );
}

#[test]
fn named_nodes_are_kept_and_missing_facts_have_defaults() {
    let mut f = QmpFacts {
        block: json!([{"device": "", "qdev": "sda",
            "inserted": inserted("os", "qcow2", "/ds/os.qcow2", false)}]),
        ..QmpFacts::default()
    };
    f.device_types.insert("sda".into(), "scsi-hd".into());
    let m = map_facts(&f, Path::new("/run/q/db01.sock"));
    assert_eq!(m.spec.name, "db01", "socket stem without query-name");
    assert_eq!((m.spec.vcpus, m.spec.memory_mib), (1, 16));
    assert_eq!(m.spec.machine, "q35");
    assert_eq!(m.spec.disks[0].node_name.as_deref(), Some("os"));
    assert_eq!(m.spec.disks[0].bus, DiskBus::VirtioScsi);
    m.spec.validate().unwrap();
}

#[test]
fn unmappable_disks_are_named_not_fatal() {
    let f = QmpFacts {
        block: json!([
            {"device": "", "qdev": "/machine/peripheral/vda/virtio-backend",
             "inserted": inserted("disk0", "qcow2", "/ds/a.qcow2", false)},
            {"device": "", "qdev": "/machine/peripheral/vdb/virtio-backend",
             "inserted": inserted("cxs-mine", "qcow2", "/ds/b.qcow2", false)},
            {"device": "", "qdev": "/machine/peripheral/vdc/virtio-backend",
             "inserted": inserted("#block9", "copy-before-write", "/ds/c.qcow2", false)},
            {"device": "", "qdev": "/machine/peripheral/vdd/virtio-backend",
             "inserted": inserted("net0", "raw", "nbd://10.0.0.1/x", false)},
            {"device": "", "qdev": "/machine/peripheral-anon/device[3]/virtio-backend",
             "inserted": inserted("#block7", "raw", "/ds/e.raw", false)},
            {"device": "", "qdev": "/machine/peripheral/vda/virtio-backend",
             "inserted": inserted("disk9", "qcow2", "/ds/f.qcow2", false)},
            {"device": "", "qdev": "/machine/peripheral/vdg/virtio-backend",
             "inserted": {"drv": "qcow2", "file": "/ds/g.qcow2"}},
        ]),
        ..QmpFacts::default()
    };
    let m = map_facts(&f, Path::new("/q.sock"));
    assert_eq!(m.disks.len(), 1);
    assert_eq!(m.spec.disks[0].id, "vda");
    let all = m.unmapped.join("\n");
    for needle in [
        "disk vdb: node cxs-mine or device vdb starts with Cairn's reserved prefix",
        "disk vdc: node #block9 is a \"copy-before-write\" node",
        "disk vdd: image \"nbd://10.0.0.1/x\" is not a local file",
        "disk #block7: no usable device id",
        "disk vda: device id used twice",
        "disk vdg: no block node name",
    ] {
        assert!(all.contains(needle), "{needle:?} not in\n{all}");
    }
    assert_eq!(m.unmapped.len(), 6);
}

#[test]
fn sources_parse_and_ids_are_stable() {
    let s: AdoptSource = "/run/q/a.sock,qga=/run/q/a.qga".parse().unwrap();
    assert_eq!(s.qmp, PathBuf::from("/run/q/a.sock"));
    assert_eq!(s.qga, Some(PathBuf::from("/run/q/a.qga")));
    let s: AdoptSource = "/run/q/a.sock".parse().unwrap();
    assert_eq!(s.qga, None);
    assert!("".parse::<AdoptSource>().is_err());
    assert!("/a.sock,qga=".parse::<AdoptSource>().is_err());
    let rel: AdoptSource = "rel.sock".parse().unwrap();
    assert!(rel.qmp.is_absolute());
    let a = adopted_id(Path::new("/run/q/a.sock"));
    assert_eq!(a, adopted_id(Path::new("/run/q/a.sock")));
    assert_ne!(a, adopted_id(Path::new("/run/q/b.sock")));
    // Pinned: ids must not change between builds, or adopted VMs would change ids.
    assert_eq!(a.to_string(), "b884c47290d85d1b");
    assert_eq!(
        adopted_id(Path::new("")).to_string(),
        format!("{:016x}", 0xcbf2_9ce4_8422_2325u64 | 1 << 63)
    );
}

#[test]
fn a_directory_expands_to_its_sockets_with_guest_agents() {
    let dir = tempfile::tempdir().unwrap();
    let bind = |n: &str| std::os::unix::net::UnixListener::bind(dir.path().join(n)).unwrap();
    let _l = [bind("b.sock"), bind("a.sock"), bind("a.qga.sock")];
    std::fs::write(dir.path().join("notes.sock"), b"not a socket").unwrap();
    let got = expand(&[AdoptSource {
        qmp: dir.path().into(),
        qga: None,
    }]);
    assert_eq!(
        got,
        vec![
            AdoptSource {
                qmp: dir.path().join("a.sock"),
                qga: Some(dir.path().join("a.qga.sock")),
            },
            AdoptSource {
                qmp: dir.path().join("b.sock"),
                qga: None,
            },
        ]
    );
}

/// A fake QEMU answering each command from `answers` (unknown ones: `CommandNotFound`),
/// connection after connection; every command it saw goes to the returned log.
fn fake_qemu(path: &Path, answers: Value) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (r, mut w) = stream.into_split();
            let greeting = json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0,
                "micro": 2}, "package": "fake"}, "capabilities": []}});
            w.write_all(format!("{greeting}\r\n").as_bytes())
                .await
                .unwrap();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let req: Value = serde_json::from_str(&line).unwrap();
                let cmd = req["execute"].as_str().unwrap_or_default().to_owned();
                let reply = match (cmd.as_str(), answers.get(&cmd)) {
                    ("qmp_capabilities", _) => json!({"return": {}}),
                    (_, Some(v)) => json!({"return": v}),
                    _ => json!({"error": {"class": "CommandNotFound", "desc": cmd}}),
                };
                log.lock().unwrap().push(cmd);
                let mut reply = reply;
                reply["id"] = req["id"].clone();
                if w.write_all(format!("{reply}\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    seen
}

#[tokio::test]
async fn the_driver_adopts_lists_and_never_stops_a_foreign_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("web.sock");
    let mut b = block();
    b[1]["inserted"]["node-name"] = json!("cxdata");
    let seen = fake_qemu(
        &sock,
        json!({
            "query-name": {"name": "web"},
            "query-cpus-fast": [{"cpu-index": 0}],
            "query-memory-size-summary": {"base-memory": 128u64 << 20},
            "query-block": b,
            "query-named-block-nodes": nodes(&["disk0", "cxdata"]),
            "query-status": {"status": "running", "running": true},
            "query-block-exports": [],
            "query-block-jobs": [],
        }),
    );
    let options = QemuDriverOptions {
        adopt: vec![AdoptSource {
            qmp: tmp.path().to_owned(),
            qga: None,
        }],
        ..QemuDriverOptions::default()
    };
    let driver = QemuDriver::open(&tmp.path().join("state"), options).unwrap();
    let vms = driver.list_vms().await.unwrap();
    assert_eq!(vms.len(), 1);
    let v = &vms[0];
    assert_eq!(v.handle.id, adopted_id(&sock));
    assert_eq!(
        v.handle.origin,
        VmOrigin::Adopted {
            qmp_socket: sock.clone()
        }
    );
    assert_eq!(
        v.handle.pid,
        std::process::id(),
        "SO_PEERCRED names the peer"
    );
    assert_eq!(v.spec.name, "web");
    assert_eq!(v.spec.disks.len(), 1);
    assert!(
        matches!(&v.state, crate::driver::VmState::Running { status, .. } if status == "running"),
        "{:?}",
        v.state
    );
    // Listing again keeps the same VM (one connection, no re-read).
    assert_eq!(driver.list_vms().await.unwrap().len(), 1);

    let id = v.handle.id;
    let e = driver
        .stop_vm(id, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, DriverError::Refused { reason, .. } if reason.contains("never stopped")),
        "{e}"
    );
    let e = driver
        .snapshot(id, &SnapshotOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, DriverError::Refused { reason, .. } if reason.contains("cxdata")),
        "{e}"
    );
    assert_eq!(driver.recover().await.unwrap(), 0);
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.iter().any(|c| c == "quit" || c == "stop"), "{seen:?}");
    assert_eq!(
        seen.iter().filter(|c| *c == "qmp_capabilities").count(),
        1,
        "one connection: {seen:?}"
    );
    // Nothing about the adopted VM is written to the registry.
    assert!(!tmp.path().join(format!("state/vms/{id}/vm.json")).exists());
    // The agent itself is still here: SIGKILL never went to our own PID.
}
