//! XFS images made by mkfs.xfs from a protofile (`-p`), compared with their source tree.
//!
//! mkfs.xfs 6.1 copies file contents, modes, uids and gids from a protofile but stamps every
//! inode with the time it runs (and does not keep holes), so times are checked against the
//! mkfs run, not the source tree.

use std::time::UNIX_EPOCH;

use super::*;

/// Entries of the big directory: enough for a B+tree extent map. (mkfs.xfs 6.1 fails with
/// ENOSPC from "directory createname" when this tree holds a directory of about 4000 or more.)
pub(super) const MANY: usize = 3000;

/// A tree without spaces in names (protofile names are whitespace-separated) and without
/// hard links (a protofile cannot express them).
pub(super) fn xfs_tree(root: &Path, many: usize) {
    let t = 1_600_000_000;
    write(&root.join("a/b/c/deep.txt"), b"deep down\n", t);
    write(&root.join("a/b/c/d/e/f/g/deeper"), b"deeper\n", t);
    write(&root.join("empty"), b"", t);
    write(&root.join("tiny"), b"x", t);
    write(
        &root.join("h\u{e9}llo-w\u{f6}rld.txt"),
        "unicode \u{2603}\n".as_bytes(),
        t,
    );
    write(&root.join("run.sh"), b"#!/bin/sh\necho hi\n", t);
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    write(&root.join("secret"), b"private", t);
    std::fs::set_permissions(root.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    write(&root.join("setuid"), b"suid", t);
    std::fs::set_permissions(root.join("setuid"), std::fs::Permissions::from_mode(0o4751)).unwrap();
    write(&root.join("big.bin"), &pseudo_random(3_500_000, 7), t);
    write(&root.join("block.bin"), &pseudo_random(4096 * 3 + 17, 9), t);
    // Mostly zeros (mkfs writes the zeros: no hole survives a protofile copy).
    let sp = root.join("sparse.bin");
    let f = std::fs::File::create(&sp).unwrap();
    f.set_len(3 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"start", 0).unwrap();
    f.write_all_at(b"end", (3 << 20) - 3).unwrap();
    drop(f);
    write(
        &root.join(format!("{}.long", "n".repeat(250))),
        b"long name",
        t,
    );
    for i in 0..40 {
        write(
            &root.join(format!("blockdir/entry-{i:02}")),
            format!("{i}").as_bytes(),
            t,
        );
    }
    for i in 0..400 {
        write(
            &root.join(format!("leafdir/leaf-entry-{i:03}")),
            format!("{i}").as_bytes(),
            t,
        );
    }
    for i in 0..many {
        let name = format!("many/a-fairly-long-file-name-so-the-directory-grows-{i:05}.txt");
        write(&root.join(name), format!("{i}\n").as_bytes(), t);
    }
    std::os::unix::fs::symlink("a/b/c/deep.txt", root.join("link_short")).unwrap();
    let long = format!("a/{}/target", "x".repeat(1000));
    std::os::unix::fs::symlink(long, root.join("link_long")).unwrap();
}

/// Writes a protofile for the tree at `src`; files named `*.sh` get uid 1000 gid 100.
pub(super) fn protofile(src: &Path, out: &Path) {
    fn mode_str(kind: char, mode: u32) -> String {
        let u = if mode & 0o4000 != 0 { 'u' } else { '-' };
        let g = if mode & 0o2000 != 0 { 'g' } else { '-' };
        format!("{kind}{u}{g}{:03o}", mode & 0o777)
    }
    fn dir(path: &Path, out: &mut String, depth: usize) {
        let mut names: Vec<_> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let name = p.file_name().unwrap().to_str().unwrap();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let ind = " ".repeat(depth);
            let (uid, gid) = if name.ends_with(".sh") {
                (1000, 100)
            } else {
                (0, 0)
            };
            if md.is_dir() {
                out.push_str(&format!(
                    "{ind}{name} {} {uid} {gid}\n",
                    mode_str('d', md.mode())
                ));
                dir(&p, out, depth + 1);
                out.push_str(&format!("{ind}$\n"));
            } else if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                let m = mode_str('l', 0o777);
                out.push_str(&format!(
                    "{ind}{name} {m} {uid} {gid} {}\n",
                    t.to_str().unwrap()
                ));
            } else {
                let m = mode_str('-', md.mode());
                out.push_str(&format!(
                    "{ind}{name} {m} {uid} {gid} {}\n",
                    p.to_str().unwrap()
                ));
            }
        }
    }
    let mut s = String::from("/dev/null\n0 0\nd--755 0 0\n");
    dir(src, &mut s, 1);
    s.push_str("$\n");
    std::fs::write(out, s).unwrap();
}

