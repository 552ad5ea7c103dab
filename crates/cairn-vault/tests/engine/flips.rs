//! Byte flips at random offsets in every kind of repository file: verify must find every one,
//! no restore may ever succeed with wrong bytes, and every snapshot the damage does not touch
//! must still restore bit-exact.
//!
//! `CAIRN_FLIP_TRIALS` sets the number of trials (CI runs the default, 60; the figures in
//! docs/RELIABILITY.md come from `CAIRN_FLIP_TRIALS=400`), `CAIRN_FLIP_SEED` the first seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_vault::imager::{self, NoProgress, RestoreOptions};
use cairn_vault::{LocalVault, Repository, Vault};
use rand::{Rng, SeedableRng};

use super::{backup, image, vault, walk};

/// The kind of a repository file, by its path.
fn kind(repo: &Path, p: &Path) -> &'static str {
    let rel = p.strip_prefix(repo).unwrap().to_string_lossy().into_owned();
    match rel.split('/').next().unwrap() {
        "containers" => "container",
        "snapshots" => "manifest",
        "index" => "index run",
        "config" => "config",
        "config.copy" => "config copy",
        _ => "other",
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[derive(Default, Debug)]
struct Tally {
    trials: u64,
    detected: u64,
    wrong_restores: u64,
    untouched_failed: u64,
    restores_refused: u64,
}

#[test]
fn random_byte_flips_are_always_detected_and_never_restore_wrong_bytes() {
    let trials: u64 = std::env::var("CAIRN_FLIP_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed0: u64 = std::env::var("CAIRN_FLIP_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    // The template: "a", "b" sharing most of a's segments, an unrelated "c".
    let a = image(2 << 20, 60);
    let mut b = a.clone();
    b[..256 << 10].copy_from_slice(&image(256 << 10, 61));
    let c = image(1 << 20, 62);
    let want: BTreeMap<&str, &Vec<u8>> = [("a", &a), ("b", &b), ("c", &c)].into();
    {
        let v = vault(&t.join("template"));
        for (name, img) in &want {
            backup(&v, img, t, name, None, None);
        }
    }
    let template = t.join("template/repo");
    let files: Vec<PathBuf> = walk(&template);
    let mut by_kind: BTreeMap<&str, Vec<&PathBuf>> = BTreeMap::new();
    for f in &files {
        by_kind.entry(kind(&template, f)).or_default().push(f);
    }
    let kinds: Vec<&str> = by_kind.keys().copied().collect();
    let mut tally: BTreeMap<&str, Tally> = BTreeMap::new();
    for trial in 0..trials {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed0 + trial);
        let k = kinds[trial as usize % kinds.len()];
        let pick = by_kind[k][rng.random_range(0..by_kind[k].len())];
        let repo = t.join(format!("trial{trial}"));
        copy_dir(&template, &repo);
        let target = repo.join(pick.strip_prefix(&template).unwrap());
        let mut bytes = std::fs::read(&target).unwrap();
        let at = rng.random_range(0..bytes.len());
        bytes[at] ^= rng.random_range(1..=255u8);
        std::fs::write(&target, &bytes).unwrap();
        let what = format!("trial {trial}: {k} {} byte {at}", target.display());

        let v = LocalVault {
            repo: Repository::open_dir(&repo).unwrap_or_else(|e| panic!("{what}: open: {e}")),
        };
        let rep = v
            .verify(true)
            .unwrap_or_else(|e| panic!("{what}: verify: {e}"));
        let tl = tally.entry(k).or_default();
        tl.trials += 1;
        if !rep.ok() {
            tl.detected += 1;
        } else {
            eprintln!("UNDETECTED {what}");
        }
        for (name, img) in &want {
            let untouched = rep.per_snapshot.iter().any(|s| s.name == *name && s.ok);
            let out = repo.join("out.img");
            let _ = std::fs::remove_file(&out);
            match imager::restore(&v, name, &out, &RestoreOptions::default(), &NoProgress) {
                Ok(_) if std::fs::read(&out).unwrap() == **img => {}
                Ok(_) => {
                    eprintln!("WRONG BYTES restored: {what}: {name}");
                    tl.wrong_restores += 1;
                }
                Err(e) => {
                    tl.restores_refused += 1;
                    if untouched {
                        eprintln!("untouched {name} failed: {what}: {e}");
                        tl.untouched_failed += 1;
                    }
                }
            }
        }
        drop(v);
        std::fs::remove_dir_all(&repo).unwrap();
    }
    let mut all = Tally::default();
    for (k, tl) in &tally {
        eprintln!("flips: {k}: {tl:?}");
        all.trials += tl.trials;
        all.detected += tl.detected;
        all.wrong_restores += tl.wrong_restores;
        all.untouched_failed += tl.untouched_failed;
        all.restores_refused += tl.restores_refused;
    }
    eprintln!("flips: all: {all:?}");
    assert_eq!(all.detected, all.trials, "every flip is detected: {all:?}");
    assert_eq!(all.wrong_restores, 0, "{all:?}");
    assert_eq!(all.untouched_failed, 0, "{all:?}");
}
