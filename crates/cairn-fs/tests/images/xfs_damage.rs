//! XFS: the log's state (patched, and left dirty by the kernel), and damaged or hostile images (errors or partial listings, never a
//! panic or a hang). Images are small (64 MiB) and patched in place; v5 structures get their
//! CRC-32C recomputed so the damage reaches the parser behind the checksum.

use super::damage::{small_limits, walk_bytes};
use super::xfs::{crc32c, mkfs_xfs, xfs_db, xfs_tree};
use super::*;

/// Recomputes the little-endian CRC-32C at `crc_at` of `d[range]`.
fn fix_crc(d: &mut [u8], start: usize, len: usize, crc_at: usize) {
    d[start + crc_at..start + crc_at + 4].fill(0);
    let c = crc32c(&d[start..start + len]);
    d[start + crc_at..start + crc_at + 4].copy_from_slice(&c.to_le_bytes());
}

fn be16(d: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(d[at..at + 2].try_into().unwrap())
}
fn be32(d: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(d[at..at + 4].try_into().unwrap())
}
fn be64(d: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(d[at..at + 8].try_into().unwrap())
}

struct Geo {
    block: u64,
    agblocks: u64,
    agblklog: u32,
    agcount: u64,
    inode_size: usize,
    v5: bool,
}

impl Geo {
    fn of(d: &[u8]) -> Self {
        Self {
            block: u64::from(be32(d, 4)),
            agblocks: u64::from(be32(d, 84)),
            agblklog: u32::from(d[124]),
            agcount: u64::from(be32(d, 88)),
            inode_size: usize::from(be16(d, 104)),
            v5: be16(d, 100) & 0xF == 5,
        }
    }
    fn fsb_byte(&self, fsb: u64) -> usize {
        let (ag, bno) = (fsb >> self.agblklog, fsb & ((1 << self.agblklog) - 1));
        ((ag * self.agblocks + bno) * self.block) as usize
    }
    fn core(&self) -> usize {
        if self.v5 { 176 } else { 100 }
    }
}

/// Byte offset of the inode at `path`, from xfs_db.
fn inode_at(img: &Path, path: &str) -> usize {
    let out = xfs_db(img, &[&format!("path {path}"), "stack"]);
    let i = out.find("byte offset ").unwrap() + "byte offset ".len();
    out[i..].split(',').next().unwrap().trim().parse().unwrap()
}

/// Image offset of file block 0 of `path`'s data fork, from xfs_db.
fn first_block_at(img: &Path, geo: &Geo, path: &str) -> usize {
    let out = xfs_db(img, &[&format!("path {path}"), "bmap"]);
    let i = out.find("startblock ").unwrap() + "startblock ".len();
    geo.fsb_byte(out[i..].split(' ').next().unwrap().parse().unwrap())
}

/// A small image of `xfs_tree` with `args`; returns (image, bytes, geometry).
fn small(tmp: &Path, args: &[&str]) -> (PathBuf, Vec<u8>, Geo) {
    let src = tmp.join("src");
    if !src.exists() {
        xfs_tree(&src, 2000);
    }
    let (img, _, _) = mkfs_xfs(tmp, &src, 64 << 20, args, true);
    let d = std::fs::read(&img).unwrap();
    let g = Geo::of(&d);
    (img, d, g)
}

fn walk_patched(img: &Path, d: &[u8]) -> (Vec<String>, cairn_fs::WalkReport) {
    std::fs::write(img, d).unwrap();
    names(img)
}

fn has_error(rep: &cairn_fs::WalkReport, path: &str, text: &str) -> bool {
    rep.errors
        .iter()
        .any(|e| e.path == path && e.error.to_string().contains(text))
}

const V4: &[&str] = &["-m", "crc=0"];

