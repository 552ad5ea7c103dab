//! End-to-end tests of the storage agent against real qemu-img/qemu-nbd, loop-mounted XFS and
//! btrfs, a local vault and a vault service in another process. Run as root, serially:
//! `cargo test -p cairn-storage -- --test-threads=1`.
mod common;
use std::path::Path;
use std::time::Instant;

use cairn_storage::provider::plan_retention;
use cairn_storage::tracker::{ChangeSet, extent_map_changes};
use cairn_storage::*;
use cairn_types::{Extent, ExtentList};
use cairn_vault::Vault;
use common::*;

const MIB: u64 = 1 << 20;

fn restore_raw(a: &StorageAgent, v: &dyn Vault, snap: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("restored-{}.raw", rand::random::<u32>()));
    a.restore(
        v,
        &RestoreRequest {
            snapshot: snap.into(),
            target: out.clone(),
            format: DiskFormat::Raw,
            mode: RestoreMode::New,
        },
    )
    .unwrap();
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    b
}

#[test]
fn datastores_disks_and_units_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(ds.join("luns")).unwrap();
    write_raw(&ds.join("a.raw"), &image_bytes(4 << 20, 1));
    qcow2_from_raw(&ds.join("a.raw"), &ds.join("b.qcow2"));
    write_raw(&ds.join("luns/lun0"), &image_bytes(2 << 20, 2));
    std::fs::create_dir_all(ds.join(".cairn-snapshots")).unwrap();
    let a = agent(dir.path(), &ds);
    let list = a.list_datastores().unwrap();
    assert_eq!(list.len(), 1);
    let d = &list[0];
    let ids: Vec<_> = d
        .disks
        .iter()
        .map(|d| (d.id.as_str(), d.format, d.kind, d.virtual_size))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("a.raw", DiskFormat::Raw, DiskKind::Image, 4 * MIB),
            ("b.qcow2", DiskFormat::Qcow2, DiskKind::Image, 4 * MIB),
            ("luns/lun0", DiskFormat::Raw, DiskKind::Lun, 2 * MIB),
        ]
    );
    assert!(d.disks.iter().all(|x| x.unit == d.unit.id));
    assert_eq!(d.unit.fs_type, "ext4", "{:?}", d.unit);
    let json = serde_json::to_string(&list).unwrap();
    assert!(json.contains("\"format\":\"qcow2\""), "{json}");
}

/// A frozen base under an external overlay: the base is frozen by the host agent; the next
/// backup reads only the overlay's depth-0 extents.
#[test]
fn qcow2_frozen_base_and_overlay_map() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let raw = dir.path().join("seed.raw");
    write_raw(&raw, &image_bytes(32 << 20, 3));
    let base = ds.join("vm1.qcow2");
    qcow2_from_raw(&raw, &base);

    let p = Qcow2Provider {
        mode: Qcow2Mode::FrozenBase,
    };
    let s1 = a.snapshot(&p, std::slice::from_ref(&base), "t1").unwrap();
    let r1 = a
        .backup_disk(&v, &s1.disks[0], &req("vm1", None, vec![]))
        .unwrap();
    assert_eq!(r1.change_source, ChangeSource::Full);
    assert_same(
        &restore_raw(&a, &v, &r1.manifest.id.to_string(), dir.path()),
        &guest_bytes(&base, "qcow2", None, dir.path()),
        "full",
    );

    // The host agent puts overlay o1 on the base; the guest writes; then o2 freezes o1.
    let o1 = ds.join("vm1.o1.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            o1.to_str().unwrap(),
        ],
    );
    qemu_io_write(&o1, 0xaa, 3 * MIB, 64 << 10);
    qemu_io_write(&o1, 0x55, 20 * MIB + 4096, 200 << 10);
    let o2 = ds.join("vm1.o2.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            o1.to_str().unwrap(),
            "-F",
            "qcow2",
            o2.to_str().unwrap(),
        ],
    );
    let s2 = a.snapshot(&p, std::slice::from_ref(&o1), "t2").unwrap();
    let r2 = a
        .backup_disk(
            &v,
            &s2.disks[0],
            &req(
                "vm1",
                Some(&r1.manifest.id.to_string()),
                vec![ChangeHint::Overlay {
                    overlay: o1.clone(),
                }],
            ),
        )
        .unwrap();
    assert_eq!(
        r2.change_source,
        ChangeSource::OverlayMap,
        "{:?}",
        r2.fallbacks
    );
    assert_eq!(r2.manifest.labels["change_source"], "overlay_map");
    assert!(r2.changed_bytes <= 2 * MIB, "changed {}", r2.changed_bytes);
    assert!(
        r2.bytes_read < 4 * MIB,
        "incremental read {} bytes of 32 MiB",
        r2.bytes_read
    );
    let want = guest_bytes(&o1, "qcow2", None, dir.path());
    assert_same(
        &restore_raw(&a, &v, &r2.manifest.id.to_string(), dir.path()),
        &want,
        "incremental",
    );
    // And as a new qcow2 disk in the datastore.
    let q = ds.join("vm1-restored.qcow2");
    let rep = a
        .restore(
            &v,
            &RestoreRequest {
                snapshot: r2.manifest.id.to_string(),
                target: q.clone(),
                format: DiskFormat::Qcow2,
                mode: RestoreMode::New,
            },
        )
        .unwrap();
    assert!(
        rep.zero_bytes > 0 && rep.bytes_written < 32 * MIB,
        "{rep:?}"
    );
    assert_same(
        &guest_bytes(&q, "qcow2", None, dir.path()),
        &want,
        "qcow2 restore",
    );
    let check = sh("qemu-img", &["check", "-f", "qcow2", q.to_str().unwrap()]); // our writer's
    assert!(check.contains("No errors were found"), "{check}");
    println!(
        "overlay incremental: read {} bytes, sent {} bytes; qcow2 restore {rep:?}",
        r2.bytes_read, r2.bytes_sent
    );
}

