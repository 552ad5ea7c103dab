//! The S3 backend against a real S3 server on loopback (s3s-fs; see `cairn_testing::s3`):
//! the object-store conformance suite, a repository's whole life on it, and the failures an
//! object store brings (server down and back, a missing bucket, wrong credentials, objects
//! altered or cut short behind the vault's back).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_testing::s3::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};
use cairn_vault::imager::{self, BackupOptions, NoProgress, RestoreOptions};
use cairn_vault::maint::GcOptions;
use cairn_vault::store::s3::Credentials;
use cairn_vault::store::{Key, ObjectStore, S3Config, S3Store, StoreErrorKind, conformance};
use cairn_vault::{InitOptions, LocalVault, Repository, Vault};
use rand::{RngCore, SeedableRng};

fn config(server: &S3Server, bucket: &str, prefix: &str, secret: &str) -> S3Config {
    S3Config {
        endpoint: server.endpoint(),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        prefix: prefix.into(),
        credentials: Credentials {
            access_key: ACCESS_KEY.into(),
            secret_key: secret.into(),
        },
        ca_file: None,
    }
}

fn store(server: &S3Server, prefix: &str) -> S3Store {
    S3Store::open(config(server, BUCKET, prefix, SECRET_KEY)).expect("open the S3 store")
}

fn server(dir: &Path) -> Option<S3Server> {
    S3Server::start(&dir.join("s3"))
}

#[test]
fn s3s_fs_passes_the_object_store_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let Some(srv) = server(dir.path()) else {
        return;
    };
    for prefix in ["", "fleet/repo-1"] {
        let s = store(&srv, prefix);
        eprintln!("{}: {:?}", s.location(), s.probe());
        conformance::run(&s);
    }
    // Two prefixes of one bucket do not see each other's objects.
    let a = store(&srv, "a");
    let b = store(&srv, "b");
    a.put(&Key::new("x/1").unwrap(), b"a").unwrap();
    assert!(b.list("x").unwrap().is_empty());
    assert_eq!(a.list("x").unwrap().len(), 1);
}

#[test]
fn missing_bucket_and_wrong_credentials_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let Some(srv) = server(dir.path()) else {
        return;
    };
    let e = S3Store::open(config(&srv, "no-such-bucket", "", SECRET_KEY)).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = S3Store::open(config(&srv, BUCKET, "", "wrong-secret")).unwrap_err();
    assert!(e.to_string().contains("HTTP 403"), "{e}");
    assert!(e.to_string().contains("access denied"), "{e}");
}

#[test]
fn a_stopped_server_is_retried_and_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut srv) = server(dir.path()) else {
        return;
    };
    let s = store(&srv, "r");
    let k = Key::new("obj").unwrap();
    s.put(&k, b"before").unwrap();

    // Down for good: a transient error after the retries, naming them.
    srv.stop();
    let t0 = Instant::now();
    let e = s.get(&k).unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Transient, "{e}");
    assert!(e.to_string().contains("attempts"), "{e}");
    assert!(
        t0.elapsed() > Duration::from_secs(1),
        "it retried with backoff"
    );

    // Down for a moment: the retries carry the request through.
    let started = std::thread::scope(|sc| {
        sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(400));
            srv.restart();
        });
        s.put(&k, b"after")
    });
    started.expect("a put while the server restarts succeeds through the retries");
    assert_eq!(s.get(&k).unwrap(), b"after");
}

fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    for (i, block) in v.chunks_mut(256 << 10).enumerate() {
        match i % 3 {
            0 => rng.fill_bytes(block),
            1 => block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"an object store "[j % 16]),
            _ => {}
        }
    }
    v
}

/// A new repository under `prefix`, its cache in `dir/cache`: the store and the vault.
fn new_vault(srv: &S3Server, dir: &Path, prefix: &str) -> (Arc<dyn ObjectStore>, LocalVault) {
    let s: Arc<dyn ObjectStore> = Arc::new(store(srv, prefix));
    let repo = Repository::init(s.clone(), &dir.join("cache"), &InitOptions::default()).unwrap();
    (s, LocalVault { repo })
}

/// Backs `img` up as snapshot `name` (through a file in `dir`).
fn backup(
    v: &LocalVault,
    dir: &Path,
    name: &str,
    img: &[u8],
) -> Result<cairn_vault::SnapshotManifest, String> {
    let p = dir.join(format!("{name}.img"));
    std::fs::write(&p, img).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let opts = BackupOptions {
        name: name.into(),
        ..Default::default()
    };
    imager::backup(v, &f, &opts, &NoProgress).map_err(|e| e.to_string())
}

