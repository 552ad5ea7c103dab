//! cairn-fs against images made by the real tools (mke2fs, sfdisk, mkfs.fat, mcopy, mkntfs,
//! wimlib-imagex, debugfs, e2fsck, mkfs.xfs, xfs_db, xfs_repair, mkfs.btrfs, lvm2, cryptsetup). A missing tool fails the test with the command to install
//! it: the project installs its own packages (`scripts/install-deps.sh`).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use cairn_fs::{FileEntry, FileKind, FsKind, Limits, Partition, TableKind};
use sha2::{Digest, Sha256};

#[path = "images/btrfs.rs"]
mod btrfs;
#[path = "images/damage.rs"]
mod damage;
#[path = "images/fat_ntfs.rs"]
mod fat_ntfs;
#[path = "images/journal.rs"]
mod journal;
#[path = "images/lvm.rs"]
mod lvm;
#[path = "images/xfs.rs"]
mod xfs;
#[path = "images/xfs_damage.rs"]
mod xfs_damage;

use fat_ntfs::{FAT_CAPS, mcopy};
use journal::{debugfs_script, journal_image, names};

// ---------- tools ----------

fn tool_path(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("test tool `{name}` is not installed: run `sudo scripts/install-deps.sh`");
}

fn run(name: &str, args: &[&str]) -> String {
    run_env(name, args, &[])
}

fn run_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(tool_path(name))
        .args(args)
        .envs(env.iter().copied())
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Partition start sectors and sizes as sfdisk reports them.
fn sfdisk(img: &Path, script: &str) -> Vec<(u64, u64)> {
    let mut child = Command::new(tool_path("sfdisk"))
        .args(["-q", img.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    let json: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["-J", img.to_str().unwrap()])).unwrap();
    json["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap()))
        .collect()
}

// ---------- source trees ----------

struct TreeOpts {
    symlinks: bool,
    big: bool,
    many: usize,
}

fn write(path: &Path, data: &[u8], mtime_secs: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    set_mtime(path, mtime_secs);
}

fn set_mtime(path: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::new(secs, 123_456_789))
        .unwrap();
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Nested dirs, empty, sparse and big files, unicode names, links, modes, fixed mtimes.
fn make_tree(root: &Path, o: &TreeOpts) {
    let t = 1_600_000_000;
    write(&root.join("a/b/c/deep.txt"), b"deep down\n", t);
    write(&root.join("empty"), b"", t + 2);
    write(
        &root.join("héllo wörld.txt"),
        "unicode ☃\n".as_bytes(),
        t + 4,
    );
    write(&root.join("日本語/ファイル.txt"), b"nihongo", t + 6);
    write(
        &root.join("Mixed Case Long File Name With Spaces.txt"),
        b"long name",
        t + 8,
    );
    write(&root.join("run.sh"), b"#!/bin/sh\necho hi\n", t + 10);
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    write(&root.join("secret"), b"private", t + 12);
    // 60 < size < ~150: ext4 inline data continues in the system.data attribute.
    write(&root.join("medium.txt"), &[b'm'; 120], t + 18);
    std::fs::set_permissions(root.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::hard_link(root.join("a/b/c/deep.txt"), root.join("a/hard")).unwrap();
    if o.big {
        write(&root.join("big.bin"), &pseudo_random(1_500_000, 7), t + 14);
        let sp = root.join("sparse.bin");
        let f = std::fs::File::create(&sp).unwrap();
        f.set_len(3 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"end", (3 << 20) - 3).unwrap();
        drop(f);
        set_mtime(&sp, t + 16);
    }
    for i in 0..o.many {
        write(
            &root.join(format!("many/file-{i:04}.txt")),
            format!("{i}\n").as_bytes(),
            t + 20,
        );
    }
    if o.symlinks {
        std::os::unix::fs::symlink("a/b/c/deep.txt", root.join("link_short")).unwrap();
        let long = format!("a/{}/target", "x".repeat(100));
        std::os::unix::fs::symlink(long, root.join("link_long")).unwrap();
    }
}

#[derive(Debug, PartialEq)]
struct Want {
    kind: FileKind,
    size: u64,
    mode: u32,
    mtime: i64,
    target: Option<String>,
    sha: Option<String>,
}

fn sha(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn expected(root: &Path) -> BTreeMap<String, Want> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().to_str().unwrap());
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                FileKind::Dir
            } else if ft.is_symlink() {
                FileKind::Symlink
            } else {
                FileKind::File
            };
            out.insert(
                rel,
                Want {
                    kind,
                    size: if ft.is_dir() { 0 } else { md.len() },
                    mode: md.mode(),
                    mtime: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                    target: ft
                        .is_symlink()
                        .then(|| std::fs::read_link(&p).unwrap().to_str().unwrap().into()),
                    sha: ft.is_file().then(|| sha(&std::fs::read(&p).unwrap())),
                },
            );
        }
    }
    out
}

