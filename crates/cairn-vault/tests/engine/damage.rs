//! Damage handling: each test reproduces one way a repository gets damaged or confused and
//! checks that nothing is silently wrong, that what can still be read is never lost, and
//! that repair and later backups heal what they can.

use std::path::{Path, PathBuf};

use cairn_types::ExtentList;
use cairn_vault::imager::{self, BackupOptions, NoProgress, RestoreOptions};
use cairn_vault::maint::GcOptions;
use cairn_vault::{LocalVault, Repository, Vault, VaultError};

use super::{backup, flip_byte_in_a_container, image, restore, vault, walk};

fn repo_dir(dir: &Path) -> PathBuf {
    dir.join("repo")
}

fn reopen(dir: &Path) -> LocalVault {
    LocalVault {
        repo: Repository::open_dir(&repo_dir(dir)).unwrap(),
    }
}

fn containers_by_size(dir: &Path) -> Vec<PathBuf> {
    let mut files = walk(&repo_dir(dir).join("containers"));
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    files
}

fn flip(path: &Path, at_from_end: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() - at_from_end;
    b[i] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

fn stored_bytes(dir: &Path) -> u64 {
    walk(&repo_dir(dir).join("containers"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

fn try_restore(v: &LocalVault, spec: &str, dir: &Path) -> Result<Vec<u8>, String> {
    let out = dir.join("try.img");
    let _ = std::fs::remove_file(&out);
    imager::restore(v, spec, &out, &RestoreOptions::default(), &NoProgress)
        .map_err(|e| e.to_string())?;
    Ok(std::fs::read(out).unwrap())
}

/// Two images that share segments, backed up as "a" and "b".
fn two_sharing(dir: &Path) -> (LocalVault, Vec<u8>, Vec<u8>) {
    let v = vault(dir);
    let a = image(4 << 20, 40);
    let mut b = a.clone();
    b[..1 << 20].copy_from_slice(&image(1 << 20, 41));
    backup(&v, &a, dir, "a", None, None);
    backup(&v, &b, dir, "b", None, None);
    (v, a, b)
}

#[test]
fn a_damaged_trailer_is_rebuilt_from_the_frames_and_nothing_readable_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (v, a, b) = two_sharing(dir.path());
    let victim = containers_by_size(dir.path()).pop().unwrap();
    flip(&victim, 20);
    let rep = v.verify(true).unwrap();
    assert!(!rep.ok(), "a damaged trailer is reported");
    // The index still knows the frames: both snapshots restore bit-exact, and verify says so.
    assert!(
        rep.damaged_snapshots.is_empty(),
        "{:?}",
        rep.damaged_snapshots
    );
    assert_eq!(restore(&v, "a", dir.path()), a);
    // An index rebuild keeps what can still be read.
    let r = v.repo.rebuild_index().unwrap();
    assert_eq!(
        (r.containers_salvaged, r.containers_skipped),
        (1, 0),
        "{r:?}"
    );
    let v = reopen(dir.path());
    assert_eq!(restore(&v, "a", dir.path()), a);
    assert_eq!(restore(&v, "b", dir.path()), b);
    // Repair rebuilds the trailer; the repository verifies and survives a rebuild from
    // containers alone.
    let rep = cairn_vault::maint::repair(&v.repo, false).unwrap();
    assert_eq!(rep.containers_rebuilt.len(), 1, "{rep:?}");
    assert_eq!(rep.segments_lost, 0);
    assert!(v.verify(true).unwrap().ok());
    std::fs::remove_dir_all(repo_dir(dir.path()).join("index")).unwrap();
    let v = reopen(dir.path());
    assert_eq!(restore(&v, "a", dir.path()), a);
    assert_eq!(restore(&v, "b", dir.path()), b);
    assert!(v.verify(true).unwrap().ok());
}

#[test]
fn a_damaged_index_is_found_rebuilt_and_never_misleads_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (v, a, _) = two_sharing(dir.path());
    drop(v);
    for run in walk(&repo_dir(dir.path()).join("index")) {
        flip(&run, 100); // inside the records
    }
    // A restore reads through the damage: the run is dropped and rebuilt on the way.
    let v = reopen(dir.path());
    assert_eq!(restore(&v, "a", dir.path()), a);
    // Verify names the damage (and rebuilds) too.
    let v = {
        drop(v);
        for run in walk(&repo_dir(dir.path()).join("index")) {
            flip(&run, 100);
        }
        reopen(dir.path())
    };
    let rep = v.verify(true).unwrap();
    assert!(
        rep.damage.iter().any(|d| d.problem.contains("index run")),
        "{:?}",
        rep.damage
    );
    assert!(rep.damaged_snapshots.is_empty());
    assert!(v.verify(true).unwrap().ok(), "rebuilt by the first verify");
    assert_eq!(restore(&v, "a", dir.path()), a);
}

fn edit_manifest(dir: &Path, name: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
    for p in walk(&repo_dir(dir).join("snapshots")) {
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        if m["name"] == name {
            f(&mut m);
            std::fs::write(&p, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
            return p.file_stem().unwrap().to_string_lossy().into_owned();
        }
    }
    panic!("no snapshot {name}");
}

#[test]
fn an_edited_manifest_is_never_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _, b) = two_sharing(dir.path());
    let size = v.find("a").unwrap().size;
    let id = edit_manifest(dir.path(), "a", |m| m["size"] = (size + (100 << 20)).into());
    assert!(matches!(v.find("a"), Err(VaultError::SnapshotNotFound(_))));
    assert!(try_restore(&v, &id, dir.path()).is_err());
    let rep = v.verify(false).unwrap();
    assert!(!rep.ok());
    assert_eq!(rep.damaged_snapshots, vec![(id.clone(), String::new())]);
    // A consistent-looking edit (size and root size both) fails the checksum.
    let dir2 = tempfile::tempdir().unwrap();
    let (v2, _, _) = two_sharing(dir2.path());
    let s = v2.find("a").unwrap();
    edit_manifest(dir2.path(), "a", |m| {
        m["size"] = (s.size + 4096).into();
        m["root"]["size"] = (s.size + 4096).into();
    });
    assert!(v2.find("a").is_err());
    // The other snapshot is untouched.
    assert_eq!(restore(&v, "b", dir.path()), b);
}

#[test]
fn one_unreadable_manifest_blocks_nothing_else_and_can_be_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let (v, a, b) = two_sharing(dir.path());
    let id = v.find("a").unwrap().id.to_string();
    let path = repo_dir(dir.path()).join(format!("snapshots/{id}.json"));
    flip(&path, 30);
    assert_eq!(v.list().unwrap().len(), 1, "the intact snapshot is listed");
    assert_eq!(restore(&v, "b", dir.path()), b);
    let rep = v.verify(true).unwrap();
    assert!(!rep.ok());
    assert!(rep.per_snapshot.iter().any(|s| s.id == id && !s.ok));
    // GC keeps the damaged snapshot's data (its recipe root is still legible).
    let plan = v.gc(&GcOptions::run()).unwrap();
    assert_eq!(plan.damaged_snapshots_kept, 1);
    // Repair writes the manifest again from its recipe: it restores bit-exact.
    let rep = cairn_vault::maint::repair(&v.repo, false).unwrap();
    assert_eq!(rep.snapshots_rebuilt, vec![id.clone()], "{rep:?}");
    assert_eq!(restore(&v, &id, dir.path()), a);
    assert!(v.verify(true).unwrap().ok());
    // Damaged beyond repair: forgotten by its id, and everything else goes on.
    std::fs::write(&path, b"{ not json").unwrap();
    assert!(
        v.gc(&GcOptions::dry_run()).is_err(),
        "GC refuses while a damaged manifest names no recipe"
    );
    assert_eq!(v.forget(std::slice::from_ref(&id)).unwrap().len(), 1);
    assert!(v.gc(&GcOptions::run()).unwrap().executed);
    assert_eq!(restore(&v, "b", dir.path()), b);
    assert!(v.verify(true).unwrap().ok());
}

