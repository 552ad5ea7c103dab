//! Group (targeted) backups of libvirt domains: every guest frozen through libvirt, one
//! reflink snapshot of the storage unit (a loop-mounted XFS), every guest thawed at once; the
//! next group backup diffs each qcow2 disk with its last clone instead of reading it.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::*;
use crate::libvirt::*;

#[test]
fn libvirt_group_backups_freeze_every_guest_for_one_unit_snapshot() {
    let Some(g) = guest_test() else { return };
    let Some(_libvirtd) = Libvirtd::start() else {
        return;
    };
    let t = g.tmp.path();
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |s: &str| t.join(s).display().to_string();
    // The datastore on a reflink-capable storage unit.
    let ds = t.join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let img = t.join("unit.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let ok = Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&img)
        .status()
        .unwrap()
        .success()
        && Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&ds)
            .status()
            .unwrap()
            .success();
    if !ok {
        skip_or_fail("cannot loop-mount an XFS storage unit (root needed)");
        return;
    }
    let _unmount = Unmount(ds.clone());
    std::fs::set_permissions(&ds, std::fs::Permissions::from_mode(0o755)).unwrap();
    let names: Vec<String> = (1..=2)
        .map(|i| format!("cairn-e2e-{:08x}-g{i}", rand::random::<u32>()))
        .collect();
    let mut doms = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let src = disk(t, n);
        let mac = format!("52:54:00:3a:01:0{i}");
        doms.push(define_and_boot(t, n, &domain_xml(n, &g.guest, &src, &mac)));
    }
    let c = Cluster::start_with(t, &p("vault"), false, &["--libvirt", URI]);
    let s = c.server.client();

    let group = |what: &str| -> Value {
        let j = submit(&s, "/v1/backups", json!({ "vms": names, "group": true }));
        assert_eq!(j["state"], "succeeded", "{what}: {j}");
        j["result"].clone()
    };
    let first = group("first");
    for b in first["backups"].as_array().unwrap() {
        assert_eq!(b["quiesce"], "guest_freeze", "{b}");
    }
    let lifetimes = first["vm_snapshot_lifetimes_ms"].as_array().unwrap();
    assert_eq!(lifetimes.len(), 2, "{first}");
    // Every guest was thawed: it writes at once, and nothing is left in the journal.
    for n in &names {
        assert_eq!(guest_sh(n, "echo ok > /mnt/after-group && sync"), 0);
    }
    let left: Vec<_> = std::fs::read_dir(t.join("host/libvirt/flights"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The second group backup diffs each disk with its last clone. Each guest wrote a file
    // and its journal since (64 KiB qcow2 clusters, ~2 MiB measured): far less than the disk,
    // but not idle (an idle disk reads 0.1%: the demo, and the storage agent's own test).
    let second = group("second");
    for b in second["backups"].as_array().unwrap() {
        let d = &b["disks"][0];
        assert_eq!(d["change_source"], "extent_map", "{b}");
        let (read, size) = (
            b["bytes_read"].as_i64().unwrap(),
            d["size"].as_i64().unwrap(),
        );
        assert!(read * 4 <= size, "read {read} of {size}: {b}");
    }
    // The frozen point is a clean file system.
    let b = &second["backups"][1];
    let j = submit(
        &s,
        "/v1/restores",
        json!({"backup": b["backup"], "as_name": "g-restored", "start": false}),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    let restored = j["result"]["disks"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let raw = t.join("g.raw");
    assert!(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw", &restored])
            .arg(&raw)
            .status()
            .unwrap()
            .success()
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    drop(c);
    drop(doms);
}

/// A restore whose domain libvirt refuses (here: its kernel is gone) fails with libvirt's own
/// message and leaves no domain and no restored disk behind; a domain that went away between
/// listing and backup is a clear error.
#[test]
fn libvirt_refusals_are_clear_and_leave_nothing() {
    let Some(g) = guest_test() else { return };
    let Some(_libvirtd) = Libvirtd::start() else {
        return;
    };
    let t = g.tmp.path();
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds")).unwrap();
    // A shut-off domain booting a kernel of its own.
    let kdir = t.join("kernel");
    std::fs::create_dir_all(&kdir).unwrap();
    std::fs::copy(g.guest.join("vmlinux"), kdir.join("vmlinux")).unwrap();
    std::fs::copy(g.guest.join("initrd.gz"), kdir.join("initrd.gz")).unwrap();
    let name = format!("cairn-e2e-{:08x}", rand::random::<u32>());
    let src = disk(t, &name);
    let file = t.join("dom.xml");
    std::fs::write(&file, domain_xml(&name, &kdir, &src, "52:54:00:3a:02:01")).unwrap();
    let (ok, out) = virsh(&["define", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    let dom = Domain(name.clone());
    let c = Cluster::start_with(t, &p("vault"), false, &["--libvirt", URI]);
    let s = c.server.client();
    let j = submit(&s, "/v1/backups", json!({ "vms": [name] }));
    assert_eq!(j["state"], "succeeded", "{j}");
    let b = j["result"]["backups"][0].clone();

    // The kernel is gone: libvirt refuses to start the restored domain.
    std::fs::remove_dir_all(&kdir).unwrap();
    let copy = format!("{name}-copy");
    let j = submit(
        &s,
        "/v1/restores",
        json!({"backup": b["backup"], "as_name": copy, "start": true}),
    );
    assert_eq!(j["state"], "failed", "{j}");
    let err = j["error"].as_str().unwrap();
    assert!(err.contains("libvirt") && err.contains("vmlinux"), "{err}");
    let (_, all) = virsh(&["list", "--all", "--name"]);
    assert!(
        !all.contains(&copy),
        "the refused domain is left defined: {all}"
    );
    let left: Vec<_> = std::fs::read_dir(t.join("ds"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("-copy"))
        .collect();
    assert!(left.is_empty(), "restored disks left: {left:?}");

    // The domain goes away between listing and backup.
    let _ = s.get_json::<Value>("/v1/vms").unwrap();
    drop(dom);
    let j = submit(&s, "/v1/backups", json!({ "vms": [name] }));
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("not found"), "{j}");
}
