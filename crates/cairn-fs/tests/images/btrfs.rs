//! btrfs images made by `mkfs.btrfs --rootdir` (no mount needed): plain, compressed (zlib,
//! zstd, lzo), with subvolumes, other checksums, inside a GPT partition; then mutated ones.

use super::*;

#[path = "btrfs_damage.rs"]
mod btrfs_damage;

/// mkfs.btrfs --rootdir copies whole seconds (btrfs-progs 6.14 stores 0 ns).
const BTRFS_CAPS: Caps = Caps {
    modes: true,
    mtime_ns: 1_000_000_000,
};

/// `make_tree` plus what btrfs stores specially: a 255-byte name, a compressible multi-MB
/// file, tiny (inline) files, a 5000-byte file (a regular extent cut at the size).
fn btrfs_tree(src: &Path, many: usize) {
    make_tree(
        src,
        &TreeOpts {
            symlinks: true,
            big: true,
            many,
        },
    );
    let t = 1_650_000_000;
    write(&src.join("x".repeat(255)), b"longest name", t);
    let text: Vec<u8> = (0..200_000)
        .flat_map(|i: u32| format!("line {i} of a compressible file\n").into_bytes())
        .collect();
    write(&src.join("texts/compressible.txt"), &text, t + 1);
    write(&src.join("texts/tiny"), b"t", t + 2);
    write(
        &src.join("texts/five-thousand"),
        &pseudo_random(5000, 3),
        t + 3,
    );
    write(&src.join("texts/zeros"), &vec![0u8; 300_000], t + 4);
    std::fs::set_permissions(
        src.join("texts/tiny"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
}

pub(super) fn mkfs_btrfs(dir: &Path, src: &Path, extra: &[&str]) -> PathBuf {
    let img = dir.join("btrfs.img");
    let _ = std::fs::remove_file(&img);
    sparse_file(&img, 256 << 20);
    let mut args = vec!["-f", "-q", "--rootdir", src.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(img.to_str().unwrap());
    run("mkfs.btrfs", &args);
    img
}

fn btrfs_only(img: &Path) -> Partition {
    let (l, parts) = only_fs(img);
    assert_eq!(l.table, TableKind::None);
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].fs, FsKind::Btrfs);
    parts[0].clone()
}

#[test]
fn btrfs_rootdir_matches_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    btrfs_tree(&src, 600);
    let img = mkfs_btrfs(tmp.path(), &src, &[]);
    let part = btrfs_only(&img);
    let entries = check(&img, &part, &src, &BTRFS_CAPS);
    let (_, rep) = walk_all(&img, &part);
    assert_eq!(rep.btrfs_default_subvolume, Some(5));
    assert!(entries.iter().all(|e| e.subvolume == Some(5)));
    assert!(entries.iter().all(|e| e.compressed.is_empty()));
    assert_eq!(entries[0].path, "/");
    assert_eq!(entries[0].inode, 256);
    // Hard links share the inode and count their names.
    let hard = by_path(&entries, "/a/hard");
    assert_eq!(hard.inode, by_path(&entries, "/a/b/c/deep.txt").inode);
    assert_eq!(hard.nlink, Some(2));
    // Tiny files are inline: one extent inside their tree leaf, no contents in the listing;
    // big ones are extents. (mkfs.btrfs --rootdir writes the holes of sparse.bin as zeros;
    // holes and prealloc extents are covered by btrfs_damage.rs.)
    let tiny = by_path(&entries, "/texts/tiny");
    assert!(tiny.inline_data.is_none());
    assert_eq!(tiny.extents.len(), 1);
    assert_eq!(tiny.extents[0].length, tiny.size);
    assert!(!by_path(&entries, "/big.bin").extents.is_empty());
    // Directory order is creation order (DIR_INDEX): every name of /many is there.
    let many = entries
        .iter()
        .filter(|e| e.path.starts_with("/many/"))
        .count();
    assert_eq!(many, 600);
    // lookup reads only the path's directories.
    let f = std::fs::File::open(&img).unwrap();
    let e = cairn_fs::lookup(&f, &part, &Limits::default(), "/many/file-0599.txt").unwrap();
    assert_eq!(
        cairn_fs::read_file(&f, &e, &Limits::default()).unwrap(),
        b"599\n"
    );
}

#[test]
fn btrfs_compressed_zlib_zstd_lzo() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    btrfs_tree(&src, 50);
    for alg in ["zlib", "zstd", "lzo", "zlib:9", "zstd:15"] {
        let img = mkfs_btrfs(tmp.path(), &src, &["--compress", alg]);
        let part = btrfs_only(&img);
        let entries = check(&img, &part, &src, &BTRFS_CAPS);
        let text = by_path(&entries, "/texts/compressible.txt");
        assert!(
            text.compressed.len() > 10,
            "{alg}: {} compressed extents",
            text.compressed.len()
        );
        let stored: u64 = text.compressed.iter().map(|x| x.disk_length).sum();
        assert!(stored < text.size / 3, "{alg}: {stored} of {}", text.size);
        // The entry survives a JSON round trip with its compressed extents.
        let json = serde_json::to_string(text).unwrap();
        let back: FileEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, text);
    }
}