#[test]
fn a_new_backup_heals_damaged_segments_for_every_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(4 << 20, 42);
    let s1 = backup(&v, &img, dir.path(), "d", None, None);
    flip_byte_in_a_container(&repo_dir(dir.path()));
    let rep = v.verify(true).unwrap();
    assert!(
        rep.marked > 0 && !rep.damaged_snapshots.is_empty(),
        "{rep:?}"
    );
    // The same image again: the damaged segments are stored again.
    let s2 = backup(&v, &img, dir.path(), "d", None, None);
    assert!(
        s2.stats.bytes_new > 0,
        "damaged segments are re-sent: {:?}",
        s2.stats
    );
    assert_eq!(
        restore(&v, &s1.id.to_string(), dir.path()),
        img,
        "old snapshot healed"
    );
    assert_eq!(restore(&v, &s2.id.to_string(), dir.path()), img);
    let rep = v.verify(true).unwrap();
    assert!(rep.damaged_snapshots.is_empty(), "{rep:?}");
    assert!(
        rep.superseded > 0,
        "the damaged copy is superseded: {rep:?}"
    );
    // GC collects the damaged copy; then the repository verifies clean.
    let plan = v.gc(&GcOptions::run()).unwrap();
    let rep = v.verify(true).unwrap();
    assert!(rep.ok(), "{plan:?} {rep:?}");
    assert_eq!(restore(&v, &s1.id.to_string(), dir.path()), img);
}

