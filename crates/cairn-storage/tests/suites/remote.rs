//! Tests through a vault service in another process (the `cairn` binary), and of the
//! agent's own HTTPS service.

use super::*;

/// Through a vault service in another process: full + incremental, counted on the wire.
#[test]
fn remote_vault_full_and_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let vp = VaultProc::start(dir.path());
    let v = vp.connect();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let a = agent(dir.path(), &ds);
    let d = ds.join("n.raw");
    write_raw(&d, &image_bytes(32 << 20, 13));
    let r1 = a
        .backup_disk(
            &v,
            &DiskSnapshot::of_file(&d).unwrap(),
            &req("n", None, vec![]),
        )
        .unwrap();
    assert!(r1.bytes_sent > 10 * MIB, "{}", r1.bytes_sent);
    scribble(&d, 9 * MIB, 64 << 10, 130);
    let hint = ChangeHint::Hypervisor {
        extents: ExtentList::from_unsorted(vec![Extent::new(9 * MIB, 64 << 10)]),
    };
    let r2 = a
        .backup_disk(
            &v,
            &DiskSnapshot::of_file(&d).unwrap(),
            &req("n", Some("n"), vec![hint]),
        )
        .unwrap();
    assert_eq!(r2.change_source, ChangeSource::HypervisorBitmap);
    assert!(
        r2.bytes_sent < 512 << 10,
        "incremental sent {}",
        r2.bytes_sent
    );
    println!(
        "remote: full sent {} bytes, incremental sent {} bytes (read {})",
        r1.bytes_sent, r2.bytes_sent, r2.bytes_read
    );
    assert_same(
        &restore_raw(&a, &v, &r2.manifest.id.to_string(), dir.path()),
        &std::fs::read(&d).unwrap(),
        "remote",
    );
    let vs: serde_json::Value = vp.client().get_json("/v1/stats").unwrap();
    assert!(vs["bytes_received"].as_u64().unwrap() >= r1.bytes_sent + r2.bytes_sent);
}

/// A backup process killed mid-way: the agent's retry does not resend durable segments.
#[test]
fn killed_backup_resumes_without_resending() {
    let dir = tempfile::tempdir().unwrap();
    let vp = VaultProc::start(dir.path());
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let d = ds.join("k.raw");
    // Incompressible data: every segment is new.
    let mut data = vec![0u8; 64 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
    write_raw(&d, &data);
    let containers = vp.repo.join("containers");
    // Sizes of the containers that are durable (renamed into place; not temporary files).
    let durable_sizes = || -> Vec<u64> {
        let Ok(rd) = std::fs::read_dir(&containers) else {
            return Vec::new();
        };
        rd.flatten()
            .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
            .filter(|f| !f.file_name().to_string_lossy().contains(".tmp-"))
            .filter_map(|f| f.metadata().ok().map(|m| m.len()))
            .collect()
    };
    let mut child = std::process::Command::new(cairn_bin())
        .args([
            "image",
            "backup",
            "--repo",
            &vp.url,
            "--name",
            "k",
            "--threads",
            "1",
            "--json",
            d.to_str().unwrap(),
        ])
        .env("CAIRN_TOKEN", &vp.token)
        .env("CAIRN_FINGERPRINT", &vp.fingerprint)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while durable_sizes().len() < 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup finished before it could be killed"
        );
        assert!(t.elapsed().as_secs() < 120, "no container became durable");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let sizes = durable_sizes();
    let durable = sizes.len();
    // Segment bytes durable at the kill (incompressible data: stored = raw).
    let durable_bytes: u64 = sizes.iter().sum();
    println!(
        "killed after {durable} durable containers ({:?})",
        t.elapsed()
    );
    let v = vp.connect();
    assert!(
        v.list().unwrap().is_empty(),
        "nothing visible after the kill"
    );
    let a = agent(dir.path(), &ds);
    let r = a
        .backup_disk(
            &v,
            &DiskSnapshot::of_file(&d).unwrap(),
            &req("k", None, vec![]),
        )
        .unwrap();
    println!(
        "retry: bytes_new {} bytes_sent {} of {}",
        r.manifest.stats.bytes_new,
        r.bytes_sent,
        64 << 20
    );
    assert!(
        // Each container holds at most ~1% of trailer beside its segments.
        r.manifest.stats.bytes_new + durable_bytes * 98 / 100 <= 64 << 20,
        "{:?}",
        r.manifest.stats
    );
    assert!(
        r.bytes_sent < 64 << 20,
        "retry resent everything: {}",
        r.bytes_sent
    );
    assert_same(
        &restore_raw(&a, &v, &r.manifest.id.to_string(), dir.path()),
        &data,
        "resumed",
    );
}

