//! Mutated btrfs images: a node pointing at itself, extents beyond the device, compressed
//! data inflating past its stated size, huge item counts, random damage under valid
//! checksums. Each must give an error or a partial listing, never a panic or a hang.

use super::*;
use std::os::unix::fs::FileExt;

fn crc32c(data: &[u8]) -> u32 {
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

/// Rewrites the crc32c of a superblock or tree node after a mutation.
fn reseal(block: &mut [u8]) {
    let c = crc32c(&block[32..]);
    block[..32].fill(0);
    block[..4].copy_from_slice(&c.to_le_bytes());
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A valid tree node found in the image.
struct Node {
    phys: u64,
    buf: Vec<u8>,
}

impl Node {
    fn owner(&self) -> u64 {
        u64_at(&self.buf, 0x58)
    }
    fn level(&self) -> u8 {
        self.buf[0x64]
    }
    fn nritems(&self) -> usize {
        u32_at(&self.buf, 0x60) as usize
    }
    /// Leaf items: (objectid, type, offset, data start in the node, data size).
    fn items(&self) -> Vec<(u64, u8, u64, usize, usize)> {
        (0..self.nritems())
            .map(|i| {
                let h = &self.buf[101 + i * 25..];
                let off = u32_at(h, 17) as usize;
                (
                    u64_at(h, 0),
                    h[8],
                    u64_at(h, 9),
                    101 + off,
                    u32_at(h, 21) as usize,
                )
            })
            .collect()
    }
}

/// Every block of the image holding a tree node with a valid checksum (both DUP copies).
fn nodes(img: &Path) -> Vec<Node> {
    let f = std::fs::File::open(img).unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 65536).unwrap();
    let nodesize = u32_at(&sb, 0x94) as usize;
    let fsid = sb[0x20..0x30].to_vec();
    let len = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut buf = vec![0u8; nodesize];
    let mut at = 0u64;
    while at + nodesize as u64 <= len {
        f.read_exact_at(&mut buf, at).unwrap();
        if buf[0x20..0x30] == fsid[..] && u32_at(&buf, 0) == crc32c(&buf[32..]) {
            out.push(Node {
                phys: at,
                buf: buf.clone(),
            });
        }
        at += nodesize as u64;
    }
    out
}

/// Applies `mutate` to every node copy `pick` selects (the same logical node in both DUP
/// copies), reseals them and writes them back; returns how many were changed.
fn mutate(img: &Path, pick: &dyn Fn(&Node) -> bool, mutate: &dyn Fn(&mut Node) -> bool) -> usize {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let mut n = 0;
    for mut node in nodes(img).into_iter().filter(|x| pick(x)) {
        if mutate(&mut node) {
            reseal(&mut node.buf);
            f.write_all_at(&node.buf, node.phys).unwrap();
            n += 1;
        }
    }
    n
}

/// Walks with small limits under a watchdog; returns the walk's result and entries.
fn walk_bounded(img: &Path) -> (cairn_fs::Result<cairn_fs::WalkReport>, Vec<FileEntry>) {
    let part = Partition {
        fs: FsKind::Btrfs,
        ..only_fs(img).1.first().cloned().unwrap_or_else(|| {
            let size = std::fs::metadata(img).unwrap().len();
            Partition {
                index: 0,
                part_type: cairn_fs::PartitionType::WholeDisk,
                guid: None,
                name: String::new(),
                offset: 0,
                length: size,
                logical: false,
                bootable: false,
                fs: FsKind::Btrfs,
                note: None,
            }
        })
    };
    let f = std::fs::File::open(img).unwrap();
    let limits = Limits {
        max_entries: 100_000,
        max_alloc: 64 << 20,
        ..Limits::default()
    };
    let started = Instant::now();
    let mut v = Vec::new();
    let r = cairn_fs::walk(&f, &part, &limits, |e| {
        let _ = cairn_fs::read_file(&f, &e, &limits);
        v.push(e);
        ControlFlow::Continue(())
    });
    assert!(started.elapsed() < Duration::from_secs(60), "walk too slow");
    (r, v)
}

fn fresh(tmp: &Path, many: usize, extra: &[&str]) -> (PathBuf, Vec<FileEntry>) {
    let src = tmp.join("src");
    let _ = std::fs::remove_dir_all(&src);
    super::btrfs_tree(&src, many);
    let img = super::mkfs_btrfs(tmp, &src, extra);
    let part = super::btrfs_only(&img);
    let (entries, rep) = walk_all(&img, &part);
    assert!(rep.is_complete(), "{:?}", rep.errors);
    (img, entries)
}

fn errors(r: &cairn_fs::Result<cairn_fs::WalkReport>) -> String {
    match r {
        Ok(rep) => format!("{:?}", rep.errors),
        Err(e) => e.to_string(),
    }
}

#[test]
fn btrfs_node_pointing_at_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, entries) = fresh(tmp.path(), 3000, &[]);
    // The file-system tree is two levels deep with 3000 files; point its root's middle
    // child at the root itself.
    let n = mutate(&img, &|x| x.owner() == 5 && x.level() >= 1, &|x| {
        let mid = x.nritems() / 2;
        let own = u64_at(&x.buf, 0x30);
        let at = 101 + mid * 33 + 17;
        x.buf[at..at + 8].copy_from_slice(&own.to_le_bytes());
        true
    });
    assert!(n >= 1, "no internal node in the fs tree");
    let (r, got) = walk_bounded(&img);
    let rep = r.unwrap();
    assert!(!rep.is_complete());
    let errs = errors(&Ok(rep));
    assert!(errs.contains("twice") || errs.contains("level"), "{errs}");
    assert!(!got.is_empty() && got.len() < entries.len());
}

