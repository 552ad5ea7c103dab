//! Damaged and hostile images: errors or partial listings, never a panic or a hang.

use super::*;

// ---------- damage ----------

/// Walks every partition of `data` with small limits; must not panic or hang.
pub(super) fn walk_bytes(data: &[u8], limits: &Limits) -> u64 {
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

pub(super) fn small_limits() -> Limits {
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
fn cross_linked_ext_directories_are_read_once() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(
        &src,
        &TreeOpts {
            symlinks: false,
            big: false,
            many: 20,
        },
    );
    let (img, _) = journal_image(tmp.path(), &src, &["-O", "^has_journal"]);
    let p = img.to_str().unwrap();
    let many: u64 = run("debugfs", &["-R", "blocks /many", p])
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // /a/b's one-extent root now points at /many's first block (i_block[5] = ee_start_lo).
    debugfs_script(&img, &format!("sif /a/b block[5] {many}\n"));
    let (n, rep) = names(&img);
    assert!(
        rep.errors
            .iter()
            .any(|e| e.error.to_string().contains("used twice")),
        "{:?}",
        rep.errors
    );
    // Whichever of the two was read first is listed, the other is skipped.
    let listed = n.iter().filter(|p| p.ends_with("/file-0000.txt")).count();
    assert_eq!(listed, 1, "{n:?}");
}

#[test]
fn cross_linked_fat_chains_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("A.TXT"), vec![b'a'; 3000]).unwrap();
    std::fs::write(src.join("B.TXT"), vec![b'b'; 3000]).unwrap();
    let img = tmp.path().join("f.img");
    run(
        "mkfs.fat",
        &["-C", "-F", "12", "-s", "1", img.to_str().unwrap(), "1024"],
    );
    mcopy(&img, 0, &src);
    let mut d = std::fs::read(&img).unwrap();
    let find = |d: &[u8], name: &[u8; 11]| d.windows(11).position(|w| w == name).unwrap();
    let a = find(&d, b"A       TXT");
    let b = find(&d, b"B       TXT");
    let (lo, hi) = (d[a + 26], d[a + 27]);
    d[b + 26] = lo;
    d[b + 27] = hi;
    std::fs::write(&img, &d).unwrap();
    let (entries, rep) = walk_all(&img, &only_fs(&img).1[0]);
    assert_eq!(entries.len(), 3);
    assert!(
        rep.errors
            .iter()
            .any(|e| e.error.to_string().contains("cross-linked")),
        "{:?}",
        rep.errors
    );
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
