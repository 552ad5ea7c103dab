//! Encrypted repositories: `repo init --encrypt`, passphrases and key files, what a wrong or
//! broken key does (nothing), what the stored files reveal (no plaintext, no names), and
//! maintenance through a vault service that never has the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{CAIRN, cairn, json, make_image, ok, s, start_service};

const MARKER: &[u8] = b"CAIRN-PLAINTEXT-MARKER-5c1e9a";
const FILE_NAME: &[u8] = b"quarterly-salaries-2026.xlsx";
const SNAPSHOT_NAME: &str = "vm-payroll-disk0";

/// `cairn` with exactly these key variables (none inherited).
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(CAIRN);
    c.args(args)
        .env_remove("CAIRN_PASSWORD")
        .env_remove("CAIRN_NEW_PASSWORD")
        .env_remove("CAIRN_KEY_FILE")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn run_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let o = run(args, env);
    assert!(
        o.status.success(),
        "cairn {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn run_err(args: &[&str], env: &[(&str, &str)]) -> String {
    let o = run(args, env);
    assert!(!o.status.success(), "cairn {args:?} should have failed");
    String::from_utf8(o.stderr).unwrap()
}

/// An image holding a marker string and a file name among random and text-like data.
fn image_with_secrets(path: &Path) -> Vec<u8> {
    let mut data = make_image(path, 4, 11);
    for (at, what) in [(1 << 20, MARKER), ((1 << 20) + 5000, FILE_NAME)] {
        data[at..at + what.len()].copy_from_slice(what);
    }
    // A text-like region (compressible, so it goes through zstd) full of the marker.
    let text = [MARKER, b" ", FILE_NAME, b"\n"].concat().repeat(3000);
    data[3 << 20..(3 << 20) + text.len()].copy_from_slice(&text);
    std::fs::write(path, &data).unwrap();
    data
}

/// BLAKE3 of every file under `dir`/`sub`, by path.
fn hashes(dir: &Path, subs: &[&str]) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<PathBuf> = subs.iter().map(|x| dir.join(x)).collect();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if p.is_file() {
            let b = std::fs::read(&p).unwrap();
            out.insert(p, cairn_chunk::fingerprint(&b).to_hex());
        }
    }
    out
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    hashes(dir, &[""]).into_keys().collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn data_containers(repo: &Path) -> Vec<PathBuf> {
    let mut c: Vec<PathBuf> = hashes(repo, &["containers"]).into_keys().collect();
    c.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).unwrap().len()));
    c
}

/// Every data segment fingerprint the containers of `repo` list (tree nodes differ anyway:
/// their boundaries depend on the digests).
fn fingerprints(repo: &Path) -> std::collections::HashSet<cairn_types::Digest> {
    data_containers(repo)
        .iter()
        .flat_map(|c| cairn_chunk::container::parse(&std::fs::read(c).unwrap()).unwrap())
        .filter(|r| r.kind == cairn_chunk::format::BlobKind::Data)
        .map(|r| r.digest)
        .collect()
}