// ---------- walking and comparing ----------

struct Caps {
    modes: bool,
    /// mtime precision in nanoseconds.
    mtime_ns: i64,
}

fn walk_all(img: &Path, part: &Partition) -> (Vec<FileEntry>, cairn_fs::WalkReport) {
    let f = std::fs::File::open(img).unwrap();
    let mut v = Vec::new();
    let rep = cairn_fs::walk(&f, part, &Limits::default(), |e| {
        v.push(e);
        ControlFlow::Continue(())
    })
    .unwrap();
    (v, rep)
}

/// Walks `part` of `img` and checks it lists exactly the tree at `src`.
fn check(img: &Path, part: &Partition, src: &Path, caps: &Caps) -> Vec<FileEntry> {
    let (entries, rep) = walk_all(img, part);
    assert!(rep.is_complete(), "walk not complete: {:?}", rep.errors);
    let f = std::fs::File::open(img).unwrap();
    let want = expected(src);
    let mut got = BTreeMap::new();
    for e in &entries {
        if e.path == "/" || e.path.starts_with("/lost+found") {
            continue;
        }
        assert!(
            got.insert(e.path.clone(), e.clone()).is_none(),
            "{} listed twice",
            e.path
        );
    }
    let got_names: Vec<&String> = got.keys().collect();
    let want_names: Vec<&String> = want.keys().collect();
    assert_eq!(got_names, want_names, "names differ");
    for (path, w) in &want {
        let e = &got[path];
        assert_eq!(e.kind, w.kind, "{path}: kind");
        if w.kind != FileKind::Dir {
            assert_eq!(e.size, w.size, "{path}: size");
        }
        if caps.modes {
            assert_eq!(e.mode, Some(w.mode), "{path}: mode");
        }
        if w.kind == FileKind::File {
            let want_t = w.mtime - w.mtime.rem_euclid(caps.mtime_ns);
            assert_eq!(e.mtime, Some(want_t), "{path}: mtime");
            let data = cairn_fs::read_file(&f, e, &Limits::default()).unwrap();
            assert_eq!(Some(sha(&data)), w.sha, "{path}: content");
            // Extents stay inside the partition and in file order.
            let mut pos = 0;
            for x in &e.extents {
                assert!(x.file_offset >= pos, "{path}: extents out of order");
                // (A logical volume's extents lie wherever its segments put them.)
                if !matches!(
                    part.part_type,
                    cairn_fs::PartitionType::LogicalVolume { .. }
                ) {
                    assert!(x.disk_offset >= part.offset);
                    assert!(x.disk_offset + x.length <= part.offset + part.length);
                }
                pos = x.file_offset + x.length;
            }
        }
        if w.kind == FileKind::Symlink {
            let t = e.symlink_target.clone().map(|t| t.replace('\\', "/"));
            assert_eq!(t, w.target, "{path}: symlink target");
        }
    }
    entries
}

fn by_path<'a>(entries: &'a [FileEntry], path: &str) -> &'a FileEntry {
    entries
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("{path} not listed"))
}

fn only_fs(img: &Path) -> (cairn_fs::DiskLayout, Vec<Partition>) {
    let f = std::fs::File::open(img).unwrap();
    let l = cairn_fs::scan(&f).unwrap();
    let parts = l
        .partitions
        .iter()
        .filter(|p| p.fs != FsKind::Unknown)
        .cloned()
        .collect();
    (l, parts)
}

const EXT_SECS: Caps = Caps {
    modes: true,
    mtime_ns: 1_000_000_000, // mke2fs -d copies whole seconds
};

// ---------- ext ----------

