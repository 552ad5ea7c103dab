//! The one conformance suite every [`ObjectStore`] backend must pass.
//!
//! Call [`run`] from the backend's tests with an empty store. A backend whose test cannot run
//! (say, no server) must fail, not skip.

use super::{Key, ObjectStore, StoreErrorKind};

fn k(s: &str) -> Key {
    Key::new(s).expect("valid key")
}

/// Runs every check against an empty store; panics with a message naming the broken contract.
pub fn run(s: &dyn ObjectStore) {
    // keys
    for bad in ["", "/a", "a//b", "../x", "a/./b", "a b", "a/"] {
        assert!(Key::new(bad).is_err(), "key {bad:?} must be rejected");
    }

    // get of a missing key
    let e = s
        .get(&k("missing/x"))
        .expect_err("get of a missing key fails");
    assert_eq!(
        e.kind,
        StoreErrorKind::NotFound,
        "missing key is NotFound: {e}"
    );
    assert_eq!(
        s.size(&k("missing/x")).unwrap_err().kind,
        StoreErrorKind::NotFound
    );

    // put / get / overwrite
    s.put(&k("a/one"), b"hello").expect("put");
    assert_eq!(s.get(&k("a/one")).unwrap(), b"hello");
    s.put(&k("a/one"), b"hello, world").expect("overwrite");
    assert_eq!(s.get(&k("a/one")).unwrap(), b"hello, world");
    assert_eq!(s.size(&k("a/one")).unwrap(), 12);

    // empty objects
    s.put(&k("a/empty"), b"").expect("put empty");
    assert_eq!(s.get(&k("a/empty")).unwrap(), b"");

    // ranges
    assert_eq!(s.get_range(&k("a/one"), 7, 5).unwrap(), b"world");
    assert_eq!(s.get_range(&k("a/one"), 0, 0).unwrap(), b"");
    assert!(
        s.get_range(&k("a/one"), 10, 5).is_err(),
        "a range past the end is an error"
    );

    // put_new
    s.put_new(&k("b/lock"), b"1")
        .expect("put_new of a fresh key");
    if s.capabilities().exclusive_create {
        let e = s
            .put_new(&k("b/lock"), b"2")
            .expect_err("put_new of an existing key fails");
        assert_eq!(e.kind, StoreErrorKind::AlreadyExists);
        assert_eq!(
            s.get(&k("b/lock")).unwrap(),
            b"1",
            "a refused put_new changes nothing"
        );
    }

    // list
    s.put(&k("a/deep/two"), &[7u8; 1000]).unwrap();
    let mut keys: Vec<(String, u64)> = s
        .list("a")
        .unwrap()
        .into_iter()
        .map(|m| (m.key.to_string(), m.size))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            ("a/deep/two".into(), 1000),
            ("a/empty".into(), 0),
            ("a/one".into(), 12)
        ],
        "list returns every key under the prefix with its size"
    );
    assert!(s.list("nothing-here").unwrap().is_empty());

    // large object
    let big: Vec<u8> = (0..(5 << 20)).map(|i: u32| (i % 251) as u8).collect();
    s.put(&k("c/big"), &big).unwrap();
    assert_eq!(s.get(&k("c/big")).unwrap(), big);
    assert_eq!(
        s.get_range(&k("c/big"), 3 << 20, 100).unwrap(),
        big[3 << 20..(3 << 20) + 100]
    );

    // protection: where the store protects, the object can be neither replaced nor deleted
    // until released, and its bytes are unchanged; release of a missing key succeeds
    s.put(&k("p/held"), b"locked bytes").unwrap();
    if s.protect(&k("p/held"), u64::MAX).expect("protect") {
        assert!(
            s.delete(&k("p/held")).is_err(),
            "a protected object cannot be deleted"
        );
        assert!(s.put(&k("p/held"), b"other").is_err(), "nor replaced");
        assert_eq!(s.get(&k("p/held")).unwrap(), b"locked bytes");
        s.release(&k("p/held")).expect("release");
    } else {
        eprintln!(
            "conformance: {} cannot protect objects (a local store needs root; S3 needs object lock)",
            s.location()
        );
    }
    s.release(&k("p/missing"))
        .expect("release of a missing key");
    s.delete(&k("p/held"))
        .expect("released objects can be deleted");

    // delete is idempotent
    s.delete(&k("a/one")).unwrap();
    s.delete(&k("a/one")).unwrap();
    assert_eq!(
        s.get(&k("a/one")).unwrap_err().kind,
        StoreErrorKind::NotFound
    );
    for m in s.list("").unwrap() {
        s.delete(&m.key).unwrap();
    }
    // Listings must reflect deletes. A replicated store may take a moment (a loaded
    // three-node Garage once listed a deleted key right after the delete): allowed for up to
    // two seconds, and said.
    let t0 = std::time::Instant::now();
    loop {
        let left: Vec<String> = s
            .list("")
            .unwrap()
            .iter()
            .map(|m| m.key.to_string())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(2),
            "everything deleted, but {} still lists {left:?}",
            s.location()
        );
        eprintln!("conformance: {} still lists deleted {left:?}", s.location());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