#[test]
fn btrfs_subvolumes_and_default() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    btrfs_tree(&src, 20);
    // Subvolumes: a plain one, a read-only one, a nested one, and the default.
    write(&src.join("vols/rw/inside.txt"), b"in rw", 1_700_000_000);
    write(&src.join("vols/ro/inside.txt"), b"in ro", 1_700_000_001);
    write(
        &src.join("vols/rw/nested/deeper.txt"),
        b"nested",
        1_700_000_002,
    );
    write(&src.join("home/user/notes.txt"), b"notes", 1_700_000_003);
    let img = mkfs_btrfs(
        tmp.path(),
        &src,
        &[
            "--subvol",
            "rw:vols/rw",
            "--subvol",
            "ro:vols/ro",
            "--subvol",
            "vols/rw/nested",
            "--subvol",
            "default:home",
        ],
    );
    let part = btrfs_only(&img);
    let entries = check(&img, &part, &src, &BTRFS_CAPS);
    let (_, rep) = walk_all(&img, &part);
    let sub = |p: &str| by_path(&entries, p).subvolume.unwrap();
    let (rw, ro, nested, home) = (
        sub("/vols/rw"),
        sub("/vols/ro"),
        sub("/vols/rw/nested"),
        sub("/home"),
    );
    let ids = [5, rw, ro, nested, home];
    for (i, a) in ids.iter().enumerate() {
        assert!(ids[i + 1..].iter().all(|b| a != b), "{ids:?}");
        assert!(*a == 5 || *a >= 256, "{ids:?}");
    }
    assert_eq!(rep.btrfs_default_subvolume, Some(home));
    assert_eq!(sub("/vols"), 5);
    assert_eq!(sub("/vols/rw/inside.txt"), rw);
    assert_eq!(sub("/vols/rw/nested/deeper.txt"), nested);
    assert_eq!(sub("/home/user/notes.txt"), home);
    // Each subvolume's root directory is inode 256 of its own tree.
    for p in ["/vols/rw", "/vols/ro", "/vols/rw/nested", "/home"] {
        assert_eq!(by_path(&entries, p).inode, 256, "{p}");
    }
    let f = std::fs::File::open(&img).unwrap();
    let e = cairn_fs::lookup(&f, &part, &Limits::default(), "/vols/rw/nested/deeper.txt").unwrap();
    assert_eq!(
        cairn_fs::read_file(&f, &e, &Limits::default()).unwrap(),
        b"nested"
    );
}

#[test]
fn btrfs_other_checksums_and_dup_data() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    btrfs_tree(&src, 10);
    for extra in [
        &["--csum", "xxhash"][..],
        &["--csum", "sha256"][..],
        &["-d", "dup", "-m", "dup"][..],
        &["-m", "single", "-n", "4096"][..],
    ] {
        let img = mkfs_btrfs(tmp.path(), &src, extra);
        let part = btrfs_only(&img);
        check(&img, &part, &src, &BTRFS_CAPS);
    }
    let img = mkfs_btrfs(tmp.path(), &src, &["--csum", "blake2"]);
    let part = btrfs_only(&img);
    let f = std::fs::File::open(&img).unwrap();
    let err =
        cairn_fs::walk(&f, &part, &Limits::default(), |_| ControlFlow::Continue(())).unwrap_err();
    assert_eq!(err.kind, cairn_fs::ErrorKind::Unsupported, "{err}");
}

/// Copies `fs` into a new disk image at byte `offset`, keeping holes.
fn place(fs: &Path, disk: &Path, offset: u64) {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let mut src = std::fs::File::open(fs).unwrap();
    let dst = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = src.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], offset + at).unwrap();
        }
        at += n as u64;
    }
}

#[test]
fn btrfs_in_a_gpt_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    btrfs_tree(&src, 10);
    let fs = mkfs_btrfs(tmp.path(), &src, &["--compress", "zstd"]);
    let disk = tmp.path().join("disk.img");
    sparse_file(&disk, 300 << 20);
    let parts = sfdisk(&disk, "label: gpt\nstart=2048, size=532480, type=L\n");
    assert_eq!(parts[0].0, 2048);
    place(&fs, &disk, 2048 * 512);
    let (l, found) = only_fs(&disk);
    assert_eq!(l.table, TableKind::Gpt);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].fs, FsKind::Btrfs);
    let entries = check(&disk, &found[0], &src, &BTRFS_CAPS);
    // Image byte ranges include the partition offset.
    let big = by_path(&entries, "/big.bin");
    assert!(big.extents.iter().all(|x| x.disk_offset >= 2048 * 512));
    let text = by_path(&entries, "/texts/compressible.txt");
    assert!(text.compressed.iter().all(|x| x.disk_offset >= 2048 * 512));
}
