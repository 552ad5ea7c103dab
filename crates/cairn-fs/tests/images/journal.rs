//! ext journal replay against debugfs-written transactions and e2fsck.

use super::*;

// ---------- journal replay ----------

/// A 1 KiB-block ext4 image of `src`; returns (image, block of directory `/a/b/c`).
pub(super) fn journal_image(tmp: &Path, src: &Path, extra: &[&str]) -> (PathBuf, u64) {
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

pub(super) fn debugfs_script(img: &Path, script: &str) {
    let cmds = img.with_extension("cmds");
    std::fs::write(&cmds, script).unwrap();
    run(
        "debugfs",
        &["-w", "-f", cmds.to_str().unwrap(), img.to_str().unwrap()],
    );
}

pub(super) fn names(img: &Path) -> (Vec<String>, cairn_fs::WalkReport) {
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

    // A data block that begins with the jbd2 magic is escaped in the journal (its first 4
    // bytes zeroed there): the extents take those 4 bytes from the journal superblock.
    let (img, _) = journal_image(tmp.path(), &src, &[]);
    let mut magic = vec![0xC0, 0x3B, 0x39, 0x98];
    magic.extend_from_slice(b"escaped");
    let mut block_data = magic.clone();
    block_data.resize(1024, 0);
    std::fs::write(&blk, &block_data).unwrap();
    debugfs_script(
        &img,
        &format!("jo\njw -b {block} {}\njc\n", blk.to_str().unwrap()),
    );
    let (_, parts) = only_fs(&img);
    let (entries, rep) = walk_all(&img, &parts[0]);
    assert!(rep.is_complete(), "{:?}", rep.errors);
    let e = by_path(&entries, "/a/b/c/deep.txt");
    assert!(e.data_from_journal);
    let f = std::fs::File::open(&img).unwrap();
    // deep.txt is 10 bytes long: the magic and the first 6 bytes of "escaped".
    assert_eq!(
        cairn_fs::read_file(&f, e, &Limits::default()).unwrap(),
        &magic[..10]
    );
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
