//! LVM2 and honest coverage against images made by the real tools.
//!
//! The lvm2 tools run on loop devices over the image's partitions. Device-mapper is missing
//! on these machines, so nothing is ever activated (`global/activation=0`): `pvcreate`,
//! `vgcreate`, `lvcreate` and `lvextend` write the metadata, the test writes each LV's file
//! system at the places `lvs` reports, and thin and snapshot LVs (which need device-mapper to
//! be created) are added to the metadata with `vgcfgrestore --force`, after which `lvs`
//! lists them as such.

use std::path::Path;
use std::process::Command;

use cairn_fs::{FsKind, Partition, PartitionType};

use super::{EXT_SECS, TreeOpts, check, make_tree, run, sfdisk, sparse_file, tool_path};

/// Loop devices over byte ranges of an image, detached on drop.
struct Loops(Vec<String>);

impl Loops {
    fn attach(img: &Path, ranges: &[(u64, u64)]) -> Self {
        let mut v = Loops(Vec::new());
        for (off, len) in ranges {
            let dev = run(
                "losetup",
                &[
                    "-f",
                    "--show",
                    "-o",
                    &off.to_string(),
                    "--sizelimit",
                    &len.to_string(),
                    img.to_str().unwrap(),
                ],
            );
            v.0.push(dev.trim().to_string());
        }
        v
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new(tool_path("losetup")).args(["-d", d]).status();
        }
    }
}

/// Runs an lvm2 command seeing only `devs`, with activation off and no backup files.
fn lvm(cmd: &str, devs: &[String], args: &[&str]) -> String {
    let filter: Vec<String> = devs.iter().map(|d| format!("\"a|^{d}$|\"")).collect();
    let config = format!(
        "global {{ activation = 0 }} backup {{ backup = 0 archive = 0 }} \
         devices {{ obtain_device_list_from_udev = 0 use_devicesfile = 0 \
         filter = [ {}, \"r|.*|\" ] }}",
        filter.join(", ")
    );
    let out = Command::new(tool_path(cmd))
        .args(["--config", &config])
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd}: {e} (scripts/install-deps.sh installs lvm2)")
        });
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn report(json: &str, kind: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["report"][0][kind].as_array().unwrap().clone()
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_str().unwrap().parse().unwrap()
}

/// Writes `fs` (an image file) into LV `lv` of the image at the disk places `lvs` reports:
/// the test's own reading of LVM's layout, independent of the reader under test.
fn write_into_lv(img: &Path, fs: &Path, lv: &str, devs: &[String], parts: &[(u64, u64)]) {
    let extent = num(
        &report(
            &lvm(
                "vgs",
                devs,
                &[
                    "-o",
                    "vg_extent_size",
                    "--units",
                    "b",
                    "--nosuffix",
                    "--reportformat",
                    "json",
                ],
            ),
            "vg",
        )[0],
        "vg_extent_size",
    );
    let pvs = report(
        &lvm(
            "pvs",
            devs,
            &[
                "-o",
                "pv_name,pe_start",
                "--units",
                "b",
                "--nosuffix",
                "--reportformat",
                "json",
            ],
        ),
        "pv",
    );
    let pv_base = |name: &str| {
        let i = devs.iter().position(|d| d == name).unwrap();
        let pe = pvs.iter().find(|p| p["pv_name"] == name).unwrap();
        parts[i].0 + num(pe, "pe_start")
    };
    let segs = report(
        &lvm(
            "lvs",
            devs,
            &[
                "--segments",
                "-o",
                "lv_name,seg_start_pe,seg_size_pe,stripes,stripe_size,seg_pe_ranges",
                "--units",
                "b",
                "--nosuffix",
                "--reportformat",
                "json",
            ],
        ),
        "seg",
    );
    let data = std::fs::read(fs).unwrap();
    let disk = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    use std::os::unix::fs::FileExt;
    for s in segs.iter().filter(|s| s["lv_name"] == lv) {
        let start = num(s, "seg_start_pe") * extent;
        let len = num(s, "seg_size_pe") * extent;
        let n = num(s, "stripes");
        let chunk = if n == 1 { len } else { num(s, "stripe_size") };
        // "/dev/loop0:2-3 /dev/loop1:0-1": where each stripe's extents start.
        let areas: Vec<u64> = s["seg_pe_ranges"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .map(|r| {
                let (dev, range) = r.rsplit_once(':').unwrap();
                let first: u64 = range.split('-').next().unwrap().parse().unwrap();
                pv_base(dev) + first * extent
            })
            .collect();
        assert_eq!(areas.len() as u64, n);
        let mut off = 0;
        while off < len && start + off < data.len() as u64 {
            let k = (off / chunk) as usize;
            let at = areas[k % areas.len()] + (k / areas.len()) as u64 * chunk;
            let end = (start + off + chunk).min(data.len() as u64);
            disk.write_all_at(&data[(start + off) as usize..end as usize], at)
                .unwrap();
            off += chunk;
        }
    }
}

fn lv<'a>(parts: &'a [Partition], name: &str) -> &'a Partition {
    parts
        .iter()
        .find(|p| matches!(&p.part_type, PartitionType::LogicalVolume { lv, .. } if lv == name))
        .unwrap_or_else(|| panic!("LV {name} not found in {parts:#?}"))
}

