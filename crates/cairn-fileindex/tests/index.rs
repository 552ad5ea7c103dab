//! Integration tests of the file index: round trips, sharing, crash safety, corruption,
//! concurrency, removal and a property test against an in-memory model.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use cairn_fileindex::{
    BackupMeta, ErrorKind, FileExtent, FileIndex, FileKind, FileRecord, FindOptions, Pattern,
};
use proptest::prelude::*;

fn file(path: &str, size: u64, mtime: i64) -> FileRecord {
    FileRecord {
        path: path.into(),
        kind: FileKind::File,
        size,
        mode: Some(0o100644),
        uid: Some(1000),
        gid: Some(1000),
        mtime_ns: Some(mtime),
        inode: Some(size ^ 0x55),
        extents: vec![FileExtent {
            file_offset: 0,
            disk_offset: size * 4096,
            length: size,
        }],
        ..FileRecord::default()
    }
}

fn dir(path: &str) -> FileRecord {
    FileRecord {
        mode: Some(0o40755),
        ..FileRecord::dir(path)
    }
}

/// A small Linux-like tree of `n` files under a few directories.
fn tree(n: usize) -> Vec<FileRecord> {
    let mut v = vec![
        dir("/"),
        dir("/etc"),
        dir("/etc/ssh"),
        dir("/usr"),
        dir("/usr/lib"),
        dir("/home"),
    ];
    v.push(file("/etc/passwd", 1200, 1));
    v.push(file("/etc/ssh/sshd_config", 3000, 2));
    for i in 0..n {
        v.push(file(&format!("/usr/lib/lib{i}.so"), 10_000 + i as u64, 3));
    }
    v
}

fn meta(id: &str, vm: &str, t: i64, parent: Option<&str>) -> BackupMeta {
    BackupMeta {
        backup_id: id.into(),
        vm: vm.into(),
        created_ms: t,
        parent: parent.map(Into::into),
    }
}

fn vol<'a>(
    disk: &str,
    volume: &str,
    files: &'a [FileRecord],
) -> (
    String,
    String,
    std::iter::Cloned<std::slice::Iter<'a, FileRecord>>,
) {
    (disk.into(), volume.into(), files.iter().cloned())
}

fn data_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "LOCK" && n != "MANIFEST")
        .collect();
    v.sort();
    v
}