#[test]
fn an_incremental_heals_damaged_segments_of_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(4 << 20, 43);
    let s1 = backup(&v, &img, dir.path(), "d", None, None);
    flip_byte_in_a_container(&repo_dir(dir.path()));
    assert!(v.verify(true).unwrap().marked > 0);
    // Nothing changed, yet the incremental reads and stores the damaged segments again.
    let s2 = backup(
        &v,
        &img,
        dir.path(),
        "d",
        Some(&s1.id.to_string()),
        Some(ExtentList::default()),
    );
    assert!(s2.stats.bytes_new > 0, "{:?}", s2.stats);
    assert_eq!(restore(&v, &s1.id.to_string(), dir.path()), img);
    assert!(v.verify(true).unwrap().damaged_snapshots.is_empty());
}

#[test]
fn gc_collects_copies_stored_twice_by_concurrent_backups() {
    let dir = tempfile::tempdir().unwrap();
    drop(vault(dir.path()));
    let img = image(4 << 20, 44);
    let p = dir.path().join("c.img");
    std::fs::write(&p, &img).unwrap();
    // Two backups of the same image at once, as two processes with their own index: each
    // stores all the data.
    std::thread::scope(|s| {
        for name in ["c1", "c2"] {
            let (v, p) = (reopen(dir.path()), &p);
            s.spawn(move || {
                let opts = BackupOptions {
                    name: name.into(),
                    ..Default::default()
                };
                imager::backup(&v, &std::fs::File::open(p).unwrap(), &opts, &NoProgress).unwrap()
            });
        }
    });
    let v = reopen(dir.path());
    let twice = stored_bytes(dir.path());
    v.repo.forget(&v.find("c1").unwrap().id).unwrap();
    v.gc(&GcOptions::run()).unwrap();
    let after = stored_bytes(dir.path());
    assert!(
        after * 10 < twice * 6,
        "duplicates collected: {twice} -> {after} bytes"
    );
    assert_eq!(restore(&v, "c2", dir.path()), img);
    assert!(v.verify(true).unwrap().ok());
}

#[test]
fn gc_after_an_interrupted_gc_leaves_no_duplicate_container() {
    let dir = tempfile::tempdir().unwrap();
    let (v, a, b) = two_sharing(dir.path());
    let before = stored_bytes(dir.path());
    drop(v);
    // What an interrupted repack leaves: a container copied under a new id, both on disk.
    let src = containers_by_size(dir.path()).pop().unwrap();
    let id = cairn_types::ContainerId::random().to_hex();
    let dst = repo_dir(dir.path()).join(format!("containers/{}/{id}", &id[..2]));
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(&src, &dst).unwrap();
    let v = reopen(dir.path());
    let plan = v.gc(&GcOptions::run()).unwrap();
    assert_eq!(plan.delete.len(), 1, "{plan:?}");
    assert_eq!(stored_bytes(dir.path()), before);
    assert_eq!(v.gc(&GcOptions::run()).unwrap().delete.len(), 0);
    assert_eq!(restore(&v, "a", dir.path()), a);
    assert_eq!(restore(&v, "b", dir.path()), b);
}

#[test]
fn gc_removes_leftovers_of_interrupted_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _, _) = two_sharing(dir.path());
    let old = repo_dir(dir.path()).join("containers/ab.tmp-00000001");
    let young = repo_dir(dir.path()).join("containers/cd.tmp-00000002");
    for p in [&old, &young] {
        std::fs::write(p, b"half a container").unwrap();
    }
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    let plan = v.gc(&GcOptions::run()).unwrap();
    assert_eq!(plan.leftovers_removed, 1);
    assert!(
        !old.exists() && young.exists(),
        "a write in progress is left alone"
    );
}

