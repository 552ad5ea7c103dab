//! cairn-fs against images made by the real tools (mke2fs, sfdisk, mkfs.fat, mcopy, mkntfs,
//! wimlib-imagex, debugfs, e2fsck). A missing tool fails the test with the command to install
//! it: the project installs its own packages (`scripts/install-deps.sh`).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use cairn_fs::{FileEntry, FileKind, FsKind, Limits, Partition, TableKind};
use sha2::{Digest, Sha256};

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
                assert!(x.disk_offset >= part.offset);
                assert!(x.disk_offset + x.length <= part.offset + part.length);
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

// ---------- FAT ----------

const FAT_CAPS: Caps = Caps {
    modes: false,
    mtime_ns: 2_000_000_000,
};

fn mcopy(img: &Path, offset: u64, src: &Path) {
    let target = format!("{}@@{offset}", img.to_str().unwrap());
    let mut args = vec!["-s".to_string(), "-m".into(), "-i".into(), target];
    for e in std::fs::read_dir(src).unwrap() {
        args.push(e.unwrap().path().to_str().unwrap().to_string());
    }
    args.push("::/".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_env("mcopy", &args, &[("MTOOLS_SKIP_CHECK", "1")]);
}

#[test]
fn fat32_in_gpt_with_long_names() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: false,
            big: true,
            many: 50,
        },
    );
    let img = tmp.path().join("disk.img");
    sparse_file(&img, 48 << 20);
    let parts = sfdisk(
        &img,
        "label: gpt\nstart=2048, size=81920, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
    );
    let p = img.to_str().unwrap();
    run(
        "mkfs.fat",
        &[
            "-F",
            "32",
            "-s",
            "1",
            "--offset",
            &parts[0].0.to_string(),
            p,
            &(parts[0].1 / 2).to_string(),
        ],
    );
    mcopy(&img, parts[0].0 * 512, &src);
    let (_, found) = only_fs(&img);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].fs, FsKind::Fat32);
    let entries = check(&img, &found[0], &src, &FAT_CAPS);
    assert!(by_path(&entries, "/big.bin").fat_attributes.is_some());
}

#[test]
fn fat12_and_fat16_unpartitioned() {
    for (fat, size_kib, kind) in [("12", 2048u64, FsKind::Fat12), ("16", 8192, FsKind::Fat16)] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        make_tree(
            &src,
            &TreeOpts {
                symlinks: false,
                big: false,
                many: 30,
            },
        );
        let img = tmp.path().join("disk.img");
        let p = img.to_str().unwrap();
        run(
            "mkfs.fat",
            &["-C", "-F", fat, "-s", "1", p, &size_kib.to_string()],
        );
        mcopy(&img, 0, &src);
        let (l, found) = only_fs(&img);
        assert_eq!(l.table, TableKind::None, "FAT{fat}");
        assert_eq!(found[0].fs, kind);
        check(&img, &found[0], &src, &FAT_CAPS);
    }
}

// ---------- NTFS ----------

const NTFS_CAPS: Caps = Caps {
    modes: false,
    mtime_ns: 100,
};

/// An NTFS image of `src` made with mkntfs and filled with wimlib (no mount needed).
fn ntfs_image(dir: &Path, src: &Path, size: u64, start_sector: u64) -> PathBuf {
    let img = dir.join("ntfs.img");
    sparse_file(&img, size);
    let p = img.to_str().unwrap();
    let start = start_sector.to_string();
    run(
        "mkntfs",
        &[
            "-F", "-Q", "-q", "-s", "512", "-p", &start, "-H", "16", "-S", "63", p,
        ],
    );
    let wim = dir.join("src.wim");
    let w = wim.to_str().unwrap();
    run(
        "wimlib-imagex",
        &["capture", src.to_str().unwrap(), w, "--compress=none"],
    );
    run("wimlib-imagex", &["apply", w, "1", p]);
    img
}

fn ntfs_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: true,
            big: true,
            many: 30,
        },
    );
    src
}

#[test]
fn ntfs_unpartitioned() {
    let tmp = tempfile::tempdir().unwrap();
    let src = ntfs_tree(tmp.path());
    let img = ntfs_image(tmp.path(), &src, 16 << 20, 0);
    let (l, found) = only_fs(&img);
    assert_eq!(l.table, TableKind::None);
    assert_eq!(found[0].fs, FsKind::Ntfs);
    let entries = check(&img, &found[0], &src, &NTFS_CAPS);
    // Small files are resident (inline), the big one has runs, hard links share a record.
    assert!(by_path(&entries, "/run.sh").inline_data.is_some());
    assert!(!by_path(&entries, "/big.bin").extents.is_empty());
    assert_eq!(
        by_path(&entries, "/a/hard").inode,
        by_path(&entries, "/a/b/c/deep.txt").inode
    );
    assert_eq!(by_path(&entries, "/a/hard").nlink, Some(2));
    let sp = by_path(&entries, "/sparse.bin");
    assert!(sp.extents.iter().map(|x| x.length).sum::<u64>() < 1 << 20);
}