#[test]
fn add_list_get_find_versions_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = FileIndex::open(tmp.path()).unwrap();
    let mut files = tree(50);
    let boot = vec![
        dir("/"),
        file("/vmlinuz", 9_000_000, 5),
        file("/grub/grub.cfg", 4000, 6),
    ];
    let r = idx
        .add_backup(
            &meta("b1", "web", 1000, None),
            [vol("sda", "p1", &files), vol("sda", "p2", &boot)],
        )
        .unwrap();
    // `/grub` was implied by `/grub/grub.cfg`.
    assert_eq!((r.files, r.dirs_implied), (files.len() as u64 + 4, 1));
    files[6] = file("/etc/passwd", 1300, 10); // changed
    files.push(file("/etc/ssh/ssh_host_ed25519_key.pub", 100, 11)); // new
    files.retain(|f| f.path != "/usr/lib/lib7.so"); // deleted
    idx.add_backup(
        &meta("b2", "web", 2000, Some("b1")),
        [vol("sda", "p1", &files)],
    )
    .unwrap();
    idx.add_backup(
        &meta("db1", "db", 1500, None),
        [vol("vda", "whole", &tree(5))],
    )
    .unwrap();

    let check = |idx: &FileIndex| {
        let b = idx.backups();
        assert_eq!(
            b.iter().map(|b| b.backup_id.as_str()).collect::<Vec<_>>(),
            ["db1", "b1", "b2"]
        );
        assert_eq!(idx.volumes("b1").unwrap().len(), 2);
        let etc = idx.list("b2", "sda", "p1", "/etc").unwrap();
        let names: Vec<&str> = etc.iter().map(|f| f.name()).collect();
        assert_eq!(names, ["passwd", "ssh"]);
        assert_eq!(etc[0].size, 1300);
        let root: Vec<String> = idx
            .list("b1", "sda", "p2", "/")
            .unwrap()
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert_eq!(root, ["/grub", "/vmlinuz"]);
        assert_eq!(
            idx.get("b1", "sda", "p1", "/etc/passwd").unwrap().unwrap(),
            file("/etc/passwd", 1200, 1)
        );
        assert_eq!(
            idx.get("b2", "sda", "p1", "/usr/lib/lib7.so").unwrap(),
            None
        );
        assert!(
            idx.get("b1", "sda", "p1", "/usr/lib/lib7.so")
                .unwrap()
                .is_some()
        );
        assert_eq!(
            idx.get("b1", "sda", "p9", "/").unwrap_err().kind(),
            ErrorKind::Invalid
        );
        assert_eq!(
            idx.get("nope", "sda", "p1", "/").unwrap_err().kind(),
            ErrorKind::NotFound
        );

        let walked: Vec<String> = idx
            .walk("b2", "sda", "p1", "/etc")
            .unwrap()
            .map(|r| r.unwrap().path)
            .collect();
        assert_eq!(
            walked,
            [
                "/etc",
                "/etc/passwd",
                "/etc/ssh",
                "/etc/ssh/ssh_host_ed25519_key.pub",
                "/etc/ssh/sshd_config"
            ]
        );
        assert_eq!(
            idx.walk("b2", "sda", "p1", "/").unwrap().count(),
            files.len()
        );

        let all = FindOptions::default();
        let hits = idx.find(&Pattern::new("passwd").unwrap(), &all).unwrap();
        let ids: Vec<&str> = hits.iter().map(|h| &*h.backup_id).collect();
        assert_eq!(ids, ["b2", "db1", "b1"], "newest backup first");
        assert_eq!(hits[0].size, 1300);
        let web = FindOptions {
            vm: Some("web".into()),
            limit: 0,
        };
        assert_eq!(
            idx.find(&Pattern::new("passwd").unwrap(), &web)
                .unwrap()
                .len(),
            2
        );
        let pubs = idx
            .find(&Pattern::new("/etc/**/*.pub").unwrap(), &all)
            .unwrap();
        assert_eq!(pubs.len(), 1);
        assert_eq!(&*pubs[0].path, "/etc/ssh/ssh_host_ed25519_key.pub");
        let sos = idx
            .find(&Pattern::new("lib4?.SO").unwrap().case_insensitive(), &web)
            .unwrap();
        assert_eq!(sos.len(), 20);
        assert_eq!(
            idx.find(
                &Pattern::new("*.so").unwrap(),
                &FindOptions { vm: None, limit: 7 }
            )
            .unwrap()
            .len(),
            7
        );
        assert!(
            idx.find(&Pattern::new("nothing-like-this").unwrap(), &all)
                .unwrap()
                .is_empty()
        );

        let v = idx.versions("web", "sda", "p1", "/etc/passwd").unwrap();
        assert_eq!(
            v.iter()
                .map(|v| (v.backup_id.as_str(), v.size, v.changed))
                .collect::<Vec<_>>(),
            [("b1", 1200, true), ("b2", 1300, true)]
        );
        let v = idx
            .versions("web", "sda", "p1", "/etc/ssh/sshd_config")
            .unwrap();
        assert_eq!(
            v.iter().map(|v| v.changed).collect::<Vec<_>>(),
            [true, false]
        );
        assert!(
            idx.versions("web", "sda", "p1", "/missing")
                .unwrap()
                .is_empty()
        );
    };
    check(&idx);
    drop(idx);
    let idx = FileIndex::open(tmp.path()).unwrap();
    check(&idx);
}

