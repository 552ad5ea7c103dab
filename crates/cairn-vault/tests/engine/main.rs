//! End-to-end tests of the vault engine on a local directory repository.

use std::path::Path;

use cairn_types::{Extent, ExtentList};
use cairn_vault::imager::{self, BackupOptions, NoProgress, RestoreOptions};
use cairn_vault::maint::{GcOptions, GcPlan, PruneOptions};
use cairn_vault::{InitOptions, LocalVault, Repository, Vault};
use rand::{RngCore, SeedableRng};

mod beside_gc;
mod damage;
mod encrypted;
mod flips;
mod retention;

fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    // Random data, text-like data and zero runs.
    for (i, block) in v.chunks_mut(256 << 10).enumerate() {
        match i % 4 {
            0 => rng.fill_bytes(block),
            1 => block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"the quick brown fox "[j % 20]),
            2 => {}
            _ => {
                rng.fill_bytes(block);
                block[..1000].fill(0);
            }
        }
    }
    v
}

fn vault(dir: &Path) -> LocalVault {
    LocalVault {
        repo: Repository::init_dir(&dir.join("repo"), &InitOptions::default()).unwrap(),
    }
}

fn backup(
    v: &LocalVault,
    img: &[u8],
    dir: &Path,
    name: &str,
    parent: Option<&str>,
    changed: Option<ExtentList>,
) -> cairn_vault::SnapshotManifest {
    let p = dir.join(format!("{name}.img"));
    std::fs::write(&p, img).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let opts = BackupOptions {
        name: name.into(),
        parent: parent.map(Into::into),
        changed,
        ..Default::default()
    };
    imager::backup(v, &f, &opts, &NoProgress).unwrap()
}

fn restore(v: &LocalVault, spec: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("restored.img");
    imager::restore(v, spec, &out, &RestoreOptions::default(), &NoProgress).unwrap();
    std::fs::read(out).unwrap()
}

#[test]
fn full_backup_restores_bit_exact_and_dedups() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(8 << 20, 1);
    let s1 = backup(&v, &img, dir.path(), "disk0", None, None);
    assert_eq!(s1.size, img.len() as u64);
    assert!(
        s1.stats.zero_bytes >= 1 << 20,
        "zero regions are holes: {:?}",
        s1.stats
    );
    assert!(s1.stats.bytes_new > 0 && s1.stats.bytes_stored > 0);
    assert_eq!(restore(&v, &s1.id.to_string(), dir.path()), img);
    // Same image again: nothing new.
    let s2 = backup(&v, &img, dir.path(), "disk0", None, None);
    assert_eq!(s2.stats.bytes_new, 0);
    assert_eq!(s2.root, s1.root, "identical images give identical recipes");
    assert_eq!(
        v.find("disk0").unwrap().id,
        s2.id,
        "a name finds the newest snapshot, even within one second"
    );
    // Restored output is sparse where the image had zeros.
    let out = dir.path().join("restored.img");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&out).unwrap();
    assert!(md.blocks() * 512 < md.len(), "restored file is sparse");
}

#[test]
fn incremental_with_changed_extents_is_a_synthetic_full() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(8 << 20, 2);
    let s1 = backup(&v, &img, dir.path(), "disk0", None, None);
    let mut img2 = img.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut changes = Vec::new();
    for k in 0..20u64 {
        let off = (k * 397_000 + 12_345) % (img.len() as u64 - 4096);
        let off = off / 4096 * 4096;
        rng.fill_bytes(&mut img2[off as usize..off as usize + 4096]);
        changes.push(Extent::new(off, 4096));
    }
    let s2 = incremental_matching_full(&v, dir.path(), &s1, &img2, changes);
    assert!(
        s2.stats.bytes_read < 4 << 20,
        "reads only around changes: {}",
        s2.stats.bytes_read
    );
    assert!(
        s2.stats.bytes_new <= 20 * 4 * 65536,
        "new bytes {}",
        s2.stats.bytes_new
    );
    assert_eq!(s2.parent, Some(s1.id));
    assert_eq!(restore(&v, &s1.id.to_string(), dir.path()), img);
}