/// The agent's own HTTPS service, backing up to the vault service in another process.
#[test]
fn service_lists_snapshots_backs_up_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let vp = VaultProc::start(dir.path());
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let d = ds.join("s.raw");
    let data = image_bytes(16 << 20, 14);
    write_raw(&d, &data);
    let agent = std::sync::Arc::new(agent(dir.path(), &ds));
    let (id, fp) = cairn_http::tls::ensure_self_signed(&dir.path().join("agent-tls"), &[]).unwrap();
    let tls = cairn_http::tls::server_config(&id).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (addr, handle) = rt
        .block_on(cairn_storage::service::serve(
            agent.clone(),
            "127.0.0.1:0".parse().unwrap(),
            tls,
            "t0ken".into(),
        ))
        .unwrap();
    let url = format!("https://{addr}");
    let c = cairn_http::Client::new(&url, "t0ken", &cairn_http::Trust::Fingerprint(fp.clone()))
        .unwrap();
    let bad = cairn_http::Client::new(&url, "nope", &cairn_http::Trust::Fingerprint(fp)).unwrap();
    assert_eq!(
        bad.get_json::<serde_json::Value>("/v1/datastores")
            .unwrap_err()
            .kind(),
        Some(cairn_http::ErrorKind::Unauthorized)
    );

    let dss: Vec<DatastoreInfo> = c.get_json("/v1/datastores").unwrap();
    assert_eq!(dss[0].disks[0].id, "s.raw");
    let caps: Vec<Capabilities> = c.get_json("/v1/providers").unwrap();
    assert_eq!(caps.len(), 4);
    let mut snaps: Vec<UnitSnapshot> = c
        .post_json("/v1/snapshots", &serde_json::json!({"provider": "copy", "disks": [{"datastore": "ds", "disk": "s.raw"}], "tag": "svc"}))
        .unwrap();
    assert_eq!(snaps.len(), 1);
    let snap = snaps.remove(0);
    let err = c
        .post_json::<_, serde_json::Value>("/v1/snapshots", &serde_json::json!({"provider": "copy", "disks": [{"datastore": "ds", "disk": "../x"}]}))
        .unwrap_err();
    assert_eq!(err.kind(), Some(cairn_http::ErrorKind::BadRequest), "{err}");
    let vault =
        serde_json::json!({"url": vp.url, "token": vp.token, "fingerprint": vp.fingerprint});
    let res: Vec<serde_json::Value> = c
        .post_json(
            "/v1/backups",
            &serde_json::json!({
                "vault": vault,
                "disks": [
                    {"source": {"kind": "snapshot", "snapshot": snap.id, "index": 0}, "request": {"name": "s"}},
                    {"source": {"kind": "in_place", "datastore": "ds", "disk": "missing.raw"}, "request": {"name": "m"}}
                ]
            }),
        )
        .unwrap();
    let ok = &res[0]["ok"];
    assert_eq!(ok["change_source"], "full", "{res:?}");
    assert!(res[1]["error"]["kind"] == "not_found", "{res:?}");
    let sent = ok["bytes_sent"].as_u64().unwrap();
    let rep: RestoreReport = c
        .post_json(
            "/v1/restores",
            &serde_json::json!({"vault": vault, "snapshot": "s", "datastore": "ds", "disk": "s-restored.raw", "format": "raw", "mode": "new"}),
        )
        .unwrap();
    assert_same(
        &std::fs::read(ds.join("s-restored.raw")).unwrap(),
        &data,
        "service restore",
    );
    let stats: AgentStats = c.get_json("/v1/stats").unwrap();
    assert_eq!(stats.bytes_sent, sent);
    assert!(
        stats.disk_bytes_read >= 16 << 20
            && stats.disk_bytes_written == rep.bytes_written
            && stats.bytes_received > 0,
        "{stats:?}"
    );
    let list: Vec<UnitSnapshot> = c.get_json("/v1/snapshots").unwrap();
    assert_eq!(list.len(), 1);
    let _: serde_json::Value = c
        .delete_json(&format!("/v1/snapshots/{}", snap.id))
        .unwrap();
    assert!(!snap.dir.unwrap().exists());
    let list: Vec<UnitSnapshot> = c.get_json("/v1/snapshots").unwrap();
    assert!(list.is_empty());
    handle.abort();
    drop(rt);
}
