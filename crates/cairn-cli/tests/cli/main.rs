//! The `cairn` CLI against a directory repository and against a vault service running in
//! another process on loopback: the acceptance interface of the vault. Also services started
//! as processes: agents, and two servers sharing a PostgreSQL catalog (`leader`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use rand::{RngCore, SeedableRng};
use serde_json::Value;

mod encryption;
mod leader;
mod repair;
mod s3;
mod security;
mod vault_service;

const CAIRN: &str = env!("CARGO_BIN_EXE_cairn");

fn cairn(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(CAIRN);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run cairn")
}

fn ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let o = cairn(args, env);
    assert!(
        o.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn json(args: &[&str], env: &[(&str, &str)]) -> Value {
    let s = ok(args, env);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("cairn {args:?}: not JSON ({e}): {s}"))
}

/// An image of `mib` MiB: random, text-like and zero regions.
fn make_image(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; mib << 20];
    for (i, b) in v.chunks_mut(1 << 20).enumerate() {
        match i % 3 {
            0 => rng.fill_bytes(b),
            1 => b
                .iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = (j % 97) as u8),
            _ => {}
        }
    }
    std::fs::write(path, &v).unwrap();
    v
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the whole CLI surface against REPO (directory or URL).
fn exercise(repo: &str, dir: &Path, env: &[(&str, &str)]) {
    let img = dir.join("disk.img");
    let data = make_image(&img, 6, 1);
    let b1 = json(
        &[
            "image",
            "backup",
            "--repo",
            repo,
            "--name",
            "vm1-disk0",
            "--json",
            s(&img),
        ],
        env,
    );
    let snap1 = b1["snapshot"].as_str().unwrap().to_string();
    assert_eq!(b1["bytes_read"], 6 << 20);
    assert!(b1["bytes_new"].as_u64().unwrap() > 0 && b1["bytes_stored"].as_u64().unwrap() > 0);

    // Day 2: rewrite two 4 KiB blocks, back up only those regions.
    let mut d2 = data.clone();
    d2[4096 * 10..4096 * 11].fill(0xab);
    d2[(3 << 20) + 8192..(3 << 20) + 12288].fill(0xcd);
    let img2 = dir.join("disk2.img");
    std::fs::write(&img2, &d2).unwrap();
    let changed = dir.join("changed.txt");
    std::fs::write(
        &changed,
        format!("{} 4096\n{} 4096\n", 4096 * 10, (3 << 20) + 8192),
    )
    .unwrap();
    let b2 = json(
        &[
            "image",
            "backup",
            "--repo",
            repo,
            "--name",
            "vm1-disk0",
            "--parent",
            &snap1,
            "--changed",
            s(&changed),
            "--json",
            s(&img2),
        ],
        env,
    );
    assert!(
        b2["bytes_read"].as_u64().unwrap() < 1 << 20,
        "incremental reads little: {b2}"
    );
    assert!(
        b2["bytes_new"].as_u64().unwrap() < 300_000,
        "incremental stores little: {b2}"
    );

    // Restore both, bit-exact.
    let out = dir.join("out.img");
    ok(
        &[
            "image",
            "restore",
            "--force",
            "--repo",
            repo,
            b2["snapshot"].as_str().unwrap(),
            s(&out),
        ],
        env,
    );
    assert!(
        std::fs::read(&out).unwrap() == d2,
        "day-2 restore is bit-exact"
    );
    let r = json(
        &[
            "image",
            "restore",
            "--force",
            "--repo",
            repo,
            "--json",
            &snap1,
            s(&out),
        ],
        env,
    );
    assert_eq!(r["bytes"], 6 << 20);
    assert!(
        std::fs::read(&out).unwrap() == data,
        "day-1 restore is bit-exact"
    );

    let list = json(&["image", "list", "--repo", repo, "--json"], env);
    assert_eq!(list.as_array().unwrap().len(), 2);

    let v = json(&["repo", "verify", repo, "--json"], env);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");

    // Prune to the newest, then GC frees the old snapshot's unique data.
    let p = json(
        &[
            "repo",
            "prune",
            repo,
            "--keep-last",
            "1",
            "--dry-run",
            "--json",
        ],
        env,
    );
    assert_eq!(p["forget"].as_array().unwrap().len(), 1);
    assert_eq!(
        json(&["image", "list", "--repo", repo, "--json"], env)
            .as_array()
            .unwrap()
            .len(),
        2
    );
    ok(&["repo", "prune", repo, "--keep-last", "1"], env);
    assert_eq!(
        json(&["image", "list", "--repo", repo, "--json"], env)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let g = json(&["repo", "gc", repo, "--dry-run", "--json"], env);
    assert_eq!(g["executed"], false);
    let g = json(&["repo", "gc", repo, "--json"], env);
    assert_eq!(g["executed"], true);
    ok(
        &[
            "image",
            "restore",
            "--force",
            "--repo",
            repo,
            b2["snapshot"].as_str().unwrap(),
            s(&out),
        ],
        env,
    );
    assert!(
        std::fs::read(&out).unwrap() == d2,
        "restore after GC is bit-exact"
    );
    let v = json(&["repo", "verify", repo, "--json"], env);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
}

#[test]
fn cli_on_a_directory_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ok(&["repo", "init", s(&repo)], &[]);
    let again = cairn(&["repo", "init", s(&repo)], &[]);
    assert!(!again.status.success(), "init twice fails");
    exercise(s(&repo), dir.path(), &[]);
}