#[test]
fn input_is_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = FileIndex::open(tmp.path()).unwrap();
    let bad_paths = [
        vec![file("relative", 1, 1)],
        vec![file("/a/../b", 1, 1)],
        vec![file("/a", 1, 1), file("/a", 2, 1)],
    ];
    for files in bad_paths {
        let e = idx
            .add_backup(&meta("b", "vm", 1, None), [vol("sda", "p1", &files)])
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    }
    let e = idx
        .add_backup(&meta("b", "vm", 1, None), [vol("sda", "p/1", &[])])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    let e = idx
        .add_backup(
            &meta("b", "vm", 1, Some("unknown")),
            [vol("sda", "p1", &[])],
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    idx.add_backup(&meta("b", "vm", 1, None), [vol("sda", "p1", &tree(3))])
        .unwrap();
    let e = idx
        .add_backup(&meta("b", "vm", 2, None), [vol("sda", "p1", &[])])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "duplicate backup id");
    let e = idx
        .add_backup(&meta("c", "other", 2, Some("b")), [vol("sda", "p1", &[])])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "parent of another VM");
    assert_eq!(idx.backups().len(), 1);
    assert_eq!(
        FileIndex::open(tmp.path()).unwrap_err().kind(),
        ErrorKind::Locked
    );
}

#[test]
fn unchanged_backup_shares_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = FileIndex::open(tmp.path()).unwrap();
    let files = tree(5000);
    let first = idx
        .add_backup(&meta("b1", "vm", 1, None), [vol("sda", "p1", &files)])
        .unwrap();
    assert_eq!(first.records_shared, 5); // the directories' records are identical
    let again = idx
        .add_backup(&meta("b2", "vm", 2, Some("b1")), [vol("sda", "p1", &files)])
        .unwrap();
    assert_eq!(again.records_new, 0);
    assert_eq!(again.paths_new, 0);
    assert_eq!(again.records_shared, files.len() as u64);
    // A listing that equals its parent's is an empty delta; the rest is the manifest.
    assert!(again.listing_bytes < 100, "{again:?}");
    assert!(
        again.bytes_written < first.bytes_written / 100,
        "{again:?} vs {first:?}"
    );
    // Without a parent the listing is written in full but records are still shared.
    let full = idx
        .add_backup(&meta("b3", "vm", 3, None), [vol("sda", "p1", &files)])
        .unwrap();
    assert_eq!(full.records_new, 0);
    assert!(full.listing_bytes < first.bytes_written / 10, "{full:?}");
    let one_change: Vec<FileRecord> = files
        .iter()
        .map(|f| {
            if f.path == "/etc/passwd" {
                file("/etc/passwd", 1, 99)
            } else {
                f.clone()
            }
        })
        .collect();
    let r = idx
        .add_backup(
            &meta("b4", "vm", 4, Some("b3")),
            [vol("sda", "p1", &one_change)],
        )
        .unwrap();
    assert_eq!(r.records_new, 1);
    assert!(r.bytes_written < 1000, "{r:?}");
}

#[derive(Debug)]
struct Boom;
impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("disk parser failed")
    }
}
impl std::error::Error for Boom {}

#[test]
fn failed_add_leaves_nothing_and_retry_works() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = FileIndex::open(tmp.path()).unwrap();
    idx.add_backup(&meta("b0", "vm", 0, None), [vol("sda", "p1", &tree(10))])
        .unwrap();
    let before = data_files(tmp.path());
    let files = tree(20_000);
    // The source fails after 15,000 files: record pack blocks were already written.
    let failing = files
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, f)| if i == 15_000 { Err(Boom) } else { Ok(f) });
    let e = idx
        .try_add_backup(
            &meta("b1", "vm", 1, Some("b0")),
            [("sda".to_string(), "p1".to_string(), failing)],
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Source);
    assert_eq!(idx.backups().len(), 1);
    assert_eq!(
        data_files(tmp.path()),
        before,
        "failed add left files behind"
    );
    assert!(
        idx.find(&Pattern::new("lib19999").unwrap(), &FindOptions::default())
            .unwrap()
            .is_empty()
    );
    let r = idx
        .add_backup(&meta("b1", "vm", 1, Some("b0")), [vol("sda", "p1", &files)])
        .unwrap();
    assert_eq!(r.files, files.len() as u64);
    assert_eq!(
        idx.find(&Pattern::new("lib19999").unwrap(), &FindOptions::default())
            .unwrap()
            .len(),
        1
    );

    // A crash mid-add leaves unreferenced files (some renamed into place, some temporary);
    // the next open deletes them and the state is the last committed one.
    drop(idx);
    for name in [
        "records-00000000000000ff.cfr",
        "listing-0000000000000100.cfl.tmp",
        "paths-0000000000000101.cfp",
        "MANIFEST.tmp",
    ] {
        std::fs::write(tmp.path().join(name), b"half-written").unwrap();
    }
    std::fs::write(tmp.path().join("notes.txt"), b"not ours").unwrap();
    let idx = FileIndex::open(tmp.path()).unwrap();
    assert_eq!(idx.backups().len(), 2);
    let left = data_files(tmp.path());
    assert!(
        left.iter()
            .all(|n| !n.contains("ff.cfr") && !n.ends_with(".tmp")),
        "{left:?}"
    );
    assert!(left.contains(&"notes.txt".to_string()));
    idx.add_backup(&meta("b2", "vm", 2, Some("b1")), [vol("sda", "p1", &files)])
        .unwrap();
    assert_eq!(
        idx.get("b2", "sda", "p1", "/etc/passwd")
            .unwrap()
            .unwrap()
            .size,
        1200
    );
}