fn now_ns() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

/// mkfs.xfs of `src` on a new sparse image of `size` bytes; returns (image, mkfs start and
/// end time in ns).
pub(super) fn mkfs_xfs(
    dir: &Path,
    src: &Path,
    size: u64,
    args: &[&str],
    small: bool,
) -> (PathBuf, i64, i64) {
    let img = dir.join("xfs.img");
    let _ = std::fs::remove_file(&img);
    sparse_file(&img, size);
    let proto = dir.join("proto");
    protofile(src, &proto);
    let mut a = vec!["-f", "-q", "-p", proto.to_str().unwrap()];
    a.extend_from_slice(args);
    a.push(img.to_str().unwrap());
    // mkfs.xfs refuses file systems under 300 MB unless it runs under fstests, whose variables
    // allow small test file systems.
    let env: &[(&str, &str)] = if small {
        &[
            ("TEST_DIR", "/tmp"),
            ("TEST_DEV", "/dev/null"),
            ("QA_CHECK_FS", "1"),
        ]
    } else {
        &[]
    };
    let t0 = now_ns();
    run_env("mkfs.xfs", &a, env);
    (img, t0, now_ns())
}

pub(super) fn xfs_db(img: &Path, cmds: &[&str]) -> String {
    let mut a = Vec::new();
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.push(img.to_str().unwrap());
    run("xfs_db", &a)
}

/// Walks `part` and checks it lists exactly the tree at `src`, times within the mkfs run.
fn check_xfs(
    img: &Path,
    part: &Partition,
    src: &Path,
    (t0, t1): (i64, i64),
    v5: bool,
) -> Vec<FileEntry> {
    let (entries, rep) = walk_all(img, part);
    assert!(rep.is_complete(), "walk not complete: {:?}", rep.errors);
    assert_eq!(rep.xfs_log, Some(cairn_fs::XfsLog::Clean));
    let f = std::fs::File::open(img).unwrap();
    let want = expected(src);
    let mut got = BTreeMap::new();
    for e in &entries {
        assert!(
            got.insert(e.path.clone(), e.clone()).is_none(),
            "{} listed twice",
            e.path
        );
    }
    let root = got.remove("/").expect("root listed first");
    assert_eq!(root.kind, FileKind::Dir);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "names differ"
    );
    // Timestamps: set by mkfs while it ran (µs precision on this kernel, so allow 1 s).
    let in_run =
        |t: Option<i64>| t.is_some_and(|t| t >= t0 - 1_000_000_000 && t <= t1 + 1_000_000_000);
    for (path, w) in &want {
        let e = &got[path];
        assert_eq!(e.kind, w.kind, "{path}: kind");
        assert!(
            in_run(e.mtime),
            "{path}: mtime {:?} not in [{t0}, {t1}]",
            e.mtime
        );
        assert!(in_run(e.ctime), "{path}: ctime");
        assert_eq!(e.crtime.is_some(), v5, "{path}: crtime only on v5");
        if v5 {
            assert!(in_run(e.crtime), "{path}: crtime");
        }
        let (uid, gid) = if path.ends_with(".sh") {
            (1000, 100)
        } else {
            (0, 0)
        };
        assert_eq!((e.uid, e.gid), (Some(uid), Some(gid)), "{path}: owner");
        match w.kind {
            FileKind::Dir => assert_eq!(e.mode, Some(w.mode), "{path}: mode"),
            FileKind::Symlink => {
                assert_eq!(e.size, w.size, "{path}: size");
                assert_eq!(e.symlink_target, w.target, "{path}: symlink target");
            }
            _ => {
                assert_eq!(e.mode, Some(w.mode), "{path}: mode");
                assert_eq!(e.size, w.size, "{path}: size");
                let data = cairn_fs::read_file(&f, e, &Limits::default()).unwrap();
                assert_eq!(Some(sha(&data)), w.sha, "{path}: content");
                let mut pos = 0;
                for x in &e.extents {
                    assert!(x.file_offset >= pos, "{path}: extents out of order");
                    assert!(x.disk_offset >= part.offset);
                    assert!(x.disk_offset + x.length <= part.offset + part.length);
                    pos = x.file_offset + x.length;
                }
            }
        }
    }
    entries
}