#[test]
fn btrfs_extents_beyond_the_device_holes_and_prealloc() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, entries) = fresh(tmp.path(), 0, &[]);
    let big = by_path(&entries, "/big.bin").inode;
    let five = by_path(&entries, "/texts/five-thousand").inode;
    let deep = by_path(&entries, "/a/b/c/deep.txt").inode;
    let zeros = by_path(&entries, "/texts/zeros").inode;
    let n = mutate(&img, &|x| x.owner() == 5 && x.level() == 0, &|x| {
        let mut changed = false;
        for (obj, ty, off, at, _) in x.items() {
            if ty != 108 {
                continue;
            }
            if obj == big && off == 0 {
                x.buf[at + 21..at + 29].copy_from_slice(&(1u64 << 50).to_le_bytes());
                changed = true;
            } else if obj == five {
                x.buf[at + 21..at + 29].fill(0); // a hole
                changed = true;
            } else if obj == zeros {
                x.buf[at + 20] = 2; // prealloc: reads as zeros
                changed = true;
            } else if obj == deep {
                x.buf[at + 20] = 9; // unknown extent type
                changed = true;
            }
        }
        changed
    });
    assert!(n >= 1);
    let (r, got) = walk_bounded(&img);
    let rep = r.unwrap();
    let errs = errors(&Ok(rep));
    assert!(
        errs.contains("no chunk") || errs.contains("beyond"),
        "{errs}"
    );
    assert!(errs.contains("extent type 9"), "{errs}");
    // Every name is still listed; the damaged files have no data.
    assert_eq!(got.len(), entries.len());
    let f = std::fs::File::open(&img).unwrap();
    let hole = by_path(&got, "/texts/five-thousand");
    assert_eq!(
        cairn_fs::read_file(&f, hole, &Limits::default()).unwrap(),
        vec![0u8; 5000]
    );
    let pre = by_path(&got, "/texts/zeros");
    assert!(pre.extents.is_empty() && pre.size == 300_000);
}