/// Builds an index with one backup of each kind of file and returns the directory.
fn small_index() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let idx = FileIndex::open(tmp.path()).unwrap();
    idx.add_backup(&meta("b1", "vm", 1, None), [vol("sda", "p1", &tree(3000))])
        .unwrap();
    let mut changed = tree(3000);
    changed[7].size = 1;
    idx.add_backup(
        &meta("b2", "vm", 2, Some("b1")),
        [vol("sda", "p1", &changed)],
    )
    .unwrap();
    tmp
}

/// Opens the index and runs every query; returns the first error.
fn open_and_query(dir: &Path) -> cairn_fileindex::Result<()> {
    let idx = FileIndex::open(dir)?;
    for b in ["b1", "b2"] {
        idx.walk(b, "sda", "p1", "/")?
            .collect::<cairn_fileindex::Result<Vec<_>>>()?;
    }
    idx.find(&Pattern::new("*.so").unwrap(), &FindOptions::default())?;
    Ok(())
}

#[test]
fn corrupt_files_give_typed_errors_naming_the_file() {
    let tmp = small_index();
    open_and_query(tmp.path()).unwrap();
    let mut names = data_files(tmp.path());
    names.push("MANIFEST".into());
    for name in &names {
        let path = tmp.path().join(name);
        let good = std::fs::read(&path).unwrap();
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            good[..good.len() / 2].to_vec(),
            good[..good.len() - 1].to_vec(),
        ];
        for at in [
            0,
            9,
            good.len() / 3,
            good.len() / 2,
            good.len() - 20,
            good.len() - 1,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            cases.push(bad);
        }
        for (i, bad) in cases.iter().enumerate() {
            std::fs::write(&path, bad).unwrap();
            let e =
                open_and_query(tmp.path()).expect_err(&format!("{name} case {i} went unnoticed"));
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{name} case {i}: {e}");
            assert!(
                e.to_string().contains(name.as_str()),
                "{name} case {i}: {e}"
            );
        }
        std::fs::write(&path, &good).unwrap();
    }
    open_and_query(tmp.path()).unwrap();
}