/// Restores snapshot `id` and returns the image's bytes.
fn restored(v: &LocalVault, dir: &Path, id: &cairn_types::SnapshotId) -> Vec<u8> {
    let out = dir.join("restored.img");
    imager::restore(
        v,
        &id.to_string(),
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap();
    std::fs::read(&out).unwrap()
}

#[test]
fn a_repository_lives_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let Some(srv) = server(dir.path()) else {
        return;
    };
    let cache = dir.path().join("cache");
    let s: Arc<dyn ObjectStore> = Arc::new(store(&srv, "vault"));
    let repo = Repository::init(s.clone(), &cache, &InitOptions::default()).unwrap();
    // A second init finds the first, even where the server ignores If-None-Match.
    let again = Repository::init(s.clone(), &dir.path().join("c2"), &InitOptions::default());
    assert!(
        again.is_err(),
        "init over an existing repository is refused"
    );
    let v = LocalVault { repo };

    let day1 = image(6 << 20, 1);
    let mut day2 = day1.clone();
    rand::rngs::StdRng::seed_from_u64(2).fill_bytes(&mut day2[1 << 20..(1 << 20) + 65536]);
    let mut snaps = Vec::new();
    for (name, img) in [("day1", &day1), ("day2", &day2)] {
        snaps.push(backup(&v, dir.path(), name, img).unwrap());
    }
    assert!(
        snaps[1].stats.bytes_new < (1 << 20),
        "day 2 deduplicates against day 1 on S3: {:?}",
        snaps[1].stats
    );

    // Another process (a fresh cache) opens it and restores both, bit-exact.
    let other = LocalVault {
        repo: Repository::open(s.clone(), &dir.path().join("cache-2")).unwrap(),
    };
    for (snap, img) in snaps.iter().zip([&day1, &day2]) {
        assert!(
            restored(&other, dir.path(), &snap.id) == *img,
            "restore is bit-exact"
        );
    }
    let report = cairn_vault::maint::verify(&other.repo, true).unwrap();
    assert!(report.ok(), "{report:?}");

    // Forget day 1, collect garbage; day 2 still restores and verifies.
    other.repo.forget(&snaps[0].id).unwrap();
    let plan = cairn_vault::maint::gc(&other.repo, &GcOptions::without_grace()).unwrap();
    eprintln!("gc: {plan:?}");
    assert!(cairn_vault::maint::verify(&other.repo, true).unwrap().ok());

    // An object cut short behind the vault's back is found by verify, not read as data.
    let containers = s.list("containers").unwrap();
    let victim = &containers[0].key;
    let path = srv.root().join(BUCKET).join("vault").join(victim.as_str());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let fresh = Repository::open(s.clone(), &dir.path().join("cache-3")).unwrap();
    let report = cairn_vault::maint::verify(&fresh, true).unwrap();
    assert!(!report.ok(), "a truncated container is reported");
}

/// Two vaults (two processes' worth: separate caches) on one bucket prefix: each
/// deduplicates against what the other wrote, and after one collects garbage the other
/// never deduplicates against a container that is gone.
#[test]
fn two_vaults_share_one_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let Some(srv) = server(dir.path()) else {
        return;
    };
    let s: Arc<dyn ObjectStore> = Arc::new(store(&srv, "shared"));
    let a = LocalVault {
        repo: Repository::init(s.clone(), &dir.path().join("a"), &InitOptions::default()).unwrap(),
    };
    let b = LocalVault {
        repo: Repository::open(Arc::new(store(&srv, "shared")), &dir.path().join("b")).unwrap(),
    };
    let back_up =
        |v: &LocalVault, name: &str, img: &[u8]| backup(v, dir.path(), name, img).unwrap();
    let x = image(4 << 20, 7);
    let first = back_up(&a, "x-a", &x);
    assert!(first.stats.bytes_new > 1 << 20, "{:?}", first.stats);
    // B opened before A wrote; its session still finds A's segments.
    let second = back_up(&b, "x-b", &x);
    assert_eq!(
        second.stats.bytes_new, 0,
        "B deduplicates against A: {:?}",
        second.stats
    );

    // A forgets both snapshots and collects everything.
    a.repo.forget(&first.id).unwrap();
    a.repo.forget(&second.id).unwrap();
    let plan = cairn_vault::maint::gc(&a.repo, &GcOptions::without_grace()).unwrap();
    assert!(!plan.delete.is_empty(), "{plan:?}");
    // B's index still names those containers; its next backup must store the data again.
    let third = back_up(&b, "x-b", &x);
    assert!(
        third.stats.bytes_new > 1 << 20,
        "B does not deduplicate against collected containers: {:?}",
        third.stats
    );
    assert!(restored(&a, dir.path(), &third.id) == x);
    assert!(cairn_vault::maint::verify(&a.repo, true).unwrap().ok());
}