#[test]
fn btrfs_compressed_extent_inflating_past_ram_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for alg in ["zlib", "zstd", "lzo"] {
        let (img, entries) = fresh(tmp.path(), 0, &["--compress", alg]);
        let text = by_path(&entries, "/texts/compressible.txt").inode;
        // The first extent claims 4 KiB of decompressed data (and uses all of it).
        let n = mutate(&img, &|x| x.owner() == 5 && x.level() == 0, &|x| {
            for (obj, ty, off, at, _) in x.items() {
                if obj == text && ty == 108 && off == 0 && x.buf[at + 16] != 0 {
                    x.buf[at + 8..at + 16].copy_from_slice(&4096u64.to_le_bytes());
                    x.buf[at + 45..at + 53].copy_from_slice(&4096u64.to_le_bytes());
                    return true;
                }
            }
            false
        });
        assert!(n >= 1, "{alg}");
        let (r, got) = walk_bounded(&img);
        assert!(r.unwrap().is_complete(), "{alg}");
        let e = by_path(&got, "/texts/compressible.txt");
        let f = std::fs::File::open(&img).unwrap();
        assert_eq!(e.compressed[0].decompressed_len, 4096, "{alg}");
        match cairn_fs::read_file(&f, e, &Limits::default()) {
            Ok(d) => panic!("{alg}: read {} bytes", d.len()),
            Err(err) => assert!(err.to_string().contains("inflates past"), "{alg}: {err}"),
        }
        seen.push(alg);
    }
    assert_eq!(seen.len(), 3);
}

#[test]
fn btrfs_huge_item_counts_and_a_bad_superblock() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, _) = fresh(tmp.path(), 3000, &[]);
    let n = mutate(&img, &|x| x.owner() == 5 && x.level() == 0, &|x| {
        let first = x.items().first().map(|i| i.0);
        // Only the leaves after the one holding the root directory.
        if first.is_some_and(|o| o > 300) {
            x.buf[0x60..0x64].copy_from_slice(&u32::MAX.to_le_bytes());
            return true;
        }
        false
    });
    assert!(n >= 1);
    let (r, got) = walk_bounded(&img);
    let errs = errors(&r);
    assert!(errs.contains("do not fit"), "{errs}");
    assert!(!got.is_empty());

    // A superblock whose checksum does not match fails the walk; one resealed with a
    // bootstrap array longer than its field fails it too.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 65536).unwrap();
    let mut bad = sb.clone();
    bad[0x100] ^= 1;
    f.write_all_at(&bad, 65536).unwrap();
    let (r, _) = walk_bounded(&img);
    assert!(errors(&r).contains("checksum"), "{}", errors(&r));
    let mut bad = sb.clone();
    bad[0xA0..0xA4].copy_from_slice(&60_000u32.to_le_bytes());
    reseal(&mut bad);
    f.write_all_at(&bad, 65536).unwrap();
    let (r, _) = walk_bounded(&img);
    assert!(r.is_err());
}

#[test]
fn btrfs_random_damage_under_valid_checksums() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let (img, _) = fresh(tmp.path(), 200, &["--compress", "lzo"]);
    let all = nodes(&img);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for _ in 0..60 {
        // Damage 1..4 nodes with 1..16 random bytes each, keeping their checksums valid.
        let mut touched = Vec::new();
        for _ in 0..rng.random_range(1..=4) {
            let node = &all[rng.random_range(0..all.len())];
            let mut buf = node.buf.clone();
            for _ in 0..rng.random_range(1..=16) {
                let at = rng.random_range(32..buf.len());
                buf[at] = rng.random();
            }
            reseal(&mut buf);
            f.write_all_at(&buf, node.phys).unwrap();
            touched.push(node);
        }
        // Any outcome but a panic or a hang.
        let _ = walk_bounded(&img);
        for node in touched {
            f.write_all_at(&node.buf, node.phys).unwrap();
        }
    }
}