/// Backs `img2` up as an incremental of `parent` given the `changes`, checks that it restores
/// to `img2` and that a full backup of `img2` yields the same recipe (the incremental cut
/// exactly where a full does); returns the incremental.
fn incremental_matching_full(
    v: &LocalVault,
    dir: &Path,
    parent: &cairn_vault::SnapshotManifest,
    img2: &[u8],
    changes: Vec<Extent>,
) -> cairn_vault::SnapshotManifest {
    let s2 = backup(
        v,
        img2,
        dir,
        "disk0",
        Some(&parent.id.to_string()),
        Some(ExtentList::from_unsorted(changes)),
    );
    assert_eq!(restore(v, &s2.id.to_string(), dir), img2);
    let full = backup(v, img2, dir, "disk0-full", None, None);
    assert_eq!(
        full.root, s2.root,
        "the incremental cut exactly where a full does"
    );
    s2
}

#[test]
fn incremental_with_large_and_adjacent_extents_matches_a_full() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(12 << 20, 5);
    let s1 = backup(&v, &img, dir.path(), "disk0", None, None);
    let mut img2 = img.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // A 3 MiB rewrite (several reads of at most 1 MiB), two touching extents, one block
    // zeroed inside data, and a change in the last bytes of the image.
    let edits: [(usize, usize, bool); 5] = [
        ((1 << 20) + 100, 3 << 20, false),
        (6 << 20, 4096, false),
        ((6 << 20) + 4096, 8192, false),
        (9 << 20, 4096, true),
        ((12 << 20) - 4096, 4096, false),
    ];
    let changes = edits
        .into_iter()
        .map(|(off, len, zero)| edit(&mut img2, &mut rng, off, len, zero))
        .collect();
    incremental_matching_full(&v, dir.path(), &s1, &img2, changes);
}

/// Overwrites `img[off..off + len]` with zeros or random bytes; returns the changed extent.
fn edit(img: &mut [u8], rng: &mut impl RngCore, off: usize, len: usize, zero: bool) -> Extent {
    if zero {
        img[off..off + len].fill(0);
    } else {
        rng.fill_bytes(&mut img[off..off + len]);
    }
    Extent::new(off as u64, len as u64)
}

#[test]
fn incremental_handles_growth_and_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(3 << 20, 3);
    let s1 = backup(&v, &img, dir.path(), "d", None, None);
    let mut grown = img.clone();
    grown.extend(image(1 << 20, 4));
    let s2 = backup(
        &v,
        &grown,
        dir.path(),
        "d",
        Some(&s1.id.to_string()),
        Some(ExtentList::default()),
    );
    assert_eq!(restore(&v, &s2.id.to_string(), dir.path()), grown);
    let shrunk = img[..(2 << 20) + 777].to_vec();
    let s3 = backup(
        &v,
        &shrunk,
        dir.path(),
        "d",
        Some(&s1.id.to_string()),
        Some(ExtentList::default()),
    );
    assert_eq!(restore(&v, &s3.id.to_string(), dir.path()), shrunk);
    let empty = Vec::new();
    let s4 = backup(&v, &empty, dir.path(), "e", None, None);
    assert_eq!(restore(&v, &s4.id.to_string(), dir.path()), empty);
}

#[test]
fn fixed_size_segmentation_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(2 << 20, 5);
    let p = dir.path().join("x.img");
    std::fs::write(&p, &img).unwrap();
    let opts = BackupOptions {
        name: "fixed".into(),
        chunker: Some(cairn_chunk::ChunkerParams::Fixed { size: 4096 }),
        ..Default::default()
    };
    let s = imager::backup(&v, &std::fs::File::open(&p).unwrap(), &opts, &NoProgress).unwrap();
    assert_eq!(s.root.entries, 512);
    assert_eq!(restore(&v, "fixed", dir.path()), img);
}

fn flip_byte_in_a_container(repo_dir: &Path) {
    let mut files: Vec<_> = walk(&repo_dir.join("containers"));
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let big = files.last().unwrap();
    let mut b = std::fs::read(big).unwrap();
    b[5000] ^= 0xff;
    std::fs::write(big, b).unwrap();
}