/// Internal qcow2 snapshots and a persistent bitmap; then the bitmap is lost and the backup
/// falls back to a recipe compare, still exact.
#[test]
fn qcow2_internal_snapshots_persistent_bitmap_and_lost_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let raw = dir.path().join("seed.raw");
    write_raw(&raw, &image_bytes(24 << 20, 4));
    let disk = ds.join("vm2.qcow2");
    qcow2_from_raw(&raw, &disk);
    let p = Qcow2Provider {
        mode: Qcow2Mode::Internal,
    };

    let s1 = a.snapshot(&p, std::slice::from_ref(&disk), "t1").unwrap();
    Qcow2Provider::add_bitmap(&disk, "cairn-vm2").unwrap();
    let r1 = a
        .backup_disk(&v, &s1.disks[0], &req("vm2", None, vec![]))
        .unwrap();
    let name1 = s1.disks[0].internal.clone().unwrap();
    assert_same(
        &restore_raw(&a, &v, &r1.manifest.id.to_string(), dir.path()),
        &guest_bytes(&disk, "qcow2", Some(&name1), dir.path()),
        "s1",
    );

    qemu_io_write(&disk, 0x11, 5 * MIB, 128 << 10);
    qemu_io_write(&disk, 0x22, 17 * MIB, 64 << 10);
    let s2 = a.snapshot(&p, std::slice::from_ref(&disk), "t2").unwrap();
    let hint = ChangeHint::PersistentBitmap {
        image: disk.clone(),
        bitmap: "cairn-vm2".into(),
    };
    let r2 = a
        .backup_disk(
            &v,
            &s2.disks[0],
            &req("vm2", Some(&r1.manifest.id.to_string()), vec![hint.clone()]),
        )
        .unwrap();
    assert_eq!(
        r2.change_source,
        ChangeSource::PersistentBitmap,
        "{:?}",
        r2.fallbacks
    );
    assert_eq!(r2.changed_bytes, 192 << 10, "bitmap granularity 64 KiB");
    assert!(r2.bytes_read < 3 * MIB, "read {}", r2.bytes_read);
    let name2 = s2.disks[0].internal.clone().unwrap();
    assert_same(
        &restore_raw(&a, &v, &r2.manifest.id.to_string(), dir.path()),
        &guest_bytes(&disk, "qcow2", Some(&name2), dir.path()),
        "s2",
    );

    // The bitmap is lost (e.g. removed after QEMU was killed): fall back, never fail.
    Qcow2Provider::remove_bitmap(&disk, "cairn-vm2").unwrap();
    qemu_io_write(&disk, 0x33, 9 * MIB, 64 << 10);
    let s3 = a.snapshot(&p, std::slice::from_ref(&disk), "t3").unwrap();
    let r3 = a
        .backup_disk(
            &v,
            &s3.disks[0],
            &req("vm2", Some(&r2.manifest.id.to_string()), vec![hint]),
        )
        .unwrap();
    assert_eq!(r3.change_source, ChangeSource::RecipeCompare);
    assert!(r3.fallbacks[0].contains("lost"), "{:?}", r3.fallbacks);
    assert!(r3.manifest.labels["change_fallbacks"].contains("lost"));
    assert!(
        r3.manifest.stats.bytes_new < 2 * MIB,
        "recipe compare sends only changes: {}",
        r3.manifest.stats.bytes_new
    );
    let name3 = s3.disks[0].internal.clone().unwrap();
    assert_same(
        &restore_raw(&a, &v, &r3.manifest.id.to_string(), dir.path()),
        &guest_bytes(&disk, "qcow2", Some(&name3), dir.path()),
        "s3",
    );

    // Retention: keep 1 per disk deletes the two older internal snapshots.
    let plan = a.apply_retention(1, false).unwrap();
    assert_eq!(plan.delete, vec![s1.id.clone(), s2.id.clone()]);
    let info = cairn_storage::qemu::img_info(&disk).unwrap();
    assert_eq!(
        info.snapshots
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>(),
        vec![name3]
    );
    assert_eq!(a.list_snapshots().unwrap().len(), 1);
}