#[test]
fn ext4_unpartitioned_with_htree_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: true,
            big: true,
            many: 400,
        },
    );
    let img = tmp.path().join("disk.img");
    sparse_file(&img, 24 << 20);
    let p = img.to_str().unwrap();
    run(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext4",
            "-b",
            "1024",
            "-I",
            "256",
            "-d",
            src.to_str().unwrap(),
            p,
        ],
    );
    run("e2fsck", &["-fyD", p]);
    let (l, parts) = only_fs(&img);
    assert_eq!(l.table, TableKind::None);
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].fs, FsKind::Ext4);
    let entries = check(&img, &parts[0], &src, &EXT_SECS);
    // The 400-entry directory got an htree index from e2fsck -D.
    let stat = run("debugfs", &["-R", "stat /many", p]);
    assert!(
        stat.contains("Flags: 0x81000") || stat.contains("0x1000"),
        "{stat}"
    );
    // The sparse file keeps its hole: far fewer extent bytes than its size.
    let sp = by_path(&entries, "/sparse.bin");
    assert!(sp.extents.iter().map(|x| x.length).sum::<u64>() < 1 << 20);
    // Hard links share the inode.
    assert_eq!(
        by_path(&entries, "/a/hard").inode,
        by_path(&entries, "/a/b/c/deep.txt").inode
    );
    assert_eq!(by_path(&entries, "/a/hard").nlink, Some(2));
    // lookup finds one file.
    let f = std::fs::File::open(&img).unwrap();
    let e = cairn_fs::lookup(&f, &parts[0], &Limits::default(), "/many/file-0399.txt").unwrap();
    assert_eq!(
        cairn_fs::read_file(&f, &e, &Limits::default()).unwrap(),
        b"399\n"
    );
}

#[test]
fn ext4_inline_data() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: true,
            big: false,
            many: 0,
        },
    );
    let img = tmp.path().join("disk.img");
    sparse_file(&img, 8 << 20);
    let p = img.to_str().unwrap();
    run(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext4",
            "-I",
            "256",
            "-O",
            "inline_data",
            "-d",
            src.to_str().unwrap(),
            p,
        ],
    );
    let (_, parts) = only_fs(&img);
    let entries = check(&img, &parts[0], &src, &EXT_SECS);
    assert!(
        entries.iter().any(|e| e.inline_data.is_some()),
        "no file was stored inline"
    );
    assert_eq!(
        by_path(&entries, "/medium.txt").inline_data.as_deref(),
        Some(&[b'm'; 120][..]),
        "120 bytes: i_block plus the system.data attribute"
    );
}

#[test]
fn ext4_and_ext2_in_gpt() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: true,
            big: true,
            many: 20,
        },
    );
    let img = tmp.path().join("disk.img");
    sparse_file(&img, 40 << 20);
    let parts = sfdisk(
        &img,
        "label: gpt\nstart=2048, size=32768, type=L, name=\"root fs\"\nstart=34816, size=40960, type=L, name=data\n",
    );
    let p = img.to_str().unwrap();
    let s = src.to_str().unwrap();
    let off = |i: usize| format!("offset={}", parts[i].0 * 512);
    let kib = |i: usize| format!("{}k", parts[i].1 / 2);
    run(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext4",
            "-I",
            "256",
            "-E",
            &off(0),
            "-d",
            s,
            p,
            &kib(0),
        ],
    );
    run(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext2",
            "-b",
            "1024",
            "-E",
            &off(1),
            "-d",
            s,
            p,
            &kib(1),
        ],
    );
    let (l, found) = only_fs(&img);
    assert_eq!(l.table, TableKind::Gpt);
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].name, "root fs");
    assert_eq!(found[0].offset, 2048 * 512);
    assert_eq!(
        found[0].part_type,
        cairn_fs::PartitionType::Gpt("0fc63daf-8483-4772-8e79-3d69d8477de4".into())
    );
    assert_eq!(found[0].fs, FsKind::Ext4);
    assert_eq!(found[1].fs, FsKind::Ext2);
    check(&img, &found[0], &src, &EXT_SECS);
    // ext2 with 1 KiB blocks: the 1.5 MB file needs double indirect blocks.
    check(&img, &found[1], &src, &EXT_SECS);
}