pub(super) fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// mkfs.xfs 6.1 writes a v5 remote symlink's target without the block header that the
/// format requires (xfs_repair -n reports "bad symlink header"). Rewrites the mapping as the
/// format describes it: header (magic, offset, bytes, CRC-32C, uuid, owner, disk address,
/// lsn) then the target, and checks that xfs_repair now accepts it.
fn fix_remote_symlink(img: &Path, path: &str, ino: u64) {
    let out = xfs_db(img, &[&format!("path {path}"), "bmap"]);
    let field = |k: &str| -> u64 {
        let i = out.find(k).unwrap() + k.len();
        out[i..].split(' ').next().unwrap().trim().parse().unwrap()
    };
    let (fsb, count) = (field("startblock "), field("count "));
    let mut d = std::fs::read(img).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(d[at..at + 4].try_into().unwrap());
    let (bs, agblocks, agblklog) = (u64::from(be32(4)), u64::from(be32(84)), d[124]);
    let (ag, bno) = (fsb >> agblklog, fsb & ((1 << agblklog) - 1));
    let off = ((ag * agblocks + bno) * bs) as usize;
    let len = (count * bs) as usize;
    let size = by_path(&walk_all(img, &only_fs(img).1[0]).0, path).size as usize;
    let target = d[off..off + size].to_vec();
    let mut blk = Vec::with_capacity(len);
    blk.extend_from_slice(&0x5853_4C4Du32.to_be_bytes());
    blk.extend_from_slice(&0u32.to_be_bytes());
    blk.extend_from_slice(&(size as u32).to_be_bytes());
    blk.extend_from_slice(&[0; 4]);
    blk.extend_from_slice(&d[32..48]); // sb_uuid
    blk.extend_from_slice(&ino.to_be_bytes());
    blk.extend_from_slice(&(off as u64 / 512).to_be_bytes());
    blk.extend_from_slice(&0u64.to_be_bytes());
    blk.extend_from_slice(&target);
    assert!(blk.len() <= len, "target and header do not fit the mapping");
    blk.resize(len, 0);
    let c = crc32c(&blk);
    blk[12..16].copy_from_slice(&c.to_le_bytes());
    d[off..off + len].copy_from_slice(&blk);
    std::fs::write(img, d).unwrap();
    run("xfs_repair", &["-n", img.to_str().unwrap()]);
}

fn format_of(img: &Path, path: &str) -> String {
    xfs_db(img, &[&format!("path {path}"), "p core.format"])
}

