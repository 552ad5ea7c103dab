//! The driver against real QEMU with no guest OS (fast tier): VMs from a `VmSpec`, fleecing and
//! overlay snapshots, change tracking across a SIGKILL, cleanup of failed snapshots, recovery
//! after an agent crash, execution state and resource usage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_hypervisor::{
    Changes, DiskBacking, DiskBus, DiskFormat, DiskSource, DiskSpec, DriverError, HypervisorDriver,
    NicSpec, QemuDriver, QemuDriverOptions, Quiesce, QuiescePolicy, SnapshotKind, SnapshotOptions,
    UnknownReason, VmId, VmSnapshot, VmSpec, VmState,
};
use serde_json::Value;

use crate::common::{VmReaper, have, have_qemu_system, make_qcow2, run};

const QEMU_IO_DEVICE: &str = "vda/virtio-backend";

fn driver(state: &Path) -> QemuDriver {
    QemuDriver::open(state, QemuDriverOptions::default()).unwrap()
}

fn spec(disk: &Path, paused: bool) -> VmSpec {
    VmSpec {
        domain_xml: None,
        name: "test-vm".into(),
        vcpus: 1,
        memory_mib: 128,
        machine: "q35".into(),
        disks: vec![DiskSpec::qcow2("vda", disk)],
        nics: vec![],
        boot: Default::default(),
        start_paused: paused,
    }
}

fn opts(kind: SnapshotKind) -> SnapshotOptions {
    SnapshotOptions {
        kind,
        quiesce: QuiescePolicy::PauseOnly,
        ..SnapshotOptions::default()
    }
}

async fn hmp_write(d: &QemuDriver, vm: VmId, pattern: u8, offset: &str, len: &str) {
    let qmp = d.qmp(vm).await.unwrap();
    let out = qmp
        .hmp(&format!(
            "qemu-io -d {QEMU_IO_DEVICE} \"write -P 0x{pattern:02x} {offset} {len}\""
        ))
        .await
        .unwrap();
    assert!(!out.contains("rror"), "{out}");
}

/// Everything in QEMU's block layer a snapshot could leave behind.
#[derive(Debug, PartialEq, Eq)]
struct Graph {
    nodes: Vec<String>,
    exports: Vec<String>,
    jobs: Vec<String>,
    /// (node, bitmap, recording)
    bitmaps: Vec<(String, String, bool)>,
}

async fn graph(d: &QemuDriver, vm: VmId) -> Graph {
    let qmp = d.qmp(vm).await.unwrap();
    let nodes = qmp
        .execute(
            "query-named-block-nodes",
            Some(serde_json::json!({"flat": true})),
        )
        .await
        .unwrap();
    let mut names = Vec::new();
    let mut bitmaps = Vec::new();
    for n in nodes.as_array().unwrap() {
        let name = n["node-name"].as_str().unwrap().to_owned();
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            bitmaps.push((
                name.clone(),
                b["name"].as_str().unwrap().to_owned(),
                b["recording"].as_bool().unwrap(),
            ));
        }
        if !name.starts_with('#') {
            names.push(name);
        }
    }
    let ids = |v: Value, k: &str| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e[k].as_str().unwrap().to_owned())
            .collect()
    };
    names.sort();
    bitmaps.sort();
    Graph {
        nodes: names,
        exports: ids(
            qmp.execute("query-block-exports", None).await.unwrap(),
            "id",
        ),
        jobs: ids(
            qmp.execute("query-block-jobs", None).await.unwrap(),
            "device",
        ),
        bitmaps,
    }
}

fn nbd_uri(s: &VmSnapshot, disk: usize) -> String {
    match &s.disks[disk].source {
        DiskSource::Nbd { socket, export } => {
            format!("nbd+unix:///{export}?socket={}", socket.display())
        }
        other => panic!("not an NBD source: {other:?}"),
    }
}

fn journal_len(state: &Path) -> usize {
    std::fs::read_dir(state.join("journal")).unwrap().count()
}

