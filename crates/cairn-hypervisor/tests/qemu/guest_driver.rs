//! The driver with the tiny guest: a VM started from a `VmSpec` boots, its guest agent answers
//! and sees the ext4 data disk, and a snapshot quiesces through a real fsfreeze.

use std::fs::File;
use std::process::Command;
use std::time::Duration;

use cairn_hypervisor::{
    BootSpec, Changes, DiskSource, DiskSpec, GuestExec, QemuDriver, QemuDriverOptions, Quiesce,
    QuiescePolicy, SnapshotKind, SnapshotOptions, VmSpec,
};

use crate::common::{VmReaper, have, have_qemu_system};
use crate::guest::{KERNEL_APPEND, data_disk, test_guest};

#[tokio::test]
async fn vm_from_spec_boots_and_snapshots_with_guest_freeze() {
    let name = "vm_from_spec_boots_and_snapshots_with_guest_freeze";
    if !have_qemu_system(name) || !have("mke2fs", "e2fsprogs", name) {
        return;
    }
    let Some(guest) = test_guest() else { return };
    let lock = File::create(std::env::temp_dir().join("cairn-test-guest.lock")).unwrap();
    lock.lock().unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmReaper(tmp.path().join("state"));
    let disk = data_disk(tmp.path());
    let spec = VmSpec {
        domain_xml: None,
        name: "tiny".into(),
        vcpus: 1,
        memory_mib: 256,
        machine: "q35".into(),
        disks: vec![DiskSpec::qcow2("vda", &disk)],
        nics: vec![],
        boot: BootSpec::Kernel {
            kernel: guest.join("vmlinux"),
            initrd: Some(guest.join("initrd.gz")),
            append: KERNEL_APPEND.into(),
        },
        start_paused: false,
    };
    let d = QemuDriver::open(&tmp.path().join("state"), QemuDriverOptions::default()).unwrap();
    let h = d.start_vm(&spec).await.unwrap();
    // The driver's own agent client: the channel serves one connection.
    let qga = d.guest_agent(h.id).unwrap();
    let booted = qga
        .wait_ready(Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| {
            let serial = d.state_dir().join(format!("vms/{}/serial.log", h.id));
            panic!(
                "agent not ready: {e}\n{}",
                std::fs::read_to_string(serial).unwrap_or_default()
            )
        });
    eprintln!("VM from spec: qemu-ga answering after {booted:?}");
    let fsinfo = qga.get_fsinfo().await.unwrap();
    let mnt = fsinfo
        .iter()
        .find(|f| f.mountpoint == "/mnt")
        .unwrap_or_else(|| panic!("no /mnt in {fsinfo:?}"));
    assert_eq!(mnt.fs_type, "ext4");
    let w = qga
        .exec_wait(
            &GuestExec::shell("echo before-snapshot > /mnt/a.txt && sync"),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(w.exit_code, Some(0), "{w:?}");

    let s = d
        .snapshot(
            h.id,
            &SnapshotOptions {
                kind: SnapshotKind::Fleecing,
                quiesce: QuiescePolicy::Auto,
                ..SnapshotOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(s.quiesce, Quiesce::GuestFreeze);
    eprintln!("guest freeze window {} ms", s.quiesce_window_ms);
    assert!(s.quiesce_window_ms < 10_000);
    assert!(matches!(s.disks[0].changes, Changes::Unknown { .. }));
    // Thawed: the guest writes again.
    let w = qga
        .exec_wait(
            &GuestExec::shell("echo after-snapshot > /mnt/b.txt && sync"),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(w.exit_code, Some(0), "{w:?}");
    // The point-in-time export is a clean file system with the file written before it.
    let DiskSource::Nbd { socket, export } = &s.disks[0].source else {
        panic!("{:?}", s.disks[0].source)
    };
    let copy = tmp.path().join("export.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///{export}?socket={}", socket.display()))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /a.txt"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout).trim(),
        "before-snapshot"
    );
    let life = d.delete_snapshot(&s).await.unwrap();
    eprintln!("fleecing snapshot lifetime {life} ms");
    d.stop_vm(h.id, Duration::from_secs(15)).await.unwrap();
}
