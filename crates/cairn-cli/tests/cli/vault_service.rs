//! `cairn vault` against clients that misbehave: a backup killed with SIGKILL (its session
//! must expire and free the repository for gc), hostile uploads (the service's memory must
//! stay bounded), and how the CLI authenticates to it (`--token-file`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use serde_json::Value;

use super::{CAIRN, Service, json, make_image, ok, s, start_cmd};

fn client(svc: &Service) -> cairn_http::Client {
    cairn_http::Client::new(
        &svc.url,
        &svc.token,
        &cairn_http::Trust::Fingerprint(svc.fingerprint.clone()),
    )
    .unwrap()
}

fn stats(svc: &Service) -> Value {
    client(svc).get_json("/v1/stats").unwrap()
}

#[test]
fn token_file_is_used_for_vault_urls() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start_cmd(&[
        "vault",
        "--repo",
        s(&dir.path().join("repo")),
        "--listen",
        "127.0.0.1:0",
    ]);
    let tf = dir.path().join("vault.token");
    std::fs::write(&tf, format!("{}\n", svc.token)).unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(CAIRN);
        c.args(args)
            .env_remove("CAIRN_TOKEN")
            .env_remove("CAIRN_SERVER_TOKEN_FILE")
            .env("CAIRN_FINGERPRINT", &svc.fingerprint);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    // --token-file alone, before or after the subcommand.
    for args in [
        &["image", "list", "--repo", &svc.url, "--token-file", s(&tf)][..],
        &["--token-file", s(&tf), "repo", "gc", &svc.url, "--dry-run"][..],
    ] {
        let o = run(args, &[]);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // It wins over CAIRN_TOKEN.
    let o = run(
        &["image", "list", "--repo", &svc.url, "--token-file", s(&tf)],
        &[("CAIRN_TOKEN", "wrong")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A file with the wrong token is refused like a wrong CAIRN_TOKEN.
    let bad = dir.path().join("bad.token");
    std::fs::write(&bad, "nope").unwrap();
    let o = run(
        &["image", "list", "--repo", &svc.url, "--token-file", s(&bad)],
        &[("CAIRN_TOKEN", &svc.token)],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"));
    // The server's token variable is never sent to a vault; without a token the error says
    // how to give one.
    let o = run(
        &["image", "list", "--repo", &svc.url],
        &[("CAIRN_SERVER_TOKEN_FILE", s(&tf))],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--token-file") && err.contains("CAIRN_TOKEN"),
        "{err}"
    );
}

#[test]
fn a_backup_killed_with_sigkill_frees_the_repository_within_the_lease() {
    const LEASE: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let svc = start_cmd(&[
        "vault",
        "--repo",
        s(&repo),
        "--listen",
        "127.0.0.1:0",
        "--session-lease",
        &LEASE.to_string(),
    ]);
    assert_eq!(stats(&svc)["session_lease_ms"], LEASE * 1000);
    let env = [
        ("CAIRN_TOKEN", svc.token.as_str()),
        ("CAIRN_FINGERPRINT", svc.fingerprint.as_str()),
    ];
    let img = dir.path().join("big.img");
    let mut data = vec![0u8; 128 << 20];
    rand::rngs::StdRng::seed_from_u64(17).fill_bytes(&mut data);
    std::fs::write(&img, &data).unwrap();
    drop(data);
    let mut backup = Command::new(CAIRN)
        .args([
            "image",
            "backup",
            "--repo",
            &svc.url,
            "--name",
            "big",
            "--threads",
            "1",
            s(&img),
        ])
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once data flows through its session.
    let t0 = Instant::now();
    while stats(&svc)["bytes_received"].as_u64().unwrap() < 4 << 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the backup never sent data"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    backup.kill().unwrap(); // SIGKILL: no abort, no more keep-alives
    let status = backup.wait().unwrap();
    let killed = Instant::now();
    assert!(!status.success(), "the backup finished before the kill");
    assert_eq!(
        stats(&svc)["open_sessions"],
        1,
        "the dead client's session is open"
    );
    // gc through the service runs beside the open session: what that session wrote, or
    // might build on, is condemned and waits for it.
    let gc = |extra: &[&str]| {
        let mut args = vec!["repo", "gc", svc.url.as_str(), "--json"];
        args.extend_from_slice(extra);
        json(&args, &env)
    };
    let beside = gc(&[]);
    assert_eq!(
        beside["deleted"].as_array().map(Vec::len),
        Some(0),
        "{beside}"
    );
    // The session expires with its lease; then gc leaves nothing waiting.
    while stats(&svc)["open_sessions"] != 0 {
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE + 10),
            "the dead client's session is still open {:?} after the kill",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let waited = killed.elapsed();
    let plan = gc(&[]);
    eprintln!("session expired {waited:?} after the kill (lease {LEASE} s); gc: {plan}");
    assert!(waited >= Duration::from_secs(LEASE - 1), "{waited:?}");
    assert_eq!(plan["waiting"], 0, "{plan}");
    let st = stats(&svc);
    assert_eq!(
        (&st["open_sessions"], &st["expired_sessions"]),
        (&0.into(), &1.into()),
        "{st}"
    );
    assert_eq!(plan["snapshots"], 0, "{plan}");
    assert!(
        json(&["image", "list", "--repo", &svc.url, "--json"], &env)
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing of the killed backup is visible"
    );
    let locks = std::fs::read_dir(repo.join("locks")).map_or(0, |d| d.count());
    assert_eq!(locks, 0, "no lock is left behind");
    let v = json(&["repo", "verify", &svc.url, "--json"], &env);
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    // The next backup works.
    let small = dir.path().join("small.img");
    make_image(&small, 2, 3);
    ok(
        &[
            "image",
            "backup",
            "--repo",
            &svc.url,
            "--name",
            "small",
            s(&small),
        ],
        &env,
    );
}

/// Starts `bin` (any build of `cairn`) as a service and reads the JSON line it prints when
/// ready.
pub(super) fn start_bin(bin: &str, args: &[&str]) -> Service {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{bin} said {line:?}: {e}"));
    let token = std::fs::read_to_string(v["token_file"].as_str().unwrap()).unwrap();
    Service {
        child,
        url: v["listen"].as_str().unwrap().to_string(),
        fingerprint: v["fingerprint"].as_str().unwrap().to_string(),
        token: token.trim().to_string(),
    }
}

/// Peak and current resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        st.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Issue 14's target: 16 concurrent uploads of 100 MB of garbage with a valid token keep the
/// vault service under 256 MiB. Half are random bytes, half a frame header that promises a
/// 16 MiB frame followed by garbage (the worst a body can make the service hold). Run with
/// `scripts/vault-rss.sh` (`CAIRN_RSS_BIN` names another `cairn` to measure, e.g. an older
/// build).
#[test]
#[ignore = "benchmark-style: 1.6 GB over loopback TLS; run by scripts/vault-rss.sh"]
fn sixteen_hostile_uploads_keep_the_vault_under_256_mib() {
    const UPLOADS: usize = 16;
    const LEN: usize = 100_000_000;
    let bin = std::env::var("CAIRN_RSS_BIN").unwrap_or_else(|_| CAIRN.to_string());
    let dir = tempfile::tempdir().unwrap();
    let svc = start_bin(
        &bin,
        &[
            "vault",
            "--repo",
            s(&dir.path().join("repo")),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let pid = svc.child.id();
    let c = client(&svc);
    let b: Value = c.post_json("/v1/sessions", &serde_json::json!({})).unwrap();
    let path = format!("/v1/sessions/{}/blobs", b["session"].as_str().unwrap());
    let mut garbage = vec![0u8; LEN];
    rand::rngs::StdRng::seed_from_u64(99).fill_bytes(&mut garbage);
    let mut crafted = Vec::with_capacity(LEN);
    crafted.extend_from_slice(&[0, 0]); // data, raw
    crafted.extend_from_slice(&1u32.to_le_bytes());
    crafted.extend_from_slice(&(16u32 << 20).to_le_bytes());
    crafted.extend_from_slice(&[7u8; 32]);
    crafted.extend_from_slice(&(16u32 << 20).to_le_bytes());
    crafted.extend_from_slice(&garbage[..LEN - crafted.len()]);
    let bodies = [Arc::new(garbage), Arc::new(crafted)];
    let (hwm0, rss0) = memory_kib(pid);
    let t0 = Instant::now();
    let outcomes: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..UPLOADS)
            .map(|i| {
                let body = bodies[i % 2].clone();
                let c = c.clone();
                let path = &path;
                sc.spawn(move || match c.post_raw(path, &body) {
                    Ok(_) => "accepted".to_string(),
                    Err(cairn_http::ClientError::Api { status, .. }) => status.to_string(),
                    Err(_) => "connection error".to_string(),
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = t0.elapsed();
    let (hwm, rss) = memory_kib(pid);
    let mut report = std::io::stderr();
    writeln!(
        report,
        "vault RSS: before {} MiB (peak {} MiB); after {UPLOADS} hostile uploads of {LEN} bytes \
         in {took:.1?}: peak (VmHWM) {} MiB, now {} MiB; answers {outcomes:?}",
        rss0 >> 10,
        hwm0 >> 10,
        hwm >> 10,
        rss >> 10
    )
    .unwrap();
    assert!(
        outcomes.iter().all(|o| o != "accepted"),
        "garbage was accepted: {outcomes:?}"
    );
    assert!(hwm < 256 << 10, "peak RSS {} MiB", hwm >> 10);
    // The service still serves.
    assert_eq!(stats(&svc)["open_sessions"], 1);
}
