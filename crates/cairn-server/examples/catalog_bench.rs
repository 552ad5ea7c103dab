//! File catalog benchmark on a disk image (the benchmark corpus: 1 GiB ext4, ~15,000 files):
//! indexing through the storage agent's scan of a vault snapshot, and restoring one ~10 MiB
//! file reading only its segments.
//!
//!   cargo run --release -p cairn-server --example catalog_bench -- IMAGE [WORKDIR]
//!
//! Backs IMAGE up into WORKDIR/repo once (not timed), then three times: scan (parse the file
//! system from the vault) + add to a fresh file index; restore the file closest to 10 MiB and
//! compare it with the same file read from IMAGE directly. Prints one JSON line per run.
//! With `CATALOG_BENCH_REMOTE=1` the scans and the restore read through a vault service on
//! loopback (HTTPS), as a storage agent does when the vault runs on its own.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use cairn_storage::{AgentConfig, StorageAgent};
use cairn_vault::imager::{self, BackupOptions, NoProgress};
use cairn_vault::{LocalVault, Repository, Vault};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let image = args.get(1).expect("usage: catalog_bench IMAGE [WORKDIR]");
    let work =
        std::path::PathBuf::from(args.get(2).cloned().unwrap_or("/tmp/catalog-bench".into()));
    let repo_dir = work.join("repo");
    let repo = if repo_dir.join("config").exists() {
        Repository::open_dir(&repo_dir).unwrap()
    } else {
        Repository::init_dir(&repo_dir, &Default::default()).unwrap()
    };
    let vault: Arc<dyn Vault> = Arc::new(LocalVault { repo });
    let snap = match vault.find("corpus") {
        Ok(m) => m,
        Err(_) => {
            let f = std::fs::File::open(image).unwrap();
            imager::backup(
                &*vault,
                &f,
                &BackupOptions {
                    name: "corpus".into(),
                    ..Default::default()
                },
                &NoProgress,
            )
            .unwrap()
        }
    };
    let _service_rt;
    let vault: Arc<dyn Vault> = if std::env::var("CATALOG_BENCH_REMOTE").is_ok_and(|v| v == "1") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tls_dir = work.join("tls");
        let (id, fp) = cairn_http::tls::ensure_self_signed(&tls_dir, &[]).unwrap();
        let tls = cairn_http::tls::server_config(&id).unwrap();
        let repo = Repository::open_dir(&repo_dir).unwrap();
        let service = cairn_vault::service::VaultService::new(repo);
        let (addr, _) = rt
            .block_on(cairn_vault::service::serve(
                service,
                "127.0.0.1:0".parse().unwrap(),
                tls,
                "bench".into(),
            ))
            .unwrap();
        _service_rt = Some(rt);
        let remote = cairn_vault::remote::RemoteVault::connect(
            &format!("https://{addr}"),
            "bench",
            &cairn_http::Trust::Fingerprint(fp),
        )
        .unwrap();
        Arc::new(remote)
    } else {
        _service_rt = None;
        vault
    };
    // The agent's NBD runtime (a binary builds it; file scans read the vault, not NBD).
    let nbd_rt = cairn_storage::NbdRuntime::builder()
        .build()
        .expect("NBD runtime");
    let agent = StorageAgent::new(
        AgentConfig::default(),
        cairn_storage::NbdRuntime::new([nbd_rt.handle().clone()]).expect("multi-thread runtime"),
    );
    for run in 0..3 {
        // Evict the repository from the page cache? No: a vault keeps hot metadata cached
        // too; runs after the first show the warm case, the first one the cold-ish case.
        let dir = work.join(format!("index-{run}"));
        let _ = std::fs::remove_dir_all(&dir);
        let t = Instant::now();
        let scan = agent
            .scan_files(Arc::clone(&vault), &snap.id.to_string())
            .unwrap();
        let scan_s = t.elapsed().as_secs_f64();
        let files: usize = scan.volumes.iter().map(|v| v.files.len()).sum();
        let index = cairn_fileindex::FileIndex::open(&dir).unwrap();
        let t2 = Instant::now();
        let volumes: Vec<_> = scan
            .volumes
            .iter()
            .map(|v| {
                (
                    "vda".to_string(),
                    v.volume.clone(),
                    v.files
                        .iter()
                        .cloned()
                        .map(cairn_server::files::to_record)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        index
            .add_backup(
                &cairn_fileindex::BackupMeta {
                    backup_id: format!("b{run}"),
                    vm: "bench".into(),
                    created_ms: run,
                    parent: None,
                },
                volumes,
            )
            .unwrap();
        let add_s = t2.elapsed().as_secs_f64();
        // The file closest to 10 MiB.
        let target = scan
            .volumes
            .iter()
            .flat_map(|v| &v.files)
            .filter(|f| f.kind == cairn_fs::FileKind::File)
            .min_by_key(|f| f.size.abs_diff(10 << 20))
            .unwrap()
            .clone();
        let t3 = Instant::now();
        let mut out = Vec::new();
        let read = agent
            .read_file(Arc::clone(&vault), &snap.id.to_string(), &target, &mut out)
            .unwrap();
        let restore_s = t3.elapsed().as_secs_f64();
        let raw = std::fs::File::open(image).unwrap();
        let direct = cairn_fs::read_file(&raw, &target, &cairn_fs::Limits::default()).unwrap();
        assert_eq!(out, direct, "restored bytes differ from the image's");
        let _ = ControlFlow::<()>::Continue(());
        println!(
            "{}",
            serde_json::json!({
                "run": run, "files": files, "scan_s": scan_s, "index_add_s": add_s,
                "index_total_s": scan_s + add_s, "metadata_bytes_read": scan.read.bytes,
                "restore_file": target.path, "file_size": target.size,
                "restore_s": restore_s, "vault_bytes_read": read.bytes,
                "read_ratio": read.bytes as f64 / target.size.max(1) as f64,
            })
        );
    }
}
