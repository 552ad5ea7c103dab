//! RDM, metadata snapshots, retention, schedules, and what failures leave behind.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

#[test]
fn rdm_metadata_retention_schedules_and_failures() {
    let Some(g) = guest_test() else { return };
    let t = g.tmp.path();
    let p = |s: &str| t.join(s).display().to_string();
    std::fs::create_dir_all(t.join("ds/luns")).unwrap();
    std::fs::create_dir_all(t.join("vault")).unwrap();
    // A small vault (tmpfs) to fill up later.
    let small = small_tmpfs(&t.join("vault"), "24m", "the full-vault case");
    let small_vault = small.is_some();

    let Cluster {
        vault,
        manager,
        host,
        mut storage,
        mut server,
    } = Cluster::start(t, &p("vault/repo"), true);
    let m = manager.client();

    // vm1: an ext4 system disk and a raw LUN (raw device mapping) on virtio-scsi.
    let d = disk(t, "vm1");
    let lun = t.join("ds/luns/lun0");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[..1 << 20]
        .iter_mut()
        .for_each(|b| *b = rand::random());
    std::fs::write(&lun, &bytes).unwrap();
    let spec = json!({
        "name": "vm1", "vcpus": 1, "memory_mib": 128,
        "disks": [
            {"id": "vda", "path": d, "format": "qcow2"},
            {"id": "sdb", "path": lun, "format": "raw", "bus": "virtio-scsi", "lun": "naa.6000c29000000001"},
        ],
        "boot": g.boot(),
    });
    let _: Value = m.post_json("/v1/hosts/h1/vms", &spec).unwrap();
    wait_guest(&m, "vm1");

    // Full backup with the RDM disk and a metadata snapshot holding the execution state.
    let s = server.client();
    let j = submit(&s, "/v1/backups", json!({"vms": ["vm1"]}));
    assert_eq!(j["state"], "succeeded", "{j}");
    let first = j["result"]["backups"][0]["backup"]
        .as_str()
        .unwrap()
        .to_string();
    let b: Value = s.get_json(&format!("/v1/backups/{first}")).unwrap();
    let sdb = b["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == "sdb")
        .unwrap();
    assert_eq!(sdb["datastore_disk"], "luns/lun0");
    assert!(sdb["rdm"]["lun"]["size"].as_u64() == Some(4 << 20), "{sdb}");
    assert!(b["metadata"]["state_bytes"].as_i64().unwrap() > 0, "{b}");
    assert_eq!(b["metadata"]["config_reused"], false);
    assert_eq!(b["metadata"]["timestamp_id"], b["timestamp_id"]);
    let first_snaps: Vec<String> = b["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["vault_snapshot"].as_str().unwrap().to_string())
        .collect();

    // Retention keep-last 1 and a schedule whose first run is now.
    let _: Value = s
        .put_json("/v1/retention/vm1", &json!({"keep_last": 1}))
        .unwrap();
    let _: Value = s
        .put_json(
            "/v1/schedules/often",
            &json!({"vms": ["vm1"], "every": "1h", "first_in_s": 0}),
        )
        .unwrap();
    let t0 = Instant::now();
    let second = loop {
        let list: Value = s.get_json("/v1/backups?vm=vm1").unwrap();
        let ids: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap())
            .collect();
        if ids.len() == 1 && ids[0] != first {
            break ids[0].to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the schedule did not run: {list}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let _: Value = s.delete_json("/v1/schedules/often").unwrap();
    let b2: Value = s.get_json(&format!("/v1/backups/{second}")).unwrap();
    assert_eq!(b2["metadata"]["config_reused"], true, "{b2}");
    assert_eq!(b2["kind"], "incremental");
    // The pruned backup's vault snapshots go (the catalog forgets a backup first, the vault
    // its snapshots right after).
    let t0 = Instant::now();
    loop {
        let snaps: Value = vault.client().get_json("/v1/snapshots").unwrap();
        let left: Vec<&str> = snaps
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap())
            .filter(|id| first_snaps.iter().any(|f| f == id))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "snapshots {left:?} of the pruned backup are still in the vault"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Restore the RDM backup's disks as a new VM (not started): a new LUN with its mapping.
    let j = submit(
        &s,
        "/v1/restores",
        json!({"backup": second, "as_name": "vm1-new", "start": false}),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(t.join("ds/luns/vm1-new-sdb").exists());
    assert!(t.join("ds/luns/vm1-new-sdb.rdm.json").exists());
    assert_eq!(std::fs::read(t.join("ds/luns/vm1-new-sdb")).unwrap(), bytes);

    // A storage agent that is down: the job fails and the VM snapshot is released.
    storage.stop();
    let j = submit(&s, "/v1/backups", json!({"vms": ["vm1"]}));
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(host_snapshots(&host), 0);
    assert_eq!(list_len(&s, "/v1/backups?vm=vm1"), 1);
    storage.restart(&[]);
    std::thread::sleep(Duration::from_secs(2));

    // Cancel a job that holds a VM snapshot; then kill -9 the server while one holds it.
    server.restart(&[("CAIRN_FAULT_PAUSE_AFTER_VM_SNAPSHOT_MS", "60000")]);
    let s = server.client();
    let j: Value = s
        .post_json("/v1/backups", &json!({"vms": ["vm1"]}))
        .unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    wait_hold(&s, &id);
    assert_eq!(host_snapshots(&host), 1);
    let _: Value = s
        .post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
        .unwrap();
    assert_eq!(wait_job(&s, &id)["state"], "cancelled");
    assert_eq!(host_snapshots(&host), 0);

    let j: Value = s
        .post_json("/v1/backups", &json!({"vms": ["vm1"]}))
        .unwrap();
    let id = j["id"].as_str().unwrap().to_string();
    wait_hold(&s, &id);
    server.kill();
    assert_eq!(
        host_snapshots(&host),
        1,
        "the killed server's snapshot is still open"
    );
    server.restart(&[]);
    let s = server.client();
    let j = wait_job(&s, &id);
    assert_eq!(j["state"], "failed");
    assert!(
        j["error"].as_str().unwrap().contains("server stopped"),
        "{j}"
    );
    assert_eq!(host_snapshots(&host), 0, "recovery released the snapshot");
    // And the server works on: an incremental after all this.
    let j = submit(&s, "/v1/backups", json!({"vms": ["vm1"]}));
    assert_eq!(j["state"], "succeeded", "{j}");
    // Change tracking lost: QEMU killed, the VM started again on the same disk. Its bitmap
    // comes back inconsistent; the next backup compares with the parent and succeeds.
    kill_qemu(t, "vm1");
    start_again(&m, "vm1", &spec);
    let j = submit(&s, "/v1/backups", json!({"vms": ["vm1"]}));
    assert_eq!(j["state"], "succeeded", "{j}");
    let vda = &j["result"]["backups"][0]["disks"][0];
    assert_eq!(vda["disk"], "vda");
    assert_eq!(vda["change_source"], "recipe_compare", "{j}");
    let log = s
        .get_json::<Value>(&format!("/v1/jobs/{}", j["id"].as_str().unwrap()))
        .unwrap();
    assert!(
        log["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"]
                .as_str()
                .unwrap()
                .contains("changed blocks unknown")),
        "{log}"
    );

    // Last, a full vault: a clear error, nothing recorded, the snapshot released.
    if small_vault {
        let w = guest_exec(
            &m,
            "vm1",
            "dd if=/dev/urandom of=/mnt/big bs=1M count=26 2>/dev/null; sync",
        );
        assert_eq!(w["exit_code"], 0, "{w}");
        let j = submit(&s, "/v1/backups", json!({"vms": ["vm1"]}));
        assert_eq!(j["state"], "failed", "{j}");
        let e = j["error"].as_str().unwrap();
        assert!(e.contains("space") || e.contains("insufficient"), "{e}");
        assert_eq!(host_snapshots(&host), 0);
        assert_eq!(list_len(&s, "/v1/backups?vm=vm1"), 1);
        guest_exec(&m, "vm1", "rm -f /mnt/big; sync; fstrim /mnt || true");
    }
}