#[test]
fn ext3_ext4_and_fat16_in_mbr_with_logical_partitions() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: true,
            big: true,
            many: 10,
        },
    );
    let fat_src = tmp.path().join("fatsrc");
    make_tree(
        &fat_src,
        &TreeOpts {
            symlinks: false,
            big: false,
            many: 10,
        },
    );
    let img = tmp.path().join("disk.img");
    sparse_file(&img, 24 << 20);
    let parts = sfdisk(
        &img,
        "label: dos\nstart=2048, size=16384, type=83\nstart=18432, size=28672, type=5\nstart=20480, size=12288, type=83\nstart=34816, size=8192, type=6\n",
    );
    assert_eq!(parts.len(), 4);
    let p = img.to_str().unwrap();
    let s = src.to_str().unwrap();
    let off = |i: usize| format!("offset={}", parts[i].0 * 512);
    let kib = |i: usize| format!("{}k", parts[i].1 / 2);
    run(
        "mke2fs",
        &["-q", "-t", "ext3", "-E", &off(0), "-d", s, p, &kib(0)],
    );
    run(
        "mke2fs",
        &["-q", "-t", "ext4", "-E", &off(2), "-d", s, p, &kib(2)],
    );
    let fat_start = parts[3].0.to_string();
    let fat_kib = (parts[3].1 / 2).to_string();
    run(
        "mkfs.fat",
        &["-F", "16", "-s", "1", "--offset", &fat_start, p, &fat_kib],
    );
    mcopy(&img, parts[3].0 * 512, &fat_src);

    let (l, found) = only_fs(&img);
    assert_eq!(l.table, TableKind::Mbr);
    let idx: Vec<(u32, FsKind, bool)> = found.iter().map(|p| (p.index, p.fs, p.logical)).collect();
    assert_eq!(
        idx,
        [
            (1, FsKind::Ext3, false),
            (5, FsKind::Ext4, true),
            (6, FsKind::Fat16, true)
        ]
    );
    check(&img, &found[0], &src, &EXT_SECS);
    check(&img, &found[1], &src, &EXT_SECS);
    check(&img, &found[2], &fat_src, &FAT_CAPS);
}

#[test]
fn ext4_feature_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: true,
            big: true,
            many: 100,
        },
    );
    let variants: &[&[&str]] = &[
        &["-t", "ext4", "-O", "meta_bg,^resize_inode", "-b", "1024"],
        &["-t", "ext4", "-O", "bigalloc", "-C", "16384"],
        &["-t", "ext4", "-O", "^extent,^64bit,^flex_bg", "-b", "2048"],
        &["-t", "ext4", "-O", "^64bit,^metadata_csum", "-I", "128"],
        &["-t", "ext4", "-b", "4096", "-N", "2048"],
        &["-t", "ext3", "-b", "1024", "-I", "256"],
    ];
    for v in variants {
        let img = tmp.path().join("v.img");
        let _ = std::fs::remove_file(&img);
        sparse_file(&img, 32 << 20);
        let p = img.to_str().unwrap();
        let mut args = vec!["-q"];
        args.extend_from_slice(v);
        args.extend_from_slice(&["-d", src.to_str().unwrap(), p]);
        run("mke2fs", &args);
        let (_, parts) = only_fs(&img);
        assert_eq!(parts.len(), 1, "{v:?}");
        let entries = check(&img, &parts[0], &src, &EXT_SECS);
        assert!(entries.len() > 100, "{v:?}");
    }
}

#[test]
fn ext4_nanosecond_and_creation_times() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: false,
            big: false,
            many: 0,
        },
    );
    let (img, _) = journal_image(tmp.path(), &src, &["-O", "^has_journal"]);
    // mtime 2000-01-01 00:00:00 + 2^32 s (extra epoch bit 1) + 123456789 ns.
    let extra = (123_456_789u32 << 2) | 1;
    debugfs_script(
        &img,
        &format!(
            "sif /run.sh mtime 20000101000000\nsif /run.sh mtime_extra {extra}\nsif /run.sh crtime 19991231235959\nsif /run.sh crtime_extra {}\n",
            7u32 << 2
        ),
    );
    let (entries, _) = walk_all(&img, &only_fs(&img).1[0]);
    let e = by_path(&entries, "/run.sh");
    let secs = 946_684_800i64 + (1 << 32);
    assert_eq!(e.mtime, Some(secs * 1_000_000_000 + 123_456_789));
    assert_eq!(e.crtime, Some(946_684_799 * 1_000_000_000 + 7));
    assert_eq!(e.mode, Some(0o100755));
}