#[test]
fn readers_see_whole_backups_while_a_writer_adds() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = Arc::new(FileIndex::open(tmp.path()).unwrap());
    let files = tree(2000);
    let n = files.len();
    idx.add_backup(&meta("b00", "vm", 0, None), [vol("sda", "p1", &files)])
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (idx, stop) = (idx.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds == 0 {
                    let backups = idx.backups();
                    let hits = idx
                        .find(&Pattern::new("*.so").unwrap(), &FindOptions::default())
                        .unwrap();
                    // Every backup is complete: 2000 libs each, never a part of one.
                    assert!(
                        hits.len() >= 2000 * backups.len() && hits.len() % 2000 == 0,
                        "{}",
                        hits.len()
                    );
                    for b in &backups {
                        assert_eq!(idx.walk(&b.backup_id, "sda", "p1", "/").unwrap().count(), n);
                    }
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    for i in 1..12 {
        let mut f = files.clone();
        f[10].size = i;
        idx.add_backup(
            &meta(
                &format!("b{i:02}"),
                "vm",
                i as i64,
                Some(&format!("b{:02}", i - 1)),
            ),
            [vol("sda", "p1", &f)],
        )
        .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(idx.backups().len(), 12);
}

#[test]
fn remove_backup_collects_unshared_data() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = FileIndex::open(tmp.path()).unwrap();
    let mut versions = Vec::new();
    let mut files = tree(300);
    for i in 0..6u64 {
        if i > 0 {
            files[10 + i as usize].size = 1000 + i;
            files.push(file(&format!("/tmp/only-in-{i}"), i, 1));
        }
        let parent = (i > 0).then(|| format!("b{}", i - 1));
        idx.add_backup(
            &meta(&format!("b{i}"), "vm", i as i64, parent.as_deref()),
            [vol("sda", "p1", &files)],
        )
        .unwrap();
        versions.push(files.clone());
    }
    let bytes_before = idx.stats().unwrap().bytes;
    // b0 is the full listing b1..b5 are deltas of; removing it rewrites b1 in full.
    let plan = idx.plan_remove(&["b0"]).unwrap();
    assert_eq!(plan.rewrite_listings, ["b1"]);
    assert!(
        plan.to_string().contains("remove 1 backup(s): b0"),
        "{plan}"
    );
    idx.execute_gc(&plan).unwrap();
    // A stale plan is refused.
    assert_eq!(
        idx.execute_gc(&plan).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    let check = |idx: &FileIndex, from: usize| {
        assert_eq!(idx.backups().len(), 6 - from);
        for (i, want) in versions.iter().enumerate().skip(from) {
            let got: Vec<FileRecord> = idx
                .walk(&format!("b{i}"), "sda", "p1", "/")
                .unwrap()
                .map(|r| r.unwrap())
                .filter(|r| !(r.kind == FileKind::Dir && r.mode.is_none()))
                .collect();
            let mut want = want.clone();
            want.sort_by(|a, b| a.path.cmp(&b.path));
            assert_eq!(got, want, "backup b{i}");
        }
    };
    check(&idx, 1);
    drop(idx);
    let idx = FileIndex::open(tmp.path()).unwrap();
    check(&idx, 1);
    for i in 1..5 {
        idx.remove_backup(&format!("b{i}")).unwrap();
    }
    check(&idx, 5);
    assert_eq!(
        idx.remove_backup("b1").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let st = idx.stats().unwrap();
    assert!(st.bytes < bytes_before, "{} vs {bytes_before}", st.bytes);
    // Only what b5 uses remains findable.
    assert_eq!(
        idx.find(&Pattern::new("only-in-*").unwrap(), &FindOptions::default())
            .unwrap()
            .len(),
        5
    );
    idx.remove_backup("b5").unwrap();
    assert_eq!(
        data_files(tmp.path()).len(),
        0,
        "everything collected: {:?}",
        data_files(tmp.path())
    );
    // The emptied index still works.
    idx.add_backup(&meta("again", "vm", 9, None), [vol("sda", "p1", &tree(3))])
        .unwrap();
    assert_eq!(idx.list("again", "sda", "p1", "/etc").unwrap().len(), 2);
}

fn arb_record() -> impl Strategy<Value = FileRecord> {
    (
        prop::sample::select(vec![FileKind::File, FileKind::Symlink, FileKind::Other]),
        any::<u64>(),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<i64>()),
        prop::option::of(any::<u64>()),
        prop::option::of("[a-z/]{0,12}"),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..4),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..20)),
    )
        .prop_map(
            |(kind, size, mode, mtime, inode, link, sec, ext, inline)| FileRecord {
                path: String::new(),
                kind,
                size,
                mode,
                uid: mode.map(|m| m / 3),
                gid: None,
                mtime_ns: mtime,
                atime_ns: mtime.map(|t| t / 2),
                ctime_ns: None,
                crtime_ns: mtime.map(|t| t.wrapping_neg()),
                nlink: inode.map(|i| i % 5),
                inode,
                attributes: mode.map(|m| m & 0xff),
                link_target: link,
                security: sec,
                extents: ext
                    .into_iter()
                    .map(|(a, b, c)| FileExtent {
                        file_offset: a,
                        disk_offset: b,
                        length: c,
                    })
                    .collect(),
                inline,
                compressed: Vec::new(),
            },
        )
}