fn garage_store(g: &cairn_testing::s3::Garage, node: usize, prefix: &str) -> S3Store {
    S3Store::open(S3Config {
        endpoint: g.endpoint(node),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        prefix: prefix.into(),
        credentials: Credentials {
            access_key: cairn_testing::s3::GARAGE_ACCESS_KEY.into(),
            secret_key: cairn_testing::s3::GARAGE_SECRET_KEY.into(),
        },
        ca_file: None,
    })
    .expect("open Garage")
}

/// Garage, one node and three: the conformance suite; Garage ignores `If-None-Match`, and the
/// probe must say so rather than trust it.
#[test]
fn garage_passes_the_object_store_conformance_suite() {
    for nodes in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let Some(g) = cairn_testing::s3::Garage::start(dir.path(), nodes) else {
            return;
        };
        eprintln!("garage, {nodes} node(s): ready in {:?}", t0.elapsed());
        for node in 0..nodes {
            let s = garage_store(&g, node, &format!("conf-{node}"));
            eprintln!("{}: {:?}", s.location(), s.probe());
            conformance::run(&s);
        }
    }
}

/// Three Garage nodes, one killed in the middle of a backup: the backup completes through the
/// other two (a quorum), restores bit-exact and verifies; the node comes back and the
/// repository still verifies.
#[test]
fn garage_three_nodes_one_killed_mid_backup() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut g) = cairn_testing::s3::Garage::start(&dir.path().join("g"), 3) else {
        return;
    };
    let s: Arc<dyn ObjectStore> = Arc::new(garage_store(&g, 0, "vault"));
    let v = LocalVault {
        repo: Repository::init(
            s.clone(),
            &dir.path().join("cache"),
            &InitOptions::default(),
        )
        .unwrap(),
    };
    let mut img = image(48 << 20, 3);
    rand::rngs::StdRng::seed_from_u64(4).fill_bytes(&mut img[..32 << 20]);
    let snap = std::thread::scope(|sc| {
        let h = sc.spawn(|| backup(&v, dir.path(), "d", &img));
        std::thread::sleep(Duration::from_millis(150));
        assert!(!h.is_finished(), "the node is killed while the backup runs");
        g.kill(2);
        h.join().unwrap()
    })
    .expect("the backup completes with one node of three down");
    assert!(restored(&v, dir.path(), &snap.id) == img);
    g.restart(2);
    assert!(cairn_vault::maint::verify(&v.repo, true).unwrap().ok());
}

/// The S3 server dies in the middle of a backup and stays down: the backup fails with a
/// clear error, nothing partial becomes visible, the committed backup before it is intact,
/// and once the server is back the repository verifies and the next backup succeeds.
#[test]
fn server_lost_mid_backup_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut srv) = server(dir.path()) else {
        return;
    };
    let (s, v) = new_vault(&srv, dir.path(), "v");
    let back_up = |name: &str, img: &[u8]| backup(&v, dir.path(), name, img);
    let first_img = image(4 << 20, 10);
    let first = back_up("first", &first_img).unwrap();

    // A large, incompressible image; the server is killed once its first container lands.
    let mut big = vec![0u8; 96 << 20];
    rand::rngs::StdRng::seed_from_u64(11).fill_bytes(&mut big);
    let before = srv.objects("v/containers");
    let r = std::thread::scope(|sc| {
        let h = sc.spawn(|| back_up("big", &big));
        srv.wait_for_objects_other_than("v/containers", before);
        srv.stop();
        h.join().unwrap()
    });
    let e = r.expect_err("a backup whose server died fails");
    eprintln!("the error: {e}");
    assert!(e.to_string().contains("attempts"), "{e}");

    srv.restart();
    let fresh = Repository::open(s.clone(), &dir.path().join("cache-2")).unwrap();
    let snaps = fresh.list_snapshots().unwrap();
    assert_eq!(snaps.len(), 1, "only the committed backup is visible");
    assert_eq!(snaps[0].id, first.id);
    assert!(cairn_vault::maint::verify(&fresh, true).unwrap().ok());
    let fv = LocalVault { repo: fresh };
    assert!(restored(&fv, dir.path(), &first.id) == first_img);
    // The next backup succeeds (the failed one's lock is stale: its holder is gone).
    let again = backup(&fv, dir.path(), "again", &big[..8 << 20]);
    again.expect("the next backup succeeds");
}