#[test]
fn xfs_log_clean_dirty_and_reformatted() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, mut d, g) = small(tmp.path(), &[]);
    let (_, rep) = names(&img);
    assert_eq!(rep.xfs_log, Some(cairn_fs::XfsLog::Clean));
    // mkfs wrote one record at log block 0: an unmount record (one op, flags UNMOUNT).
    let log = g.fsb_byte(be64(&d, 48));
    assert_eq!(be32(&d, log), 0xFEED_BABE);
    assert_eq!(be32(&d, log + 40), 1);
    assert_eq!(d[log + 512 + 9] & 0x20, 0x20);
    // Clear the unmount flag, as if a transaction were pending (a log the kernel left dirty
    // is `xfs_log_the_kernel_left_dirty`). mkfs leaves the record's checksum 0 (unchecked).
    assert_eq!(be32(&d, log + 32), 0);
    d[log + 512 + 9] = 0;
    let (_, rep) = walk_patched(&img, &d);
    assert_eq!(rep.xfs_log, Some(cairn_fs::XfsLog::Dirty));
    // With a checksum (header as 328 bytes, then the data).
    let len = be32(&d, log + 12) as usize;
    let mut rec = d[log..log + 328].to_vec();
    rec.extend_from_slice(&d[log + 512..log + 512 + len]);
    let rl = rec.len();
    fix_crc(&mut rec, 0, rl, 32);
    d[log + 32..log + 36].copy_from_slice(&rec[32..36]);
    let (n, rep) = walk_patched(&img, &d);
    assert_eq!(rep.xfs_log, Some(cairn_fs::XfsLog::Dirty));
    assert!(
        rep.xfs_log
            .as_ref()
            .unwrap()
            .note()
            .contains("not replayed")
    );
    // (mkfs 6.1's header-less v5 remote symlink is the only damage: see xfs.rs.)
    assert!(
        rep.errors.iter().all(|e| e.path == "/link_long"),
        "{:?}",
        rep.errors
    );
    assert!(n.contains(&"/a/b/c/deep.txt".to_string()));
    // xfs_repair agrees: it refuses a file system whose log needs replaying.
    let out = Command::new(tool_path("xfs_repair"))
        .args(["-n", img.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("log"), "{text}");
    // A record whose checksum does not match is not trusted.
    d[log + 512 + 20] ^= 1;
    let (_, rep) = walk_patched(&img, &d);
    assert!(
        matches!(rep.xfs_log, Some(cairn_fs::XfsLog::Unknown(_))),
        "{:?}",
        rep.xfs_log
    );
    // xfs_db's logformat rewrites the log in a later cycle, clean.
    let (img, _, _) = small(tmp.path(), &[]);
    run(
        "xfs_db",
        &["-x", "-c", "logformat -c 3", img.to_str().unwrap()],
    );
    assert_eq!(names(&img).1.xfs_log, Some(cairn_fs::XfsLog::Clean));
}

/// Points a second bmbt root pointer of `/many` at the first one's block.
fn twice_pointed_bmbt(args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (img, mut d, g) = small(tmp.path(), args);
    assert!(xfs_db(&img, &["path /many", "p core.format"]).contains("btree"));
    let ino = inode_at(&img, "/many");
    let fork = ino + g.core();
    let forkoff = usize::from(d[ino + 82]) * 8;
    let fork_len = if forkoff > 0 {
        forkoff
    } else {
        g.inode_size - g.core()
    };
    let maxrecs = (fork_len - 4) / 16;
    let ptrs = fork + 4 + maxrecs * 8;
    let first = be64(&d, ptrs).to_be_bytes();
    d[fork + 2..fork + 4].copy_from_slice(&2u16.to_be_bytes());
    let k0 = be64(&d, fork + 4);
    d[fork + 12..fork + 20].copy_from_slice(&(k0 + 1).to_be_bytes());
    d[ptrs + 8..ptrs + 16].copy_from_slice(&first);
    if g.v5 {
        fix_crc(&mut d, ino, g.inode_size, 100);
    }
    let (n, rep) = walk_patched(&img, &d);
    assert!(
        has_error(&rep, "/many", "used twice"),
        "{args:?}: {:?}",
        rep.errors
    );
    assert!(!n.iter().any(|p| p.starts_with("/many/")), "{args:?}");
    assert!(
        n.contains(&"/leafdir/leaf-entry-399".to_string()),
        "{args:?}"
    );
    // A root claiming more levels than the tree has: the child's level does not match.
    d[fork..fork + 2].copy_from_slice(&4u16.to_be_bytes());
    d[fork + 2..fork + 4].copy_from_slice(&1u16.to_be_bytes());
    if g.v5 {
        fix_crc(&mut d, ino, g.inode_size, 100);
    }
    let (_, rep) = walk_patched(&img, &d);
    assert!(
        has_error(&rep, "/many", "expected 3"),
        "{args:?}: {:?}",
        rep.errors
    );
}

#[test]
fn xfs_bmbt_block_reached_twice_is_an_error_v4() {
    twice_pointed_bmbt(V4);
}

#[test]
fn xfs_bmbt_block_reached_twice_is_an_error_v5() {
    twice_pointed_bmbt(&[]);
}

