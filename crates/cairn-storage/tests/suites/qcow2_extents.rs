//! qcow2 disks on a reflink unit (loop-mounted XFS, root needed): the FIEMAP diff of two
//! clones mapped to guest offsets through the L1/L2 tables, and the agent's backups with it.

use super::*;

fn covers(set: &ExtentList, off: u64, len: u64) -> bool {
    set.iter().any(|e| e.offset <= off && off + len <= e.end())
}

fn backup_with(
    a: &StorageAgent,
    v: &dyn Vault,
    snap: &DiskSnapshot,
    parent: &BackupResult,
    previous: &DiskSnapshot,
) -> BackupResult {
    a.backup_disk(
        v,
        snap,
        &req(
            "vm",
            Some(&parent.manifest.id.to_string()),
            vec![ChangeHint::ExtentMap {
                previous: previous.image.clone(),
            }],
        ),
    )
    .unwrap()
}

#[test]
fn qcow2_on_a_reflink_unit_maps_extents_through_l1_l2() {
    let m = Mounted::new("xfs");
    let dir = tempfile::tempdir().unwrap();
    let ds = m.mnt.join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let size = 96 * MIB;
    let raw = dir.path().join("seed.raw");
    write_raw(&raw, &image_bytes(size as usize, 16));
    let disk = ds.join("vm.qcow2");
    qcow2_from_raw(&raw, &disk);
    std::fs::remove_file(&raw).unwrap();
    let snap = |tag: &str| {
        a.snapshot(&ReflinkProvider, std::slice::from_ref(&disk), tag)
            .unwrap()
            .disks[0]
            .clone()
    };
    let s1 = snap("t1");
    assert_eq!(s1.format, DiskFormat::Qcow2);
    let r1 = a.backup_disk(&v, &s1, &req("vm", None, vec![])).unwrap();

    // Guest-like writes: in place over data, into an unallocated (zero) MiB, and a zeroing.
    let writes = [
        (MIB + 4096, 8192),
        (2 * MIB + 65536, 65536),
        (40 * MIB, 4096),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        qemu_io_write(&disk, 0x50 + i as u8, off, len);
    }
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -z 60M 64k",
            disk.to_str().unwrap(),
        ],
    );
    let s2 = snap("t2");
    let t = Instant::now();
    let diff = cairn_storage::tracker::qcow2_extent_map_changes(&s1.image, &s2.image).unwrap();
    println!(
        "qcow2 L1/L2 mapping of the FIEMAP diff: {diff:?} in {:?} ({} of {size} bytes)",
        t.elapsed(),
        diff.total_bytes()
    );
    for &(off, len) in writes.iter().chain(&[(60 * MIB, 65536)]) {
        assert!(covers(&diff, off, len), "{off}+{len} missing from {diff:?}");
    }
    assert!(diff.total_bytes() <= size / 20, "{diff:?}");

    let r2 = backup_with(&a, &v, &s2, &r1, &s1);
    assert_eq!(
        r2.change_source,
        ChangeSource::ExtentMap,
        "{:?}",
        r2.fallbacks
    );
    assert_eq!(r2.manifest.labels["change_mapping"], "qcow2_tables");
    println!(
        "qcow2 incremental: read {} of {size} bytes ({:.2}%), changed {}",
        r2.bytes_read,
        100.0 * r2.bytes_read as f64 / size as f64,
        r2.changed_bytes
    );
    assert!(r2.bytes_read <= size / 20, "read {}", r2.bytes_read);
    let truth = guest_bytes(&s2.image, "qcow2", None, dir.path());
    assert_same(
        &restore_raw(&a, &v, &r2.manifest.id.to_string(), dir.path()),
        &truth,
        "vm@t2",
    );

    // Idle: nothing changed, nothing but the cross-check samples is read.
    let s3 = snap("t3");
    let r3 = backup_with(&a, &v, &s3, &r2, &s2);
    assert_eq!(
        r3.change_source,
        ChangeSource::ExtentMap,
        "{:?}",
        r3.fallbacks
    );
    assert_eq!(r3.changed_bytes, 0);
    println!(
        "qcow2 idle: read {} of {size} bytes ({:.2}%, cross-check samples)",
        r3.bytes_read,
        100.0 * r3.bytes_read as f64 / size as f64
    );
    assert!(r3.bytes_read <= size / 20, "read {}", r3.bytes_read);
    // Without the cross-check an idle disk costs no data read at all.
    let mut bare = req("vm", Some(&r2.manifest.id.to_string()), vec![]);
    bare.cross_check = None;
    bare.hints = vec![ChangeHint::ExtentMap {
        previous: s2.image.clone(),
    }];
    let r3b = a.backup_disk(&v, &s3, &bare).unwrap();
    assert_eq!(r3b.change_source, ChangeSource::ExtentMap);
    println!("qcow2 idle, no cross-check: read {} bytes", r3b.bytes_read);
    assert_eq!(r3b.bytes_read, 0);
    assert_same(
        &restore_raw(&a, &v, &r3.manifest.id.to_string(), dir.path()),
        &truth,
        "vm@t3",
    );

    // A resized disk cannot be compared table by table: the whole disk is compared.
    sh(
        "qemu-img",
        &["resize", "-q", disk.to_str().unwrap(), "128M"],
    );
    qemu_io_write(&disk, 0x60, 100 * MIB, 4096);
    let s4 = snap("t4");
    let r4 = backup_with(&a, &v, &s4, &r3, &s3);
    assert_eq!(r4.change_source, ChangeSource::RecipeCompare);
    assert!(
        r4.fallbacks.iter().any(|f| f.contains("virtual size")),
        "{:?}",
        r4.fallbacks
    );
    assert_same(
        &restore_raw(&a, &v, &r4.manifest.id.to_string(), dir.path()),
        &guest_bytes(&s4.image, "qcow2", None, dir.path()),
        "vm@t4",
    );
    for s in a.list_snapshots().unwrap() {
        a.delete_snapshot(&s.id).unwrap();
    }
}