#[test]
fn xfs_v5_and_v4_match_the_source_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    xfs_tree(&src, MANY);
    let variants: &[(&[&str], bool)] = &[
        (&[], true),
        (
            &[
                "-m",
                "bigtime=0,reflink=0",
                "-b",
                "size=2048",
                "-n",
                "size=8192",
            ],
            true,
        ),
        (&["-m", "crc=0", "-b", "size=1024"], false),
        (&["-m", "crc=0", "-n", "ftype=0"], false),
    ];
    for (args, v5) in variants {
        let (img, t0, t1) = mkfs_xfs(tmp.path(), &src, 320 << 20, args, false);
        let (l, parts) = only_fs(&img);
        assert_eq!(l.table, TableKind::None, "{args:?}");
        assert_eq!(parts.len(), 1, "{args:?}");
        assert_eq!(parts[0].fs, FsKind::Xfs, "{args:?}");
        if *v5 {
            // As written by mkfs 6.1 the long symlink's block has no header: an error for
            // that entry only.
            let (v, rep) = walk_all(&img, &parts[0]);
            assert_eq!(rep.errors.len(), 1, "{args:?}: {:?}", rep.errors);
            assert_eq!(rep.errors[0].path, "/link_long");
            let ino = by_path(&v, "/link_long").inode;
            fix_remote_symlink(&img, "/link_long", ino);
        }
        let entries = check_xfs(&img, &parts[0], &src, (t0, t1), *v5);
        // The tools agree on which directory formats were exercised: short-form, extents
        // (block and leaf directories) and a B+tree extent map for the 5000-entry directory.
        assert!(format_of(&img, "/a").contains("local"), "{args:?}");
        assert!(format_of(&img, "/blockdir").contains("extents"), "{args:?}");
        assert!(format_of(&img, "/many").contains("btree"), "{args:?}");
        assert!(format_of(&img, "/link_short").contains("local"));
        assert!(format_of(&img, "/link_long").contains("extents"));
        let dsize = |p: &str| by_path(&entries, p).size;
        let dblk: u64 = if args.contains(&"size=8192") {
            8192
        } else {
            4096
        };
        assert_eq!(dsize("/blockdir"), dblk, "{args:?}: one directory block");
        assert!(dsize("/leafdir") > dblk, "{args:?}");
        // lookup reads only the path's directories.
        let f = std::fs::File::open(&img).unwrap();
        let last = MANY - 1;
        let name = format!("/many/a-fairly-long-file-name-so-the-directory-grows-{last:05}.txt");
        let e = cairn_fs::lookup(&f, &parts[0], &Limits::default(), &name).unwrap();
        let want = format!("{last}\n");
        assert_eq!(
            cairn_fs::read_file(&f, &e, &Limits::default()).unwrap(),
            want.as_bytes()
        );
        // The real checker agrees the image is consistent.
        run("xfs_repair", &["-n", img.to_str().unwrap()]);
    }
}

/// Copies the non-zero 1 MiB pieces of `from` into `to` at `offset` (both sparse).
fn splice(from: &Path, to: &Path, offset: u64) {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let mut r = std::fs::File::open(from).unwrap();
    let w = std::fs::File::options().write(true).open(to).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            w.write_all_at(&buf[..n], offset + at).unwrap();
        }
        at += n as u64;
    }
}

#[test]
fn xfs_in_a_gpt_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    xfs_tree(&src, 100);
    let size = 320u64 << 20;
    // v4: its remote symlinks have no header, so mkfs 6.1 writes them correctly.
    let (fs, t0, t1) = mkfs_xfs(tmp.path(), &src, size, &["-m", "crc=0"], false);
    let img = tmp.path().join("disk.img");
    sparse_file(&img, size + (4 << 20));
    let parts = sfdisk(
        &img,
        &format!("label: gpt\nstart=2048, size={}, type=L\n", size / 512),
    );
    assert_eq!(parts[0].0, 2048);
    splice(&fs, &img, 2048 * 512);
    let (l, found) = only_fs(&img);
    assert_eq!(l.table, TableKind::Gpt);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].fs, FsKind::Xfs);
    assert_eq!(found[0].offset, 1 << 20);
    let entries = check_xfs(&img, &found[0], &src, (t0, t1), false);
    // Extents are image byte ranges: the partition offset is included.
    let big = by_path(&entries, "/big.bin");
    assert!(big.extents.iter().all(|x| x.disk_offset >= 1 << 20));
}