/// A targeted group snapshot on a reflink unit: one call clones every disk; the next backup finds changes
/// from FIEMAP alone; a lost bitmap falls back to that storage diff.
fn reflink_unit_scenario(kind: &str) {
    let m = Mounted::new(kind);
    let dir = tempfile::tempdir().unwrap();
    let ds = m.mnt.join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let (da, db) = (ds.join("a.raw"), ds.join("b.raw"));
    write_raw(&da, &image_bytes(48 << 20, 5));
    write_raw(&db, &image_bytes(16 << 20, 6));
    assert!(
        ReflinkProvider::probe(&ds),
        "{kind} mounted without reflink support"
    );
    let unit = cairn_storage::datastore::storage_unit(&ds).unwrap();
    assert_eq!(unit.fs_type, kind);

    let s1 = a
        .snapshot(&ReflinkProvider, &[da.clone(), db.clone()], "t1")
        .unwrap();
    assert_eq!(s1.disks.len(), 2);
    assert!(
        s1.disks
            .iter()
            .all(|d| d.image.starts_with(m.mnt.join(".cairn-snapshots")))
    );
    let jobs = vec![
        (s1.disks[0].clone(), req("a", None, vec![])),
        (s1.disks[1].clone(), req("b", None, vec![])),
    ];
    let rs: Vec<_> = a
        .backup_disks(&v, &jobs)
        .into_iter()
        .map(Result::unwrap)
        .collect();

    // Guest writes after the snapshot.
    scribble(&da, 7 * MIB, 256 << 10, 70);
    scribble(&da, 33 * MIB + 4096, 8192, 71);
    let s2 = a
        .snapshot(&ReflinkProvider, &[da.clone(), db.clone()], "t2")
        .unwrap();
    println!("{kind}: group snapshot window {} us", s2.window_us);

    let t = Instant::now();
    let diff =
        extent_map_changes(&s1.disks[0].image, &s2.disks[0].image, s2.disks[0].size).unwrap();
    println!(
        "{kind}: FIEMAP diff of 48 MiB clones: {:?} in {:?} ({} bytes)",
        diff,
        t.elapsed(),
        diff.total_bytes()
    );
    assert!(
        diff.total_bytes() >= (256 << 10) + 8192 && diff.total_bytes() <= 4 * MIB,
        "{diff:?}"
    );

    let prev_a = ChangeHint::ExtentMap {
        previous: s1.disks[0].image.clone(),
    };
    let lost = ChangeHint::PersistentBitmap {
        image: da.clone(),
        bitmap: "gone".into(),
    };
    let ra = a
        .backup_disk(
            &v,
            &s2.disks[0],
            &req(
                "a",
                Some(&rs[0].manifest.id.to_string()),
                vec![lost, prev_a],
            ),
        )
        .unwrap();
    assert_eq!(
        ra.change_source,
        ChangeSource::ExtentMap,
        "{:?}",
        ra.fallbacks
    );
    assert_eq!(
        ra.fallbacks.len(),
        1,
        "the lost bitmap was skipped: {:?}",
        ra.fallbacks
    );
    assert!(ra.bytes_read < 6 * MIB, "read {} of 48 MiB", ra.bytes_read);
    assert_same(
        &restore_raw(&a, &v, &ra.manifest.id.to_string(), dir.path()),
        &std::fs::read(&s2.disks[0].image).unwrap(),
        "a@t2",
    );

    // b did not change: nothing to read but the cross-check samples.
    let rb = a
        .backup_disk(
            &v,
            &s2.disks[1],
            &req(
                "b",
                Some(&rs[1].manifest.id.to_string()),
                vec![ChangeHint::ExtentMap {
                    previous: s1.disks[1].image.clone(),
                }],
            ),
        )
        .unwrap();
    assert_eq!(rb.change_source, ChangeSource::ExtentMap);
    assert_eq!(rb.changed_bytes, 0);
    assert_eq!(rb.manifest.stats.bytes_new, 0);

    // Retention keeps one snapshot per disk; the old clones are gone, and a hint naming them
    // falls back to a recipe compare.
    let plan = a.apply_retention(1, false).unwrap();
    assert_eq!(plan.delete, vec![s1.id.clone()]);
    assert!(!s1.dir.as_ref().unwrap().exists());
    scribble(&da, MIB, 4096, 72);
    let s3 = a
        .snapshot(&ReflinkProvider, std::slice::from_ref(&da), "t3")
        .unwrap();
    let r3 = a
        .backup_disk(
            &v,
            &s3.disks[0],
            &req(
                "a",
                Some(&ra.manifest.id.to_string()),
                vec![ChangeHint::ExtentMap {
                    previous: s1.disks[0].image.clone(),
                }],
            ),
        )
        .unwrap();
    assert_eq!(r3.change_source, ChangeSource::RecipeCompare);
    assert_same(
        &restore_raw(&a, &v, &r3.manifest.id.to_string(), dir.path()),
        &std::fs::read(&da).unwrap(),
        "a@t3",
    );
    for s in a.list_snapshots().unwrap() {
        a.delete_snapshot(&s.id).unwrap();
    }
}

