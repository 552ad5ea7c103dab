//! Storage-agent benchmark on a reflink-capable file system (run by `bench/storage.sh`).
//!
//!   storage_bench MOUNT CORPUS_DIR OUT_JSON
//!
//! MOUNT is a mounted XFS (or btrfs) directory; CORPUS_DIR holds the shared corpus
//! (`img1.raw`, `day2.raw`, `day2.raw.changed`). It puts img1 on MOUNT as a VM disk, takes a
//! reflink storage-unit snapshot, backs it up in full to a local vault, applies the day-2
//! writes to the live disk, snapshots again and backs up incrementally from the FIEMAP diff
//! of the two clones, restores and checks the result; then times a FIEMAP diff of two clones
//! of a 10 GiB disk with 1% of it rewritten. Prints and writes one JSON object.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_storage::{
    AgentConfig, BackupRequest, ChangeHint, DatastoreConfig, ReflinkProvider, StorageAgent,
};
use cairn_vault::imager::{self, NoProgress, RestoreOptions};
use cairn_vault::{InitOptions, LocalVault, Repository};

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Flushes the set-up's dirty data (the copied image, the day-2 writes) so its writeback does
/// not land in the middle of a timed backup.
fn settle() {
    let ok = std::process::Command::new("sync")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "sync failed");
}

/// With `PERF_CTL=FIFO` (a `perf record --control fifo:FIFO -D -1` control pipe), profiling
/// is switched on for the incremental backup only.
fn perf_ctl(cmd: &str) {
    if let Some(p) = std::env::var_os("PERF_CTL") {
        std::fs::write(p, format!("{cmd}\n")).expect("perf control fifo");
    }
}

fn apply_changes(disk: &Path, day2: &Path, changed: &Path) -> u64 {
    let src = std::fs::File::open(day2).expect("day2");
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .expect("disk");
    let mut total = 0;
    for line in std::fs::read_to_string(changed)
        .expect("changed list")
        .lines()
    {
        let mut it = line
            .split_whitespace()
            .map(|v| v.parse::<u64>().expect("number"));
        let (off, len) = (it.next().expect("offset"), it.next().expect("length"));
        let mut buf = vec![0u8; len as usize];
        src.read_exact_at(&mut buf, off).expect("read day2");
        dst.write_all_at(&buf, off).expect("write disk");
        total += len;
    }
    dst.sync_all().expect("fsync");
    total
}

