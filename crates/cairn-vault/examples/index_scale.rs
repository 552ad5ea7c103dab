//! The fingerprint index at scale: builds an index of N entries (default 10^8) in runs of
//! R (default 10^7), as backups do (one container of 256 records at a time, a run per flush),
//! then measures what stays in memory and how fast lookups go.
//!
//! ```sh
//! cargo run --release -p cairn-vault --example index_scale -- [N] [R] [DIR]
//! ```
//!
//! Lookups, each over a fresh batch of digests: absent ones (new data, what most of a backup's
//! questions are), present ones one at a time (a reader), and present ones in sorted batches of
//! 4096 (what `lacking`/`locate_many` do). The page cache is dropped before the present
//! lookups when run as root, so the first figure is a cold cache.

use std::time::Instant;

use cairn_chunk::Codec;
use cairn_chunk::container::Record;
use cairn_chunk::format::BlobKind;
use cairn_types::{ContainerId, Digest};
use cairn_vault::index::Index;
use rand::{RngCore, SeedableRng};

const PER_CONTAINER: usize = 256;

fn digest(rng: &mut rand::rngs::StdRng) -> Digest {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    Digest(b)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000_000);
    let per_run: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let dir = std::path::PathBuf::from(
        args.get(3)
            .cloned()
            .unwrap_or_else(|| "/var/tmp/cairn-index-scale".into()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let mut ix = Index::open(&dir).expect("open index");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    let mut added = 0usize;
    let mut records = Vec::with_capacity(PER_CONTAINER);
    while added < n {
        records.clear();
        for i in 0..PER_CONTAINER.min(n - added) {
            records.push(Record {
                digest: digest(&mut rng),
                offset: (i * 4096) as u64,
                stored_len: 4096,
                frame_len: 4096,
                inner: 0,
                raw_len: 4096,
                kind: BlobKind::Data,
                codec: Codec::Raw,
            });
        }
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        ix.add_container(ContainerId(id), &records);
        added += records.len();
        if ix.pending_len() >= per_run || added == n {
            ix.flush().expect("flush");
            eprint!(
                "\r{added} entries, {} runs, {:.0} s",
                ix.run_count(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let build = t0.elapsed().as_secs_f64();
    drop(ix);
    let t1 = Instant::now();
    let ix = Index::open(&dir).expect("reopen");
    let open = t1.elapsed().as_secs_f64();
    let resident = ix.resident_bytes();
    let disk: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "\n{n} entries in {} runs: built in {build:.1} s ({:.2} M entries/s), reopened in {open:.2} s",
        ix.run_count(),
        n as f64 / build / 1e6
    );
    println!(
        "in memory (bloom filters, fences, container ids) {resident} B = {:.2} B/entry; process RSS {} MiB; on disk {:.1} GB = {:.1} B/entry",
        resident as f64 / n as f64,
        rss_kib() / 1024,
        disk as f64 / 1e9,
        disk as f64 / n as f64
    );

    // Absent digests: the bloom filters answer.
    let mut other = rand::rngs::StdRng::seed_from_u64(99);
    let absent: Vec<Digest> = (0..1_000_000).map(|_| digest(&mut other)).collect();
    let t = Instant::now();
    let mut found = 0;
    for d in &absent {
        found += usize::from(ix.contains(d).expect("lookup"));
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "absent, one at a time: {:.2} M lookups/s ({found} found of {})",
        absent.len() as f64 / s / 1e6,
        absent.len()
    );

    // Present digests: regenerate a sample of the inserted ones (same seed, same order).
    let mut again = rand::rngs::StdRng::seed_from_u64(1);
    let mut present = Vec::new();
    let stride = (n / 200_000).max(1);
    let mut k = 0usize;
    'outer: while k < n {
        for _ in 0..PER_CONTAINER.min(n - k) {
            let d = digest(&mut again);
            if k.is_multiple_of(stride) {
                present.push(d);
                if present.len() == 200_000 {
                    break 'outer;
                }
            }
            k += 1;
        }
        let mut id = [0u8; 16];
        again.fill_bytes(&mut id);
    }
    let _ = std::process::Command::new("sh")
        .args(["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        .status();
    let cold: Vec<Digest> = present.iter().take(20_000).copied().collect();
    let t = Instant::now();
    for d in &cold {
        assert!(
            ix.get(d).expect("lookup").is_some(),
            "an inserted digest is found"
        );
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "present, one at a time, cold cache: {:.0} lookups/s ({} lookups)",
        cold.len() as f64 / s,
        cold.len()
    );
    let warm = &present[20_000..];
    let t = Instant::now();
    for d in warm {
        assert!(ix.get(d).expect("lookup").is_some());
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "present, one at a time, after the first: {:.0} lookups/s ({} lookups)",
        warm.len() as f64 / s,
        warm.len()
    );
    let t = Instant::now();
    let mut hits = 0;
    for batch in present.chunks(4096) {
        hits += ix
            .get_many(batch)
            .expect("lookup")
            .iter()
            .filter(|l| l.is_some())
            .count();
    }
    let s = t.elapsed().as_secs_f64();
    assert_eq!(hits, present.len());
    println!(
        "present, batches of 4096: {:.0} lookups/s ({} lookups)",
        present.len() as f64 / s,
        present.len()
    );
}
