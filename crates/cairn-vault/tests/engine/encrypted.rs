//! An encrypted repository on the engine: incrementals, and maintenance by a repository opened
//! without its key (as a vault service opens it).

use cairn_chunk::wrap::KdfParams;
use cairn_types::{Extent, ExtentList};
use cairn_vault::keys::Secret;
use cairn_vault::maint::{GcOptions, PruneOptions};
use cairn_vault::{Credential, FirstKey, InitOptions, LocalVault, Repository, Vault, VaultError};

use super::{backup, image, restore};

const FAST: KdfParams = KdfParams {
    memory_kib: 256,
    passes: 1,
    lanes: 1,
};

#[test]
fn incrementals_and_keyless_prune_gc_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let opts = InitOptions {
        encrypt: Some(FirstKey::Passphrase(Secret(b"pw".to_vec()), FAST)),
        ..Default::default()
    };
    let v = LocalVault {
        repo: Repository::init_dir(&path, &opts).unwrap(),
    };
    assert!(v.repo.keys().is_some());
    let day1 = image(4 << 20, 3);
    let mut day2 = day1.clone();
    day2[(1 << 20) + 10..(1 << 20) + 5000].fill(0x5a);
    let s1 = backup(&v, &day1, dir.path(), "disk", None, None);
    let changed = ExtentList::from_unsorted(vec![Extent::new(1 << 20, 8192)]);
    let s2 = backup(&v, &day2, dir.path(), "disk", Some("disk"), Some(changed));
    assert!(s2.stats.bytes_new < 64 << 10, "{:?}", s2.stats);
    let out = |n: &str| {
        let d = dir.path().join(n);
        std::fs::create_dir(&d).unwrap();
        d
    };
    assert_eq!(restore(&v, &s2.id.to_string(), &out("r1")), day2);

    // Without the key: listed under the name tag, not readable, but verified, pruned and
    // collected.
    let keyless = LocalVault {
        repo: Repository::open_dir(&path).unwrap(),
    };
    let listed = keyless.list().unwrap();
    assert!(
        listed
            .iter()
            .all(|m| m.name.starts_with("enc-") && m.sealed.is_some())
    );
    assert!(matches!(
        keyless.repo.read_many(&[s1.root.digest]),
        Err(VaultError::Segment { .. })
    ));
    assert!(keyless.verify(false).unwrap().ok());
    let plan = keyless
        .prune(
            &PruneOptions {
                keep_last: 1,
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(plan.forget.len(), 1);
    assert_eq!(plan.forget[0].0, s1.id);
    let gc = keyless.gc(&GcOptions::run()).unwrap();
    assert!(gc.executed && gc.snapshots == 1);
    assert!(keyless.verify(true).unwrap().ok());

    // With the key again: what is left restores bit-exact, and reads check keyed digests.
    let unlocked = LocalVault {
        repo: Repository::open_dir(&path).unwrap(),
    };
    assert!(matches!(
        unlocked.repo.unlock(&Credential::passphrase("nope")),
        Err(VaultError::WrongKey(_))
    ));
    unlocked.repo.unlock(&Credential::passphrase("pw")).unwrap();
    assert_eq!(unlocked.find("disk").unwrap().id, s2.id);
    assert!(unlocked.verify(true).unwrap().ok());
    assert_eq!(restore(&unlocked, "disk", &out("r2")), day2);
}
