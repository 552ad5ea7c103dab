//! Cairn and virtnbdbackup (Debian's package) back up the same libvirt domain in turn: full,
//! incremental, incremental for each. Neither breaks the other's checkpoint chain, and every
//! backup of each tool restores bit-exact to the disk as it was at its point.
//!
//! virtnbdbackup 1.9 refuses a domain with any checkpoint it did not make, so Cairn runs with
//! `--libvirt-checkpoints borrow`: it makes none and reads the changes since the newest
//! checkpoint virtnbdbackup had made before Cairn's previous backup.
//!
//! The guest keeps its file system read-only between writes, so the disk does not change
//! while a tool reads it and "the disk at that point" is a plain copy of the image.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::*;
use crate::libvirt::*;

fn tool_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes 1 MiB of new data in the guest, then makes its file system read-only again.
fn guest_writes(name: &str, round: usize) {
    let sh = format!(
        "mount -o remount,rw /mnt && dd if=/dev/urandom of=/mnt/f{round} bs=64k count=16 2>/dev/null \
         && sync && mount -o remount,ro /mnt && sync"
    );
    assert_eq!(guest_sh(name, &sh), 0, "guest write {round}");
}

#[test]
fn cairn_and_virtnbdbackup_take_turns_on_one_domain() {
    if Command::new("virtnbdbackup").arg("-V").output().is_err() {
        skip_or_fail("virtnbdbackup missing (scripts/install-deps.sh installs it)");
        return;
    }
    let Some(g) = guest_test() else { return };
    let Some(_libvirtd) = Libvirtd::start() else {
        return;
    };
    let t = g.tmp.path();
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds")).unwrap();
    let name = format!("cairn-e2e-{:08x}", rand::random::<u32>());
    let src = disk(t, &name);
    let _dom = define_and_boot(
        t,
        &name,
        &domain_xml(&name, &g.guest, &src, "52:54:00:3a:00:03"),
    );
    assert_eq!(guest_sh(&name, "mount -o remount,ro /mnt && sync"), 0);
    let cluster = Cluster::start_with(
        t,
        &p("vault"),
        false,
        &["--libvirt", URI, "--libvirt-checkpoints", "borrow"],
    );
    let s = cluster.server.client();
    let vnb_dir = t.join("vnb");

    let mut cairn_points: Vec<(Value, PathBuf)> = Vec::new();
    let mut vnb_points: Vec<PathBuf> = Vec::new();
    for round in 0..3 {
        // Cairn's turn.
        if round > 0 {
            guest_writes(&name, 2 * round);
        }
        let j = submit(&s, "/v1/backups", json!({ "vms": [name] }));
        assert_eq!(j["state"], "succeeded", "{j}");
        let b = j["result"]["backups"][0].clone();
        let want = if round == 0 { "full" } else { "incremental" };
        assert_eq!(b["kind"], want, "{b}");
        if round > 1 {
            // Cairn's previous backup came after virtnbdbackup's first checkpoint: the
            // changes since it are a superset of the changes since that backup.
            assert_eq!(b["disks"][0]["change_source"], "hypervisor_bitmap", "{b}");
        }
        let at = t.join(format!("cairn-{round}.qcow2"));
        copy_of(&src, &at);
        cairn_points.push((b, at));

        // virtnbdbackup's turn.
        guest_writes(&name, 2 * round + 1);
        let level = if round == 0 { "full" } else { "inc" };
        tool_ok(
            Command::new("virtnbdbackup")
                .args(["-d", &name, "-l", level, "-n", "-o"])
                .arg(&vnb_dir),
        );
        let at = t.join(format!("vnb-{round}.qcow2"));
        copy_of(&src, &at);
        vnb_points.push(at);
    }

    // Cairn never deleted another tool's checkpoint.
    let (ok, list) = virsh(&["checkpoint-list", &name, "--name"]);
    assert!(ok, "{list}");
    for i in 0..3 {
        assert!(list.contains(&format!("virtnbdbackup.{i}")), "{list}");
    }

    // Every backup of each tool restores bit-exact to its point.
    for (i, (b, at)) in cairn_points.iter().enumerate() {
        let j = submit(
            &s,
            "/v1/restores",
            json!({"backup": b["backup"], "as_name": format!("r{i}"), "start": false}),
        );
        assert_eq!(j["state"], "succeeded", "{j}");
        let restored = Path::new(j["result"]["disks"][0]["path"].as_str().unwrap());
        assert!(same_content(restored, at), "Cairn backup {i} differs");
    }
    for (i, at) in vnb_points.iter().enumerate() {
        let out = t.join(format!("vnb-restore-{i}"));
        tool_ok(
            Command::new("virtnbdrestore")
                .args(["-n", "-i"])
                .arg(&vnb_dir)
                .arg("-o")
                .arg(&out)
                .args(["--until", &format!("virtnbdbackup.{i}")]),
        );
        let restored = out.join(src.file_name().unwrap());
        assert!(
            same_content(&restored, at),
            "virtnbdbackup backup {i} differs"
        );
    }
}