/// A listing: paths of up to 3 components from a small alphabet, so backups overlap.
fn arb_listing() -> impl Strategy<Value = BTreeMap<String, FileRecord>> {
    prop::collection::btree_map("(/[a-c]{1,2}){1,3}", arb_record(), 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_listings_roundtrip(listings in prop::collection::vec(arb_listing(), 1..5)) {
        let tmp = tempfile::tempdir().unwrap();
        let idx = FileIndex::open(tmp.path()).unwrap();
        for (i, l) in listings.iter().enumerate() {
            // A path that is a prefix of another must be a directory.
            let files: Vec<FileRecord> = l
                .iter()
                .map(|(p, r)| {
                    let is_dir = l.keys().any(|q| q.len() > p.len() && q.starts_with(p.as_str()) && q.as_bytes()[p.len()] == b'/');
                    if is_dir { FileRecord::dir(p.clone()) } else { FileRecord { path: p.clone(), ..r.clone() } }
                })
                .collect();
            let parent = (i > 0).then(|| format!("b{}", i - 1));
            idx.add_backup(&meta(&format!("b{i}"), "vm", i as i64, parent.as_deref()), [("d".to_string(), "v".to_string(), files.into_iter())]).unwrap();
        }
        drop(idx);
        let idx = FileIndex::open(tmp.path()).unwrap();
        for (i, l) in listings.iter().enumerate() {
            let b = format!("b{i}");
            for (p, r) in l {
                let got = idx.get(&b, "d", "v", p).unwrap().unwrap();
                if got.kind != FileKind::Dir {
                    prop_assert_eq!(&got, &FileRecord { path: p.clone(), ..r.clone() });
                }
            }
            let walked = idx.walk(&b, "d", "v", "/").unwrap().count();
            prop_assert!(walked >= l.len());
            let hits = idx.find(&Pattern::new("a").unwrap(), &FindOptions { vm: None, limit: 0 }).unwrap();
            prop_assert!(hits.iter().all(|h| h.path.contains('a')));
        }
    }
}

#[test]
fn gc_rewrites_half_dead_packs_with_tombstones() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = FileIndex::open(tmp.path()).unwrap();
    let a = tree(400);
    // B keeps half of A's libraries and has its own files.
    let mut b: Vec<FileRecord> = a
        .iter()
        .filter(|f| !f.path.contains("lib2"))
        .cloned()
        .collect();
    b.push(file("/home/new", 5, 5));
    idx.add_backup(&meta("a", "vm", 1, None), [vol("sda", "p1", &a)])
        .unwrap();
    idx.add_backup(&meta("b", "vm", 2, Some("a")), [vol("sda", "p1", &b)])
        .unwrap();
    let plan = idx.plan_remove(&["a"]).unwrap();
    assert!(
        plan.record_packs
            .contains(&(0, cairn_fileindex::PackAction::Rewrite)),
        "{plan:?}"
    );
    assert!(plan.dead_records > 100 && plan.dead_paths > 100, "{plan}");
    idx.execute_gc(&plan).unwrap();
    let expect = |idx: &FileIndex| {
        let got: Vec<FileRecord> = idx
            .walk("b", "sda", "p1", "/")
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let mut want = b.clone();
        want.sort_by(|x, y| x.path.cmp(&y.path));
        assert_eq!(got, want);
        assert!(
            idx.find(&Pattern::new("lib2*").unwrap(), &FindOptions::default())
                .unwrap()
                .is_empty()
        );
    };
    expect(&idx);
    drop(idx);
    let idx = FileIndex::open(tmp.path()).unwrap();
    expect(&idx);
    // Dead paths and records stay dead; re-adding them stores them again under new ids.
    let r = idx
        .add_backup(&meta("a2", "vm", 3, Some("b")), [vol("sda", "p1", &a)])
        .unwrap();
    assert!(r.records_new > 100 && r.paths_new > 100, "{r:?}");
    assert_eq!(idx.walk("a2", "sda", "p1", "/").unwrap().count(), a.len());
}