fn main() {
    // CAIRN_LOG=debug shows the phases of each backup with their times.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [mount, corpus, out] = &args[..] else {
        eprintln!("usage: storage_bench MOUNT CORPUS_DIR OUT_JSON");
        std::process::exit(2);
    };
    let ds = mount.join("datastore");
    let state = mount.join("agent-state");
    let _ = std::fs::remove_dir_all(&ds);
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&ds).unwrap();
    let disk = ds.join("vm-100.raw");
    let st = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(corpus.join("img1.raw"))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    let vault_dir = out.with_extension("vault");
    let _ = std::fs::remove_dir_all(&vault_dir);
    let vault = LocalVault {
        repo: Repository::init_dir(&vault_dir, &InitOptions::default()).unwrap(),
    };
    // The NBD runtime is the binary's to build (this one reads raw disks only, but the
    // agent needs one).
    let nbd_rt = cairn_storage::NbdRuntime::builder()
        .build()
        .expect("NBD runtime");
    let agent = StorageAgent::new(
        AgentConfig {
            datastores: vec![DatastoreConfig {
                name: "ds".into(),
                path: ds.clone(),
            }],
            state_dir: state,
            parallel: 2,
            vault_key_file: None,
        },
        cairn_storage::NbdRuntime::new([nbd_rt.handle().clone()]).expect("multi-thread runtime"),
    );

    settle();
    let t = Instant::now();
    let s1 = agent
        .snapshot(&ReflinkProvider, std::slice::from_ref(&disk), "day1")
        .unwrap();
    let snap1_s = secs(t);
    let t = Instant::now();
    let full = agent
        .backup_disk(
            &vault,
            &s1.disks[0],
            &BackupRequest {
                name: "vm-100".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let full_s = secs(t);

    let changed_bytes = apply_changes(
        &disk,
        &corpus.join("day2.raw"),
        &corpus.join("day2.raw.changed"),
    );
    settle();
    perf_ctl("enable");
    let t = Instant::now();
    let s2 = agent
        .snapshot(&ReflinkProvider, std::slice::from_ref(&disk), "day2")
        .unwrap();
    let snap2_s = secs(t);
    let t = Instant::now();
    let incr = agent
        .backup_disk(
            &vault,
            &s2.disks[0],
            &BackupRequest {
                name: "vm-100".into(),
                parent: Some("vm-100".into()),
                hints: vec![ChangeHint::ExtentMap {
                    previous: s1.disks[0].image.clone(),
                }],
                ..Default::default()
            },
        )
        .unwrap();
    let incr_s = secs(t);
    perf_ctl("disable");

    let restored = out.with_extension("restored.raw");
    imager::restore(
        &vault,
        &incr.manifest.id.to_string(),
        &restored,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let exact = std::process::Command::new("cmp")
        .arg("-s")
        .arg(&restored)
        .arg(corpus.join("day2.raw"))
        .status()
        .unwrap()
        .success();
    let _ = std::fs::remove_file(&restored);

    // FIEMAP diff of a 10 GiB disk with 1% of its 4 KiB blocks rewritten (skipped with
    // STORAGE_BENCH_QUICK=1, for quick iterations on the incremental).
    let quick = std::env::var_os("STORAGE_BENCH_QUICK").is_some();
    let big = ds.join("big.raw");
    let size: u64 = if quick { 64 << 20 } else { 10 << 30 };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&big)
        .unwrap();
    // Allocate real extents (written, not just reserved) in 64 MiB strides of data.
    let block = vec![0x5au8; 64 << 20];
    let mut off = 0;
    while off < size {
        f.write_all_at(&block, off).unwrap();
        off += block.len() as u64;
    }
    f.sync_all().unwrap();
    let c1 = agent
        .snapshot(&ReflinkProvider, std::slice::from_ref(&big), "big1")
        .unwrap();
    let blocks = size / 4096;
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut rewritten = 0u64;
    for _ in 0..blocks / 100 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        f.write_all_at(&[0xa5u8; 4096], (rng % blocks) * 4096)
            .unwrap();
        rewritten += 4096;
    }
    f.sync_all().unwrap();
    let c2 = agent
        .snapshot(&ReflinkProvider, std::slice::from_ref(&big), "big2")
        .unwrap();
    let t = Instant::now();
    let diff =
        cairn_storage::tracker::extent_map_changes(&c1.disks[0].image, &c2.disks[0].image, size)
            .unwrap();
    let diff_s = secs(t);
    for s in [&c1, &c2, &s1, &s2] {
        agent.delete_snapshot(&s.id).unwrap();
    }
    let _ = std::fs::remove_file(&big);

    let r = serde_json::json!({
        "image_bytes": full.manifest.size,
        "reflink_snapshot_s": [snap1_s, snap2_s],
        "full_backup_s": full_s,
        "full_bytes_read": full.bytes_read,
        "full_bytes_stored": full.manifest.stats.bytes_stored,
        "incremental_s": incr_s,
        "incremental_change_source": incr.change_source.as_str(),
        "changed_bytes_written": changed_bytes,
        "tracker_changed_bytes": incr.changed_bytes,
        "incremental_bytes_read": incr.bytes_read,
        "incremental_bytes_sent": incr.bytes_sent,
        "incremental_bytes_stored": incr.manifest.stats.bytes_stored,
        "incremental_fallbacks": incr.fallbacks,
        "restore_bit_exact": exact,
        "fiemap_disk_bytes": size,
        "fiemap_rewritten_bytes": rewritten,
        "fiemap_diff_s": diff_s,
        "fiemap_changed_bytes": diff.total_bytes(),
        "fiemap_changed_extents": diff.len(),
    });
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    std::fs::write(out, serde_json::to_vec_pretty(&r).unwrap()).unwrap();
}