struct Service {
    child: Child,
    url: String,
    fingerprint: String,
    token: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_service(repo: &Path) -> Service {
    start_cmd(&["vault", "--repo", s(repo), "--listen", "127.0.0.1:0"])
}

/// Starts a `cairn` service and reads the one JSON line it prints when it is ready.
fn start_cmd(args: &[&str]) -> Service {
    vault_service::start_bin(CAIRN, args)
}

#[test]
fn storage_and_host_agent_services_start_and_check_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    std::fs::write(ds.join("vm1.raw"), vec![0u8; 1 << 20]).unwrap();
    let ds_arg = format!("ds1={}", s(&ds));
    let storage_state = dir.path().join("storage");
    let host_state = dir.path().join("host");
    for (args, probe) in [
        (
            vec![
                "storage-agent",
                "--datastore",
                ds_arg.as_str(),
                "--state-dir",
                s(&storage_state),
                "--listen",
                "127.0.0.1:0",
            ],
            "/v1/datastores",
        ),
        (
            vec![
                "host-agent",
                "--state-dir",
                s(&host_state),
                "--listen",
                "127.0.0.1:0",
            ],
            "/v1/vms",
        ),
    ] {
        let svc = start_cmd(&args);
        let trust = cairn_http::Trust::Fingerprint(svc.fingerprint.clone());
        let ok = cairn_http::Client::new(&svc.url, &svc.token, &trust).unwrap();
        let v: Value = ok
            .get_json(probe)
            .unwrap_or_else(|e| panic!("{args:?} {probe}: {e}"));
        if probe == "/v1/datastores" {
            assert!(v.to_string().contains("vm1.raw"), "{v}");
        }
        let bad = cairn_http::Client::new(&svc.url, "wrong", &trust).unwrap();
        let e = bad.get_json::<Value>(probe).unwrap_err();
        assert!(
            matches!(e, cairn_http::ClientError::Api { status: 401, .. }),
            "{e}"
        );
    }
}

