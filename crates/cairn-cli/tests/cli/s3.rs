//! The CLI on repositories in S3 (a real s3s-fs on loopback): every repository command on
//! `s3://BUCKET/PREFIX`, settings from the `AWS_*` variables and from the `--s3-*` flags, and
//! `cairn vault` serving an S3 repository to clients that know nothing of S3.

use cairn_testing::s3::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};

use super::{cairn, exercise, ok, s, start_cmd};

#[test]
fn every_repository_command_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let Some(srv) = S3Server::start(&dir.path().join("s3")) else {
        return;
    };
    let cache = dir.path().join("cache");
    let mut env: Vec<(&str, String)> = srv.env();
    env.push(("CAIRN_CACHE_DIR", s(&cache).to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let repo = format!("s3://{BUCKET}/cli/repo");
    ok(&["repo", "init", &repo], &env);
    let again = cairn(&["repo", "init", &repo], &env);
    assert!(!again.status.success(), "init twice fails");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds a repository"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    exercise(&repo, dir.path(), &env);
    // The objects are in the bucket, under the prefix; the cache is local.
    assert!(srv.root().join(BUCKET).join("cli/repo/containers").exists());
    assert!(cache.read_dir().unwrap().count() > 0);

    // The index cache is rebuildable: gone, the next command rebuilds it.
    std::fs::remove_dir_all(&cache).unwrap();
    let v = ok(&["repo", "verify", &repo], &env);
    assert!(v.contains("repository OK"), "{v}");
    // A rebuild of the index on S3.
    ok(&["repo", "rebuild-index", &repo], &env);

    // No endpoint, no credentials, no bucket: each named.
    let o = cairn(&["image", "list", "--repo", &repo], &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && (err.contains("endpoint") || err.contains("credentials")),
        "{err}"
    );
    let o = cairn(&["image", "list", "--repo", "s3://no-such-bucket/x"], &env);
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
}

/// Starts `cairn vault` on `repo` with its S3 settings from flags only (the secret in a file
/// in `dir`) and its cache in `dir/cache`.
fn s3_vault(srv: &S3Server, dir: &std::path::Path, repo: &str, cache: &str) -> super::Service {
    let secret = dir.join("s3.secret");
    std::fs::write(&secret, format!("{SECRET_KEY}\n")).unwrap();
    let cache = dir.join(cache);
    start_cmd(&[
        "vault",
        "--repo",
        repo,
        "--listen",
        "127.0.0.1:0",
        "--s3-endpoint",
        &srv.endpoint(),
        "--s3-access-key",
        ACCESS_KEY,
        "--s3-secret-key-file",
        s(&secret),
        "--cache-dir",
        s(&cache),
    ])
}

#[test]
fn the_vault_service_serves_an_s3_repository() {
    let dir = tempfile::tempdir().unwrap();
    let Some(srv) = S3Server::start(&dir.path().join("s3")) else {
        return;
    };
    // The service gets its S3 settings from flags only.
    let repo = format!("s3://{BUCKET}/served");
    let svc = s3_vault(&srv, dir.path(), &repo, "vault-cache");
    let env = [
        ("CAIRN_TOKEN", svc.token.as_str()),
        ("CAIRN_FINGERPRINT", svc.fingerprint.as_str()),
    ];
    exercise(&svc.url, dir.path(), &env);
    // The data went through the service into the bucket.
    assert!(srv.root().join(BUCKET).join("served/containers").exists());
    assert!(srv.root().join(BUCKET).join("served/snapshots").exists());
}

/// Two vault services (two processes, two caches) on one bucket prefix: a backup through one
/// is deduplicated by the other; one killed in the middle of a backup fails that backup, the
/// same backup through the other succeeds, and nothing partial is visible through either.
#[test]
fn two_vault_services_on_one_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let Some(srv) = S3Server::start(&dir.path().join("s3")) else {
        return;
    };
    let repo = format!("s3://{BUCKET}/shared");
    let start = |cache: &str| s3_vault(&srv, dir.path(), &repo, cache);
    let a = start("a");
    let b = start("b");
    let env_of = |v: &super::Service| {
        vec![
            ("CAIRN_TOKEN".to_string(), v.token.clone()),
            ("CAIRN_FINGERPRINT".to_string(), v.fingerprint.clone()),
        ]
    };
    let backup = |v: &super::Service, name: &str, img: &std::path::Path| {
        let env = env_of(v);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, x)| (k.as_str(), x.as_str())).collect();
        let o = cairn(
            &[
                "image",
                "backup",
                "--repo",
                &v.url,
                "--name",
                name,
                "--json",
                s(img),
            ],
            &env,
        );
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let img = dir.path().join("d.img");
    super::make_image(&img, 8, 3);
    let (ok_a, out) = backup(&a, "d", &img);
    assert!(ok_a, "{out}");
    let (ok_b, out) = backup(&b, "d-again", &img);
    assert!(ok_b, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["bytes_new"], 0,
        "B deduplicates against what went through A: {v}"
    );

    // A big, incompressible backup through A; A is killed once its first container lands.
    let big = dir.path().join("big.img");
    let mut data = vec![0u8; 64 << 20];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(4),
        &mut data,
    );
    std::fs::write(&big, &data).unwrap();
    let before = srv.objects("shared/containers");
    let env = env_of(&a);
    let mut child = std::process::Command::new(super::CAIRN)
        .args([
            "image",
            "backup",
            "--repo",
            &a.url,
            "--name",
            "big",
            s(&big),
        ])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    srv.wait_for_objects_other_than("shared/containers", before);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup still runs when its vault is killed"
    );
    drop(a); // SIGKILL
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "a backup whose vault died fails");
    // Nothing partial is visible; the same backup through B succeeds.
    let list = |v: &super::Service| {
        let env = env_of(v);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, x)| (k.as_str(), x.as_str())).collect();
        let l = ok(&["image", "list", "--repo", &v.url, "--json"], &env);
        serde_json::from_str::<serde_json::Value>(&l).unwrap()
    };
    assert_eq!(list(&b).as_array().unwrap().len(), 2, "{}", list(&b));
    let (ok_b, out) = backup(&b, "big", &big);
    assert!(ok_b, "{out}");
    assert_eq!(list(&b).as_array().unwrap().len(), 3);
    let env = env_of(&b);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, x)| (k.as_str(), x.as_str())).collect();
    let v = ok(&["repo", "verify", &b.url], &env);
    assert!(v.contains("repository OK"), "{v}");
}
