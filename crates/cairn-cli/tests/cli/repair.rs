//! Damage through the CLI, as an operator meets it: the probes that once showed the
//! repository silently wrong or stuck, each replayed with the commands that showed it.

use std::path::Path;

use super::{cairn, containers, json, make_image, ok, s};

/// A repository holding "a" and "b", two images that share most segments.
fn two_sharing(dir: &Path) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let repo = dir.join("repo");
    ok(&["repo", "init", s(&repo)], &[]);
    let a = make_image(&dir.join("a.img"), 4, 7);
    let mut b = a.clone();
    b[..1 << 20].fill(0x5a);
    std::fs::write(dir.join("b.img"), &b).unwrap();
    for name in ["a", "b"] {
        let img = dir.join(format!("{name}.img"));
        ok(
            &[
                "image",
                "backup",
                "--repo",
                s(&repo),
                "--name",
                name,
                s(&img),
            ],
            &[],
        );
    }
    (repo, a, b)
}

/// Restores `spec` (over any earlier output) and checks it is `want`, bit for bit.
pub(super) fn restores(repo: &Path, spec: &str, want: &[u8], dir: &Path) {
    let out = dir.join("out.img");
    ok(
        &[
            "image",
            "restore",
            "--force",
            "--repo",
            s(repo),
            spec,
            s(&out),
        ],
        &[],
    );
    assert!(
        std::fs::read(&out).unwrap() == want,
        "{spec} restores bit-exact"
    );
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

fn biggest_container(repo: &Path) -> std::path::PathBuf {
    let mut cs = containers(repo);
    cs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    cs.pop().unwrap()
}

#[test]
fn a_damaged_trailer_survives_rebuild_index_and_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, a, b) = two_sharing(dir.path());
    let victim = biggest_container(&repo);
    let len = std::fs::metadata(&victim).unwrap().len() as usize;
    flip(&victim, len - 20);
    let o = cairn(&["repo", "verify", s(&repo)], &[]);
    assert_eq!(o.status.code(), Some(2));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("repo repair"),
        "verify says what to do: {text}"
    );
    restores(&repo, "a", &a, dir.path());
    let r = json(&["repo", "rebuild-index", s(&repo), "--json"], &[]);
    assert_eq!(r["containers_salvaged"], 1, "{r}");
    restores(&repo, "a", &a, dir.path());
    restores(&repo, "b", &b, dir.path());
    let r = json(&["repo", "repair", s(&repo), "--json"], &[]);
    assert_eq!(r["containers_rebuilt"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["segments_lost"], 0);
    ok(&["repo", "verify", s(&repo)], &[]);
    restores(&repo, "a", &a, dir.path());
}

#[test]
fn verify_names_each_damaged_object_once() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _, _) = two_sharing(dir.path());
    let victim = biggest_container(&repo);
    let mut bytes = std::fs::read(&victim).unwrap();
    for i in (100..bytes.len() / 2).step_by(4096) {
        bytes[i] ^= 0xff;
    }
    std::fs::write(&victim, bytes).unwrap();
    let o = cairn(&["repo", "verify", s(&repo)], &[]);
    assert_eq!(o.status.code(), Some(2));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.lines().count() < 12, "a short report: {text}");
    assert!(
        text.contains("damaged snapshot") && text.contains("(a)"),
        "{text}"
    );
    // The index: a flipped byte in a run is found, the run rebuilt, restores stay right.
    let dir2 = tempfile::tempdir().unwrap();
    let (repo2, a2, _) = two_sharing(dir2.path());
    for run in std::fs::read_dir(repo2.join("index")).unwrap() {
        let p = run.unwrap().path();
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        flip(&p, len - 100);
    }
    let o = cairn(&["repo", "verify", s(&repo2)], &[]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("index run"), "{text}");
    ok(&["repo", "verify", s(&repo2)], &[]);
    restores(&repo2, "a", &a2, dir2.path());
}