#[test]
fn btrfs_dup_metadata_survives_one_damaged_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, entries) = fresh(tmp.path(), 100, &["-m", "dup"]);
    let mut copies: BTreeMap<u64, Vec<Node>> = BTreeMap::new();
    for n in nodes(&img).into_iter().filter(|x| x.owner() == 5) {
        copies.entry(u64_at(&n.buf, 0x30)).or_default().push(n);
    }
    let pairs: Vec<&Vec<Node>> = copies.values().filter(|v| v.len() == 2).collect();
    assert!(!pairs.is_empty());
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    // The checksum no longer matches, and the items' data (which fills leaves from their
    // end: inline file contents among it) is garbage.
    let flip = |n: &Node| {
        let mut b = n.buf.clone();
        let half = b.len() / 2;
        b[200] ^= 0xff;
        b[half..].iter_mut().for_each(|x| *x ^= 0x5a);
        f.write_all_at(&b, n.phys).unwrap();
    };
    let src = tmp.path().join("src");
    let ro = std::fs::File::open(&img).unwrap();
    for which in 0..2 {
        for p in &pairs {
            flip(&p[which]);
        }
        let (r, got) = walk_bounded(&img);
        assert!(r.unwrap().is_complete(), "copy {which} damaged");
        assert_eq!(got.len(), entries.len());
        // Inline files are read from the copy of their leaf that passed its checks.
        let mut inline = 0;
        for e in got
            .iter()
            .filter(|e| e.kind == FileKind::File && e.size < 2048)
        {
            let want = std::fs::read(src.join(&e.path[1..])).unwrap();
            let have = cairn_fs::read_file(&ro, e, &Limits::default()).unwrap();
            assert_eq!(have, want, "{} with copy {which} damaged", e.path);
            inline += 1;
        }
        assert!(inline > 0);
        for p in &pairs {
            f.write_all_at(&p[which].buf, p[which].phys).unwrap();
        }
    }
    for p in &pairs {
        flip(&p[0]);
        flip(&p[1]);
    }
    let (r, _) = walk_bounded(&img);
    assert!(errors(&r).contains("checksum"), "{}", errors(&r));
}

#[test]
fn btrfs_directories_without_index_items_use_dir_items() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    super::btrfs_tree(&src, 40);
    let img = super::mkfs_btrfs(tmp.path(), &src, &[]);
    // Retype every DIR_INDEX item (96) as 97, which sorts the same and means nothing.
    let n = mutate(&img, &|x| x.owner() == 5 && x.level() == 0, &|x| {
        let mut changed = false;
        for i in 0..x.nritems() {
            let ty = 101 + i * 25 + 8;
            if x.buf[ty] == 96 {
                x.buf[ty] = 97;
                changed = true;
            }
        }
        changed
    });
    assert!(n >= 1);
    let part = super::btrfs_only(&img);
    check(&img, &part, &src, &super::BTRFS_CAPS);
}

#[test]
fn btrfs_unlinked_subvolume_is_reported_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    super::btrfs_tree(&src, 0);
    write(&src.join("vols/rw/inside.txt"), b"in rw", 1_700_000_000);
    let img = super::mkfs_btrfs(tmp.path(), &src, &["--subvol", "rw:vols/rw"]);
    // Point every directory entry of the subvolume at a tree that does not exist.
    let n = mutate(&img, &|x| x.owner() == 5 && x.level() == 0, &|x| {
        let mut changed = false;
        for (_, ty, _, at, _) in x.items() {
            if (ty == 84 || ty == 96) && x.buf[at + 8] == 132 {
                x.buf[at..at + 8].copy_from_slice(&999u64.to_le_bytes());
                changed = true;
            }
        }
        changed
    });
    assert!(n >= 1);
    let (r, got) = walk_bounded(&img);
    let errs = errors(&r);
    assert!(errs.contains("subvolume 999"), "{errs}");
    assert!(errs.contains("256") && errs.contains("rw"), "{errs}");
    assert!(errs.contains("linked from no directory"), "{errs}");
    assert!(got.iter().all(|e| !e.path.starts_with("/vols/rw")));
}