/// Group backups from unit snapshots, as the server runs them: after the first, the agent keeps
/// the disk's last clone and the next backup of an idle (then lightly written) qcow2 disk reads
/// almost nothing; a parent the last clone does not hold gets no hint.
#[test]
fn unit_snapshot_backups_keep_the_last_clone_for_the_next_fiemap_diff() {
    let m = Mounted::new("xfs");
    let dir = tempfile::tempdir().unwrap();
    let ds = m.mnt.join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let _v = local_vault(dir.path());
    let vault = cairn_api::storage::VaultTarget {
        url: dir.path().join("repo").display().to_string(),
        token: None,
        fingerprint: None,
    };
    let a = agent(dir.path(), &ds);
    let size = 96 * MIB;
    let raw = dir.path().join("seed.raw");
    write_raw(&raw, &image_bytes(size as usize, 17));
    let disk = ds.join("vm.qcow2");
    qcow2_from_raw(&raw, &disk);
    let run = |tag: &str, parent: Option<String>| {
        let u = a
            .snapshot(&ReflinkProvider, std::slice::from_ref(&disk), tag)
            .unwrap();
        let job = cairn_api::storage::BackupJob {
            source: cairn_api::storage::DiskSource::Snapshot {
                snapshot: u.id.clone(),
                index: 0,
            },
            request: req("vm", parent.as_deref(), vec![]),
        };
        let r = a.run_backup_jobs(&vault, &[job], 1).pop().unwrap().unwrap();
        a.delete_snapshot(&u.id).unwrap();
        r
    };
    let first = run("g1", None);
    let id = |r: &BackupResult| r.manifest.id.to_string();
    // Idle: nothing changed since the kept clone.
    let idle = run("g2", Some(id(&first)));
    assert_eq!(
        idle.change_source,
        ChangeSource::ExtentMap,
        "{:?}",
        idle.fallbacks
    );
    assert!(
        idle.bytes_read <= size / 20,
        "idle read {} of {size}",
        idle.bytes_read
    );
    // A small write.
    qemu_io_write(&disk, 0x61, 5 * MIB, 65536);
    let small = run("g3", Some(id(&idle)));
    assert_eq!(small.change_source, ChangeSource::ExtentMap);
    assert!(
        small.bytes_read <= size / 20,
        "read {} of {size}",
        small.bytes_read
    );
    // A parent the kept clone does not hold: no hint, the recipe comparison instead.
    let other = run("g4", Some(id(&first)));
    assert_eq!(other.change_source, ChangeSource::RecipeCompare);
    // Every backup restores to the disk as it was.
    let out = dir.path().join("out.raw");
    let repo = cairn_vault::LocalVault {
        repo: cairn_vault::Repository::open_dir(&dir.path().join("repo")).unwrap(),
    };
    cairn_vault::imager::restore(
        &repo,
        &id(&other),
        &out,
        &cairn_vault::imager::RestoreOptions::default(),
        &cairn_vault::imager::NoProgress,
    )
    .unwrap();
    let cur = dir.path().join("cur.raw");
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            disk.to_str().unwrap(),
            cur.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&cur).unwrap());
}