#[test]
fn xfs_extents_past_the_device_and_huge_counts_are_per_file_errors() {
    for args in [V4, &[][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let (img, mut d, g) = small(tmp.path(), args);
        // /big.bin's first extent record now starts in an AG that does not exist.
        let ino = inode_at(&img, "/big.bin");
        let rec = ino + g.core();
        let (l0, l1) = (be64(&d, rec), be64(&d, rec + 8));
        let fsb = (g.agcount + 3) << g.agblklog;
        let l0 = (l0 & !0x1FF) | (fsb >> 43);
        let l1 = (l1 & ((1 << 21) - 1)) | (fsb << 21);
        d[rec..rec + 8].copy_from_slice(&l0.to_be_bytes());
        d[rec + 8..rec + 16].copy_from_slice(&l1.to_be_bytes());
        // /block.bin claims 2^32 - 1 extents.
        let ino2 = inode_at(&img, "/block.bin");
        d[ino2 + 76..ino2 + 80].copy_from_slice(&u32::MAX.to_be_bytes());
        // /empty claims a size of 2^63 + 1.
        let ino3 = inode_at(&img, "/empty");
        d[ino3 + 56..ino3 + 64].copy_from_slice(&((1u64 << 63) + 1).to_be_bytes());
        if g.v5 {
            for i in [ino, ino2, ino3] {
                fix_crc(&mut d, i, g.inode_size, 100);
            }
        }
        let start = Instant::now();
        let (n, rep) = walk_patched(&img, &d);
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(
            has_error(&rep, "/big.bin", "beyond the device"),
            "{args:?}: {:?}",
            rep.errors
        );
        assert!(
            has_error(&rep, "/block.bin", "extents"),
            "{args:?}: {:?}",
            rep.errors
        );
        assert!(
            has_error(&rep, "/empty", "size"),
            "{args:?}: {:?}",
            rep.errors
        );
        // The damaged files' names are still listed (except the unparseable inode), the rest is complete.
        assert!(n.contains(&"/big.bin".to_string()) && n.contains(&"/block.bin".to_string()));
        assert!(n.contains(
            &"/many/a-fairly-long-file-name-so-the-directory-grows-01999.txt".to_string()
        ));
        walk_bytes(&d, &small_limits());
    }
}

#[test]
fn xfs_checksums_guard_v5_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, d, g) = small(tmp.path(), &[]);
    // A directory data block with one flipped byte: that block's entries are lost.
    let mut d1 = d.clone();
    let blk = first_block_at(&img, &g, "/leafdir");
    d1[blk + 200] ^= 0x40;
    let (n, rep) = walk_patched(&img, &d1);
    assert!(has_error(&rep, "/leafdir", "CRC"), "{:?}", rep.errors);
    let leaves = n.iter().filter(|p| p.starts_with("/leafdir/")).count();
    assert!(leaves > 0 && leaves < 400, "{leaves}");
    // An inode with a flipped byte: that one entry is an error.
    let mut d2 = d.clone();
    let ino = inode_at(&img, "/run.sh");
    d2[ino + 60] ^= 1;
    let (n, rep) = walk_patched(&img, &d2);
    assert!(has_error(&rep, "/run.sh", "CRC"), "{:?}", rep.errors);
    assert!(!n.contains(&"/run.sh".to_string()));
    // A superblock with a flipped byte: the walk fails.
    let mut d3 = d.clone();
    d3[130] ^= 1;
    std::fs::write(&img, &d3).unwrap();
    let f = std::fs::File::open(&img).unwrap();
    let part = Partition {
        fs: FsKind::Xfs,
        ..only_fs(&img).0.partitions[0].clone()
    };
    let err =
        cairn_fs::walk(&f, &part, &Limits::default(), |_| ControlFlow::Continue(())).unwrap_err();
    assert_eq!(err.kind, cairn_fs::ErrorKind::Corrupt, "{err}");
}

#[test]
fn xfs_truncated_and_flipped_images_never_panic() {
    for args in [V4, &[][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let (img, d, g) = small(tmp.path(), args);
        let limits = small_limits();
        for cut in [512, 4096, 64 << 10, 1 << 20, 4 << 20, d.len() / 2] {
            walk_bytes(&d[..cut], &limits);
        }
        // Flip bytes in the metadata: superblock, the inode chunks, /many's bmbt and
        // directory blocks, and the log.
        let ino = inode_at(&img, "/many");
        let dir = first_block_at(&img, &g, "/many");
        let log = g.fsb_byte(be64(&d, 48));
        let regions = [
            (0usize, 4096usize),
            (ino & !0xFFFF, 256 << 10),
            (dir, 64 << 10),
            (log, 4096),
        ];
        let mut rng = 0x9E37_79B9_u64;
        let start = Instant::now();
        for i in 0..60 {
            let mut m = d.clone();
            for _ in 0..12 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let (s, len) = regions[(i + (rng >> 40) as usize) % regions.len()];
                let at = s + (rng % len as u64) as usize;
                m[at] ^= (rng >> 32) as u8 | 1;
            }
            walk_bytes(&m, &limits);
        }
        assert!(start.elapsed() < Duration::from_secs(60));
    }
}