/// The S3 server dies in the middle of a restore, then in the middle of a GC: the restore
/// fails with the cause and leaves neither the output nor its partial file; the GC fails
/// part-way; once the server is back the repository verifies, the kept snapshot restores
/// bit-exact, and the next GC finishes what the first began.
#[test]
fn server_lost_mid_restore_and_mid_gc() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut srv) = server(dir.path()) else {
        return;
    };
    let (s, v) = new_vault(&srv, dir.path(), "v");
    let mut keep = vec![0u8; 48 << 20];
    rand::rngs::StdRng::seed_from_u64(21).fill_bytes(&mut keep);
    let mut doomed = vec![0u8; 80 << 20];
    rand::rngs::StdRng::seed_from_u64(22).fill_bytes(&mut doomed);
    let kept = backup(&v, dir.path(), "keep", &keep).unwrap();
    let gone = backup(&v, dir.path(), "doomed", &doomed).unwrap();

    // Mid-restore.
    let out = dir.path().join("out.img");
    let partial = imager::partial_path(&out).unwrap();
    let r = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            imager::restore(
                &v,
                &kept.id.to_string(),
                &out,
                &RestoreOptions::default(),
                &NoProgress,
            )
            .map_err(|e| e.to_string())
        });
        let t0 = Instant::now();
        while !partial.exists() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(!h.is_finished(), "the server dies while the restore runs");
        srv.stop();
        h.join().unwrap()
    });
    let e = r.expect_err("a restore whose server died fails");
    assert!(e.contains("attempts"), "{e}");
    assert!(
        !out.exists() && !partial.exists(),
        "nothing half-restored is left"
    );
    srv.restart();

    // Mid-GC: the doomed snapshot's containers are being deleted when the server dies.
    v.repo.forget(&gone.id).unwrap();
    let before = srv.objects("v/containers");
    let r = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            cairn_vault::maint::gc(&v.repo, &GcOptions::without_grace()).map_err(|e| e.to_string())
        });
        srv.wait_for_objects_other_than("v/containers", before);
        srv.stop();
        h.join().unwrap()
    });
    let left = srv.objects("v/containers");
    eprintln!("gc with the server gone: {r:?}; containers {before} -> {left}");
    srv.restart();
    let fresh = LocalVault {
        repo: Repository::open(s.clone(), &dir.path().join("cache-2")).unwrap(),
    };
    assert!(cairn_vault::maint::verify(&fresh.repo, true).unwrap().ok());
    assert!(restored(&fresh, dir.path(), &kept.id) == keep);
    let plan = cairn_vault::maint::gc(&fresh.repo, &GcOptions::without_grace()).unwrap();
    assert!(plan.executed);
    assert!(
        srv.objects("v/containers") < before,
        "the collection finished: {plan:?}"
    );
    assert!(cairn_vault::maint::verify(&fresh.repo, true).unwrap().ok());
}

#[path = "common/beside_gc.rs"]
mod beside_gc;

/// GC beside backups on S3, and the grace period object storage gets by default.
#[test]
fn backups_run_while_gc_runs_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let Some(srv) = server(dir.path()) else {
        return;
    };
    let (_s, v) = new_vault(&srv, dir.path(), "beside");
    beside_gc::backups_run_while_gc_runs(&v, dir.path(), 5, 2 << 20);
    // With the default grace, what GC condemns on S3 waits (listings there may lag).
    let all: Vec<String> = v.list().unwrap().iter().map(|s| s.id.to_string()).collect();
    v.forget(&all).unwrap();
    let plan = v.gc(&GcOptions::run()).unwrap();
    assert!(
        !plan.delete.is_empty() && plan.deleted.is_empty() && plan.waiting > 0,
        "{plan:?}"
    );
    let plan = v.gc(&GcOptions::without_grace()).unwrap();
    assert!(!plan.deleted.is_empty() && plan.waiting == 0, "{plan:?}");
    assert!(v.verify(true).unwrap().ok());
}

/// Recipe tree nodes read from the bucket are kept in the local cache: a second walk of a
/// snapshot's recipe needs no request (shown with the server stopped), and GC forgets the
/// nodes of the containers it deletes.
#[test]
fn tree_nodes_are_cached_locally() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut srv) = server(dir.path()) else {
        return;
    };
    let (_s, v) = new_vault(&srv, dir.path(), "nodes");
    let snap = backup(&v, dir.path(), "n", &image(6 << 20, 9)).unwrap();
    // A fresh cache, as another host would have.
    let fresh = LocalVault {
        repo: Repository::open(Arc::new(store(&srv, "nodes")), &dir.path().join("c2")).unwrap(),
    };
    let first = fresh.entries(&snap).unwrap();
    let nodes = dir.path().join("c2/nodes");
    assert!(nodes.exists(), "nodes were cached");
    srv.stop();
    let again = fresh.entries(&snap).expect("the walk needs no request");
    assert_eq!(first, again);
    let mut marked = std::collections::HashSet::new();
    fresh
        .repo
        .reachable(&snap, &mut marked)
        .expect("GC's walk neither");
    srv.restart();
    fresh.forget(&[snap.id.to_string()]).unwrap();
    let plan = fresh.gc(&GcOptions::without_grace()).unwrap();
    assert!(!plan.deleted.is_empty(), "{plan:?}");
    assert_eq!(std::fs::read_dir(&nodes).unwrap().count(), 0, "{plan:?}");
}