const SNAP_AND_THIN: &str = r#"
        rootsnap {
            id = "Snap00-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa1"
            status = ["READ", "WRITE", "VISIBLE"]
            flags = []
            segment_count = 1
            segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1
                       stripes = [ "pv1", 4 ] }
        }
        snapshot0 {
            id = "Snap00-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa2"
            status = ["READ"]
            flags = []
            segment_count = 1
            segment1 { start_extent = 0 extent_count = 3 type = "snapshot" chunk_size = 8
                       origin = "root" cow_store = "rootsnap" }
        }
        pool {
            id = "Pool00-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa3"
            status = ["READ", "WRITE", "VISIBLE"]
            flags = []
            segment_count = 1
            segment1 { start_extent = 0 extent_count = 1 type = "thin-pool"
                       metadata = "pool_tmeta" pool = "pool_tdata" transaction_id = 1
                       chunk_size = 128 discards = "passdown" zero_new_blocks = 1 }
        }
        thin1 {
            id = "Thin00-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa4"
            status = ["READ", "WRITE", "VISIBLE"]
            flags = []
            segment_count = 1
            segment1 { start_extent = 0 extent_count = 4 type = "thin" thin_pool = "pool"
                       transaction_id = 0 device_id = 1 }
        }
        pool_tmeta {
            id = "Pool00-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa5"
            status = ["READ", "WRITE"]
            flags = []
            segment_count = 1
            segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1
                       stripes = [ "pv1", 5 ] }
        }
        pool_tdata {
            id = "Pool00-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa6"
            status = ["READ", "WRITE"]
            flags = []
            segment_count = 1
            segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1
                       stripes = [ "pv1", 6 ] }
        }
"#;