fn walk(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

#[test]
fn corruption_is_found_by_verify_and_fails_restore_with_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(4 << 20, 6);
    let s1 = backup(&v, &img, dir.path(), "victim", None, None);
    assert!(v.verify(true).unwrap().ok());
    flip_byte_in_a_container(&dir.path().join("repo"));
    let rep = v.verify(true).unwrap();
    assert!(!rep.ok());
    assert_eq!(
        rep.damaged_snapshots,
        vec![(s1.id.to_string(), "victim".to_string())]
    );
    let out = dir.path().join("out.img");
    let err = imager::restore(&v, "victim", &out, &RestoreOptions::default(), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot restore image bytes"), "{err}");
    assert!(!out.exists(), "a failed restore leaves no output");
}

#[test]
fn gc_frees_forgotten_data_and_keeps_live_data() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let a = image(4 << 20, 7);
    let b = image(4 << 20, 8);
    backup(&v, &a, dir.path(), "a", None, None);
    let sb = backup(&v, &b, dir.path(), "b", None, None);
    let plan = v.gc(&GcOptions::dry_run()).unwrap();
    assert!(plan.delete.is_empty() && plan.repack.is_empty() && !plan.executed);
    let plan = forget_a_and_gc(&v, dir.path(), &sb.id.to_string(), &b);
    assert!(
        !(plan.delete.is_empty() && plan.repack.is_empty()),
        "{plan:?}"
    );
}

/// Forgets snapshot "a", runs GC, and checks that the repository verifies and `keep`
/// restores to `want`, also after reopening (the index matches the store).
fn forget_a_and_gc(v: &LocalVault, dir: &Path, keep: &str, want: &[u8]) -> GcPlan {
    v.repo.forget(&v.find("a").unwrap().id).unwrap();
    let plan = v.gc(&GcOptions::run()).unwrap();
    assert!(plan.executed, "{plan:?}");
    assert!(v.verify(true).unwrap().ok());
    assert_eq!(restore(v, keep, dir), want);
    let v2 = LocalVault {
        repo: Repository::open_dir(&dir.join("repo")).unwrap(),
    };
    assert_eq!(restore(&v2, keep, dir), want);
    plan
}

#[test]
fn prune_keeps_last_n_per_name() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(1 << 20, 9);
    for _ in 0..4 {
        backup(&v, &img, dir.path(), "x", None, None);
    }
    backup(&v, &img, dir.path(), "y", None, None);
    let plan = v
        .prune(
            &PruneOptions {
                keep_last: 2,
                ..Default::default()
            },
            true,
        )
        .unwrap();
    assert_eq!(plan.forget.len(), 2);
    assert_eq!(plan.keep.len(), 3);
    assert_eq!(v.list().unwrap().len(), 5, "dry run forgets nothing");
    v.prune(
        &PruneOptions {
            keep_last: 2,
            ..Default::default()
        },
        false,
    )
    .unwrap();
    assert_eq!(v.list().unwrap().len(), 3);
}

#[test]
fn index_is_rebuilt_from_containers() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(4 << 20, 10);
    backup(&v, &img, dir.path(), "a", None, None);
    drop(v);
    std::fs::remove_dir_all(dir.path().join("repo/index")).unwrap();
    let v = LocalVault {
        repo: Repository::open_dir(&dir.path().join("repo")).unwrap(),
    };
    let s = backup(&v, &img, dir.path(), "a2", None, None);
    assert_eq!(s.stats.bytes_new, 0, "dedup works after an index rebuild");
    assert_eq!(restore(&v, "a", dir.path()), img);
}

/// Compressible data with no repeats: letters from a 16-letter alphabet (4 bits a byte).
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v.iter_mut().for_each(|b| *b = b'a' + (*b & 15));
    v
}

/// Records of every container, with the container's id.
fn all_records(v: &LocalVault) -> Vec<cairn_chunk::container::Record> {
    let mut out = Vec::new();
    for (c, _) in v.repo.list_containers().unwrap() {
        out.extend(v.repo.container_records(&c).unwrap());
    }
    out
}