/// `qemu-io -r` against an image or NBD URI; true when the pattern check passes.
fn qemu_io_reads(target: &str, extra: &[&str], check: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-r"])
        .args(extra)
        .arg(target)
        .args(["-c", check])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("Pattern verification failed") && text.contains("read ")
}

fn kill9(pid: u32) {
    run(Command::new("kill").args(["-9", &pid.to_string()]));
}

#[tokio::test]
async fn driver_starts_lists_and_stops_vms_from_a_spec() {
    if !have_qemu_system("driver_starts_lists_and_stops_vms_from_a_spec") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().join("state"));
    let d = driver(&tmp.path().join("state"));
    let (a, b, c) = (
        tmp.path().join("a.qcow2"),
        tmp.path().join("b.img"),
        tmp.path().join("c.qcow2"),
    );
    make_qcow2(&a, "32M");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&b)
        .arg("8M"));
    make_qcow2(&c, "16M");
    let mut s = spec(&a, true);
    s.vcpus = 2;
    s.disks.push(DiskSpec {
        bus: DiskBus::VirtioScsi,
        format: DiskFormat::Raw,
        lun: Some("naa.6001405abcdef".into()),
        ..DiskSpec::qcow2("sda", &b)
    });
    s.disks.push(DiskSpec {
        bus: DiskBus::Ide,
        read_only: true,
        ..DiskSpec::qcow2("hda", &c)
    });
    s.nics.push(NicSpec {
        model: "virtio-net-pci".into(),
        mac: "52:54:00:aa:bb:cc".into(),
    });
    let h = d.start_vm(&s).await.unwrap();
    assert_eq!(h.disks.len(), 3);
    assert_eq!(
        h.disks[1].backing,
        DiskBacking::RawDevice {
            path: b.clone(),
            identifier: "naa.6001405abcdef".into()
        }
    );
    let list = d.list_vms().await.unwrap();
    assert_eq!(list.len(), 1);
    assert!(
        matches!(&list[0].state, VmState::Running { status, .. } if status == "prelaunch"),
        "{:?}",
        list[0].state
    );
    assert_eq!(list[0].spec, s);

    let u = d.resource_usage(h.id).await.unwrap();
    eprintln!("resource usage: {u:?}");
    assert_eq!(u.memory_bytes, 128 << 20);
    assert_eq!(u.vcpus.len(), 2);
    assert!(u.rss_bytes > 1 << 20 && u.process_cpu_time_ms > 0, "{u:?}");
    let mut devs: Vec<_> = u.disks.iter().map(|d| d.device.as_str()).collect();
    devs.sort();
    assert_eq!(devs, ["hda", "sda", "vda"]);

    // The record survives an agent restart.
    drop(d);
    let d = driver(&tmp.path().join("state"));
    let info = d.vm_status(h.id).await.unwrap();
    assert!(matches!(info.state, VmState::Running { .. }), "{info:?}");
    d.stop_vm(h.id, Duration::from_secs(10)).await.unwrap();
    assert!(d.list_vms().await.unwrap().is_empty());
    assert!(matches!(
        d.vm_status(h.id).await,
        Err(DriverError::UnknownVm(_))
    ));
}