#[test]
fn lvm_linear_striped_thin_and_snapshot_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    sparse_file(&img, 96 << 20);
    let script = "label: gpt\n\
                  start=2048, size=86016, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n\
                  start=88064, size=86016, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n";
    let parts: Vec<(u64, u64)> = sfdisk(&img, script)
        .into_iter()
        .map(|(s, n)| (s * 512, n * 512))
        .collect();
    let vg = format!("cairnt{}", std::process::id());
    let loops = Loops::attach(&img, &parts);
    let devs = loops.0.clone();
    let d: Vec<&str> = devs.iter().map(String::as_str).collect();
    lvm("pvcreate", &devs, &["-ff", "-y", d[0], d[1]]);
    lvm("vgcreate", &devs, &[&vg, d[0], d[1]]);
    // root: linear, then extended after `data` so it has two segments; data: two stripes.
    lvm(
        "lvcreate",
        &devs,
        &["-an", "-Zn", "-L", "8M", "-n", "root", &vg],
    );
    lvm(
        "lvcreate",
        &devs,
        &[
            "-an", "-Zn", "-i2", "-I", "64k", "-L", "16M", "-n", "data", &vg,
        ],
    );
    lvm("lvextend", &devs, &["-L", "+4M", &format!("{vg}/root")]);

    let src_root = tmp.path().join("root");
    make_tree(
        &src_root,
        &TreeOpts {
            symlinks: true,
            big: false,
            many: 50,
        },
    );
    let src_data = tmp.path().join("data");
    make_tree(
        &src_data,
        &TreeOpts {
            symlinks: false,
            big: true,
            many: 0,
        },
    );
    for (name, src, size) in [("root", &src_root, "12M"), ("data", &src_data, "16M")] {
        let fs = tmp.path().join(format!("{name}.ext4"));
        run(
            "mke2fs",
            &[
                "-q",
                "-t",
                "ext4",
                "-d",
                src.to_str().unwrap(),
                "-F",
                fs.to_str().unwrap(),
                size,
            ],
        );
        write_into_lv(&img, &fs, name, &devs, &parts);
    }

    // Thin and snapshot volumes, through LVM's own metadata restore.
    let backup = tmp.path().join("vg.txt");
    lvm("vgcfgbackup", &devs, &["-f", backup.to_str().unwrap(), &vg]);
    let text = std::fs::read_to_string(&backup).unwrap();
    let end = text
        .rfind("\t}\n\n}")
        .or_else(|| text.rfind("\t}\n}"))
        .unwrap();
    let text = format!("{}{SNAP_AND_THIN}{}", &text[..end], &text[end..]);
    std::fs::write(&backup, text).unwrap();
    lvm(
        "vgcfgrestore",
        &devs,
        &["--force", "-f", backup.to_str().unwrap(), &vg],
    );
    let listed = lvm(
        "lvs",
        &devs,
        &["-a", "--noheadings", "-o", "lv_name,segtype"],
    );
    for want in ["thin1", "thin-pool", "rootsnap", "striped", "linear"] {
        assert!(listed.contains(want), "lvs does not list {want}: {listed}");
    }
    drop(loops);

    let f = std::fs::File::open(&img).unwrap();
    let layout = cairn_fs::scan(&f).unwrap();
    let pvs: Vec<_> = layout
        .partitions
        .iter()
        .filter(|p| p.fs == FsKind::LvmPv)
        .collect();
    assert_eq!(pvs.len(), 2, "{layout:#?}");
    assert!(
        pvs.iter()
            .all(|p| p.not_indexed_reason().is_none() && !p.readable())
    );
    let parts_found = &layout.partitions;
    let root = lv(parts_found, "root");
    let data = lv(parts_found, "data");
    assert_eq!((root.fs, root.length), (FsKind::Ext4, 12 << 20));
    assert_eq!((data.fs, data.length), (FsKind::Ext4, 16 << 20));
    let PartitionType::LogicalVolume { segments, .. } = &root.part_type else {
        unreachable!()
    };
    assert_eq!(segments.len(), 2, "root has two segments");
    let PartitionType::LogicalVolume { segments, .. } = &data.part_type else {
        unreachable!()
    };
    assert_eq!(
        (segments[0].stripes.len(), segments[0].stripe_size),
        (2, 64 << 10)
    );
    check(&img, root, &src_root, &EXT_SECS);
    let entries = check(&img, data, &src_data, &EXT_SECS);
    // The big file crosses stripes: its extents alternate between the two PVs.
    let big = entries.iter().find(|e| e.path == "/big.bin").unwrap();
    assert!(big.extents.iter().any(|x| x.disk_offset < parts[1].0));
    assert!(big.extents.iter().any(|x| x.disk_offset >= parts[1].0));
    let one = cairn_fs::lookup(&f, root, &cairn_fs::Limits::default(), "/a/b/c/deep.txt").unwrap();
    assert_eq!(
        cairn_fs::read_file(&f, &one, &cairn_fs::Limits::default()).unwrap(),
        b"deep down\n"
    );

    for (name, says) in [
        ("thin1", "thin volume in pool pool"),
        ("pool", "thin pool"),
        ("rootsnap", "snapshot of"),
    ] {
        let p = lv(parts_found, name);
        let why = p.not_indexed_reason().unwrap_or_default();
        assert!(why.contains(says), "{name}: {why:?}");
        assert!(
            cairn_fs::walk(&f, p, &cairn_fs::Limits::default(), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .is_err()
        );
    }
    assert!(
        !parts_found
            .iter()
            .any(|p| p.name.ends_with("_tmeta") || p.name.ends_with("_tdata")),
        "hidden LVs are not volumes"
    );

    // The second PV gone (its label wiped): what lived on it is "not on this disk".
    let disk = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    use std::os::unix::fs::FileExt;
    disk.write_all_at(&[0u8; 2048], parts[1].0).unwrap();
    let layout = cairn_fs::scan(&std::fs::File::open(&img).unwrap()).unwrap();
    let data = lv(&layout.partitions, "data");
    let why = data.not_indexed_reason().unwrap();
    assert!(why.contains("not on this disk"), "{why}");
    assert_eq!(
        lv(&layout.partitions, "root").fs,
        FsKind::Ext4,
        "root lies on the first PV only"
    );
}