#[test]
fn a_damaged_snapshot_file_is_reported_skipped_and_forgettable() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _, b) = two_sharing(dir.path());
    let list = json(&["image", "list", "--repo", s(&repo), "--json"], &[]);
    let id_a = list.as_array().unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let f = repo.join(format!("snapshots/{id_a}.json"));
    std::fs::write(&f, b"{\"id\": garbage").unwrap();
    let list = json(&["image", "list", "--repo", s(&repo), "--json"], &[]);
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "the intact one is listed"
    );
    restores(&repo, "b", &b, dir.path());
    let o = cairn(&["repo", "verify", s(&repo)], &[]);
    assert_eq!(o.status.code(), Some(2), "damage exits 2, not 1");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&id_a));
    let o = cairn(&["repo", "gc", s(&repo)], &[]);
    assert!(
        !o.status.success(),
        "gc will not lose a damaged snapshot's data unasked"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("repo forget"));
    ok(&["repo", "forget", s(&repo), &id_a], &[]);
    ok(&["repo", "gc", s(&repo)], &[]);
    ok(&["repo", "verify", s(&repo)], &[]);
    restores(&repo, "b", &b, dir.path());
}

#[test]
fn smaller_edges_get_clear_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, a, _) = two_sharing(dir.path());
    // Restoring over an existing file asks for --force and leaves the file alone.
    let out = dir.path().join("keep.img");
    std::fs::write(&out, b"precious").unwrap();
    let o = cairn(&["image", "restore", "--repo", s(&repo), "a", s(&out)], &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    // A prune that forgets nothing does not claim to be a dry run.
    let text = ok(&["repo", "prune", s(&repo), "--keep-last", "5"], &[]);
    assert!(!text.contains("dry run"), "{text}");
    // A changed-extent list past the image's end, or with overlaps, is refused.
    let img = dir.path().join("a.img");
    for (list, want) in [
        (format!("{} 4096\n", 4 << 20), "past the image's end"),
        ("0 8192\n4096 4096\n".to_string(), "overlaps"),
    ] {
        let f = dir.path().join("changed.txt");
        std::fs::write(&f, list).unwrap();
        let o = cairn(
            &[
                "image",
                "backup",
                "--repo",
                s(&repo),
                "--name",
                "a",
                "--parent",
                "a",
                "--changed",
                s(&f),
                s(&img),
            ],
            &[],
        );
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{err}");
    }
    // A parent of another disk is refused for an incremental.
    let f = dir.path().join("changed.txt");
    std::fs::write(&f, "0 4096\n").unwrap();
    let o = cairn(
        &[
            "image",
            "backup",
            "--repo",
            s(&repo),
            "--name",
            "cd",
            "--parent",
            "b",
            "--changed",
            s(&f),
            s(&img),
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not of \"cd\""));
    restores(&repo, "a", &a, dir.path());
}

#[test]
fn an_incremental_through_the_vault_service_heals_damaged_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, a, _) = two_sharing(dir.path());
    let svc = super::start_service(&repo);
    let env = [
        ("CAIRN_TOKEN", svc.token.as_str()),
        ("CAIRN_FINGERPRINT", svc.fingerprint.as_str()),
    ];
    let mut bytes = std::fs::read(biggest_container(&repo)).unwrap();
    bytes[5000] ^= 0xff;
    std::fs::write(biggest_container(&repo), bytes).unwrap();
    let o = cairn(&["repo", "verify", &svc.url, "--json"], &env);
    assert_eq!(o.status.code(), Some(2));
    let marked: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(marked["marked"].as_u64().unwrap() > 0, "{marked}");
    let list = json(&["image", "list", "--repo", &svc.url, "--json"], &env);
    let old_a = list.as_array().unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Nothing changed on the disk, yet the incremental sends the damaged segments again.
    let none = dir.path().join("none.txt");
    std::fs::write(&none, "").unwrap();
    let img = dir.path().join("a.img");
    let b = json(
        &[
            "image",
            "backup",
            "--repo",
            &svc.url,
            "--name",
            "a",
            "--parent",
            "a",
            "--changed",
            s(&none),
            "--json",
            s(&img),
        ],
        &env,
    );
    assert!(b["bytes_new"].as_u64().unwrap() > 0, "{b}");
    let out = dir.path().join("healed.img");
    ok(
        &["image", "restore", "--repo", &svc.url, &old_a, s(&out)],
        &env,
    );
    assert!(
        std::fs::read(&out).unwrap() == a,
        "the old snapshot is healed"
    );
    // The damaged copy is superseded (GC collects it); no snapshot lacks anything.
    let o = cairn(&["repo", "verify", &svc.url, "--json"], &env);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["damaged_snapshots"].as_array().unwrap().is_empty(), "{v}");
    ok(&["repo", "gc", &svc.url], &env);
    ok(&["repo", "verify", &svc.url], &env);
}
