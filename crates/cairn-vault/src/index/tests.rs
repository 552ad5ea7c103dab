//! Tests of the index: runs, lookups, damage.
use super::*;

fn digest(i: u64) -> Digest {
    cairn_chunk::fingerprint(&i.to_le_bytes())
}

fn rec(i: u64) -> Record {
    Record {
        digest: digest(i),
        offset: 8 + i,
        stored_len: 10,
        frame_len: 60,
        inner: 20,
        raw_len: 20,
        kind: BlobKind::Data,
        codec: Codec::Raw,
    }
}

#[test]
fn lookups_survive_flush_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c1 = ContainerId::random();
    let c2 = ContainerId::random();
    let mut ix = Index::open(dir.path()).unwrap();
    let recs1: Vec<_> = (0..5000).map(rec).collect();
    ix.add_container(c1, &recs1);
    assert!(ix.contains(&digest(42)).unwrap());
    ix.flush().unwrap();
    ix.add_container(c2, &(5000..6000).map(rec).collect::<Vec<_>>());
    ix.flush().unwrap();
    drop(ix);
    let ix = Index::open(dir.path()).unwrap();
    assert!(ix.covers(&c1) && ix.covers(&c2));
    for i in (0..6000).step_by(7) {
        let l = ix.get(&digest(i)).unwrap().expect("present");
        assert_eq!(l.offset, 8 + u32::try_from(i).unwrap());
        assert_eq!((l.frame_len, l.inner, l.raw_len), (60, 20, 20));
        assert_eq!(l.container, if i < 5000 { c1 } else { c2 });
    }
    let misses = (10_000..20_000)
        .filter(|&i| ix.contains(&digest(i)).unwrap())
        .count();
    assert_eq!(misses, 0);
}

#[test]
fn get_many_agrees_with_get() {
    let dir = tempfile::tempdir().unwrap();
    let mut ix = Index::open(dir.path()).unwrap();
    // Three runs and some pending entries; the batch mixes hits, misses and duplicates
    // in no particular order.
    for (a, b) in [(0u64, 20_000u64), (20_000, 20_100), (20_100, 30_000)] {
        ix.add_container(ContainerId::random(), &(a..b).map(rec).collect::<Vec<_>>());
        ix.flush().unwrap();
    }
    ix.add_container(
        ContainerId::random(),
        &(30_000..30_050).map(rec).collect::<Vec<_>>(),
    );
    let mut want: Vec<Digest> = (0..40_000u64).rev().step_by(3).map(digest).collect();
    want.extend([digest(5), digest(5), digest(30_010), digest(99_999)]);
    let got = ix.get_many(&want).unwrap();
    assert_eq!(got.len(), want.len());
    for (d, g) in want.iter().zip(&got) {
        assert_eq!(*g, ix.get(d).unwrap());
    }
    assert_eq!(got.iter().filter(|g| g.is_some()).count(), 10_017 + 3);
    assert!(ix.get_many(&[]).unwrap().is_empty());
}

#[test]
fn rewrite_drops_removed_containers_and_damaged_runs_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (c1, c2) = (ContainerId::random(), ContainerId::random());
    let mut ix = Index::open(dir.path()).unwrap();
    ix.add_container(c1, &(0..100).map(rec).collect::<Vec<_>>());
    ix.flush().unwrap();
    ix.add_container(c2, &(100..200).map(rec).collect::<Vec<_>>());
    ix.rewrite(&[c1].into_iter().collect()).unwrap();
    assert_eq!(ix.run_count(), 1);
    assert!(!ix.contains(&digest(5)).unwrap());
    assert!(ix.contains(&digest(150)).unwrap());
    assert!(!ix.covers(&c1));
    // Truncate the run: reopening drops it instead of failing.
    let run = fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let len = fs::metadata(&run).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&run)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let ix = Index::open(dir.path()).unwrap();
    assert_eq!(ix.run_count(), 0);
    assert!(!ix.covers(&c2));
}
