//! The writer against QEMU (the truth): `qemu-img check` finds the image clean, `qemu-img
//! convert -O raw` gives back exactly the bytes written, `qemu-img map` shows only the planned
//! clusters allocated, and our own reader maps it the same way. Needs `qemu-img` (preinstalled
//! on the project's machines; a missing tool fails loudly).

use std::path::Path;
use std::process::Command;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::qcow2::{ClusterKind, Image};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is missing ({e}): apt-get install qemu-utils"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// How the test hands the data to the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// `write_at`, piece by piece.
    Pieces,
    /// `write_clusters`, window by window of at most this many bytes (as a restore does).
    Windows(u64),
}

/// Writes `pieces` (guest offset, bytes) in a shuffled order from two threads, finishes, and
/// checks the image against QEMU and the expected raw bytes; returns the plan.
fn write_and_check(
    dir: &Path,
    size: u64,
    cluster_bits: u32,
    pieces: &[(u64, Vec<u8>)],
    seed: u64,
) -> Plan {
    write_and_check_via(dir, size, cluster_bits, pieces, seed, Via::Pieces)
}

fn write_and_check_via(
    dir: &Path,
    size: u64,
    cluster_bits: u32,
    pieces: &[(u64, Vec<u8>)],
    seed: u64,
    via: Via,
) -> Plan {
    let img = dir.join(format!("w{seed}.qcow2"));
    let plan = Plan::new(
        size,
        cluster_bits,
        pieces.iter().map(|(o, d)| Extent::new(*o, d.len() as u64)),
    )
    .unwrap();
    let w = Writer::create(&img, plan.clone()).unwrap();
    let windows = match via {
        Via::Pieces => Vec::new(),
        Via::Windows(max) => plan.windows(max),
    };
    let n = if via == Via::Pieces {
        pieces.len()
    } else {
        windows.len()
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let (a, b) = order.split_at(order.len() / 2);
    std::thread::scope(|s| {
        for half in [a, b] {
            let (w, windows) = (&w, &windows);
            s.spawn(move || {
                for &i in half {
                    if via == Via::Pieces {
                        w.write_at(pieces[i].0, &pieces[i].1).unwrap();
                        continue;
                    }
                    let win = windows[i];
                    let mut buf = ClusterBuf::zeroed(win.len as usize);
                    let out = buf.as_mut_slice();
                    for (o, d) in pieces {
                        let (from, to) = (win.offset.max(*o), win.end().min(o + d.len() as u64));
                        if from < to {
                            out[(from - win.offset) as usize..(to - win.offset) as usize]
                                .copy_from_slice(&d[(from - o) as usize..(to - o) as usize]);
                        }
                    }
                    w.write_clusters(win.offset, &buf).unwrap();
                }
            });
        }
    });
    w.finish().unwrap();

    let (ok, out) = qemu_img(&["check", "-f", "qcow2", p(&img)]);
    assert!(ok, "qemu-img check: {out}");
    assert!(out.contains("No errors were found"), "{out}");
    assert!(!out.contains("leaked"), "{out}");

    // The expected disk as a sparse raw file; QEMU compares it with the image.
    let expected = dir.join(format!("w{seed}.expected"));
    let e = File::create(&expected).unwrap();
    e.set_len(size.next_multiple_of(512)).unwrap();
    for (o, d) in pieces {
        e.write_all_at(d, *o).unwrap();
    }
    drop(e);
    let (ok, out) = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(&expected), p(&img)]);
    assert!(ok, "qemu-img compare: {out}");
    if size <= 64 * MIB {
        let raw = dir.join(format!("w{seed}.raw"));
        let (ok, out) = qemu_img(&["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&raw)]);
        assert!(ok, "{out}");
        assert!(
            std::fs::read(&raw).unwrap() == std::fs::read(&expected).unwrap(),
            "the image does not convert back to the bytes written"
        );
    }

    // Allocated: exactly the clusters the pieces touch (QEMU's map and ours).
    let cs = 1u64 << cluster_bits;
    let mut planned: Vec<u64> = pieces
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .flat_map(|(o, d)| (o / cs)..(o + d.len() as u64).div_ceil(cs))
        .collect();
    planned.sort_unstable();
    planned.dedup();
    let file = File::open(&img).unwrap();
    let ours = Image::open(&file).unwrap();
    let maps = ours.mappings().unwrap();
    assert!(maps.iter().all(|m| m.kind == ClusterKind::Data));
    let mapped: Vec<u64> = maps.iter().map(|m| m.guest / cs).collect();
    assert_eq!(mapped, planned);
    let (ok, json) = qemu_img(&["map", "--output=json", "-f", "qcow2", p(&img)]);
    assert!(ok, "{json}");
    let qemu: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let allocated: u64 = qemu
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    let vsize = size.next_multiple_of(512);
    let planned_bytes: u64 = planned.iter().map(|c| cs.min(vsize - c * cs)).sum();
    assert_eq!(allocated, planned_bytes, "{json}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), plan.file_len());
    plan
}

fn random(rng: &mut impl Rng, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    rng.fill(&mut v[..]);
    v
}

#[test]
fn unaligned_segments_read_back_and_gaps_stay_unallocated() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // 10 MiB and a ragged tail; segments of a few KiB at odd offsets, adjacent runs, a gap of
    // several clusters (unallocated), and data in the last, partial cluster.
    let size = 10 * MIB + 3 * KIB + 17;
    let mut pieces = Vec::new();
    let mut at = 7u64;
    while at < 4 * MIB {
        let len = rng.random_range(1..12 * KIB);
        pieces.push((at, random(&mut rng, len)));
        at += len
            + if rng.random_bool(0.3) {
                0
            } else {
                rng.random_range(1..300 * KIB)
            };
    }
    pieces.push((8 * MIB + 5, random(&mut rng, 3 * MIB / 2)));
    pieces.push((size - 100, random(&mut rng, 100)));
    let plan = write_and_check(dir.path(), size, f::DEFAULT_CLUSTER_BITS, &pieces, 1);
    assert!(
        plan.data_clusters() < size / (64 * KIB),
        "the gaps are not allocated"
    );
}

#[test]
fn whole_cluster_windows_read_back_like_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // Windows of three 64 KiB clusters (O_DIRECT where the file system takes it), a ragged
    // tail inside the last cluster, segments across window edges, and gaps.
    let size = 6 * MIB + 1000;
    let mut pieces = Vec::new();
    let mut at = 3u64;
    while at < size - 20 * KIB {
        let len = rng.random_range(1..20 * KIB);
        pieces.push((at, random(&mut rng, len)));
        at += len
            + if rng.random_bool(0.7) {
                0
            } else {
                rng.random_range(1..400 * KIB)
            };
    }
    pieces.push((size - 900, random(&mut rng, 900)));
    let plan = write_and_check_via(
        dir.path(),
        size,
        f::DEFAULT_CLUSTER_BITS,
        &pieces,
        5,
        Via::Windows(3 * 64 * KIB),
    );
    let windows = plan.windows(3 * 64 * KIB);
    assert!(
        windows
            .iter()
            .all(|w| w.len <= 3 * 64 * KIB && w.offset % (64 * KIB) == 0)
    );
    assert_eq!(
        windows.iter().map(|w| w.len).sum::<u64>(),
        plan.data_clusters() * 64 * KIB
    );
    // Misaligned or unplanned windows are refused.
    let img = dir.path().join("y.qcow2");
    let w = Writer::create(&img, Plan::new(MIB, 16, [Extent::new(0, 10)]).unwrap()).unwrap();
    assert!(
        w.write_clusters(512, &ClusterBuf::zeroed(64 * 1024))
            .is_err()
    );
    assert!(w.write_clusters(0, &ClusterBuf::zeroed(1000)).is_err());
    assert!(
        w.write_clusters(0, &ClusterBuf::zeroed(128 * 1024))
            .is_err()
    );
    w.write_clusters(0, &ClusterBuf::zeroed(64 * 1024)).unwrap();
}

