//! Backups beside garbage collection, on any store: shared by the engine tests (a local
//! directory) and the S3 tests. Included with `#[path]`.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_vault::imager::{self, BackupOptions, NoProgress, RestoreOptions};
use cairn_vault::maint::{GcOptions, GcPlan};
use cairn_vault::{LocalVault, Vault, VaultError};
use rand::{RngCore, SeedableRng};

/// An image of `len` bytes from three sources (`seed`, `seed + 1`, `seed + 2`), so that
/// images of nearby seeds share much of their data.
pub fn mixed_image(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, block) in v.chunks_mut(128 << 10).enumerate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + (i as u64 % 3) * 1000 + i as u64);
        rng.fill_bytes(block);
    }
    v
}

fn back_up(v: &LocalVault, dir: &Path, name: &str, img: &[u8]) -> cairn_vault::SnapshotManifest {
    let p = dir.join(format!("{name}.img"));
    std::fs::write(&p, img).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let opts = BackupOptions {
        name: name.into(),
        ..Default::default()
    };
    imager::backup(v, &f, &opts, &NoProgress).unwrap()
}

pub fn restored(v: &LocalVault, dir: &Path, id: &str) -> Vec<u8> {
    let out = dir.join(format!("restored-{id}.img"));
    imager::restore(v, id, &out, &RestoreOptions::default(), &NoProgress).unwrap();
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    b
}

/// Runs a GC, retrying while a forget (an exclusive lock) holds the repository.
fn gc_retrying(v: &LocalVault, opts: &GcOptions) -> GcPlan {
    let t0 = Instant::now();
    loop {
        match v.gc(opts) {
            Ok(p) => return p,
            Err(VaultError::Locked(m)) if t0.elapsed() < Duration::from_secs(60) => {
                let _ = m;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("gc failed: {e}"),
        }
    }
}

/// One thread backs up a stream of overlapping images and forgets the older snapshots
/// while the other collects garbage again and again. Every GC runs (none is refused for the
/// backups), every backup commits, every snapshot kept restores bit-exact, the repository
/// verifies, and a last GC with no backup running leaves nothing condemned.
pub fn backups_run_while_gc_runs(v: &LocalVault, dir: &Path, rounds: u64, len: usize) {
    let done = AtomicBool::new(false);
    let kept: Mutex<Vec<(String, Vec<u8>)>> = Mutex::new(Vec::new());
    let plans = std::thread::scope(|s| {
        let backups = s.spawn(|| {
            for i in 0..rounds {
                let img = mixed_image(len, i);
                let snap = back_up(v, dir, &format!("disk-{i}"), &img);
                let mut k = kept.lock().unwrap();
                k.push((snap.id.to_string(), img));
                // Keep the newest two: the older ones' data becomes garbage, and much of it
                // is what the next backup would deduplicate against.
                while k.len() > 2 {
                    let (id, _) = k.remove(0);
                    let t0 = Instant::now();
                    loop {
                        match v.forget(std::slice::from_ref(&id)) {
                            Ok(_) => break,
                            Err(VaultError::Locked(_))
                                if t0.elapsed() < Duration::from_secs(60) =>
                            {
                                std::thread::sleep(Duration::from_millis(20))
                            }
                            Err(e) => panic!("forget {id}: {e}"),
                        }
                    }
                }
            }
            done.store(true, Ordering::Release);
        });
        let mut plans = Vec::new();
        // Until the backups end (or one of them fails: its panic surfaces at the join).
        while !done.load(Ordering::Acquire) && !backups.is_finished() {
            plans.push(gc_retrying(v, &GcOptions::without_grace()));
        }
        backups.join().unwrap();
        plans
    });
    let deleted: usize = plans.iter().map(|p| p.deleted.len()).sum();
    let waited = plans.iter().filter(|p| p.waiting > 0).count();
    let revived: usize = plans.iter().map(|p| p.revived).sum();
    eprintln!(
        "{} GCs beside {rounds} backups: {deleted} containers deleted, {waited} GCs left some \
         waiting, {revived} revived",
        plans.len()
    );
    assert!(plans.len() >= 2, "GC ran beside the backups: {plans:?}");
    for (id, img) in kept.lock().unwrap().iter() {
        assert!(
            restored(v, dir, id) == *img,
            "snapshot {id} restores bit-exact"
        );
    }
    let report = v.verify(true).unwrap();
    assert!(report.ok(), "{report:?}");
    let last = gc_retrying(v, &GcOptions::without_grace());
    assert_eq!(
        last.waiting, 0,
        "nothing waits once no backup runs: {last:?}"
    );
    assert!(v.verify(true).unwrap().ok());
    for (id, img) in kept.lock().unwrap().iter() {
        assert!(
            restored(v, dir, id) == *img,
            "snapshot {id} restores after the last GC"
        );
    }
}