#[test]
fn ntfs_in_mbr_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let src = ntfs_tree(tmp.path());
    let img = tmp.path().join("disk.img");
    sparse_file(&img, 20 << 20);
    let parts = sfdisk(&img, "label: dos\nstart=2048, size=34816, type=7\n");
    let ntfs = ntfs_image(tmp.path(), &src, parts[0].1 * 512, parts[0].0);
    {
        use std::os::unix::fs::FileExt;
        let disk = std::fs::File::options().write(true).open(&img).unwrap();
        disk.write_all_at(&std::fs::read(&ntfs).unwrap(), parts[0].0 * 512)
            .unwrap();
    }
    let (l, found) = only_fs(&img);
    assert_eq!(l.table, TableKind::Mbr);
    assert_eq!(found[0].part_type, cairn_fs::PartitionType::Mbr(7));
    assert_eq!(found[0].fs, FsKind::Ntfs);
    check(&img, &found[0], &src, &NTFS_CAPS);
}

// ---------- journal replay ----------

/// A 1 KiB-block ext4 image of `src`; returns (image, block of directory `/a/b/c`).
fn journal_image(tmp: &Path, src: &Path, extra: &[&str]) -> (PathBuf, u64) {
    let img = tmp.join("j.img");
    sparse_file(&img, 16 << 20);
    let p = img.to_str().unwrap();
    let mut args = vec!["-q", "-t", "ext4", "-b", "1024", "-I", "256"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-d", src.to_str().unwrap(), p]);
    run("mke2fs", &args);
    let blocks = run("debugfs", &["-R", "blocks /a/b/c", p]);
    let block: u64 = blocks.split_whitespace().next().unwrap().parse().unwrap();
    (img, block)
}

/// The directory block with `deep.txt` renamed to `deep.new` (same length).
fn renamed_dir_block(img: &Path, block: u64, out: &Path) {
    let data = std::fs::read(img).unwrap();
    let mut b = data[block as usize * 1024..(block as usize + 1) * 1024].to_vec();
    let i = b.windows(8).position(|w| w == b"deep.txt").unwrap();
    b[i..i + 8].copy_from_slice(b"deep.new");
    std::fs::write(out, b).unwrap();
}

fn debugfs_script(img: &Path, script: &str) {
    let cmds = img.with_extension("cmds");
    std::fs::write(&cmds, script).unwrap();
    run(
        "debugfs",
        &["-w", "-f", cmds.to_str().unwrap(), img.to_str().unwrap()],
    );
}

fn names(img: &Path) -> (Vec<String>, cairn_fs::WalkReport) {
    let (_, parts) = only_fs(img);
    let (v, rep) = walk_all(img, &parts[0]);
    (v.into_iter().map(|e| e.path).collect(), rep)
}

#[test]
fn journal_replay_sees_committed_directory_block() {
    for (label, jo) in [
        ("plain", "jo"),
        ("csum v3", "jo -c -v 3"),
        ("csum v2", "jo -c -v 2"),
    ] {
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
        let (img, block) = journal_image(tmp.path(), &src, &[]);
        let blk = tmp.path().join("blk");
        renamed_dir_block(&img, block, &blk);
        debugfs_script(
            &img,
            &format!("{jo}\njw -b {block} {}\njc\n", blk.to_str().unwrap()),
        );
        // The raw image still has the old name; only the journal has the new one.
        let raw = run("debugfs", &["-R", "ls /a/b/c", img.to_str().unwrap()]);
        assert!(raw.contains("deep.txt"), "{label}: {raw}");
        let (n, rep) = names(&img);
        assert!(rep.is_complete(), "{label}: {:?}", rep.errors);
        assert_eq!(rep.journal_transactions, 1, "{label}");
        assert!(n.contains(&"/a/b/c/deep.new".to_string()), "{label}: {n:?}");
        assert!(!n.contains(&"/a/b/c/deep.txt".to_string()), "{label}");
        // e2fsck replays the journal for real: same listing.
        let copy = tmp.path().join("fsck.img");
        std::fs::copy(&img, &copy).unwrap();
        let _ = Command::new(tool_path("e2fsck"))
            .args(["-fy", copy.to_str().unwrap()])
            .output()
            .unwrap();
        let (n2, _) = names(&copy);
        let mut a = n.clone();
        let mut b = n2.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{label}: replay differs from e2fsck's");
    }
}

#[test]
fn journal_revoked_and_uncommitted_blocks_are_not_replayed() {
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
    // Revoked in a later transaction.
    let (img, block) = journal_image(tmp.path(), &src, &[]);
    let blk = tmp.path().join("blk");
    renamed_dir_block(&img, block, &blk);
    let b = blk.to_str().unwrap();
    debugfs_script(&img, &format!("jo\njw -b {block} {b}\njw -r {block}\njc\n"));
    let (n, rep) = names(&img);
    assert_eq!(rep.journal_transactions, 2);
    assert!(n.contains(&"/a/b/c/deep.txt".to_string()), "{n:?}");

    // Never committed.
    let (img, block) = journal_image(tmp.path(), &src, &[]);
    renamed_dir_block(&img, block, &blk);
    debugfs_script(&img, &format!("jo\njw -c -b {block} {b}\njc\n"));
    let (n, rep) = names(&img);
    assert_eq!(rep.journal_transactions, 0);
    assert!(n.contains(&"/a/b/c/deep.txt".to_string()), "{n:?}");
}

#[test]
fn journal_replayed_data_block_points_at_the_journal_copy() {
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
    let (img, _) = journal_image(tmp.path(), &src, &[]);
    let p = img.to_str().unwrap();
    let block: u64 = run("debugfs", &["-R", "blocks /a/b/c/deep.txt", p])
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // As data=journal would: the file's block, new content, only in the journal.
    let mut new = b"jour down\n".to_vec();
    new.resize(1024, 0);
    let blk = tmp.path().join("data");
    std::fs::write(&blk, &new).unwrap();
    debugfs_script(
        &img,
        &format!("jo\njw -b {block} {}\njc\n", blk.to_str().unwrap()),
    );
    let (_, parts) = only_fs(&img);
    let (entries, rep) = walk_all(&img, &parts[0]);
    assert!(rep.is_complete(), "{:?}", rep.errors);
    let e = by_path(&entries, "/a/b/c/deep.txt");
    assert!(e.data_from_journal);
    assert_ne!(e.extents[0].disk_offset, block * 1024);
    let f = std::fs::File::open(&img).unwrap();
    assert_eq!(
        cairn_fs::read_file(&f, e, &Limits::default()).unwrap(),
        b"jour down\n"
    );
    // The hard link sees the same replayed data; an untouched file does not.
    assert!(by_path(&entries, "/a/hard").data_from_journal);
    assert!(!by_path(&entries, "/run.sh").data_from_journal);

    // A data block that begins with the jbd2 magic is escaped in the journal: no disk range
    // holds its content, so the file is reported with an error instead of wrong bytes.
    let (img, _) = journal_image(tmp.path(), &src, &[]);
    let mut magic = vec![0xC0, 0x3B, 0x39, 0x98];
    magic.resize(1024, 7);
    std::fs::write(&blk, &magic).unwrap();
    debugfs_script(
        &img,
        &format!("jo\njw -b {block} {}\njc\n", blk.to_str().unwrap()),
    );
    let (_, parts) = only_fs(&img);
    let (entries, rep) = walk_all(&img, &parts[0]);
    assert!(
        rep.errors.iter().any(
            |e| e.path == "/a/b/c/deep.txt" && e.error.kind == cairn_fs::ErrorKind::Unsupported
        ),
        "{:?}",
        rep.errors
    );
    assert!(by_path(&entries, "/a/b/c/deep.txt").extents.is_empty());
}

#[test]
fn gpt_backup_header_is_used_when_the_primary_is_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    sparse_file(&img, 8 << 20);
    sfdisk(
        &img,
        "label: gpt\nstart=2048, size=4096, type=L, name=one\n",
    );
    let p = img.to_str().unwrap();
    run(
        "mke2fs",
        &["-q", "-t", "ext4", "-E", "offset=1048576", p, "2M"],
    );
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(&img).unwrap();
        f.write_all_at(&[0xFF; 16], 512 + 24).unwrap(); // primary header CRC now wrong
    }
    let (l, found) = only_fs(&img);
    assert_eq!(l.table, TableKind::Gpt);
    assert!(!l.warnings.is_empty());
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "one");
    assert_eq!(found[0].fs, FsKind::Ext4);
}

