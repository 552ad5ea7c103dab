//! The parser against `qemu-img map` (the truth), the mapper against known writes, and hostile
//! headers. Needs `qemu-img` and `qemu-io` (preinstalled on the project's machines; missing
//! tools fail loudly).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{Rng, SeedableRng};

use super::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is missing ({e}): apt-get install qemu-utils"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let img = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(&img), size]);
    run("qemu-img", &args);
    img
}

/// Runs qemu-io commands (`write -P 0xaa 1M 64k`, `write -z ...`, `discard ...`) on `img`.
fn io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p(img));
    run("qemu-io", &args);
}

fn copy(from: &Path, to: &Path) -> PathBuf {
    std::fs::copy(from, to).unwrap();
    to.to_path_buf()
}

/// The parser's view per guest cluster, compared with `qemu-img map --output=json`.
fn check_against_qemu_map(img: &Path) -> Vec<Mapping> {
    let f = std::fs::File::open(img).unwrap();
    let image = Image::open(&f).unwrap();
    let cs = image.header.cluster_size();
    let ours: BTreeMap<u64, Mapping> = image
        .mappings()
        .unwrap()
        .into_iter()
        .map(|m| (m.guest, m))
        .collect();
    let map: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", p(img)])).unwrap();
    // Expected kind and host offset per cluster (a cluster with any data subcluster is data).
    let mut truth: BTreeMap<u64, (ClusterKind, Option<u64>)> = BTreeMap::new();
    for e in map.as_array().unwrap() {
        if !e["present"].as_bool().unwrap() {
            continue;
        }
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let kind = match (e["data"].as_bool().unwrap(), e["compressed"].as_bool()) {
            (true, Some(true)) => ClusterKind::Compressed,
            (true, _) => ClusterKind::Data,
            (false, _) => ClusterKind::Zero,
        };
        let mut c = start - start % cs;
        while c < start + len {
            let host = e["offset"]
                .as_u64()
                .filter(|_| kind == ClusterKind::Data)
                .map(|o| o.wrapping_add(c).wrapping_sub(start));
            let slot = truth.entry(c).or_insert((kind, host));
            if kind == ClusterKind::Data {
                *slot = (kind, host);
            }
            c += cs;
        }
    }
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        truth.keys().collect::<Vec<_>>(),
        "{}: allocated clusters",
        img.display()
    );
    for (g, (kind, host)) in &truth {
        let m = ours[g];
        assert_eq!(m.kind, *kind, "{}: cluster at {g}", img.display());
        if let Some(h) = host {
            assert_eq!(
                m.host,
                Extent::new(*h, cs),
                "{}: cluster at {g}",
                img.display()
            );
        }
    }
    ours.into_values().collect()
}

#[test]
fn parser_agrees_with_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let writes = [
        "write -P 0xaa 1M 64k",
        "write -P 0xbb 9M 4k",
        "write -z 5M 128k",
        "write -P 0xcc 63M 1M",
    ];
    let plain = create(d, "plain.qcow2", "", "64M");
    io(&plain, &writes);
    let m = check_against_qemu_map(&plain);
    assert_eq!(m.iter().filter(|m| m.kind == ClusterKind::Data).count(), 18);

    let v2 = create(d, "v2.qcow2", "compat=0.10,cluster_size=4k", "64M");
    io(&v2, &["write -P 0xaa 1M 64k", "write -P 0xcc 63M 8k"]);
    check_against_qemu_map(&v2);

    let ext = create(d, "ext.qcow2", "extended_l2=on,cluster_size=128k", "64M");
    io(&ext, &writes);
    let f = std::fs::File::open(&ext).unwrap();
    assert!(Image::open(&f).unwrap().header.extended_l2());
    check_against_qemu_map(&ext);

    let packed = d.join("packed.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zlib",
            p(&plain),
            p(&packed),
        ],
    );
    let m = check_against_qemu_map(&packed);
    assert!(m.iter().any(|m| m.kind == ClusterKind::Compressed));

    let zstd = create(d, "zstd.qcow2", "compression_type=zstd", "8M");
    io(&zstd, &["write -c -P 0xaa 1M 64k", "write -P 0xab 2M 64k"]);
    let m = check_against_qemu_map(&zstd);
    assert_eq!(m[0].kind, ClusterKind::Compressed);
    assert_eq!(m[1].kind, ClusterKind::Data);
}