#[test]
fn an_image_with_no_data_matches_qemu_img_create() {
    let dir = tempfile::tempdir().unwrap();
    let size = MIB * 1024;
    write_and_check(dir.path(), size, f::DEFAULT_CLUSTER_BITS, &[], 2);
    let ours = dir.path().join("w2.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    let (ok, out) = qemu_img(&["create", "-q", "-f", "qcow2", p(&theirs), "1G"]);
    assert!(ok, "{out}");
    let (ok, out) = qemu_img(&["compare", p(&ours), p(&theirs)]);
    assert!(ok, "{out}");
    let info = |img: &Path| {
        let (ok, out) = qemu_img(&["info", "--output=json", p(img)]);
        assert!(ok, "{out}");
        let mut v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut specific = v["format-specific"].take();
        // qemu-img create also writes a feature name table, which is optional.
        specific["data"]
            .as_object_mut()
            .map(|o| o.remove("feature-name-table"));
        (v["virtual-size"].take(), v["cluster-size"].take(), specific)
    };
    assert_eq!(info(&ours), info(&theirs));
}

#[test]
fn small_clusters_span_many_l2_tables_refcount_blocks_and_a_multi_cluster_l1() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // 512-byte clusters: an L2 table maps 32 KiB, a refcount block counts 256 clusters, a
    // refcount table cluster names 64 blocks. 17 MiB fully written needs ~34,900 clusters:
    // 137 refcount blocks (a three-cluster refcount table), 544 L2 tables, 9 L1 clusters.
    let size = 17 * MIB;
    let pieces: Vec<(u64, Vec<u8>)> = (0..size / (64 * KIB))
        .map(|i| (i * 64 * KIB, random(&mut rng, 64 * KIB)))
        .collect();
    let plan = write_and_check(dir.path(), size, 9, &pieces, 3);
    assert!(plan.refcount_table_clusters > 2, "{plan:?}");
    assert!(plan.l1_clusters > 1);
}