#[test]
fn contents_that_are_not_read_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    sparse_file(&img, 40 << 20);
    let script = "label: gpt\n\
                  start=2048, size=20480\nstart=22528, size=8192\nstart=30720, size=8192\n\
                  start=38912, size=8192\nstart=47104, size=8192\nstart=55296, size=8192\n";
    let parts: Vec<(u64, u64)> = sfdisk(&img, script)
        .into_iter()
        .map(|(s, n)| (s * 512, n * 512))
        .collect();
    use std::os::unix::fs::FileExt;
    let disk = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let put = |i: usize, file: &Path| {
        let data = std::fs::read(file).unwrap();
        disk.write_all_at(&data[..data.len().min(parts[i].1 as usize)], parts[i].0)
            .unwrap();
    };
    // p1: LUKS2 (cryptsetup formats a plain file without device-mapper).
    let luks = tmp.path().join("luks.img");
    sparse_file(&luks, 10 << 20);
    let mut c = Command::new(tool_path("cryptsetup"))
        .args([
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            "-",
            luks.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(b"secret").unwrap();
    assert!(c.wait().unwrap().success(), "cryptsetup luksFormat");
    put(0, &luks);
    // p2: swap.
    let swap = tmp.path().join("swap.img");
    sparse_file(&swap, 4 << 20);
    run("mkswap", &[swap.to_str().unwrap()]);
    put(1, &swap);
    // p3: blank. p4: noise. p5: an md superblock (v1.2; mdadm is not installed, so only its
    // magic at 4 KiB). p6: a BitLocker boot sector's OEM id.
    disk.write_all_at(&super::pseudo_random(65536, 9), parts[3].0)
        .unwrap();
    disk.write_all_at(&0xa92b_4efcu32.to_le_bytes(), parts[4].0 + 4096)
        .unwrap();
    let mut boot = [0u8; 512];
    boot[3..11].copy_from_slice(b"-FVE-FS-");
    boot[510..].copy_from_slice(&[0x55, 0xAA]);
    disk.write_all_at(&boot, parts[5].0).unwrap();

    let f = std::fs::File::open(&img).unwrap();
    let layout = cairn_fs::scan(&f).unwrap();
    let kinds: Vec<FsKind> = layout.partitions.iter().map(|p| p.fs).collect();
    assert_eq!(
        kinds,
        [
            FsKind::Luks,
            FsKind::Swap,
            FsKind::Blank,
            FsKind::Unknown,
            FsKind::MdRaid,
            FsKind::BitLocker
        ]
    );
    for p in &layout.partitions {
        let why = p.not_indexed_reason().expect("every one has a reason");
        assert!(!why.is_empty());
        let e = cairn_fs::walk(&f, p, &cairn_fs::Limits::default(), |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("not indexed"), "{e}");
    }
}