/// Host ranges whose bytes differ (4 KiB granularity) plus any length difference: a subset of
/// what a FIEMAP diff of two reflink clones reports.
fn byte_diff(a: &Path, b: &Path) -> ExtentList {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let block = 4 * KIB as usize;
    let n = x.len().max(y.len());
    let mut out = Vec::new();
    let mut at = 0;
    while at < n {
        let end = (at + block).min(n);
        if x.get(at..end) != y.get(at..end) {
            out.push(Extent::new(at as u64, (end - at) as u64));
        }
        at = end;
    }
    ExtentList::from_unsorted(out)
}

fn changed(prev: &Path, cur: &Path) -> ExtentList {
    let (pf, cf) = (
        std::fs::File::open(prev).unwrap(),
        std::fs::File::open(cur).unwrap(),
    );
    changed_guest_extents(&pf, &cf, &byte_diff(prev, cur)).unwrap()
}

fn covers(set: &ExtentList, off: u64, len: u64) -> bool {
    let ext = set.as_slice();
    let mut at = off;
    while at < off + len {
        match ext.iter().find(|e| e.offset <= at && at < e.end()) {
            Some(e) => at = e.end(),
            None => return false,
        }
    }
    true
}

/// `prev` → copy → `cmds` on the copy: the mapper covers `expect` and at most `max` bytes.
fn scenario(prev: &Path, cmds: &[&str], expect: &[(u64, u64)], max: u64) -> ExtentList {
    let cur = copy(prev, &prev.with_extension("cur"));
    io(&cur, cmds);
    let set = changed(prev, &cur);
    for &(o, l) in expect {
        assert!(covers(&set, o, l), "{cmds:?}: {o}+{l} missing from {set:?}");
    }
    assert!(set.total_bytes() <= max, "{cmds:?}: too much: {set:?}");
    set
}

#[test]
fn mapper_finds_written_zeroed_and_discarded_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "a.qcow2", "", "64M");
    io(&img, &["write -P 0xaa 1M 1M", "write -P 0xab 40M 64k"]);
    let unchanged = changed(&img, &copy(&img, &dir.path().join("same.qcow2")));
    assert!(unchanged.is_empty(), "{unchanged:?}");
    // A new cluster (its L2 entry changes), an overwrite in place (only data changes), a
    // zeroed and a discarded cluster (only entries change).
    scenario(
        &img,
        &["write -P 0x11 20M 4k"],
        &[(20 * MIB, 4 * KIB)],
        64 * KIB,
    );
    scenario(&img, &["write -P 0x12 1M 4k"], &[(MIB, 4 * KIB)], 64 * KIB);
    scenario(&img, &["write -z 1M 64k"], &[(MIB, 64 * KIB)], 64 * KIB);
    scenario(
        &img,
        &["discard 40M 64k"],
        &[(40 * MIB, 64 * KIB)],
        64 * KIB,
    );
    scenario(
        &img,
        &[
            "write -P 0x13 1536k 8k",
            "write -P 0x14 50M 4k",
            "write -z 1600k 4k",
        ],
        &[
            (1536 * KIB, 8 * KIB),
            (50 * MIB, 4 * KIB),
            (1600 * KIB, 4 * KIB),
        ],
        3 * 64 * KIB,
    );
}

#[test]
fn mapper_compares_entries_when_the_l2_table_moved() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "a.qcow2", "", "64M");
    io(&img, &["write -P 0xaa 1M 1M"]);
    // An internal snapshot shares the L2 table: the next write copies it (the L1 entry moves)
    // and the data cluster.
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    let pf = std::fs::File::open(&img).unwrap();
    let l1_before = Image::open(&pf).unwrap().l1().unwrap();
    let cur = copy(&img, &dir.path().join("a.cur"));
    io(&cur, &["write -P 0x11 1088k 4k"]);
    let cf = std::fs::File::open(&cur).unwrap();
    assert_ne!(
        Image::open(&cf).unwrap().l1().unwrap(),
        l1_before,
        "L2 table moved"
    );
    let set = changed(&img, &cur);
    assert_eq!(
        set.as_slice(),
        &[Extent::new(1088 * KIB, 64 * KIB)],
        "{set:?}"
    );
}