#[test]
fn cli_through_the_vault_service() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("served");
    let svc = start_service(&repo);
    let env = [
        ("CAIRN_TOKEN", svc.token.as_str()),
        ("CAIRN_FINGERPRINT", svc.fingerprint.as_str()),
    ];
    exercise(&svc.url, dir.path(), &env);
    // The data really went through the service, into its directory.
    assert!(repo.join("containers").exists());

    // Bad token: 401, nothing written.
    let before = std::fs::read_dir(repo.join("snapshots")).unwrap().count();
    let img = dir.path().join("x.img");
    make_image(&img, 1, 5);
    let o = cairn(
        &[
            "image",
            "backup",
            "--repo",
            &svc.url,
            "--name",
            "x",
            s(&img),
        ],
        &[
            ("CAIRN_TOKEN", "wrong"),
            ("CAIRN_FINGERPRINT", &svc.fingerprint),
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("401") && err.contains("unauthorized"), "{err}");
    assert_eq!(
        std::fs::read_dir(repo.join("snapshots")).unwrap().count(),
        before
    );

    // Wrong certificate pin: refused before any request.
    let o = cairn(
        &["image", "list", "--repo", &svc.url],
        &[
            ("CAIRN_TOKEN", &svc.token),
            ("CAIRN_FINGERPRINT", &"00".repeat(32)),
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("fingerprint"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Malformed requests: 4xx with a JSON error.
    let client = cairn_http::Client::new(
        &svc.url,
        &svc.token,
        &cairn_http::Trust::Fingerprint(svc.fingerprint.clone()),
    )
    .unwrap();
    let e = client
        .post_raw("/v1/fetch", b"not a digest list")
        .unwrap_err();
    assert!(
        matches!(e, cairn_http::ClientError::Api { status: 400, .. }),
        "{e}"
    );
    let e = client
        .post_raw("/v1/sessions/zz/lacking", &[0u8; 32])
        .unwrap_err();
    assert!(
        matches!(e, cairn_http::ClientError::Api { status: 400, .. }),
        "{e}"
    );
    let e = client.get_bytes("/v1/snapshots/nope").unwrap_err();
    assert!(
        matches!(e, cairn_http::ClientError::Api { status: 404, .. }),
        "{e}"
    );
    #[derive(serde::Deserialize)]
    struct Begin {
        session: String,
    }
    let b: Begin = client
        .post_json("/v1/sessions", &serde_json::json!({}))
        .unwrap();
    let e = client
        .post_raw(&format!("/v1/sessions/{}/blobs", b.session), &[1u8; 50])
        .unwrap_err();
    assert!(
        matches!(e, cairn_http::ClientError::Api { status: 400, .. }),
        "{e}"
    );
    // A blob whose content does not match its digest is refused.
    let mut frame = vec![7u8; 32];
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&4u32.to_le_bytes());
    frame.extend_from_slice(&4u32.to_le_bytes());
    frame.extend_from_slice(b"evil");
    let e = client
        .post_raw(&format!("/v1/sessions/{}/blobs", b.session), &frame)
        .unwrap_err();
    assert!(
        matches!(e, cairn_http::ClientError::Api { status: 400, .. }),
        "{e}"
    );
    let e = client
        .post_bytes::<Value>(&format!("/v1/sessions/{}/commit", b.session), b"{")
        .unwrap_err();
    assert!(
        matches!(e, cairn_http::ClientError::Api { status: 400, .. }),
        "{e}"
    );
    // Health needs no token.
    let anon = cairn_http::Client::new(
        &svc.url,
        "",
        &cairn_http::Trust::Fingerprint(svc.fingerprint.clone()),
    )
    .unwrap();
    assert_eq!(anon.get_bytes("/health").unwrap(), b"ok");
}

fn containers(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(repo.join("containers")) else {
        return out;
    };
    for d in rd {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if !p.to_string_lossy().contains(".tmp-") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn kill_9_mid_backup_then_retry_does_not_resend() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ok(&["repo", "init", s(&repo), "--compression", "0"], &[]);
    let img = dir.path().join("big.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut data = vec![0u8; 160 << 20];
    rng.fill_bytes(&mut data);
    std::fs::write(&img, &data).unwrap();
    let mut child = Command::new(CAIRN)
        .args([
            "image",
            "backup",
            "--repo",
            s(&repo),
            "--name",
            "big",
            "--threads",
            "1",
            s(&img),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while containers(&repo).len() < 2 && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    let durable = containers(&repo).len();
    assert!(durable >= 2, "some containers were durable before the kill");
    // Segment bytes that were durable at the kill (compression is off: stored = raw).
    let durable_bytes: u64 = containers(&repo)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(!status.success() || durable > 0);
    let list = json(&["image", "list", "--repo", s(&repo), "--json"], &[]);
    if status.success() {
        eprintln!("backup finished before the kill; the test proves less");
    } else {
        assert!(
            list.as_array().unwrap().is_empty(),
            "a killed backup leaves no snapshot"
        );
    }
    // The retry reuses what was durable.
    let b = json(
        &[
            "image",
            "backup",
            "--repo",
            s(&repo),
            "--name",
            "big",
            "--json",
            s(&img),
        ],
        &[],
    );
    let new = b["bytes_new"].as_u64().unwrap();
    // Each container holds at most ~1% of trailer beside its segments.
    assert!(
        new + durable_bytes * 98 / 100 <= 160 << 20,
        "retry resent durable segments ({durable_bytes} bytes were durable): {b}"
    );
    repair::restores(&repo, "big", &data, dir.path());
    let v = json(&["repo", "verify", s(&repo), "--json"], &[]);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
}

#[test]
fn damaged_and_truncated_containers_are_named_and_never_restored_silently() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ok(&["repo", "init", s(&repo)], &[]);
    let img = dir.path().join("a.img");
    make_image(&img, 3, 2);
    let b = json(
        &[
            "image",
            "backup",
            "--repo",
            s(&repo),
            "--name",
            "victim",
            "--json",
            s(&img),
        ],
        &[],
    );
    let other = dir.path().join("b.img");
    let other_data = make_image(&other, 1, 99);
    json(
        &[
            "image",
            "backup",
            "--repo",
            s(&repo),
            "--name",
            "bystander",
            "--json",
            s(&other),
        ],
        &[],
    );
    // Flip a byte in the victim's biggest container.
    let mut cs = containers(&repo);
    cs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = cs.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0x55;
    std::fs::write(&victim, &bytes).unwrap();
    let o = cairn(&["repo", "verify", s(&repo)], &[]);
    assert_eq!(o.status.code(), Some(2), "verify exits 2 on damage");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("damaged snapshot") && text.contains("victim"),
        "{text}"
    );
    let out = dir.path().join("out.img");
    let o = cairn(
        &[
            "image",
            "restore",
            "--force",
            "--repo",
            s(&repo),
            "victim",
            s(&out),
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("image bytes"),
        "error names the byte range: {err}"
    );
    assert!(!out.exists(), "nothing written under the output name");
    // Truncate it: still named, still no silent restore. The bystander still restores.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(bytes.len() as u64 / 2)
        .unwrap();
    let o = cairn(&["repo", "verify", s(&repo)], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stdout).contains("victim"));
    assert!(
        !cairn(
            &[
                "image",
                "restore",
                "--force",
                "--repo",
                s(&repo),
                b["snapshot"].as_str().unwrap(),
                s(&out)
            ],
            &[]
        )
        .status
        .success()
    );
    ok(
        &[
            "image",
            "restore",
            "--force",
            "--repo",
            s(&repo),
            "bystander",
            s(&out),
        ],
        &[],
    );
    assert!(std::fs::read(&out).unwrap() == other_data);
}

#[test]
fn disk_full_gives_a_clear_error_and_keeps_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let m = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs", s(&mnt)])
        .output();
    if !matches!(&m, Ok(o) if o.status.success()) {
        eprintln!("SKIPPED LOUDLY: cannot mount a small tmpfs (needs root): {m:?}");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let repo = mnt.join("repo");
    ok(&["repo", "init", s(&repo)], &[]);
    let small = dir.path().join("small.img");
    let small_data = make_image(&small, 2, 3);
    json(
        &[
            "image",
            "backup",
            "--repo",
            s(&repo),
            "--name",
            "small",
            "--json",
            s(&small),
        ],
        &[],
    );
    let big = dir.path().join("big.img");
    let mut data = vec![0u8; 40 << 20];
    rand::rngs::StdRng::seed_from_u64(4).fill_bytes(&mut data);
    std::fs::write(&big, &data).unwrap();
    let o = cairn(
        &[
            "image",
            "backup",
            "--repo",
            s(&repo),
            "--name",
            "big",
            s(&big),
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("space"), "error says the disk is full: {err}");
    let list = json(&["image", "list", "--repo", s(&repo), "--json"], &[]);
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "the failed backup is invisible"
    );
    repair::restores(&repo, "small", &small_data, dir.path());
    let v = json(&["repo", "verify", s(&repo), "--json"], &[]);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
}
