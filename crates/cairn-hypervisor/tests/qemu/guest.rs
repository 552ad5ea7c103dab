//! The slow tier: the tiny Linux guest of `scripts/build-test-guest.sh` with a real `qemu-ga`.
//! One test function, holding a machine-wide file lock, so only one guest boots at a time (TCG
//! takes a whole core).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_hypervisor::{FreezeStatus, GuestAgent, GuestExec, QemuCommand, QgaOptions};
use serde_json::json;

use crate::common::{have, have_qemu_system, qcow2_blockdev, repo_root, run, start};

pub const KERNEL_APPEND: &str = "console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable \
    no_timer_check lpj=4200000 8250.nr_uarts=1";

/// Builds (or finds cached) the test guest; `None` after a loud notice when that fails.
pub fn test_guest() -> Option<PathBuf> {
    let dir = std::env::var_os("CAIRN_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-guest"));
    let script = repo_root().join("scripts/build-test-guest.sh");
    let status = Command::new("bash").arg(&script).arg(&dir).status();
    if matches!(status, Ok(s) if s.success()) {
        return Some(dir);
    }
    let msg = format!("{} {} failed ({status:?})", script.display(), dir.display());
    if std::env::var("CAIRN_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED tiny_guest_agent_and_freeze: {msg} !!!!!!!!\n");
    None
}

/// An ext4 image holding `hello.txt`, converted to qcow2.
pub fn data_disk(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "hello from the host\n").unwrap();
    let raw = dir.join("disk.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(&raw)
        .arg("64M"));
    let qcow2 = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2));
    qcow2
}

#[tokio::test]
async fn tiny_guest_agent_and_freeze() {
    if !have_qemu_system("tiny_guest_agent_and_freeze")
        || !have("mke2fs", "e2fsprogs", "tiny_guest_agent_and_freeze")
    {
        return;
    }
    let Some(guest) = test_guest() else { return };
    let lock = File::create(std::env::temp_dir().join("cairn-test-guest.lock")).unwrap();
    lock.lock().unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let disk = data_disk(tmp.path());
    let cmd = QemuCommand::system().unwrap();
    let qga_sock = cmd.dir().join("qga.sock");
    let serial = cmd.dir().join("serial.log");
    let cmd = cmd
        .args([
            "-M",
            "q35",
            "-m",
            "256",
            "-smp",
            "1",
            "-no-reboot",
            "-kernel",
        ])
        .arg(guest.join("vmlinux"))
        .arg("-initrd")
        .arg(guest.join("initrd.gz"))
        .args(["-append", KERNEL_APPEND, "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-blockdev")
        .arg(qcow2_blockdev("disk0", &disk))
        .args(["-device", "virtio-blk-pci,id=vda,drive=disk0"])
        .args(["-device", "virtio-serial-pci", "-chardev"])
        .arg(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            qga_sock.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    let boot = Instant::now();
    let (mut proc, qmp) = start(cmd).await;
    let qga = GuestAgent::new(&qga_sock, QgaOptions::default());
    if let Err(e) = qga.wait_ready(Duration::from_secs(60)).await {
        panic!(
            "guest agent not ready: {e}\nserial console:\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
    }
    let boot_time = boot.elapsed();
    eprintln!("guest booted, qemu-ga answering after {boot_time:?}");
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(console.contains("CAIRN-GUEST-READY"), "console:\n{console}");

    qga.ping().await.unwrap();

    let fsinfo = qga.get_fsinfo().await.unwrap();
    let mnt = fsinfo
        .iter()
        .find(|f| f.mountpoint == "/mnt")
        .unwrap_or_else(|| panic!("no /mnt in {fsinfo:?}"));
    assert_eq!(mnt.fs_type, "ext4");
    assert!(mnt.disk.iter().any(|d| d.bus_type == "virtio"), "{mnt:?}");

    let status = qga
        .exec_wait(
            &GuestExec::shell(
                "echo written-by-guest > /mnt/guest.txt && sync && cat /mnt/hello.txt",
            ),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(status.exit_code, Some(0), "{status:?}");
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        "hello from the host\n"
    );

    // The backup sequence: freeze, external snapshot, thaw — timed.
    let overlay = tmp.path().join("overlay.qcow2");
    let t0 = Instant::now();
    let frozen = qga.fsfreeze_freeze().await.unwrap();
    let t_frozen = t0.elapsed();
    assert!(frozen >= 1, "froze {frozen} file systems");
    assert_eq!(qga.fsfreeze_status().await.unwrap(), FreezeStatus::Frozen);
    let t_snap = Instant::now();
    qmp.execute(
        "blockdev-snapshot-sync",
        Some(json!({"node-name": "disk0", "snapshot-file": overlay,
                    "snapshot-node-name": "overlay0", "format": "qcow2"})),
    )
    .await
    .unwrap();
    let snap = t_snap.elapsed();
    let thawed = qga.fsfreeze_thaw().await.unwrap();
    let window = t0.elapsed();
    assert_eq!(thawed, frozen);
    assert_eq!(qga.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
    eprintln!(
        "freeze took {t_frozen:?}, snapshot {snap:?}; freeze→thaw window {window:?} \
         ({frozen} file system(s))"
    );

    // While frozen, a guest writer stalls; it finishes once thawed. (qemu-ga refuses guest-exec
    // while frozen, so the writer starts first and sleeps past the freeze.)
    let writer = GuestExec::shell(
        "sleep 1; a=$(cut -d' ' -f1 /proc/uptime); echo during-freeze > /mnt/during.txt; \
         b=$(cut -d' ' -f1 /proc/uptime); echo $a $b",
    );
    let pid = qga.exec(&writer).await.unwrap();
    qga.fsfreeze_freeze().await.unwrap();
    let hold = Duration::from_millis(2500);
    tokio::time::sleep(hold).await;
    qga.fsfreeze_thaw().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let s = qga.exec_status(pid).await.unwrap();
        if s.exited {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "writer never finished after thaw"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done.exit_code, Some(0), "{done:?}");
    let out = String::from_utf8_lossy(&done.stdout);
    let times: Vec<f64> = out.split_whitespace().map(|t| t.parse().unwrap()).collect();
    let stalled = times[1] - times[0];
    eprintln!("guest writer stalled {stalled:.2} s during a {hold:?} freeze");
    assert!(stalled >= 0.5, "writer was not held by the freeze: {out}");

    // The frozen point-in-time base is a clean file system holding the guest's earlier write.
    proc.quit(&qmp, Duration::from_secs(10)).await.unwrap();
    let base_raw = tmp.path().join("base.img");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&disk)
        .arg(&base_raw));
    run(Command::new("e2fsck").args(["-fn"]).arg(&base_raw));
    let cat = run(Command::new("debugfs")
        .args(["-R", "cat /guest.txt"])
        .arg(&base_raw));
    assert_eq!(cat.trim(), "written-by-guest");
}