#[test]
fn a_name_that_is_also_an_id_prefix_is_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let first = backup(&v, &image(1 << 20, 45), dir.path(), "x", None, None);
    let prefix = first.id.to_hex()[..8].to_string();
    backup(&v, &image(1 << 20, 46), dir.path(), &prefix, None, None);
    let err = v.find(&prefix).unwrap_err().to_string();
    assert!(err.contains("ambiguous"), "{err}");
    assert_eq!(v.find(&first.id.to_string()).unwrap().id, first.id);
}

#[test]
fn a_parent_of_another_disk_is_refused_or_read_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let other = image(4 << 20, 47);
    let cur = image(4 << 20, 48);
    backup(&v, &other, dir.path(), "other", None, None);
    let p = dir.path().join("cur.img");
    std::fs::write(&p, &cur).unwrap();
    let changed: ExtentList = ExtentList::parse("0 4096\n").unwrap();
    let opts = |parent: &str| BackupOptions {
        name: "cd".into(),
        parent: Some(parent.into()),
        changed: Some(changed.clone()),
        ..Default::default()
    };
    let f = std::fs::File::open(&p).unwrap();
    let err = imager::backup(&v, &f, &opts("other"), &NoProgress).unwrap_err();
    assert!(err.to_string().contains("not of \"cd\""), "{err}");
    // Same name, other content: the spot check finds it and the whole image is read.
    backup(&v, &other, dir.path(), "cd", None, None);
    let s = imager::backup(&v, &f, &opts("cd"), &NoProgress).unwrap();
    assert!(
        s.stats.bytes_read > cur.len() as u64 / 2,
        "read in full: {:?}",
        s.stats
    );
    assert_eq!(restore(&v, &s.id.to_string(), dir.path()), cur);
}

#[test]
fn a_damaged_config_is_read_from_its_copy_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (v, a, _) = two_sharing(dir.path());
    drop(v);
    std::fs::write(repo_dir(dir.path()).join("config"), b"{\"vers").unwrap();
    let v = reopen(dir.path());
    assert_eq!(restore(&v, "a", dir.path()), a);
    assert!(
        !v.verify(false).unwrap().ok(),
        "the damaged config is reported"
    );
    let rep = cairn_vault::maint::repair(&v.repo, false).unwrap();
    assert!(rep.config_rewritten);
    assert!(v.verify(true).unwrap().ok());
}

#[test]
fn a_container_past_4_gib_is_refused_not_indexed_at_a_wrapped_offset() {
    use std::os::unix::fs::FileExt;

    use cairn_chunk::fingerprint;
    use cairn_chunk::format::{CONTAINER_END_MAGIC, CONTAINER_MAGIC, CONTAINER_VERSION};
    use cairn_types::ContainerId;

    let tmp = tempfile::tempdir().unwrap();
    let v = vault(tmp.path());
    // A sparse container whose one frame starts 8 bytes past 4 GiB: as the index's u32 it
    // would wrap to 8, where the first frame of every container lies.
    let data = b"sixteen bytes!!!";
    let frame_at = (1u64 << 32) + 8;
    let mut trailer = frame_at.to_le_bytes().to_vec();
    for n in [16u32, 16, 1] {
        trailer.extend_from_slice(&n.to_le_bytes()); // stored_len, frame_len, members
    }
    trailer.extend_from_slice(&[0, 0, 0, 0]); // data, raw
    trailer.extend_from_slice(fingerprint(data).as_bytes());
    trailer.extend_from_slice(&16u32.to_le_bytes());
    let trailer_at = frame_at + 16;
    let mut footer = trailer_at.to_le_bytes().to_vec();
    footer.extend_from_slice(&1u32.to_le_bytes());
    footer.extend_from_slice(&CONTAINER_VERSION.to_le_bytes());
    footer.extend_from_slice(&fingerprint(&trailer).as_bytes()[..16]);
    footer.extend_from_slice(&CONTAINER_END_MAGIC);
    let id = ContainerId::random();
    let hex = id.to_hex();
    let dir = repo_dir(tmp.path()).join("containers").join(&hex[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    let f = std::fs::File::create(dir.join(&hex)).unwrap();
    f.write_all_at(&CONTAINER_MAGIC, 0).unwrap();
    f.write_all_at(data, frame_at).unwrap();
    f.write_all_at(&trailer, trailer_at).unwrap();
    f.write_all_at(&footer, trailer_at + trailer.len() as u64)
        .unwrap();
    let e = v.repo.container_records(&id).unwrap_err().to_string();
    assert!(e.contains("past the 4 GiB the index addresses"), "{e}");
}