#[test]
fn encrypted_repository_keys_and_what_it_reveals() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let r = s(&repo);
    let img = dir.path().join("disk.img");
    let data = image_with_secrets(&img);
    let pw1 = [("CAIRN_PASSWORD", "correct horse")];
    let out = run_ok(&["repo", "init", "--encrypt", r], &pw1);
    assert!(
        out.contains("encrypted") && out.contains("loses its data"),
        "{out}"
    );
    run_ok(
        &[
            "image",
            "backup",
            "--repo",
            r,
            "--name",
            SNAPSHOT_NAME,
            s(&img),
        ],
        &pw1,
    );
    // Listing and restoring with the passphrase show and give back the real thing.
    assert!(run_ok(&["image", "list", "--repo", r], &pw1).contains(SNAPSHOT_NAME));
    let out1 = dir.path().join("out1.img");
    run_ok(
        &["image", "restore", "--repo", r, SNAPSHOT_NAME, s(&out1)],
        &pw1,
    );
    assert_eq!(std::fs::read(&out1).unwrap(), data);

    // No stored file holds the marker, the file name or the snapshot's name.
    for f in all_files(&repo) {
        let b = std::fs::read(&f).unwrap();
        for needle in [MARKER, FILE_NAME, SNAPSHOT_NAME.as_bytes()] {
            assert!(
                !contains(&b, needle),
                "{} holds {:?}",
                f.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }

    // A wrong passphrase: a clear error, nothing written (not even a restore target).
    let before = hashes(&repo, &[""]);
    let out_bad = dir.path().join("bad.img");
    for args in [
        &["image", "restore", "--repo", r, SNAPSHOT_NAME, s(&out_bad)][..],
        &["image", "backup", "--repo", r, "--name", "x", s(&img)][..],
    ] {
        let e = run_err(args, &[("CAIRN_PASSWORD", "wrong")]);
        assert!(e.contains("wrong passphrase or key file"), "{e}");
    }
    // No passphrase and no terminal: a clear error too.
    let e = run_err(&["image", "list", "--repo", r], &[]);
    assert!(
        e.contains("CAIRN_PASSWORD") && e.contains("--key-file"),
        "{e}"
    );
    assert!(!out_bad.exists());
    assert_eq!(hashes(&repo, &[""]), before);

    // Changing the passphrase (add the new one, remove the old) and adding a key file touch
    // no data object.
    let data_before = hashes(&repo, &["containers", "snapshots"]);
    let old: serde_json::Value =
        serde_json::from_str(&run_ok(&["repo", "key", "list", r, "--json"], &[])).unwrap();
    let old_id = old[0]["id"].as_str().unwrap().to_string();
    run_ok(
        &["repo", "key", "add", r],
        &[
            ("CAIRN_PASSWORD", "correct horse"),
            ("CAIRN_NEW_PASSWORD", "battery staple"),
        ],
    );
    let pw2 = [("CAIRN_PASSWORD", "battery staple")];
    run_ok(&["repo", "key", "remove", r, &old_id], &pw2);
    let kf = dir.path().join("added.key");
    run_ok(&["repo", "key", "add", r, "--new-key-file", s(&kf)], &pw2);
    assert_eq!(hashes(&repo, &["containers", "snapshots"]), data_before);
    let listed: serde_json::Value =
        serde_json::from_str(&run_ok(&["repo", "key", "list", r, "--json"], &[])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    // The old passphrase no longer opens it; the new one and the key file restore bit-exact.
    let e = run_err(&["image", "list", "--repo", r], &pw1);
    assert!(e.contains("wrong passphrase"), "{e}");
    let out2 = dir.path().join("out2.img");
    run_ok(
        &["image", "restore", "--repo", r, SNAPSHOT_NAME, s(&out2)],
        &pw2,
    );
    assert_eq!(std::fs::read(&out2).unwrap(), data);
    let out3 = dir.path().join("out3.img");
    run_ok(
        &[
            "--key-file",
            s(&kf),
            "image",
            "restore",
            "--repo",
            r,
            SNAPSHOT_NAME,
            s(&out3),
        ],
        &[],
    );
    assert_eq!(std::fs::read(&out3).unwrap(), data);

    // An exported key file opens it even with every wrapped key gone; the paper key too.
    let exported = dir.path().join("master.key");
    run_ok(&["repo", "key", "export", r, s(&exported)], &pw2);
    let paper = run_ok(&["repo", "key", "export", r, "--paper"], &pw2);
    let paper_file = dir.path().join("paper.txt");
    std::fs::write(&paper_file, &paper).unwrap();
    for k in [&exported, &paper_file] {
        assert!(
            run_ok(&["--key-file", s(k), "image", "list", "--repo", r], &[])
                .contains(SNAPSHOT_NAME)
        );
    }

    // Bad key input: a truncated key file, a key file of another repository.
    let before = hashes(&repo, &[""]);
    let text = std::fs::read_to_string(&exported).unwrap();
    let truncated = dir.path().join("truncated.key");
    std::fs::write(&truncated, &text[..text.len() / 2]).unwrap();
    let e = run_err(
        &["--key-file", s(&truncated), "image", "list", "--repo", r],
        &[],
    );
    assert!(e.contains("key file") && e.contains("truncated"), "{e}");
    let other = dir.path().join("other");
    let other_key = dir.path().join("other.key");
    run_ok(
        &[
            "--key-file",
            s(&other_key),
            "repo",
            "init",
            "--encrypt",
            s(&other),
        ],
        &[],
    );
    let e = run_err(
        &[
            "--key-file",
            s(&other_key),
            "image",
            "restore",
            "--repo",
            r,
            SNAPSHOT_NAME,
            s(&out_bad),
        ],
        &[],
    );
    assert!(e.contains("belongs to repository"), "{e}");
    assert!(!out_bad.exists());
    assert_eq!(hashes(&repo, &[""]), before);

    // The last wrapped key cannot be removed.
    let keys: serde_json::Value =
        serde_json::from_str(&run_ok(&["repo", "key", "list", r, "--json"], &[])).unwrap();
    let id_of = |kind: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["kind"] == kind)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    run_ok(&["repo", "key", "remove", r, &id_of("key_file")], &pw2);
    let e = run_err(&["repo", "key", "remove", r, &id_of("passphrase")], &pw2);
    assert!(e.contains("last key"), "{e}");

    // `repo key passwd` changes the last passphrase in one step: a wrong old one changes
    // nothing; then the old one stops working, the new one opens it, no data object changes.
    let before = hashes(&repo, &[""]);
    let e = run_err(
        &["repo", "key", "passwd", r],
        &[("CAIRN_PASSWORD", "wrong"), ("CAIRN_NEW_PASSWORD", "x")],
    );
    assert!(e.contains("old passphrase opens no key"), "{e}");
    assert_eq!(hashes(&repo, &[""]), before);
    run_ok(
        &["repo", "key", "passwd", r],
        &[
            ("CAIRN_PASSWORD", "battery staple"),
            ("CAIRN_NEW_PASSWORD", "tr0ub4dor&3"),
        ],
    );
    assert_eq!(hashes(&repo, &["containers", "snapshots"]), data_before);
    let keys: serde_json::Value =
        serde_json::from_str(&run_ok(&["repo", "key", "list", r, "--json"], &[])).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    let e = run_err(&["image", "list", "--repo", r], &pw2);
    assert!(e.contains("wrong passphrase"), "{e}");
    let pw3 = [("CAIRN_PASSWORD", "tr0ub4dor&3")];
    assert!(run_ok(&["image", "list", "--repo", r], &pw3).contains(SNAPSHOT_NAME));
    let pw2 = pw3;

    // A flipped bit in a sealed frame: verify without the key names the container, a
    // restore fails clearly and leaves no output.
    let victim = &data_containers(&repo)[0];
    let mut b = std::fs::read(victim).unwrap();
    b[100] ^= 0x10;
    std::fs::write(victim, &b).unwrap();
    let v = run(&["repo", "verify", r], &[]);
    assert_eq!(
        v.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
    let report = String::from_utf8_lossy(&v.stdout);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        report.contains(name) && report.contains("DAMAGED"),
        "{report}"
    );
    let e = run_err(
        &["image", "restore", "--repo", r, SNAPSHOT_NAME, s(&out_bad)],
        &pw2,
    );
    assert!(e.contains("segment") || e.contains("sealed"), "{e}");
    assert!(!out_bad.exists());
}

#[test]
fn two_encrypted_repositories_share_no_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    image_with_secrets(&img);
    let pw = [("CAIRN_PASSWORD", "pw")];
    let repos: Vec<PathBuf> = ["a", "b", "plain"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for (i, r) in repos.iter().enumerate() {
        let mut args = vec!["repo", "init", s(r)];
        if i < 2 {
            args.push("--encrypt");
        }
        run_ok(&args, &pw);
        run_ok(
            &["image", "backup", "--repo", s(r), "--name", "d", s(&img)],
            &pw,
        );
    }
    let (a, b, plain) = (
        fingerprints(&repos[0]),
        fingerprints(&repos[1]),
        fingerprints(&repos[2]),
    );
    assert!(a.len() > 100 && a.len() == b.len() && a.len() == plain.len());
    assert!(a.is_disjoint(&b) && a.is_disjoint(&plain) && b.is_disjoint(&plain));
}

#[test]
fn encrypted_repository_through_a_vault_service_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("served");
    let pw = ("CAIRN_PASSWORD", "service pw");
    run_ok(&["repo", "init", "--encrypt", s(&repo)], &[pw]);
    let svc = start_service(&repo);
    let url = svc.url.as_str();
    let conn = [
        ("CAIRN_TOKEN", svc.token.as_str()),
        ("CAIRN_FINGERPRINT", svc.fingerprint.as_str()),
    ];
    let with_pw = [conn[0], conn[1], pw];
    let img = dir.path().join("disk.img");
    let data = image_with_secrets(&img);
    for _ in 0..2 {
        run_ok(
            &[
                "image",
                "backup",
                "--repo",
                url,
                "--name",
                SNAPSHOT_NAME,
                s(&img),
            ],
            &with_pw,
        );
    }
    // The client opens what the service stores.
    let listed = run_ok(&["image", "list", "--repo", url], &with_pw);
    assert_eq!(listed.matches(SNAPSHOT_NAME).count(), 2, "{listed}");
    let out = dir.path().join("out.img");
    run_ok(
        &["image", "restore", "--repo", url, SNAPSHOT_NAME, s(&out)],
        &with_pw,
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
    for f in all_files(&repo) {
        let b = std::fs::read(&f).unwrap();
        assert!(
            !contains(&b, MARKER) && !contains(&b, SNAPSHOT_NAME.as_bytes()),
            "{}",
            f.display()
        );
    }
    // Verify, prune and gc through the service with no key anywhere: prune groups the two
    // snapshots by their name tag and keeps one.
    let v = json(&["repo", "verify", url, "--json"], &conn);
    assert_eq!(v["damage"].as_array().unwrap().len(), 0, "{v}");
    assert!(v["blobs_checked"].as_u64().unwrap() > 100, "{v}");
    let plan = json(&["repo", "prune", url, "--keep-last", "1", "--json"], &conn);
    assert_eq!(plan["forget"].as_array().unwrap().len(), 1, "{plan}");
    let gc = json(&["repo", "gc", url, "--json"], &conn);
    assert!(gc["executed"].as_bool().unwrap(), "{gc}");
    assert_eq!(gc["snapshots"], 1);
    // What is left still restores bit-exact.
    let out2 = dir.path().join("out2.img");
    ok(
        &["image", "restore", "--repo", url, SNAPSHOT_NAME, s(&out2)],
        &with_pw,
    );
    assert_eq!(std::fs::read(&out2).unwrap(), data);
    // A backup without the key is refused before anything is sent.
    let o = cairn(
        &["image", "backup", "--repo", url, "--name", "x", s(&img)],
        &conn,
    );
    assert!(!o.status.success());
    drop(svc);
}

/// Starts `cairn all-in-one` on `state` with `extra` flags; returns the child and its JSON
/// line (or the exit output when it stops instead).
fn all_in_one(
    state: &Path,
    extra: &[&str],
) -> Result<(std::process::Child, serde_json::Value), Output> {
    use std::io::BufRead;
    let mut child = Command::new(CAIRN)
        .args([
            "all-in-one",
            "--state-dir",
            s(state),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env_remove("CAIRN_PASSWORD")
        .env_remove("CAIRN_KEY_FILE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.is_empty() {
        return Err(child.wait_with_output().unwrap());
    }
    Ok((child, serde_json::from_str(&line).unwrap()))
}

fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `cairn all-in-one` (and so the demo, and `cairn server --vault DIR`) creates its vault
/// encrypted, the key file in its state directory; `--unencrypted-vault` opts out; a key file
/// without its vault stops the start rather than be overwritten.
#[test]
fn all_in_one_creates_an_encrypted_vault_by_default() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let (child, info) = all_in_one(&a, &[]).unwrap_or_else(|o| panic!("{o:?}"));
    stop(child);
    let key = a.join("vault.key");
    assert_eq!(info["vault_key"], s(&key), "{info}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let vault = a.join("vault");
    // The vault needs the key to be read, and the key file opens it.
    let o = run(&["image", "list", "--repo", s(&vault)], &[]);
    assert!(!o.status.success());
    let no_key = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(no_key.contains("encrypted"), "{no_key}");
    run_ok(
        &["--key-file", s(&key), "repo", "key", "list", s(&vault)],
        &[],
    );
    // Started again, it opens the same vault with the same key.
    let (child, again) = all_in_one(&a, &[]).unwrap_or_else(|o| panic!("{o:?}"));
    stop(child);
    assert_eq!(again["vault_key"], info["vault_key"]);
    // Opting out.
    let b = dir.path().join("b");
    let (child, clear) =
        all_in_one(&b, &["--unencrypted-vault"]).unwrap_or_else(|o| panic!("{o:?}"));
    stop(child);
    assert!(clear["vault_key"].is_null(), "{clear}");
    assert!(!b.join("vault.key").exists());
    run_ok(&["image", "list", "--repo", s(&b.join("vault"))], &[]);
    // The vault gone but its key kept: refused, and the key file is left as it was.
    let before = std::fs::read(&key).unwrap();
    std::fs::remove_dir_all(&vault).unwrap();
    let Err(o) = all_in_one(&a, &[]) else {
        panic!("started with a key file and no vault");
    };
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("vault.key exists, but the vault"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
}