#[test]
fn mapper_handles_extended_l2_and_compressed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let ext = create(
        dir.path(),
        "ext.qcow2",
        "extended_l2=on,cluster_size=128k",
        "64M",
    );
    io(&ext, &["write -P 0xaa 1M 8k"]);
    // A subcluster write into an allocated cluster and into a new one: whole clusters.
    scenario(
        &ext,
        &[
            "write -P 0x21 1028k 4k",
            "write -P 0x22 30M 4k",
            "write -z 1032k 4k",
        ],
        &[(1028 * KIB, 8 * KIB), (30 * MIB, 4 * KIB)],
        2 * 128 * KIB,
    );

    let raw = create(dir.path(), "src.qcow2", "", "16M");
    io(&raw, &["write -P 0xaa 0 4M"]);
    let packed = dir.path().join("packed.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zlib",
            p(&raw),
            p(&packed),
        ],
    );
    // Overwriting a compressed cluster allocates a new cluster; the other compressed ones
    // stay shared and unchanged, except those sharing a changed 4 KiB host block (here the
    // file's old last block: a 64 KiB cluster of one byte value compresses to a few dozen
    // bytes, so one block holds many).
    let set = scenario(
        &packed,
        &["write -P 0x31 2M 4k"],
        &[(2 * MIB, 4 * KIB)],
        MIB + 64 * KIB,
    );
    assert!(!covers(&set, 0, 4 * KIB), "{set:?}");
    // Compressed clusters whose bytes changed are found through their sector range.
    let f = std::fs::File::open(&packed).unwrap();
    let image = Image::open(&f).unwrap();
    let m = image.mappings().unwrap();
    let target = m
        .iter()
        .find(|m| m.guest == 3 * MIB)
        .expect("a compressed cluster at 3M");
    assert_eq!(target.kind, ClusterKind::Compressed);
    let host = ExtentList::from_unsorted(vec![Extent::new(target.host.offset + 3, 1)]);
    let set = changed_guest_extents(&f, &f, &host).unwrap();
    assert!(covers(&set, 3 * MIB, 64 * KIB), "{set:?}");
    // Neighbours whose compressed bytes share that 512-byte sector count too.
    assert!(set.total_bytes() <= 16 * 64 * KIB, "{set:?}");
    assert!(!covers(&set, 0, 4 * KIB), "{set:?}");
}

#[test]
fn mapper_refuses_incomparable_clones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = create(d, "a.qcow2", "", "16M");
    let b = copy(&a, &d.join("b.qcow2"));
    run("qemu-img", &["resize", "-q", p(&b), "32M"]);
    let refuse = |x: &Path, y: &Path| {
        let (xf, yf) = (
            std::fs::File::open(x).unwrap(),
            std::fs::File::open(y).unwrap(),
        );
        changed_guest_extents(&xf, &yf, &ExtentList::default())
            .unwrap_err()
            .to_string()
    };
    assert!(refuse(&a, &b).contains("virtual size"));
    let c = create(d, "c.qcow2", "cluster_size=4k", "16M");
    assert!(refuse(&a, &c).contains("cluster_bits"));
    let over = d.join("over.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&a),
            "-F",
            "qcow2",
            p(&over),
        ],
    );
    assert!(refuse(&over, &over).contains("backing file"));
    let ext = create(
        d,
        "ext.qcow2",
        &format!("data_file={}", p(&d.join("ext.data"))),
        "16M",
    );
    assert!(refuse(&ext, &ext).contains("external data file"));
}