#[test]
fn reflink_unit_snapshot_and_extent_map_on_xfs() {
    reflink_unit_scenario("xfs");
}

#[test]
fn reflink_unit_snapshot_and_extent_map_on_btrfs() {
    reflink_unit_scenario("btrfs");
}

#[test]
fn reflink_is_refused_on_ext4_and_copy_provider_works() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let d = ds.join("c.raw");
    write_raw(&d, &image_bytes(8 << 20, 8));
    let e = ReflinkProvider
        .snapshot(std::slice::from_ref(&d), "x")
        .unwrap_err();
    assert!(matches!(e, StorageError::Unsupported { .. }), "{e}");
    // The copy provider works anywhere and is reported as slow.
    let caps = CopyProvider.capabilities();
    assert!(caps.note.contains("slow") && caps.uses_full_space);
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let s1 = a
        .snapshot(&CopyProvider, std::slice::from_ref(&d), "t1")
        .unwrap();
    let r1 = a
        .backup_disk(&v, &s1.disks[0], &req("c", None, vec![]))
        .unwrap();
    scribble(&d, 2 * MIB, 100_000, 80);
    let s2 = a
        .snapshot(&CopyProvider, std::slice::from_ref(&d), "t2")
        .unwrap();
    let r2 = a
        .backup_disk(
            &v,
            &s2.disks[0],
            &req("c", Some(&r1.manifest.id.to_string()), vec![]),
        )
        .unwrap();
    assert_eq!(r2.change_source, ChangeSource::RecipeCompare);
    assert!(r2.manifest.stats.bytes_new < MIB, "{:?}", r2.manifest.stats);
    assert_same(
        &restore_raw(&a, &v, &r2.manifest.id.to_string(), dir.path()),
        &std::fs::read(&d).unwrap(),
        "copy",
    );
    assert_eq!(
        plan_retention(&a.list_snapshots().unwrap(), 5).delete.len(),
        0
    );
}

