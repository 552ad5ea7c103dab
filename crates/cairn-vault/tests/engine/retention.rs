//! Retention locks: refused to every caller, extend-only, kept by prune and GC, and protected
//! on the store when the test runs as root.

use std::time::{SystemTime, UNIX_EPOCH};

use cairn_vault::maint::{GcOptions, PruneOptions};
use cairn_vault::retention::RetentionPolicy;
use cairn_vault::{Vault, VaultError};

use super::{backup, image, restore, vault, walk};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    uid.split_whitespace().nth(2) == Some("0")
}

/// Lifts the immutable attribute of everything under a test's directory when the test
/// ends, passed or failed, so that its temporary directory can be removed.
struct Unprotect(std::path::PathBuf);

impl Drop for Unprotect {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .args(["-R", "-f", "-i"])
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_locked_snapshot_cannot_be_forgotten_pruned_or_collected_and_a_lock_only_grows() {
    let dir = tempfile::tempdir().unwrap();
    let _unprotect = Unprotect(dir.path().to_path_buf());
    let v = vault(dir.path());
    let img = image(4 << 20, 7);
    let s1 = backup(&v, &img, dir.path(), "disk", None, None);
    let spec = s1.id.to_string();
    let until = now() + 3600;

    let a = v.lock(&spec, until).unwrap();
    assert_eq!((a.lock.snapshot, a.lock.until), (s1.id, until));
    assert!(
        a.protected + a.unprotected >= 3,
        "manifest, lock and containers: {a:?}"
    );
    if is_root() {
        assert_eq!(a.unprotected, 0, "root protects every object: {a:?}");
    }

    // Forget: refused, with the time in the message, and nothing changes.
    let e = v.forget(std::slice::from_ref(&spec)).unwrap_err();
    assert!(matches!(e, VaultError::RetentionLocked { .. }), "{e}");
    assert!(e.to_string().contains("retention lock until"), "{e}");
    assert_eq!(v.list().unwrap().len(), 1);

    // Shortening is refused; the same time or later is fine.
    let e = v.lock(&spec, until - 60).unwrap_err();
    assert!(matches!(e, VaultError::RetentionShortened { .. }), "{e}");
    assert!(e.to_string().contains("never shortened"), "{e}");
    assert_eq!(v.lock(&spec, until).unwrap().lock.until, until);
    assert_eq!(v.lock(&spec, until + 60).unwrap().lock.until, until + 60);
    assert_eq!(v.locks().unwrap()[0].until, until + 60);

    // Prune: a rule that would forget it keeps it and says why.
    let s2 = backup(&v, &image(4 << 20, 8), dir.path(), "disk", None, None);
    let plan = v
        .prune(
            &PruneOptions {
                keep_last: 1,
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert!(plan.forget.is_empty(), "{plan:?}");
    assert_eq!(plan.locked.len(), 1);
    assert_eq!(plan.locked[0].0, s1.id);

    // GC keeps its data (and leaves its containers whole); it still restores.
    v.forget(&[s2.id.to_string()]).unwrap();
    let gc = v.gc(&GcOptions::run()).unwrap();
    assert!(gc.locked_containers >= 1, "{gc:?}");
    assert_eq!(restore(&v, &spec, dir.path()), img);

    if is_root() {
        // Outside the vault too: the files cannot be deleted or changed.
        let repo = dir.path().join("repo");
        for f in walk(&repo.join("containers")) {
            assert!(
                std::fs::remove_file(&f).is_err(),
                "{} is immutable",
                f.display()
            );
        }
        let m = repo.join(format!("snapshots/{}.json", s1.id.to_hex()));
        assert!(std::fs::remove_file(&m).is_err());
        assert!(std::fs::write(&m, b"{}").is_err());
    }
}

#[test]
fn an_expired_lock_lets_the_snapshot_go_and_gc_collects_its_protected_containers() {
    let dir = tempfile::tempdir().unwrap();
    let _unprotect = Unprotect(dir.path().to_path_buf());
    let v = vault(dir.path());
    let s1 = backup(&v, &image(2 << 20, 3), dir.path(), "disk", None, None);
    v.lock(&s1.id.to_string(), now() + 2).unwrap();
    assert!(v.forget(&[s1.id.to_string()]).is_err());
    std::thread::sleep(std::time::Duration::from_millis(3100));
    v.forget(&[s1.id.to_string()]).unwrap();
    assert!(
        v.locks().unwrap().is_empty(),
        "the expired lock goes with it"
    );
    let gc = v.gc(&GcOptions::run()).unwrap();
    assert!(!gc.delete.is_empty(), "{gc:?}");
    assert!(walk(&dir.path().join("repo/containers")).is_empty());
}

#[test]
fn the_policy_locks_every_new_snapshot_before_it_is_visible() {
    let dir = tempfile::tempdir().unwrap();
    let _unprotect = Unprotect(dir.path().to_path_buf());
    let v = vault(dir.path());
    let p = RetentionPolicy {
        min_lock_secs: 7 * 86_400,
    };
    v.set_retention_policy(&p).unwrap();
    assert_eq!(v.retention_policy().unwrap(), p);
    let t = now();
    let s = backup(&v, &image(1 << 20, 4), dir.path(), "disk", None, None);
    let locks = v.locks().unwrap();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].snapshot, s.id);
    assert!(locks[0].until >= t + 7 * 86_400, "{locks:?}");
    assert!(matches!(
        v.forget(&[s.id.to_string()]).unwrap_err(),
        VaultError::RetentionLocked { .. }
    ));
    // A lock is the later of the one asked for and the minimum.
    assert!(v.lock(&s.id.to_string(), t + 60).is_err());
}