#[tokio::test]
async fn fleecing_is_point_in_time_and_bitmaps_record_exactly_the_writes() {
    if !have_qemu_system("fleecing_is_point_in_time") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().join("state"));
    let state = tmp.path().join("state");
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "64M");
    let d = driver(&state);
    let vm = d.start_vm(&spec(&disk, true)).await.unwrap().id;
    let before = graph(&d, vm).await;
    hmp_write(&d, vm, 0xaa, "0", "1M").await;

    // Full: no previous checkpoint.
    let s1 = d.snapshot(vm, &opts(SnapshotKind::Fleecing)).await.unwrap();
    let c1 = s1.checkpoint.expect("a checkpoint");
    assert_eq!(s1.quiesce, Quiesce::None, "prelaunch VM needs no pause");
    assert_eq!(
        s1.disks[0].changes,
        Changes::Unknown {
            reason: UnknownReason::NoPreviousCheckpoint
        }
    );
    assert_eq!(s1.disks[0].size, 64 << 20);
    // Written after the snapshot: the export still shows the old data.
    hmp_write(&d, vm, 0xbb, "0", "64k").await;
    let uri = nbd_uri(&s1, 0);
    assert!(qemu_io_reads(&uri, &["-f", "raw"], "read -P 0xaa 0 1M"));
    assert!(qemu_io_reads(&uri, &["-f", "raw"], "read -P 0 1M 1M"));
    assert_eq!(journal_len(&state), 1);
    let life = d.delete_snapshot(&s1).await.unwrap();
    eprintln!("fleecing snapshot lifetime {life} ms");
    assert_eq!(journal_len(&state), 0);

    // Incremental: exactly the clusters written since c1.
    hmp_write(&d, vm, 0xcc, "4M", "64k").await;
    hmp_write(&d, vm, 0xdd, "8M", "128k").await;
    let s2 = d
        .snapshot(
            vm,
            &SnapshotOptions {
                since: Some(c1),
                ..opts(SnapshotKind::Fleecing)
            },
        )
        .await
        .unwrap();
    let Changes::Known(k) = &s2.disks[0].changes else {
        panic!("{:?}", s2.disks[0].changes)
    };
    assert_eq!(k.dirty_bytes, 4 * 65536, "{k:?}");
    let ctx = k.meta_context.clone().unwrap();
    assert!(ctx.starts_with("qemu:dirty-bitmap:"));
    if have("nbdinfo", "libnbd-bin", "fleecing bitmap map") {
        let map = run(Command::new("nbdinfo")
            .arg(format!("--map={ctx}"))
            .arg(nbd_uri(&s2, 0)));
        let dirty: Vec<(u64, u64)> = map
            .lines()
            .filter(|l| l.contains("dirty"))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].parse().unwrap(), f[1].parse().unwrap())
            })
            .collect();
        assert_eq!(
            dirty,
            vec![(0, 65536), (4 << 20, 65536), (8 << 20, 131072)],
            "{map}"
        );
    }
    assert!(qemu_io_reads(
        &nbd_uri(&s2, 0),
        &["-f", "raw"],
        "read -P 0xdd 8M 128k"
    ));
    d.delete_snapshot(&s2).await.unwrap();
    // Nothing left but the checkpoint bitmaps: c1 disabled, c2 recording.
    let after = graph(&d, vm).await;
    assert_eq!(after.nodes, before.nodes);
    assert!(
        after.exports.is_empty() && after.jobs.is_empty(),
        "{after:?}"
    );
    let c2 = s2.checkpoint.unwrap();
    assert_eq!(after.bitmaps, {
        let mut v = vec![
            ("disk0".to_owned(), c1.bitmap_name(), false),
            ("disk0".to_owned(), c2.bitmap_name(), true),
        ];
        v.sort();
        v
    });
    // changes_since(c1) now spans both checkpoints.
    let ch = d.changes_since(vm, c1).await.unwrap();
    let Changes::Known(k) = &ch[0].1 else {
        panic!("{ch:?}")
    };
    assert_eq!(k.bitmaps, vec![c1.bitmap_name(), c2.bitmap_name()]);
    assert!(matches!(
        d.delete_snapshot(&s2).await,
        Err(DriverError::UnknownSnapshot(_))
    ));
    d.stop_vm(vm, Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn overlay_snapshot_freezes_the_base_and_commit_restores_one_chain() {
    if !have_qemu_system("overlay_snapshot") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().join("state"));
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "64M");
    let d = driver(&tmp.path().join("state"));
    let vm = d.start_vm(&spec(&disk, true)).await.unwrap().id;
    hmp_write(&d, vm, 0xaa, "0", "256k").await;
    let s = d.snapshot(vm, &opts(SnapshotKind::Overlay)).await.unwrap();
    assert_eq!(
        s.disks[0].source,
        DiskSource::File {
            path: disk.clone(),
            format: "qcow2".into()
        }
    );
    hmp_write(&d, vm, 0xbb, "0", "64k").await;
    let base = disk.display().to_string();
    assert!(qemu_io_reads(
        &base,
        &["-U", "-f", "qcow2"],
        "read -P 0xaa 0 256k"
    ));
    let overlays: Vec<PathBuf> = std::fs::read_dir(d.state_dir().join("scratch"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(overlays.len(), 1, "{overlays:?}");

    let life = d.delete_snapshot(&s).await.unwrap();
    eprintln!("overlay snapshot lifetime {life} ms (incl. commit)");
    assert!(!overlays[0].exists());
    let qmp = d.qmp(vm).await.unwrap();
    let blocks = qmp.execute("query-block", None).await.unwrap();
    let inserted = &blocks[0]["inserted"];
    assert_eq!(inserted["node-name"], "disk0", "{blocks}");
    assert!(inserted["image"]["backing-image"].is_null(), "{blocks}");
    assert!(graph(&d, vm).await.jobs.is_empty());
    d.stop_vm(vm, Duration::from_secs(10)).await.unwrap();
    assert!(qemu_io_reads(&base, &["-f", "qcow2"], "read -P 0xbb 0 64k"));
    assert!(qemu_io_reads(
        &base,
        &["-f", "qcow2"],
        "read -P 0xaa 64k 192k"
    ));
    run(Command::new("qemu-img").arg("check").arg(&disk));
}

#[tokio::test]
async fn bitmap_of_a_killed_qemu_is_reported_inconsistent_and_removed() {
    if !have_qemu_system("bitmap_inconsistent_after_sigkill") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().join("state"));
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "64M");
    let d = driver(&tmp.path().join("state"));
    let h = d.start_vm(&spec(&disk, true)).await.unwrap();
    let s = d
        .snapshot(h.id, &opts(SnapshotKind::Fleecing))
        .await
        .unwrap();
    d.delete_snapshot(&s).await.unwrap();
    let c1 = s.checkpoint.unwrap();
    // A clean quit stores the bitmap; the next QEMU marks it in use, and dies by SIGKILL.
    d.stop_vm(h.id, Duration::from_secs(10)).await.unwrap();
    let h = d.start_vm(&spec(&disk, true)).await.unwrap();
    let ch = d.changes_since(h.id, c1).await.unwrap();
    assert!(ch[0].1.is_known(), "{ch:?}");
    kill9(h.pid);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(d.vm_status(h.id).await.unwrap().state, VmState::Gone);
    d.stop_vm(h.id, Duration::from_secs(5)).await.unwrap();

    let vm = d.start_vm(&spec(&disk, true)).await.unwrap().id;
    let g = graph(&d, vm).await;
    assert!(
        g.bitmaps.iter().any(|(_, n, _)| n == &c1.bitmap_name()),
        "reloaded: {g:?}"
    );
    let ch = d.changes_since(vm, c1).await.unwrap();
    assert_eq!(
        ch,
        vec![(
            "vda".to_owned(),
            Changes::Unknown {
                reason: UnknownReason::BitmapInconsistent
            }
        )]
    );
    assert!(graph(&d, vm).await.bitmaps.is_empty());
    // The backup goes on as a full one, and starts a fresh checkpoint.
    let s = d
        .snapshot(
            vm,
            &SnapshotOptions {
                since: Some(c1),
                ..opts(SnapshotKind::Fleecing)
            },
        )
        .await
        .unwrap();
    assert_eq!(
        s.disks[0].changes,
        Changes::Unknown {
            reason: UnknownReason::BitmapMissing
        }
    );
    d.delete_snapshot(&s).await.unwrap();
    d.stop_vm(vm, Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn failed_snapshots_leave_nothing_behind() {
    if !have_qemu_system("failed_snapshots_leave_nothing_behind") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().join("state"));
    let state = tmp.path().join("state");
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "64M");
    let d = driver(&state);
    let vm = d.start_vm(&spec(&disk, true)).await.unwrap().id;
    let s = d.snapshot(vm, &opts(SnapshotKind::Fleecing)).await.unwrap();
    d.delete_snapshot(&s).await.unwrap();
    let c1 = s.checkpoint.unwrap();
    let before = graph(&d, vm).await;
    let incremental = |scratch: Option<PathBuf>| SnapshotOptions {
        since: Some(c1),
        scratch_dir: scratch,
        ..opts(SnapshotKind::Fleecing)
    };

    // 1. Before the transaction: the scratch directory does not exist.
    let err = d
        .snapshot(vm, &incremental(Some(tmp.path().join("no/such/dir"))))
        .await
        .unwrap_err();
    eprintln!("injected failure 1: {err}");
    assert_eq!(graph(&d, vm).await, before);
    assert_eq!(journal_len(&state), 0);

    // 2. After the transaction: an NBD server someone else started makes the export fail.
    let qmp = d.qmp(vm).await.unwrap();
    let foreign = tmp.path().join("foreign.sock");
    qmp.execute(
        "nbd-server-start",
        Some(serde_json::json!({"addr": {"type": "unix", "data": {"path": foreign}}})),
    )
    .await
    .unwrap();
    let err = d.snapshot(vm, &incremental(None)).await.unwrap_err();
    eprintln!("injected failure 2: {err}");
    assert_eq!(graph(&d, vm).await, before, "checkpoint rolled back too");
    assert_eq!(journal_len(&state), 0);
    assert_eq!(std::fs::read_dir(state.join("scratch")).unwrap().count(), 0);
    qmp.execute("nbd-server-stop", None).await.unwrap();

    // The chain still works.
    let s = d.snapshot(vm, &incremental(None)).await.unwrap();
    assert!(s.disks[0].changes.is_known(), "{:?}", s.disks[0].changes);
    d.delete_snapshot(&s).await.unwrap();
    d.stop_vm(vm, Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn recover_clears_snapshots_of_a_crashed_agent() {
    if !have_qemu_system("recover_clears_snapshots_of_a_crashed_agent") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().join("state"));
    let state = tmp.path().join("state");
    let (a, b) = (tmp.path().join("a.qcow2"), tmp.path().join("b.qcow2"));
    make_qcow2(&a, "32M");
    make_qcow2(&b, "32M");
    let d = driver(&state);
    let va = d.start_vm(&spec(&a, true)).await.unwrap().id;
    let vb = d.start_vm(&spec(&b, true)).await.unwrap().id;
    let ga = graph(&d, va).await;
    let fleece = d.snapshot(va, &opts(SnapshotKind::Fleecing)).await.unwrap();
    let overlay = d.snapshot(vb, &opts(SnapshotKind::Overlay)).await.unwrap();
    hmp_write(&d, vb, 0xee, "1M", "64k").await;
    assert_eq!(journal_len(&state), 2);
    // The agent dies between snapshot and delete; QEMU keeps running.
    drop(d);

    let d = driver(&state);
    // Through the trait object, as the host agent service holds it.
    let agent: &dyn HypervisorDriver = &d;
    assert_eq!(agent.list_vms().await.unwrap().len(), 2);
    assert_eq!(agent.recover().await.unwrap(), 2);
    assert_eq!(journal_len(&state), 0);
    let g = graph(&d, va).await;
    assert_eq!(g.nodes, ga.nodes);
    assert!(g.exports.is_empty() && g.jobs.is_empty(), "{g:?}");
    assert!(
        g.bitmaps.iter().all(|(_, n, _)| n.starts_with("cairn-")),
        "{g:?}"
    );
    let gb = graph(&d, vb).await;
    assert!(!gb.nodes.iter().any(|n| n.starts_with("cx")), "{gb:?}");
    assert!(matches!(
        d.delete_snapshot(&fleece).await,
        Err(DriverError::UnknownSnapshot(_))
    ));
    assert!(matches!(
        d.delete_snapshot(&overlay).await,
        Err(DriverError::UnknownSnapshot(_))
    ));
    // A second recovery finds nothing.
    assert_eq!(d.recover().await.unwrap(), 0);
    d.stop_vm(va, Duration::from_secs(10)).await.unwrap();
    d.stop_vm(vb, Duration::from_secs(10)).await.unwrap();
    // The overlay's write was committed into b.
    assert!(qemu_io_reads(
        &b.display().to_string(),
        &["-f", "qcow2"],
        "read -P 0xee 1M 64k"
    ));
}