/// A host agent hands over a change list that omits a changed region: the cross-check
/// catches it, the backup falls back, and the result is still exact.
#[test]
fn wrong_tracking_is_caught_by_the_cross_check() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let d = ds.join("w.raw");
    write_raw(&d, &image_bytes(32 << 20, 9));
    let r1 = a
        .backup_disk(
            &v,
            &DiskSnapshot::of_file(&d).unwrap(),
            &req("w", None, vec![]),
        )
        .unwrap();
    scribble(&d, 4 * MIB, 64 << 10, 90); // reported
    scribble(&d, 12 * MIB, 6 << 20, 91); // omitted by the "hypervisor"
    let snap = DiskSnapshot::of_file(&d).unwrap();
    let wrong = ExtentList::from_unsorted(vec![Extent::new(4 * MIB, 64 << 10)]);

    // The check by itself.
    let parent = v.entries(&r1.manifest).unwrap();
    let set = ChangeSet {
        extents: wrong.clone(),
        source: ChangeSource::HypervisorBitmap,
    };
    let reader = snap.open(&nbd()).unwrap();
    let e = cross_check(
        None,
        &*reader,
        &parent,
        &set,
        &CrossCheck {
            samples: usize::MAX,
            seed: 1,
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, StorageError::TrackingMismatch { offset, .. } if offset >= 12 * MIB - (64 << 10)),
        "{e}"
    );
    // A correct list passes.
    let right = ExtentList::from_unsorted(vec![
        Extent::new(4 * MIB, 64 << 10),
        Extent::new(12 * MIB, 6 << 20),
    ]);
    let ok = ChangeSet {
        extents: right.clone(),
        source: ChangeSource::HypervisorBitmap,
    };
    assert!(
        cross_check(
            None,
            &*reader,
            &parent,
            &ok,
            &CrossCheck {
                samples: usize::MAX,
                seed: 1
            }
        )
        .unwrap()
        .regions
            > 100
    );

    let mut rq = req(
        "w",
        Some(&r1.manifest.id.to_string()),
        vec![ChangeHint::Hypervisor { extents: wrong }],
    );
    rq.cross_check = Some(CrossCheck {
        samples: 64,
        seed: 7,
    });
    let r2 = a.backup_disk(&v, &snap, &rq).unwrap();
    assert_eq!(
        r2.change_source,
        ChangeSource::RecipeCompare,
        "{:?}",
        r2.fallbacks
    );
    assert!(
        r2.fallbacks[0].contains("cross-check"),
        "{:?}",
        r2.fallbacks
    );
    assert_same(
        &restore_raw(&a, &v, &r2.manifest.id.to_string(), dir.path()),
        &std::fs::read(&d).unwrap(),
        "after fallback",
    );

    // The right list is used as is.
    let rq = req(
        "w",
        Some(&r2.manifest.id.to_string()),
        vec![ChangeHint::Hypervisor { extents: right }],
    );
    let r3 = a.backup_disk(&v, &snap, &rq).unwrap();
    assert_eq!(r3.change_source, ChangeSource::HypervisorBitmap);
}

#[test]
fn rdm_file_lun_round_trips_with_its_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(ds.join("luns")).unwrap();
    let lun = ds.join("luns/lun0");
    let data = image_bytes(12 << 20, 10);
    write_raw(&lun, &data);
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let b = a
        .backup_rdm(&v, "ds", "luns/lun0", &req("lun0", None, vec![]))
        .unwrap();
    assert_eq!(b.mapping.lun.kind, cairn_storage::rdm::LunKind::File);
    assert_eq!(
        b.mapping.extents.iter().map(|e| e.len).sum::<u64>(),
        12 * MIB
    );
    assert!(ds.join("luns/lun0.rdm.json").exists());
    assert_eq!(
        b.data.manifest.labels["rdm_map_snapshot"],
        b.mapping_snapshot
    );
    assert!(b.data.manifest.labels["rdm_lun"].contains("lun0"));

    let r = a
        .restore_rdm(
            &v,
            "ds",
            &b.data.manifest.id.to_string(),
            "luns/lun0-restored",
        )
        .unwrap();
    assert_same(
        &std::fs::read(ds.join("luns/lun0-restored")).unwrap(),
        &data,
        "LUN data",
    );
    assert_eq!(r.original, b.mapping);
    let written: RdmMapping =
        serde_json::from_slice(&std::fs::read(&r.mapping_file).unwrap()).unwrap();
    assert_eq!(written, r.mapping);
    assert_eq!(written.restored_from.as_ref().unwrap().lun, b.mapping.lun);
    assert_ne!(written.lun.inode, b.mapping.lun.inode);
    // The listing shows both LUNs but not the mapping files.
    let disks: Vec<_> = a.list_datastores().unwrap()[0]
        .disks
        .iter()
        .map(|d| d.id.clone())
        .collect();
    assert_eq!(disks, vec!["luns/lun0", "luns/lun0-restored"]);
}