// ---------- damage ----------

/// Walks every partition of `data` with small limits; must not panic or hang.
fn walk_bytes(data: &[u8], limits: &Limits) -> u64 {
    let owned = data.to_vec();
    let data = &owned;
    let Ok(l) = cairn_fs::scan_with(data, limits) else {
        return 0;
    };
    let mut n = 0;
    for p in &l.partitions {
        let r = cairn_fs::walk(data, p, limits, |e| {
            // Reassembling must be bounded too.
            let _ = cairn_fs::read_file(data, &e, limits);
            n += 1;
            ControlFlow::Continue(())
        });
        if let Ok(r) = r {
            assert!(r.entries <= limits.max_entries);
        }
    }
    n
}

fn small_limits() -> Limits {
    Limits {
        max_entries: 10_000,
        max_alloc: 32 << 20,
        max_dir_bytes: 4 << 20,
        max_extents_per_file: 10_000,
        ..Limits::default()
    }
}

#[test]
fn directory_loop_is_reported_not_followed() {
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
    debugfs_script(&img, "link /a /a/b/c/loop\n");
    let (n, rep) = names(&img);
    assert!(!rep.is_complete());
    assert!(
        rep.errors
            .iter()
            .any(|e| e.error.to_string().contains("cycle")),
        "{:?}",
        rep.errors
    );
    assert!(n.contains(&"/a/b/c/loop".to_string()));
    assert!(!n.iter().any(|p| p.starts_with("/a/b/c/loop/")));
}