#[tokio::test]
async fn running_vm_pauses_saves_state_and_keeps_running() {
    if !have_qemu_system("running_vm_pauses_saves_state_and_keeps_running") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().join("state"));
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "16M");
    let d = driver(&tmp.path().join("state"));
    let vm = d.start_vm(&spec(&disk, false)).await.unwrap().id;

    // No guest agent answers: Auto falls back to a pause, within the bounded ping.
    let s = d
        .snapshot(
            vm,
            &SnapshotOptions {
                quiesce: QuiescePolicy::Auto,
                agent_timeout: Duration::from_millis(500),
                ..opts(SnapshotKind::Fleecing)
            },
        )
        .await
        .unwrap();
    assert_eq!(s.quiesce, Quiesce::Pause);
    eprintln!("pause window {} ms", s.quiesce_window_ms);
    assert!(s.quiesce_window_ms < 5000);
    d.delete_snapshot(&s).await.unwrap();

    let file = tmp.path().join("state.bin");
    let saved = d.save_state(vm, &file).await.unwrap();
    eprintln!("saved state: {saved:?}");
    assert!(saved.bytes > 100_000, "{saved:?}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), saved.bytes);
    let info = d.vm_status(vm).await.unwrap();
    assert_eq!(
        info.state,
        VmState::Running {
            status: "running".into(),
            cpus_running: true
        }
    );
    let u1 = d.resource_usage(vm).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let u2 = d.resource_usage(vm).await.unwrap();
    assert!(
        u2.vcpus[0].cpu_time_ms >= u1.vcpus[0].cpu_time_ms,
        "{u1:?} {u2:?}"
    );
    assert!(u2.process_cpu_time_ms >= u2.vcpus[0].cpu_time_ms);
    d.stop_vm(vm, Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn a_disk_resized_since_the_checkpoint_reports_changes_unknown() {
    if !have_qemu_system("a_disk_resized_since_the_checkpoint_reports_changes_unknown") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().join("state"));
    let state = tmp.path().join("state");
    let disk = tmp.path().join("disk.qcow2");
    make_qcow2(&disk, "32M");
    let d = driver(&state);
    let vm = d.start_vm(&spec(&disk, true)).await.unwrap().id;
    let s1 = d.snapshot(vm, &opts(SnapshotKind::Fleecing)).await.unwrap();
    let c1 = s1.checkpoint.expect("a checkpoint");
    d.delete_snapshot(&s1).await.unwrap();
    // Grow the disk under the VM: the bitmap since c1 no longer describes it.
    let qmp = d.qmp(vm).await.unwrap();
    qmp.execute(
        "block_resize",
        Some(serde_json::json!({"node-name": "disk0", "size": 64u64 << 20})),
    )
    .await
    .unwrap();
    let ch = d.changes_since(vm, c1).await.unwrap();
    assert_eq!(
        ch[0].1,
        Changes::Unknown {
            reason: UnknownReason::DiskResized
        },
        "{ch:?}"
    );
    // A snapshot asked for changes since c1 says so too, instead of failing.
    let s2 = d
        .snapshot(
            vm,
            &SnapshotOptions {
                since: Some(c1),
                ..opts(SnapshotKind::Fleecing)
            },
        )
        .await
        .unwrap();
    assert_eq!(
        s2.disks[0].changes,
        Changes::Unknown {
            reason: UnknownReason::DiskResized
        }
    );
    assert_eq!(s2.disks[0].size, 64 << 20);
    d.delete_snapshot(&s2).await.unwrap();
    d.stop_vm(vm, Duration::from_secs(10)).await.unwrap();
}
