//! FAT (mkfs.fat + mcopy) and NTFS (mkntfs + wimlib) images.

use super::*;

// ---------- FAT ----------

pub(super) const FAT_CAPS: Caps = Caps {
    modes: false,
    mtime_ns: 2_000_000_000,
};

pub(super) fn mcopy(img: &Path, offset: u64, src: &Path) {
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
    let f = std::fs::File::open(&img).unwrap();
    let l = Limits::default();
    let e = cairn_fs::lookup(&f, &found[0], &l, "日本語/ファイル.txt").unwrap();
    assert_eq!(cairn_fs::read_file(&f, &e, &l).unwrap(), b"nihongo");
    let miss = cairn_fs::lookup(&f, &found[0], &l, "/a/b/nope").unwrap_err();
    assert_eq!(miss.kind, cairn_fs::ErrorKind::NotFound);
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
    let f = std::fs::File::open(&img).unwrap();
    let l = Limits::default();
    let e = cairn_fs::lookup(&f, &found[0], &l, "/a/b/c/deep.txt").unwrap();
    assert_eq!(cairn_fs::read_file(&f, &e, &l).unwrap(), b"deep down\n");
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

#[test]
fn ntfs_attribute_list_from_many_hard_links() {
    // 26 long names do not fit one 1 KiB MFT record: ntfs-3g moves $FILE_NAMEs to extension
    // records listed in an $ATTRIBUTE_LIST.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("d/x"), &pseudo_random(100_000, 3), 1_600_000_000);
    for i in 0..25 {
        let name = format!("link{i:02}_{}", "n".repeat(120));
        std::fs::hard_link(src.join("d/x"), src.join("d").join(name)).unwrap();
    }
    let img = ntfs_image(tmp.path(), &src, 8 << 20, 0);
    let info = run("ntfsinfo", &["-F", "/d/x", img.to_str().unwrap()]);
    assert!(
        info.contains("$ATTRIBUTE_LIST"),
        "no attribute list was made"
    );
    let (_, found) = only_fs(&img);
    let entries = check(&img, &found[0], &src, &NTFS_CAPS);
    let x = by_path(&entries, "/d/x");
    assert_eq!(x.nlink, Some(26));
    assert_eq!(entries.iter().filter(|e| e.inode == x.inode).count(), 26);
}