#[test]
fn neighbouring_segments_share_frames_and_gc_keeps_partly_live_frames_whole() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let x = text(4 << 20, 21);
    backup(&v, &x, dir.path(), "a", None, None);
    let recs = all_records(&v);
    let shared = recs.iter().filter(|r| !r.member().is_whole()).count();
    assert!(
        shared > recs.len() / 2,
        "most segments sit in frames with neighbours ({shared} of {})",
        recs.len()
    );
    let frame_max = recs.iter().map(|r| r.frame_len).max().unwrap() as usize;
    let target = cairn_chunk::format::FRAME_TARGET_LEN;
    assert!((target..2 * target).contains(&frame_max), "{frame_max}");
    assert_eq!(restore(&v, "a", dir.path()), x);

    // b keeps a's first 600 KiB: the frame across that point is left partly live once a is
    // forgotten, and a's container mostly dead, so GC repacks it.
    let mut y = x[..600 << 10].to_vec();
    y.extend_from_slice(&text((4 << 20) - (600 << 10), 22));
    backup(&v, &y, dir.path(), "b", None, None);
    let plan = forget_a_and_gc(&v, dir.path(), "b", &y);
    assert!(!plan.repack.is_empty(), "{plan:?}");
}

#[test]
fn a_damaged_frame_fails_the_members_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let x = text(2 << 20, 23);
    let s = backup(&v, &x, dir.path(), "t", None, None);
    flip_byte_in_a_container(&dir.path().join("repo"));
    let rep = v.verify(true).unwrap();
    assert_eq!(
        rep.damaged_snapshots,
        vec![(s.id.to_string(), "t".to_string())]
    );
    // The flipped byte lies in one frame of the largest container: the members whose bytes it
    // changed are reported, each on its own hash (members it left intact stay readable).
    let (big, _) = v
        .repo
        .list_containers()
        .unwrap()
        .into_iter()
        .max_by_key(|c| c.1)
        .unwrap();
    let recs = v.repo.container_records(&big).unwrap();
    let hit = recs
        .iter()
        .find(|r| r.offset <= 5000 && 5000 < r.offset + u64::from(r.stored_len))
        .expect("a frame holds byte 5000");
    let members: Vec<_> = recs
        .iter()
        .filter(|r| r.offset == hit.offset)
        .map(|r| r.digest)
        .collect();
    let damaged = &rep.damaged_segments;
    assert!(
        members.len() > 1 && !damaged.is_empty(),
        "{members:?} {damaged:?}"
    );
    assert!(
        damaged.iter().all(|d| members.contains(d)),
        "damage outside the frame"
    );
    let out = dir.path().join("out.img");
    assert!(imager::restore(&v, "t", &out, &RestoreOptions::default(), &NoProgress).is_err());
}

#[test]
fn restore_refuses_to_replace_what_is_not_a_file_or_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    backup(&v, &image(1 << 20, 30), dir.path(), "x", None, None);
    let sub = dir.path().join("a-directory");
    std::fs::create_dir(&sub).unwrap();
    let fifo = dir.path().join("a-fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    let mut targets = vec![sub];
    if made.is_ok_and(|s| s.success()) {
        targets.push(fifo);
    }
    for t in &targets {
        let e = imager::restore(&v, "x", t, &RestoreOptions::default(), &NoProgress)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("neither a regular file nor a block device"),
            "{e}"
        );
        let kind = std::fs::symlink_metadata(t).unwrap().file_type();
        assert!(!kind.is_file(), "{} was replaced", t.display());
    }
    // A regular file is replaced as before.
    let f = dir.path().join("old.img");
    std::fs::write(&f, b"old").unwrap();
    imager::restore(&v, "x", &f, &RestoreOptions::default(), &NoProgress).unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), image(1 << 20, 30));
}