#[test]
fn xfs_unwritten_extent_reads_as_zeros() {
    for args in [V4, &[][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let (img, mut d, g) = small(tmp.path(), args);
        // Mark /block.bin's only extent unwritten (preallocated): the flag is the top bit.
        let ino = inode_at(&img, "/block.bin");
        let rec = ino + g.core();
        d[rec] |= 0x80;
        if g.v5 {
            fix_crc(&mut d, ino, g.inode_size, 100);
        }
        std::fs::write(&img, &d).unwrap();
        let (_, parts) = only_fs(&img);
        let (entries, rep) = walk_all(&img, &parts[0]);
        assert!(
            rep.errors.iter().all(|e| e.path == "/link_long"),
            "{:?}",
            rep.errors
        );
        let e = by_path(&entries, "/block.bin");
        assert!(e.extents.is_empty(), "{args:?}: {:?}", e.extents);
        let f = std::fs::File::open(&img).unwrap();
        let data = cairn_fs::read_file(&f, e, &Limits::default()).unwrap();
        assert_eq!(data, vec![0u8; 4096 * 3 + 17], "{args:?}");
    }
}

/// A mount of `img` on a loop device, unmounted on drop (also when a test fails).
struct Mounted(PathBuf);

impl Mounted {
    fn new(img: &Path, at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        run(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), at.to_str().unwrap()],
        );
        Self(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new(tool_path("umount")).arg(&self.0).status();
    }
}

/// A log the kernel left dirty: XFS mounted on a loop device, a checkpoint (freeze), more
/// writes, then a forced shutdown. The walk says the log is dirty and lists the file system as
/// of the checkpoint: the file written before it with its hard link, not the one after. The
/// kernel's next mount replays the log; then the walk sees a clean log and that file too.
#[test]
fn xfs_log_the_kernel_left_dirty() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, _, _) = small(tmp.path(), &[]);
    let mnt = tmp.path().join("mnt");
    {
        let m = Mounted::new(&img, &mnt);
        let at = |p: &str| m.0.join(p).to_str().unwrap().to_string();
        std::fs::write(at("before.txt"), b"checkpointed\n").unwrap();
        std::fs::hard_link(at("before.txt"), at("a/hard")).unwrap();
        run("sync", &[]);
        // Freezing writes all metadata in place and covers the log.
        run("xfs_freeze", &["-f", &at("")]);
        run("xfs_freeze", &["-u", &at("")]);
        std::fs::write(at("after.txt"), b"only in the log\n").unwrap();
        run("sync", &[]);
        // Flush the log, then stop as a crash would: no unmount record.
        run("xfs_io", &["-x", "-c", "shutdown -f", &at("")]);
    }
    let (names_dirty, rep) = names(&img);
    assert_eq!(rep.xfs_log, Some(cairn_fs::XfsLog::Dirty));
    assert!(
        rep.xfs_log
            .as_ref()
            .unwrap()
            .note()
            .contains("not replayed"),
        "{:?}",
        rep.xfs_log
    );
    let logprint = run("xfs_logprint", &["-t", img.to_str().unwrap()]);
    assert!(logprint.contains("DIRTY"), "{logprint}");
    assert!(names_dirty.contains(&"/before.txt".to_string()));
    assert!(!names_dirty.contains(&"/after.txt".to_string()));
    let (_, parts) = only_fs(&img);
    let (entries, _) = walk_all(&img, &parts[0]);
    let before = entries.iter().find(|e| e.path == "/before.txt").unwrap();
    let hard = entries.iter().find(|e| e.path == "/a/hard").unwrap();
    assert_eq!((before.inode, before.nlink), (hard.inode, Some(2)));
    let f = std::fs::File::open(&img).unwrap();
    assert_eq!(
        cairn_fs::read_file(&f, hard, &Limits::default()).unwrap(),
        b"checkpointed\n"
    );
    // The kernel replays the log on mount; unmounted cleanly, the log is clean.
    drop(Mounted::new(&img, &mnt));
    let (names_clean, rep) = names(&img);
    assert_eq!(rep.xfs_log, Some(cairn_fs::XfsLog::Clean));
    assert!(names_clean.contains(&"/after.txt".to_string()));
}