#[test]
fn a_sparse_disk_larger_than_one_l2_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    // 64 KiB clusters: one L2 table maps 512 MiB. Data on both sides of the boundaries, one
    // segment across the first; the tables between hold nothing and are not allocated.
    let size = 3 * 1024 * MIB + 12345;
    let pieces = vec![
        (3, random(&mut rng, 5000)),
        (512 * MIB - 2000, random(&mut rng, 70 * KIB)),
        (2048 * MIB + 64 * KIB, random(&mut rng, 64 * KIB)),
        (size - 4096, random(&mut rng, 4096)),
    ];
    let plan = write_and_check(dir.path(), size, f::DEFAULT_CLUSTER_BITS, &pieces, 4);
    assert_eq!(plan.l2_indexes, vec![0, 1, 4, 6]);
}

#[test]
fn writes_outside_the_plan_and_bad_extents_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Plan::new(MIB, 16, [Extent::new(MIB - 10, 11)]),
        Err(Qcow2Error::NotPlanned { .. })
    ));
    assert!(matches!(
        Plan::new(MIB, 16, [Extent::new(512 * KIB, 1), Extent::new(0, 1)]),
        Err(Qcow2Error::Corrupt(_))
    ));
    assert!(matches!(
        Plan::new(MIB, 8, []),
        Err(Qcow2Error::Unsupported(_))
    ));
    let plan = Plan::new(MIB, 16, [Extent::new(100, 10)]).unwrap();
    let img = dir.path().join("x.qcow2");
    let w = Writer::create(&img, plan.clone()).unwrap();
    // The whole planned cluster may be written; the next one is not planned.
    w.write_at(0, &[1u8; 64 * 1024]).unwrap();
    assert!(matches!(
        w.write_at(64 * KIB - 1, &[1, 2]),
        Err(StorageError::Qcow2 {
            source: Qcow2Error::NotPlanned { offset, .. },
            ..
        }) if offset == 64 * KIB
    ));
    assert!(w.write_at(MIB - 1, &[1, 2]).is_err());
    drop(w);
    // An existing file is never overwritten.
    assert!(Writer::create(&img, plan).is_err());
}