#[test]
fn an_empty_frame_is_refused_and_the_session_goes_on() {
    use cairn_chunk::format::BlobKind;
    use cairn_chunk::{EncodedSegment, fingerprint};
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let s = cairn_vault::BackupSession::begin(v.repo.clone(), "test").unwrap();
    // An empty segment hashes correctly, but as a frame of no bytes it would share its
    // offset with the next frame in the container.
    let empty = [(fingerprint(b""), 0)];
    let e = s
        .put_verified(BlobKind::Data, &empty, &EncodedSegment::raw(b""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty frame"), "{e}");
    let data = b"one segment".to_vec();
    let one = [(fingerprint(&data), data.len() as u32)];
    assert!(
        s.put_verified(BlobKind::Data, &one, &EncodedSegment::raw(&data))
            .unwrap()
    );
    assert_eq!(s.lacking(&[one[0].0, empty[0].0]).unwrap(), [false, true]);
}

/// Many small scattered edits, some of them aligned zero blocks: each re-chunked region ends
/// wherever the cuts realign (at the first parent boundary past the change, or later), and the
/// incremental reads only up to boundaries it aims for; its recipe must still be a full's.
/// (A zero block written just after a parent cut once moved that cut without the incremental
/// noticing: the restore was exact, the recipe was not a full's.)
#[test]
fn scattered_small_edits_match_a_full() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let mut img = text(6 << 20, 21);
    // Some zero runs in the parent, so that edits near them change zero segments too.
    for k in 0..6 {
        img[(k << 20) + (256 << 10)..(k << 20) + (320 << 10)].fill(0);
    }
    let s1 = backup(&v, &img, dir.path(), "disk0", None, None);
    for seed in [99, 7, 2024] {
        let mut img2 = img.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut changes = Vec::new();
        for i in 0..300 {
            let len = 1 + (rng.next_u32() as usize % 6000);
            let off = rng.next_u32() as usize % (img2.len() - len);
            // Every seventh edit is an aligned zero block.
            changes.push(if i % 7 == 0 {
                edit(&mut img2, &mut rng, off / 4096 * 4096, 4096, true)
            } else {
                edit(&mut img2, &mut rng, off, len, false)
            });
        }
        incremental_matching_full(&v, dir.path(), &s1, &img2, changes);
    }
}

/// A commit checks that every segment a new leaf names is stored, whether the leaf came
/// before its data (checked at commit) or after it (checked when the leaf was uploaded).
#[test]
fn a_leaf_naming_a_missing_segment_fails_the_commit() {
    use cairn_chunk::format::BlobKind;
    use cairn_chunk::recipe::{Node, TreeRoot};
    use cairn_chunk::{EncodedSegment, Entry, fingerprint};
    use cairn_vault::Upload;
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let data = b"a stored segment".to_vec();
    let stored = fingerprint(&data);
    let upload_data = |s: &dyn cairn_vault::VaultSession| {
        s.upload(vec![Upload::single(
            stored,
            BlobKind::Data,
            data.len() as u32,
            EncodedSegment::raw(&data),
        )])
        .unwrap();
    };
    let commit = |s: Box<dyn cairn_vault::VaultSession>, entries: Vec<Entry>, leaf_first: bool| {
        let bytes = Node::Leaf(entries.clone()).encode();
        let digest = fingerprint(&bytes);
        let node = Upload::single(
            digest,
            BlobKind::Tree,
            bytes.len() as u32,
            EncodedSegment::raw(&bytes),
        );
        if leaf_first {
            s.upload(vec![node]).unwrap();
            upload_data(&*s);
        } else {
            upload_data(&*s);
            s.upload(vec![node]).unwrap();
        }
        s.commit(cairn_vault::CommitRequest {
            name: "t".into(),
            root: Some(TreeRoot {
                digest,
                level: 0,
                size: entries.iter().map(|e| u64::from(e.len)).sum(),
                entries: entries.len() as u64,
            }),
            ..Default::default()
        })
        .map_err(|e| e.to_string())
    };
    let good = vec![Entry::data(stored, data.len() as u32)];
    let bad = vec![
        Entry::data(stored, data.len() as u32),
        Entry::data(fingerprint(b"never uploaded"), 14),
    ];
    for leaf_first in [false, true] {
        commit(v.begin("t").unwrap(), good.clone(), leaf_first).unwrap();
        let e = commit(v.begin("t").unwrap(), bad.clone(), leaf_first).unwrap_err();
        assert!(e.contains("never uploaded"), "{e}");
    }
}