#[test]
fn rdm_block_device_lun_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(ds.join("luns")).unwrap();
    let data = image_bytes(8 << 20, 11);
    let f1 = dir.path().join("lun-a.img");
    write_raw(&f1, &data);
    let f2 = dir.path().join("lun-b.img");
    write_raw(&f2, &vec![0u8; 8 << 20]);
    let (l1, l2) = (LoopDev::new(&f1), LoopDev::new(&f2));
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let id1 = l1.dev.to_str().unwrap();
    let b = a
        .backup_rdm(&v, "ds", id1, &req("lunblk", None, vec![]))
        .unwrap();
    assert_eq!(b.mapping.lun.kind, cairn_storage::rdm::LunKind::BlockDevice);
    assert_eq!(b.mapping.extents.len(), 1);
    assert_eq!(b.mapping.extents[0].len, 8 * MIB);
    let r = a
        .restore_rdm(
            &v,
            "ds",
            &b.data.manifest.id.to_string(),
            l2.dev.to_str().unwrap(),
        )
        .unwrap();
    assert_eq!(r.mapping.lun.kind, cairn_storage::rdm::LunKind::BlockDevice);
    drop((l1, l2));
    assert_same(&std::fs::read(&f2).unwrap(), &data, "block LUN");
}

#[test]
fn restore_over_an_existing_disk_writes_only_differences() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let d = ds.join("r.raw");
    let data = image_bytes(32 << 20, 12);
    write_raw(&d, &data);
    let r1 = a
        .backup_disk(
            &v,
            &DiskSnapshot::of_file(&d).unwrap(),
            &req("r", None, vec![]),
        )
        .unwrap();
    let spec = r1.manifest.id.to_string();

    // Raw: damage three regions (one inside a zero run).
    let changed = (64 << 10) + 4096 + 30_000;
    scribble(&d, 3 * MIB, 64 << 10, 120);
    scribble(&d, 10 * MIB + 5, 4096, 121);
    scribble(&d, 2 * MIB + 100, 30_000, 122);
    let rep = a
        .restore(
            &v,
            &RestoreRequest {
                snapshot: spec.clone(),
                target: d.clone(),
                format: DiskFormat::Raw,
                mode: RestoreMode::Over,
            },
        )
        .unwrap();
    println!("restore over raw: {rep:?} (changed {changed} bytes)");
    assert_same(&std::fs::read(&d).unwrap(), &data, "raw restore over");
    assert!(
        rep.bytes_written >= changed && rep.bytes_written <= changed + 6 * (64 << 10),
        "{rep:?}"
    );
    assert_eq!(rep.bytes_compared, 32 * MIB);

    // qcow2: the same, through qemu-nbd.
    let q = ds.join("r.qcow2");
    qcow2_from_raw(&d, &q);
    qemu_io_write(&q, 0x77, 20 * MIB, 128 << 10);
    let rep = a
        .restore(
            &v,
            &RestoreRequest {
                snapshot: spec.clone(),
                target: q.clone(),
                format: DiskFormat::Qcow2,
                mode: RestoreMode::Over,
            },
        )
        .unwrap();
    println!("restore over qcow2: {rep:?}");
    assert!(
        rep.bytes_written >= 128 << 10 && rep.bytes_written <= (128 << 10) + 2 * (64 << 10),
        "{rep:?}"
    );
    assert_same(
        &guest_bytes(&q, "qcow2", None, dir.path()),
        &data,
        "qcow2 restore over",
    );
    // Nothing differs now: nothing is written.
    let rep = a
        .restore(
            &v,
            &RestoreRequest {
                snapshot: spec,
                target: d.clone(),
                format: DiskFormat::Raw,
                mode: RestoreMode::Over,
            },
        )
        .unwrap();
    assert_eq!(rep.bytes_written, 0);
    let st = a.stats();
    assert!(
        st.disk_bytes_written >= changed && st.disk_bytes_read >= 64 * MIB,
        "{st:?}"
    );
}