#[test]
fn absurd_sizes_and_broken_extent_trees_give_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: true,
            big: true,
            many: 0,
        },
    );
    let (img, _) = journal_image(tmp.path(), &src, &[]);
    debugfs_script(
        &img,
        "sif /big.bin size 0xffffffffffff\nsif /a/b/c/deep.txt block[2] 0xdead\nsif /a/b mode 040755\nsif /a/b size 0x7fffffffffff\n",
    );
    let start = Instant::now();
    let (n, rep) = names(&img);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(n.contains(&"/big.bin".to_string()));
    assert!(!rep.is_complete());
    let data = std::fs::read(&img).unwrap();
    walk_bytes(&data, &small_limits());
}

#[test]
fn truncated_and_flipped_images_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: true,
            big: false,
            many: 40,
        },
    );
    let (img, _) = journal_image(tmp.path(), &src, &[]);
    let data = std::fs::read(&img).unwrap();
    let limits = small_limits();
    for cut in [0, 511, 1024, 2047, 4096, 64 << 10, 1 << 20, 3 << 20] {
        walk_bytes(&data[..cut.min(data.len())], &limits);
    }
    // Flip bytes in the metadata region (superblock, group descriptors, inode tables).
    let mut rng = 0x1234_5678_u64;
    let start = Instant::now();
    for _ in 0..200 {
        let mut d = data[..4 << 20].to_vec();
        for _ in 0..20 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = (rng % (600 << 10)) as usize;
            d[at] ^= (rng >> 32) as u8 | 1;
        }
        walk_bytes(&d, &limits);
    }
    assert!(start.elapsed() < Duration::from_secs(30));
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn base_images() -> &'static Vec<Vec<u8>> {
        static IMGS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
        IMGS.get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let src = tmp.path().join("src");
            make_tree(
                &src,
                &TreeOpts {
                    symlinks: false,
                    big: false,
                    many: 10,
                },
            );
            let e = tmp.path().join("e.img");
            sparse_file(&e, 2 << 20);
            run(
                "mke2fs",
                &[
                    "-q",
                    "-t",
                    "ext4",
                    "-b",
                    "1024",
                    "-d",
                    src.to_str().unwrap(),
                    e.to_str().unwrap(),
                ],
            );
            let f = tmp.path().join("f.img");
            run("mkfs.fat", &["-C", "-F", "12", f.to_str().unwrap(), "1024"]);
            mcopy(&f, 0, &src);
            vec![std::fs::read(&e).unwrap(), std::fs::read(&f).unwrap()]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes(data in proptest::collection::vec(any::<u8>(), 0..70_000)) {
            walk_bytes(&data, &small_limits());
        }

        #[test]
        fn mutated_images(which in 0usize..2, flips in proptest::collection::vec((0usize..300_000, any::<u8>()), 1..40)) {
            let mut d = base_images()[which].clone();
            for (at, x) in flips {
                let at = at % d.len();
                d[at] ^= x;
            }
            walk_bytes(&d, &small_limits());
        }
    }
}
