//! GC beside backup sessions: what a session that began earlier may use is condemned, not
//! deleted, until it ends; a session that begins later never builds on it.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use cairn_vault::imager::{self, BackupOptions, Progress};
use cairn_vault::maint::GcOptions;
use cairn_vault::{LocalVault, Vault};

use super::{backup, image, restore, vault};

#[path = "../common/beside_gc.rs"]
mod common;

/// Blocks the backup that reports it once it has looked at every byte (its session is open
/// and has asked what the vault lacks), until told to go on.
struct PauseAtEnd {
    reached: Mutex<Option<mpsc::Sender<()>>>,
    go: Mutex<mpsc::Receiver<()>>,
}

impl Progress for PauseAtEnd {
    fn update(&self, done: u64, total: u64) {
        if done != total {
            return;
        }
        if let Some(tx) = self.reached.lock().unwrap().take() {
            tx.send(()).unwrap();
            self.go.lock().unwrap().recv().unwrap();
        }
    }
}

/// Backs up `img` as `name` in a thread that pauses with its session open; returns the
/// thread, a signal that it paused, and the sender that lets it go on.
fn paused_backup<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    v: &'s LocalVault,
    path: std::path::PathBuf,
    name: &'s str,
) -> (
    std::thread::ScopedJoinHandle<'s, cairn_vault::SnapshotManifest>,
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
) {
    let (reached_tx, reached) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let pause = Arc::new(PauseAtEnd {
        reached: Mutex::new(Some(reached_tx)),
        go: Mutex::new(go_rx),
    });
    let h = s.spawn(move || {
        let opts = BackupOptions {
            name: name.into(),
            ..Default::default()
        };
        let f = std::fs::File::open(path).unwrap();
        imager::backup(v, &f, &opts, &*pause).unwrap()
    });
    (h, reached, go)
}

/// Dates every container back an hour, as if A had been backed up long before B began
/// (GC leaves alone containers younger than the oldest running session: they may be its).
fn age_containers(dir: &std::path::Path) {
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let mut stack = vec![dir.join("repo/containers")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let f = std::fs::File::options().write(true).open(e.path()).unwrap();
                f.set_modified(hour_ago).unwrap();
            }
        }
    }
}

#[test]
fn gc_waits_for_a_session_that_may_use_what_it_condemns_and_revives_what_it_used() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(4 << 20, 70);
    let a = backup(&v, &img, dir.path(), "a", None, None);
    v.forget(&[a.id.to_string()]).unwrap();
    age_containers(dir.path());
    let path = dir.path().join("b.img");
    std::fs::write(&path, &img).unwrap();
    let b = std::thread::scope(|s| {
        // B's session finds all of A's (now unreferenced) data in the vault and builds on it.
        let (h, reached, go) = paused_backup(s, &v, path.clone(), "b");
        reached.recv().unwrap();
        let plan = v.gc(&GcOptions::run()).unwrap();
        assert!(!plan.delete.is_empty(), "A's containers are dead: {plan:?}");
        assert!(
            plan.deleted.is_empty(),
            "nothing B may use is deleted: {plan:?}"
        );
        assert_eq!(plan.waiting, plan.delete.len(), "{plan:?}");
        go.send(()).unwrap();
        h.join().unwrap()
    });
    assert!(
        b.stats.bytes_new < 64 << 10,
        "B reused A's data: {:?}",
        b.stats
    );
    // B committed a snapshot on the condemned containers: the next GC revives them (or
    // deletes one whose segments B asked about only after the condemnation, and so stored
    // again).
    let plan = v.gc(&GcOptions::run()).unwrap();
    assert!(plan.revived > 0, "{plan:?}");
    assert_eq!(plan.waiting, 0, "{plan:?}");
    assert_eq!(restore(&v, &b.id.to_string(), dir.path()), img);
    assert!(v.verify(true).unwrap().ok());
}

#[test]
fn a_session_begun_after_the_condemnation_stores_the_data_again() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    let img = image(4 << 20, 71);
    let a = backup(&v, &img, dir.path(), "a", None, None);
    v.forget(&[a.id.to_string()]).unwrap();
    age_containers(dir.path());
    let path = dir.path().join("b.img");
    std::fs::write(&path, &img).unwrap();
    let (b, c) = std::thread::scope(|s| {
        let (h, reached, go) = paused_backup(s, &v, path.clone(), "b");
        reached.recv().unwrap();
        let plan = v.gc(&GcOptions::run()).unwrap();
        assert!(plan.deleted.is_empty() && plan.waiting > 0, "{plan:?}");
        // C begins after the condemnation: it does not deduplicate against A's containers.
        let c = backup(&v, &img, dir.path(), "c", None, None);
        assert!(
            c.stats.bytes_new > 2 << 20,
            "C stores the data again: {:?}",
            c.stats
        );
        go.send(()).unwrap();
        (h.join().unwrap(), c)
    });
    // B ended; the index prefers C's copies, so A's containers hold nothing live: deleted.
    let plan = v.gc(&GcOptions::run()).unwrap();
    assert!(!plan.deleted.is_empty() && plan.waiting == 0, "{plan:?}");
    assert_eq!(restore(&v, &b.id.to_string(), dir.path()), img);
    assert_eq!(restore(&v, &c.id.to_string(), dir.path()), img);
    assert!(v.verify(true).unwrap().ok());
}

#[test]
fn backups_run_while_gc_runs_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let v = vault(dir.path());
    common::backups_run_while_gc_runs(&v, dir.path(), 8, 3 << 20);
}