#[path = "suites/remote.rs"]
mod remote;

#[path = "suites/qcow2_extents.rs"]
mod qcow2_extents;

/// A group of disks on two storage units: one snapshot per unit (targeted group snapshot).
#[test]
fn group_snapshot_takes_one_snapshot_per_unit() {
    let (x, b) = (Mounted::new("xfs"), Mounted::new("btrfs"));
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2, d3) = (
        x.mnt.join("v1.raw"),
        x.mnt.join("v2.raw"),
        b.mnt.join("v3.raw"),
    );
    for (i, d) in [&d1, &d2, &d3].into_iter().enumerate() {
        write_raw(d, &image_bytes(4 << 20, 200 + i as u64));
    }
    let a = agent(dir.path(), &x.mnt);
    let snaps = a
        .snapshot_units(
            &ReflinkProvider,
            &[d1.clone(), d3.clone(), d2.clone()],
            "group",
        )
        .unwrap();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let mut per_unit: Vec<usize> = snaps.iter().map(|s| s.disks.len()).collect();
    per_unit.sort();
    assert_eq!(per_unit, vec![1, 2]);
    for s in &snaps {
        let root = s.dir.as_ref().unwrap();
        assert!(root.starts_with(&x.mnt) || root.starts_with(&b.mnt));
        for d in &s.disks {
            assert_eq!(
                std::fs::read(&d.image).unwrap(),
                std::fs::read(&d.disk).unwrap()
            );
        }
    }
    // A single provider call refuses to span units.
    assert!(matches!(
        ReflinkProvider.snapshot(&[d1, d3], "x"),
        Err(StorageError::Invalid(_))
    ));
    for s in snaps {
        a.delete_snapshot(&s.id).unwrap();
    }
}

/// QEMU (here qemu-nbd) killed with the image open leaves the bitmap `in-use`: it missed
/// writes and must not be trusted; the backup falls back and stays exact.
#[test]
fn inconsistent_bitmap_after_a_kill_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let v = local_vault(dir.path());
    let a = agent(dir.path(), &ds);
    let raw = dir.path().join("seed.raw");
    write_raw(&raw, &image_bytes(16 << 20, 15));
    let disk = ds.join("k.qcow2");
    qcow2_from_raw(&raw, &disk);
    Qcow2Provider::add_bitmap(&disk, "b0").unwrap();
    let r1 = a
        .backup_disk(
            &v,
            &DiskSnapshot::of_file(&disk).unwrap(),
            &req("k", None, vec![]),
        )
        .unwrap();
    // A writer opens the image and dies without closing it.
    let sock = dir.path().join("w.sock");
    let mut w = std::process::Command::new("qemu-nbd")
        .args([
            "-k",
            sock.to_str().unwrap(),
            "-f",
            "qcow2",
            disk.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed().as_secs() < 10, "qemu-nbd did not start");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // qemu-nbd marks the bitmap in use shortly after it starts listening.
    let in_use = || {
        cairn_storage::qemu::img_info(&disk)
            .map(|i| i.bitmaps.iter().any(|b| !b.is_consistent()))
            .unwrap_or(false)
    };
    while !in_use() {
        assert!(t.elapsed().as_secs() < 10, "the bitmap never became in-use");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    w.kill().unwrap();
    w.wait().unwrap();
    let info = cairn_storage::qemu::img_info(&disk).unwrap();
    assert!(!info.bitmaps[0].is_consistent(), "{:?}", info.bitmaps);
    qemu_io_write(&disk, 0x44, 6 * MIB, 64 << 10);
    let hint = ChangeHint::PersistentBitmap {
        image: disk.clone(),
        bitmap: "b0".into(),
    };
    let r2 = a
        .backup_disk(
            &v,
            &DiskSnapshot::of_file(&disk).unwrap(),
            &req("k", Some(&r1.manifest.id.to_string()), vec![hint]),
        )
        .unwrap();
    assert_eq!(r2.change_source, ChangeSource::RecipeCompare);
    assert!(
        r2.fallbacks[0].contains("inconsistent"),
        "{:?}",
        r2.fallbacks
    );
    assert_same(
        &restore_raw(&a, &v, &r2.manifest.id.to_string(), dir.path()),
        &guest_bytes(&disk, "qcow2", None, dir.path()),
        "after an inconsistent bitmap",
    );
}