/// A small valid version-3 image in memory: 64 KiB clusters, 1 GiB, L1 at cluster 3 and one
/// L2 table at cluster 4 mapping guest cluster 0 to host cluster 5.
fn tiny() -> Vec<u8> {
    let cs = 64 * KIB as usize;
    let mut b = vec![0u8; 6 * cs];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, f::OFF_MAGIC, f::MAGIC);
    put32(&mut b, f::OFF_VERSION, f::VERSION_3);
    put32(&mut b, f::OFF_CLUSTER_BITS, 16);
    put64(&mut b, f::OFF_SIZE, 1 << 30);
    put32(&mut b, f::OFF_L1_SIZE, 2);
    put64(&mut b, f::OFF_L1_TABLE_OFFSET, 3 * cs as u64);
    put32(&mut b, f::OFF_HEADER_LENGTH, 112);
    put64(&mut b, 3 * cs, f::L2E_COPIED | (4 * cs as u64));
    put64(&mut b, 4 * cs, f::L2E_COPIED | (5 * cs as u64));
    b
}

fn open_err(b: &[u8]) -> String {
    let b = b.to_vec();
    match Image::open(&b).and_then(|i| i.mappings()) {
        Ok(m) => panic!("accepted: {m:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_headers_are_errors() {
    let good = tiny();
    let b = good.clone();
    let m = Image::open(&b).unwrap().mappings().unwrap();
    assert_eq!(
        m,
        vec![Mapping {
            guest: 0,
            kind: ClusterKind::Data,
            host: Extent::new(5 * 64 * KIB, 64 * KIB)
        }]
    );
    let edit = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    assert!(open_err(&good[..50]).contains("beyond the end"));
    assert!(open_err(&good[..80]).contains("beyond the end"));
    assert!(open_err(&edit(0, b"QFI\0")).contains("magic"));
    assert!(open_err(&edit(4, &4u32.to_be_bytes())).contains("version 4"));
    assert!(open_err(&edit(20, &40u32.to_be_bytes())).contains("cluster_bits"));
    assert!(open_err(&edit(20, &0u32.to_be_bytes())).contains("cluster_bits"));
    assert!(open_err(&edit(36, &u32::MAX.to_be_bytes())).contains("L1 size"));
    assert!(open_err(&edit(36, &1u32.to_be_bytes())).contains("too small"));
    assert!(open_err(&edit(24, &u64::MAX.to_be_bytes())).contains("too small"));
    assert!(open_err(&edit(40, &(1u64 << 40).to_be_bytes())).contains("beyond the end"));
    assert!(open_err(&edit(40, &4097u64.to_be_bytes())).contains("aligned"));
    assert!(open_err(&edit(8, &512u64.to_be_bytes())).contains("backing"));
    assert!(open_err(&edit(32, &1u32.to_be_bytes())).contains("encryption"));
    assert!(open_err(&edit(100, &8u32.to_be_bytes())).contains("header length"));
    for bit in [f::INCOMPAT_CORRUPT, f::INCOMPAT_DATA_FILE, 1 << 5, 1 << 63] {
        open_err(&edit(72, &bit.to_be_bytes()));
    }
    // Compression type announced but the header is too short to hold it.
    let mut short = edit(72, &f::INCOMPAT_COMPRESSION.to_be_bytes());
    short[100..104].copy_from_slice(&104u32.to_be_bytes());
    assert!(open_err(&short).contains("no room"));
    // L2 table past EOF, misaligned, or used twice.
    let l1 = 3 * 64 * KIB as usize;
    assert!(open_err(&edit(l1, &(1u64 << 40).to_be_bytes())).contains("beyond the end"));
    assert!(open_err(&edit(l1, &(4 * 64 * KIB + 512).to_be_bytes())).contains("aligned"));
    let mut twice = good.clone();
    twice[l1 + 8..l1 + 16].copy_from_slice(&(4 * 64 * KIB).to_be_bytes());
    assert!(open_err(&twice).contains("twice"));
}

#[test]
fn random_corruption_never_panics() {
    let good = tiny();
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let hot: Vec<usize> = (0..112).chain(3 * 65536..3 * 65536 + 16).collect();
    for _ in 0..5000 {
        let mut b = good.clone();
        for _ in 0..rng.random_range(1..6) {
            let at = hot[rng.random_range(0..hot.len())];
            b[at] = rng.random();
        }
        let len = if rng.random_bool(0.1) {
            rng.random_range(0..b.len())
        } else {
            b.len()
        };
        b.truncate(len);
        let g = good.clone();
        let _ = changed_guest_extents(
            &g,
            &b,
            &ExtentList::from_unsorted(vec![Extent::new(0, 1 << 20)]),
        );
    }
}
