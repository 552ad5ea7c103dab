//! Every flow with each role in its own process, and the file catalog over it.

use std::process::Command;
use std::time::{Duration, Instant};

use cairn_http::{Client, Trust};
use serde_json::{Value, json};

use crate::harness::*;

#[test]
fn every_flow_with_each_role_in_its_own_process() {
    let Some(g) = guest_test() else { return };
    let t = g.tmp.path();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds")).unwrap();

    let Cluster {
        vault: _vault,
        manager,
        mut host,
        storage,
        server,
    } = Cluster::start_encrypted(t, &p("vault"), false, &t.join("vault.key"));
    let conn = t.join("server/connection.json");
    let s = server.client();
    let m = manager.client();

    // Bad token, malformed and invalid requests.
    let bad = Client::new(
        server.url(),
        "wrong",
        &Trust::Fingerprint(server.fp().into()),
    )
    .unwrap();
    assert_eq!(status(bad.get_json("/v1/vms")), 401);
    assert_eq!(status(s.post_json("/v1/backups", &json!({"vms": []}))), 400);
    assert_eq!(status(s.post_json("/v1/backups", &json!({"vm": "x"}))), 400);
    assert_eq!(
        status(s.put_json("/v1/schedules/x", &json!({"vms": ["vm1"], "every": "5s"}))),
        400
    );
    assert_eq!(
        status(s.post_json(
            "/v1/restores",
            &json!({"backup": "abcd1234", "as_name": "x"})
        )),
        404
    );

    // Two VMs on host h1, disks on storage agent s1.
    // vm2 also has a disk with an LVM logical volume and a LUKS volume (file catalog coverage).
    for name in ["vm1", "vm2"] {
        let d = disk(t, name);
        let mut disks = vec![json!({"id": "vda", "path": d, "format": "qcow2"})];
        if name == "vm2" {
            let lvm = lvm_luks_disk(t, "vm2-b");
            disks.push(json!({"id": "vdb", "path": lvm, "format": "qcow2"}));
        }
        let spec = json!({
            "name": name, "vcpus": 1, "memory_mib": 192,
            "disks": disks,
            "boot": g.boot(),
        });
        let _: Value = m.post_json("/v1/hosts/h1/vms", &spec).unwrap();
    }
    for name in ["vm1", "vm2"] {
        wait_guest(&m, name);
    }
    let vms: Value = s.get_json("/v1/vms").unwrap();
    let vm1 = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vm1")
        .unwrap();
    assert_eq!(vm1["host"], "h1");
    assert_eq!(vm1["disks"][0]["storage_agent"], "s1");
    assert_eq!(vm1["disks"][0]["datastore_disk"], "vm1.qcow2");

    // Unknown VM: the job fails with a clear error.
    let j = submit(&s, "/v1/backups", json!({"vms": ["nope"]}));
    assert_eq!(j["state"], "failed");
    assert!(
        j["error"].as_str().unwrap().contains("VM nope not found"),
        "{j}"
    );

    // Full backup through the CLI.
    let (ok, j) = cli(&conn, &["backup", "vm1", "vm2"]);
    assert!(ok, "{j}");
    assert_eq!(j["state"], "succeeded");
    let full = &j["result"]["backups"][0];
    assert_eq!(full["kind"], "full");
    assert_eq!(full["quiesce"], "guest_freeze");

    // Conflicting jobs on one VM: the second is refused while the first is unfinished.
    let first: Value = s
        .post_json("/v1/backups", &json!({"vms": ["vm1"]}))
        .unwrap();
    assert_eq!(
        status(s.post_json("/v1/backups", &json!({"vms": ["vm1"]}))),
        409
    );
    assert_eq!(
        wait_job(&s, first["id"].as_str().unwrap())["state"],
        "succeeded"
    );

    // Guest writes, then an incremental that reads only the dirty blocks.
    let w = guest_exec(
        &m,
        "vm1",
        "dd if=/dev/urandom of=/mnt/new.bin bs=1M count=2 2>/dev/null && sync",
    );
    assert_eq!(w["exit_code"], 0, "{w}");
    let j = submit(&s, "/v1/backups", json!({"vms": ["vm1"]}));
    assert_eq!(j["state"], "succeeded", "{j}");
    let inc = &j["result"]["backups"][0];
    assert_eq!(inc["kind"], "incremental");
    assert_eq!(
        inc["disks"][0]["change_source"], "hypervisor_bitmap",
        "{inc}"
    );
    assert!(inc["bytes_read"].as_i64().unwrap() < 16 << 20, "{inc}");
    assert!(inc["bytes_sent"].as_i64().unwrap() >= 2 << 20, "{inc}");

    // Group backup: one storage snapshot, every VM snapshot released before the backups.
    let j = submit(
        &s,
        "/v1/backups",
        json!({"vms": ["vm1", "vm2"], "group": true}),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    let lifetimes = j["result"]["vm_snapshot_lifetimes_ms"].as_array().unwrap();
    assert_eq!(lifetimes.len(), 2);
    let events = s
        .get_json::<Value>(&format!("/v1/jobs/{}", j["id"].as_str().unwrap()))
        .unwrap();
    let log: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    let deleted = log
        .iter()
        .rposition(|l| l.contains("VM snapshot") && l.contains("deleted"))
        .unwrap();
    let sent = log.iter().position(|l| l.contains("vm1/vda:")).unwrap();
    assert!(
        deleted < sent,
        "VM snapshots must be released before data is sent: {log:#?}"
    );
    // Nothing left behind on the storage agent.
    let left: Value = storage.client().get_json("/v1/snapshots").unwrap();
    assert_eq!(left, json!([]));

    // The file catalog: every backup was indexed off its data path by an `index` job.
    let t0 = Instant::now();
    loop {
        let jobs: Value = s.get_json("/v1/jobs?limit=100").unwrap();
        let idx: Vec<&Value> = jobs
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["kind"] == "index")
            .collect();
        assert!(idx.iter().all(|j| j["state"] != "failed"), "{idx:#?}");
        if idx.len() >= 5 && idx.iter().all(|j| j["state"] == "succeeded") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "index jobs: {idx:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Coverage: vm2's second disk lists its logical volume's files and names the LUKS volume
    // it could not read, in `files ls` and in the backup's record.
    let b2: Value = s.get_json("/v1/backups?vm=vm2").unwrap();
    let b2 = b2[0]["id"].as_str().unwrap().to_string();
    let (ok, ls) = cli(&conn, &["files", "ls", &b2, "/vdb"]);
    assert!(ok, "{ls}");
    let ls = ls.as_array().unwrap();
    let lv = ls
        .iter()
        .find(|v| v["path"].as_str().unwrap().ends_with("-files"));
    assert!(lv.is_some_and(|v| v["files"].as_u64() > Some(0)), "{ls:#?}");
    let luks = ls
        .iter()
        .find(|v| v["path"] == "/vdb/p2")
        .expect("p2 listed");
    assert!(
        luks["not_indexed"].as_str().unwrap().contains("LUKS"),
        "{luks}"
    );
    let lv_root = format!("{}/", lv.unwrap()["path"].as_str().unwrap());
    let (ok, f) = cli(&conn, &["files", "ls", &b2, &lv_root]);
    let f = f.as_array().unwrap();
    assert!(
        ok && f
            .iter()
            .any(|e| e["path"].as_str().unwrap().ends_with("/lvm.txt") && e["size"] == 24),
        "{f:#?}"
    );
    let (ok, f) = cli(&conn, &["files", "ls", &b2, "/vdb/p3/"]);
    assert!(ok, "{f}");
    assert!(
        f.as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "/vdb/p3/btrfs.txt" && e["size"] == 9),
        "{f:#}"
    );
    // A file btrfs stores zstd-compressed comes back whole through the catalog.
    let big = t.join("big.txt");
    let (ok, r) = cli(
        &conn,
        &[
            "files",
            "restore",
            &b2,
            "/vdb/p3/big.txt",
            big.to_str().unwrap(),
        ],
    );
    assert!(ok, "{r}");
    assert_eq!(std::fs::read_to_string(&big).unwrap(), big_text());
    let rec: Value = s.get_json(&format!("/v1/backups/{b2}")).unwrap();
    let vols = rec["volumes"]
        .as_array()
        .expect("the record lists its volumes");
    let fs_of = |fs: &str| vols.iter().find(|v| v["disk"] == "vdb" && v["fs"] == fs);
    assert!(
        fs_of("Luks").is_some_and(|v| v["not_indexed"].is_string()),
        "{rec:#}"
    );
    for fs in ["Xfs", "Btrfs"] {
        assert!(
            fs_of(fs).is_some_and(|v| v["not_indexed"].is_null() && v["files"].as_u64() > Some(0)),
            "{fs}: {rec:#}"
        );
    }
    let (ok, hits) = cli(&conn, &["files", "find", "new.bin", "--vm", "vm1"]);
    assert!(ok, "{hits}");
    let hits = hits.as_array().unwrap();
    assert_eq!(
        hits.len(),
        2,
        "the incremental and the group backup hold it: {hits:#?}"
    );
    assert!(
        hits.iter()
            .all(|h| h["path"] == "/vda/whole/new.bin" && h["size"] == 2 << 20)
    );
    let (ok, v) = cli(&conn, &["files", "versions", "vm1", "/vda/whole/hello.txt"]);
    assert!(ok);
    assert_eq!(v.as_array().unwrap().len(), 4, "{v}");
    assert_eq!(v[0]["changed"], true);
    assert_eq!(v[1]["changed"], false, "{v}");
    let in_group = hits.iter().find(|h| h["backup"] != inc["backup"]).unwrap()["backup"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, ls) = cli(&conn, &["files", "ls", &in_group, "/vda/whole/"]);
    assert!(ok);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"/vda/whole/hello.txt") && names.contains(&"/vda/whole/new.bin"),
        "{names:?}"
    );
    // Restore into the running guest through its guest agent: a file of six pieces, its
    // mode and time; an existing target is refused unless overwriting is asked for; a
    // directory with its files.
    let hello = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "/vda/whole/hello.txt")
        .unwrap()
        .clone();
    let into_guest = |path: &str, dest: &str, more: &[&str]| {
        let mut a = vec!["files", "restore", &in_group, path, dest, "--into-guest"];
        a.extend_from_slice(more);
        cli(&conn, &a)
    };
    let (ok, r) = into_guest("/vda/whole/new.bin", "/tmp/back/new.bin", &[]);
    assert!(ok, "{r}");
    assert_eq!(
        (r["files"].as_u64(), r["bytes"].as_u64()),
        (Some(1), Some(2 << 20)),
        "{r}"
    );
    let (ok, r) = into_guest("/vda/whole/hello.txt", "/tmp/back/hello.txt", &[]);
    assert!(ok, "{r}");
    let same = guest_exec(
        &m,
        "vm1",
        "cd /tmp/back && [ \"$(sha256sum < new.bin)\" = \"$(sha256sum < /mnt/new.bin)\" ] \
         && stat -c '%a %Y' hello.txt && cat hello.txt",
    );
    let mtime_s = hello["mtime_ns"]
        .as_i64()
        .unwrap()
        .div_euclid(1_000_000_000);
    let want = format!(
        "{:o} {mtime_s}\nhello from vm1\n",
        hello["mode"].as_u64().unwrap() & 0o7777
    );
    assert_eq!(
        (same["exit_code"].as_i64(), same["stdout"].as_str()),
        (Some(0), Some(&*want)),
        "{same}"
    );
    let (ok, r) = into_guest("/vda/whole/hello.txt", "/tmp/back/hello.txt", &[]);
    assert!(!ok && r.to_string().contains("exists"), "{r}");
    let (ok, r) = into_guest(
        "/vda/whole/hello.txt",
        "/tmp/back/hello.txt",
        &["--overwrite"],
    );
    assert!(ok, "{r}");
    let (ok, r) = into_guest("/vda/whole/", "/tmp/tree", &[]);
    assert!(ok, "{r}");
    assert!(
        r["files"].as_u64() >= Some(2) && r["dirs"].as_u64() >= Some(1),
        "{r}"
    );
    let tree = guest_exec(&m, "vm1", "cat /tmp/tree/hello.txt && ls /tmp/tree");
    assert!(
        tree["stdout"]
            .as_str()
            .unwrap()
            .starts_with("hello from vm1\n"),
        "{tree}"
    );
    // Restore one file: the same bytes as in the guest, reading only its segments.
    let out = t.join("new.bin");
    let (ok, r) = cli(
        &conn,
        &[
            "files",
            "restore",
            &in_group,
            "/vda/whole/new.bin",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{r}");
    let read = r["vault_bytes_read"].as_u64().unwrap();
    assert!(
        (2 << 20..=2 * (2 << 20)).contains(&read),
        "read {read} B from the vault for a 2 MiB file"
    );
    let sum_guest = guest_exec(&m, "vm1", "sha256sum /mnt/new.bin");
    let sum_host = Command::new("sha256sum").arg(&out).output().unwrap();
    assert_eq!(
        sum_guest["stdout"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .next(),
        String::from_utf8_lossy(&sum_host.stdout)
            .split_whitespace()
            .next()
    );
    // A directory comes back as a tar stream.
    let tarball = t.join("root.tar");
    let (ok, _) = cli(
        &conn,
        &[
            "files",
            "restore",
            &in_group,
            "/vda/whole/",
            tarball.to_str().unwrap(),
        ],
    );
    assert!(ok);
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(&tarball)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.lines().any(|l| l == "hello.txt") && listing.lines().any(|l| l == "new.bin"),
        "{listing}"
    );

    // Restore into primary storage: a file written into a datastore, straight from the vault.
    let (ok, r) = cli(
        &conn,
        &[
            "files",
            "restore",
            &in_group,
            "/vda/whole/new.bin",
            "restored/new.bin",
            "--into-datastore",
            "ds",
        ],
    );
    assert!(ok, "{r}");
    assert_eq!(
        std::fs::read(t.join("ds/restored/new.bin")).unwrap(),
        std::fs::read(&out).unwrap()
    );
    assert!(
        r["vault_bytes_read"].as_u64().unwrap() <= 2 * (2 << 20),
        "{r}"
    );

    // Restore the newest vm1 backup as a new VM and boot it.
    let backups: Value = s.get_json("/v1/backups?vm=vm1").unwrap();
    let newest = backups.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, j) = cli(
        &conn,
        &[
            "restore",
            "vm1",
            "--backup",
            &newest,
            "--as",
            "vm1-copy",
            "--wait-boot",
            "120",
        ],
    );
    assert!(ok, "{j}");
    assert_eq!(j["result"]["guest"]["agent"], true, "{j}");
    let out = guest_exec(&m, "vm1-copy", "cat /mnt/hello.txt; ls /mnt/new.bin");
    assert_eq!(out["stdout"], "hello from vm1\n/mnt/new.bin\n", "{out}");
    // A restore onto a name in use is refused.
    let j = submit(
        &s,
        "/v1/restores",
        json!({"backup": newest, "as_name": "vm2"}),
    );
    assert_eq!(j["state"], "failed");
    assert!(
        j["error"].as_str().unwrap().contains("already exists"),
        "{j}"
    );

    // The data path: the server carried no disk data, the storage agent sent it all.
    let stats: Value = s.get_json("/v1/stats").unwrap();
    assert_eq!(stats["server_disk_bytes"], 0);
    let sa = &stats["storage_agents"][0]["stats"];
    assert!(sa["bytes_sent"].as_u64().unwrap() > 0, "{stats}");
    let (ok, list) = cli(&conn, &["backups", "vm1"]);
    assert!(ok);
    assert_eq!(list.as_array().unwrap().len(), 4);

    // A host that stopped heartbeating: clear error, nothing recorded.
    host.stop();
    std::thread::sleep(Duration::from_secs(4));
    let j = submit(&s, "/v1/backups", json!({"vms": ["vm2"]}));
    assert_eq!(j["state"], "failed");
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("stopped heartbeating"),
        "{j}"
    );
    let b: Value = s.get_json("/v1/backups?vm=vm2").unwrap();
    assert_eq!(b.as_array().unwrap().len(), 2);

    // Everything above ran on an encrypted vault: its files hold neither the guests' file
    // contents nor their names. (On a clear vault this fails: a container holds "hello.txt",
    // the ext4 directory block.)
    let mut files = 0;
    let mut dirs = vec![t.join("vault")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap().map(Result::unwrap) {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
                continue;
            }
            let b = std::fs::read(e.path()).unwrap();
            for needle in [&b"hello from vm1"[..], b"hello.txt", b"new.bin"] {
                assert!(
                    !b.windows(needle.len()).any(|w| w == needle),
                    "{} holds {:?} in clear",
                    e.path().display(),
                    String::from_utf8_lossy(needle)
                );
            }
            files += 1;
        }
    }
    assert!(files > 10, "{files} files in the vault");
}
